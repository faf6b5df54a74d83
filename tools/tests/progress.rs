//! `-p` when stderr is not a terminal (here it is a pipe): percentage lines
//! as qemu-img prints them, at most one per whole percent, each with the
//! bytes actually copied (not the virtual bytes scanned) and the rate.

// Test images and buffers are small: their offsets and sizes fit any integer type.
#![allow(clippy::cast_possible_truncation, clippy::cast_sign_loss)]

mod common;
use common::*;

use std::fs;
use std::path::Path;

const MIB: u64 = 1 << 20;

/// The progress lines of `stderr`, checked: each `    (P/100%) C LABEL,
/// R/s` with P rising by at least a whole percent from line to line, the
/// last `    (100.00/100%) C LABEL in T s, R/s`. Returns the last line's
/// C (e.g. "3.0 MiB").
fn check_lines(stderr: &str, label: &str) -> String {
    let lines: Vec<&str> = stderr.lines().filter(|l| l.starts_with("    (")).collect();
    assert!(!lines.is_empty(), "no progress lines in {stderr:?}");
    assert!(lines.len() <= 101, "{} lines: {stderr}", lines.len());
    let mut last_whole = None;
    for (i, l) in lines.iter().enumerate() {
        let rest = l.strip_prefix("    (").unwrap();
        let (pct, rest) = rest.split_once("/100%) ").unwrap_or_else(|| panic!("{l}"));
        assert_eq!(pct.split_once('.').map(|(_, d)| d.len()), Some(2), "{l}");
        let pct: f64 = pct.parse().unwrap_or_else(|_| panic!("{l}"));
        let whole = pct.floor() as u64;
        if let Some(w) = last_whole {
            assert!(whole > w, "not one line per whole percent: {stderr}");
        }
        last_whole = Some(whole);
        let (amount, rate) = rest.rsplit_once(", ").unwrap_or_else(|| panic!("{l}"));
        assert!(rate.ends_with("/s"), "{l}");
        let last = i + 1 == lines.len();
        let want = if last {
            format!(" {label} in ")
        } else {
            format!(" {label}")
        };
        assert!(amount.contains(&want), "{l}");
        assert_eq!(last, pct == 100.0, "{l}");
        if last {
            return amount
                .split(&format!(" {label}"))
                .next()
                .unwrap()
                .to_string();
        }
    }
    unreachable!()
}

/// `vdisk args...`, which must succeed: (stdout, stderr).
fn run_ok(args: &[&str]) -> (String, String) {
    let out = run(args);
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(out.status.success(), "vdisk {args:?}: {stderr}");
    (String::from_utf8(out.stdout).unwrap(), stderr)
}

/// A 64 MiB raw image holding 3 MiB of data at 10 MiB.
fn raw_with_data(path: &Path) {
    let f = fs::File::create(path).unwrap();
    f.set_len(64 * MIB).unwrap();
    std::os::unix::fs::FileExt::write_all_at(&f, &pattern(3 * MIB as usize, 1), 10 * MIB).unwrap();
}

#[test]
fn convert_and_compare_count_the_bytes_they_move() {
    let dir = tempfile::tempdir().unwrap();
    let raw = dir.path().join("a.raw");
    raw_with_data(&raw);
    let (a, b) = (dir.path().join("a.vhdx"), dir.path().join("b.vhdx"));
    // 64 MiB scanned, 3 MiB written.
    let (_, e) = run_ok(&[
        "convert",
        "-p",
        "-O",
        "vhdx",
        "-o",
        "block_size=1M",
        p(&raw),
        p(&a),
    ]);
    assert_eq!(check_lines(&e, "written"), "3.0 MiB", "{e}");
    let (_, e) = run_ok(&[
        "convert",
        "-p",
        "-O",
        "vhdx",
        "-o",
        "block_size=1M",
        p(&a),
        p(&b),
    ]);
    assert_eq!(check_lines(&e, "written"), "3.0 MiB", "{e}");
    // Both map all but 3 MiB as unallocated: 3 MiB read and compared.
    let (out, e) = run_ok(&["compare", "-p", p(&a), p(&b)]);
    assert_eq!(out, "Images are identical.\n");
    assert_eq!(check_lines(&e, "compared"), "3.0 MiB", "{e}");
    // Without -p, nothing.
    let (_, e) = run_ok(&["compare", p(&a), p(&b)]);
    assert!(e.is_empty(), "{e}");
}

#[test]
fn merge_and_compact_count_the_bytes_they_move() {
    let dir = tempfile::tempdir().unwrap();
    let base = dir.path().join("base.vhdx");
    let child = dir.path().join("child.avhdx");
    let data = dir.path().join("data");
    ok(&["create", "-o", "block_size=1M", p(&base), "64M"]);
    ok(&["create", "-b", p(&base), p(&child)]);
    fs::write(&data, pattern(2 * MIB as usize, 2)).unwrap();
    ok(&["write", p(&child), "4M", p(&data)]);
    let (out, e) = run_ok(&["merge", "-p", p(&child)]);
    assert!(out.contains("2 MiB (2097152 bytes) copied"), "{out}");
    assert_eq!(check_lines(&e, "copied"), "2.0 MiB", "{e}");

    // Blocks 0-3 written, block 1 zeroed: compact frees it and moves the
    // last block into its place.
    fs::write(&data, pattern(4 * MIB as usize, 3)).unwrap();
    ok(&["write", p(&base), "0", p(&data)]);
    fs::write(&data, vec![0u8; MIB as usize]).unwrap();
    ok(&["write", p(&base), "1M", p(&data)]);
    let (out, e) = run_ok(&["compact", "-p", "--output", "json", p(&base)]);
    let j: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(j["blocks-freed"], 1, "{j}");
    let moved = j["blocks-moved"].as_u64().unwrap();
    assert!(moved >= 1, "{j}");
    assert_eq!(check_lines(&e, "moved"), format!("{moved}.0 MiB"), "{e}");
}

#[test]
fn resize_prints_one_line_when_done() {
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("r.vhdx");
    ok(&["create", p(&img), "64M"]);
    let (out, e) = run_ok(&["resize", "-p", p(&img), "+64M"]);
    assert_eq!(out, "Image resized.\n");
    let lines: Vec<&str> = e.lines().collect();
    assert_eq!(lines.len(), 1, "{e}");
    assert!(lines[0].starts_with("    (100.00/100%) in "), "{e}");
    assert!(lines[0].ends_with(" s"), "{e}");
}
