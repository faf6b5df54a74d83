//! End-to-end tests of `vdisk compare` on images of different sizes, as
//! qemu-img compare treats them: identical when the longer image's extra
//! part reads as zeros (with a warning), different at the first non-zero
//! byte there, and always different with `-s`. qemu-img, when installed,
//! must give the same verdict (exit status) and print the same lines.

// Test images and buffers are small: their offsets and sizes fit any integer type.
#![allow(clippy::cast_possible_truncation)]

mod common;
use common::*;

use std::fs;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::process::Command;

const MIB: u64 = 1 << 20;

/// `vdisk compare ARGS`: (exit status, stdout).
fn compare(args: &[&str]) -> (i32, String) {
    let mut all = vec!["compare"];
    all.extend(args);
    let out = run(&all);
    (
        out.status.code().unwrap(),
        String::from_utf8(out.stdout).unwrap(),
    )
}

/// qemu-img compare of `a` and `b` (with `flags`) must agree, when
/// installed. The formats are given: qemu-img probes a fixed VHD as raw.
fn qemu_agrees(flags: &[&str], a: &Path, b: &Path, want: &(i32, String)) {
    let Some(q) = qemu_img() else { return };
    let fmt = |x: &Path| if p(x).ends_with(".vhd") { "vpc" } else { "raw" };
    let args: Vec<&str> = flags
        .iter()
        .copied()
        .chain(["-f", fmt(a), "-F", fmt(b), p(a), p(b)])
        .collect();
    let out = Command::new(q).arg("compare").args(&args).output().unwrap();
    let got = (
        out.status.code().unwrap(),
        String::from_utf8(out.stdout).unwrap(),
    );
    assert_eq!(&got, want, "qemu-img compare {args:?}");
}

fn vhd_size(img: &Path) -> u64 {
    let v: serde_json::Value =
        serde_json::from_str(&ok(&["info", "--output", "json", p(img)])).unwrap();
    v["virtual-size"].as_u64().unwrap()
}

/// The case: a raw image and its VHD made by `convert -O vpc`,
/// whose size was rounded up to a CHS geometry.
#[test]
fn a_raw_image_and_its_chs_rounded_vhd_are_identical() {
    let dir = tmp();
    let raw = dir.path().join("data.raw");
    let f = fs::File::create(&raw).unwrap();
    f.set_len(10 * MIB).unwrap();
    f.write_all_at(&pattern(4096, 1), 3 * MIB).unwrap();
    f.write_all_at(&pattern(100, 2), 10 * MIB - 100).unwrap();
    for (name, opts) in [("d.vhd", "subformat=dynamic"), ("f.vhd", "subformat=fixed")] {
        let vhd = dir.path().join(name);
        ok(&["convert", "-O", "vpc", "-o", opts, p(&raw), p(&vhd)]);
        let size = vhd_size(&vhd);
        assert!(size > 10 * MIB, "{name}: {size} is not rounded up");

        let identical = (
            0,
            "Warning: Image size mismatch!\nImages are identical.\n".to_string(),
        );
        for (a, b) in [(&raw, &vhd), (&vhd, &raw)] {
            let got = compare(&[p(a), p(b)]);
            assert_eq!(got, identical, "{name}");
            qemu_agrees(&[], a, b, &got);
        }

        // Strict mode: the sizes differ.
        let strict = (1, "Strict mode: Image size mismatch!\n".to_string());
        for flag in ["-s", "--strict"] {
            let got = compare(&[flag, p(&raw), p(&vhd)]);
            assert_eq!(got, strict, "{name}");
        }
        qemu_agrees(&["-s"], &raw, &vhd, &strict);
        // Same sizes: -s changes nothing.
        assert_eq!(compare(&["-s", p(&raw), p(&raw)]).0, 0);

        // A non-zero byte in the VHD's extra part (sector-aligned, where
        // qemu-img reports the same offset).
        let at = 10 * MIB + 512;
        assert!(at < size, "{name}");
        let one = dir.path().join("one");
        fs::write(&one, [1u8]).unwrap();
        ok(&["write", p(&vhd), &at.to_string(), p(&one)]);
        let differ = (
            1,
            format!("Warning: Image size mismatch!\nContent mismatch at offset {at}!\n"),
        );
        for (a, b) in [(&raw, &vhd), (&vhd, &raw)] {
            let got = compare(&[p(a), p(b)]);
            assert_eq!(got, differ, "{name}");
            qemu_agrees(&[], a, b, &got);
        }

        // A difference in the common part comes first, without the warning
        // (the pattern there is never zero).
        let zero = dir.path().join("zero");
        fs::write(&zero, [0u8]).unwrap();
        ok(&["write", p(&vhd), &(3 * MIB).to_string(), p(&zero)]);
        let got = compare(&[p(&raw), p(&vhd)]);
        assert_eq!(got.0, 1, "{name}");
        assert_eq!(got.1, format!("Content mismatch at offset {}!\n", 3 * MIB));
    }
    let help = ok(&["compare", "--help"]);
    assert!(
        help.contains("--strict") && help.contains("Image size mismatch"),
        "{help}"
    );
}
