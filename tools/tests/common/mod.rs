//! Running the `vdisk` binary from the integration tests.
#![allow(dead_code)]

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
