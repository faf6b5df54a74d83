//! The serving process: `vdisk mount` in the background (it starts
//! `vdisk mount --foreground` and waits for it to be ready), and the
//! foreground process itself, which mounts, serves until unmounted or
//! signalled (SIGINT, SIGTERM, SIGHUP), then closes the image.

use super::fs::DiskFs;
use super::table::{absolute, find_mount, unmount_path, UnmountError};
use super::{note, FILE_NAME, IO_SIZE};
use crate::cli::MountArgs;
use crate::open;
use anyhow::{anyhow, bail, Context, Result};
use fuser::{Config, MountOption, Session, SessionACL};
use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::SystemTime;

/// Most FUSE worker threads.
const MAX_THREADS: usize = 4;

/// Start `vdisk mount --foreground` in its own process group and return
/// once it says the mount is ready; relay its error and exit status if it
/// stops first.
pub(super) fn start_background(args: &MountArgs) -> Result<()> {
    let exe = std::env::current_exe().context("cannot find the vdisk executable")?;
    let mut cmd = Command::new(exe);
    let policy = open::policy();
    for dir in &policy.allowed_dirs {
        cmd.arg("--parent-dir").arg(dir);
    }
    if policy.allow_any {
        cmd.arg("--allow-any-parent");
    }
    cmd.args(["mount", "--foreground", "--daemon-child"]);
    if args.rw {
        cmd.arg("--rw");
    }
    if args.page_cache {
        cmd.arg("--page-cache");
    }
    if let Some(f) = args.format {
        cmd.args(["-f", f.name()]);
    }
    cmd.arg("--").arg(&args.image).arg(&args.mountpoint);
    cmd.stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .process_group(0);
    let mut child = cmd
        .spawn()
        .context("cannot start the background vdisk mount process")?;
    let mut ready = String::new();
    let mut out = BufReader::new(child.stdout.take().expect("piped stdout"));
    let _ = out.read_line(&mut ready);
    if ready.ends_with('\n') {
        let mp = absolute(&args.mountpoint)?;
        let visible = find_mount(&mp)?.is_some_and(|m| m.pid() == Some(child.id()));
        if !visible {
            bail!(
                "{}: the mount process reported ready, but the mount is not in \
                 /proc/self/mountinfo",
                args.mountpoint.display()
            );
        }
        print!("{ready}");
        std::io::stdout()
            .flush()
            .context("cannot write to stdout")?;
        return Ok(());
    }
    // It stopped before the mount was ready: its stderr says why.
    let mut err = String::new();
    if let Some(mut e) = child.stderr.take() {
        let _ = e.read_to_string(&mut err);
    }
    let status = child
        .wait()
        .context("cannot wait for the background vdisk mount process")?;
    if err.is_empty() {
        bail!(
            "{}: the background mount process stopped before the mount was ready ({status})",
            args.mountpoint.display()
        );
    }
    eprint!("{err}");
    std::process::exit(status.code().filter(|&c| c != 0).unwrap_or(1));
}

/// Whether the serving process was asked to stop, whether it is mounted,
/// and whether it unmounted on a signal already.
#[derive(Default)]
struct StopState {
    stop: bool,
    mounted: bool,
    unmounting: bool,
}

impl StopState {
    /// Unmount, once, when stopped and mounted.
    fn unmount_if_stopped(&mut self, mount_point: &Path) {
        if self.stop && self.mounted && !self.unmounting {
            self.unmounting = true;
            unmount_on_signal(mount_point);
        }
    }
}

/// Unmount on a signal: at once when nothing uses the mount, else detach it
/// (the session ends when the last user lets go).
fn unmount_on_signal(mount_point: &Path) {
    let name = mount_point.display();
    let result = match unmount_path(mount_point, false) {
        Err(UnmountError::Busy) => {
            note(&format!(
                "{name}: busy; detaching it: the image is closed once the last user closes \
                 {FILE_NAME}"
            ));
            unmount_path(mount_point, true)
        }
        other => other,
    };
    match result {
        Ok(()) => {}
        Err(UnmountError::Busy) => note(&format!("{name}: cannot unmount: busy")),
        Err(UnmountError::Other(msg)) => note(&format!("{name}: cannot unmount: {msg}")),
    }
}

/// Explain a failed mount.
fn mount_error(e: std::io::Error, mount_point: &Path) -> anyhow::Error {
    let name = mount_point.display();
    let dev_fuse = Path::new("/dev/fuse");
    if !dev_fuse.exists() {
        return anyhow!(
            "{name}: cannot mount: /dev/fuse does not exist (load the fuse kernel module: \
             modprobe fuse): {e}"
        );
    }
    match e.kind() {
        std::io::ErrorKind::PermissionDenied => anyhow!(
            "{name}: cannot mount: {e} (opening /dev/fuse or mounting is not permitted for \
             this user)"
        ),
        std::io::ErrorKind::NotFound => anyhow!(
            "{name}: cannot mount: {e} (without the privilege to mount, the fusermount3 helper \
             is needed: install fuse3)"
        ),
        _ => anyhow!("{name}: cannot mount: {e}"),
    }
}

/// Raise the kernel's readahead of the mount to [`IO_SIZE`] (best effort:
/// it needs write access to /sys/class/bdi).
fn raise_readahead(mount_point: &Path) {
    if let Ok(Some(m)) = find_mount(mount_point) {
        let path = format!("/sys/class/bdi/{}/read_ahead_kb", m.dev);
        let _ = std::fs::write(path, format!("{}\n", IO_SIZE / 1024));
    }
}

/// Point stdout and stderr at /dev/null (the starting process has gone).
fn detach_stdio() -> Result<()> {
    let null = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/null")
        .context("/dev/null: cannot open")?;
    nix::unistd::dup2_stdout(&null).context("cannot redirect stdout to /dev/null")?;
    nix::unistd::dup2_stderr(&null).context("cannot redirect stderr to /dev/null")?;
    Ok(())
}

/// Mount, serve until unmounted or signalled, then close the image.
pub(super) fn serve(args: &MountArgs) -> Result<()> {
    let image_name = args.image.display().to_string();
    let mp = std::fs::canonicalize(&args.mountpoint)
        .with_context(|| format!("{}: cannot use as mount point", args.mountpoint.display()))?;

    // Signals first: from here on they stop the mount cleanly.
    let state = Arc::new(Mutex::new(StopState::default()));
    let mut signals = signal_hook::iterator::Signals::new([
        signal_hook::consts::SIGINT,
        signal_hook::consts::SIGTERM,
        signal_hook::consts::SIGHUP,
    ])
    .context("cannot install signal handlers")?;
    let signal_handle = signals.handle();
    let signal_thread = {
        let state = state.clone();
        let mp = mp.clone();
        std::thread::Builder::new()
            .name("signals".into())
            .spawn(move || {
                for _ in signals.forever() {
                    let mut st = state.lock().unwrap_or_else(|e| e.into_inner());
                    st.stop = true;
                    st.unmount_if_stopped(&mp);
                }
            })
            .context("cannot start the signal thread")?
    };
    let stop_signals = move || {
        signal_handle.close();
        let _ = signal_thread.join();
    };

    let opened = match open::open(&args.image, args.format, args.rw) {
        Ok(o) => o,
        Err(e) => {
            stop_signals();
            return Err(e);
        }
    };
    let time = std::fs::metadata(&args.image)
        .and_then(|m| m.modified())
        .unwrap_or_else(|_| SystemTime::now());
    let abs_image = std::fs::canonicalize(&args.image).unwrap_or_else(|_| args.image.clone());
    let fs = DiskFs::new(
        opened.disk().clone(),
        image_name.clone(),
        args.rw,
        args.page_cache,
        time,
    );

    let mut config = Config::default();
    config.mount_options = vec![
        MountOption::FSName(format!(
            "vdisk[{}]:{}",
            std::process::id(),
            abs_image.display()
        )),
        MountOption::Subtype("vdisk".into()),
        MountOption::DefaultPermissions,
        MountOption::NoDev,
        MountOption::NoSuid,
        MountOption::NoExec,
        MountOption::NoAtime,
        if args.rw {
            MountOption::RW
        } else {
            MountOption::RO
        },
    ];
    config.acl = SessionACL::Owner;
    // Two per CPU: a worker waiting for the image file's device leaves its
    // CPU to another.
    config.n_threads = Some(
        std::thread::available_parallelism()
            .map_or(2, |n| 2 * n.get())
            .clamp(2, MAX_THREADS),
    );
    config.clone_fd = true;

    let stopped_early = state.lock().unwrap_or_else(|e| e.into_inner()).stop;
    let session = if stopped_early {
        None
    } else {
        match Session::new(fs, &mp, &config) {
            Ok(s) => Some(s),
            Err(e) => {
                stop_signals();
                let _ = opened.close();
                return Err(mount_error(e, &args.mountpoint));
            }
        }
    };
    let mut result = Ok(());
    if let Some(session) = session {
        {
            let mut st = state.lock().unwrap_or_else(|e| e.into_inner());
            st.mounted = true;
            st.unmount_if_stopped(&mp);
        }
        raise_readahead(&mp);
        let path = mp.join(FILE_NAME);
        let announced = writeln!(std::io::stdout(), "{}", path.display())
            .and_then(|()| std::io::stdout().flush());
        if args.daemon_child {
            if let Err(e) = detach_stdio() {
                note(&format!("{e:#}"));
            }
            // Every path is resolved by now: keep no directory busy.
            let _ = std::env::set_current_dir("/");
        } else if let Err(e) = announced {
            note(&format!("cannot write to stdout: {e}"));
        }
        result = session
            .run()
            .with_context(|| format!("{}: the FUSE session failed", args.mountpoint.display()));
        // The session also ends when the kernel aborts the connection:
        // leave no dead mount behind.
        if let Ok(Some(m)) = find_mount(&mp) {
            if m.pid() == Some(std::process::id()) {
                let _ = unmount_path(&mp, true);
            }
        }
    }
    stop_signals();
    let closed = opened
        .close()
        .with_context(|| format!("{image_name}: cannot close the image cleanly after unmount"));
    result.and(closed)
}
