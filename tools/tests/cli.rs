//! End-to-end tests of the `vdisk` binary.

// Test images and buffers are small: their offsets and sizes fit any integer type.
#![allow(clippy::cast_possible_truncation)]

mod common;
use common::*;

use std::fs;
use std::io::Write;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

const MIB: u64 = 1 << 20;

fn info_json(path: &Path) -> serde_json::Value {
    serde_json::from_str(&ok(&["info", "--output", "json", p(path)])).expect("valid JSON")
}

/// A sparse raw file of `size` bytes with `data` written at each offset.
fn raw_file(path: &Path, size: u64, data: &[(u64, &[u8])]) {
    let f = fs::File::create(path).unwrap();
    f.set_len(size).unwrap();
    for (off, bytes) in data {
        f.write_all_at(bytes, *off).unwrap();
    }
}

#[test]
fn create_and_info_human_and_json() {
    let dir = tmp();
    let img = dir.path().join("a.vhdx");
    ok(&["create", "-f", "vhdx", p(&img), "64M"]);

    let human = ok(&["info", p(&img)]);
    for want in [
        "file format: vhdx",
        "subformat: dynamic",
        "virtual size: 64 MiB (67108864 bytes)",
        "block size: 32 MiB (33554432 bytes)",
        "logical sector size: 512",
        "physical sector size: 4096",
        "allocated bytes: 0 B (0 bytes)",
        "log: clean",
        "creator: vdisk",
        "virtual disk id: ",
        "data write guid: ",
    ] {
        assert!(human.contains(want), "missing {want:?} in:\n{human}");
    }

    let j = info_json(&img);
    let keys: Vec<&str> = j.as_object().unwrap().keys().map(|k| k.as_str()).collect();
    for k in [
        "filename",
        "format",
        "subformat",
        "virtual-size",
        "cluster-size",
        "logical-sector-size",
        "physical-sector-size",
        "file-size",
        "actual-size",
        "allocated-bytes",
        "log",
        "log-entries",
        "creator",
        "virtual-disk-id",
        "data-write-guid",
        "parent",
        "backing-filename",
        "full-backing-filename",
        "truncated-blocks",
        "lost-bat-entries",
        "vhd",
    ] {
        assert!(keys.contains(&k), "missing key {k} in {j}");
    }
    assert_eq!(keys.len(), 21, "{keys:?}");
    // One style: every key of every object kebab-case.
    fn kebab(v: &serde_json::Value) -> bool {
        match v {
            serde_json::Value::Object(o) => o.iter().all(|(k, v)| {
                !k.contains('_') && !k.chars().any(|c| c.is_ascii_uppercase()) && kebab(v)
            }),
            serde_json::Value::Array(a) => a.iter().all(kebab),
            _ => true,
        }
    }
    assert!(kebab(&j), "{j}");
    // What the human form shows, the JSON has.
    let guid = j["data-write-guid"].as_str().unwrap();
    assert!(
        human.contains(&format!("data write guid: {guid}")),
        "{human}"
    );
    assert_eq!(j["log-entries"], 0);
    let du = std::os::unix::fs::MetadataExt::blocks(&fs::metadata(&img).unwrap()) * 512;
    assert_eq!(j["actual-size"], du);
    assert!(
        human
            .lines()
            .any(|l| l.starts_with("disk size: ") && l.ends_with(&format!("({du} bytes)"))),
        "{human}"
    );
    assert_eq!(j["filename"], p(&img));
    assert_eq!(j["format"], "vhdx");
    assert_eq!(j["subformat"], "dynamic");
    assert_eq!(j["virtual-size"], 64 * MIB);
    assert_eq!(j["cluster-size"], 32 * MIB);
    assert_eq!(j["logical-sector-size"], 512);
    assert_eq!(j["physical-sector-size"], 4096);
    assert_eq!(j["file-size"], fs::metadata(&img).unwrap().len());
    assert_eq!(j["allocated-bytes"], 0);
    assert_eq!(j["log"], "clean");
    assert!(j["creator"].as_str().unwrap().starts_with("vdisk"));
    assert_eq!(j["virtual-disk-id"].as_str().unwrap().len(), 36);
    assert!(j["parent"].is_null());
}

#[test]
fn create_and_info_raw() {
    let dir = tmp();
    let img = dir.path().join("a.raw");
    ok(&["create", "-f", "raw", p(&img), "10M"]);
    assert_eq!(fs::metadata(&img).unwrap().len(), 10 * MIB);
    let j = info_json(&img);
    assert_eq!(j["format"], "raw");
    assert_eq!(j["virtual-size"], 10 * MIB);
    assert_eq!(j["file-size"], 10 * MIB);
    assert!(j["allocated-bytes"].as_u64().unwrap() < MIB, "sparse: {j}");
    assert!(j["parent"].is_null());
    let human = ok(&["info", p(&img)]);
    assert!(human.contains("file format: raw"), "{human}");
}

#[test]
fn create_with_each_option() {
    let dir = tmp();
    let img = dir.path().join("o.vhdx");
    let cases: &[(&str, &str, serde_json::Value)] = &[
        ("subformat=fixed", "subformat", "fixed".into()),
        ("subformat=dynamic", "subformat", "dynamic".into()),
        ("block_size=1M", "cluster-size", (MIB).into()),
        ("block_size=256MiB", "cluster-size", (256 * MIB).into()),
        (
            "logical_sector_size=4096",
            "logical-sector-size",
            4096.into(),
        ),
        ("logical_sector_size=4k", "logical-sector-size", 4096.into()),
        (
            "physical_sector_size=512",
            "physical-sector-size",
            512.into(),
        ),
    ];
    for (opt, key, want) in cases {
        ok(&["create", "-f", "vhdx", "-o", opt, p(&img), "64M"]);
        let j = info_json(&img);
        assert_eq!(&j[*key], want, "-o {opt}: {j}");
    }
    // log_size is not in the info output: check the file grew by the extra log.
    ok(&["create", "-f", "vhdx", p(&img), "64M"]);
    let small = fs::metadata(&img).unwrap().len();
    ok(&["create", "-f", "vhdx", "-o", "log_size=8M", p(&img), "64M"]);
    assert_eq!(fs::metadata(&img).unwrap().len(), small + 7 * MIB);

    // Several options at once, and -o repeated.
    ok(&[
        "create",
        "-f",
        "vhdx",
        "-o",
        "subformat=fixed,block_size=2M",
        "-o",
        "logical_sector_size=512,physical_sector_size=4096,log_size=2M",
        p(&img),
        "16M",
    ]);
    let j = info_json(&img);
    assert_eq!(j["subformat"], "fixed");
    assert_eq!(j["cluster-size"], 2 * MIB);
    assert_eq!(j["allocated-bytes"], 16 * MIB);
}

#[test]
fn create_rejects_bad_options() {
    let dir = tmp();
    let img = dir.path().join("bad.vhdx");
    // (option, what the error must say)
    for (opt, want) in [
        ("block_size=3M", "block size 3145728"),
        ("block_size=512M", "block size"),
        ("colour=blue", "unknown option 'colour'"),
        ("subformat=sparse", "'sparse'"),
        ("logical_sector_size=1000", "1000"),
        ("log_size=1000K", "log size"),
        ("block_size=lots", "'lots'"),
    ] {
        let e = fails(1, &["create", "-f", "vhdx", "-o", opt, p(&img), "64M"]);
        assert!(e.contains(want), "{opt}: {e}");
        if opt == "block_size=3M" {
            assert!(e.contains("bad.vhdx"), "{e}");
        }
    }
    let e = fails(
        1,
        &["create", "-f", "raw", "-o", "block_size=1M", p(&img), "64M"],
    );
    assert!(e.contains("'block_size'"), "{e}");
    let e = fails(1, &["create", "-f", "vhdx", p(&img), "12Q"]);
    assert!(e.contains("'12Q'"), "{e}");
    let e = fails(
        1,
        &["create", "-f", "vhd", "-o", "log_size=1M", p(&img), "64M"],
    );
    assert!(
        e.contains("unknown option 'log_size' for format vhd"),
        "{e}"
    );
    let e = fails(1, &["create", "-f", "qcow2", p(&img), "64M"]);
    assert!(e.contains("qcow2"), "{e}");
}

#[test]
fn create_overwrites_like_qemu_img() {
    let dir = tmp();
    let img = dir.path().join("again.vhdx");
    ok(&["create", "-f", "vhdx", p(&img), "64M"]);
    ok(&["create", "-f", "vhdx", p(&img), "128M"]);
    assert_eq!(info_json(&img)["virtual-size"], 128 * MIB);
}

#[test]
fn write_read_round_trip_unaligned() {
    let dir = tmp();
    for (fmt, opts) in [
        ("vhdx", ""),
        ("raw", ""),
        ("vhd", "subformat=dynamic,block_size=1M"),
        ("vpc", "subformat=fixed"),
        ("vhd", "azure=on"),
    ] {
        let img = dir.path().join(format!("rw.{fmt}"));
        ok(&["create", "-f", fmt, "-o", opts, p(&img), "64M"]);
        let size = info_json(&img)["virtual-size"].as_u64().unwrap();
        let data = pattern(100_000, 7);
        let input = dir.path().join("input.bin");
        fs::write(&input, &data).unwrap();
        // From a file, straddling the 32 MiB block boundary at an odd offset.
        let at = 32 * MIB - 12_345;
        ok(&["write", p(&img), &at.to_string(), p(&input)]);
        let back = vdisk()
            .args(["read", p(&img), &at.to_string(), "100000"])
            .output()
            .unwrap();
        assert!(back.status.success());
        assert_eq!(back.stdout, data, "{fmt} {opts}");
        // From stdin, with a size suffix for the offset.
        let mut child = vdisk()
            .args(["write", p(&img), "1K"])
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .spawn()
            .unwrap();
        child.stdin.take().unwrap().write_all(b"hello").unwrap();
        assert!(child.wait().unwrap().success());
        let back = vdisk()
            .args(["read", p(&img), "1023", "7"])
            .output()
            .unwrap();
        assert_eq!(back.stdout, b"\0hello\0", "{fmt} {opts}");
        // Out of range.
        let e = fails(1, &["read", p(&img), &size.to_string(), "1"]);
        assert!(e.contains(p(&img)), "{e}");
        let e = fails(
            1,
            &["write", p(&img), &(size - 50_000).to_string(), p(&input)],
        );
        assert!(e.contains("beyond the virtual size"), "{e}");
        let e = fails(1, &["read", p(&img), "1X", "1"]);
        assert!(e.contains("'1X'"), "{e}");
    }
    let img = dir.path().join("rw.vhdx");
    assert_eq!(info_json(&img)["log"], "clean");
    assert_eq!(info_json(&img)["allocated-bytes"], 64 * MIB);
}

#[test]
fn convert_round_trip_raw_vhdx_raw() {
    let dir = tmp();
    let src = dir.path().join("src.raw");
    let a = pattern(3 * MIB as usize + 777, 1);
    let b = pattern(4096, 2);
    raw_file(
        &src,
        96 * MIB,
        &[(5 * MIB + 3, &a), (40 * MIB, &b), (96 * MIB - 1, &[9])],
    );
    let mid = dir.path().join("mid.vhdx");
    let back = dir.path().join("back.raw");
    ok(&["convert", "-O", "vhdx", p(&src), p(&mid)]);
    ok(&[
        "convert",
        "-p",
        "-f",
        "vhdx",
        "-O",
        "raw",
        p(&mid),
        p(&back),
    ]);
    assert_eq!(
        ok(&["compare", p(&src), p(&mid)]).trim(),
        "Images are identical."
    );
    ok(&["compare", p(&src), p(&back)]);
    ok(&["compare", "-f", "raw", "-F", "vhdx", p(&src), p(&mid)]);
    assert!(
        fs::read(&src).unwrap() == fs::read(&back).unwrap(),
        "files differ"
    );
    let j = info_json(&mid);
    assert_eq!(j["virtual-size"], 96 * MIB);
    assert_eq!(j["log"], "clean");
    // Blocks 0 and 1 (data at 5-8 MiB and 40 MiB) and block 2 (last byte).
    assert_eq!(j["allocated-bytes"], 96 * MIB);
    // vhdx -> vhdx with other options.
    let small = dir.path().join("small.vhdx");
    ok(&[
        "convert",
        "-O",
        "vhdx",
        "-o",
        "block_size=1M",
        p(&mid),
        p(&small),
    ]);
    ok(&["compare", p(&small), p(&src)]);
    assert_eq!(info_json(&small)["allocated-bytes"], 4 * MIB + MIB + MIB);
}

#[test]
fn convert_skips_zeros() {
    let dir = tmp();
    let src = dir.path().join("sparse.raw");
    let data = pattern(MIB as usize, 3);
    raw_file(&src, 64 * MIB, &[(MIB, &data)]);
    // Explicit zeros are skipped too, not only holes.
    fs::OpenOptions::new()
        .write(true)
        .open(&src)
        .unwrap()
        .write_all_at(&vec![0u8; 8 * MIB as usize], 40 * MIB)
        .unwrap();
    let dst = dir.path().join("sparse.vhdx");
    ok(&["convert", "-O", "vhdx", p(&src), p(&dst)]);
    let j = info_json(&dst);
    let block = j["cluster-size"].as_u64().unwrap();
    assert!(j["allocated-bytes"].as_u64().unwrap() <= block, "{j}");
    ok(&["compare", p(&src), p(&dst)]);
    // And back to raw: the target file stays sparse.
    let back = dir.path().join("back.raw");
    ok(&["convert", "-O", "raw", p(&dst), p(&back)]);
    let j = info_json(&back);
    assert_eq!(j["virtual-size"], 64 * MIB);
    assert!(j["allocated-bytes"].as_u64().unwrap() <= 2 * MIB, "{j}");
    assert!(fs::read(&src).unwrap() == fs::read(&back).unwrap());
}

#[test]
fn convert_errors() {
    let dir = tmp();
    let src = dir.path().join("s.raw");
    raw_file(&src, MIB, &[]);
    let e = fails(1, &["convert", "-O", "vhdx", p(&src), p(&src)]);
    assert!(e.contains("same file"), "{e}");
    let dst = dir.path().join("d.vhdx");
    let e = fails(
        1,
        &["convert", "-O", "vhdx", "-o", "nope=1", p(&src), p(&dst)],
    );
    assert!(e.contains("'nope'"), "{e}");
    let e = fails(
        1,
        &["convert", "-O", "vpc", "-o", "nope=1", p(&src), p(&dst)],
    );
    assert!(
        e.contains(
            "unknown option 'nope' for format vhd (supported: subformat, block_size, azure)"
        ),
        "{e}"
    );
    let missing = dir.path().join("missing.raw");
    let e = fails(1, &["convert", "-O", "vhdx", p(&missing), p(&dst)]);
    assert!(e.contains(p(&missing)), "{e}");
    // A source size VHDX cannot hold: the error names the target, no file left.
    let odd = dir.path().join("odd.raw");
    raw_file(&odd, 1000, &[]);
    let e = fails(1, &["convert", "-O", "vhdx", p(&odd), p(&dst)]);
    assert!(e.contains(p(&dst)), "{e}");
    assert!(!dst.exists());
}

#[test]
fn compare_exit_codes() {
    let dir = tmp();
    let a = dir.path().join("a.raw");
    let b = dir.path().join("b.vhdx");
    raw_file(&a, 8 * MIB, &[(MIB, b"abc")]);
    ok(&["convert", "-O", "vhdx", "-o", "block_size=1M", p(&a), p(&b)]);
    let out = run(&["compare", p(&a), p(&b)]);
    assert_eq!(out.status.code(), Some(0));

    // One byte differs, in a block only the raw image has data in.
    ok(&["write", p(&b), "3M", "/dev/null"]);
    let ff = dir.path().join("ff");
    fs::write(&ff, [0xff]).unwrap();
    ok(&["write", p(&a), "5242887", p(&ff)]);
    let out = run(&["compare", p(&a), p(&b)]);
    assert_eq!(out.status.code(), Some(1));
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        "Content mismatch at offset 5242887!"
    );
    // Differing where both have data.
    ok(&["write", p(&b), "5242887", p(&ff)]);
    ok(&["compare", p(&a), p(&b)]);
    ok(&["write", p(&b), "1048577", p(&ff)]);
    let out = run(&["compare", p(&b), p(&a)]);
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stdout).contains("offset 1048577!"));

    // Sizes differ: the common part is compared first, and a difference
    // there is reported without the size warning (as qemu-img does); -s
    // stops at the sizes.
    let c = dir.path().join("c.raw");
    raw_file(&c, 4 * MIB, &[]);
    let out = run(&["compare", p(&a), p(&c)]);
    assert_eq!(out.status.code(), Some(1));
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        "Content mismatch at offset 1048576!"
    );
    let out = run(&["compare", "-s", p(&a), p(&c)]);
    assert_eq!(out.status.code(), Some(1));
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        "Strict mode: Image size mismatch!"
    );

    // Errors: exit 2.
    let missing = dir.path().join("missing.vhdx");
    let e = fails(2, &["compare", p(&a), p(&missing)]);
    assert!(e.contains(p(&missing)), "{e}");
    fails(2, &["compare", p(&a)]);
    fails(2, &["compare", "-f", "vhdx", p(&a), p(&b)]);
}

#[test]
fn errors_name_the_file() {
    let dir = tmp();
    let missing = dir.path().join("nonexistent.vhdx");
    for args in [
        vec!["info", p(&missing)],
        vec!["read", p(&missing), "0", "1"],
        vec!["write", p(&missing), "0", "/dev/null"],
    ] {
        let e = fails(1, &args);
        assert!(e.starts_with("vdisk: "), "{e}");
        assert!(e.contains(p(&missing)), "{e}");
        assert!(e.contains("No such file"), "{e}");
        assert_eq!(e.matches("No such file").count(), 1, "{e}");
    }

    // Garbage read as VHDX (forced, or because it claims to be one).
    let garbage = dir.path().join("garbage.bin");
    fs::write(&garbage, pattern(1 << 20, 5)).unwrap();
    let e = fails(1, &["info", "-f", "vhdx", p(&garbage)]);
    assert!(e.contains(p(&garbage)), "{e}");
    assert!(e.contains("vhdxfile"), "{e}");
    let fake = dir.path().join("fake.vhdx");
    let mut bytes = b"vhdxfile".to_vec();
    bytes.extend(pattern(1 << 20, 6));
    fs::write(&fake, bytes).unwrap();
    let e = fails(1, &["info", p(&fake)]);
    assert!(e.contains(p(&fake)), "{e}");
    assert!(e.contains("corrupt"), "{e}");
    // Without -f, garbage is a raw image.
    assert_eq!(info_json(&garbage)["format"], "raw");

    // Something that claims to be a VHD but is not one.
    let vhd = dir.path().join("disk.vhd");
    fs::write(&vhd, b"conectix and more").unwrap();
    let e = fails(1, &["info", p(&vhd)]);
    assert!(e.contains(p(&vhd)), "{e}");
    assert!(e.contains("too short to hold a VHD footer"), "{e}");
    let e = fails(1, &["info", "-f", "vpc", p(&garbage)]);
    assert!(e.contains(p(&garbage)), "{e}");
    assert!(e.contains("VHD footer"), "{e}");
}

#[test]
fn every_subcommand_help_has_an_example() {
    for cmd in ["info", "create", "convert", "compare", "read", "write"] {
        let out = ok(&[cmd, "--help"]);
        assert!(out.contains("Example"), "{cmd}: {out}");
        assert!(out.contains(&format!("vdisk {cmd} ")), "{cmd}: {out}");
        assert!(
            out.contains(".vhd ") || out.contains(".vhd\n"),
            "{cmd}: no VHD example in {out}"
        );
    }
    let out = ok(&["--help"]);
    assert!(out.contains("-O vhd"), "{out}");
    let out = ok(&["create", "--help"]);
    assert!(out.contains("azure=on"), "{out}");
    fails(1, &["frobnicate"]);
}

#[test]
fn info_dirty_log_is_replayed_in_memory() {
    use disk::VirtualDisk;
    let dir = tmp();
    let img = dir.path().join("dirty.vhdx");
    let work = dir.path().join("work.vhdx");
    let d = vhdx::Vhdx::create(&work, &vhdx::CreateOptions::new(64 * MIB), false).unwrap();
    d.write_at(b"data", MIB).unwrap();
    d.flush().unwrap();
    // Crash: no clean close, the log still holds the BAT update. (A copy:
    // the forgotten handle keeps its image lock for this process's life,
    // where a real crash would release it.)
    std::fs::copy(&work, &img).unwrap();
    std::mem::forget(d);
    let human = ok(&["info", p(&img)]);
    assert!(human.contains("log: dirty ("), "{human}");
    assert!(human.contains("replayed in memory)"), "{human}");
    let j = info_json(&img);
    assert_eq!(j["log"], "dirty");
    assert_eq!(j["allocated-bytes"], 32 * MIB);
    let out = vdisk().args(["read", p(&img), "1M", "4"]).output().unwrap();
    assert_eq!(out.stdout, b"data");
}

#[test]
fn info_differencing_disk_without_parent() {
    use vhdx::parent_locator::{ParentLocator, VHDX_PARENT_LOCATOR_TYPE};
    let dir = tmp();
    let img = dir.path().join("child.vhdx");
    vhdx::Vhdx::create(&img, &vhdx::CreateOptions::new(64 * MIB), false)
        .unwrap()
        .close()
        .unwrap();
    // Turn it into a differencing disk whose parent does not exist.
    let info = vhdx::Vhdx::inspect(&img).unwrap();
    let region = info
        .regions
        .iter()
        .find(|r| r.guid == vhdx::region_table::METADATA_REGION)
        .unwrap();
    let mut m = info.metadata.clone();
    m.file_parameters.has_parent = true;
    m.parent_locator = Some(ParentLocator {
        locator_type: VHDX_PARENT_LOCATOR_TYPE,
        entries: vec![
            (
                "parent_linkage".into(),
                "{83f8638b-8dca-4152-9eda-2ca8b33039b4}".into(),
            ),
            ("relative_path".into(), ".\\base.vhdx".into()),
        ],
    });
    let bytes = m.build_region(region.length).unwrap();
    fs::OpenOptions::new()
        .write(true)
        .open(&img)
        .unwrap()
        .write_all_at(&bytes, region.file_offset)
        .unwrap();

    let j = info_json(&img);
    assert_eq!(j["subformat"], "differencing");
    assert_eq!(j["parent"]["relative_path"], ".\\base.vhdx");
    assert_eq!(
        j["parent"]["parent_linkage"],
        "{83f8638b-8dca-4152-9eda-2ca8b33039b4}"
    );
    assert!(j["allocated-bytes"].is_null());
    let human = ok(&["info", p(&img)]);
    assert!(human.contains("subformat: differencing"), "{human}");
    assert!(human.contains("relative_path=.\\base.vhdx"), "{human}");
    // Reading it needs the parent: a clear error naming the file.
    let e = fails(1, &["read", p(&img), "0", "1"]);
    assert!(e.contains(p(&img)), "{e}");
}

#[test]
fn qemu_img_accepts_converted_vhdx() {
    let Some(qemu) = qemu_img() else { return };
    let dir = tmp();
    let src = dir.path().join("src.raw");
    let data = pattern(2 * MIB as usize + 5, 9);
    raw_file(
        &src,
        80 * MIB,
        &[(3 * MIB + 1, &data), (70 * MIB, &data[..4096])],
    );
    for (name, opts) in [
        ("dyn.vhdx", ""),
        ("small.vhdx", "block_size=1M"),
        ("fixed.vhdx", "subformat=fixed"),
    ] {
        let dst = dir.path().join(name);
        ok(&["convert", "-O", "vhdx", "-o", opts, p(&src), p(&dst)]);
        let check = Command::new(&qemu)
            .args(["check", p(&dst)])
            .output()
            .unwrap();
        assert!(
            check.status.success(),
            "qemu-img check {name}: {}{}",
            String::from_utf8_lossy(&check.stdout),
            String::from_utf8_lossy(&check.stderr)
        );
        let cmp = Command::new(&qemu)
            .args(["compare", "-f", "raw", "-F", "vhdx", p(&src), p(&dst)])
            .output()
            .unwrap();
        assert!(
            cmp.status.success(),
            "qemu-img compare {name}: {}{}",
            String::from_utf8_lossy(&cmp.stdout),
            String::from_utf8_lossy(&cmp.stderr)
        );
    }
    // And the other way: a VHDX written by qemu-img reads back identically.
    let theirs = dir.path().join("qemu.vhdx");
    let st = Command::new(&qemu)
        .args(["convert", "-f", "raw", "-O", "vhdx", p(&src), p(&theirs)])
        .status()
        .unwrap();
    assert!(st.success());
    ok(&["compare", p(&src), p(&theirs)]);
}

/// The keys of a JSON object, sorted.
fn keys(j: &serde_json::Value) -> Vec<String> {
    let mut k: Vec<String> = j.as_object().unwrap().keys().cloned().collect();
    k.sort();
    k
}

#[test]
fn create_and_info_vhd() {
    let dir = tmp();
    let vhdx_img = dir.path().join("ref.vhdx");
    ok(&["create", "-f", "vhdx", p(&vhdx_img), "64M"]);
    let vhdx_json = info_json(&vhdx_img);
    assert!(vhdx_json["vhd"].is_null(), "{vhdx_json}");

    // Dynamic (the default): the size is rounded up to a CHS geometry.
    let img = dir.path().join("dyn.vhd");
    let out = run(&["create", "-f", "vhd", p(&img), "64M"]);
    assert!(out.status.success());
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(stdout.contains("fmt=vhd size=67125248 subformat=dynamic block_size=2097152"));
    assert!(String::from_utf8_lossy(&out.stderr).contains("rounded up from 67108864 to 67125248"));
    let j = info_json(&img);
    assert_eq!(keys(&j), keys(&vhdx_json), "same key set as VHDX");
    assert_eq!(j["filename"], p(&img));
    assert_eq!(j["format"], "vhd");
    assert_eq!(j["subformat"], "dynamic");
    assert_eq!(j["virtual-size"], 67_125_248u64);
    assert_eq!(j["cluster-size"], 2 * MIB);
    assert_eq!(j["logical-sector-size"], 512);
    assert_eq!(j["physical-sector-size"], 512);
    assert_eq!(j["file-size"], fs::metadata(&img).unwrap().len());
    assert_eq!(j["allocated-bytes"], 0);
    assert!(j["log"].is_null());
    assert!(j["parent"].is_null());
    assert!(j["creator"].as_str().unwrap().starts_with("vdsk "), "{j}");
    let v = &j["vhd"];
    assert_eq!(v["disk-type"], "dynamic");
    assert_eq!(v["creator-application"], "vdsk");
    assert_eq!(v["creator-host-os"], "Wi2k");
    assert_eq!(v["creator-version"], "0.1");
    assert_eq!(v["current-size"], 67_125_248u64);
    assert_eq!(v["original-size"], 67_125_248u64);
    let g = &v["geometry"];
    let chs = g["cylinders"].as_u64().unwrap()
        * g["heads"].as_u64().unwrap()
        * g["sectors-per-track"].as_u64().unwrap();
    assert_eq!(chs * 512, 67_125_248, "{g}");
    assert_eq!(v["unique-id"], j["virtual-disk-id"]);
    assert_eq!(v["unique-id"].as_str().unwrap().len(), 36);
    assert_eq!(v["footer"], "end");
    assert_eq!(v["allocated-blocks"], 0);
    assert!(v["parent-name"].is_null());
    let human = ok(&["info", p(&img)]);
    for want in [
        "file format: vhd",
        "subformat: dynamic",
        "virtual size: 64.016 MiB (67125248 bytes)",
        "block size: 2 MiB (2097152 bytes)",
        "allocated bytes: 0 B (0 bytes)",
        "disk type: dynamic",
        "creator application: vdsk",
        "creator version: 0.1",
        "creator host os: Wi2k",
        "chs geometry: ",
        "unique id: ",
    ] {
        assert!(human.contains(want), "missing {want:?} in:\n{human}");
    }
    // Writing one byte allocates one block.
    let one = dir.path().join("one.bin");
    fs::write(&one, [7]).unwrap();
    ok(&["write", p(&img), "5M", p(&one)]);
    assert_eq!(info_json(&img)["allocated-bytes"], 2 * MIB);

    // Dynamic with small blocks, through the vpc alias.
    ok(&[
        "create",
        "-f",
        "vpc",
        "-o",
        "block_size=64K",
        p(&img),
        "10M",
    ]);
    let j = info_json(&img);
    assert_eq!(j["cluster-size"], 64 << 10);
    assert_eq!(ok(&["info", "-f", "vpc", p(&img)]), ok(&["info", p(&img)]));

    // Fixed.
    let img = dir.path().join("fixed.vhd");
    ok(&[
        "create",
        "-f",
        "vhd",
        "-o",
        "subformat=fixed",
        p(&img),
        "64M",
    ]);
    let j = info_json(&img);
    assert_eq!(keys(&j), keys(&vhdx_json));
    assert_eq!(j["subformat"], "fixed");
    assert_eq!(j["virtual-size"], 67_125_248u64);
    assert!(j["cluster-size"].is_null());
    assert_eq!(j["allocated-bytes"], 67_125_248u64);
    assert_eq!(j["file-size"], 67_125_248u64 + 512);
    assert!(j["vhd"]["allocated-blocks"].is_null());
    let human = ok(&["info", p(&img)]);
    assert!(human.contains("subformat: fixed"), "{human}");
    assert!(!human.contains("block size"), "{human}");

    // Azure: exactly the size asked, in the footer too.
    let img = dir.path().join("azure.vhd");
    let out = ok(&["create", "-f", "vhd", "-o", "azure=on", p(&img), "48M"]);
    assert!(out.contains("subformat=fixed azure=on"), "{out}");
    let j = info_json(&img);
    assert_eq!(j["subformat"], "fixed");
    assert_eq!(j["virtual-size"], 48 * MIB);
    assert_eq!(j["vhd"]["current-size"], 48 * MIB);
    assert_eq!(j["file-size"], 48 * MIB + 512);
    let human = ok(&["info", p(&img)]);
    assert!(
        human.contains("current size: 48 MiB (50331648 bytes)"),
        "{human}"
    );
    // Sizes Azure cannot take, and contradictory options.
    let bad = dir.path().join("bad.vhd");
    let e = fails(
        1,
        &["create", "-f", "vhd", "-o", "azure=on", p(&bad), "1000K"],
    );
    assert!(e.contains("whole number of MiB"), "{e}");
    assert!(e.contains(p(&bad)), "{e}");
    assert!(!bad.exists());
    let e = fails(
        1,
        &[
            "create",
            "-f",
            "vhd",
            "-o",
            "azure=on,subformat=dynamic",
            p(&bad),
            "1M",
        ],
    );
    assert!(e.contains("azure=on"), "{e}");
    let e = fails(
        1,
        &["create", "-f", "vhd", "-o", "azure=perhaps", p(&bad), "1M"],
    );
    assert!(e.contains("'perhaps'"), "{e}");
    let e = fails(
        1,
        &["create", "-f", "vhd", "-o", "block_size=3M", p(&bad), "64M"],
    );
    assert!(e.contains("block size 3145728"), "{e}");
    let e = fails(
        1,
        &["create", "-f", "vpc", "-o", "colour=blue", p(&bad), "64M"],
    );
    assert!(
        e.contains(
            "unknown option 'colour' for format vhd (supported: subformat, block_size, azure)"
        ),
        "{e}"
    );
}

#[test]
fn detect_fixed_vhd_by_trailing_footer() {
    let dir = tmp();
    let img = dir.path().join("fixed.img");
    ok(&[
        "create",
        "-f",
        "vhd",
        "-o",
        "subformat=fixed",
        p(&img),
        "8M",
    ]);
    // The first bytes are disk data, not a VHD cookie.
    let data = dir.path().join("data.bin");
    fs::write(&data, pattern(1000, 4)).unwrap();
    ok(&["write", "-f", "vhd", p(&img), "0", p(&data)]);
    let first = fs::read(&img).unwrap();
    assert_eq!(&first[..1000], &pattern(1000, 4)[..]);
    let j = info_json(&img);
    assert_eq!(j["format"], "vhd");
    assert_eq!(j["subformat"], "fixed");
    let size = j["virtual-size"].as_u64().unwrap();
    let out = vdisk().args(["read", p(&img), "0", "8"]).output().unwrap();
    assert_eq!(out.stdout, &pattern(1000, 4)[..8]);

    // An old image with a 511-byte footer (made before Virtual PC 2004).
    let f = fs::OpenOptions::new().write(true).open(&img).unwrap();
    f.set_len(size + 511).unwrap();
    drop(f);
    let j = info_json(&img);
    assert_eq!(j["format"], "vhd", "{j}");
    assert_eq!(j["vhd"]["footer"], "end-511");
    assert_eq!(j["virtual-size"], size);
    assert!(ok(&["info", p(&img)]).contains("511 bytes"));

    // Without the cookie at the end it is raw; so are tiny files.
    let f = fs::OpenOptions::new().write(true).open(&img).unwrap();
    f.set_len(size + 100).unwrap();
    drop(f);
    assert_eq!(info_json(&img)["format"], "raw");
    let tiny = dir.path().join("tiny.img");
    fs::write(&tiny, b"conecti").unwrap();
    assert_eq!(info_json(&tiny)["format"], "raw");
    fs::write(&tiny, b"").unwrap();
    assert_eq!(info_json(&tiny)["format"], "raw");
}

/// `qemu-img compare` of `src` (raw) and `img`, when qemu-img is there.
/// `azure`: read the VHD by its footer's current size (qemu sizes images
/// from unknown creators by their CHS geometry otherwise).
fn qemu_same(qemu: Option<&Path>, src: &Path, img: &Path, fmt: &str, azure: bool) {
    let Some(qemu) = qemu else { return };
    let mut cmd = Command::new(qemu);
    cmd.arg("compare");
    if azure {
        cmd.arg("--image-opts")
            .arg(format!("driver=raw,file.filename={}", p(src)))
            .arg(format!(
                "driver=vpc,force_size_calc=current_size,file.filename={}",
                p(img)
            ));
    } else {
        cmd.args(["-f", "raw", "-F", fmt, p(src), p(img)]);
    }
    let out = cmd.output().unwrap();
    assert!(
        out.status.success(),
        "qemu-img compare {}: {}{}",
        p(img),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// `vdisk compare` says identical.
fn same(a: &Path, b: &Path) {
    assert_eq!(
        ok(&["compare", p(a), p(b)]).trim(),
        "Images are identical.",
        "{} vs {}",
        p(a),
        p(b)
    );
}

#[test]
fn convert_every_direction_with_vhd() {
    let qemu = qemu_img();
    let dir = tmp();
    // A size a CHS geometry describes exactly, so that every format holds it.
    let probe = dir.path().join("probe.vhd");
    ok(&["create", "-f", "vhd", p(&probe), "40M"]);
    let size = info_json(&probe)["virtual-size"].as_u64().unwrap();
    let src = dir.path().join("src.raw");
    let a = pattern(3 * MIB as usize + 777, 11);
    let b = pattern(4096, 12);
    raw_file(
        &src,
        size,
        &[(5 * MIB + 3, &a), (20 * MIB, &b), (size - 1, &[9])],
    );
    // Explicit zeros must not be allocated either.
    fs::OpenOptions::new()
        .write(true)
        .open(&src)
        .unwrap()
        .write_all_at(&vec![0u8; 4 * MIB as usize], 28 * MIB)
        .unwrap();

    // raw -> vhd (dynamic, the default)
    let dyn_vhd = dir.path().join("a.vhd");
    let out = run(&["convert", "-O", "vhd", p(&src), p(&dyn_vhd)]);
    assert!(out.status.success());
    assert!(out.stderr.is_empty(), "no rounding note for a CHS size");
    same(&src, &dyn_vhd);
    qemu_same(qemu.as_deref(), &src, &dyn_vhd, "vpc", false);
    let j = info_json(&dyn_vhd);
    assert_eq!(j["subformat"], "dynamic");
    assert_eq!(j["virtual-size"], size);
    // Blocks 2, 3 and 4 (5 MiB + 3 .. 8 MiB + 780), 10 (20 MiB) and the last.
    assert_eq!(j["allocated-bytes"], 5 * 2 * MIB, "{j}");

    // vhd -> vhdx
    let vhdx_img = dir.path().join("b.vhdx");
    ok(&[
        "convert",
        "-f",
        "vpc",
        "-O",
        "vhdx",
        p(&dyn_vhd),
        p(&vhdx_img),
    ]);
    same(&src, &vhdx_img);
    same(&dyn_vhd, &vhdx_img);
    qemu_same(qemu.as_deref(), &src, &vhdx_img, "vhdx", false);

    // vhdx -> vhd (fixed)
    let fixed_vhd = dir.path().join("c.vhd");
    ok(&[
        "convert",
        "-p",
        "-O",
        "vpc",
        "-o",
        "subformat=fixed",
        p(&vhdx_img),
        p(&fixed_vhd),
    ]);
    same(&src, &fixed_vhd);
    qemu_same(qemu.as_deref(), &src, &fixed_vhd, "vpc", false);
    assert_eq!(info_json(&fixed_vhd)["subformat"], "fixed");
    // Zeros were skipped: the fixed image's file stays sparse.
    use std::os::unix::fs::MetadataExt;
    let used = fs::metadata(&fixed_vhd).unwrap().blocks() * 512;
    assert!(used < size / 2, "fixed VHD uses {used} bytes");

    // vhd -> vhd (fixed to dynamic with small blocks)
    let small_vhd = dir.path().join("d.vhd");
    ok(&[
        "convert",
        "-O",
        "vhd",
        "-o",
        "subformat=dynamic,block_size=4K",
        p(&fixed_vhd),
        p(&small_vhd),
    ]);
    same(&src, &small_vhd);
    same(&fixed_vhd, &small_vhd);
    qemu_same(qemu.as_deref(), &src, &small_vhd, "vpc", false);
    let j = info_json(&small_vhd);
    assert_eq!(j["cluster-size"], 4096);
    // 3 MiB + 777 bytes from 5 MiB + 3 spans 4 KiB blocks 1280..=2048; one
    // more each for the data at 20 MiB and the last byte.
    assert_eq!(j["allocated-bytes"], (769 + 1 + 1) * 4096, "{j}");

    // vhd -> raw, and vhdx -> raw
    for (from, name) in [
        (&small_vhd, "e.raw"),
        (&fixed_vhd, "f.raw"),
        (&vhdx_img, "g.raw"),
    ] {
        let back = dir.path().join(name);
        ok(&["convert", "-O", "raw", p(from), p(&back)]);
        assert!(
            fs::read(&src).unwrap() == fs::read(&back).unwrap(),
            "{name} differs from the source"
        );
    }

    // raw -> vhd with the Azure option, then vhd -> vhdx -> vhd -> raw.
    let src48 = dir.path().join("src48.raw");
    raw_file(
        &src48,
        48 * MIB,
        &[(MIB + 1, &a), (48 * MIB - 3, &[1, 2, 3])],
    );
    let az = dir.path().join("az.vhd");
    ok(&["convert", "-O", "vhd", "-o", "azure=on", p(&src48), p(&az)]);
    let j = info_json(&az);
    assert_eq!(j["virtual-size"], 48 * MIB);
    assert_eq!(j["vhd"]["current-size"], 48 * MIB);
    same(&src48, &az);
    qemu_same(qemu.as_deref(), &src48, &az, "vpc", true);
    let az_vhdx = dir.path().join("az.vhdx");
    ok(&["convert", "-O", "vhdx", p(&az), p(&az_vhdx)]);
    same(&src48, &az_vhdx);
    let az2 = dir.path().join("az2.vhd");
    ok(&[
        "convert",
        "-O",
        "vhd",
        "-o",
        "azure=on",
        p(&az_vhdx),
        p(&az2),
    ]);
    same(&az, &az2);
    let back = dir.path().join("az.raw");
    ok(&["convert", "-O", "raw", p(&az2), p(&back)]);
    assert!(fs::read(&src48).unwrap() == fs::read(&back).unwrap());

    // A size no CHS geometry holds: rounded up (with a note), like qemu-img;
    // the extra space reads as zeros.
    let dyn48 = dir.path().join("dyn48.vhd");
    let out = run(&["convert", "-O", "vhd", p(&src48), p(&dyn48)]);
    assert!(out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("rounded up from 50331648"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let big = info_json(&dyn48)["virtual-size"].as_u64().unwrap();
    assert!(big > 48 * MIB);
    let tail = vdisk()
        .args(["read", p(&dyn48), &(48 * MIB - 3).to_string(), "3"])
        .output()
        .unwrap();
    assert_eq!(tail.stdout, [1, 2, 3]);
    // Azure refuses sizes that are not a whole number of MiB, naming the target.
    let odd = dir.path().join("odd.raw");
    raw_file(&odd, 3 * MIB + 512, &[]);
    let e = fails(
        1,
        &["convert", "-O", "vhd", "-o", "azure=on", p(&odd), p(&az)],
    );
    assert!(e.contains("whole number of MiB"), "{e}");
    assert!(e.contains(p(&az)), "{e}");
}

#[test]
fn orphan_differencing_vhd() {
    // The shared corpus lives beside the workspace.
    let corpus = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../shared/corpus/vhd/dfvfs-fat-differential-orphan.vhd.gz");
    if !corpus.exists() {
        println!("SKIP: {} is absent", corpus.display());
        return;
    }
    let dir = tmp();
    let img = dir.path().join("orphan.vhd");
    let out = Command::new("gzip")
        .arg("-dc")
        .arg(corpus)
        .output()
        .unwrap();
    assert!(out.status.success(), "gzip -dc failed");
    fs::write(&img, out.stdout).unwrap();

    // info works, and shows the parent.
    let j = info_json(&img);
    assert_eq!(j["format"], "vhd");
    assert_eq!(j["subformat"], "differencing");
    let parent = "C:\\Projects\\dfvfs\\test_data\\fat-parent.vhd";
    assert_eq!(j["parent"]["parent-name"], parent, "{j}");
    assert_eq!(j["parent"]["W2ru"], ".\\fat-parent.vhd", "{j}");
    assert_eq!(j["vhd"]["parent-name"], parent);
    assert_eq!(
        j["vhd"]["parent-unique-id"].as_str().unwrap(),
        j["parent"]["parent-unique-id"].as_str().unwrap()
    );
    let locators = j["vhd"]["parent-locators"].as_array().unwrap();
    assert!(locators.iter().any(|l| l["platform-code"] == "W2ku"), "{j}");
    let human = ok(&["info", p(&img)]);
    assert!(human.contains("subformat: differencing"), "{human}");
    assert!(human.contains(&format!("parent-name={parent}")), "{human}");
    assert!(human.contains("W2ru=.\\fat-parent.vhd"), "{human}");
    // The path Windows tries first, as qemu-img's backing-filename.
    assert_eq!(j["backing-filename"], ".\\fat-parent.vhd", "{j}");
    assert!(
        human.contains("backing file: .\\fat-parent.vhd\n"),
        "{human}"
    );

    // Reading it needs the parent: the error names the file and the parent.
    let target = dir.path().join("out.raw");
    for args in [
        vec!["read", p(&img), "0", "1"],
        vec!["convert", "-O", "raw", p(&img), p(&target)],
        vec!["write", p(&img), "0", "/dev/null"],
    ] {
        let e = fails(1, &args);
        assert!(e.contains(p(&img)), "{e}");
        assert!(e.contains("parent"), "{e}");
        assert!(e.contains("fat-parent.vhd"), "{e}");
    }
    let e = fails(2, &["compare", p(&img), p(&img)]);
    assert!(e.contains("fat-parent.vhd"), "{e}");
    assert!(!target.exists());
}

#[test]
fn differencing_vhd_create_write_convert() {
    let dir = tmp();
    let base = dir.path().join("base.vhd");
    ok(&["create", "-f", "vhd", p(&base), "8M"]);
    let size = info_json(&base)["virtual-size"].as_u64().unwrap();
    let mut expect = vec![0u8; size as usize];
    let input = dir.path().join("input.bin");
    for (at, len, seed) in [(0u64, 3 * MIB as usize, 1u32), (5 * MIB + 7, 100_000, 2)] {
        let data = pattern(len, seed);
        fs::write(&input, &data).unwrap();
        ok(&["write", p(&base), &at.to_string(), p(&input)]);
        expect[at as usize..at as usize + len].copy_from_slice(&data);
    }
    let base_bytes = fs::read(&base).unwrap();

    // -b: the size is the parent's; a different one is refused.
    let child = dir.path().join("child.vhd");
    let e = fails(1, &["create", "-f", "vhd", "-b", p(&base), p(&child), "9M"]);
    assert!(e.contains("virtual size"), "{e}");
    let e = fails(1, &["create", "-f", "vhdx", "-b", p(&base), p(&child)]);
    assert!(e.contains("VHD"), "{e}");
    let e = fails(1, &["create", "-f", "vhd", p(&child)]);
    assert!(e.contains("SIZE"), "{e}");
    let out = ok(&[
        "create",
        "-f",
        "vpc",
        "-F",
        "vpc",
        "-o",
        "block_size=512K",
        "-b",
        p(&base),
        p(&child),
        "8M",
    ]);
    assert!(out.contains("subformat=differencing"), "{out}");
    assert!(out.contains(&format!("size={size}")), "{out}");

    // Unaligned writes into the child: partial sectors, across blocks.
    for (at, len, seed) in [
        (100u64, 10usize, 3u32),
        (512 * 1024 - 333, 5000, 4),
        (2 * MIB - 1, 2, 5),
        (size - 77, 77, 6),
    ] {
        let data = pattern(len, seed);
        fs::write(&input, &data).unwrap();
        ok(&["write", p(&child), &at.to_string(), p(&input)]);
        expect[at as usize..at as usize + len].copy_from_slice(&data);
    }
    assert_eq!(fs::read(&base).unwrap(), base_bytes, "the parent changed");

    // info shows the parent.
    let j = info_json(&child);
    assert_eq!(j["subformat"], "differencing");
    assert_eq!(j["parent"]["parent-name"], "base.vhd");
    assert_eq!(j["parent"]["W2ru"], ".\\base.vhd");
    assert_eq!(
        j["parent"]["parent-unique-id"],
        info_json(&base)["vhd"]["unique-id"]
    );
    let canon = base.canonicalize().unwrap();
    assert_eq!(j["vhd"]["parent-file"], p(&canon));
    assert_eq!(j["cluster-size"], 512 * 1024);
    let human = ok(&["info", p(&child)]);
    assert!(
        human.contains(&format!("parent file: {}", p(&canon))),
        "{human}"
    );

    // read and convert flatten the chain.
    let out = vdisk()
        .args(["read", p(&child), "0", "1000"])
        .output()
        .unwrap();
    assert_eq!(out.stdout, &expect[..1000]);
    let raw = dir.path().join("flat.raw");
    ok(&["convert", "-O", "raw", p(&child), p(&raw)]);
    assert!(fs::read(&raw).unwrap() == expect, "converted child differs");
    let vhdx = dir.path().join("flat.vhdx");
    ok(&["convert", "-O", "vhdx", p(&child), p(&vhdx)]);
    ok(&["compare", p(&child), p(&vhdx)]);
    ok(&["compare", p(&child), p(&raw)]);
    // The child differs from its parent exactly where written.
    let out = run(&["compare", p(&child), p(&base)]);
    assert_eq!(out.status.code(), Some(1));
    assert_eq!(fs::read(&base).unwrap(), base_bytes, "the parent changed");

    // A missing parent: a clear error naming both.
    fs::rename(&base, dir.path().join("elsewhere.vhd")).unwrap();
    let e = fails(1, &["read", p(&child), "0", "1"]);
    assert!(e.contains(p(&child)) && e.contains("base.vhd"), "{e}");
    assert!(e.contains("parent is missing"), "{e}");
}

const CHAIN_SIZE: u64 = 8 * MIB;

/// Write `data` at `at` into `img` with `vdisk write`, and into `model`.
fn write_both(img: &Path, model: &mut [u8], at: u64, data: &[u8]) {
    let input = img.with_extension("input");
    fs::write(&input, data).unwrap();
    ok(&["write", p(img), &at.to_string(), p(&input)]);
    fs::remove_file(&input).unwrap();
    model[at as usize..at as usize + data.len()].copy_from_slice(data);
}

/// All the virtual bytes of `img`, through `vdisk read`.
fn read_all(img: &Path) -> Vec<u8> {
    let size = info_json(img)["virtual-size"].as_u64().unwrap();
    let out = run(&["read", p(img), "0", &size.to_string()]);
    assert!(
        out.status.success(),
        "vdisk read {}: {}",
        p(img),
        String::from_utf8_lossy(&out.stderr)
    );
    out.stdout
}

/// Whether `a` and `b` are the same existing file.
fn same_path(a: &str, b: &Path) -> bool {
    fs::canonicalize(a).unwrap() == fs::canonicalize(b).unwrap()
}

/// A 3-layer VHDX chain made with the tool in `dir`: base.vhdx (1 MiB
/// blocks) <- child.avhdx (default differencing blocks) <- gc.avhdx
/// (1 MiB blocks), each with data written over its parent's. Returns the
/// paths and what each layer reads, top last.
fn vhdx_chain(dir: &Path) -> ([PathBuf; 3], [Vec<u8>; 3]) {
    let base = dir.join("base.vhdx");
    let child = dir.join("child.avhdx");
    let gc = dir.join("gc.avhdx");
    create_vhdx_1m(&base, "8M");
    let mut m0 = vec![0u8; CHAIN_SIZE as usize];
    write_both(&base, &mut m0, 0, &pattern(3 * MIB as usize, 1));
    write_both(&base, &mut m0, 5 * MIB + 7, &pattern(100_000, 2));

    let out = ok(&["create", "-b", p(&base), p(&child)]);
    assert!(
        out.contains("fmt=vhdx") && out.contains("subformat=differencing"),
        "{out}"
    );
    assert!(out.contains("block_size=2097152"), "{out}");
    let mut m1 = m0.clone();
    for (at, len, seed) in [
        (100u64, 10usize, 3u32),
        (512 * 1024 - 333, 5000, 4),
        (2 * MIB - 1, 2, 5),
        (6 * MIB, MIB as usize, 6),
        (CHAIN_SIZE - 77, 77, 7),
    ] {
        write_both(&child, &mut m1, at, &pattern(len, seed));
    }

    // -f and SIZE given explicitly (SIZE must be the parent's).
    ok(&[
        "create",
        "-f",
        "vhdx",
        "-F",
        "vhdx",
        "-o",
        "block_size=1M",
        "-b",
        p(&child),
        p(&gc),
        "8M",
    ]);
    let mut m2 = m1.clone();
    for (at, len, seed) in [
        (3u64, 4usize, 8u32),
        (MIB + 1, 300_000, 9),
        (7 * MIB, 4096, 10),
    ] {
        write_both(&gc, &mut m2, at, &pattern(len, seed));
    }
    ([base, child, gc], [m0, m1, m2])
}

#[test]
fn vhdx_chain_reads_correctly_at_every_layer() {
    let dir = tmp();
    let (files, models) = vhdx_chain(dir.path());
    let qemu = disk::testing::have("qemu-img");
    for (f, m) in files.iter().zip(&models) {
        // Every layer reads its own model: writes to a child never reach the parent.
        assert!(read_all(f) == *m, "{} reads wrong data", p(f));
        let out = vdisk()
            .args(["read", p(f), &(MIB - 3).to_string(), "10"])
            .output()
            .unwrap();
        assert_eq!(out.stdout, &m[MIB as usize - 3..MIB as usize + 7]);
        // Converted to raw (qemu-img cannot read differencing VHDX).
        let raw = f.with_extension("raw");
        ok(&["convert", "-O", "raw", p(f), p(&raw)]);
        assert!(fs::read(&raw).unwrap() == *m, "{} converts wrong", p(f));
        let model = f.with_extension("model");
        fs::write(&model, m).unwrap();
        same(f, &model);
        if qemu {
            disk::testing::qemu_compare(&raw, "raw", &model, "raw")
                .unwrap_or_else(|e| panic!("qemu-img compare {}: {e}", p(&raw)));
        }
        // And to a standalone VHDX, which qemu-img can read.
        let flat = f.with_extension("flat.vhdx");
        ok(&["convert", "-O", "vhdx", p(f), p(&flat)]);
        same(&flat, &model);
        if qemu {
            disk::testing::qemu_compare(&model, "raw", &flat, "vhdx")
                .unwrap_or_else(|e| panic!("qemu-img compare {}: {e}", p(&flat)));
        }
    }
    let j = info_json(&files[1]);
    assert_eq!(j["subformat"], "differencing");
    assert_eq!(j["cluster-size"], 2 * MIB);
    assert_eq!(j["virtual-size"], CHAIN_SIZE);
    assert!(
        same_path(j["full-backing-filename"].as_str().unwrap(), &files[0]),
        "{j}"
    );
    assert_eq!(j["parent"]["relative_path"], ".\\base.vhdx", "{j}");
    assert!(j["parent"]["parent_linkage"].is_string(), "{j}");
    assert_eq!(info_json(&files[2])["cluster-size"], MIB);
}

#[test]
fn create_differencing_vhdx_errors() {
    let dir = tmp();
    let base = dir.path().join("base.vhdx");
    ok(&["create", "-f", "vhdx", p(&base), "8M"]);
    let child = dir.path().join("child.avhdx");
    let base_s = p(&base);
    let child_s = p(&child);
    for (args, want) in [
        (
            vec!["create", "-b", base_s, child_s, "9M"],
            "virtual size of the parent",
        ),
        (
            vec!["create", "-o", "subformat=fixed", "-b", base_s, child_s],
            "subformat=fixed",
        ),
        (
            vec![
                "create",
                "-o",
                "logical_sector_size=4096",
                "-b",
                base_s,
                child_s,
            ],
            "'logical_sector_size'",
        ),
        (
            vec!["create", "-f", "vhd", "-b", base_s, child_s],
            "must be a VHD, not a VHDX",
        ),
        (
            vec!["create", "-f", "raw", "-b", base_s, child_s],
            "raw image cannot have a backing file",
        ),
        (
            vec!["create", "-b", base_s, base_s],
            "overwrite its own parent",
        ),
    ] {
        let e = fails(1, &args);
        assert!(e.contains(want), "{args:?}: {e}");
    }
    assert!(!child.exists());
    // A raw parent.
    let raw = dir.path().join("base.raw");
    raw_file(&raw, 8 * MIB, &[]);
    let e = fails(1, &["create", "-f", "vhdx", "-b", p(&raw), p(&child)]);
    assert!(e.contains("must be a VHDX, not a raw image"), "{e}");
    assert!(e.contains(p(&raw)), "{e}");
    // block_size and log_size are taken.
    let out = ok(&[
        "create",
        "-o",
        "block_size=4M,log_size=2M",
        "-b",
        p(&base),
        p(&child),
    ]);
    assert!(out.contains("block_size=4194304 log_size=2097152"), "{out}");
    assert_eq!(info_json(&child)["cluster-size"], 4 * MIB);
}

#[test]
fn info_backing_chain_lists_every_layer() {
    let dir = tmp();
    let ([base, child, gc], _) = vhdx_chain(dir.path());
    let human = ok(&["info", "--backing-chain", p(&gc)]);
    let layers: Vec<&str> = human.split("\n\n").collect();
    assert_eq!(layers.len(), 3, "{human}");
    for (text, file) in layers.iter().zip([&gc, &child, &base]) {
        let name = text
            .lines()
            .next()
            .unwrap()
            .strip_prefix("image: ")
            .unwrap();
        assert!(same_path(name, file), "{name} is not {}", p(file));
    }
    assert!(layers[0].contains("subformat: differencing"), "{human}");
    assert!(layers[2].contains("subformat: dynamic"), "{human}");
    assert!(!layers[2].contains("parent"), "{human}");
    // Each child's parent_linkage is its parent's DataWriteGuid.
    for i in 0..2 {
        let guid = layers[i + 1]
            .lines()
            .find_map(|l| l.strip_prefix("data write guid: "))
            .unwrap();
        assert!(
            layers[i].contains(&format!("parent_linkage={{{guid}}}")),
            "{human}"
        );
        assert!(layers[i].contains("parent file: "), "{human}");
    }
    assert!(
        layers[0].contains("relative_path=.\\child.avhdx"),
        "{human}"
    );

    let out = ok(&["info", "--backing-chain", "--output", "json", p(&gc)]);
    let j: serde_json::Value = serde_json::from_str(&out).expect("valid JSON");
    let arr = j.as_array().expect("a JSON array");
    assert_eq!(arr.len(), 3, "{j}");
    for (l, file) in arr.iter().zip([&gc, &child, &base]) {
        assert!(same_path(l["filename"].as_str().unwrap(), file), "{l}");
        assert_eq!(l["format"], "vhdx");
        assert_eq!(l["virtual-size"], CHAIN_SIZE);
    }
    assert!(same_path(
        arr[0]["full-backing-filename"].as_str().unwrap(),
        &child
    ));
    assert!(same_path(
        arr[1]["full-backing-filename"].as_str().unwrap(),
        &base
    ));
    assert_eq!(arr[1]["parent"]["relative_path"], ".\\base.vhdx");
    assert!(arr[2]["parent"].is_null());
    assert!(arr[2]["full-backing-filename"].is_null());
    // The same keys as plain info.
    assert_eq!(keys(&arr[0]), keys(&info_json(&gc)));

    // A standalone image (any format) is a chain of one.
    for img in [&base, &dir.path().join("r.raw")] {
        if !img.exists() {
            raw_file(img, MIB, &[]);
        }
        let out = ok(&["info", "--backing-chain", "--output", "json", p(img)]);
        let j: serde_json::Value = serde_json::from_str(&out).unwrap();
        assert_eq!(j.as_array().unwrap().len(), 1, "{j}");
        let human = ok(&["info", "--backing-chain", p(img)]);
        assert_eq!(human, ok(&["info", p(img)]));
    }

    // A middle layer in a subdirectory: each layer's report opens its
    // parent under the top's directory too.
    let sub = dir.path().join("sub");
    fs::create_dir(&sub).unwrap();
    let mid = sub.join("mid.avhdx");
    let top = dir.path().join("top.avhdx");
    ok(&["create", "-b", p(&base), p(&mid)]);
    ok(&["create", "-b", p(&mid), p(&top)]);
    let out = ok(&["info", "--backing-chain", "--output", "json", p(&top)]);
    let j: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(j.as_array().unwrap().len(), 3, "{j}");
    assert!(same_path(j[1]["filename"].as_str().unwrap(), &mid), "{j}");
    assert!(
        same_path(j[1]["full-backing-filename"].as_str().unwrap(), &base),
        "{j}"
    );
    assert!(j[1]["allocated-bytes"].is_u64(), "{j}");

    // A differencing VHD chain too.
    let vbase = dir.path().join("vbase.vhd");
    let vchild = dir.path().join("vchild.vhd");
    ok(&["create", "-f", "vhd", p(&vbase), "8M"]);
    ok(&["create", "-b", p(&vbase), p(&vchild)]);
    let out = ok(&["info", "--backing-chain", "--output", "json", p(&vchild)]);
    let j: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(j.as_array().unwrap().len(), 2, "{j}");
    assert_eq!(j[0]["subformat"], "differencing");
    assert_eq!(j[1]["subformat"], "dynamic");
    assert!(same_path(j[1]["filename"].as_str().unwrap(), &vbase));
}

#[test]
fn orphan_differencing_vhdx() {
    let Some(corpus) = disk::testing::corpus("vhdx") else {
        return;
    };
    let dir = tmp();
    let img = disk::testing::decompress(
        &corpus.join("dissect-differencing-orphan.avhdx.gz"),
        dir.path(),
    );
    let parent = "Generation 1_49C4BAF3-4B25-4406-8C4B-D39E65C32385.avhdx";
    let human = ok(&["info", p(&img)]);
    assert!(human.contains("subformat: differencing"), "{human}");
    assert!(human.contains("parent_linkage={"), "{human}");
    assert!(
        human.contains(&format!("relative_path=.\\{parent}")),
        "{human}"
    );
    assert!(human.contains("absolute_win32_path=C:\\"), "{human}");
    assert!(human.contains("volume_path=\\\\?\\Volume{"), "{human}");
    assert!(!human.contains("parent file:"), "{human}");
    let j = info_json(&img);
    assert!(j["parent"]["parent_linkage"].is_string(), "{j}");
    assert_eq!(j["parent"]["relative_path"], format!(".\\{parent}"), "{j}");
    assert_eq!(j["backing-filename"], format!(".\\{parent}"), "{j}");
    assert!(j["parent"]["absolute_win32_path"].is_string(), "{j}");
    assert!(j["allocated-bytes"].is_null(), "{j}");
    assert!(j["full-backing-filename"].is_null(), "{j}");

    // Opening it for data fails, naming the image and the parent path tried.
    for args in [
        vec!["read", p(&img), "0", "1"],
        vec!["info", "--backing-chain", p(&img)],
    ] {
        let e = fails(1, &args);
        assert!(e.contains(p(&img)), "{e}");
        assert!(e.contains("parent"), "{e}");
        assert!(e.contains(parent), "{e}");
    }
}

#[test]
fn parent_policy_flags() {
    for (fmt, base_name, child_name) in [
        ("vhdx", "base.vhdx", "child.avhdx"),
        ("vhd", "base.vhd", "child.vhd"),
    ] {
        let dir = tmp();
        let a = dir.path().join("a");
        let b = dir.path().join("b");
        fs::create_dir(&a).unwrap();
        fs::create_dir(&b).unwrap();
        let base = a.join(base_name);
        let child = b.join(child_name);
        ok(&["create", "-f", fmt, p(&base), "8M"]);
        let hello = dir.path().join("hello");
        fs::write(&hello, b"hello").unwrap();
        ok(&["write", p(&base), "1M", p(&hello)]);
        // Creating says that opening the child will need the flag.
        let out = run(&["create", "-b", p(&base), p(&child)]);
        assert!(out.status.success());
        let note = String::from_utf8_lossy(&out.stderr);
        assert!(note.contains("--parent-dir"), "{fmt}: {note}");

        // Refused by default; the message says why and how to allow it.
        let e = fails(1, &["read", p(&child), "1M", "5"]);
        assert!(e.contains(p(&child)), "{fmt}: {e}");
        assert!(e.contains("parent policy"), "{fmt}: {e}");
        assert!(e.contains("--parent-dir"), "{fmt}: {e}");
        assert!(e.contains("--allow-any-parent"), "{fmt}: {e}");
        // info still shows the image (exit 0).
        let j = info_json(&child);
        assert_eq!(j["subformat"], "differencing");
        assert!(j["full-backing-filename"].is_null(), "{j}");

        // Allowed by --parent-dir (before or after the subcommand) or
        // --allow-any-parent.
        for args in [
            vec!["--parent-dir", p(&a), "read", p(&child), "1M", "5"],
            vec!["read", "--parent-dir", p(&a), p(&child), "1M", "5"],
            vec!["read", "--allow-any-parent", p(&child), "1M", "5"],
        ] {
            let out = vdisk().args(&args).output().unwrap();
            assert!(
                out.status.success(),
                "{args:?}: {}",
                String::from_utf8_lossy(&out.stderr)
            );
            assert_eq!(out.stdout, b"hello", "{args:?}");
        }
        // Another directory does not help.
        let e = fails(1, &["--parent-dir", p(&b), "read", p(&child), "1M", "5"]);
        assert!(e.contains("parent policy"), "{e}");
        let out = ok(&["info", "--allow-any-parent", "--output", "json", p(&child)]);
        let j: serde_json::Value = serde_json::from_str(&out).unwrap();
        assert!(
            same_path(j["full-backing-filename"].as_str().unwrap(), &base),
            "{j}"
        );
        let out = ok(&["--parent-dir", p(&a), "info", "--backing-chain", p(&child)]);
        assert_eq!(out.matches("image: ").count(), 2, "{out}");
    }
    let help = ok(&["--help"]);
    assert!(help.contains("--parent-dir"), "{help}");
    assert!(help.contains("--allow-any-parent"), "{help}");
    assert!(help.contains("under the directory of the image"), "{help}");
}

#[test]
fn merge_into_parent_and_ancestor() {
    // Default: the child into its parent; the child is deleted.
    let dir = tmp();
    let ([base, child, gc], models) = vhdx_chain(dir.path());
    fs::remove_file(&gc).unwrap();
    let out = ok(&["merge", p(&child)]);
    assert!(out.contains("Merged") && out.contains("copied"), "{out}");
    assert!(out.contains(p(&base)), "{out}");
    assert!(!child.exists(), "the merged child is deleted");
    assert!(
        read_all(&base) == models[1],
        "the parent reads what the child read"
    );
    assert_eq!(info_json(&base)["subformat"], "dynamic");

    // --into the base with --keep, from the top of 3 layers (with progress).
    let dir = tmp();
    let ([base, child, gc], models) = vhdx_chain(dir.path());
    let out = ok(&["merge", "--into", p(&base), "--keep", "-p", p(&gc)]);
    assert!(out.contains(p(&gc)) && out.contains(p(&child)), "{out}");
    assert!(!out.contains("Deleted"), "{out}");
    assert!(gc.exists() && child.exists());
    assert!(read_all(&base) == models[2], "base reads what gc read");
    assert!(
        read_all(&gc) == models[2],
        "the kept top still reads the same"
    );

    // --depth 2 deletes both merged layers.
    let dir = tmp();
    let ([base, child, gc], models) = vhdx_chain(dir.path());
    let out = ok(&["merge", "--depth", "2", p(&gc)]);
    assert_eq!(out.matches("Deleted").count(), 2, "{out}");
    assert!(!gc.exists() && !child.exists());
    assert!(read_all(&base) == models[2]);

    // Errors.
    let dir = tmp();
    let ([base, child, gc], _) = vhdx_chain(dir.path());
    let e = fails(1, &["merge", p(&base)]);
    assert!(
        e.contains(p(&base)) && e.contains("not a differencing disk"),
        "{e}"
    );
    let raw = dir.path().join("x.raw");
    raw_file(&raw, MIB, &[]);
    let e = fails(1, &["merge", p(&raw)]);
    assert!(e.contains("not a differencing disk"), "{e}");
    let e = fails(1, &["merge", "--depth", "3", p(&gc)]);
    assert!(e.contains("beyond the chain"), "{e}");
    let e = fails(1, &["merge", "--depth", "0", p(&gc)]);
    assert!(e.contains("at least 1"), "{e}");
    let e = fails(1, &["merge", "--into", p(&gc), p(&child)]);
    assert!(e.contains("not an ancestor"), "{e}");
    fails(1, &["merge", "--into", p(&base), "--depth", "1", p(&gc)]);
    assert!(gc.exists() && child.exists());

    // A VHD child into its parent.
    let vbase = dir.path().join("vbase.vhd");
    let vchild = dir.path().join("vchild.vhd");
    ok(&["create", "-f", "vhd", p(&vbase), "8M"]);
    ok(&["create", "-b", p(&vbase), p(&vchild)]);
    let size = info_json(&vbase)["virtual-size"].as_u64().unwrap();
    let mut m = vec![0u8; size as usize];
    write_both(&vchild, &mut m, 12_345, &pattern(70_000, 20));
    ok(&["merge", p(&vchild)]);
    assert!(!vchild.exists());
    assert!(read_all(&vbase) == m);
}

#[test]
fn rebase_safe_and_unsafe() {
    let dir = tmp();
    let ([base, child, gc], models) = vhdx_chain(dir.path());
    let out = ok(&["rebase", "-b", p(&base), "-p", p(&gc)]);
    assert!(out.contains("Rebased") && out.contains("copied"), "{out}");
    assert!(!out.contains(" 0 B"), "the child's data was copied: {out}");
    fs::remove_file(&child).unwrap();
    assert!(read_all(&gc) == models[2], "gc reads the same over base");
    let j = info_json(&gc);
    assert!(
        same_path(j["full-backing-filename"].as_str().unwrap(), &base),
        "{j}"
    );

    // Unsafe: only the link, to a copy of the same data.
    let copy = dir.path().join("copy.vhdx");
    fs::copy(&base, &copy).unwrap();
    let out = ok(&["rebase", "-u", "-b", p(&copy), p(&gc)]);
    assert!(out.contains("unsafe"), "{out}");
    let j = info_json(&gc);
    assert!(
        same_path(j["full-backing-filename"].as_str().unwrap(), &copy),
        "{j}"
    );
    assert!(read_all(&gc) == models[2]);
    // Safe onto the same disk (a copy, with the same identity) copies nothing.
    let out = ok(&["rebase", "-b", p(&base), p(&gc)]);
    assert!(out.contains(": 0 B (0 bytes) copied"), "{out}");
    assert!(read_all(&gc) == models[2]);

    // Errors: a disk with no parent, itself as parent.
    let e = fails(1, &["rebase", "-b", p(&copy), p(&base)]);
    assert!(e.contains(p(&base)), "{e}");
    let e = fails(1, &["rebase", "-b", p(&gc), p(&gc)]);
    assert!(e.contains("its own parent"), "{e}");
}

/// The bytes at `at` of the active disk of `bundle`.
fn active_read(bundle: &Path, at: u64, len: u64) -> Vec<u8> {
    let path = ok(&["checkpoint", "path", p(bundle)]);
    let out = run(&["read", path.trim(), &at.to_string(), &len.to_string()]);
    assert!(out.status.success());
    out.stdout
}

fn active_write(bundle: &Path, at: u64, data: &[u8]) {
    let path = ok(&["checkpoint", "path", p(bundle)]);
    let input = bundle.with_extension("input");
    fs::write(&input, data).unwrap();
    ok(&["write", path.trim(), &at.to_string(), p(&input)]);
}

fn list_json(bundle: &Path) -> Vec<serde_json::Value> {
    let out = ok(&["checkpoint", "list", "--output", "json", p(bundle)]);
    let j: serde_json::Value = serde_json::from_str(&out).expect("valid JSON");
    let nodes = j.as_array().expect("an array").clone();
    assert_eq!(
        nodes.iter().filter(|n| n["active"] == true).count(),
        1,
        "exactly one active node: {j}"
    );
    nodes
}

#[test]
fn checkpoint_bundle_end_to_end() {
    let dir = tmp();
    let vm = dir.path().join("vm");
    let out = ok(&["checkpoint", "init", p(&vm), "8M"]);
    assert!(out.contains(p(&vm)), "{out}");
    let active = ok(&["checkpoint", "path", p(&vm)]);
    let active = active.trim();
    assert!(
        active.ends_with(".avhdx") && Path::new(active).exists(),
        "{active}"
    );
    assert!(vm.join("base.vhdx").exists());
    let at = 3 * MIB + 5;
    active_write(&vm, at, b"one");
    let out = ok(&["checkpoint", "create", p(&vm), "first"]);
    assert!(out.contains("first"), "{out}");
    active_write(&vm, at, b"two");
    active_write(&vm, 100, b"keep");
    ok(&["checkpoint", "create", p(&vm), "second"]);
    active_write(&vm, at, b"three");

    // Revert drops the changes made since.
    let out = ok(&["checkpoint", "revert", p(&vm), "first"]);
    assert!(out.contains("first"), "{out}");
    assert_eq!(active_read(&vm, at, 3), b"one");
    assert_eq!(active_read(&vm, 100, 4), b"\0\0\0\0");
    active_write(&vm, at, b"alt");

    let human = ok(&["checkpoint", "list", p(&vm)]);
    let lines: Vec<&str> = human.lines().collect();
    assert_eq!(lines.len(), 4, "{human}");
    assert!(lines[0].starts_with("base "), "{human}");
    assert!(lines[1].starts_with("  first "), "{human}");
    assert_eq!(
        lines.iter().filter(|l| l.contains('*')).count(),
        1,
        "{human}"
    );
    assert!(human.contains("    second "), "{human}");
    assert!(human.contains("    * (active) "), "{human}");
    assert!(
        human.contains("base.vhdx") && human.contains("Z "),
        "{human}"
    );
    let nodes = list_json(&vm);
    assert_eq!(nodes.len(), 4);
    let by_name = |n: &str| nodes.iter().find(|x| x["name"] == n).unwrap().clone();
    let first = by_name("first");
    let second = by_name("second");
    let act = nodes.iter().find(|n| n["active"] == true).unwrap();
    assert!(act["name"].is_null());
    assert_eq!(act["parent"], first["id"]);
    assert_eq!(act["depth"], 2);
    assert_eq!(second["parent"], first["id"]);
    for n in &nodes {
        for k in ["id", "created", "created-utc", "file-size", "disk", "depth"] {
            assert!(!n[k].is_null(), "{k} in {n}");
        }
    }

    // Delete keeps what the other checkpoints read.
    let second_disk = vm.join(second["disk"].as_str().unwrap());
    let out = ok(&["checkpoint", "delete", p(&vm), "first"]);
    assert!(out.contains("first"), "{out}");
    assert!(!vm.join(first["disk"].as_str().unwrap()).exists());
    let r = vdisk()
        .args(["read", p(&second_disk), &at.to_string(), "3"])
        .output()
        .unwrap();
    assert_eq!(r.stdout, b"two");
    assert_eq!(active_read(&vm, at, 3), b"alt");
    assert_eq!(list_json(&vm).len(), 3);
    assert!(!ok(&["checkpoint", "list", p(&vm)]).contains("first"));

    // Errors name the bundle.
    let e = fails(1, &["checkpoint", "revert", p(&vm), "nope"]);
    assert!(e.contains(p(&vm)) && e.contains("nope"), "{e}");
    let e = fails(1, &["checkpoint", "delete", p(&vm), "nope"]);
    assert!(e.contains(p(&vm)), "{e}");
    let e = fails(1, &["checkpoint", "create", p(&vm), "second"]);
    assert!(e.contains(p(&vm)) && e.contains("already exists"), "{e}");
    let e = fails(1, &["checkpoint", "init", p(&vm), "8M"]);
    assert!(e.contains(p(&vm)) && e.contains("not empty"), "{e}");
    let missing = dir.path().join("missing");
    for sub in ["list", "path", "merge"] {
        let e = fails(1, &["checkpoint", sub, p(&missing)]);
        assert!(e.contains(p(&missing)), "{sub}: {e}");
    }
    let e = fails(1, &["checkpoint", "init", "-f", "raw", p(&missing), "8M"]);
    assert!(e.contains(p(&missing)), "{e}");

    // Revert to the other branch, then merge into one disk.
    ok(&["checkpoint", "revert", p(&vm), "second"]);
    assert_eq!(active_read(&vm, at, 3), b"two");
    active_write(&vm, 7 * MIB, b"last");
    let out = ok(&["checkpoint", "merge", p(&vm)]);
    assert!(out.contains(p(&vm)), "{out}");
    let nodes = list_json(&vm);
    assert_eq!(nodes.len(), 1, "{nodes:?}");
    let disks: Vec<String> = fs::read_dir(&vm)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.ends_with("vhdx"))
        .collect();
    assert_eq!(disks.len(), 1, "{disks:?}");
    assert_eq!(active_read(&vm, at, 3), b"two");
    assert_eq!(active_read(&vm, 100, 4), b"keep");
    assert_eq!(active_read(&vm, 7 * MIB, 4), b"last");
    let path = ok(&["checkpoint", "path", p(&vm)]);
    assert_eq!(info_json(Path::new(path.trim()))["subformat"], "dynamic");
}

#[test]
fn checkpoint_init_vhd_and_from_image() {
    let dir = tmp();
    let vm = dir.path().join("vhdvm");
    ok(&["checkpoint", "init", "-f", "vhd", p(&vm), "8M"]);
    let active = ok(&["checkpoint", "path", p(&vm)]);
    assert!(active.trim().ends_with(".avhd"), "{active}");
    active_write(&vm, 0, b"vhd!");
    ok(&["checkpoint", "create", p(&vm), "a"]);
    active_write(&vm, 0, b"gone");
    ok(&["checkpoint", "revert", p(&vm), "a"]);
    assert_eq!(active_read(&vm, 0, 4), b"vhd!");

    let img = dir.path().join("src.vhdx");
    ok(&["create", "-f", "vhdx", p(&img), "8M"]);
    let hello = dir.path().join("hello");
    fs::write(&hello, b"hello").unwrap();
    ok(&["write", p(&img), "1M", p(&hello)]);
    let vm2 = dir.path().join("fromvm");
    ok(&["checkpoint", "init", p(&vm2), "--from", p(&img)]);
    assert_eq!(active_read(&vm2, MIB, 5), b"hello");
    let nodes = list_json(&vm2);
    assert_eq!(nodes.len(), 2);
    fails(1, &["checkpoint", "init", p(&dir.path().join("x"))]);
}

#[test]
fn chain_subcommands_help_has_examples() {
    for cmd in [
        vec!["merge"],
        vec!["rebase"],
        vec!["checkpoint"],
        vec!["checkpoint", "init"],
        vec!["checkpoint", "create"],
        vec!["checkpoint", "list"],
        vec!["checkpoint", "revert"],
        vec!["checkpoint", "delete"],
        vec!["checkpoint", "merge"],
        vec!["checkpoint", "path"],
    ] {
        let mut args = cmd.clone();
        args.push("--help");
        let out = ok(&args);
        assert!(out.contains("Example"), "{cmd:?}: {out}");
        assert!(
            out.contains(&format!("vdisk {} ", cmd.join(" "))),
            "{cmd:?}: {out}"
        );
    }
    let out = ok(&["info", "--help"]);
    assert!(out.contains("--backing-chain"), "{out}");
    let out = ok(&["create", "--help"]);
    assert!(out.contains("-b base.vhdx"), "{out}");
}

/// Run `vdisk args...`, which must succeed; return stderr.
fn ok_stderr(args: &[&str]) -> String {
    let out = run(args);
    assert!(
        out.status.success(),
        "vdisk {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stderr).into_owned()
}

#[test]
fn sizes_take_fractions_and_round_up_to_whole_sectors() {
    let dir = tmp();
    let img = |n: &str| dir.path().join(n);
    // 1.5G is exact: no note.
    let e = ok_stderr(&["create", "-f", "vhdx", p(&img("a.vhdx")), "1.5G"]);
    assert!(!e.contains("rounded"), "{e}");
    assert_eq!(info_json(&img("a.vhdx"))["virtual-size"], 1_610_612_736u64);
    // Whole 512-byte sectors, as qemu-img rounds, with a note.
    let e = ok_stderr(&["create", "-f", "raw", p(&img("b.raw")), "1000"]);
    assert!(
        e.contains(
            "SIZE 1000 (1000 bytes) rounded up to 1024 bytes, a whole number of 512-byte sectors"
        ),
        "{e}"
    );
    assert_eq!(fs::metadata(img("b.raw")).unwrap().len(), 1024);
    let e = ok_stderr(&["create", "-f", "raw", p(&img("c.raw")), "1.3K"]);
    assert!(e.contains("rounded up to 1536 bytes"), "{e}");
    assert_eq!(fs::metadata(img("c.raw")).unwrap().len(), 1536);
    // A VHDX with 4096-byte logical sectors: whole 4096-byte sectors.
    let e = ok_stderr(&[
        "create",
        "-o",
        "logical_sector_size=4096",
        p(&img("d.vhdx")),
        "1.1M",
    ]);
    assert!(e.contains("4096-byte sectors"), "{e}");
    assert_eq!(info_json(&img("d.vhdx"))["virtual-size"], 1_155_072u64);
    // Resize rounds the new size the same way.
    let e = ok_stderr(&["resize", p(&img("b.raw")), "+1000"]);
    assert!(e.contains("rounded up to 2048 bytes"), "{e}");
    assert_eq!(fs::metadata(img("b.raw")).unwrap().len(), 2048);
    let e = ok_stderr(&["resize", p(&img("d.vhdx")), "1.5M"]);
    assert!(!e.contains("rounded"), "{e}");
    assert_eq!(info_json(&img("d.vhdx"))["virtual-size"], 3 * MIB / 2);
    // Refused, saying why, and nothing is created.
    for (size, why) in [
        ("-1G", "a size cannot be negative"),
        ("12X", "unknown suffix 'X'"),
        ("1.G", "a decimal point needs digits after it"),
        ("abc", "expected a number"),
        ("99999999999T", "too large"),
    ] {
        let e = fails(1, &["create", "-f", "raw", p(&img("x.raw")), "--", size]);
        assert!(
            e.contains(&format!("invalid SIZE: invalid size '{size}': {why}")),
            "{e}"
        );
        assert!(!img("x.raw").exists());
    }
    // An offset or length must be a whole number of bytes.
    let e = fails(1, &["read", p(&img("a.vhdx")), "1.3K", "1"]);
    assert!(
        e.contains("invalid OFFSET: invalid size '1.3K': not a whole number of bytes"),
        "{e}"
    );
    let out = run(&["read", p(&img("a.vhdx")), "0.5K", "0.5K"]);
    assert!(out.status.success());
    assert_eq!(out.stdout.len(), 512);
}

#[test]
fn a_parent_identity_mismatch_names_the_command_that_relinks() {
    let dir = tmp();
    let data = dir.path().join("data");
    fs::write(&data, pattern(4096, 9)).unwrap();
    for (base, child) in [("base.vhdx", "child.avhdx"), ("base.vhd", "child.vhd")] {
        let base = dir.path().join(base);
        let child = dir.path().join(child);
        ok(&["create", p(&base), "8M"]);
        ok(&["write", p(&base), "0", p(&data)]);
        ok(&["create", "-b", p(&base), p(&child)]);
        if p(&base).ends_with(".vhdx") {
            // Writing the parent renews its DataWriteGuid.
            ok(&["write", p(&base), "1M", p(&data)]);
        } else {
            // A VHD keeps its unique id when written: a new disk under the
            // parent's name has another one.
            ok(&[
                "convert",
                "-O",
                "vhd",
                p(&base),
                p(&dir.path().join("copy.vhd")),
            ]);
            fs::rename(dir.path().join("copy.vhd"), &base).unwrap();
        }
        let e = fails(1, &["read", p(&child), "0", "4096"]);
        let want = format!(
            "vdisk: hint: if {b} still holds the data {c} was made over, `vdisk rebase -u -b {b} \
             {c}` relinks {c} to it\n",
            b = p(&base),
            c = p(&child)
        );
        assert!(e.contains("it is not this disk's parent"), "{e}");
        assert!(e.ends_with(&want), "{e}");
        // info shows the disk anyway, with the same hint.
        let out = run(&["info", p(&child)]);
        assert!(out.status.success());
        assert!(String::from_utf8_lossy(&out.stderr).contains(&want));
        // The command works: the child reads through its parent again.
        ok(&["rebase", "-u", "-b", p(&base), p(&child)]);
        let out = run(&["read", p(&child), "0", "4096"]);
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert_eq!(out.stdout, pattern(4096, 9));
    }
}
