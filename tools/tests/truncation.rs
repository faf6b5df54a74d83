//! `vdisk` on images whose file was cut short: `check` names the truncated
//! blocks (exit 2, JSON truncated-blocks and virtual ranges) and `check -r
//! all` leaves the file's length alone (as `qemu-img check -r all` does),
//! `info` warns "image is truncated: N blocks lie past the end of the
//! file", `read` of lost data fails naming the block, and `convert
//! --salvage` copies what is left, with zeros for the lost ranges it lists
//! (exit 2).

// Test images and buffers are small: their offsets and sizes fit any integer type.
#![allow(clippy::cast_possible_truncation)]

mod common;
use common::*;
use std::fs;
use std::path::Path;
use std::process::Command;

const MIB: u64 = 1 << 20;

fn json(args: &[&str]) -> serde_json::Value {
    let out = run(args);
    serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "vdisk {args:?}: {e}: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        )
    })
}

fn truncate(img: &Path, len: u64) {
    fs::OpenOptions::new()
        .write(true)
        .open(img)
        .unwrap()
        .set_len(len)
        .unwrap();
}

fn len(img: &Path) -> u64 {
    fs::metadata(img).unwrap().len()
}

/// `data` written at 0 of `img` through `vdisk write`.
fn write(img: &Path, data: &[u8]) {
    let src = img.with_extension("src");
    fs::write(&src, data).unwrap();
    ok(&["write", p(img), "0", p(&src)]);
    fs::remove_file(&src).unwrap();
}

/// Check, info, read, repair and salvage of a truncated image whose data
/// is `data` from 0, of which `[0, kept)` survives and `[kept, lost_end)`
/// is lost (one block, `block`).
fn truncated_image_end_to_end(
    img: &Path,
    format: &str,
    data: &[u8],
    kept: u64,
    lost_end: u64,
    block: &str,
) {
    let size = len(img);
    // check: exit 2, the block and its virtual range named.
    let out = run(&["check", p(img)]);
    assert_eq!(out.status.code(), Some(2));
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(text.contains(&format!("{block} (virtual ")), "{text}");
    assert!(
        text.contains("The image is truncated: 1 blocks lie past the end of the file."),
        "{text}"
    );
    assert!(!text.contains("Leaked"), "{text}");
    let j = json(&["check", "--output", "json", p(img)]);
    assert_eq!(j["truncated-blocks"], 1, "{j}");
    assert_eq!(j["leaks"], 0, "{j}");
    let p0 = j["problems"]
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p.get("virtual-offset").is_some())
        .expect("a problem with a virtual range");
    let vlen = p0["virtual-length"].as_u64().unwrap();
    assert_eq!(p0["virtual-offset"].as_u64().unwrap() + vlen, lost_end);
    // check -r all / -r leaks: nothing to repair, the length unchanged.
    for mode in ["all", "leaks"] {
        let out = run(&["check", "-r", mode, p(img)]);
        assert_eq!(out.status.code(), Some(2), "-r {mode}");
        assert_eq!(len(img), size, "-r {mode} changed the length");
    }
    // info warns.
    let i = ok(&["info", p(img)]);
    assert!(
        i.contains("warning: image is truncated: 1 blocks lie past the end of the file"),
        "{i}"
    );
    assert_eq!(
        json(&["info", "--output", "json", p(img)])["truncated-blocks"],
        1
    );
    // What is left reads the same; lost data fails, naming the block.
    assert!(read_bytes(img, 0, kept) == data[..kept as usize]);
    let e = fails(1, &["read", p(img), "0", &lost_end.to_string()]);
    assert!(e.contains(block) && e.contains("is lost"), "{e}");
    assert!(!e.contains("fill whole buffer"), "{e}");
    // convert without --salvage stops at the first lost byte, leaves no target.
    let dir = img.parent().unwrap();
    let plain = dir.join(format!("plain-{format}.raw"));
    let e = fails(1, &["convert", p(img), p(&plain)]);
    assert!(e.contains(block), "{e}");
    assert!(!plain.exists());
    // --salvage: everything readable, zeros for the lost range, listed.
    for (out_fmt, ext) in [("raw", "raw"), ("vhdx", "vhdx")] {
        let rescued = dir.join(format!("rescued-{format}.{ext}"));
        let e = fails(
            2,
            &[
                "convert",
                "--salvage",
                "-p",
                "-O",
                out_fmt,
                p(img),
                p(&rescued),
            ],
        );
        assert!(
            e.contains("vdisk: salvage: 1 ranges")
                && e.contains(&format!("virtual {kept:#x}..{lost_end:#x}"))
                && e.contains(block),
            "{e}"
        );
        let got = read_bytes(&rescued, 0, lost_end);
        assert!(got[..kept as usize] == data[..kept as usize]);
        assert!(got[kept as usize..].iter().all(|&b| b == 0));
        if out_fmt != "raw" {
            assert!(ok(&["check", p(&rescued)]).contains("No errors"));
        }
    }
    // A salvage of an intact image loses nothing: exit 0.
    let whole = dir.join(format!("whole-{format}.raw"));
    ok(&["convert", "--salvage", p(&plain_source(img)), p(&whole)]);
}

/// A copy of nothing in particular: a small intact raw image beside `img`.
fn plain_source(img: &Path) -> std::path::PathBuf {
    let src = img.with_extension("intact.raw");
    fs::write(&src, pattern(4096, 3)).unwrap();
    src
}

#[test]
fn truncated_vhdx_mid_block() {
    let dir = tmp();
    let img = dir.path().join("t.vhdx");
    create_vhdx_1m(&img, "64M");
    let data = pattern(8 * MIB as usize, 1);
    write(&img, &data);
    // Blocks 0..8 lie at 4 MiB.. in order: cut 300 KiB into block 7.
    assert_eq!(len(&img), 12 * MIB);
    truncate(&img, 11 * MIB + 300 * 1024);
    if let Some(q) = qemu_img() {
        // qemu-img agrees: an error, and its repair leaves the file alone.
        let out = Command::new(&q)
            .args(["check", "-f", "vhdx", p(&img)])
            .output()
            .unwrap();
        assert_eq!(out.status.code(), Some(2));
        let e = String::from_utf8_lossy(&out.stderr);
        assert!(
            e.contains("BAT entry 7") && e.contains("after end of file"),
            "{e}"
        );
        let copy = dir.path().join("q.vhdx");
        fs::copy(&img, &copy).unwrap();
        let out = Command::new(&q)
            .args(["check", "-r", "all", "-f", "vhdx", p(&copy)])
            .output()
            .unwrap();
        assert_eq!(out.status.code(), Some(2));
        assert_eq!(len(&copy), len(&img));
        fs::remove_file(&copy).unwrap();
    }
    truncated_image_end_to_end(
        &img,
        "vhdx",
        &data,
        7 * MIB + 300 * 1024,
        8 * MIB,
        "block 7",
    );
}

#[test]
fn truncated_vhd_mid_block() {
    let dir = tmp();
    let img = dir.path().join("t.vhd");
    ok(&["create", "-f", "vhd", p(&img), "16M"]);
    let data = pattern(6 * MIB as usize, 2);
    write(&img, &data);
    // Blocks 0, 1, 2 (2 MiB + a 512-byte bitmap each) from 2048 (a 16 MiB
    // VHD's BAT takes one sector at 1536): cut 100 KiB into block 2's data.
    let block2 = 2048 + 2 * (2 * MIB + 512);
    assert_eq!(len(&img), block2 + 2 * MIB + 512 + 512);
    truncate(&img, block2 + 512 + 100 * 1024);
    truncated_image_end_to_end(&img, "vhd", &data, 4 * MIB + 100 * 1024, 6 * MIB, "block 2");
}

#[test]
fn vhdx_cut_inside_its_bat_warns_in_info() {
    let dir = tmp();
    let img = dir.path().join("b.vhdx");
    create_vhdx_1m(&img, "64M");
    write(&img, &pattern(8 * MIB as usize, 4));
    // The BAT is at 3 MiB: keep its first 5 entries.
    truncate(&img, 3 * MIB + 40);
    let i = ok(&["info", p(&img)]);
    assert!(
        i.contains("warning: image is truncated: 5 blocks lie past the end of the file"),
        "{i}"
    );
    assert!(
        i.contains("59 BAT entries lie past the end of the file"),
        "{i}"
    );
    let j = json(&["info", "--output", "json", p(&img)]);
    assert_eq!(
        (
            j["truncated-blocks"].as_u64(),
            j["lost-bat-entries"].as_u64()
        ),
        (Some(5), Some(59))
    );
    let e = fails(1, &["read", p(&img), "9M", "512"]);
    assert!(e.contains("VHDX BAT") && e.contains("block 9"), "{e}");
    // Writing is refused, the file left alone.
    let src = dir.path().join("x");
    fs::write(&src, [1u8; 512]).unwrap();
    fails(1, &["write", p(&img), "0", p(&src)]);
    assert_eq!(len(&img), 3 * MIB + 40);
    let out = run(&["check", "-r", "all", p(&img)]);
    assert_eq!(out.status.code(), Some(2));
    assert_eq!(len(&img), 3 * MIB + 40);
    // Salvage: every block is lost (zeros), the target complete.
    let rescued = dir.path().join("r.raw");
    let e = fails(2, &["convert", "--salvage", p(&img), p(&rescued)]);
    // One range per block (each names its own block), all of them.
    assert!(e.contains("64 ranges (67108864 bytes)"), "{e}");
    assert!(
        e.contains("virtual 0x900000..0xa00000 (1048576 bytes)"),
        "{e}"
    );
    assert_eq!(len(&rescued), 64 * MIB);
}

#[test]
fn cut_at_a_block_boundary_counts_every_lost_block_and_refuses_writes() {
    let dir = tmp();
    // VHDX: blocks 0..8 at 4 MiB..12 MiB; keep blocks 0..5 whole.
    let x = dir.path().join("x.vhdx");
    create_vhdx_1m(&x, "64M");
    let data = pattern(8 * MIB as usize, 5);
    write(&x, &data);
    truncate(&x, 9 * MIB);
    // VHD: blocks 0, 1, 2 from 2048; keep blocks 0 and 1 whole.
    let v = dir.path().join("v.vhd");
    ok(&["create", "-f", "vhd", p(&v), "16M"]);
    write(&v, &data[..6 * MIB as usize]);
    truncate(&v, 2048 + 2 * (2 * MIB + 512));
    let src = dir.path().join("one");
    fs::write(&src, [7u8; 512]).unwrap();
    for (img, n, kept, first_lost, elsewhere) in [
        (&x, 3, 5 * MIB, "block 5", "40M"),
        (&v, 1, 4 * MIB, "block 2", "12M"),
    ] {
        let before = fs::read(img).unwrap();
        let out = run(&["check", "-r", "all", p(img)]);
        assert_eq!(out.status.code(), Some(2));
        let j = json(&["check", "--output", "json", p(img)]);
        assert_eq!(j["truncated-blocks"], n, "{j}");
        let i = ok(&["info", p(img)]);
        assert!(
            i.contains(&format!(
                "warning: image is truncated: {n} blocks lie past the end of the file"
            )),
            "{i}"
        );
        assert!(read_bytes(img, 0, kept) == data[..kept as usize]);
        let e = fails(1, &["read", p(img), &kept.to_string(), "512"]);
        assert!(e.contains(first_lost), "{e}");
        // A write elsewhere (far from every written block) is refused: the
        // image opens read-only only.
        let e = fails(1, &["write", p(img), elsewhere, p(&src)]);
        assert!(e.contains("truncated") || e.contains("read-only"), "{e}");
        assert!(fs::read(img).unwrap() == before, "{}", img.display());
    }
}
