//! Files cut short at every structure boundary (each structure's start,
//! end, and a byte inside it): VHDX, dynamic VHD and fixed VHD. Each cut
//! fails with a corruption naming the structure that is cut (at open, or
//! at the read that needs what was lost), or, where nothing needed is
//! lost, opens and reads the data.

use crate::harness::*;
use image::{Format, OpenOptions};
use std::path::Path;

/// What a cut must give.
enum Cut {
    /// Fails to open: a corruption of this structure at this offset.
    Open(&'static str, u64),
    /// Opens; reading the first or last MiB fails: a corruption of this
    /// structure at this offset.
    Read(&'static str, u64),
    /// Opens and reads the base pattern.
    Fine,
}

/// Cut a copy of `src` at each of `cuts` and check the outcome.
fn cuts(src: &Path, format: Format, cuts: &[(u64, Cut)]) {
    let dir = tempfile::tempdir().unwrap();
    for (len, want) in cuts {
        let p = dir.path().join(src.file_name().unwrap());
        std::fs::copy(src, &p).unwrap();
        truncate(&p, *len);
        let what = format!("{} cut at {len:#x}", src.display());
        match want {
            Cut::Fine => {
                opens_with_data(&what, &p, format);
            }
            Cut::Open(structure, off) | Cut::Read(structure, off) => {
                let stage = if matches!(want, Cut::Open(..)) {
                    Stage::Open
                } else {
                    Stage::Read
                };
                let r = front_door(&what, &p, format);
                let e = r.failed(stage, disk::ErrorKind::Corrupt, &p);
                if *len >= 8 || format != Format::Vhdx {
                    assert_corrupt(e, structure, *off);
                }
            }
        }
        std::fs::remove_file(&p).unwrap();
    }
}

#[test]
fn vhdx_cut_at_every_structure_boundary() {
    let dir = tempfile::tempdir().unwrap();
    let src = vhdx_image(dir.path(), "t.vhdx");
    assert_eq!(file_len(&src), 6 * MIB);
    let k = 1024;
    let meta = || Cut::Open("VHDX metadata region", METADATA);
    let mut c = vec![];
    // File identifier, headers, region tables: under 320 KiB is too short.
    for len in [
        0,
        8,
        520,
        64 * k,
        64 * k + 100,
        68 * k,
        128 * k,
        132 * k,
        192 * k,
        256 * k,
        320 * k - 1,
    ] {
        c.push((len, Cut::Open("VHDX file identifier", 0)));
    }
    // Log (empty, not read), metadata table and items: the metadata region
    // is read whole.
    for len in [
        320 * k,
        MIB,
        MIB + 4 * k,
        METADATA,
        METADATA + 64 * k,
        METADATA + 64 * k + 8,
        BAT - 1,
    ] {
        c.push((len, meta()));
    }
    // BAT: entry 0 lost, then block 0 lost.
    c.push((BAT, Cut::Read("VHDX BAT", BAT)));
    c.push((BAT + 4, Cut::Read("VHDX BAT", BAT)));
    for len in [BAT + 8, BAT + 64, 4 * MIB, 4 * MIB + 512 * k, 5 * MIB - 1] {
        c.push((len, Cut::Read("VHDX block", 4 * MIB)));
    }
    // Block 7 (the last MiB).
    for len in [5 * MIB, 5 * MIB + 4096, 6 * MIB - 1] {
        c.push((len, Cut::Read("VHDX block", 5 * MIB)));
    }
    c.push((6 * MIB, Cut::Fine));
    cuts(&src, Format::Vhdx, &c);
    // A writable open refuses a file cut inside a block.
    let p = dir.path().join("w.vhdx");
    std::fs::copy(&src, &p).unwrap();
    truncate(&p, 5 * MIB + 4096);
    let r = run(&p, &OpenOptions::new(Format::Vhdx).writable());
    assert_bounded("VHDX cut in block 7, writable", r.peak);
    let e = r.failed(Stage::Open, disk::ErrorKind::Corrupt, &p);
    has_words(e, &["truncated", "block 7"]);
}

#[test]
fn dynamic_vhd_cut_at_every_structure_boundary() {
    let dir = tempfile::tempdir().unwrap();
    let src = vhd_image(dir.path(), "t.vhd");
    let len = file_len(&src);
    let b0 = u64::from(vhd_bat(&src, 0)) * 512;
    let b7 = u64::from(vhd_bat(&src, 7)) * 512;
    let footer = len - 512;
    let mut c = vec![];
    // Shorter than a footer; then only the footer copy at 0 is left, which
    // says the header lies past the end.
    for l in [0, 100, 510] {
        c.push((l, Cut::Open("VHD footer", 0)));
    }
    c.push((512, Cut::Open("VHD footer", 16)));
    // The footer copy at 0 is used (read-only): the header cut short, the
    // BAT cut short, then the blocks past the end.
    // (The header's table fields, when readable, say the more telling thing:
    // the BAT does not fit.)
    c.push((520, Cut::Open("VHD dynamic disk header", DYN_HEADER)));
    for l in [1000, 1535, VHD_BAT, VHD_BAT + 20] {
        c.push((l, Cut::Open("VHD dynamic disk header", DYN_HEADER + 28)));
    }
    for l in [VHD_BAT + 512, b0, b0 + 256, b0 + 512, b0 + 4096, b7 - 1] {
        c.push((l, Cut::Read("VHD block", b0)));
    }
    for l in [b7, b7 + 512, b7 + 4096] {
        c.push((l, Cut::Read("VHD block", b7)));
    }
    // Every block whole, the trailing footer gone or cut: the copy at 0.
    for l in [footer, footer + 100, len - 2] {
        c.push((l, Cut::Fine));
    }
    c.push((len, Cut::Fine));
    cuts(&src, Format::Vhd, &c);
}

#[test]
fn fixed_vhd_cut_at_every_structure_boundary() {
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path().join("f.vhd");
    let mut o = vhd::CreateOptions::new(SIZE);
    o.fixed = true;
    let d = vhd::Vhd::create(&src, &o, false).unwrap();
    let size = disk::VirtualDisk::virtual_size(&d);
    disk::VirtualDisk::write_at(&d, &vec![FIRST; MIB as usize], 0).unwrap();
    disk::VirtualDisk::write_at(&d, &vec![LAST; MIB as usize], size - MIB).unwrap();
    d.close().unwrap();
    let mut c = vec![];
    for l in [0, 100] {
        c.push((l, Cut::Open("VHD footer", 0)));
    }
    // No footer at the end (a fixed disk has no copy): not a VHD.
    for l in [MIB, size - 1, size, size + 256] {
        c.push((l, Cut::Open("VHD footer", l - 512)));
    }
    // 511 bytes: a footer as Virtual PC wrote them before 2004.
    c.push((size + 511, Cut::Fine));
    c.push((size + 512, Cut::Fine));
    cuts(&src, Format::Vhd, &c);
}
