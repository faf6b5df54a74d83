//! Hostile VHD files: footers, the dynamic disk header, the BAT (parents
//! are in `chain`).

use crate::harness::*;
use disk::{ErrorKind, VirtualDisk};
use image::{Format, OpenOptions};
use std::path::{Path, PathBuf};

const V: Format = Format::Vhd;

fn base(name: &str) -> (tempfile::TempDir, PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    let p = vhd_image(dir.path(), &format!("{name}.vhd"));
    (dir, p)
}

/// A fixed VHD of 8 MiB (CHS-rounded) with the base pattern.
fn fixed(name: &str) -> (tempfile::TempDir, PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join(format!("{name}.vhd"));
    let mut o = vhd::CreateOptions::new(SIZE);
    o.fixed = true;
    let d = vhd::Vhd::create(&p, &o, false).unwrap();
    let size = d.virtual_size();
    d.write_at(&vec![FIRST; MIB as usize], 0).unwrap();
    d.write_at(&vec![LAST; MIB as usize], size - MIB).unwrap();
    d.close().unwrap();
    (dir, p)
}

fn footer_at(p: &Path) -> u64 {
    file_len(p) - 512
}

fn flip(p: &Path, off: u64) {
    let b = read_at(p, off, 1)[0];
    patch(p, off, &[b ^ 0x5a]);
}

#[test]
fn fixed_footer_with_bad_checksum_is_corrupt() {
    let (_d, p) = fixed("fck");
    let f = footer_at(&p);
    flip(&p, f + 100);
    corrupt(
        "fixed VHD footer checksum",
        &p,
        V,
        Stage::Open,
        "VHD footer",
        f + 64,
        &["checksum mismatch"],
    );
}

#[test]
fn fixed_disk_larger_than_its_file_is_corrupt() {
    let (_d, p) = fixed("fsz");
    let f = footer_at(&p);
    edit_vhd_footer(&p, f, true, |b| put_be64(b, 48, 1 << 40));
    corrupt(
        "fixed VHD larger than its file",
        &p,
        V,
        Stage::Open,
        "VHD footer",
        f + 48,
        &["disk size 1099511627776 exceeds"],
    );
}

#[test]
fn trailing_footer_damaged_opens_read_only_from_the_copy() {
    let (_d, p) = base("ftr");
    flip(&p, footer_at(&p) + 100);
    opens_with_data("VHD trailing footer bad", &p, V);
    let img = image::open(&p, &OpenOptions::new(V).writable()).unwrap();
    assert!(!img.disk().is_writable());
    let e = img.disk().write_at(&[1; 512], 0).unwrap_err();
    assert!(e.to_string().contains("read-only"), "{e}");
}

#[test]
fn both_footers_damaged_is_corrupt() {
    let (_d, p) = base("fbb");
    let f = footer_at(&p);
    flip(&p, 100);
    flip(&p, f + 100);
    corrupt(
        "both VHD footers bad",
        &p,
        V,
        Stage::Open,
        "VHD footer",
        f + 64,
        &["checksum mismatch"],
    );
}

#[test]
fn unknown_disk_type_is_corrupt() {
    let (_d, p) = base("fty");
    edit_vhd_footers(&p, true, |b| put_be32(b, 60, 5));
    corrupt(
        "VHD disk type 5",
        &p,
        V,
        Stage::Open,
        "VHD footer",
        footer_at(&p) + 60,
        &["unknown disk type 5"],
    );
}

#[test]
fn current_size_not_a_sector_multiple_is_corrupt() {
    let (_d, p) = base("fcs");
    edit_vhd_footers(&p, true, |b| put_be64(b, 48, SIZE + 100));
    corrupt(
        "VHD size not a sector multiple",
        &p,
        V,
        Stage::Open,
        "VHD footer",
        footer_at(&p) + 48,
        &["not a multiple of 512"],
    );
}

#[test]
fn data_offset_outside_the_file_is_corrupt() {
    let (_d, p) = base("fdo");
    edit_vhd_footers(&p, true, |b| put_be64(b, 16, 1 << 40));
    corrupt(
        "VHD data offset beyond EOF",
        &p,
        V,
        Stage::Open,
        "VHD footer",
        footer_at(&p) + 16,
        &["data offset 0x10000000000"],
    );
}

#[test]
fn dynamic_header_with_bad_cookie_is_corrupt() {
    let (_d, p) = base("hck");
    edit_dyn_header(&p, true, |b| b[..8].copy_from_slice(b"cxspars3"));
    corrupt(
        "VHD dynamic header cookie",
        &p,
        V,
        Stage::Open,
        "VHD dynamic disk header",
        DYN_HEADER,
        &["bad cookie"],
    );
}

#[test]
fn dynamic_header_with_bad_checksum_is_corrupt() {
    let (_d, p) = base("hcs");
    edit_dyn_header(&p, false, |b| b[700] ^= 1);
    corrupt(
        "VHD dynamic header checksum",
        &p,
        V,
        Stage::Open,
        "VHD dynamic disk header",
        DYN_HEADER + 36,
        &["checksum mismatch"],
    );
}

#[test]
fn max_table_entries_of_4_billion_is_corrupt() {
    let (_d, p) = base("hmx");
    edit_dyn_header(&p, true, |b| put_be32(b, 28, u32::MAX));
    corrupt(
        "VHD max table entries 2^32-1",
        &p,
        V,
        Stage::Open,
        "VHD dynamic disk header",
        DYN_HEADER + 28,
        &["max table entries 0xffffffff", "does not fit in the file"],
    );
}

#[test]
fn max_table_entries_too_small_is_corrupt() {
    let (_d, p) = base("hmn");
    edit_dyn_header(&p, true, |b| put_be32(b, 28, 1));
    corrupt(
        "VHD max table entries 1",
        &p,
        V,
        Stage::Open,
        "VHD dynamic disk header",
        DYN_HEADER + 28,
        &["too small"],
    );
}

#[test]
fn huge_disk_size_in_a_small_file_is_corrupt() {
    let (_d, p) = base("fhg");
    edit_vhd_footers(&p, true, |b| put_be64(b, 48, 1 << 60));
    corrupt(
        "VHD of 2^60 bytes",
        &p,
        V,
        Stage::Open,
        "VHD dynamic disk header",
        DYN_HEADER + 28,
        &["too small"],
    );
}

#[test]
fn block_size_not_a_power_of_two_is_corrupt() {
    let (_d, p) = base("hbs");
    edit_dyn_header(&p, true, |b| put_be32(b, 32, 3 << 20));
    corrupt(
        "VHD block size 3 MiB",
        &p,
        V,
        Stage::Open,
        "VHD dynamic disk header",
        DYN_HEADER + 32,
        &["block size 3145728"],
    );
}

#[test]
fn enormous_block_size_puts_the_blocks_past_the_end() {
    // 2 GiB blocks: the allocated block 0 (bitmap + data) would run 2 GiB
    // past the end of the file.
    let (_d, p) = base("hbe");
    edit_dyn_header(&p, true, |b| put_be32(b, 32, 1 << 31));
    let s0 = vhd_bat(&p, 0);
    corrupt(
        "VHD block size 2 GiB",
        &p,
        V,
        Stage::Open,
        "VHD BAT",
        VHD_BAT,
        &[&format!("block 0 at sector {s0:#x}"), "past the end"],
    );
}

#[test]
fn enormous_block_size_on_an_empty_disk_reads_zeros() {
    // The same 2 GiB blocks with no block allocated: a valid disk of one
    // block, every byte zero, without a 2 GiB anything.
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("e.vhd");
    let mut o = vhd::CreateOptions::new(SIZE);
    o.block_size = MIB as u32;
    vhd::Vhd::create(&p, &o, false).unwrap().close().unwrap();
    edit_dyn_header(&p, true, |b| put_be32(b, 32, 1 << 31));
    let r = front_door("VHD block size 2 GiB, empty", &p, V);
    assert_eq!(r.stage, Stage::Done, "{:?}", r.err);
    assert!(r.first.iter().chain(&r.last).all(|&b| b == 0));
}

#[test]
fn table_offset_beyond_eof_is_corrupt() {
    let (_d, p) = base("hto");
    edit_dyn_header(&p, true, |b| put_be64(b, 16, 1 << 40));
    corrupt(
        "VHD table offset beyond EOF",
        &p,
        V,
        Stage::Open,
        "VHD dynamic disk header",
        DYN_HEADER + 28,
        &["table offset 0x10000000000", "does not fit"],
    );
}

#[test]
fn bat_entries_pointing_at_structures_or_past_the_end_are_corrupt() {
    for (sector, why) in [
        (0, "overlaps the footer copy"),
        (1, "overlaps the dynamic disk header"),
        (3, "overlaps the BAT"),
        (0x7fff_fff0, "past the end"),
    ] {
        let (_d, p) = base("bat");
        // Block 1 is not allocated in the base image: any block will do.
        set_vhd_bat(&p, 1, sector);
        corrupt(
            "VHD BAT entry at a structure",
            &p,
            V,
            Stage::Open,
            "VHD BAT",
            VHD_BAT + 4,
            &[&format!("block 1 at sector {sector:#x}"), why],
        );
    }
}

#[test]
fn bat_entries_sharing_a_block_read_alike_and_a_writable_open_is_refused() {
    let (_d, p) = base("bsh");
    // The last block pointed at block 0's place (and, below, one sector
    // after it: the blocks then share all but a sector).
    let b0 = vhd_bat(&p, 0);
    let nb = vhd::Vhd::inspect(&p).unwrap().info_blocks() - 1;
    for (sector, at) in [(b0, b0), (b0 + 1, b0 + 1)] {
        set_vhd_bat(&p, nb, sector);
        let r = front_door("two VHD blocks at one place", &p, V);
        assert_eq!(r.stage, Stage::Done, "{:?}", r.err);
        let rep = vhd::check::check_file(&p, &Default::default()).unwrap();
        assert!(rep.corruptions > 0, "{rep:?}");
        // A write to one block would change the other's data.
        let before = std::fs::read(&p).unwrap();
        let mut o = OpenOptions::new(V);
        o.writable = true;
        let e = image::open(&p, &o).map(drop).unwrap_err();
        assert_eq!(e.kind(), ErrorKind::Corrupt, "{e}");
        assert_corrupt(&e, "VHD BAT", VHD_BAT + nb * 4);
        has_words(
            &e,
            &[&format!(
                "block {nb} at sector {at:#x} overlaps block 0 at sector {b0:#x}"
            )],
        );
        assert!(e.to_string().contains(&p.display().to_string()), "{e}");
        assert_eq!(std::fs::read(&p).unwrap(), before, "nothing written");
    }
}

/// The number of BAT entries a VHD's disk uses.
trait Blocks {
    fn info_blocks(&self) -> u64;
}

impl Blocks for vhd::Info {
    fn info_blocks(&self) -> u64 {
        let h = self.header.as_ref().unwrap();
        self.virtual_size.div_ceil(u64::from(h.block_size))
    }
}

#[test]
fn vhd_probe_of_a_damaged_file_names_what_survives() {
    let (_d, p) = base("prb");
    let f = footer_at(&p);
    patch(&p, 0, b"garbage!");
    patch(&p, f, b"garbage!");
    let r = run(&p, &OpenOptions::probing());
    assert_bounded("VHD without cookies (probed)", r.peak);
    let e = r.failed(Stage::Open, ErrorKind::Corrupt, &p);
    assert_corrupt(e, "VHD footer", f);
    has_words(e, &["the name says VHD", "dynamic disk header"]);
}
