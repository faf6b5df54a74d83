//! End-to-end tests of `vdisk mount` and `vdisk unmount` (FUSE).
//!
//! Tests that mount skip, with a message, where /dev/fuse is absent or
//! mounting is not permitted; every mount is unmounted by a drop guard, also
//! when a test fails.

// Test images and buffers are small: their offsets and sizes fit any integer type.
#![allow(clippy::cast_possible_truncation)]

mod common;
use common::*;

use std::fs;
use std::io::{BufRead, BufReader, Read};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

const MIB: u64 = 1 << 20;

/// Whether `program` can be run (found on PATH or in /sbin, /usr/sbin).
fn tool(program: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain(["/usr/sbin", "/sbin"].map(PathBuf::from))
        .map(|d| d.join(program))
        .find(|f| f.is_file())
}

/// Whether a mount is at `dir` (as /proc/self/mountinfo lists it).
fn is_mounted(dir: &Path) -> bool {
    let dir = fs::canonicalize(dir).unwrap_or_else(|_| dir.to_path_buf());
    fs::read_to_string("/proc/self/mountinfo")
        .unwrap_or_default()
        .lines()
        .any(|l| l.split(' ').nth(4) == Some(p(&dir)))
}

/// Unmount `dir` by any means (for the drop guard): `vdisk unmount`, then
/// `fusermount3 -u -z`, `fusermount -u -z`, `umount -l`.
fn force_unmount(dir: &Path) {
    let _ = run(&["unmount", p(dir)]);
    for (prog, args) in [
        ("fusermount3", &["-u", "-z"][..]),
        ("fusermount", &["-u", "-z"][..]),
        ("umount", &["-l"][..]),
    ] {
        if !is_mounted(dir) {
            return;
        }
        let _ = Command::new(prog).args(args).arg(dir).output();
    }
}

/// A mount made by a test: unmounted (by any means) when dropped, unless
/// [`Mounted::unmount`] did it.
struct Mounted {
    dir: PathBuf,
    done: bool,
}

impl Mounted {
    /// The file exposing the disk.
    fn file(&self) -> PathBuf {
        self.dir.join("disk")
    }

    /// `vdisk unmount`, which must succeed and leave no mount.
    fn unmount(mut self) {
        ok(&["unmount", p(&self.dir)]);
        self.done = true;
        assert!(
            !is_mounted(&self.dir),
            "{} still mounted",
            self.dir.display()
        );
    }
}

impl Drop for Mounted {
    fn drop(&mut self) {
        if !self.done && is_mounted(&self.dir) {
            force_unmount(&self.dir);
        }
    }
}

/// Whether the `vdisk mount` error `stderr` says that FUSE mounts are not
/// possible here (rather than that vdisk failed).
fn fuse_unavailable(stderr: &str) -> bool {
    [
        "/dev/fuse",
        "not permitted",
        "ermission denied",
        "fusermount",
    ]
    .iter()
    .any(|s| stderr.contains(s))
}

/// Whether FUSE mounts work here, probed once by mounting a small raw
/// image; prints why not. Panics when the probe fails for another reason.
fn fuse_works() -> bool {
    static WORKS: OnceLock<Result<(), String>> = OnceLock::new();
    let r = WORKS.get_or_init(|| {
        if !Path::new("/dev/fuse").exists() {
            return Err("/dev/fuse is absent".into());
        }
        let dir = tmp();
        let img = dir.path().join("probe.raw");
        let mnt = dir.path().join("m");
        fs::create_dir(&mnt).unwrap();
        ok(&["create", "-f", "raw", p(&img), "1M"]);
        let out = run(&["mount", p(&img), p(&mnt)]);
        let guard = Mounted {
            dir: mnt.clone(),
            done: false,
        };
        if out.status.success() {
            guard.unmount();
            return Ok(());
        }
        let err = String::from_utf8_lossy(&out.stderr).into_owned();
        assert!(fuse_unavailable(&err), "probe mount failed: {err}");
        Err(format!("mounting is not permitted here: {}", err.trim()))
    });
    match r {
        Ok(()) => true,
        Err(why) => {
            eprintln!("skipping: {why}");
            false
        }
    }
}

/// `vdisk mount [--rw] IMAGE DIR`, which must succeed and print DIR/disk.
fn mount(img: &Path, dir: &Path, rw: bool) -> Mounted {
    mount_with(img, dir, if rw { &["--rw"] } else { &[] })
}

/// `vdisk mount FLAGS IMAGE DIR`, which must succeed and print DIR/disk.
fn mount_with(img: &Path, dir: &Path, flags: &[&str]) -> Mounted {
    let mut args = vec!["mount"];
    args.extend(flags);
    args.extend([p(img), p(dir)]);
    let out = run(&args);
    let m = Mounted {
        dir: dir.to_path_buf(),
        done: false,
    };
    assert!(
        out.status.success(),
        "vdisk {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let printed = String::from_utf8(out.stdout).unwrap();
    let want = fs::canonicalize(dir).unwrap().join("disk");
    assert_eq!(printed.trim_end(), p(&want));
    assert!(is_mounted(dir));
    m
}

fn mount_dir(parent: &Path) -> PathBuf {
    let d = parent.join("mnt");
    fs::create_dir(&d).unwrap();
    d
}

/// Run a program, which must succeed; its stdout.
fn sh(prog: &Path, args: &[&str]) -> Vec<u8> {
    let out = Command::new(prog).args(args).output().unwrap();
    assert!(
        out.status.success(),
        "{} {args:?} failed ({:?}): {}{}",
        prog.display(),
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out.stdout
}

fn log_state(img: &Path) -> String {
    let j: serde_json::Value =
        serde_json::from_str(&ok(&["info", "--output", "json", p(img)])).unwrap();
    j["log"].as_str().unwrap_or_default().to_string()
}

#[test]
fn mount_rw_mkfs_ext4_debugfs_convert_fsck() {
    let (Some(mkfs), Some(debugfs), Some(e2fsck)) =
        (tool("mkfs.ext4"), tool("debugfs"), tool("e2fsck"))
    else {
        eprintln!("skipping: mkfs.ext4, debugfs or e2fsck is absent (package e2fsprogs)");
        return;
    };
    if !fuse_works() {
        return;
    }
    let dir = tmp();
    let img = dir.path().join("fs.vhdx");
    ok(&[
        "create",
        "-f",
        "vhdx",
        "-o",
        "subformat=dynamic,block_size=1M",
        p(&img),
        "64M",
    ]);
    let files = [
        ("big.bin", pattern(300_000, 1)),
        ("hello.txt", b"hello from vdisk mount\n".to_vec()),
    ];
    for (name, data) in &files {
        fs::write(dir.path().join(name), data).unwrap();
    }

    let m = mount(&img, &mount_dir(dir.path()), true);
    let file = m.file();
    assert_eq!(fs::metadata(&file).unwrap().len(), 64 * MIB);
    sh(&mkfs, &["-F", "-q", p(&file)]);
    for (name, _) in &files {
        let src = dir.path().join(name);
        let req = format!("write {} {name}", p(&src));
        sh(&debugfs, &["-w", "-R", &req, p(&file)]);
    }
    m.unmount();
    assert_eq!(log_state(&img), "clean");

    let raw = dir.path().join("fs.raw");
    ok(&["convert", "-O", "raw", p(&img), p(&raw)]);
    sh(&e2fsck, &["-fn", p(&raw)]);
    for (name, data) in &files {
        let got = sh(&debugfs, &["-R", &format!("cat {name}"), p(&raw)]);
        assert!(got == *data, "{name}: {} bytes read back", got.len());
    }
    if let Some(qemu) = tool("qemu-img") {
        sh(&qemu, &["check", "-f", "vhdx", p(&img)]);
    }
}

/// Run `prog args` with `input` on stdin; it must succeed.
fn sh_in(prog: &Path, args: &[&str], input: &str) {
    use std::io::Write;
    let mut child = Command::new(prog)
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(input.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "{} {args:?} failed: {}",
        prog.display(),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// The partitions `sfdisk --json FILE` lists: (number, start byte, length).
fn sfdisk_parts(sfdisk: &Path, file: &Path) -> Vec<(u32, u64, u64)> {
    let j: serde_json::Value = serde_json::from_slice(&sh(sfdisk, &["--json", p(file)])).unwrap();
    let table = &j["partitiontable"];
    let ss = table["sectorsize"].as_u64().unwrap_or(512);
    table["partitions"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| !matches!(e["type"].as_str(), Some("5" | "f" | "85")))
        .map(|e| {
            let node = e["node"].as_str().unwrap();
            let digits = node.len() - node.chars().rev().take_while(char::is_ascii_digit).count();
            (
                node[digits..].parse().unwrap(),
                e["start"].as_u64().unwrap() * ss,
                e["size"].as_u64().unwrap() * ss,
            )
        })
        .collect()
}

/// The `partN` files of a mount: (N, size), sorted.
fn part_files(dir: &Path) -> Vec<(u32, u64)> {
    let mut v: Vec<(u32, u64)> = fs::read_dir(dir)
        .unwrap()
        .filter_map(|e| {
            let e = e.unwrap();
            let name = e.file_name().into_string().unwrap();
            let n = name.strip_prefix("part")?.parse().ok()?;
            Some((n, e.metadata().unwrap().len()))
        })
        .collect();
    v.sort();
    v
}

#[test]
fn partitions_made_through_the_mount_appear_as_files() {
    let Some(sfdisk) = tool("sfdisk") else {
        eprintln!("skipping: sfdisk is absent (package fdisk)");
        return;
    };
    if !fuse_works() {
        return;
    }
    let dir = tmp();
    for (label, script) in [
        (
            "gpt",
            "label: gpt\nsize=8MiB, name=EFI\nsize=20MiB, name=data\nname=rest\n",
        ),
        (
            "dos",
            "label: dos\nsize=8MiB, type=83, bootable\ntype=5\nsize=6MiB, type=83\nsize=5MiB, \
             type=c\n",
        ),
    ] {
        let img = dir.path().join(format!("{label}.vhdx"));
        create_vhdx_1m(&img, "48M");
        let mnt = dir.path().join(format!("mnt-{label}"));
        fs::create_dir(&mnt).unwrap();
        let m = mount(&img, &mnt, true);
        assert!(
            part_files(&m.dir).is_empty(),
            "{label}: a blank disk has partitions"
        );
        sh_in(&sfdisk, &["-q", p(&m.file())], script);
        // The oracle: sfdisk's own reading of the table, through the mount.
        let want = sfdisk_parts(&sfdisk, &m.file());
        assert!(want.len() >= 3, "{label}: sfdisk made {want:?}");
        let got = part_files(&m.dir);
        assert_eq!(
            got,
            want.iter().map(|&(n, _, len)| (n, len)).collect::<Vec<_>>(),
            "{label}: partition files"
        );
        if label == "dos" {
            assert_eq!(got[1].0, 5, "logical partitions are numbered from 5");
        }
        // Each partition file shows its own range of the disk.
        for (i, &(n, start, len)) in want.iter().enumerate() {
            let part = m.dir.join(format!("part{n}"));
            let data = pattern(70_000, n + 40);
            let f = fs::OpenOptions::new().write(true).open(&part).unwrap();
            f.write_all_at(&data, len - data.len() as u64).unwrap();
            f.write_all_at(&data, 0).unwrap();
            // Past its end: nothing fits.
            let err = f.write_all_at(b"x", len).unwrap_err();
            assert_eq!(err.raw_os_error(), Some(28), "{label} part{n}: {err}"); // ENOSPC
            f.sync_all().unwrap();
            drop(f);
            let disk = fs::File::open(m.file()).unwrap();
            let mut back = vec![0u8; data.len()];
            disk.read_exact_at(&mut back, start + len - data.len() as u64)
                .unwrap();
            assert!(
                back == data,
                "{label} part{n} (#{i}): tail not at its disk offset"
            );
            disk.read_exact_at(&mut back, start).unwrap();
            assert!(back == data, "{label} part{n}: head not at its disk offset");
        }
        m.unmount();
        // The image holds what the partition files wrote.
        for &(n, start, len) in &want {
            let data = pattern(70_000, n + 40);
            let back = read_bytes(&img, start + len - 70_000, 70_000);
            assert!(back == data, "{label} part{n}: the image differs");
        }
    }
}

#[test]
fn mount_differencing_chain_rw_writes_only_the_leaf() {
    if !fuse_works() {
        return;
    }
    let dir = tmp();
    let base = dir.path().join("base.vhdx");
    let child = dir.path().join("child.avhdx");
    let size = 32 * MIB;
    create_vhdx_1m(&base, "32M");
    let mut model = vec![0u8; size as usize];
    for (at, len, seed) in [(0u64, 2 * MIB, 7u32), (20 * MIB, MIB + 4096, 8)] {
        let data = pattern(len as usize, seed);
        let src = dir.path().join("in.bin");
        fs::write(&src, &data).unwrap();
        ok(&["write", p(&base), &at.to_string(), p(&src)]);
        model[at as usize..(at + len) as usize].copy_from_slice(&data);
    }
    let base_before = fs::read(&base).unwrap();
    ok(&["create", "-b", p(&base), p(&child)]);

    let m = mount(&child, &mount_dir(dir.path()), true);
    {
        let f = fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(m.file())
            .unwrap();
        assert_eq!(f.metadata().unwrap().len(), size);
        // The parent's data reads through the mount.
        let mut head = vec![0u8; 2 * MIB as usize];
        f.read_exact_at(&mut head, 0).unwrap();
        assert!(head == model[..head.len()], "parent data differs");
        // Unaligned writes over the parent's data and into empty space.
        for (at, len, seed) in [(MIB + 100, 5000usize, 9u32), (30 * MIB - 7, 70_000, 10)] {
            let data = pattern(len, seed);
            f.write_all_at(&data, at).unwrap();
            model[at as usize..at as usize + len].copy_from_slice(&data);
        }
        f.sync_all().unwrap();
        let mut back = vec![0u8; 5000];
        f.read_exact_at(&mut back, MIB + 100).unwrap();
        assert!(back == model[(MIB + 100) as usize..(MIB + 100) as usize + 5000]);
    }
    m.unmount();

    assert!(
        fs::read(&base).unwrap() == base_before,
        "the parent changed"
    );
    let back = read_bytes(&child, 0, size);
    assert!(back == model, "the child reads other data");
    assert_eq!(log_state(&child), "clean");
}

#[test]
fn parallel_writes_read_back_with_and_without_page_cache() {
    if !fuse_works() {
        return;
    }
    for mode in [&["--rw"][..], &["--rw", "--page-cache"][..]] {
        parallel_writes_read_back(mode);
    }
}

fn parallel_writes_read_back(flags: &[&str]) {
    let dir = tmp();
    let img = dir.path().join("par.vhdx");
    let size = 64 * MIB;
    create_vhdx_1m(&img, "64M");
    let m = mount_with(&img, &mount_dir(dir.path()), flags);
    // Four threads write interleaved, unaligned pieces at once (parallel
    // direct writes reach the server concurrently), some straddling blocks.
    let pieces: Vec<(u64, usize, u32)> = (0..32u32)
        .map(|i| {
            (
                u64::from(i) * 2 * MIB - u64::from(i % 3) * 777,
                300_000,
                i + 1,
            )
        })
        .map(|(at, len, seed)| (at.min(size - len as u64), len, seed))
        .collect();
    std::thread::scope(|s| {
        for t in 0..4 {
            let file = m.file();
            let mine: Vec<_> = pieces.iter().skip(t).step_by(4).copied().collect();
            s.spawn(move || {
                let f = fs::OpenOptions::new().write(true).open(file).unwrap();
                for (at, len, seed) in mine {
                    f.write_all_at(&pattern(len, seed), at).unwrap();
                }
                f.sync_all().unwrap();
            });
        }
    });
    let mut model = vec![0u8; size as usize];
    for &(at, len, seed) in &pieces {
        model[at as usize..at as usize + len].copy_from_slice(&pattern(len, seed));
    }
    // Read back through the mount in odd-sized pieces.
    let f = fs::File::open(m.file()).unwrap();
    let mut back = vec![0u8; size as usize];
    for (i, chunk) in back.chunks_mut(999_999).enumerate() {
        f.read_exact_at(chunk, i as u64 * 999_999).unwrap();
    }
    assert!(
        back == model,
        "{flags:?}: the mount reads other data than was written"
    );
    drop(f);
    // Shared mmap writes reach the disk too (direct I/O needs Linux 6.6+).
    let py = "import mmap,os,sys\nfd=os.open(sys.argv[1],os.O_RDWR)\ntry:\n  m=mmap.mmap(fd,8192,offset=8192)\nexcept OSError as e:\n  print('no shared mmap:',e); sys.exit(0)\nm[100:104]=b'MMAP'; m.flush(); m.close(); print('ok')\n";
    let out = Command::new("python3")
        .args(["-c", py, p(&m.file())])
        .output()
        .unwrap();
    let said = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(out.status.success(), "{flags:?}: mmap: {said}");
    if said.trim() == "ok" {
        model[8292..8296].copy_from_slice(b"MMAP");
    } else {
        eprintln!("{flags:?}: skipping the mmap check: {said}");
    }
    m.unmount();
    let back = read_bytes(&img, 0, size);
    assert!(back == model, "{flags:?}: the image holds other data");
    assert_eq!(log_state(&img), "clean");
}

#[test]
fn read_only_mount_refuses_writes_and_has_the_virtual_size() {
    if !fuse_works() {
        return;
    }
    let dir = tmp();
    let img = dir.path().join("ro.vhdx");
    // Not a whole number of MiB: the file size must be exact.
    let size = 16 * MIB + 3 * 512;
    ok(&["create", "-f", "vhdx", p(&img), &size.to_string()]);
    let data = pattern(MIB as usize, 3);
    let src = dir.path().join("in.bin");
    fs::write(&src, &data).unwrap();
    ok(&["write", p(&img), "15M", p(&src)]);
    let before = fs::read(&img).unwrap();

    let m = mount(&img, &mount_dir(dir.path()), false);
    let file = m.file();
    let names: Vec<String> = fs::read_dir(&m.dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    assert_eq!(names, ["disk"]);
    let meta = fs::metadata(&file).unwrap();
    assert!(meta.is_file());
    assert_eq!(meta.len(), size);

    let err = fs::OpenOptions::new().write(true).open(&file).unwrap_err();
    assert!(
        matches!(err.raw_os_error(), Some(30 | 13)), // EROFS, EACCES
        "open for writing: {err}"
    );
    let err = fs::File::create(m.dir.join("other")).unwrap_err();
    assert!(matches!(err.raw_os_error(), Some(30 | 13)), "create: {err}");

    let mut all = Vec::new();
    fs::File::open(&file)
        .unwrap()
        .read_to_end(&mut all)
        .unwrap();
    assert_eq!(all.len() as u64, size);
    assert!(all[15 * MIB as usize..16 * MIB as usize] == data[..]);
    assert!(all[..15 * MIB as usize].iter().all(|&b| b == 0));

    // Busy: the file is open, so unmounting fails and says why.
    let open = fs::File::open(&file).unwrap();
    let err = fails(1, &["unmount", p(&m.dir)]);
    assert!(err.contains("busy"), "{err}");
    assert!(is_mounted(&m.dir));
    drop(open);
    m.unmount();
    assert!(
        fs::read(&img).unwrap() == before,
        "a read-only mount changed the image"
    );
}

/// Wait up to `limit` for `child` to exit; kill it and fail after that.
fn wait_exit(child: &mut Child, limit: Duration) -> std::process::ExitStatus {
    let start = Instant::now();
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            return status;
        }
        if start.elapsed() > limit {
            let _ = child.kill();
            panic!("the mount process did not exit within {limit:?}");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn sigterm_unmounts_a_foreground_mount_cleanly() {
    if !fuse_works() {
        return;
    }
    let dir = tmp();
    let img = dir.path().join("sig.vhdx");
    ok(&["create", "-f", "vhdx", p(&img), "32M"]);
    let mnt = mount_dir(dir.path());
    let mut child = vdisk()
        .args(["mount", "--rw", "--foreground", p(&img), p(&mnt)])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let guard = Mounted {
        dir: mnt.clone(),
        done: false,
    };
    let mut line = String::new();
    BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    if line.is_empty() {
        let mut err = String::new();
        child
            .stderr
            .take()
            .unwrap()
            .read_to_string(&mut err)
            .unwrap();
        panic!("foreground mount failed: {err}");
    }
    assert!(is_mounted(&mnt));

    // Written without fsync: the close at SIGTERM must flush it.
    let data = pattern(3 * MIB as usize + 1234, 11);
    {
        let f = fs::OpenOptions::new()
            .write(true)
            .open(guard.file())
            .unwrap();
        f.write_all_at(&data, 5 * MIB + 512).unwrap();
    }
    let status = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(status.success());
    let status = wait_exit(&mut child, Duration::from_secs(60));
    let mut err = String::new();
    child
        .stderr
        .take()
        .unwrap()
        .read_to_string(&mut err)
        .unwrap();
    assert!(status.success(), "exit {status:?}: {err}");
    assert!(!is_mounted(&mnt), "still mounted after SIGTERM");
    drop(guard);

    assert_eq!(log_state(&img), "clean");
    if let Some(qemu) = tool("qemu-img") {
        sh(&qemu, &["check", "-f", "vhdx", p(&img)]);
    }
    let back = read_bytes(&img, 5 * MIB + 512, data.len() as u64);
    assert!(back == data, "data written before SIGTERM was lost");
}

#[test]
fn mount_and_unmount_errors() {
    let dir = tmp();
    let img = dir.path().join("e.vhdx");
    ok(&["create", "-f", "vhdx", p(&img), "8M"]);
    let mnt = mount_dir(dir.path());
    let file = dir.path().join("plain.txt");
    fs::write(&file, b"x").unwrap();

    // A missing image: the background process's error is relayed.
    let missing = dir.path().join("missing.vhdx");
    for fg in [false, true] {
        let mut args = vec!["mount"];
        if fg {
            args.push("--foreground");
        }
        args.extend([p(&missing), p(&mnt)]);
        let err = fails(1, &args);
        assert!(
            err.contains("missing.vhdx") && err.contains("No such file"),
            "{err}"
        );
        assert!(!is_mounted(&mnt));
    }
    // The mount point is a file, or absent.
    let err = fails(1, &["mount", p(&img), p(&file)]);
    assert!(
        err.contains("plain.txt") && err.contains("not a directory"),
        "{err}"
    );
    // A directory with files in it: the mount would hide them.
    let full = dir.path().join("full");
    fs::create_dir(&full).unwrap();
    fs::write(full.join("keep.txt"), b"mine").unwrap();
    fs::create_dir(full.join("sub")).unwrap();
    for fg in [false, true] {
        let mut args = vec!["mount"];
        if fg {
            args.push("--foreground");
        }
        args.extend([p(&img), p(&full)]);
        let err = fails(1, &args);
        assert!(
            err.contains(&format!("{}: the mount point is not empty", p(&full)))
                && (err.contains("holds keep.txt and 1 more entry")
                    || err.contains("holds sub and 1 more entry"))
                && err.contains("use an empty directory"),
            "{err}"
        );
        assert!(!is_mounted(&full));
        assert_eq!(fs::read(full.join("keep.txt")).unwrap(), b"mine");
    }
    let err = fails(1, &["mount", p(&img), p(&dir.path().join("nowhere"))]);
    assert!(
        err.contains("nowhere") && err.contains("No such file"),
        "{err}"
    );
    // Not a mount, not a vdisk mount, no such directory.
    let err = fails(1, &["unmount", p(&mnt)]);
    assert!(
        err.contains("mnt") && err.contains("not a mount point"),
        "{err}"
    );
    let err = fails(1, &["unmount", "/proc"]);
    assert!(err.contains("not a vdisk mount"), "{err}");
    let err = fails(1, &["unmount", p(&dir.path().join("a/b"))]);
    assert!(err.contains("No such file"), "{err}");
    // A corrupt image names the file.
    let bad = dir.path().join("bad.vhdx");
    let mut bytes = b"vhdxfile".to_vec();
    bytes.resize(4 * MIB as usize, 0);
    fs::write(&bad, bytes).unwrap();
    let err = fails(1, &["mount", p(&bad), p(&mnt)]);
    assert!(err.contains("bad.vhdx"), "{err}");
    assert!(!is_mounted(&mnt));
}

#[test]
fn mount_help_has_examples_and_exit_status() {
    for cmd in ["mount", "unmount"] {
        let out = ok(&[cmd, "--help"]);
        assert!(out.contains("Examples:"), "{cmd}: {out}");
        assert!(out.contains(&format!("vdisk {cmd} ")), "{cmd}: {out}");
        assert!(out.contains("Exit status"), "{cmd}: {out}");
    }
    let out = ok(&["mount", "--help"]);
    assert!(out.contains("--rw") && out.contains("--foreground") && out.contains("`disk`"));
    assert!(!out.contains("daemon-child"), "{out}");
}

/// A raw image mounted --rw without -f raw (its format guessed) says at
/// mount time that its first sector is kept, refuses writes there through
/// the mount (EIO), and takes writes elsewhere; with -f raw the first
/// sector is written.
#[test]
fn guessed_raw_mount_keeps_the_first_sector() {
    if !fuse_works() {
        return;
    }
    let dir = tmp();
    let img = dir.path().join("disk.img");
    fs::File::create(&img).unwrap().set_len(4 * MIB).unwrap();
    let mnt = mount_dir(dir.path());
    let out = run(&["mount", "--rw", p(&img), p(&mnt)]);
    let m = Mounted {
        dir: mnt.clone(),
        done: false,
    };
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{err}");
    assert!(
        err.contains("guessed as raw") && err.contains("first sector") && err.contains("-f raw"),
        "{err}"
    );
    let f = fs::OpenOptions::new().write(true).open(m.file()).unwrap();
    let e = f.write_all_at(&[0x55; 512], 0).unwrap_err();
    assert_eq!(e.raw_os_error(), Some(5), "{e}"); // EIO
    f.write_all_at(b"data", 4096).unwrap();
    f.sync_all().unwrap();
    drop(f);
    m.unmount();
    let bytes = fs::read(&img).unwrap();
    assert!(
        bytes[..512].iter().all(|&b| b == 0),
        "the first sector changed"
    );
    assert_eq!(&bytes[4096..4100], b"data");

    // -f raw: no note, and the first sector is written.
    let out = run(&["mount", "--rw", "-f", "raw", p(&img), p(&mnt)]);
    let m = Mounted {
        dir: mnt.clone(),
        done: false,
    };
    assert!(out.status.success());
    assert!(!String::from_utf8_lossy(&out.stderr).contains("guessed"));
    let f = fs::OpenOptions::new().write(true).open(m.file()).unwrap();
    f.write_all_at(&[0x55; 512], 0).unwrap();
    f.sync_all().unwrap();
    drop(f);
    m.unmount();
    assert_eq!(fs::read(&img).unwrap()[..512], [0x55; 512]);
}
