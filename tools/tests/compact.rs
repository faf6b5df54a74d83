//! End-to-end tests of `vdisk compact`: dynamic VHDX and VHD images with
//! data, zero-written and empty blocks shrink and read the same (`vdisk
//! compare` against a raw copy taken before, and `qemu-img check`/`compare`
//! when installed); a differencing disk leaves its parent untouched; JSON
//! output; the error paths.

// Test images and buffers are small: their offsets and sizes fit any integer type.
#![allow(clippy::cast_possible_truncation)]

mod common;
use common::*;

use std::fs;
use std::path::{Path, PathBuf};

const MIB: u64 = 1 << 20;

fn file_len(f: &Path) -> u64 {
    fs::metadata(f).unwrap().len()
}

/// Write `data` into `img` at `off` with `vdisk write`.
fn put(dir: &Path, img: &Path, off: u64, data: &[u8]) {
    let f = dir.join("piece.bin");
    fs::write(&f, data).unwrap();
    ok(&["write", p(img), &off.to_string(), p(&f)]);
}

/// A 32 MiB image with 1 MiB blocks (VHDX) or 2 MiB blocks (VHD): data in
/// blocks 0, 10 and 30, zeros written over 4 and 20 (allocated, all zero),
/// and block 10 written with zeros last (freed). Returns the image and a
/// raw copy of its bytes.
fn setup(dir: &Path, name: &str, fmt: &str, opts: &str) -> (PathBuf, PathBuf) {
    let img = dir.join(name);
    ok(&["create", "-f", fmt, "-o", opts, p(&img), "32M"]);
    put(dir, &img, 0, b"boot sector");
    put(dir, &img, 4 * MIB, &vec![0u8; 4096]);
    put(dir, &img, 10 * MIB + 5, b"soon zeros");
    put(dir, &img, 20 * MIB, &vec![0u8; 70_000]);
    put(dir, &img, 30 * MIB + 4096, b"near the end");
    put(dir, &img, 10 * MIB, &vec![0u8; 4096]);
    let raw = dir.join(format!("{name}.raw"));
    ok(&["convert", "-O", "raw", p(&img), p(&raw)]);
    (img, raw)
}

fn compact_json(img: &Path) -> serde_json::Value {
    serde_json::from_str(&ok(&["compact", "--output", "json", p(img)])).unwrap()
}

fn check_same(img: &Path, raw: &Path, qfmt: &str) {
    ok(&["compare", p(raw), p(img)]);
    let out = run(&["check", p(img)]);
    assert_eq!(
        out.status.code(),
        Some(0),
        "vdisk check after compact: {}",
        String::from_utf8_lossy(&out.stdout)
    );
    if qfmt == "vhdx" {
        qemu_ok(&["check", "-f", "vhdx", p(img)]);
    }
    qemu_ok(&["compare", "-f", "raw", "-F", qfmt, p(raw), p(img)]);
}

fn compact_dynamic(fmt: &str, qfmt: &str, opts: &str) {
    let dir = tempfile::tempdir().unwrap();
    let (img, raw) = setup(dir.path(), &format!("d.{fmt}"), fmt, opts);
    let before = file_len(&img);
    let j = compact_json(&img);
    let freed = j["blocks-freed"].as_u64().unwrap();
    // Blocks 4, 10 and 20 read as zeros (a 2 MiB VHD block holds 4 and 5,
    // 10 and 11, 20 and 21: the same three blocks).
    assert_eq!(freed, 3, "{fmt}: {j}");
    assert_eq!(j["old-file-size"].as_u64(), Some(before));
    let after = file_len(&img);
    assert_eq!(j["new-file-size"].as_u64(), Some(after));
    assert_eq!(j["reclaimed"].as_u64(), Some(before - after));
    assert!(
        after < before,
        "{fmt}: the file did not shrink ({before} -> {after})"
    );
    check_same(&img, &raw, qfmt);
    // A second compaction has nothing left to do.
    let again = ok(&["compact", p(&img)]);
    assert!(
        again.starts_with("Image compacted: 0 block(s) freed, 0 moved"),
        "{again}"
    );
    assert_eq!(file_len(&img), after);
    // Still writable: new data lands and reads back.
    put(dir.path(), &img, 12 * MIB, b"after compact");
    let back = ok(&["read", p(&img), &(12 * MIB).to_string(), "13"]);
    assert_eq!(back, "after compact");
}

#[test]
fn vhdx_dynamic_compacts() {
    compact_dynamic("vhdx", "vhdx", "block_size=1M");
}

#[test]
fn vhd_dynamic_compacts() {
    compact_dynamic("vhd", "vpc", "subformat=dynamic,block_size=2M");
}

#[test]
fn differencing_compacts_and_leaves_the_parent_alone() {
    for (fmt, ext) in [("vhdx", "avhdx"), ("vhd", "vhd")] {
        let dir = tempfile::tempdir().unwrap();
        let base = dir.path().join(format!("base.{fmt}"));
        ok(&["create", "-f", fmt, p(&base), "16M"]);
        put(dir.path(), &base, 0, &vec![7u8; 3 * MIB as usize]);
        let child = dir.path().join(format!("child.{ext}"));
        ok(&["create", "-b", p(&base), p(&child)]);
        // Zeros over the parent's data (must stay), the parent's own bytes
        // (VHD: may go), zeros over zeros (may go).
        put(dir.path(), &child, 0, &vec![0u8; 4096]);
        put(dir.path(), &child, 8 * MIB, &vec![0u8; 4096]);
        put(dir.path(), &child, 12 * MIB, b"child data");
        let raw = dir.path().join("child.raw");
        ok(&["convert", "-O", "raw", p(&child), p(&raw)]);
        let parent_before = fs::read(&base).unwrap();
        let before = file_len(&child);
        let j = compact_json(&child);
        assert!(j["blocks-freed"].as_u64().unwrap() >= 1, "{fmt}: {j}");
        assert!(file_len(&child) < before, "{fmt}: the child did not shrink");
        assert!(
            fs::read(&base).unwrap() == parent_before,
            "{fmt}: the parent changed"
        );
        ok(&["compare", p(&raw), p(&child)]);
        let out = run(&["check", p(&child)]);
        assert_eq!(out.status.code(), Some(0), "{fmt}: check after compact");
    }
}

#[test]
fn error_paths() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let raw = d.join("disk.raw");
    ok(&["create", "-f", "raw", p(&raw), "4M"]);
    let e = fails(1, &["compact", p(&raw)]);
    assert!(e.contains(p(&raw)) && e.contains("raw image"), "{e}");

    for (fmt, name) in [("vhdx", "fixed.vhdx"), ("vhd", "fixed.vhd")] {
        let img = d.join(name);
        ok(&["create", "-f", fmt, "-o", "subformat=fixed", p(&img), "4M"]);
        let before = fs::read(&img).unwrap();
        let e = fails(1, &["compact", p(&img)]);
        assert!(e.contains(name) && e.contains("fixed"), "{e}");
        assert!(fs::read(&img).unwrap() == before, "{name} changed");
    }

    let e = fails(1, &["compact", p(&d.join("missing.vhdx"))]);
    assert!(e.contains("missing.vhdx"), "{e}");

    // A damaged image is refused, not compacted.
    let img = d.join("bad.vhd");
    ok(&["create", "-f", "vhd", p(&img), "8M"]);
    put(d, &img, 0, b"data");
    let mut bytes = fs::read(&img).unwrap();
    let n = bytes.len();
    bytes[n - 512..n - 500].fill(0xAB); // the trailing footer's cookie
    bytes[..12].fill(0xAB); // and its copy
    fs::write(&img, &bytes).unwrap();
    let e = fails(1, &["compact", p(&img)]);
    assert!(e.contains("bad.vhd"), "{e}");
    assert!(
        fs::read(&img).unwrap() == bytes,
        "a damaged image was changed"
    );

    let help = ok(&["compact", "--help"]);
    assert!(
        help.contains("Examples:") && help.contains("Exit status"),
        "{help}"
    );
}
