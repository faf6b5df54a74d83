//! End-to-end tests of `vdisk resize`: every format and subformat grows and
//! shrinks, relative sizes, shrinking over data refused then forced, the
//! data before the cut unchanged (`vdisk compare` against a raw copy, and
//! `qemu-img check`/`compare` when installed), and the error paths. After
//! every resize, `vdisk check` finds the image clean (exit 0: a shrink gives
//! back the file space it frees, so nothing leaks).

// Test images and buffers are small: their offsets and sizes fit any integer type.
#![allow(clippy::cast_possible_truncation)]

mod common;
use common::*;

use std::fs;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

const MIB: u64 = 1 << 20;
const GIB: u64 = 1 << 30;

fn fails(args: &[&str]) -> String {
    let out = run(args);
    assert_eq!(
        out.status.code(),
        Some(1),
        "vdisk {args:?}: stdout {} stderr {}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stderr).into_owned()
}

fn size_of(img: &Path) -> u64 {
    let v: serde_json::Value =
        serde_json::from_str(&ok(&["info", "--output", "json", p(img)])).unwrap();
    v["virtual-size"].as_u64().unwrap()
}

/// Data at the start, in the middle and near the end of a 64 MiB disk.
const MARKS: [(u64, &[u8]); 3] = [
    (0, b"first sector"),
    (5 * MIB + 7, b"middle"),
    (40 * MIB, b"in the part a shrink to 32M cuts"),
];

/// An image (format, create options) of 64 MiB holding [`MARKS`], and a raw
/// copy of its virtual bytes.
fn setup(dir: &Path, name: &str, fmt: &str, opts: &str) -> (PathBuf, PathBuf) {
    let img = dir.join(name);
    let mut args = vec!["create", "-f", fmt];
    if !opts.is_empty() {
        args.extend(["-o", opts]);
    }
    args.extend([p(&img), "64M"]);
    ok(&args);
    for (i, (off, data)) in MARKS.iter().enumerate() {
        let f = dir.join(format!("{name}.mark{i}"));
        fs::write(&f, data).unwrap();
        ok(&["write", p(&img), &off.to_string(), p(&f)]);
    }
    let raw = dir.join(format!("{name}.raw"));
    ok(&["convert", "-O", "raw", p(&img), p(&raw)]);
    (img, raw)
}

/// The raw copy resized the way the image was: truncated or extended.
fn resize_raw(raw: &Path, size: u64) {
    fs::OpenOptions::new()
        .write(true)
        .open(raw)
        .unwrap()
        .set_len(size)
        .unwrap();
}

/// `vdisk check IMG` exits 0 with no leak and no corruption.
fn clean(img: &Path) {
    let out = run(&["check", "--output", "json", p(img)]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(0), "{}: {text}", p(img));
    let v: serde_json::Value = serde_json::from_str(&text).unwrap();
    assert_eq!(
        (v["leaks"].as_u64(), v["corruptions"].as_u64()),
        (Some(0), Some(0)),
        "{text}"
    );
}

fn file_len(img: &Path) -> u64 {
    fs::metadata(img).unwrap().len()
}

fn same(img: &Path, raw: &Path, qfmt: &str) {
    clean(img);
    ok(&["compare", "-s", p(raw), p(img)]);
    if qfmt == "vhdx" {
        qemu_ok(&["check", "-f", "vhdx", p(img)]);
    }
    qemu_ok(&["info", "-f", qfmt, p(img)]);
    qemu_ok(&["compare", "-f", "raw", "-F", qfmt, p(raw), p(img)]);
}

fn grow_and_shrink(name: &str, fmt: &str, qfmt: &str, opts: &str) {
    let dir = tempfile::tempdir().unwrap();
    let (img, raw) = setup(dir.path(), name, fmt, opts);
    let s0 = size_of(&img);
    // Grow by a relative size.
    assert_eq!(ok(&["resize", p(&img), "+1G"]), "Image resized.\n");
    let s1 = size_of(&img);
    assert!(s1 >= s0 + GIB, "{name}: {s0} -> {s1}");
    resize_raw(&raw, s1);
    same(&img, &raw, qfmt);
    // Relative shrink back over empty space.
    ok(&["resize", "-f", fmt, p(&img), "-512M"]);
    let s2 = size_of(&img);
    assert!(s2 >= s1 - 512 * MIB && s2 < s1, "{name}: {s1} -> {s2}");
    resize_raw(&raw, s2);
    same(&img, &raw, qfmt);
    // Shrinking to 32M would cut MARKS[2]: refused, naming the file.
    let e = fails(&["resize", p(&img), "32M"]);
    assert!(e.contains(p(&img)) && e.contains("--force"), "{name}: {e}");
    assert_eq!(size_of(&img), s2);
    same(&img, &raw, qfmt);
    // Forced: the data before the cut is unchanged. The block holding
    // MARKS[2] is given back with the file's tail when it is the last one
    // in the file: always in a fixed image, and in a dynamic VHDX (the
    // grow above moved nothing); in a dynamic VHD the grow moved block 0,
    // which was in the BAT's way, to the end, so the cut block is left as
    // unused space below it (which `check` does not count as a leak).
    let len2 = file_len(&img);
    ok(&["resize", "--force", p(&img), "32M"]);
    let s3 = size_of(&img);
    assert!((32 * MIB..33 * MIB).contains(&s3), "{name}: {s3}");
    let len3 = file_len(&img);
    if fmt == "vhdx" || opts.contains("fixed") {
        assert!(
            len3 < len2,
            "{name}: the file did not shrink: {len2} -> {len3}"
        );
    }
    resize_raw(&raw, s3);
    same(&img, &raw, qfmt);
    // Growing again: the cut part reads as zeros.
    ok(&["resize", "-p", p(&img), "64M"]);
    let s4 = size_of(&img);
    resize_raw(&raw, s3); // keep the truncation's zeros
    resize_raw(&raw, s4);
    same(&img, &raw, qfmt);
}

#[test]
fn vhdx_dynamic_grow_shrink() {
    grow_and_shrink("d.vhdx", "vhdx", "vhdx", "block_size=1M");
}

#[test]
fn vhdx_fixed_grow_shrink() {
    grow_and_shrink("f.vhdx", "vhdx", "vhdx", "subformat=fixed,block_size=1M");
}

#[test]
fn vhd_dynamic_grow_shrink() {
    grow_and_shrink("d.vhd", "vhd", "vpc", "");
}

#[test]
fn vhd_fixed_grow_shrink() {
    grow_and_shrink("f.vhd", "vhd", "vpc", "subformat=fixed");
}

#[test]
fn raw_grow_shrink() {
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("r.raw");
    let f = fs::File::create(&img).unwrap();
    f.set_len(8 * MIB).unwrap();
    f.write_all_at(b"x", 6 * MIB).unwrap();
    ok(&["resize", "-f", "raw", p(&img), "+8M"]);
    assert_eq!(fs::metadata(&img).unwrap().len(), 16 * MIB);
    fails(&["resize", "-f", "raw", p(&img), "4M"]);
    ok(&["resize", "-f", "raw", "--force", p(&img), "4M"]);
    assert_eq!(fs::metadata(&img).unwrap().len(), 4 * MIB);
}

#[test]
fn vhdx_grow_relocating_the_first_blocks() {
    // With 1 MiB blocks the BAT outgrows its 1 MiB region past 128 GiB.
    let dir = tempfile::tempdir().unwrap();
    let (img, raw) = setup(dir.path(), "big.vhdx", "vhdx", "block_size=1M");
    ok(&["resize", p(&img), "130G"]);
    assert_eq!(size_of(&img), 130 * GIB);
    resize_raw(&raw, 130 * GIB);
    ok(&["compare", p(&raw), p(&img)]);
    qemu_ok(&["check", "-f", "vhdx", p(&img)]);
}

#[test]
fn vhd_dynamic_grow_relocating_the_first_block() {
    // 64M with 2 MiB blocks: a one-sector BAT; 20G needs 20 sectors.
    let dir = tempfile::tempdir().unwrap();
    let (img, raw) = setup(dir.path(), "big.vhd", "vhd", "");
    ok(&["resize", p(&img), "20G"]);
    let s = size_of(&img);
    assert!(s >= 20 * GIB);
    resize_raw(&raw, s);
    same(&img, &raw, "vpc");
}

#[test]
fn error_paths() {
    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("missing.vhdx");
    let e = fails(&["resize", p(&missing), "1G"]);
    assert!(e.contains("missing.vhdx"), "{e}");
    let img = dir.path().join("d.vhdx");
    ok(&["create", "-f", "vhdx", p(&img), "64M"]);
    for bad in ["1X", "", "+", "-64M", "-1G", "1.G", "--5"] {
        let e = fails(&["resize", p(&img), bad]);
        assert!(e.contains("SIZE") || e.contains("d.vhdx"), "{bad}: {e}");
    }
    assert_eq!(size_of(&img), 64 * MIB);
    for (base, child) in [("b.vhdx", "c.avhdx"), ("b.vhd", "c.vhd")] {
        let base = dir.path().join(base);
        let child = dir.path().join(child);
        let fmt = if p(&base).ends_with("vhdx") {
            "vhdx"
        } else {
            "vhd"
        };
        ok(&["create", "-f", fmt, p(&base), "64M"]);
        ok(&["create", "-b", p(&base), p(&child)]);
        let e = fails(&["resize", p(&child), "+1G"]);
        assert!(e.contains("differencing") && e.contains(p(&child)), "{e}");
    }
    let help = ok(&["resize", "--help"]);
    assert!(
        help.contains("Examples:") && help.contains("--force"),
        "{help}"
    );
}

/// The case: a shrink, forced over data or not, then `vdisk check`
/// exits 0 (it used to find the freed blocks' space leaked, exit 3), for
/// every format and subformat; the file gives back the cut blocks.
#[test]
fn shrink_then_check_exits_0() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    fs::write(&data, b"data").unwrap();
    for (name, fmt, opts) in [
        ("d.vhdx", "vhdx", "block_size=1M"),
        ("f.vhdx", "vhdx", "subformat=fixed,block_size=1M"),
        ("d.vhd", "vhd", "block_size=1M"),
        ("f.vhd", "vhd", "subformat=fixed"),
    ] {
        let img = dir.path().join(name);
        ok(&["create", "-f", fmt, "-o", opts, p(&img), "64M"]);
        ok(&["write", p(&img), "0", p(&data)]);
        ok(&["write", p(&img), "60M", p(&data)]);
        // Not forced, over nothing allocated (a dynamic image) or zeros (a
        // fixed one): 64M -> 62M.
        let len0 = file_len(&img);
        ok(&["resize", p(&img), "62M"]);
        clean(&img);
        if opts.contains("fixed") {
            assert!(file_len(&img) < len0, "{name}: not cut");
        }
        // Forced over the block at 60M.
        let len1 = file_len(&img);
        ok(&["resize", "--force", p(&img), "16M"]);
        clean(&img);
        assert!(
            file_len(&img) < len1,
            "{name}: {} >= {len1}",
            file_len(&img)
        );
        assert_eq!(read_bytes(&img, 0, 4), b"data", "{name}");
        // And grown back, the cut data gone, still clean.
        ok(&["resize", p(&img), "64M"]);
        clean(&img);
        assert_eq!(read_bytes(&img, 60 * MIB, 4), [0u8; 4], "{name}");
    }
}
