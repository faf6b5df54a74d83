//! End-to-end tests of format detection that cannot destroy: a file named
//! as a VHDX or VHD without its signature is refused as corrupt, saying
//! what survives; `create` and `convert` take the format from the target's
//! name; an image guessed raw refuses writes to its first sector (and
//! writes that would make it detect as a fixed VHD) unless `-f raw`.

// Test images and buffers are small: their offsets and sizes fit any integer type.
#![allow(clippy::cast_possible_truncation)]

mod common;
use common::*;

use std::fs;
use std::os::unix::fs::FileExt;
use std::path::Path;

const MIB: u64 = 1 << 20;

/// The format `vdisk info --output json` reports.
fn format_of(img: &Path, extra: &[&str]) -> String {
    let mut args = vec!["info", "--output", "json"];
    args.extend(extra);
    args.push(p(img));
    let v: serde_json::Value = serde_json::from_str(&ok(&args)).unwrap();
    v["format"].as_str().unwrap().to_string()
}

/// Run `vdisk args`, which must succeed; return stderr.
fn ok_stderr(args: &[&str]) -> String {
    let out = run(args);
    assert!(
        out.status.success(),
        "vdisk {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// The issue's case: a VHDX whose first 8 bytes were zeroed is not taken
/// for raw. Every command refuses it as corrupt, naming the file and what
/// survives, and `vdisk write` does not touch it; -f raw reads it as raw.
#[test]
fn a_vhdx_without_its_signature_is_refused_not_overwritten() {
    let dir = tmp();
    for name in ["x.vhdx", "child.AVHDX"] {
        let img = dir.path().join(name);
        create_vhdx_1m(&img, "64M");
        let note = dir.path().join("note.txt");
        fs::write(&note, b"a note").unwrap();
        ok(&["write", p(&img), "1M", p(&note)]);
        fs::OpenOptions::new()
            .write(true)
            .open(&img)
            .unwrap()
            .write_all_at(&[0u8; 8], 0)
            .unwrap();
        let before = fs::read(&img).unwrap();
        for args in [
            vec!["write", p(&img), "0", p(&note)],
            vec!["info", p(&img)],
            vec!["read", p(&img), "0", "512"],
            vec!["convert", "-O", "raw", p(&img), "/dev/null"],
            vec!["check", p(&img)],
        ] {
            let e = fails(1, &args);
            for want in [
                &format!(
                    "vdisk: {}: corrupt VHDX file identifier at offset 0x0",
                    p(&img)
                ),
                "the name says VHDX",
                "00 00 00 00 00 00 00 00",
                "a valid VHDX header at 0x10000 (sequence",
                "a valid VHDX header at 0x20000 (sequence",
                "a valid VHDX region table at 0x30000",
                "a valid VHDX region table at 0x40000",
                "vdisk check -f vhdx",
                "--salvage",
                "-f raw",
            ] {
                assert!(e.contains(want), "{args:?}: no {want:?} in {e}");
            }
        }
        assert!(fs::read(&img).unwrap() == before, "{name} was modified");
        // Read as raw on request: the header copy at 64 KiB is there.
        let out = run(&["read", "-f", "raw", p(&img), "64K", "4"]);
        assert!(out.status.success());
        assert_eq!(out.stdout, b"head");
        // The way forward the message gives: check names the damage, -r all
        // writes the signature back (headers and region tables are intact)
        // and changes nothing else; the image then reads as before.
        let e = fails(2, &["check", "-f", "vhdx", p(&img)]);
        let out = run(&["check", "-f", "vhdx", p(&img)]);
        let report = String::from_utf8_lossy(&out.stdout);
        assert!(
            report.contains("ERROR VHDX file identifier at offset 0x0: bad signature")
                && report.contains("only the signature is lost (repair with -r all)"),
            "{report}{e}"
        );
        assert!(
            fs::read(&img).unwrap() == before,
            "check alone writes nothing"
        );
        ok(&["check", "-r", "all", "-f", "vhdx", p(&img)]);
        let after = fs::read(&img).unwrap();
        assert_eq!(&after[..8], b"vhdxfile");
        assert!(after[8..] == before[8..], "only the signature was written");
        assert_eq!(read_bytes(&img, MIB, 6), b"a note");
        ok(&["check", p(&img)]);
    }
    // Signature and both headers gone: nothing says it is a VHDX any more,
    // and check refuses it rather than "repairing" it.
    let img = dir.path().join("gone.vhdx");
    create_vhdx_1m(&img, "16M");
    let f = fs::OpenOptions::new().write(true).open(&img).unwrap();
    for at in [0, 64 * 1024, 128 * 1024] {
        f.write_all_at(&[0u8; 8], at).unwrap();
    }
    let before = fs::read(&img).unwrap();
    let e = fails(1, &["check", "-r", "all", "-f", "vhdx", p(&img)]);
    assert!(e.contains("bad signature"), "{e}");
    assert!(fs::read(&img).unwrap() == before, "nothing written");
}

/// A file named `.vhd` or `.avhd` without a footer (neither at the end nor
/// a copy at 0) is refused as corrupt with what survives: a dynamic disk
/// header at 512, a footer that is no longer the last 512 bytes.
#[test]
fn a_vhd_without_its_footers_is_refused_saying_what_survives() {
    let dir = tmp();
    // A dynamic VHD whose footer copy and trailing footer lost their cookies.
    let d = dir.path().join("d.vhd");
    ok(&["create", "-f", "vhd", p(&d), "8M"]);
    let len = fs::metadata(&d).unwrap().len();
    let f = fs::OpenOptions::new().write(true).open(&d).unwrap();
    f.write_all_at(&[0u8; 8], 0).unwrap();
    f.write_all_at(&[0u8; 8], len - 512).unwrap();
    let before = fs::read(&d).unwrap();
    let e = fails(1, &["info", p(&d)]);
    let at = format!("corrupt VHD footer at offset {:#x}", len - 512);
    for want in [
        p(&d),
        at.as_str(),
        "the name says VHD",
        "a valid VHD dynamic disk header at 0x200 (block size 2097152",
        "vdisk check -f vhd",
        "-f raw",
    ] {
        assert!(e.contains(want), "no {want:?} in {e}");
    }
    // Only the cookies were lost: check -r all puts the footer back at the
    // end and at 0 (its checksum proves the rest intact).
    let out = run(&["check", "-f", "vhd", p(&d)]);
    assert_eq!(out.status.code(), Some(2));
    let report = String::from_utf8_lossy(&out.stdout);
    assert!(
        report.contains("only the cookie is lost (repair with -r all)"),
        "{report}"
    );
    ok(&["check", "-r", "all", "-f", "vhd", p(&d)]);
    let after = fs::read(&d).unwrap();
    assert_eq!(&after[..8], b"conectix");
    assert_eq!(&after[after.len() - 512..][..8], b"conectix");
    assert!(after[8..after.len() - 512] == before[8..before.len() - 512]);
    ok(&["check", p(&d)]);
    // A damaged footer (checksum no longer matches) is not "repaired".
    let g = dir.path().join("g.vhd");
    ok(&["create", "-f", "vhd", p(&g), "8M"]);
    let len = fs::metadata(&g).unwrap().len();
    let f = fs::OpenOptions::new().write(true).open(&g).unwrap();
    f.write_all_at(&[0u8; 8], 0).unwrap();
    f.write_all_at(&[0u8; 12], len - 512).unwrap(); // the cookie and the features
    let before = fs::read(&g).unwrap();
    fails(1, &["check", "-r", "all", "-f", "vhd", p(&g)]);
    assert!(fs::read(&g).unwrap() == before, "nothing written");
    // A fixed VHD extended past its footer (two sectors appended).
    let fx = dir.path().join("f.avhd");
    ok(&["create", "-f", "vhd", "-o", "subformat=fixed", p(&fx), "1M"]);
    let footer_at = fs::metadata(&fx).unwrap().len() - 512;
    let f = fs::OpenOptions::new().write(true).open(&fx).unwrap();
    f.set_len(footer_at + 512 + 1024).unwrap();
    let e = fails(1, &["write", p(&fx), "4096", "/dev/null"]);
    let want = format!(
        "a valid VHD footer at {footer_at:#x} (1536 bytes before the end of the file): a fixed \
         disk of"
    );
    assert!(e.contains(&want), "no {want:?} in {e}");
    // Nothing at all: says so.
    let z = dir.path().join("zeros.vhd");
    fs::write(&z, vec![0u8; 4096]).unwrap();
    let e = fails(1, &["info", p(&z)]);
    assert!(e.contains("no VHDX or VHD structure found"), "{e}");
    assert_eq!(format_of(&z, &["-f", "raw"]), "raw");
}

/// `create` and `convert` without -f/-O take the format from the target's
/// name (any case), say so on stderr, and keep stdout as before; a format
/// given against the name is obeyed with a warning.
#[test]
fn create_and_convert_take_the_format_from_the_name() {
    let dir = tmp();
    for (name, fmt) in [
        ("a.vhdx", "vhdx"),
        ("b.AVHDX", "vhdx"),
        ("c.vhd", "vpc"),
        ("d.avhd", "vpc"),
        ("e.img", "raw"),
    ] {
        let img = dir.path().join(name);
        let out = run(&["create", p(&img), "8M"]);
        assert!(out.status.success(), "{name}");
        let stdout = String::from_utf8(out.stdout).unwrap();
        let stderr = String::from_utf8(out.stderr).unwrap();
        let short = if fmt == "vpc" { "vhd" } else { fmt };
        assert!(
            stdout.starts_with(&format!("Formatted '{}', fmt={short} ", p(&img))),
            "{name}: {stdout}"
        );
        assert!(
            stderr.contains(&format!("vdisk: note: no -f given: format {short}")),
            "{name}: {stderr}"
        );
        assert_eq!(format_of(&img, &[]), short, "{name}");
        if let Some(q) = qemu_img() {
            let out = std::process::Command::new(q)
                .args(["info", "--output", "json"])
                .arg(&img)
                .output()
                .unwrap();
            let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
            assert_eq!(v["format"], fmt, "{name}: qemu-img");
        }
    }
    // convert: the issue's case made a raw conv.vhdx.
    let src = dir.path().join("data.raw");
    let f = fs::File::create(&src).unwrap();
    f.set_len(4 * MIB).unwrap();
    f.write_all_at(b"payload", MIB).unwrap();
    for (name, fmt) in [
        ("conv.vhdx", "vhdx"),
        ("conv.vhd", "vhd"),
        ("conv.bin", "raw"),
    ] {
        let dst = dir.path().join(name);
        let e = ok_stderr(&["convert", p(&src), p(&dst)]);
        assert!(
            e.contains(&format!("vdisk: note: no -O given: format {fmt}")),
            "{name}: {e}"
        );
        assert_eq!(format_of(&dst, &[]), fmt, "{name}");
        assert_eq!(read_bytes(&dst, MIB, 7), b"payload", "{name}");
    }
    // Against the name: obeyed, with a warning; opening then needs -f.
    let r = dir.path().join("r.vhdx");
    let e = ok_stderr(&["create", "-f", "raw", p(&r), "1M"]);
    assert!(
        e.contains("warning") && e.contains("raw image") && e.contains("-f raw"),
        "{e}"
    );
    fails(1, &["info", p(&r)]);
    assert_eq!(format_of(&r, &["-f", "raw"]), "raw");
    let v = dir.path().join("v.vhdx");
    let e = ok_stderr(&["convert", "-O", "vpc", p(&src), p(&v)]);
    assert!(e.contains("warning") && e.contains("Windows"), "{e}");
    assert_eq!(format_of(&v, &[]), "vhd");
}

/// With -b and no -f the child takes its parent's format; a child name that
/// says the other format is refused (the file would not be what its name
/// says); -f makes it a warning.
#[test]
fn a_child_named_for_the_other_format_is_refused() {
    let dir = tmp();
    let base = dir.path().join("base.vhd");
    ok(&["create", "-f", "vhd", p(&base), "8M"]);
    let child = dir.path().join("child.vhdx");
    let e = fails(1, &["create", "-b", p(&base), p(&child)]);
    for want in [
        p(&child),
        "the name says a VHDX",
        "a VHD",
        ".avhd",
        "-f vhd",
    ] {
        assert!(e.contains(want), "no {want:?} in {e}");
    }
    assert!(!child.exists());
    let good = dir.path().join("child.avhd");
    ok(&["create", "-b", p(&base), p(&good)]);
    assert_eq!(format_of(&good, &[]), "vhd");
    let e = ok_stderr(&["create", "-f", "vhd", "-b", p(&base), p(&child)]);
    assert!(e.contains("warning"), "{e}");
    assert_eq!(format_of(&child, &[]), "vhd");
}

/// An image guessed raw refuses writes to its first sector and writes that
/// would make it detect as a fixed VHD; -f raw allows both. A guessed raw
/// image is not cut to a length that ends in a VHD footer cookie.
#[test]
fn a_guessed_raw_image_keeps_its_first_sector() {
    let dir = tmp();
    let img = dir.path().join("disk.img");
    let f = fs::File::create(&img).unwrap();
    f.set_len(MIB).unwrap();
    let mbr = dir.path().join("mbr");
    fs::write(&mbr, [0x55u8; 512]).unwrap();
    let cookie = dir.path().join("cookie");
    fs::write(&cookie, b"conectix").unwrap();
    for (at, what) in [("0", "first sector"), ("511", "first sector")] {
        let e = fails(1, &["write", p(&img), at, p(&mbr)]);
        assert!(
            e.contains(p(&img)) && e.contains(what) && e.contains("-f raw"),
            "{e}"
        );
    }
    let end = (MIB - 512).to_string();
    let e = fails(1, &["write", p(&img), &end, p(&cookie)]);
    assert!(e.contains("fixed VHD") && e.contains("-f raw"), "{e}");
    assert_eq!(fs::read(&img).unwrap(), vec![0u8; MIB as usize]);
    // Elsewhere: allowed.
    ok(&["write", p(&img), "512", p(&mbr)]);
    ok(&["write", p(&img), "4096", p(&cookie)]);
    // -f raw: the first sector too.
    ok(&["write", "-f", "raw", p(&img), "0", p(&mbr)]);
    assert_eq!(read_bytes(&img, 0, 2), [0x55, 0x55]);
    // A cut that would leave "conectix" 512 bytes before the end.
    let e = fails(1, &["resize", "--force", p(&img), "4608"]);
    assert!(e.contains("fixed VHD") && e.contains("-f raw"), "{e}");
    assert_eq!(fs::metadata(&img).unwrap().len(), MIB);
    ok(&["resize", "--force", p(&img), "8K"]);
    assert_eq!(fs::metadata(&img).unwrap().len(), 8192);
    // Help says so.
    let help = ok(&["write", "--help"]);
    assert!(
        help.contains("first sector") && help.contains("-f raw"),
        "{help}"
    );
}
