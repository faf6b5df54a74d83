//! Hostile differencing VHDX: sector bitmap entries (MS-VHDX 2.5.1.2) in
//! undefined states, missing under a PARTIALLY_PRESENT block, past the end
//! of the file, over the file's structures.

use crate::harness::*;
use disk::VirtualDisk;
use image::{CreateOptions, Format, Kind, OpenOptions};
use std::path::PathBuf;

const X: Format = Format::Vhdx;
/// Chunk 0's sector bitmap entry: 2^23 sectors of 512 bytes per chunk, in
/// 1 MiB blocks, is 4096 blocks a chunk.
const SB: u64 = 4096;
const WRITTEN: u8 = 0xCC;

/// A base image and a child over it (1 MiB blocks) whose first 4 KiB were
/// written: block 0 PARTIALLY_PRESENT, chunk 0's sector bitmap present.
fn child(name: &str) -> (tempfile::TempDir, PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    let base = vhdx_image(dir.path(), "base.vhdx");
    let p = dir.path().join(format!("{name}.avhdx"));
    let mut o = vhdx::CreateOptions::new(0);
    o.block_size = MIB as u32;
    let o = CreateOptions {
        parent: Some(base),
        ..CreateOptions::new(Kind::Vhdx(o))
    };
    let img = image::create(&p, &o).unwrap();
    img.disk().write_at(&[WRITTEN; 4096], 0).unwrap();
    img.close().unwrap();
    assert_eq!(bat(&p, 0) & 7, 7, "block 0 PARTIALLY_PRESENT");
    assert_eq!(bat(&p, SB) & 7, 6, "chunk 0's sector bitmap present");
    (dir, p)
}

#[test]
fn the_differencing_base_case_reads_through_its_parent() {
    let (_d, p) = child("ok");
    let r = front_door("differencing child", &p, X);
    assert_eq!(r.stage, Stage::Done, "{:?}", r.err);
    assert!(r.first[..4096].iter().all(|&b| b == WRITTEN));
    assert!(r.first[4096..].iter().all(|&b| b == FIRST));
    assert!(r.last.iter().all(|&b| b == LAST));
}

#[test]
fn sector_bitmap_entry_in_an_undefined_state_is_corrupt() {
    let (_d, p) = child("sbs");
    let e = bat(&p, SB);
    patch(&p, BAT + SB * 8, &((e & !7) | 3).to_le_bytes());
    corrupt(
        "sector bitmap state 3",
        &p,
        X,
        Stage::Read,
        "BAT entry",
        BAT + SB * 8,
        &["sector bitmap entry in undefined state 3"],
    );
}

#[test]
fn partially_present_block_without_its_sector_bitmap_is_corrupt() {
    let (_d, p) = child("sbn");
    set_bat(&p, SB, 0, 0);
    corrupt(
        "PARTIALLY_PRESENT without a sector bitmap",
        &p,
        X,
        Stage::Read,
        "BAT entry",
        BAT,
        &["block 0 is PARTIALLY_PRESENT but its chunk has no sector bitmap block"],
    );
}

#[test]
fn sector_bitmap_block_beyond_eof_is_corrupt() {
    let (_d, p) = child("sbe");
    set_bat(&p, SB, 6, 1 << 40);
    corrupt(
        "sector bitmap beyond EOF",
        &p,
        X,
        Stage::Read,
        "VHDX block",
        1 << 40,
        &[
            "the sector bitmap block of chunk 0",
            "past the end of the file",
        ],
    );
}

#[test]
fn sector_bitmap_block_over_the_metadata_or_the_header_is_corrupt() {
    for (at, what) in [
        (METADATA, "overlaps the metadata region"),
        (0, "invalid file offset 0x0"),
    ] {
        let (_d, p) = child("sbm");
        set_bat(&p, SB, 6, at);
        corrupt(
            "sector bitmap over a structure",
            &p,
            X,
            Stage::Read,
            "BAT entry",
            BAT + SB * 8,
            &[what],
        );
    }
}

#[test]
fn writable_open_with_a_sector_bitmap_past_eof_is_refused_untouched() {
    // Writing would need the lost bitmap: the writable open refuses the
    // image, naming the bitmap block, and leaves the file as it was.
    let (_d, p) = child("sbw");
    set_bat(&p, SB, 6, 1 << 40);
    let before = std::fs::read(&p).unwrap();
    let r = image::open(&p, &OpenOptions::new(X).writable());
    // The writable open's BAT scan already refuses a block past the end.
    let e = r.err().expect("a writable open of a truncated image");
    assert_eq!(e.kind(), disk::ErrorKind::Corrupt, "{e}");
    has_words(&e, &["the sector bitmap block of chunk 0", "truncated"]);
    assert_eq!(std::fs::read(&p).unwrap(), before);
}
