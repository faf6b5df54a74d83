//! The `vmm` binary end to end: a guest doing real virtio-blk I/O on images
//! `vdisk` made and reads back; exit statuses; signals; the refusals of
//! `vmm run` (missing, locked or damaged images, bad payloads and
//! arguments). Each test that runs a guest skips, saying so, without
//! /dev/kvm or without the test payloads (no gcc).

#![allow(clippy::cast_possible_truncation)] // common::pattern

mod common;

use common::*;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};
use vmm_core::test_payloads::{BLK_IO, HELLO, SECTOR0};

fn vmm() -> Command {
    Command::new(env!("CARGO_BIN_EXE_vmm"))
}

fn vmm_run(args: &[&str]) -> Output {
    vmm().arg("run").args(args).output().expect("run vmm")
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

/// Whether a guest can run here; says why not.
fn can_run(payload: &[u8]) -> bool {
    if std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
        .is_err()
    {
        eprintln!("skipped: /dev/kvm cannot be opened here");
        return false;
    }
    if payload.is_empty() {
        eprintln!("skipped: the test payloads were not built (no gcc)");
        return false;
    }
    true
}

/// `code` written to a file in `dir`.
fn payload(dir: &Path, name: &str, code: &[u8]) -> PathBuf {
    let f = dir.join(name);
    std::fs::write(&f, code).unwrap();
    f
}

/// mov eax, V; out 0xf4, eax
fn exit_with(v: u32) -> Vec<u8> {
    let mut c = vec![0xb8];
    c.extend_from_slice(&v.to_le_bytes());
    c.extend_from_slice(&[0xe7, 0xf4]);
    c
}

/// The byte blk_io.c and the host write at disk offset `off`
/// (vmm-core/payloads/payload.h `pattern`).
fn pattern_at(seed: u32, off: u64) -> u8 {
    u8::try_from(((off >> 9) * 131 + (off & 511) * 7 + u64::from(seed)) & 0xff).unwrap()
}

fn pattern_of(seed: u32, sector: u64, count: u64) -> Vec<u8> {
    (0..count * 512)
        .map(|i| pattern_at(seed, sector * 512 + i))
        .collect()
}

/// A 16 MiB image made by `vdisk create` with the host pattern blk_io.c
/// expects at sectors 64-71 (seed 0x5a).
fn image_for_blk_io(dir: &Path, name: &str, format: &str) -> PathBuf {
    let img = dir.join(name);
    ok(&["create", "-f", format, p(&img), "16M"]);
    let host = payload(dir, "host.bin", &pattern_of(0x5a, 64, 8));
    ok(&["write", "-f", format, p(&img), "32768", p(&host)]);
    img
}

/// What blk_io.c leaves on its disk, read back with `vdisk read`.
fn check_blk_io(img: &Path) {
    let seed = 0xa5;
    let sectors = |s: u64, n: u64| read_bytes(img, s * 512, n * 512);
    assert_eq!(sectors(0, 1), vec![0; 512], "sector 0 untouched");
    assert_eq!(sectors(1, 1), pattern_of(seed, 1, 1), "sector 1");
    assert_eq!(sectors(2, 2), vec![0; 1024], "write zeroes");
    assert_eq!(sectors(4, 4), pattern_of(seed, 4, 4), "sectors 4-7");
    assert_eq!(sectors(4095, 3), pattern_of(seed, 4095, 3), "across 2 MiB");
    assert_eq!(sectors(10000, 64), pattern_of(seed, 10000, 64));
    assert_eq!(
        sectors(64, 8),
        pattern_of(0x5a, 64, 8),
        "the host's pattern"
    );
}

#[test]
fn a_guest_writes_a_vhdx_and_a_vhd_that_vdisk_reads_back() {
    if !can_run(BLK_IO) {
        return;
    }
    let dir = tmp();
    let bin = payload(dir.path(), "blk_io.bin", BLK_IO);
    let vhdx = image_for_blk_io(dir.path(), "a.vhdx", "vhdx");
    let vhd = image_for_blk_io(dir.path(), "b.vhd", "vpc");
    for img in [&vhdx, &vhd] {
        let out = vmm_run(&["--disk", p(img), "--payload", p(&bin), "--report"]);
        let (stdout, stderr) = (text(&out.stdout), text(&out.stderr));
        assert_eq!(out.status.code(), Some(0), "{stdout}\n{stderr}");
        assert!(stdout.contains("blk_io: ok"), "{stdout}");
        assert!(stderr.contains("0 I/O errors"), "{stderr}");
        check_blk_io(img);
        // Closed cleanly: no errors, no leaks.
        ok(&["check", p(img)]);
    }
}

/// The README's guest run: payloads/hello.c on two disks, one read-only.
#[test]
fn the_readme_example() {
    if !can_run(HELLO) {
        return;
    }
    let dir = tmp();
    let bin = payload(dir.path(), "hello.bin", HELLO);
    let a = dir.path().join("a.vhdx");
    let b = dir.path().join("b.vhd");
    ok(&["create", p(&a), "64M"]);
    ok(&["create", p(&b), "32M"]);
    let ro = format!("{},ro,iops=100,bps=1M", p(&b));
    let out = vmm_run(&["--disk", p(&a), "--disk", &ro, "--payload", p(&bin)]);
    let stdout = text(&out.stdout);
    assert_eq!(out.status.code(), Some(0), "{stdout}{}", text(&out.stderr));
    assert!(stdout.contains("256 MiB of RAM, 2 disk(s)"), "{stdout}");
    assert!(stdout.contains("disk 0: 64 MiB"), "{stdout}");
    assert!(stdout.contains("disk 1: 32 MiB"), "{stdout}"); // 32 MiB and 8 KiB: CHS rounding
    assert!(stdout.contains("read-only, not written"), "{stdout}");
    let line = b"written by the guest on disk 0\n";
    assert_eq!(read_bytes(&a, 1 << 20, line.len() as u64), line);
    assert_eq!(read_bytes(&b, 1 << 20, 512), vec![0; 512]);
}

#[test]
fn a_differencing_disk_is_written_and_its_parent_is_not() {
    if !can_run(BLK_IO) {
        return;
    }
    let dir = tmp();
    let bin = payload(dir.path(), "blk_io.bin", BLK_IO);
    let base = image_for_blk_io(dir.path(), "base.vhdx", "vhdx");
    let child = dir.path().join("child.avhdx");
    ok(&["create", "-f", "vhdx", "-b", p(&base), p(&child)]);
    let before = std::fs::read(&base).unwrap();
    let out = vmm_run(&["--disk", p(&child), "--payload", p(&bin)]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    assert_eq!(std::fs::read(&base).unwrap(), before, "the parent changed");
    check_blk_io(&child);
    // The parent still reads only the host's pattern.
    assert_eq!(read_bytes(&base, 512, 512), vec![0; 512]);
}

#[test]
fn statuses_of_exits_faults_timeouts() {
    if !can_run(b"x") {
        return;
    }
    let dir = tmp();
    let run = |name: &str, code: &[u8], extra: &[&str]| {
        let bin = payload(dir.path(), name, code);
        let mut args = vec!["--payload", p(&bin)];
        args.extend_from_slice(extra);
        let out = vmm_run(&args);
        (out.status.code(), text(&out.stderr))
    };
    assert_eq!(run("e42", &exit_with(42), &[]).0, Some(42));
    assert_eq!(run("e300", &exit_with(300), &[]).0, Some(255));
    let (code, err) = run("ud2", &[0x0f, 0x0b], &["--timeout", "10"]);
    assert_eq!(code, Some(253), "{err}");
    assert!(err.contains("guest fault on vCPU 0"), "{err}");
    assert!(err.contains("RIP=0x200000"), "{err}");
    let (code, err) = run("loop", &[0xeb, 0xfe], &["--timeout", "0.2"]);
    assert_eq!(code, Some(252), "{err}");
    assert!(err.contains("--timeout"), "{err}");
    // The UART goes to stdout: mov dx, 0x3f8; mov al, 'o'; out dx, al;
    // mov al, 'k'; out dx, al; xor eax, eax; out 0xf4, eax
    let bin = payload(
        dir.path(),
        "uart",
        &[
            0x66, 0xba, 0xf8, 0x03, 0xb0, b'o', 0xee, 0xb0, b'k', 0xee, 0x31, 0xc0, 0xe7, 0xf4,
        ],
    );
    let out = vmm_run(&["--payload", p(&bin)]);
    assert_eq!(
        (out.status.code(), text(&out.stdout)),
        (Some(0), "ok".into())
    );
    // The JSON report.
    let report = dir.path().join("r.json");
    let bin = payload(dir.path(), "e7", &exit_with(7));
    let out = vmm_run(&["--payload", p(&bin), "--report-json", p(&report)]);
    assert_eq!(out.status.code(), Some(7));
    let v: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&report).unwrap()).unwrap();
    assert_eq!(v["outcome"]["kind"], "exited");
    assert_eq!(v["outcome"]["value"], 7);
    assert_eq!(v["status"], 7);
}

/// SIGINT and SIGTERM stop a running guest with status 130, the disk
/// flushed and closed: it checks clean and opens writable at once.
#[test]
fn a_signal_stops_the_guest_and_closes_its_disks() {
    if !can_run(b"x") {
        return;
    }
    let dir = tmp();
    let img = dir.path().join("d.vhdx");
    ok(&["create", p(&img), "16M"]);
    let bin = payload(dir.path(), "loop", &[0xeb, 0xfe]);
    for sig in ["INT", "TERM"] {
        let child = vmm()
            .args(["run", "--disk", p(&img), "--payload", p(&bin)])
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        // The guest runs; the image is held.
        std::thread::sleep(Duration::from_millis(300));
        let held = fails(1, &["write", p(&img), "0", p(&bin)]);
        assert!(held.contains("lock"), "{held}");
        let t0 = Instant::now();
        let kill = Command::new("kill")
            .args([&format!("-{sig}"), &child.id().to_string()])
            .status()
            .unwrap();
        assert!(kill.success());
        let out = child.wait_with_output().unwrap();
        assert!(t0.elapsed() < Duration::from_secs(10));
        assert_eq!(out.status.code(), Some(130), "{}", text(&out.stderr));
        assert!(text(&out.stderr).contains("stopped"));
        ok(&["check", p(&img)]);
        ok(&["write", p(&img), "0", p(&bin)]);
    }
}

#[test]
fn read_only_disks_and_the_probed_raw_guard() {
    if !can_run(SECTOR0) {
        return;
    }
    let dir = tmp();
    let bin = payload(dir.path(), "sector0.bin", SECTOR0);
    let img = dir.path().join("d.vhdx");
    ok(&["create", p(&img), "16M"]);
    // Read-only: the write fails (status 1, IOERR) and the image is as it was.
    let before = std::fs::read(&img).unwrap();
    let out = vmm_run(&["--disk", &format!("{},ro", p(&img)), "--payload", p(&bin)]);
    assert_eq!(out.status.code(), Some(1), "{}", text(&out.stderr));
    assert_eq!(std::fs::read(&img).unwrap(), before);
    // Writable: it succeeds.
    let out = vmm_run(&["--disk", p(&img), "--payload", p(&bin)]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    assert_eq!(read_bytes(&img, 0, 512), pattern_of(0x33, 0, 1));
    // A raw file probed as raw is guarded (sector 0 refused); given as
    // raw it is not.
    let raw = dir.path().join("d.img");
    std::fs::write(&raw, vec![0u8; 1 << 20]).unwrap();
    let out = vmm_run(&["--disk", p(&raw), "--payload", p(&bin)]);
    assert_eq!(out.status.code(), Some(1), "{}", text(&out.stderr));
    assert_eq!(std::fs::read(&raw).unwrap(), vec![0u8; 1 << 20]);
    let out = vmm_run(&["--disk", p(&raw), "--format", "raw", "--payload", p(&bin)]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    assert_eq!(std::fs::read(&raw).unwrap()[..512], pattern_of(0x33, 0, 1));
}

#[test]
fn a_checkpoint_bundle_serves_its_active_disk() {
    if !can_run(BLK_IO) {
        return;
    }
    let dir = tmp();
    let bin = payload(dir.path(), "blk_io.bin", BLK_IO);
    let base = image_for_blk_io(dir.path(), "base.vhdx", "vhdx");
    let bundle = dir.path().join("vm.bundle");
    ok(&["checkpoint", "init", p(&bundle), "--from", p(&base)]);
    ok(&["checkpoint", "create", p(&bundle), "before"]);
    let out = vmm_run(&["--disk", p(&bundle), "--payload", p(&bin)]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    // The guest's writes are in the active disk; reverting to "before"
    // brings back the disk as it was.
    let active = PathBuf::from(ok(&["checkpoint", "path", p(&bundle)]).trim());
    check_blk_io(&active);
    ok(&["checkpoint", "revert", p(&bundle), "before"]);
    let active = PathBuf::from(ok(&["checkpoint", "path", p(&bundle)]).trim());
    assert_eq!(read_bytes(&active, 512, 512), vec![0; 512]);
    assert_eq!(
        read_bytes(&active, 64 * 512, 8 * 512),
        pattern_of(0x5a, 64, 8)
    );
}

#[test]
fn what_vmm_run_refuses() {
    let dir = tmp();
    let bin = payload(dir.path(), "e0", &exit_with(0));
    let refused = |args: &[&str]| {
        let out = vmm_run(args);
        assert_eq!(
            out.status.code(),
            Some(1),
            "{args:?}: {}",
            text(&out.stderr)
        );
        text(&out.stderr)
    };
    let e = refused(&["--payload", p(&dir.path().join("nope.bin"))]);
    assert!(
        e.contains("cannot read the payload") && e.contains("nope.bin"),
        "{e}"
    );
    let empty = payload(dir.path(), "empty", b"");
    assert!(refused(&["--payload", p(&empty)]).contains("is empty"));
    let elf = payload(dir.path(), "elf", b"\x7fELF\x02\x01\x01");
    assert!(refused(&["--payload", p(&elf)]).contains("ELF"));
    assert!(refused(&["--payload", p(&bin), "--mem", "12X"]).contains("--mem"));
    assert!(refused(&["--payload", p(&bin), "--timeout=0"]).contains("--timeout"));
    let e = refused(&["--payload", p(&bin), "--disk", "a.vhdx,bogus"]);
    assert!(e.contains("unknown disk option 'bogus'"), "{e}");
    let e = refused(&["--payload", p(&bin), "--disk", "a.vhdx,iops=0"]);
    assert!(e.contains("iops=0 is not a positive whole number"), "{e}");
    assert!(refused(&[]).contains("--payload"));
    let e = refused(&[
        "--payload",
        p(&bin),
        "--disk",
        p(&dir.path().join("none.vhdx")),
    ]);
    assert!(e.contains("none.vhdx"), "{e}");
    // A directory that is no bundle; a .vhdx without its signature.
    let e = refused(&["--payload", p(&bin), "--disk", p(dir.path())]);
    assert!(e.contains("not a checkpoint bundle"), "{e}");
    let fake = payload(dir.path(), "fake.vhdx", &vec![0u8; 1 << 20]);
    let e = refused(&["--payload", p(&bin), "--disk", p(&fake)]);
    assert!(e.contains("fake.vhdx"), "{e}");
    if !can_run(b"x") {
        return;
    }
    // Machine limits, checked by vmm-core.
    let e = refused(&["--payload", p(&bin), "--mem", "32M"]);
    assert!(e.contains("between 64 MiB"), "{e}");
    let e = refused(&["--payload", p(&bin), "--vcpus", "0"]);
    assert!(e.contains("0 vCPUs"), "{e}");
    let big = payload(dir.path(), "big", &vec![0x90; 63 << 20]);
    let e = refused(&["--payload", p(&big), "--mem", "64M"]);
    assert!(e.contains("too big for guest memory"), "{e}");
}

/// An image another process holds is refused before the guest runs,
/// naming the image; a second `vmm` on a disk a first one serves, too.
#[test]
fn a_locked_image_is_refused() {
    if !can_run(b"x") {
        return;
    }
    let dir = tmp();
    let img = dir.path().join("d.vhdx");
    ok(&["create", p(&img), "16M"]);
    let looping = payload(dir.path(), "loop", &[0xeb, 0xfe]);
    let bin = payload(dir.path(), "e0", &exit_with(0));
    let mut first = vmm()
        .args(["run", "--disk", p(&img), "--payload", p(&looping)])
        .args(["--timeout", "20"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    // Wait until the first holds the image.
    let t0 = Instant::now();
    let e = loop {
        let out = vmm_run(&["--disk", p(&img), "--payload", p(&bin)]);
        if out.status.code() == Some(1) {
            break text(&out.stderr);
        }
        assert!(t0.elapsed() < Duration::from_secs(10), "never refused");
        std::thread::sleep(Duration::from_millis(50));
    };
    assert!(e.contains("d.vhdx") && e.contains("lock"), "{e}");
    // Read-only is refused too: the first holds it writable.
    let out = vmm_run(&["--disk", &format!("{},ro", p(&img)), "--payload", p(&bin)]);
    assert_eq!(out.status.code(), Some(1));
    let _ = first.kill();
    let _ = first.wait();
}

fn ctl(sock: &Path, args: &[&str]) -> (Option<i32>, serde_json::Value) {
    let out = vmm()
        .arg("ctl")
        .arg(sock)
        .args(args)
        .output()
        .expect("run vmm ctl");
    let v = serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("{args:?}: {e}: {}", text(&out.stderr)));
    (out.status.code(), v)
}

/// The control API end to end: a guest started paused, resumed, limited,
/// inspected and stopped through `vmm ctl`; garbage on the socket is
/// answered with errors and the connection stays usable.
#[test]
fn the_control_api() {
    use std::io::{BufRead, BufReader, Write};
    if !can_run(b"x") {
        return;
    }
    let dir = tmp();
    let img = dir.path().join("d.vhdx");
    ok(&["create", p(&img), "16M"]);
    let looping = payload(dir.path(), "loop", &[0xeb, 0xfe]);
    let sock = dir.path().join("api.sock");
    let child = vmm()
        .args(["run", "--api", p(&sock), "--paused", "--timeout", "30"])
        .args(["--disk", p(&img), "--payload", p(&looping)])
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let t0 = Instant::now();
    while !sock.exists() {
        assert!(t0.elapsed() < Duration::from_secs(10), "no socket");
        std::thread::sleep(Duration::from_millis(20));
    }
    // Paused from the start, until resumed.
    let t0 = Instant::now();
    loop {
        let (code, v) = ctl(&sock, &["info"]);
        assert_eq!(code, Some(0), "{v}");
        if v["state"] == "paused" {
            assert_eq!(v["disks"][0]["writable"], true);
            assert!(v["disks"][0]["name"].as_str().unwrap().ends_with("d.vhdx"));
            break;
        }
        assert!(t0.elapsed() < Duration::from_secs(10), "{v}");
    }
    assert_eq!(ctl(&sock, &["resume"]).1["ok"], true);
    assert_eq!(ctl(&sock, &["info"]).1["state"], "running");
    assert_eq!(ctl(&sock, &["pause"]).1["ok"], true);
    assert_eq!(ctl(&sock, &["info"]).1["state"], "paused");
    assert_eq!(ctl(&sock, &["resume"]).1["ok"], true);
    // QoS: set, kept when left out, removed with 0.
    let (code, _) = ctl(&sock, &["set-qos", "0", "--iops", "300", "--bps", "2M"]);
    assert_eq!(code, Some(0));
    ctl(&sock, &["set-qos", "0", "--iops", "0"]);
    let v = ctl(&sock, &["info"]).1;
    assert_eq!(v["disks"][0]["iops"], serde_json::Value::Null);
    assert_eq!(v["disks"][0]["bps"], 2 << 20);
    let (code, v) = ctl(&sock, &["set-qos", "5", "--iops", "1"]);
    assert_eq!(code, Some(1));
    assert!(v["error"].as_str().unwrap().contains("no disk 5"), "{v}");
    // A second vmm cannot take the socket.
    let e = vmm_run(&["--api", p(&sock), "--payload", p(&looping)]);
    assert_eq!(e.status.code(), Some(1));
    assert!(text(&e.stderr).contains("another process listens"));
    // Garbage, one connection: each line gets an error, then a good one
    // still works.
    let s = std::os::unix::net::UnixStream::connect(&sock).unwrap();
    let mut w = s.try_clone().unwrap();
    let mut r = BufReader::new(s);
    let huge = "x".repeat(100_000);
    for bad in ["{nope", "[1,2]", "{\"cmd\":7}", "{\"cmd\":\"fly\"}", &huge] {
        writeln!(w, "{bad}").unwrap();
        let mut line = String::new();
        r.read_line(&mut line).unwrap();
        let v: serde_json::Value = serde_json::from_str(&line).unwrap();
        assert_eq!(v["ok"], false, "{bad:.20}: {v}");
        assert!(v["error"].is_string());
    }
    writeln!(w, "{{\"cmd\":\"info\"}}").unwrap();
    let mut line = String::new();
    r.read_line(&mut line).unwrap();
    assert!(line.contains("\"ok\":true"), "{line}");
    // Stop: status 130, the socket removed, the image closed cleanly.
    assert_eq!(ctl(&sock, &["stop"]).1["ok"], true);
    let out = child.wait_with_output().unwrap();
    assert_eq!(out.status.code(), Some(130), "{}", text(&out.stderr));
    assert!(!sock.exists());
    ok(&["check", p(&img)]);
}

/// `vmm ctl migrate-storage` end to end: a VHD moved to a VHDX under a
/// guest that rewrites and verifies its disk every round (a lost write
/// fails it); a second migration to an existing path is refused; both
/// images check clean afterwards.
#[test]
fn live_storage_migration_through_the_api() {
    use vmm_core::test_payloads::MIGRATE;
    if !can_run(MIGRATE) {
        return;
    }
    let dir = tmp();
    let bin = payload(dir.path(), "migrate.bin", MIGRATE);
    let src = dir.path().join("s.vhd");
    let dest = dir.path().join("d.vhdx");
    ok(&["create", p(&src), "16M"]);
    let sock = dir.path().join("api.sock");
    let out_file = dir.path().join("console.txt");
    let child = vmm()
        .args(["run", "--api", p(&sock), "--timeout", "60"])
        .args(["--disk", p(&src), "--payload", p(&bin)])
        .stdout(std::fs::File::create(&out_file).unwrap())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let rounds = || {
        std::fs::read_to_string(&out_file)
            .unwrap_or_default()
            .matches(" ok\n")
            .count()
    };
    let t0 = Instant::now();
    while rounds() < 1 {
        assert!(
            t0.elapsed() < Duration::from_secs(20),
            "the guest never ran"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    let (code, v) = ctl(&sock, &["migrate-storage", "0", p(&dest)]);
    assert_eq!(code, Some(0), "{v}");
    assert!(v["passes"].as_u64().unwrap() >= 1, "{v}");
    assert!(v["bytes-copied"].as_u64().unwrap() >= 8 << 20, "{v}");
    assert!(v["pause-ms"].as_f64().is_some(), "{v}");
    assert_eq!(
        ctl(&sock, &["info"]).1["disks"][0]["name"],
        p(&dest).to_string()
    );
    // A second migration of the same disk, to a path that exists: refused,
    // nothing changes.
    let (code, v) = ctl(&sock, &["migrate-storage", "0", p(&dest)]);
    assert_eq!(code, Some(1), "{v}");
    let at = rounds();
    let t0 = Instant::now();
    while rounds() < at + 2 {
        assert!(t0.elapsed() < Duration::from_secs(20));
        std::thread::sleep(Duration::from_millis(10));
    }
    ctl(&sock, &["stop"]);
    let out = child.wait_with_output().unwrap();
    let console = std::fs::read_to_string(&out_file).unwrap();
    assert_eq!(
        out.status.code(),
        Some(130),
        "{console}{}",
        text(&out.stderr)
    );
    assert!(!console.contains("other bytes"), "{console}");
    ok(&["check", p(&src)]);
    ok(&["check", p(&dest)]);
}

/// VM checkpoints end to end: `vmm run --bundle` checkpointed through
/// `vmm ctl checkpoint`, `vdisk checkpoint list` marking it, and `vmm
/// restore` continuing the guest in a new process where it stopped (its
/// disk verified by the guest itself); what `vmm restore` refuses.
#[test]
fn vm_checkpoints_through_the_api_and_vmm_restore() {
    use vmm_core::test_payloads::MIGRATE;
    if !can_run(MIGRATE) {
        return;
    }
    let dir = tmp();
    let bin = payload(dir.path(), "migrate.bin", MIGRATE);
    let bundle = dir.path().join("vm");
    ok(&["checkpoint", "init", p(&bundle), "16M"]);
    ok(&["checkpoint", "create", p(&bundle), "disk-only"]);
    let sock = dir.path().join("api.sock");
    let out1 = dir.path().join("run1.txt");
    let child = vmm()
        .args(["run", "--bundle", p(&bundle), "--api", p(&sock)])
        .args(["--timeout", "60", "--payload", p(&bin)])
        .stdout(std::fs::File::create(&out1).unwrap())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let rounds = |f: &Path| -> Vec<u64> {
        std::fs::read_to_string(f)
            .unwrap_or_default()
            .lines()
            .filter_map(|l| l.strip_prefix("round ")?.strip_suffix(" ok")?.parse().ok())
            .collect()
    };
    let t0 = Instant::now();
    while rounds(&out1).len() < 2 {
        assert!(
            t0.elapsed() < Duration::from_secs(20),
            "the guest never ran"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    // While vmm holds the bundle, vdisk cannot change it, but a checkpoint
    // is taken by asking the vmm (the bundle names its API socket).
    let e = fails(1, &["checkpoint", "revert", p(&bundle), "disk-only"]);
    assert!(e.contains("lock") || e.contains("in use"), "{e}");
    let out = ok(&["checkpoint", "create", p(&bundle), "by-vdisk"]);
    assert!(out.contains("through the vmm"), "{out}");
    let (code, v) = ctl(&sock, &["checkpoint", "c1"]);
    assert_eq!(code, Some(0), "{v}");
    let at = *rounds(&out1).last().unwrap();
    assert!(v["memory-bytes"].as_u64().unwrap() > 0, "{v}");
    ctl(&sock, &["stop"]);
    assert_eq!(child.wait_with_output().unwrap().status.code(), Some(130));
    let list = ok(&["checkpoint", "list", p(&bundle)]);
    assert!(
        list.contains("c1 [vm]") && list.contains("by-vdisk [vm]"),
        "{list}"
    );
    assert!(
        !bundle.join("vmm.api").exists(),
        "the API record outlived the vmm"
    );
    assert!(!list.contains("disk-only [vm]"), "{list}");
    let json = ok(&["checkpoint", "list", p(&bundle), "--output", "json"]);
    assert!(json.contains("\"vm-state\": true"), "{json}");
    // Refusals, the bundle unchanged.
    let e = text(
        &vmm()
            .args([
                "restore",
                "--bundle",
                p(&bundle),
                "--checkpoint",
                "disk-only",
            ])
            .output()
            .unwrap()
            .stderr,
    );
    assert!(e.contains("has no VM state"), "{e}");
    let e = text(
        &vmm()
            .args(["restore", "--bundle", p(&bundle), "--checkpoint", "nope"])
            .output()
            .unwrap()
            .stderr,
    );
    assert!(e.contains("nope"), "{e}");
    // Continue c1 in a new process.
    let out = vmm()
        .args([
            "restore",
            "--bundle",
            p(&bundle),
            "--checkpoint",
            "c1",
            "--timeout",
            "1",
        ])
        .output()
        .unwrap();
    let console = text(&out.stdout);
    assert_eq!(
        out.status.code(),
        Some(252),
        "{console}{}",
        text(&out.stderr)
    );
    let r: Vec<u64> = console
        .lines()
        .filter_map(|l| l.strip_prefix("round ")?.strip_suffix(" ok")?.parse().ok())
        .collect();
    assert!(!console.contains("other bytes"), "{console}");
    assert!(
        r.len() >= 2 && r[0] >= at && r[0] <= at + 2,
        "checkpoint after round {at}: {r:?}"
    );
}
