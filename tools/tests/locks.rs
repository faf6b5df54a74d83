//! Image locks end to end: vdisk against vdisk and against QEMU's tools
//! (qemu-io holding an image with `sleep`), both ways, racing writers, the
//! mount, chains and -U.

// Test images and buffers are small: their offsets and sizes fit any integer type.
#![allow(clippy::cast_possible_truncation)]

mod common;

use common::*;
use std::io::Write;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

const MIB: u64 = 1 << 20;

/// A child process killed when dropped.
struct Holder(Child);

impl Drop for Holder {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Whether /proc/locks lists a lock of `path`'s inode covering `byte`.
fn locked_byte(path: &Path, byte: u64) -> bool {
    let ino = std::fs::metadata(path).unwrap().ino();
    let locks = std::fs::read_to_string("/proc/locks").unwrap();
    locks.lines().any(|l| {
        let f: Vec<&str> = l.split_whitespace().collect();
        let n = f.len();
        n >= 3
            && f[n - 3].ends_with(&format!(":{ino}"))
            && f[n - 2].parse::<u64>().is_ok_and(|s| s <= byte)
            && (f[n - 1] == "EOF" || f[n - 1].parse::<u64>().is_ok_and(|e| e >= byte))
    })
}

/// Wait until `path`'s lock byte `byte` is held (its holder has opened it).
fn wait_locked(path: &Path, byte: u64) {
    let start = Instant::now();
    while !locked_byte(path, byte) {
        assert!(
            start.elapsed() < Duration::from_secs(20),
            "{} never got lock byte {byte}",
            path.display()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn qemu_io() -> Option<PathBuf> {
    let q = PathBuf::from("/usr/bin/qemu-io");
    if q.exists() {
        Some(q)
    } else {
        println!("qemu-io not found: skipping");
        None
    }
}

/// `qemu-io [-r] [-U] -c 'sleep 600000' IMG`, once it holds the image.
fn qemu_io_hold(q: &Path, img: &Path, extra: &[&str]) -> Holder {
    let child = Command::new(q)
        .args(extra)
        .args(["-c", "sleep 600000", p(img)])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let h = Holder(child);
    wait_locked(img, 100);
    h
}

/// `vdisk write IMG OFFSET` reading stdin, once it holds IMG (it opens the
/// image before reading its input).
fn vdisk_write_hold(img: &Path, offset: u64) -> Holder {
    let child = vdisk()
        .args(["write", p(img), &offset.to_string()])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let h = Holder(child);
    wait_locked(img, 101);
    h
}

/// Run `cmd args`, which must fail; stderr.
fn qemu_fails(q: &Path, args: &[&str]) -> String {
    let out = Command::new(q).args(args).output().unwrap();
    assert!(
        !out.status.success(),
        "{} {args:?} succeeded: {}",
        q.display(),
        String::from_utf8_lossy(&out.stdout)
    );
    String::from_utf8_lossy(&out.stderr).into_owned()
}

fn qemu_succeeds(q: &Path, args: &[&str]) -> String {
    let out = Command::new(q).args(args).output().unwrap();
    assert!(
        out.status.success(),
        "{} {args:?} failed: {}",
        q.display(),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn write_file(path: &Path, data: &[u8]) {
    std::fs::write(path, data).unwrap();
}

#[test]
fn vdisk_refuses_what_qemu_io_holds() {
    let Some(q) = qemu_io() else { return };
    let t = tmp();
    let img = t.path().join("d.vhdx");
    create_vhdx_1m(&img, "64M");
    let data = t.path().join("data.bin");
    write_file(&data, &pattern(4096, 1));
    ok(&["write", p(&img), "0", p(&data)]);

    // qemu-io holds it writable: every vdisk open but -U is refused.
    {
        let _h = qemu_io_hold(&q, &img, &[]);
        let e = fails(1, &["write", p(&img), "1M", p(&data)]);
        assert!(e.contains("Failed to get \"write\" lock"), "{e}");
        assert!(e.contains("qemu-io (pid "), "the holder is named: {e}");
        assert!(e.contains(p(&img)), "the file is named: {e}");
        let e = fails(1, &["info", p(&img)]);
        assert!(e.contains("Failed to get shared \"write\" lock"), "{e}");
        assert!(e.contains("qemu-io (pid "), "{e}");
        assert!(
            e.contains("-U (--force-share)"),
            "a read-only command hints -U: {e}"
        );
        let e = fails(1, &["read", p(&img), "0", "512"]);
        assert!(e.contains("Failed to get shared \"write\" lock"), "{e}");
        // -U reads it, and only read-only commands take -U.
        assert!(ok(&["info", "-U", p(&img)]).contains("file format: vhdx"));
        assert_eq!(
            read_bytes_u(&img, 0, 4096),
            pattern(4096, 1),
            "read -U sees the data"
        );
        ok(&["check", "-U", p(&img)]);
        ok(&["map", "-U", p(&img)]);
        let e = fails(1, &["check", "-U", "-r", "all", p(&img)]);
        assert!(e.contains("only for read-only use"), "{e}");
        // (resize reads the image's header first: its refusal may come
        // from that shared open.)
        let e = fails(1, &["resize", p(&img), "+1M"]);
        assert!(
            e.contains("\"write\" lock: the image is in use by qemu-io"),
            "{e}"
        );
        let e = fails(1, &["compact", p(&img)]);
        assert!(e.contains("Failed to get \"write\" lock"), "{e}");
        // create over an image in use refuses and leaves it whole.
        let len = std::fs::metadata(&img).unwrap().len();
        let e = fails(1, &["create", "-f", "vhdx", p(&img), "1G"]);
        assert!(e.contains("Failed to get \"write\" lock"), "{e}");
        assert_eq!(std::fs::metadata(&img).unwrap().len(), len, "not truncated");
    }
    // qemu-io holds it read-only: vdisk readers share it, writers are refused.
    {
        let _h = qemu_io_hold(&q, &img, &["-r"]);
        let e = fails(1, &["write", p(&img), "1M", p(&data)]);
        assert!(e.contains("Failed to get \"write\" lock"), "{e}");
        assert!(e.contains("qemu-io (pid "), "{e}");
        assert!(ok(&["info", p(&img)]).contains("file format: vhdx"));
        assert_eq!(read_bytes(&img, 0, 4096), pattern(4096, 1));
    }
    // qemu-io -r -U (force-share) blocks nobody.
    {
        let _h = qemu_io_hold(&q, &img, &["-r", "-U"]);
        ok(&["write", p(&img), "1M", p(&data)]);
    }
    // Released: everything works again.
    ok(&["write", p(&img), "2M", p(&data)]);
    ok(&["check", p(&img)]);
}

/// `vdisk read -U`.
fn read_bytes_u(img: &Path, offset: u64, len: u64) -> Vec<u8> {
    let out = run(&["read", "-U", p(img), &offset.to_string(), &len.to_string()]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    out.stdout
}

#[test]
fn qemu_refuses_what_vdisk_holds() {
    let Some(q) = qemu_io() else { return };
    let Some(qimg) = qemu_img() else { return };
    let t = tmp();
    let img = t.path().join("d.vhdx");
    create_vhdx_1m(&img, "64M");
    // A vdisk writer (waiting for its input) holds it: qemu-io cannot
    // write, qemu-img cannot even read it without -U.
    let mut w = vdisk_write_hold(&img, 0);
    for b in [100, 101, 103, 201, 203] {
        assert!(locked_byte(&img, b), "vdisk's writer locks byte {b}");
    }
    let e = qemu_fails(&q, &["-c", "write 0 512", p(&img)]);
    assert!(e.contains("Failed to get \"write\" lock"), "{e}");
    let e = qemu_fails(&qimg, &["info", p(&img)]);
    assert!(e.contains("Failed to get shared \"write\" lock"), "{e}");
    assert!(qemu_succeeds(&qimg, &["info", "-U", p(&img)]).contains("vhdx"));
    // The writer finishes its write and lets go.
    let input = pattern(8192, 2);
    w.0.stdin.take().unwrap().write_all(&input).unwrap();
    let st = w.0.wait().unwrap();
    assert!(st.success());
    assert_eq!(read_bytes(&img, 0, 8192), input);
    assert!(!locked_byte(&img, 100), "no lock left behind");
    qemu_succeeds(&q, &["-c", "write -P 7 1M 512", p(&img)]);
    qemu_succeeds(&qimg, &["check", p(&img)]);
}

#[test]
fn chain_parents_are_held_shared() {
    let Some(q) = qemu_io() else { return };
    let t = tmp();
    let base = t.path().join("base.vhdx");
    create_vhdx_1m(&base, "16M");
    let child = t.path().join("child.avhdx");
    ok(&["create", "-b", p(&base), p(&child)]);
    let mut w = vdisk_write_hold(&child, 0);
    // The parent: locked shared (100, 201, 203), not for writing (101).
    wait_locked(&base, 100);
    for b in [100, 201, 203] {
        assert!(locked_byte(&base, b), "parent byte {b}");
    }
    assert!(
        !locked_byte(&base, 101),
        "the parent is not held for writing"
    );
    let e = qemu_fails(&q, &["-c", "write 0 512", p(&base)]);
    assert!(e.contains("Failed to get \"write\" lock"), "{e}");
    let e = fails(1, &["write", p(&base), "0", "/dev/null"]);
    assert!(e.contains("Failed to get \"write\" lock"), "{e}");
    assert!(e.contains("vdisk (pid "), "{e}");
    // ...but readable.
    ok(&["info", p(&base)]);
    drop(w.0.stdin.take());
    assert!(w.0.wait().unwrap().success());
    ok(&["write", p(&base), "0", "/dev/null"]);
}

#[test]
fn racing_writers_exactly_one_wins() {
    const N: usize = 6;
    let t = tmp();
    let img = t.path().join("r.vhdx");
    create_vhdx_1m(&img, "64M");
    let before = pattern(MIB as usize, 9);
    let data = t.path().join("before.bin");
    write_file(&data, &before);
    ok(&["write", p(&img), "32M", p(&data)]);
    // N writers start at once, each for its own MiB; each opens the image
    // before reading its input, so the winner holds it until fed.
    let mut kids: Vec<Option<Child>> = (0..N)
        .map(|i| {
            Some(
                vdisk()
                    .args(["write", p(&img), &format!("{}M", i)])
                    .stdin(Stdio::piped())
                    .stdout(Stdio::piped())
                    .stderr(Stdio::piped())
                    .spawn()
                    .unwrap(),
            )
        })
        .collect();
    // The losers exit at once; wait until only one is left running.
    let start = Instant::now();
    let mut lost = Vec::new();
    while lost.len() < N - 1 {
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "losers did not exit"
        );
        for (i, k) in kids.iter_mut().enumerate() {
            if let Some(c) = k {
                if c.try_wait().unwrap().is_some() {
                    let out = k.take().unwrap().wait_with_output().unwrap();
                    lost.push((i, out));
                }
            }
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    std::thread::sleep(Duration::from_millis(200));
    let running: Vec<usize> = (0..N).filter(|&i| kids[i].is_some()).collect();
    assert_eq!(running.len(), 1, "exactly one writer holds the image");
    for (i, out) in &lost {
        assert_eq!(out.status.code(), Some(1), "writer {i} fails");
        let e = String::from_utf8_lossy(&out.stderr);
        assert!(
            e.contains("Failed to get \"write\" lock"),
            "writer {i}: {e}"
        );
        assert!(
            e.contains("vdisk (pid "),
            "writer {i} names the holder: {e}"
        );
    }
    let win = running[0];
    let mut c = kids[win].take().unwrap();
    let input = pattern(MIB as usize, 100 + win as u32);
    c.stdin.take().unwrap().write_all(&input).unwrap();
    let out = c.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // Nothing lost: the winner's MiB, the earlier data, zeros elsewhere.
    assert_eq!(read_bytes(&img, win as u64 * MIB, MIB), input);
    assert_eq!(read_bytes(&img, 32 * MIB, MIB), before);
    for i in (0..N).filter(|&i| i != win) {
        assert!(read_bytes(&img, i as u64 * MIB, MIB)
            .iter()
            .all(|&b| b == 0));
    }
    ok(&["check", p(&img)]);
}

#[test]
fn two_big_writers_the_second_is_refused() {
    // The issue's case: two `vdisk write` of 100 MB at once, at 0 and 2G.
    let t = tmp();
    let img = t.path().join("r.vhdx");
    ok(&["create", "-f", "vhdx", p(&img), "4G"]);
    let a = t.path().join("A.bin");
    let b = t.path().join("B.bin");
    write_file(&a, &pattern(100_000_000, 1));
    write_file(&b, &pattern(100_000_000, 2));
    let first = vdisk()
        .args(["write", p(&img), "0", p(&a)])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    wait_locked_or_done(&img);
    let second = run(&["write", p(&img), "2G", p(&b)]);
    let first = first.wait_with_output().unwrap();
    assert!(first.status.success());
    if second.status.success() {
        // Only when the first had already finished: then both are there.
        println!("the first writer finished before the second started");
    } else {
        let e = String::from_utf8_lossy(&second.stderr);
        assert!(e.contains("Failed to get \"write\" lock"), "{e}");
    }
    assert_eq!(
        read_bytes(&img, 0, 1 << 20),
        pattern(100_000_000, 1)[..1 << 20]
    );
    assert_eq!(
        read_bytes(&img, 99_000_000, 1_000_000),
        pattern(100_000_000, 1)[99_000_000..]
    );
    ok(&["check", p(&img)]);
}

/// Wait until `img` is locked for writing, or a while (the writer may be
/// done already on a fast machine).
fn wait_locked_or_done(img: &Path) {
    let start = Instant::now();
    while !locked_byte(img, 101) && start.elapsed() < Duration::from_secs(5) {
        std::thread::sleep(Duration::from_millis(1));
    }
}

/// `vdisk unmount DIR` when dropped (also when a test fails).
struct Unmount(PathBuf);

impl Drop for Unmount {
    fn drop(&mut self) {
        let out = run(&["unmount", p(&self.0)]);
        if !out.status.success() {
            let _ = Command::new("fusermount3")
                .args(["-uz", p(&self.0)])
                .status();
        }
    }
}

#[test]
fn mount_rw_holds_the_image_until_unmount() {
    if !Path::new("/dev/fuse").exists() {
        println!("no /dev/fuse: skipping");
        return;
    }
    let t = tmp();
    let img = t.path().join("m.vhdx");
    create_vhdx_1m(&img, "16M");
    let mnt = t.path().join("mnt");
    let mnt2 = t.path().join("mnt2");
    std::fs::create_dir(&mnt).unwrap();
    std::fs::create_dir(&mnt2).unwrap();
    ok(&["mount", "--rw", p(&img), p(&mnt)]);
    let mounted = Unmount(mnt.clone());
    let e = fails(1, &["mount", "--rw", p(&img), p(&mnt2)]);
    assert!(e.contains("Failed to get \"write\" lock"), "{e}");
    assert!(e.contains("vdisk (pid "), "{e}");
    let e = fails(1, &["mount", p(&img), p(&mnt2)]);
    assert!(e.contains("Failed to get shared \"write\" lock"), "{e}");
    let e = fails(1, &["write", p(&img), "0", "/dev/null"]);
    assert!(e.contains("Failed to get \"write\" lock"), "{e}");
    if let Some(q) = qemu_io() {
        let e = qemu_fails(&q, &["-c", "write 0 512", p(&img)]);
        assert!(e.contains("Failed to get \"write\" lock"), "{e}");
    }
    // -U reads what the mount wrote.
    let file = std::fs::OpenOptions::new()
        .write(true)
        .open(mnt.join("disk"))
        .unwrap();
    std::os::unix::fs::FileExt::write_all_at(&file, &pattern(4096, 5), 8192).unwrap();
    file.sync_all().unwrap();
    drop(file);
    assert_eq!(read_bytes_u(&img, 8192, 4096), pattern(4096, 5));
    drop(mounted);
    // Unmounted: the lock is gone.
    ok(&["write", p(&img), "0", "/dev/null"]);
    assert_eq!(read_bytes(&img, 8192, 4096), pattern(4096, 5));
}

#[test]
fn bundle_commands_hold_the_bundle() {
    let t = tmp();
    let vm = t.path().join("vm");
    ok(&["checkpoint", "init", p(&vm), "16M"]);
    // Hold the bundle directory as a bundle operation does (an flock).
    let held = Command::new("flock")
        .args(["--no-fork", "-x", p(&vm), "sleep", "60"])
        .spawn();
    let Ok(held) = held else {
        println!("flock(1) not found: skipping");
        return;
    };
    let _h = Holder(held);
    wait_locked(&vm, 0);
    let e = fails(1, &["checkpoint", "create", p(&vm), "c1"]);
    assert!(e.contains("the bundle is in use by sleep (pid "), "{e}");
    let e = fails(1, &["checkpoint", "list", p(&vm)]);
    assert!(e.contains("the bundle is in use by sleep (pid "), "{e}");
    drop(_h);
    ok(&["checkpoint", "create", p(&vm), "c1"]);
}

#[test]
fn qemu_nbd_and_vdisk_refuse_each_other() {
    let q = PathBuf::from("/usr/bin/qemu-nbd");
    if !q.exists() {
        println!("qemu-nbd not found: skipping");
        return;
    }
    let t = tmp();
    let img = t.path().join("n.vhdx");
    create_vhdx_1m(&img, "16M");
    let sock = t.path().join("nbd.sock");
    {
        let child = Command::new(&q)
            .args(["-f", "vhdx", "-k", p(&sock), p(&img)])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let _h = Holder(child);
        wait_locked(&img, 101);
        let e = fails(1, &["write", p(&img), "0", "/dev/null"]);
        assert!(e.contains("Failed to get \"write\" lock"), "{e}");
        assert!(e.contains("qemu-nbd (pid "), "{e}");
    }
    let mut w = vdisk_write_hold(&img, 0);
    let e = qemu_fails(&q, &["-f", "vhdx", "-k", p(&sock), p(&img)]);
    assert!(e.contains("Failed to get \"write\" lock"), "{e}");
    drop(w.0.stdin.take());
    assert!(w.0.wait().unwrap().success());
}
