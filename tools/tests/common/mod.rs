//! Running the `vdisk` binary from the integration tests.
#![allow(dead_code)]

use disk::VirtualDisk as _;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

pub fn vdisk() -> Command {
    Command::new(env!("CARGO_BIN_EXE_vdisk"))
}

/// Run `vdisk args...` and return its output.
pub fn run(args: &[&str]) -> Output {
    vdisk().args(args).output().expect("run vdisk")
}

/// Run `vdisk args...`, which must succeed, and return stdout.
pub fn ok(args: &[&str]) -> String {
    let out = run(args);
    assert!(
        out.status.success(),
        "vdisk {args:?} failed ({:?}): {}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).expect("utf-8 stdout")
}

/// Run `vdisk args...`, which must fail with exit code `code`; return stderr.
pub fn fails(code: i32, args: &[&str]) -> String {
    let out = run(args);
    assert_eq!(
        out.status.code(),
        Some(code),
        "vdisk {args:?}: stdout {} stderr {}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stderr).into_owned()
}

pub fn p(path: &Path) -> &str {
    path.to_str().expect("utf-8 path")
}

/// qemu-img, the independent oracle, when installed (says so when not).
pub fn qemu_img() -> Option<PathBuf> {
    let q = PathBuf::from("/usr/bin/qemu-img");
    if q.exists() {
        Some(q)
    } else {
        println!("qemu-img not found at /usr/bin/qemu-img: skipping the qemu-img checks");
        None
    }
}

/// Run `qemu-img args...`, which must succeed (nothing when it is absent).
pub fn qemu_ok(args: &[&str]) {
    let Some(q) = qemu_img() else { return };
    let out = Command::new(q).args(args).output().unwrap();
    assert!(
        out.status.success(),
        "qemu-img {args:?}: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// `n` bytes of a deterministic pattern that is never all zero.
pub fn pattern(n: usize, seed: u32) -> Vec<u8> {
    let mut x = seed.wrapping_mul(2_654_435_761).max(1);
    (0..n)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 17;
            x ^= x << 5;
            (x >> 8) as u8 | 1
        })
        .collect()
}

pub fn tmp() -> tempfile::TempDir {
    tempfile::tempdir().unwrap()
}

/// `len` virtual bytes of `img` from `offset`, through `vdisk read`, which
/// must succeed.
pub fn read_bytes(img: &Path, offset: u64, len: u64) -> Vec<u8> {
    let args = ["read", p(img), &offset.to_string(), &len.to_string()];
    let out = run(&args);
    assert!(
        out.status.success(),
        "vdisk {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    out.stdout
}

/// `vdisk create -f vhdx -o block_size=1M IMG SIZE`, which must succeed.
pub fn create_vhdx_1m(img: &Path, size: &str) {
    ok(&["create", "-f", "vhdx", "-o", "block_size=1M", p(img), size]);
}

/// A VHDX whose last flush was cut after its log entry was durable but
/// before the BAT was updated in place: the log must be replayed.
pub fn dirty_log_vhdx(path: &Path) -> Vec<u8> {
    let st = std::sync::Arc::new(disk::MemStorage::new("base"));
    let mut o = vhdx::CreateOptions::new(16 << 20);
    o.block_size = 1 << 20;
    vhdx::Vhdx::create_on(Box::new(st.clone()), &o)
        .unwrap()
        .close()
        .unwrap();
    let rec = std::sync::Arc::new(disk::fault::RecordingStorage::new("rec", st.to_vec()));
    let d = vhdx::Vhdx::open_storage(
        Box::new(rec.clone()),
        &vhdx::OpenOptions {
            writable: true,
            ..vhdx::OpenOptions::default()
        },
    )
    .unwrap();
    let data = pattern(64 * 1024, 7);
    d.write_at(&data, 3 << 20).unwrap();
    d.flush().unwrap();
    // A crash: no clean close. A flush is sync, log entry, sync, BAT in
    // place, sync: keep what was written up to the sync after the log entry.
    std::mem::forget(d);
    let flushes = rec.flush_points();
    let img = rec.crash_image(flushes[flushes.len() - 2] + 1, |_| true);
    std::fs::write(path, img).unwrap();
    data
}

/// `vdisk write IMG OFFSET FILE` of `data` (through a file beside `img`).
pub fn vdisk_write(img: &Path, offset: u64, data: &[u8]) {
    let f = img.with_extension("payload");
    std::fs::write(&f, data).unwrap();
    ok(&["write", p(img), &offset.to_string(), p(&f)]);
    std::fs::remove_file(&f).unwrap();
}
