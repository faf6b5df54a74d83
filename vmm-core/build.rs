//! Builds the test payloads (payloads/*.c, freestanding C) into flat
//! binaries with gcc and objcopy, for the `test-payloads` feature. Without
//! gcc the payloads are left empty (a warning says so) and the tests that
//! need them skip.

use std::path::{Path, PathBuf};
use std::process::Command;

/// Each payload and its own extra gcc flags.
const PROGRAMS: &[(&str, &[&str])] = &[
    ("blk_io", &[]),
    ("hostile", &[]),
    ("smp", &[]),
    ("bench", &[]),
    ("sector0", &[]),
    ("hello", &[]),
    ("qos", &[]),
    ("migrate", &[]),
    // Up to 40 requests in flight, 3 descriptors each (payload.h QSIZE).
    ("vmmbench", &["-DQSIZE=128"]),
];

fn main() {
    let dir = PathBuf::from(std::env::var("CARGO_MANIFEST_DIR").expect("cargo sets it"));
    let src = dir.join("payloads");
    let out = PathBuf::from(std::env::var("OUT_DIR").expect("cargo sets it"));
    println!("cargo:rerun-if-changed=payloads");
    println!("cargo:rerun-if-changed=build.rs");
    let build = std::env::var("CARGO_FEATURE_TEST_PAYLOADS").is_ok();
    let have_gcc = build
        && Command::new("gcc")
            .arg("--version")
            .output()
            .is_ok_and(|o| o.status.success());
    if build && !have_gcc {
        println!(
            "cargo:warning=gcc not found: the test payloads are not built and their tests skip"
        );
    }
    for (p, flags) in PROGRAMS {
        let bin = out.join(format!("{p}.bin"));
        if !have_gcc {
            std::fs::write(&bin, b"").expect("writing OUT_DIR");
            continue;
        }
        compile(&src, &out, p, flags, &bin);
    }
}

fn compile(src: &Path, out: &Path, name: &str, flags: &[&str], bin: &Path) {
    let elf = out.join(format!("{name}.elf"));
    let status = Command::new("gcc")
        .args([
            "-ffreestanding",
            "-nostdlib",
            "-nostartfiles",
            "-static",
            "-fno-pic",
            "-no-pie",
            "-mno-red-zone",
            "-O2",
            "-fno-stack-protector",
            "-fno-asynchronous-unwind-tables",
            "-fno-tree-loop-distribute-patterns",
            "-fcf-protection=none",
            "-Wall",
            "-Werror",
            "-Wl,--build-id=none",
        ])
        .args(flags)
        .arg(format!("-Wl,-T,{}", src.join("link.ld").display()))
        .arg("-o")
        .arg(&elf)
        .arg(src.join("start.S"))
        .arg(src.join("payload.c"))
        .arg(src.join(format!("{name}.c")))
        .status()
        .expect("running gcc");
    assert!(status.success(), "gcc failed on payloads/{name}.c");
    let status = Command::new("objcopy")
        .args(["-O", "binary"])
        .arg(&elf)
        .arg(bin)
        .status()
        .expect("running objcopy");
    assert!(status.success(), "objcopy failed on {name}");
}
