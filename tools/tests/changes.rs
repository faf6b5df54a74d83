//! `vdisk changes` and `vdisk checkpoint changes`: the listing (human and
//! JSON), --verify, --output-image (a delta over FROM that reads as TO,
//! the bundle untouched), and the errors.
// Test disks are a few MiB: their sizes fit any integer type.
#![allow(clippy::cast_possible_truncation)]

mod common;

use common::*;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

const MIB: u64 = 1 << 20;

/// Write `data` into `img` at `offset` through `vdisk write`.
fn put(img: &Path, offset: u64, data: &[u8]) {
    let dir = tmp();
    let f = dir.path().join("data");
    std::fs::write(&f, data).unwrap();
    ok(&["write", p(img), &offset.to_string(), p(&f)]);
}

fn active(vm: &Path) -> PathBuf {
    PathBuf::from(ok(&["checkpoint", "path", p(vm)]).trim())
}

/// The (start, length, zero) of a changes JSON array, checking each
/// object's keys (data is the opposite of zero).
fn parse(json: &str) -> Vec<(u64, u64, bool)> {
    let v: serde_json::Value = serde_json::from_str(json).unwrap();
    v.as_array()
        .unwrap()
        .iter()
        .map(|o| {
            let keys: Vec<&str> = o.as_object().unwrap().keys().map(|k| k.as_str()).collect();
            assert_eq!(keys.len(), 4, "{o}");
            let zero = o["zero"].as_bool().unwrap();
            assert_eq!(o["data"].as_bool(), Some(!zero), "{o}");
            (
                o["start"].as_u64().unwrap(),
                o["length"].as_u64().unwrap(),
                zero,
            )
        })
        .collect()
}

/// Every file of `dir` and its bytes.
fn snapshot(dir: &Path) -> BTreeMap<String, Vec<u8>> {
    std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap())
        .filter(|e| e.file_type().unwrap().is_file())
        .map(|e| {
            (
                e.file_name().to_string_lossy().into_owned(),
                std::fs::read(e.path()).unwrap(),
            )
        })
        .collect()
}

/// A bundle: base <- one (1 MiB + 3 sectors of data at 1 MiB) <- two (a
/// 2 MiB block at 4 MiB, zeros over 8..10 MiB) <- active (4 KiB at 12 MiB).
fn bundle(dir: &Path, format: &str) -> PathBuf {
    let vm = dir.join("vm");
    ok(&["checkpoint", "init", "-f", format, p(&vm), "16M"]);
    put(&active(&vm), MIB, &pattern(MIB as usize + 1536, 1));
    ok(&["checkpoint", "create", p(&vm), "one"]);
    put(&active(&vm), 4 * MIB, &pattern(2 * MIB as usize, 2));
    put(&active(&vm), 8 * MIB, &vec![0u8; 2 * MIB as usize]);
    ok(&["checkpoint", "create", p(&vm), "two"]);
    put(&active(&vm), 12 * MIB, &pattern(4096, 3));
    vm
}

#[test]
fn checkpoint_changes_lists_verifies_and_writes_a_delta() {
    for format in ["vhdx", "vhd"] {
        let t = tmp();
        let vm = bundle(t.path(), format);
        let ext = if format == "vhdx" { "avhdx" } else { "avhd" };

        // one -> the active disk: two's layer and the active disk's.
        let json = ok(&["checkpoint", "changes", "--output", "json", p(&vm), "one"]);
        assert_eq!(
            parse(&json),
            [
                (4 * MIB, 2 * MIB, false),
                (8 * MIB, 2 * MIB, false),
                (12 * MIB, 4096, false)
            ],
            "{format}"
        );
        // base -> two: one's layer and two's.
        let json = ok(&[
            "checkpoint",
            "changes",
            "--output",
            "json",
            p(&vm),
            "base",
            "two",
        ]);
        assert_eq!(
            parse(&json),
            [
                (MIB, MIB + 1536, false),
                (4 * MIB, 2 * MIB, false),
                (8 * MIB, 2 * MIB, false)
            ],
            "{format}"
        );
        // Backwards, two -> one: two's layer, where one reads zeros
        // (nothing allocated down its chain).
        let json = ok(&[
            "checkpoint",
            "changes",
            "--output",
            "json",
            p(&vm),
            "two",
            "one",
        ]);
        assert_eq!(
            parse(&json),
            [(4 * MIB, 2 * MIB, true), (8 * MIB, 2 * MIB, true)],
            "{format}"
        );

        // The human form; --verify: the zeros written over zeros are
        // listed but do not differ.
        let human = ok(&["checkpoint", "changes", "--verify", p(&vm), "one"]);
        assert!(
            human.starts_with("Offset          Length          Reads\n"),
            "{human}"
        );
        assert!(
            human.contains("\n0x400000        0x200000        data\n"),
            "{human}"
        );
        assert!(
            // (A VHD is a little larger: CHS rounding.)
            human.contains("3 changes, 4.004 MiB (4198400 bytes) that may differ of 16"),
            "{human}"
        );
        assert!(
            human.contains(
                "compared; 2.004 MiB (2101248 bytes) differ, all inside the 3 changes listed, of 4.004 MiB (4198400 bytes)"
            ),
            "{human}"
        );
        // With JSON, stdout stays JSON; the report and -p go to stderr.
        let out = run(&[
            "checkpoint",
            "changes",
            "--output",
            "json",
            "--verify",
            "-p",
            p(&vm),
            "one",
        ]);
        assert!(out.status.success());
        assert_eq!(parse(&String::from_utf8(out.stdout).unwrap()).len(), 3);
        let err = String::from_utf8(out.stderr).unwrap();
        assert!(err.contains("Verified: 16"), "{err}");
        assert!(err.contains("(100.00/100%)"), "{err}");

        // A new branch: revert to one and write there. two -> the active
        // disk: both branches above one, split where the active disk reads
        // its own data.
        ok(&["checkpoint", "revert", p(&vm), "one"]);
        put(&active(&vm), 4 * MIB + 512, &pattern(1024, 4));
        let json = ok(&["checkpoint", "changes", "--output", "json", p(&vm), "two"]);
        assert_eq!(
            parse(&json),
            [
                (4 * MIB, 512, true),
                (4 * MIB + 512, 1024, false),
                (4 * MIB + 1536, 2 * MIB - 1536, true),
                (8 * MIB, 2 * MIB, true)
            ],
            "{format}"
        );

        // The delta over two reads as the active disk; the bundle is
        // untouched and no temporary file is left.
        let before = snapshot(&vm);
        let out_dir = t.path().join("backup");
        std::fs::create_dir(&out_dir).unwrap();
        let delta = out_dir.join(format!("delta.{ext}"));
        let says = ok(&[
            "checkpoint",
            "changes",
            "--verify",
            "--output-image",
            p(&delta),
            p(&vm),
            "two",
        ]);
        assert!(
            says.contains(&format!("Wrote '{}'", delta.display())),
            "{says}"
        );
        assert!(snapshot(&vm) == before, "{format}: the bundle changed");
        let files: Vec<String> = snapshot(&out_dir).into_keys().collect();
        assert_eq!(files, [format!("delta.{ext}")]);
        let same = ok(&[
            "--parent-dir",
            p(&vm),
            "compare",
            p(&delta),
            p(&active(&vm)),
        ]);
        assert!(same.contains("Images are identical"), "{same}");
        // It is a child of two's disk: a change the delta left out would
        // show (two reads the 8 MiB zeros and 4 MiB block the active disk
        // does not).
        let two = vm.join(two_disk(&vm));
        let out = run(&["--parent-dir", p(&vm), "compare", p(&delta), p(&two)]);
        assert_eq!(out.status.code(), Some(1), "{format}: differs from two");
        assert!(String::from_utf8_lossy(&out.stdout).contains("Content mismatch"));
        // Written again, it is replaced.
        ok(&[
            "checkpoint",
            "changes",
            "--output-image",
            p(&delta),
            p(&vm),
            "two",
        ]);
        assert!(ok(&[
            "--parent-dir",
            p(&vm),
            "compare",
            p(&delta),
            p(&active(&vm))
        ])
        .contains("Images are identical"));
    }
}

/// The disk file of checkpoint "two".
fn two_disk(vm: &Path) -> String {
    let json = ok(&["checkpoint", "list", "--output", "json", p(vm)]);
    let v: serde_json::Value = serde_json::from_str(&json).unwrap();
    v.as_array()
        .unwrap()
        .iter()
        .find(|n| n["name"] == "two")
        .map(|n| n["disk"].as_str().unwrap().to_string())
        .unwrap()
}

#[test]
fn checkpoint_changes_errors() {
    let t = tmp();
    let vm = bundle(t.path(), "vhdx");
    let e = fails(1, &["checkpoint", "changes", p(&vm), "nope"]);
    assert!(
        e.contains("no checkpoint named \"nope\" (checkpoints: base, one, two)"),
        "{e}"
    );
    let e = fails(1, &["checkpoint", "changes", p(&vm), "one", "nope"]);
    assert!(e.contains("no checkpoint named \"nope\""), "{e}");
    // A delta into the bundle, or named for the other format, is refused
    // before anything is listed or written.
    let before = snapshot(&vm);
    let inside = vm.join("delta.avhdx");
    let out = run(&[
        "checkpoint",
        "changes",
        "--output-image",
        p(&inside),
        p(&vm),
        "one",
    ]);
    assert_eq!(out.status.code(), Some(1));
    assert!(out.stdout.is_empty());
    let e = String::from_utf8_lossy(&out.stderr);
    assert!(e.contains("may not be written into the bundle"), "{e}");
    assert!(snapshot(&vm) == before, "the bundle changed");
    let wrong = t.path().join("delta.avhd");
    let e = fails(
        1,
        &[
            "checkpoint",
            "changes",
            "--output-image",
            p(&wrong),
            p(&vm),
            "one",
        ],
    );
    assert!(
        e.contains("the name says a VHD, but the delta is a differencing disk over")
            && e.contains("name it .avhdx"),
        "{e}"
    );
    assert!(!wrong.exists());
    let e = fails(
        1,
        &["checkpoint", "changes", p(&t.path().join("none")), "one"],
    );
    assert!(e.contains("not a bundle directory"), "{e}");
    // While a writer (a VM) holds the active disk, it cannot be read: the
    // lock error names it.
    let writer = image::open(
        active(&vm),
        &image::OpenOptions::new(image::Format::Vhdx).writable(),
    )
    .unwrap();
    let e = fails(1, &["checkpoint", "changes", p(&vm), "one"]);
    assert!(
        e.contains("lock: the image is in use by ") && e.contains(".avhdx"),
        "{e}"
    );
    drop(writer);
    ok(&["checkpoint", "changes", p(&vm), "one"]);
}

/// Two images of one chain, made with `vdisk create -b`: an ancestor and
/// its child, two siblings; images of different chains are refused.
#[test]
fn changes_between_images_of_one_chain() {
    let t = tmp();
    let base = t.path().join("base.vhdx");
    create_vhdx_1m(&base, "8M");
    put(&base, 0, &pattern(3 * MIB as usize, 1));
    let child = t.path().join("child.avhdx");
    let sib = t.path().join("sib.avhdx");
    ok(&["create", "-b", p(&base), p(&child)]);
    ok(&["create", "-b", p(&base), p(&sib)]);
    put(&child, 2 * MIB + 512, &pattern(512, 2));
    put(&child, 6 * MIB, &pattern(MIB as usize, 3));
    put(&sib, 2 * MIB + 1024, &pattern(1024, 4));

    let json = ok(&["changes", "--output", "json", p(&base), p(&child)]);
    assert_eq!(
        parse(&json),
        [(2 * MIB + 512, 512, false), (6 * MIB, MIB, false)]
    );
    // Siblings: both sides' sectors, merged where they touch; where the
    // sibling (NEW) reads the base's zeros, marked zero.
    let json = ok(&["changes", "--output", "json", p(&child), p(&sib)]);
    assert_eq!(
        parse(&json),
        [(2 * MIB + 512, 1536, false), (6 * MIB, MIB, true)]
    );
    // --verify and the delta over child, which reads as sib (beside it:
    // no --parent-dir needed).
    let delta = t.path().join("delta.avhdx");
    let says = ok(&[
        "changes",
        "--verify",
        "--output-image",
        p(&delta),
        p(&child),
        p(&sib),
    ]);
    assert!(says.contains("Verified: 8 MiB"), "{says}");
    assert!(ok(&["compare", p(&delta), p(&sib)]).contains("Images are identical"));
    let chain = ok(&["info", "--backing-chain", "--output", "json", p(&delta)]);
    assert!(chain.contains("child.avhdx"), "{chain}");

    // Not of one chain: both chains named.
    let other = t.path().join("other.vhdx");
    create_vhdx_1m(&other, "8M");
    let e = fails(1, &["changes", p(&other), p(&child)]);
    assert!(
        e.contains("are not of one chain: their chains share no file")
            && e.contains("child.avhdx -> ")
            && e.contains("base.vhdx"),
        "{e}"
    );
    // The delta may not replace a disk of either chain.
    let h = std::fs::read(&base).unwrap();
    let e = fails(
        1,
        &["changes", "--output-image", p(&base), p(&child), p(&sib)],
    );
    assert!(
        e.contains("would replace a disk of the chains compared"),
        "{e}"
    );
    assert!(std::fs::read(&base).unwrap() == h);
    // A raw image has no changes from itself, and no delta.
    let raw = t.path().join("disk.raw");
    ok(&["create", "-f", "raw", p(&raw), "1M"]);
    assert_eq!(
        parse(&ok(&["changes", "--output", "json", p(&raw), p(&raw)])),
        []
    );
    let e = fails(
        1,
        &["changes", "--output-image", p(&delta), p(&raw), p(&raw)],
    );
    assert!(
        e.contains("is a raw image, which cannot have a differencing disk"),
        "{e}"
    );
}

#[test]
fn changes_help_describes_the_command() {
    for cmd in [vec!["changes"], vec!["checkpoint", "changes"]] {
        let mut args = cmd.clone();
        args.push("--help");
        let out = ok(&args);
        assert!(out.contains("Example"), "{cmd:?}: {out}");
        assert!(
            out.contains(&format!("vdisk {} ", cmd.join(" "))),
            "{cmd:?}"
        );
        for what in [
            "--verify",
            "--output-image",
            "--output <OUTPUT>",
            "\"start\": 2097152, \"length\": 2097152, \"zero\": false, \"data\": true",
            "lowest common ancestor",
            "Exit status: 0 done, 1 error",
        ] {
            assert!(out.contains(what), "{cmd:?}: no {what} in {out}");
        }
    }
    let out = ok(&["checkpoint", "--help"]);
    assert!(
        out.contains("vdisk checkpoint changes vm before-upgrade"),
        "{out}"
    );
}
