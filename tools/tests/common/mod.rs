//! Running the `vdisk` binary from the integration tests.
#![allow(dead_code)]

use std::path::Path;
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
