//! The mount table (`/proc/self/mountinfo`): finding a mount and whether
//! `vdisk mount` made it, unmounting (`umount2`, or `fusermount3 -u`), and
//! `vdisk unmount`, which waits for the serving process to close the image.

use super::FILE_NAME;
use crate::cli::UnmountArgs;
use anyhow::{bail, Context, Result};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// How long `vdisk unmount` waits for the serving process to close the image.
const CLOSE_TIMEOUT: Duration = Duration::from_secs(300);

/// One line of /proc/self/mountinfo.
#[derive(Debug)]
pub(super) struct MountEntry {
    /// "MAJOR:MINOR" of the filesystem.
    pub(super) dev: String,
    pub(super) mount_point: PathBuf,
    fs_type: String,
    source: String,
}

impl MountEntry {
    /// A mount made by `vdisk mount`.
    pub(super) fn is_vdisk(&self) -> bool {
        (self.fs_type == "fuse" || self.fs_type.starts_with("fuse.")) && self.pid().is_some()
    }

    /// The serving process, from the source `vdisk[PID]:IMAGE`.
    pub(super) fn pid(&self) -> Option<u32> {
        let rest = self.source.strip_prefix("vdisk[")?;
        let (pid, _image) = rest.split_once("]:")?;
        pid.parse().ok()
    }

    /// The image, from the source `vdisk[PID]:IMAGE`.
    pub(super) fn image(&self) -> &str {
        self.source
            .split_once("]:")
            .map_or(self.source.as_str(), |(_, i)| i)
    }
}

/// Undo the octal escapes (`\040` for a space...) of mountinfo fields.
fn unescape(field: &str) -> String {
    let b = field.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        let octal = b
            .get(i + 1..i + 4)
            .filter(|d| d.iter().all(|c| (b'0'..=b'7').contains(c)));
        if let (b'\\', Some(d)) = (b[i], octal) {
            // One byte (the kernel escapes bytes: at most \377), modulo 256.
            let v = d
                .iter()
                .fold(0u8, |v, c| v.wrapping_mul(8).wrapping_add(c - b'0'));
            out.push(v);
            i += 4;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Parse one line of /proc/self/mountinfo.
fn parse_mountinfo_line(line: &str) -> Option<MountEntry> {
    let (before, after) = line.split_once(" - ")?;
    let f: Vec<&str> = before.split(' ').collect();
    let a: Vec<&str> = after.split(' ').collect();
    Some(MountEntry {
        dev: f.get(2)?.to_string(),
        mount_point: PathBuf::from(unescape(f.get(4)?)),
        fs_type: a.first()?.to_string(),
        source: unescape(a.get(1)?),
    })
}

/// The topmost mount at `mount_point` (an absolute path without symlinks).
pub(super) fn find_mount(mount_point: &Path) -> Result<Option<MountEntry>> {
    let text = std::fs::read_to_string("/proc/self/mountinfo")
        .context("cannot read /proc/self/mountinfo")?;
    Ok(text
        .lines()
        .rev()
        .filter_map(parse_mountinfo_line)
        .find(|m| m.mount_point == mount_point))
}

/// `path` made absolute, with symlinks resolved in its parent only (a dead
/// FUSE mount cannot be stat'ed itself).
pub(super) fn absolute(path: &Path) -> Result<PathBuf> {
    let name = path.display();
    let abs = std::path::absolute(path).with_context(|| format!("{name}: bad path"))?;
    match (abs.parent(), abs.file_name()) {
        (Some(parent), Some(file)) => Ok(std::fs::canonicalize(parent)
            .with_context(|| format!("{name}: cannot resolve {}", parent.display()))?
            .join(file)),
        _ => Ok(abs),
    }
}

// ---- Unmounting. ----

/// Why an unmount failed.
pub(super) enum UnmountError {
    /// Something uses the mount (an open file, a working directory).
    Busy,
    Other(String),
}

/// Unmount `mount_point`: umount2(2), or `fusermount3 -u` (`fusermount -u`)
/// for a user without the privilege. `lazy`: detach now, end when unused.
pub(super) fn unmount_path(
    mount_point: &Path,
    lazy: bool,
) -> std::result::Result<(), UnmountError> {
    use nix::errno::Errno as E;
    use nix::mount::MntFlags;
    let flags = if lazy {
        MntFlags::MNT_DETACH
    } else {
        MntFlags::empty()
    };
    match nix::mount::umount2(mount_point, flags) {
        Ok(()) => Ok(()),
        Err(E::EBUSY) => Err(UnmountError::Busy),
        Err(E::EPERM) => fusermount_unmount(mount_point, lazy),
        Err(e) => Err(UnmountError::Other(e.desc().to_string())),
    }
}

/// `fusermount3 -u [-z] MOUNTPOINT`, or `fusermount` when there is no fusermount3.
fn fusermount_unmount(mount_point: &Path, lazy: bool) -> std::result::Result<(), UnmountError> {
    for bin in ["fusermount3", "fusermount"] {
        let mut cmd = Command::new(bin);
        cmd.arg("-u");
        if lazy {
            cmd.arg("-z");
        }
        let out = match cmd.arg(mount_point).stdin(Stdio::null()).output() {
            Ok(out) => out,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
            Err(e) => return Err(UnmountError::Other(format!("cannot run {bin}: {e}"))),
        };
        if out.status.success() {
            return Ok(());
        }
        let msg = String::from_utf8_lossy(&out.stderr).trim().to_string();
        if msg.contains("busy") {
            return Err(UnmountError::Busy);
        }
        return Err(UnmountError::Other(format!("{bin} -u failed: {msg}")));
    }
    Err(UnmountError::Other(
        "operation not permitted, and neither fusermount3 nor fusermount is installed \
         (install fuse3)"
            .to_string(),
    ))
}

/// Whether process `pid` runs (and is not a zombie).
fn process_alive(pid: u32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        // "PID (COMM) STATE ...": COMM may hold spaces and parentheses.
        Ok(stat) => stat
            .rsplit_once(") ")
            .is_some_and(|(_, rest)| !rest.starts_with('Z') && !rest.starts_with('X')),
        Err(_) => false,
    }
}

/// How long `vdisk unmount` retries a busy mount.
const BUSY_GRACE: Duration = Duration::from_secs(1);

/// `vdisk unmount MOUNTPOINT`.
pub fn unmount(args: &UnmountArgs) -> Result<()> {
    let name = args.mountpoint.display();
    let mp = absolute(&args.mountpoint)?;
    let Some(m) = find_mount(&mp)? else {
        bail!("{name}: not a mount point (nothing is mounted there)");
    };
    if !m.is_vdisk() {
        bail!(
            "{name}: not a vdisk mount (it is a {} mount of {}); use umount",
            m.fs_type,
            m.source
        );
    }
    // A file closed just before is released by the kernel asynchronously
    // (FUSE's RELEASE comes after close returns): the mount may be busy for
    // a moment after the last close. Retry for a second before calling it
    // busy.
    let tried = Instant::now();
    let mut result = unmount_path(&mp, false);
    while matches!(result, Err(UnmountError::Busy)) && tried.elapsed() < BUSY_GRACE {
        std::thread::sleep(Duration::from_millis(20));
        result = unmount_path(&mp, false);
    }
    match result {
        Ok(()) => {}
        Err(UnmountError::Busy) => bail!(
            "{name}: cannot unmount: the mount is busy (a process has {name}/{FILE_NAME} open or \
             its working directory in {name}); close it and retry"
        ),
        Err(UnmountError::Other(msg)) => bail!("{name}: cannot unmount: {msg}"),
    }
    // The serving process flushes and closes the image once unmounted: wait
    // for it, so that the image is consistent when this command returns.
    if let Some(pid) = m.pid() {
        let start = Instant::now();
        while process_alive(pid) {
            if start.elapsed() > CLOSE_TIMEOUT {
                bail!(
                    "{name}: unmounted, but the vdisk process {pid} serving {} did not exit \
                     within {} s",
                    m.image(),
                    CLOSE_TIMEOUT.as_secs()
                );
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mountinfo_lines() {
        let m = parse_mountinfo_line(
            "97 27 0:52 / /tmp/a\\040b rw,nosuid,nodev,noexec,noatime - fuse \
             vdisk[4242]:/x/my\\040disk.vhdx rw,user_id=0,group_id=0,default_permissions",
        )
        .unwrap();
        assert_eq!(m.dev, "0:52");
        assert_eq!(m.mount_point, Path::new("/tmp/a b"));
        assert_eq!(m.fs_type, "fuse");
        assert!(m.is_vdisk());
        assert_eq!(m.pid(), Some(4242));
        assert_eq!(m.image(), "/x/my disk.vhdx");
        let ext4 = parse_mountinfo_line("29 1 8:1 / / rw,relatime - ext4 /dev/sda1 rw").unwrap();
        assert!(!ext4.is_vdisk());
        assert_eq!(unescape("a\\134b\\011"), "a\\b\t");
        assert_eq!(unescape("tail\\04"), "tail\\04");
    }
}
