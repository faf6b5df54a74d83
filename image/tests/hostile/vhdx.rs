//! Hostile VHDX files: headers, region tables, metadata and BAT (the log
//! is in `vhdx_log`, parents in `chain`).

use crate::harness::*;
use disk::ErrorKind;
use image::{Format, OpenOptions};
use uuid::Uuid;
use vhdx::metadata::{self, MetadataEntry};
use vhdx::region_table::{RegionEntry, METADATA_REGION};

const X: Format = Format::Vhdx;
const H0: u64 = 0x10000;
const H1: u64 = 0x20000;
const RT0: u64 = 0x30000;
/// File offsets of the base image's metadata items.
const FILE_PARAMETERS: u64 = METADATA + 0x10000;
const VIRTUAL_SIZE: u64 = METADATA + 0x10008;
const LOGICAL_SECTOR: u64 = METADATA + 0x10020;
/// The offset of field `field` of metadata table entry `i`.
fn meta_entry(i: u64, field: u64) -> u64 {
    METADATA + 32 + 32 * i + field
}
/// The offset of field `field` of region table entry `i` of the first copy.
fn region_entry(i: u64, field: u64) -> u64 {
    RT0 + 16 + 32 * i + field
}

fn base(name: &str) -> (tempfile::TempDir, std::path::PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    let p = vhdx_image(dir.path(), &format!("{name}.vhdx"));
    (dir, p)
}

fn flip(path: &std::path::Path, off: u64) {
    let b = read_at(path, off, 1)[0];
    patch(path, off, &[b ^ 0x5a]);
}

// ---------------------------------------------------------------- headers

#[test]
fn header_first_copy_bad_checksum_opens_with_the_second() {
    let (_d, p) = base("h1");
    flip(&p, H0 + 1000);
    opens_with_data("header copy 1 bad checksum", &p, X);
}

#[test]
fn header_second_copy_bad_checksum_opens_with_the_first() {
    let (_d, p) = base("h2");
    flip(&p, H1 + 1000);
    opens_with_data("header copy 2 bad checksum", &p, X);
}

#[test]
fn headers_both_bad_checksum_is_corrupt() {
    let (_d, p) = base("hb");
    flip(&p, H0 + 1000);
    flip(&p, H1 + 2000);
    corrupt(
        "both headers bad",
        &p,
        X,
        Stage::Open,
        "VHDX header",
        H0,
        &["no valid header", "0x10000", "0x20000", "checksum mismatch"],
    );
}

#[test]
fn headers_equal_sequence_numbers_open() {
    // MS-VHDX 2.2.2 calls this corrupt, but Disk2vhd writes it (with the
    // same content): accepted, the first copy used.
    let (_d, p) = base("heq");
    let h = vhdx::header::Header::parse(&read_at(&p, H0, 4096)).unwrap();
    let mut h2 = vhdx::header::Header::parse(&read_at(&p, H1, 4096)).unwrap();
    h2.sequence_number = h.sequence_number;
    patch(&p, H1, &h2.to_bytes());
    opens_with_data("equal header sequence numbers", &p, X);
}

#[test]
fn header_sequence_number_at_max_cannot_start_a_session() {
    let (_d, p) = base("hmax");
    for slot in [0, 1] {
        edit_header(&p, slot, |h| h.sequence_number = u64::MAX - 1 + slot as u64);
    }
    // Read-only: nothing to bump.
    opens_with_data("header sequence at u64::MAX", &p, X);
    // Writable: the first write must bump it, and cannot.
    let opts = OpenOptions::new(X).writable();
    let (r, peak) = measure(|| {
        let img = image::open(&p, &opts)?;
        let r = img.disk().write_at(&[7u8; 512], 0);
        img.close()?;
        r
    });
    assert_bounded("header sequence at u64::MAX, written", peak);
    let e = r.unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Corrupt, "{e}");
    assert_corrupt(&e, "VHDX header", H1 + 8);
    has_words(
        &e,
        &[
            &p.display().to_string(),
            "SequenceNumber",
            "0xffffffffffffffff",
        ],
    );
    // Nothing was written: the image reads as before.
    opens_with_data(
        "header sequence at u64::MAX, after the refused write",
        &p,
        X,
    );
}

#[test]
fn header_version_2_in_both_copies_is_corrupt() {
    let (_d, p) = base("hv");
    for slot in [0, 1] {
        edit_header(&p, slot, |h| h.version = 2);
    }
    corrupt(
        "header version 2",
        &p,
        X,
        Stage::Open,
        "VHDX header",
        H0,
        &["Version is 2"],
    );
}

// ----------------------------------------------------------- region table

#[test]
fn region_table_first_copy_bad_opens_with_the_second() {
    let (_d, p) = base("r1");
    flip(&p, RT0 + 40000);
    opens_with_data("region table copy 1 bad", &p, X);
}

#[test]
fn region_tables_both_bad_is_corrupt() {
    let (_d, p) = base("rb");
    flip(&p, RT0 + 40000);
    flip(&p, 0x40000 + 100);
    corrupt(
        "both region tables bad",
        &p,
        X,
        Stage::Open,
        "VHDX region table",
        RT0 + 4,
        &[
            "no valid region table",
            "0x30000",
            "0x40000",
            "checksum mismatch",
        ],
    );
}

#[test]
fn regions_overlapping_each_other_are_corrupt() {
    let (_d, p) = base("rov");
    // The metadata region (entry 1) moved onto the BAT region.
    edit_region_entries(&p, |e| e[1].file_offset = 3 * MIB);
    corrupt(
        "overlapping regions",
        &p,
        X,
        Stage::Open,
        "VHDX region table",
        region_entry(1, 16),
        &["overlaps region"],
    );
}

#[test]
fn metadata_region_beyond_eof_is_corrupt() {
    let (_d, p) = base("rme");
    edit_region_entries(&p, |e| e[1].file_offset = 1 << 40);
    corrupt(
        "metadata region beyond EOF",
        &p,
        X,
        Stage::Open,
        "VHDX metadata region",
        1 << 40,
        &["past the end of the file"],
    );
}

#[test]
fn bat_region_beyond_eof_fails_the_read_naming_the_entry() {
    let (_d, p) = base("rbe");
    edit_region_entries(&p, |e| e[0].file_offset = 1 << 40);
    // The BAT is not read at a read-only open; its entries lie past the
    // end of the file: the first read says so.
    corrupt(
        "BAT region beyond EOF",
        &p,
        X,
        Stage::Read,
        "VHDX BAT",
        1 << 40,
        &["past the end of the file", "block 0"],
    );
}

#[test]
fn unknown_required_region_is_unsupported() {
    let (_d, p) = base("rur");
    edit_region_entries(&p, |e| {
        e.push(RegionEntry {
            guid: Uuid::from_u128(0x1234),
            file_offset: 6 * MIB,
            length: MIB as u32,
            required: true,
        })
    });
    fails(
        "unknown required region",
        &p,
        X,
        Stage::Open,
        ErrorKind::Unsupported,
        &["required region", "00001234"],
    );
}

#[test]
fn unknown_optional_region_is_ignored() {
    let (_d, p) = base("ruo");
    edit_region_entries(&p, |e| {
        e.push(RegionEntry {
            guid: Uuid::from_u128(0x1234),
            file_offset: 6 * MIB,
            length: MIB as u32,
            required: false,
        })
    });
    opens_with_data("unknown optional region", &p, X);
}

#[test]
fn region_entry_count_over_2047_is_corrupt() {
    let (_d, p) = base("rc");
    edit_regions(&p, |b| b[8..12].copy_from_slice(&2048u32.to_le_bytes()));
    corrupt(
        "region EntryCount 2048",
        &p,
        X,
        Stage::Open,
        "VHDX region table",
        RT0 + 8,
        &["EntryCount 2048"],
    );
}

#[test]
fn region_table_without_metadata_region_is_corrupt() {
    let (_d, p) = base("rnm");
    edit_region_entries(&p, |e| e.retain(|r| r.guid != METADATA_REGION));
    corrupt(
        "no metadata region",
        &p,
        X,
        Stage::Open,
        "VHDX region table",
        RT0 + 8,
        &["no metadata region"],
    );
}

#[test]
fn bat_region_too_small_for_the_disk_is_corrupt() {
    let (_d, p) = base("rsm");
    // 256 GiB in 1 MiB blocks needs a 2 MiB BAT; the region has 1 MiB.
    patch(&p, VIRTUAL_SIZE, &(256u64 << 30).to_le_bytes());
    corrupt(
        "BAT region too small",
        &p,
        X,
        Stage::Open,
        "VHDX region table",
        region_entry(0, 24),
        &["BAT region is 1048576 bytes", "needs"],
    );
}

// --------------------------------------------------------------- metadata

#[test]
fn block_size_not_a_power_of_two_is_corrupt() {
    let (_d, p) = base("mbs");
    patch(&p, FILE_PARAMETERS, &(3 * MIB as u32).to_le_bytes());
    corrupt(
        "BlockSize 3 MiB",
        &p,
        X,
        Stage::Open,
        "VHDX metadata",
        FILE_PARAMETERS,
        &["BlockSize 0x300000"],
    );
}

#[test]
fn block_size_out_of_range_is_corrupt() {
    for (v, what) in [(512u32 << 20, "0x20000000"), (1 << 19, "0x80000")] {
        let (_d, p) = base("mbr");
        patch(&p, FILE_PARAMETERS, &v.to_le_bytes());
        corrupt(
            "BlockSize out of range",
            &p,
            X,
            Stage::Open,
            "VHDX metadata",
            FILE_PARAMETERS,
            &[&format!("BlockSize {what}")],
        );
    }
}

#[test]
fn logical_sector_size_invalid_is_corrupt() {
    let (_d, p) = base("mls");
    patch(&p, LOGICAL_SECTOR, &1024u32.to_le_bytes());
    corrupt(
        "logical sector size 1024",
        &p,
        X,
        Stage::Open,
        "VHDX metadata",
        LOGICAL_SECTOR,
        &["logical sector size 1024"],
    );
}

#[test]
fn virtual_size_over_64_tib_is_corrupt() {
    let (_d, p) = base("mvs");
    patch(&p, VIRTUAL_SIZE, &((64u64 << 40) + 512).to_le_bytes());
    corrupt(
        "virtual size over 64 TiB",
        &p,
        X,
        Stage::Open,
        "VHDX metadata",
        VIRTUAL_SIZE,
        &["VirtualDiskSize 0x400000000200"],
    );
}

#[test]
fn virtual_size_not_a_sector_multiple_is_corrupt() {
    let (_d, p) = base("mvm");
    patch(&p, VIRTUAL_SIZE, &(SIZE + 100).to_le_bytes());
    corrupt(
        "virtual size not a sector multiple",
        &p,
        X,
        Stage::Open,
        "VHDX metadata",
        VIRTUAL_SIZE,
        &["VirtualDiskSize 0x800064"],
    );
}

#[test]
fn a_64_tib_disk_in_a_small_file_stays_bounded() {
    // 64 TiB in 1 MiB blocks: 2^26 BAT entries (512 MiB of BAT), which the
    // region claims (moved past the blocks, its first page copied); the
    // file has 8 MiB. Only the pages read are held.
    let (_d, p) = base("m64");
    patch(&p, VIRTUAL_SIZE, &(64u64 << 40).to_le_bytes());
    let bat = 8 * MIB;
    patch(&p, bat, &read_at(&p, BAT, 4096));
    edit_region_entries(&p, |e| {
        e[0].file_offset = bat;
        e[0].length = 513 << 20;
    });
    let e = corrupt(
        "64 TiB disk, 8 MiB file",
        &p,
        X,
        Stage::Read,
        "VHDX BAT",
        bat + ((64u64 << 20) - 1 + ((64u64 << 20) - 1) / 4096) * 8,
        &["past the end of the file"],
    );
    let r = front_door("64 TiB disk, its first MiB", &p, X);
    assert!(r.first.iter().all(|&b| b == FIRST));
    has_words(&e, &["block 67108863"]);
}

#[test]
fn unknown_required_metadata_item_is_unsupported() {
    let (_d, p) = base("mur");
    edit_metadata_table(&p, |t| {
        t.entries.push(MetadataEntry {
            item_id: Uuid::from_u128(0xfeed),
            offset: 0x20000,
            length: 16,
            is_user: false,
            is_virtual_disk: false,
            is_required: true,
        })
    });
    fails(
        "unknown required metadata item",
        &p,
        X,
        Stage::Open,
        ErrorKind::Unsupported,
        &["required system metadata item", "0000feed"],
    );
}

#[test]
fn unknown_optional_metadata_item_is_ignored() {
    let (_d, p) = base("muo");
    edit_metadata_table(&p, |t| {
        t.entries.push(MetadataEntry {
            item_id: Uuid::from_u128(0xfeed),
            offset: 0x20000,
            length: 16,
            is_user: true,
            is_virtual_disk: false,
            is_required: false,
        })
    });
    opens_with_data("unknown optional metadata item", &p, X);
}

#[test]
fn metadata_item_outside_the_region_is_corrupt() {
    let (_d, p) = base("mio");
    edit_metadata_table(&p, |t| t.entries[1].offset = (MIB - 4) as u32);
    corrupt(
        "metadata item past the region",
        &p,
        X,
        Stage::Open,
        "VHDX metadata",
        meta_entry(1, 16),
        &["extends past the metadata region"],
    );
}

#[test]
fn metadata_items_overlapping_are_corrupt() {
    let (_d, p) = base("mov");
    edit_metadata_table(&p, |t| t.entries[1].offset = 0x10004);
    corrupt(
        "overlapping metadata items",
        &p,
        X,
        Stage::Open,
        "VHDX metadata",
        meta_entry(1, 16),
        &["overlaps item"],
    );
}

#[test]
fn metadata_entry_count_over_2047_is_corrupt() {
    let (_d, p) = base("mec");
    patch(&p, METADATA + 10, &2048u16.to_le_bytes());
    corrupt(
        "metadata EntryCount 2048",
        &p,
        X,
        Stage::Open,
        "VHDX metadata",
        METADATA + 10,
        &["EntryCount 2048"],
    );
}

#[test]
fn metadata_missing_a_required_item_is_corrupt() {
    let (_d, p) = base("mmi");
    edit_metadata_table(&p, |t| {
        t.entries
            .retain(|e| e.item_id != metadata::VIRTUAL_DISK_SIZE)
    });
    corrupt(
        "virtual size item missing",
        &p,
        X,
        Stage::Open,
        "VHDX metadata",
        METADATA + 10,
        &["virtual disk size", "missing"],
    );
}

#[test]
fn has_parent_without_a_parent_locator_is_corrupt() {
    let (_d, p) = base("mhp");
    patch(&p, FILE_PARAMETERS + 4, &2u32.to_le_bytes());
    corrupt(
        "HasParent without locator",
        &p,
        X,
        Stage::Open,
        "VHDX metadata",
        METADATA + 10,
        &["parent locator", "missing"],
    );
}

#[test]
fn metadata_region_over_64_mib_is_unsupported() {
    let (_d, p) = base("mbig");
    edit_region_entries(&p, |e| {
        e[1].file_offset = 8 * MIB;
        e[1].length = 128 << 20;
    });
    fails(
        "metadata region of 128 MiB",
        &p,
        X,
        Stage::Open,
        ErrorKind::Unsupported,
        &["metadata region of 134217728 bytes"],
    );
}

// -------------------------------------------------------------------- BAT

/// BAT index of the base image's last block (7) and states.
const LAST_BLOCK: u64 = 7;
const NOT_PRESENT: u64 = 0;
const FULLY_PRESENT: u64 = 6;
const PARTIALLY_PRESENT: u64 = 7;

#[test]
fn bat_block_beyond_eof_fails_reads_and_writable_opens() {
    let (_d, p) = base("bbe");
    set_bat(&p, 0, FULLY_PRESENT, 1 << 40);
    corrupt(
        "BAT block beyond EOF",
        &p,
        X,
        Stage::Read,
        "VHDX block",
        1 << 40,
        &["block 0", "past the end of the file"],
    );
    let r = run(&p, &OpenOptions::new(X).writable());
    assert_bounded("BAT block beyond EOF, writable", r.peak);
    let e = r.failed(Stage::Open, ErrorKind::Corrupt, &p);
    assert_corrupt(e, "VHDX BAT", BAT);
    has_words(e, &["truncated", "read-only", "block 0"]);
}

#[test]
fn bat_entry_in_an_undefined_state_is_corrupt() {
    let (_d, p) = base("bst");
    let e = bat(&p, 0);
    patch(&p, BAT, &((e & !7) | 4).to_le_bytes());
    corrupt(
        "BAT state 4",
        &p,
        X,
        Stage::Read,
        "VHDX BAT",
        BAT,
        &["undefined state 4"],
    );
}

#[test]
fn bat_block_in_the_header_section_is_corrupt() {
    let (_d, p) = base("bhs");
    set_bat(&p, 0, FULLY_PRESENT, 0);
    corrupt(
        "BAT block at offset 0",
        &p,
        X,
        Stage::Read,
        "BAT entry",
        BAT,
        &["invalid file offset 0x0"],
    );
}

#[test]
fn bat_block_over_a_region_or_the_log_is_corrupt() {
    for (at, what) in [
        (MIB, "the log"),
        (METADATA, "the metadata region"),
        (BAT, "the BAT region"),
    ] {
        let (_d, p) = base("bre");
        set_bat(&p, LAST_BLOCK, FULLY_PRESENT, at);
        // A read would show the structure's bytes, a write overwrite it.
        corrupt(
            "BAT block over a structure",
            &p,
            X,
            Stage::Read,
            "BAT entry",
            BAT + LAST_BLOCK * 8,
            &[&format!("block 7 at file offset {at:#x}"), what],
        );
    }
}

#[test]
fn bat_blocks_sharing_an_offset_read_alike_and_check_reports_them() {
    // Reads cannot tell (each block reads what is there); the check finds
    // the overlap.
    let (_d, p) = base("bsh");
    set_bat(&p, LAST_BLOCK, FULLY_PRESENT, 4 * MIB);
    let r = front_door("two blocks at one offset", &p, X);
    assert_eq!(r.stage, Stage::Done, "{:?}", r.err);
    assert!(r.last.iter().all(|&b| b == FIRST));
    let rep = vhdx::check::check_file(&p, &Default::default()).unwrap();
    assert!(rep.corruptions > 0, "{rep:?}");
    assert!(
        rep.problems.iter().any(|x| x.message.contains("overlaps")),
        "{rep:?}"
    );
}

#[test]
fn partially_present_block_without_a_parent_is_corrupt() {
    let (_d, p) = base("bpp");
    let e = bat(&p, 0);
    patch(&p, BAT, &((e & !7) | PARTIALLY_PRESENT).to_le_bytes());
    corrupt(
        "PARTIALLY_PRESENT without parent",
        &p,
        X,
        Stage::Read,
        "BAT entry",
        BAT,
        &["PARTIALLY_PRESENT in a disk without a parent"],
    );
}

#[test]
fn sector_bitmap_entry_in_a_disk_without_parent_is_ignored() {
    // 8 GiB in 1 MiB blocks: BAT entry 4096 is chunk 0's sector bitmap
    // entry, unused without a parent (MS-VHDX 2.5.1.2).
    let dir = tempfile::tempdir().unwrap();
    let p = vhdx_sized(dir.path(), "sb.vhdx", 8 << 30, true);
    set_bat(&p, 4096, FULLY_PRESENT, 4 * MIB);
    let r = front_door("sector bitmap entry without parent", &p, X);
    assert_eq!(r.stage, Stage::Done, "{:?}", r.err);
    assert!(r.first.iter().all(|&b| b == FIRST));
    assert!(r.last.iter().all(|&b| b == LAST));
    assert_eq!(bat(&p, 4096) & 7, NOT_PRESENT + FULLY_PRESENT);
    // The check says what is wrong with it.
    let rep = vhdx::check::check_file(&p, &Default::default()).unwrap();
    assert!(
        rep.problems.iter().any(|x| x
            .message
            .contains("sector bitmap block present in a disk without a parent")),
        "{rep:?}"
    );
}

#[test]
fn file_identifier_missing_is_corrupt() {
    let (_d, p) = base("fid");
    patch(&p, 0, b"vhdxfilx");
    // Probing: the name says VHDX but the signature is gone.
    let r = run(&p, &OpenOptions::probing());
    assert_bounded("no file identifier (probed)", r.peak);
    let e = r.failed(Stage::Open, ErrorKind::Corrupt, &p);
    assert_corrupt(e, "VHDX file identifier", 0);
    has_words(e, &["found:", "header"]);
    let r = run(&p, &OpenOptions::new(X));
    assert_bounded("no file identifier", r.peak);
    let e = r.failed(Stage::Open, ErrorKind::Corrupt, &p);
    assert_corrupt(e, "VHDX file identifier", 0);
    has_words(e, &["bad signature"]);
}
