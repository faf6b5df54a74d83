//! End-to-end tests of `vdisk check`, `vdisk map`, `vdisk completions`,
//! `vdisk man`, and of output into a closed pipe.

// Test images and buffers are small: their offsets and sizes fit any integer type.
#![allow(clippy::cast_possible_truncation)]

mod common;
use common::vdisk_write as write;
use common::*;

use disk::testing::have;
use disk::VirtualDisk;
use std::fs;
use std::io::Read;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::process::{Command, Stdio};

const MIB: u64 = 1 << 20;

/// Run `vdisk args...`, expecting exit status `code`; return stdout.
fn status(code: i32, args: &[&str]) -> String {
    let out = run(args);
    let (o, e) = (
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    );
    assert_eq!(
        out.status.code(),
        Some(code),
        "vdisk {args:?}: stdout {o} stderr {e}"
    );
    assert!(!e.contains("panicked"), "vdisk {args:?}: {e}");
    o
}

fn ok(args: &[&str]) -> String {
    status(0, args)
}

fn check_json(img: &Path, extra: &[&str], code: i32) -> serde_json::Value {
    let mut args = vec!["check", "--output", "json"];
    args.extend_from_slice(extra);
    args.push(p(img));
    serde_json::from_str(&status(code, &args)).expect("JSON")
}

/// A raw copy of `img`'s virtual contents, for `vdisk compare` after repairs.
fn raw_copy(img: &Path) -> std::path::PathBuf {
    let raw = img.with_extension("raw-copy");
    ok(&["convert", "-O", "raw", p(img), p(&raw)]);
    raw
}

fn same(img: &Path, raw: &Path) {
    let out = ok(&["compare", p(raw), p(img)]);
    assert!(out.contains("Images are identical."), "{out}");
}

fn qemu() -> Option<&'static str> {
    have("qemu-img").then_some("qemu-img")
}

/// The file offset of the BAT of a VHDX (from the first region table).
fn vhdx_bat_offset(img: &Path) -> u64 {
    let b = fs::read(img).unwrap();
    let count = u32::from_le_bytes(b[0x30008..0x3000c].try_into().unwrap()) as usize;
    for i in 0..count {
        let e = 0x30010 + 32 * i;
        // BAT region GUID 2DC27766-F623-4200-9D64-115E9BFD4A08, little-endian first field.
        if b[e..e + 4] == [0x66, 0x77, 0xc2, 0x2d] {
            return u64::from_le_bytes(b[e + 16..e + 24].try_into().unwrap());
        }
    }
    panic!("no BAT region in {}", img.display());
}

fn read_u64(img: &Path, at: u64) -> u64 {
    let mut b = [0u8; 8];
    fs::File::open(img)
        .unwrap()
        .read_exact_at(&mut b, at)
        .unwrap();
    u64::from_le_bytes(b)
}

fn write_at(img: &Path, at: u64, bytes: &[u8]) {
    fs::OpenOptions::new()
        .write(true)
        .open(img)
        .unwrap()
        .write_all_at(bytes, at)
        .unwrap();
}

/// A dynamic VHDX with 1 MiB blocks and data in blocks 0 and 2.
fn vhdx_with_data(dir: &Path, name: &str) -> std::path::PathBuf {
    let img = dir.join(name);
    create_vhdx_1m(&img, "16M");
    write(&img, 0, &pattern(MIB as usize, 1));
    write(&img, 2 * MIB + 4096, &pattern(8192, 2));
    img
}

/// A dynamic VHD (2 MiB blocks) with data in blocks 0 and 2.
fn vhd_with_data(dir: &Path, name: &str) -> std::path::PathBuf {
    let img = dir.join(name);
    ok(&["create", "-f", "vhd", p(&img), "16M"]);
    write(&img, 512, &pattern(MIB as usize, 3));
    write(&img, 4 * MIB, &pattern(4096, 4));
    img
}

#[test]
fn clean_images_check_clean() {
    let dir = tmp();
    let mut images = vec![
        vhdx_with_data(dir.path(), "dyn.vhdx"),
        vhd_with_data(dir.path(), "dyn.vhd"),
    ];
    let fixed = dir.path().join("fixed.vhdx");
    ok(&[
        "create",
        "-f",
        "vhdx",
        "-o",
        "subformat=fixed,block_size=2M",
        p(&fixed),
        "8M",
    ]);
    write(&fixed, MIB, &pattern(4096, 5));
    let fixed_vhd = dir.path().join("fixed.vhd");
    ok(&[
        "create",
        "-f",
        "vhd",
        "-o",
        "subformat=fixed",
        p(&fixed_vhd),
        "8M",
    ]);
    let empty = dir.path().join("empty.vhdx");
    ok(&["create", "-f", "vhdx", p(&empty), "1G"]);
    images.extend([fixed, fixed_vhd, empty]);
    for img in &images {
        let out = ok(&["check", p(img)]);
        assert!(out.contains("No errors were found on the image."), "{out}");
        assert!(out.contains("Image end offset: "), "{out}");
        let j = check_json(img, &[], 0);
        for k in [
            "check-errors",
            "corruptions",
            "leaks",
            "image-end-offset",
            "total-clusters",
            "allocated-clusters",
            "filename",
            "format",
            "problems",
        ] {
            assert!(j.get(k).is_some(), "no {k} in {j}");
        }
        assert_eq!(j["filename"], p(img));
        assert_eq!(j["corruptions"], 0);
        assert_eq!(j["problems"].as_array().unwrap().len(), 0);
        if let (Some(q), Some("vhdx")) = (qemu(), img.extension().and_then(|e| e.to_str())) {
            let out = Command::new(q)
                .args(["check", "-f", "vhdx", p(img)])
                .output()
                .unwrap();
            assert!(
                out.status.success(),
                "qemu-img check {}: {}",
                img.display(),
                String::from_utf8_lossy(&out.stdout)
            );
        }
    }
    let j = check_json(&images[0], &[], 0);
    assert_eq!(j["format"], "vhdx");
    assert_eq!(
        (
            j["total-clusters"].as_u64(),
            j["allocated-clusters"].as_u64()
        ),
        (Some(16), Some(2))
    );
    let j = check_json(&images[1], &[], 0);
    assert_eq!(j["format"], "vhd");
}

/// QEMU leaves 4 MiB unused between its BAT and its first block in every
/// VHDX it creates: listed as unused space, not a leak, so a qemu image
/// with data checks clean (exit 0), as qemu-img check says. (The data is
/// written by qemu-io: before the first block, the gap is the file's tail,
/// which a writable open of ours gives back.)
#[test]
fn qemu_made_vhdx_has_unused_space_but_no_leak() {
    let Some(q) = qemu() else { return };
    let dir = tmp();
    let img = dir.path().join("q.vhdx");
    let st = Command::new(q)
        .args(["create", "-q", "-f", "vhdx", p(&img), "64M"])
        .status()
        .unwrap();
    assert!(st.success());
    let st = Command::new("qemu-io")
        .args(["-f", "vhdx", "-c", "write -P 3 0 65536", p(&img)])
        .status()
        .unwrap();
    assert!(st.success());
    let out = ok(&["check", p(&img)]);
    assert!(out.contains("No errors were found on the image."), "{out}");
    assert!(out.contains("Unused space at offset 0x400000"), "{out}");
    let j = check_json(&img, &[], 0);
    assert_eq!(j["leaks"], 0);
    assert_eq!(j["unused-bytes"], 4 * MIB);
    assert_eq!(j["problems"][0]["kind"], "unused");
    assert_eq!(j["problems"][0]["repair"], serde_json::Value::Null);

    // A fresh qemu image written by us: its empty tail is given back at the
    // writable open, the block goes there, and qemu reads it.
    let img = dir.path().join("q2.vhdx");
    let st = Command::new(q)
        .args(["create", "-q", "-f", "vhdx", p(&img), "64M"])
        .status()
        .unwrap();
    assert!(st.success());
    let fresh = fs::metadata(&img).unwrap().len();
    write(&img, 0, &[3u8; 65536]);
    let j = check_json(&img, &[], 0);
    assert_eq!(
        (j["leaks"].as_u64(), j["unused-bytes"].as_u64()),
        (Some(0), Some(0))
    );
    let block = j["cluster-size"].as_u64().unwrap();
    assert_eq!(fs::metadata(&img).unwrap().len(), fresh - 4 * MIB + block);
    qemu_ok(&["check", "-f", "vhdx", p(&img)]);
    let out = Command::new("qemu-io")
        .args([
            "-f",
            "vhdx",
            "-c",
            "read -P 3 0 65536",
            "-c",
            "read -P 0 65536 1M",
            p(&img),
        ])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && !text.contains("Pattern verification failed"),
        "{text}"
    );
}

#[test]
fn bat_entry_past_the_end_of_the_file() {
    let dir = tmp();
    let img = vhdx_with_data(dir.path(), "a.vhdx");
    let bat = vhdx_bat_offset(&img);
    // Block 2's entry: FULLY_PRESENT at 1 GiB.
    let at = bat + 2 * 8;
    write_at(&img, at, &((1u64 << 30) | 6).to_le_bytes());
    let out = status(2, &["check", p(&img)]);
    assert!(
        out.contains(&format!("VHDX BAT at offset {at:#x}")),
        "{out}"
    );
    assert!(
        out.contains("past the end of the file") && out.contains("0x40000000"),
        "{out}"
    );
    assert!(out.contains("1 errors were found on the image."), "{out}");
    let j = check_json(&img, &[], 2);
    assert_eq!(j["corruptions"], 1);
    assert_eq!(j["problems"][0]["offset"], at);
    assert_eq!(j["problems"][0]["kind"], "corruption");
    // -r all cannot repair it without losing data: still 2.
    status(2, &["check", "-r", "all", p(&img)]);

    // The same for a VHD.
    let img = vhd_with_data(dir.path(), "a.vhd");
    let mut h = [0u8; 8];
    fs::File::open(&img)
        .unwrap()
        .read_exact_at(&mut h, 512 + 16)
        .unwrap();
    let table = u64::from_be_bytes(h);
    write_at(&img, table + 4, &0x0100_0000u32.to_be_bytes());
    let out = status(2, &["check", p(&img)]);
    assert!(
        out.contains(&format!("VHD BAT at offset {:#x}", table + 4)),
        "{out}"
    );
    assert!(out.contains("0x200000000"), "{out}");
}

#[test]
fn overlapping_bat_entries() {
    let dir = tmp();
    let img = vhdx_with_data(dir.path(), "o.vhdx");
    let bat = vhdx_bat_offset(&img);
    let e0 = read_u64(&img, bat);
    assert_eq!(e0 & 7, 6, "block 0 is FULLY_PRESENT");
    write_at(&img, bat + 5 * 8, &e0.to_le_bytes());
    let out = status(2, &["check", p(&img)]);
    assert!(
        out.contains("block 5") && out.contains("overlaps block 0"),
        "{out}"
    );
    assert!(out.contains(&format!("at offset {:#x}", bat + 40)), "{out}");
}

#[test]
fn leaked_space_is_reclaimed_without_losing_data() {
    let dir = tmp();
    // VHDX: 2 MiB appended to the file.
    let img = vhdx_with_data(dir.path(), "l.vhdx");
    let raw = raw_copy(&img);
    let len = fs::metadata(&img).unwrap().len();
    let f = fs::OpenOptions::new().write(true).open(&img).unwrap();
    f.write_all_at(&pattern(2 * MIB as usize, 9), len).unwrap();
    drop(f);
    let out = status(3, &["check", p(&img)]);
    assert!(
        out.contains("leaked clusters were found on the image."),
        "{out}"
    );
    assert!(
        out.contains(&format!("Leaked space at offset {len:#x}")),
        "{out}"
    );
    let j = check_json(&img, &[], 3);
    assert_eq!(j["leaked-bytes"], 2 * MIB);
    let out = status(0, &["check", "-r", "leaks", p(&img)]);
    assert!(
        out.contains("The following inconsistencies were found and repaired"),
        "{out}"
    );
    assert!(out.contains("No errors were found on the image."), "{out}");
    assert_eq!(fs::metadata(&img).unwrap().len(), len);
    ok(&["check", p(&img)]);
    same(&img, &raw);

    // VHD: a spare block between the last block and the footer.
    let img = vhd_with_data(dir.path(), "l.vhd");
    let raw = raw_copy(&img);
    let mut bytes = fs::read(&img).unwrap();
    let footer = bytes.split_off(bytes.len() - 512);
    bytes.extend(vec![0x77; 2 * MIB as usize + 512]);
    bytes.extend(footer);
    fs::write(&img, &bytes).unwrap();
    let j = check_json(&img, &[], 3);
    assert_eq!(j["leaks"], 1);
    assert_eq!(j["problems"][0]["repair"], "leaks");
    let j = check_json(&img, &["-r", "leaks"], 0);
    assert_eq!(j["leaks-fixed"], 1);
    assert_eq!(j["leaks"], 0);
    same(&img, &raw);
}

#[test]
fn damaged_vhd_footer_is_restored_by_repair_all() {
    let dir = tmp();
    let img = vhd_with_data(dir.path(), "f.vhd");
    let raw = raw_copy(&img);
    let good = fs::read(&img).unwrap();
    let len = good.len() as u64;
    write_at(&img, len - 512 + 40, b"XXXX");
    let out = status(2, &["check", p(&img)]);
    assert!(out.contains("VHD footer at offset"), "{out}");
    assert!(out.contains("repair with -r all"), "{out}");
    // Leaks-only repair does not touch it.
    status(2, &["check", "-r", "leaks", p(&img)]);
    let out = status(0, &["check", "-r", "all", p(&img)]);
    assert!(out.contains("1 corruptions"), "{out}");
    assert!(out.contains("No errors were found on the image."), "{out}");
    assert_eq!(fs::read(&img).unwrap(), good);
    same(&img, &raw);

    // The copy at offset 0, damaged, is restored from the footer.
    write_at(&img, 20, b"\xff\xff");
    let j = check_json(&img, &[], 2);
    assert_eq!(j["problems"][0]["offset"], 64); // its checksum
    assert!(j["problems"][0]["message"]
        .as_str()
        .unwrap()
        .contains("copy at offset 0"));
    let j = check_json(&img, &["-r", "all"], 0);
    assert_eq!(j["corruptions-fixed"], 1);
    assert_eq!(fs::read(&img).unwrap(), good);
}

#[test]
fn dirty_log_is_an_error_until_replayed() {
    let dir = tmp();
    let img = dir.path().join("dirty.vhdx");
    let data = dirty_log_vhdx(&img);
    let out = status(2, &["check", p(&img)]);
    assert!(out.contains("VHDX log at offset 0x100000"), "{out}");
    assert!(out.contains("needs replay"), "{out}");
    let j = check_json(&img, &[], 2);
    assert_eq!(j["problems"][0]["repair"], "all");
    let before = fs::read(&img).unwrap();
    // -r leaks must not replay.
    status(2, &["check", "-r", "leaks", p(&img)]);
    assert_eq!(fs::read(&img).unwrap(), before);
    let out = status(0, &["check", "-r", "all", p(&img)]);
    assert!(out.contains("1 corruptions"), "{out}");
    let info = ok(&["info", p(&img)]);
    assert!(info.contains("log: clean"), "{info}");
    let got = vdisk()
        .args(["read", p(&img), &(3 * MIB).to_string(), "64K"])
        .output()
        .unwrap();
    assert!(got.status.success());
    assert_eq!(got.stdout, data);
    if let Some(q) = qemu() {
        let out = Command::new(q)
            .args(["check", "-f", "vhdx", p(&img)])
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stdout)
        );
    }
}

#[test]
fn check_that_cannot_run_exits_1() {
    let dir = tmp();
    let missing = dir.path().join("missing.vhdx");
    let out = run(&["check", p(&missing)]);
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("missing.vhdx"));
    let raw = dir.path().join("r.raw");
    ok(&["create", "-f", "raw", p(&raw), "1M"]);
    let out = run(&["check", p(&raw)]);
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("does not support checks"));
    // A forced format that is not the file's.
    let out = run(&["check", "-f", "vhdx", p(&raw)]);
    assert_eq!(out.status.code(), Some(1));
    // A differencing disk whose parent is gone.
    let base = dir.path().join("base.vhdx");
    let child = dir.path().join("child.avhdx");
    ok(&["create", "-f", "vhdx", p(&base), "8M"]);
    ok(&["create", "-b", p(&base), p(&child)]);
    ok(&["check", p(&child)]);
    fs::remove_file(&base).unwrap();
    let j = check_json(&child, &[], 1);
    assert_eq!(j["check-errors"], 1);
    assert_eq!(j["problems"][0]["kind"], "check-error");
}

/// (start, length, data, zero, offset) of each entry of a JSON map.
fn map_entries(v: &serde_json::Value) -> Vec<(u64, u64, bool, bool, Option<u64>)> {
    v.as_array()
        .expect("array")
        .iter()
        .map(|e| {
            (
                e["start"].as_u64().unwrap(),
                e["length"].as_u64().unwrap(),
                e["data"].as_bool().unwrap(),
                e["zero"].as_bool().unwrap(),
                e["offset"].as_u64(),
            )
        })
        .collect()
}

fn our_map(img: &Path) -> serde_json::Value {
    serde_json::from_str(&ok(&["map", "--output", "json", p(img)])).expect("map JSON")
}

fn qemu_map(q: &str, fmt: &str, img: &Path) -> serde_json::Value {
    let out = Command::new(q)
        .args(["map", "-f", fmt, "--output", "json", p(img)])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

#[test]
fn map_agrees_with_qemu_img() {
    let Some(q) = qemu() else { return };
    let dir = tmp();
    // A VHD made and written by qemu: qemu-img map reports its blocks
    // (qemu's VHDX driver has no block status, and maps a whole VHDX as data).
    let img = dir.path().join("q.vhd");
    let st = Command::new(q)
        .args(["create", "-q", "-f", "vpc", p(&img), "16M"])
        .status()
        .unwrap();
    assert!(st.success());
    for (off, len) in [("0", "4k"), ("4M", "1M"), ("6M", "2M"), ("12M", "512")] {
        let st = Command::new("qemu-io")
            .args([
                "-f",
                "vpc",
                "-c",
                &format!("write -P 0x5a {off} {len}"),
                p(&img),
            ])
            .stdout(Stdio::null())
            .status();
        assert!(st.is_ok_and(|s| s.success()), "qemu-io write");
    }
    let ours = our_map(&img);
    assert_eq!(map_entries(&ours), map_entries(&qemu_map(q, "vpc", &img)));
    assert!(
        ours[0]["depth"] == 0 && ours[0]["filename"] == p(&img),
        "{ours}"
    );
    // And a VHD written by vdisk, read by qemu.
    let img = vhd_with_data(dir.path(), "v.vhd");
    assert_eq!(
        map_entries(&our_map(&img)),
        map_entries(&qemu_map(q, "vpc", &img))
    );

    // A VHDX made by qemu: the same extents cover the disk, and what we
    // call data qemu calls data too.
    let img = dir.path().join("q.vhdx");
    let st = Command::new(q)
        .args([
            "create",
            "-q",
            "-f",
            "vhdx",
            "-o",
            "block_size=1M",
            p(&img),
            "8M",
        ])
        .status()
        .unwrap();
    assert!(st.success());
    let st = Command::new("qemu-io")
        .args(["-f", "vhdx", "-c", "write -P 0x11 1M 2M", p(&img)])
        .stdout(Stdio::null())
        .status();
    assert!(st.is_ok_and(|s| s.success()));
    let ours = map_entries(&our_map(&img));
    let theirs = map_entries(&qemu_map(q, "vhdx", &img));
    let total = |v: &[(u64, u64, bool, bool, Option<u64>)]| v.iter().map(|e| e.1).sum::<u64>();
    assert_eq!(total(&ours), total(&theirs));
    assert_eq!(total(&ours), 8 * MIB);
    let data_at = |v: &[(u64, u64, bool, bool, Option<u64>)], x: u64| {
        v.iter().any(|e| e.2 && e.0 <= x && x < e.0 + e.1)
    };
    for e in &ours {
        if e.2 {
            assert!(data_at(&theirs, e.0), "{ours:?} vs {theirs:?}");
        }
    }
    assert!(
        ours.iter().any(|e| e.2 && e.0 == MIB && e.1 == 2 * MIB),
        "{ours:?}"
    );
    // Our data extents hold exactly what qemu reads there.
    let raw = dir.path().join("q.raw");
    let st = Command::new(q)
        .args(["convert", "-f", "vhdx", "-O", "raw", p(&img), p(&raw)])
        .status()
        .unwrap();
    assert!(st.success());
    let raw_bytes = fs::read(&raw).unwrap();
    let file = fs::read(&img).unwrap();
    for (start, len, data, _, off) in ours {
        let (s, l) = (start as usize, len as usize);
        if data {
            let o = off.unwrap() as usize;
            assert_eq!(&file[o..o + l], &raw_bytes[s..s + l]);
        } else {
            assert!(raw_bytes[s..s + l].iter().all(|&b| b == 0));
        }
    }
}

#[test]
fn map_of_a_chain_shows_each_layer() {
    let dir = tmp();
    let base = dir.path().join("base.vhdx");
    let child = dir.path().join("child.avhdx");
    create_vhdx_1m(&base, "8M");
    write(&base, 0, &pattern(2 * MIB as usize, 1));
    ok(&[
        "create",
        "-f",
        "vhdx",
        "-o",
        "block_size=1M",
        "-b",
        p(&base),
        p(&child),
    ]);
    write(&child, MIB, &pattern(MIB as usize, 2));
    let m = our_map(&child);
    let v = m.as_array().unwrap();
    let brief: Vec<(u64, u64, u64, bool, bool)> = v
        .iter()
        .map(|e| {
            (
                e["start"].as_u64().unwrap(),
                e["length"].as_u64().unwrap(),
                e["depth"].as_u64().unwrap(),
                e["present"].as_bool().unwrap(),
                e["data"].as_bool().unwrap(),
            )
        })
        .collect();
    assert_eq!(
        brief,
        vec![
            (0, MIB, 1, true, true),
            (MIB, MIB, 0, true, true),
            (2 * MIB, 6 * MIB, 1, false, false),
        ],
        "{m}"
    );
    assert_eq!(v[0]["filename"], p(&base));
    assert_eq!(v[1]["filename"], p(&child));
    let human = ok(&["map", p(&child)]);
    let lines: Vec<&str> = human.lines().collect();
    assert_eq!(
        lines[0],
        "Offset          Length          Mapped to       File"
    );
    assert_eq!(lines.len(), 3, "{human}");
    assert!(
        lines[1].starts_with("0               0x100000        0x") && lines[1].ends_with(p(&base)),
        "{human}"
    );
    assert!(
        lines[2].starts_with("0x100000        0x100000        0x") && lines[2].ends_with(p(&child)),
        "{human}"
    );

    // A VHD chain too.
    let base = dir.path().join("base.vhd");
    let child = dir.path().join("child.vhd");
    ok(&["create", "-f", "vhd", p(&base), "8M"]);
    write(&base, 0, &pattern(4096, 3));
    ok(&["create", "-b", p(&base), p(&child)]);
    write(&child, 2 * MIB, &pattern(4096, 4));
    let m = our_map(&child);
    let depths: Vec<u64> = m
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["depth"].as_u64().unwrap())
        .collect();
    assert!(depths.contains(&0) && depths.contains(&1), "{m}");
}

#[test]
fn completions_and_man_pages() {
    for shell in ["bash", "zsh", "fish", "elvish", "powershell"] {
        let out = ok(&["completions", shell]);
        assert!(out.len() > 1000, "{shell}");
        for word in ["convert", "check", "map"] {
            assert!(out.contains(word), "{shell} completion lacks {word}");
        }
    }
    status(1, &["completions", "tcsh"]);
    let page = ok(&["man"]);
    assert!(
        page.starts_with(".ie") || page.contains(".TH vdisk 1"),
        "{page}"
    );
    assert!(page.contains("convert") && page.contains("check"), "{page}");
    let dir = tmp();
    let out = ok(&["man", "--dir", p(dir.path())]);
    for page in ["vdisk.1", "vdisk-check.1", "vdisk-map.1", "vdisk-convert.1"] {
        let f = dir.path().join(page);
        assert!(out.contains(p(&f)), "{out}");
        assert!(fs::metadata(&f).unwrap().len() > 100, "{page}");
    }
    let check = fs::read_to_string(dir.path().join("vdisk-check.1")).unwrap();
    assert!(check.contains("leaks"), "{check}");
}

/// Spawn `vdisk args`, close the read end of its stdout at once (or after
/// reading `keep` bytes), and return its exit status and stderr.
fn with_closed_stdout(args: &[&str], keep: usize) -> (Option<i32>, String) {
    let mut child = vdisk()
        .args(args)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut out = child.stdout.take().unwrap();
    if keep > 0 {
        let mut buf = vec![0u8; keep];
        out.read_exact(&mut buf).unwrap();
    }
    drop(out);
    let mut err = String::new();
    child
        .stderr
        .take()
        .unwrap()
        .read_to_string(&mut err)
        .unwrap();
    (child.wait().unwrap().code(), err)
}

#[test]
fn closed_stdout_is_a_quiet_exit() {
    let dir = tmp();
    // Thousands of map entries: far more than a pipe holds.
    let img = dir.path().join("many.vhdx");
    {
        let mut o = vhdx::CreateOptions::new(4096 * MIB);
        o.block_size = MIB as u32;
        let d = vhdx::Vhdx::create(&img, &o, false).unwrap();
        for b in (0..4096).step_by(2) {
            d.write_at(&[1; 512], b * MIB).unwrap();
        }
        d.close().unwrap();
    }
    for args in [
        &["map", "--output", "json", p(&img)][..],
        &["map", p(&img)],
        &["info", p(&img)],
        &["info", "--output", "json", p(&img)],
        &["check", p(&img)],
        &["read", p(&img), "0", "64M"],
        &["completions", "bash"],
        &["man"],
    ] {
        for keep in [0, 10] {
            let (code, err) = with_closed_stdout(args, keep);
            assert!(!err.contains("panicked"), "vdisk {args:?}: {err}");
            assert!(!err.contains("Broken pipe"), "vdisk {args:?}: {err}");
            assert!(
                matches!(code, Some(0 | 141)),
                "vdisk {args:?}: {code:?} {err}"
            );
        }
    }
}
