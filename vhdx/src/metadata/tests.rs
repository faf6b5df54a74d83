//! Unit tests of the metadata region: table and items parsed, built and rejected.
// Test data: sizes and offsets of small test disks (they fit in memory),
// block sizes and byte patterns.
#![allow(clippy::cast_possible_truncation)]

use super::*;
use crate::parent_locator::VHDX_PARENT_LOCATOR_TYPE;
use crate::ErrorKind;

const MIB: u32 = 1 << 20;

fn sample() -> Metadata {
    Metadata {
        file_parameters: FileParameters {
            block_size: 32 * MIB,
            leave_blocks_allocated: false,
            has_parent: false,
        },
        virtual_disk_size: 10 << 30,
        virtual_disk_id: Uuid::from_u128(0x1234_5678_9abc_def0_1122_3344_5566_7788),
        logical_sector_size: 512,
        physical_sector_size: 4096,
        parent_locator: None,
    }
}

fn diff_sample() -> Metadata {
    let mut m = sample();
    m.file_parameters.has_parent = true;
    m.parent_locator = Some(ParentLocator {
        locator_type: VHDX_PARENT_LOCATOR_TYPE,
        entries: vec![
            (
                "parent_linkage".into(),
                "{00000000-0000-0000-0000-000000000001}".into(),
            ),
            ("relative_path".into(), "base.vhdx".into()),
        ],
    });
    m
}

#[test]
fn build_then_parse_round_trips() {
    for m in [sample(), diff_sample()] {
        let region = m.build_region(MIB).unwrap();
        assert_eq!(region.len(), MIB as usize);
        let (table, back) = Metadata::parse(&region).unwrap();
        assert_eq!(back, m);
        let fp = table.find(FILE_PARAMETERS).unwrap();
        assert_eq!((fp.offset, fp.length), (0x10000, 8));
        assert!(fp.is_required && !fp.is_virtual_disk && !fp.is_user);
        let size = table.find(VIRTUAL_DISK_SIZE).unwrap();
        assert!(size.is_required && size.is_virtual_disk);
        assert_eq!(item_offset(&table, VIRTUAL_DISK_ID), Some((0x10010, 16)));
        assert_eq!(
            item_offset(&table, PARENT_LOCATOR).is_some(),
            m.parent_locator.is_some()
        );
        let mut t2 = vec![0u8; TABLE_SIZE];
        table.write_to(&mut t2);
        assert_eq!(t2, region[..TABLE_SIZE]);
    }
}

#[test]
fn the_start_of_the_region_up_to_the_last_item_parses_alike() {
    // An open reads the table, then up to the end of the last item.
    for m in [sample(), diff_sample()] {
        let region = m.build_region(MIB).unwrap();
        let whole = Metadata::parse(&region).unwrap();
        let end = MetadataTable::parse(&region[..TABLE_SIZE], u64::from(MIB))
            .unwrap()
            .items_end();
        assert!(end > TABLE_SIZE as u64 && end < 0x11000, "{end:#x}");
        let start = &region[..end as usize];
        assert_eq!(Metadata::parse_start(start, u64::from(MIB)).unwrap(), whole);
        // One byte short of the last item: an error, not a panic.
        let e = Metadata::parse_start(&start[..start.len() - 1], u64::from(MIB)).unwrap_err();
        assert_eq!(e.kind(), ErrorKind::Corrupt);
        assert!(e.to_string().contains("past the"), "{e}");
    }
    // Still checked against the whole region's length.
    let region = sample().build_region(MIB).unwrap();
    let e = Metadata::parse_start(&region, 0x10010).unwrap_err();
    assert!(
        e.to_string().contains("extends past the metadata region"),
        "{e}"
    );
}

#[test]
fn build_refuses_bad_values() {
    let mut m = sample();
    m.file_parameters.block_size = 3 * MIB;
    assert_eq!(
        m.build_region(MIB).unwrap_err().kind(),
        ErrorKind::InvalidInput
    );
    let mut m = sample();
    m.file_parameters.has_parent = true;
    assert!(m.build_region(MIB).is_err());
    assert!(sample().build_region(TABLE_SIZE as u32).is_err());
}

/// A region built from `sample()` with its table edited by `f`.
fn edited(f: impl FnOnce(&mut MetadataTable, &mut Vec<u8>)) -> Result<(MetadataTable, Metadata)> {
    let mut region = sample().build_region(MIB).unwrap();
    let (mut table, _) = Metadata::parse(&region).unwrap();
    f(&mut table, &mut region);
    table.write_to(&mut region);
    Metadata::parse(&region)
}

fn edited_msg(f: impl FnOnce(&mut MetadataTable, &mut Vec<u8>)) -> String {
    edited(f).unwrap_err().to_string()
}

#[test]
fn table_validation() {
    assert!(edited_msg(|t, _| t.entries[1].offset = 0x8000).contains("inside the 64 KiB table"));
    assert!(edited_msg(|t, _| t.entries[1].offset = MIB - 4).contains("past the metadata region"));
    assert!(edited_msg(|t, _| t.entries[1].offset = 0x10004).contains("overlaps"));
    assert!(edited_msg(|t, _| t.entries[1].length = 2 * MIB).contains("exceeds 1 MiB"));
    assert!(edited_msg(|t, _| {
        t.entries[1].length = 0;
    })
    .contains("Length is 0 but Offset"));
    assert!(edited_msg(|t, _| t.entries[1].item_id = FILE_PARAMETERS).contains("listed twice"));
    // The same id once as a system and once as a user item is fine.
    let (_, m) = edited(|t, _| {
        let mut e = t.entries[1];
        e.is_user = true;
        e.is_required = false;
        e.offset = 0x20000;
        t.entries.push(e);
    })
    .unwrap();
    assert_eq!(m, sample());
    // Zero-length item at offset 0 is allowed (and ignored if unknown).
    edited(|t, _| {
        t.entries.push(MetadataEntry {
            item_id: Uuid::from_u128(9),
            offset: 0,
            length: 0,
            is_user: true,
            is_virtual_disk: false,
            is_required: false,
        })
    })
    .unwrap();
    let mut region = sample().build_region(MIB).unwrap();
    region[0] = b'M';
    assert!(Metadata::parse(&region)
        .unwrap_err()
        .to_string()
        .contains("Metadata"));
    put_u16(&mut region, 10, 2048);
    region[0] = b'm';
    assert!(Metadata::parse(&region)
        .unwrap_err()
        .to_string()
        .contains("EntryCount 2048"));
    assert!(MetadataTable::parse(&region[..40], u64::from(MIB)).is_err());
    assert!(Metadata::parse(&region[..10]).is_err());
}

#[test]
fn item_validation() {
    // Unknown required items are unsupported, unknown optional ones ignored.
    let unknown = |is_user, is_required| {
        edited(move |t, _| {
            t.entries.push(MetadataEntry {
                item_id: Uuid::from_u128(0xfeed),
                offset: 0x20000,
                length: 16,
                is_user,
                is_virtual_disk: false,
                is_required,
            })
        })
    };
    let e = unknown(false, true).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Unsupported);
    assert!(e.to_string().contains("0000feed"), "{e}");
    assert_eq!(
        unknown(true, true).unwrap_err().kind(),
        ErrorKind::Unsupported
    );
    unknown(false, false).unwrap();
    unknown(true, false).unwrap();

    // Missing required items.
    for (i, name) in [
        (0, "file parameters"),
        (1, "virtual disk size"),
        (2, "virtual disk ID"),
        (3, "logical sector size"),
        (4, "physical sector size"),
    ] {
        let msg = edited_msg(|t, _| {
            t.entries.remove(i);
        });
        assert!(msg.contains(name) && msg.contains("missing"), "{msg}");
    }
    // Bad values, with the error at the item's offset.
    let at = |off: u32, v: &[u8]| {
        let mut region = sample().build_region(MIB).unwrap();
        region[off as usize..off as usize + v.len()].copy_from_slice(v);
        Metadata::parse(&region).unwrap_err()
    };
    let e = at(0x10000, &(3 * MIB).to_le_bytes());
    assert!(
        e.to_string()
            .contains("at offset 0x10000: BlockSize 0x300000"),
        "{e}"
    );
    assert!(at(0x10000, &(512 * MIB).to_le_bytes())
        .to_string()
        .contains("BlockSize"));
    assert!(at(0x10000, &(MIB / 2).to_le_bytes())
        .to_string()
        .contains("BlockSize"));
    let e = at(0x10008, &0u64.to_le_bytes());
    assert!(
        e.to_string()
            .contains("at offset 0x10008: VirtualDiskSize 0x0"),
        "{e}"
    );
    assert!(at(0x10008, &1000u64.to_le_bytes())
        .to_string()
        .contains("VirtualDiskSize"));
    assert!(at(0x10008, &((64u64 << 40) + 512).to_le_bytes())
        .to_string()
        .contains("VirtualDiskSize"));
    assert!(at(0x10020, &1024u32.to_le_bytes())
        .to_string()
        .contains("logical sector size 1024"));
    assert!(at(0x10024, &0u32.to_le_bytes())
        .to_string()
        .contains("physical sector size 0"));
    // HasParent without a locator.
    let msg = at(0x10004, &2u32.to_le_bytes()).to_string();
    assert!(
        msg.contains("parent locator") && msg.contains("missing"),
        "{msg}"
    );
    // Truncated item.
    let msg = edited_msg(|t, _| t.entries[2].length = 8);
    assert!(msg.contains("virtual disk ID item is 8 bytes"), "{msg}");
}

#[test]
fn parent_locator_errors_are_rebased_to_the_region() {
    let mut region = diff_sample().build_region(MIB).unwrap();
    let (off, _) = {
        let (t, _) = Metadata::parse(&region).unwrap();
        item_offset(&t, PARENT_LOCATOR).unwrap()
    };
    region[off as usize + 16] = 1; // reserved field of the locator header
    let e = Metadata::parse(&region)
        .unwrap_err()
        .in_file("x.vhdx", 0x200000);
    let want = format!("at offset {:#x}", 0x200000 + off + 16);
    assert!(e.to_string().contains(&want), "{e}");
}

#[test]
fn corpus_table_header_and_entry() {
    if let Some(h) = crate::guid::corpus_struct("metadata_table_header.1") {
        assert_eq!(&h[..8], b"metadata");
        assert_eq!(le_u16(&h, 10), 5);
        // A table of five zeroed entries after this header parses.
        let mut buf = vec![0u8; TABLE_SIZE];
        buf[..HEADER_SIZE].copy_from_slice(&h[..HEADER_SIZE]);
        let e = MetadataTable::parse(&buf, u64::from(MIB)).unwrap_err();
        assert!(e.to_string().contains("listed twice"), "{e}");
    }
    if let Some(e) = crate::guid::corpus_struct("metadata_table_entry.1") {
        let raw: &[u8; ENTRY_SIZE] = e[..ENTRY_SIZE].try_into().unwrap();
        let e = MetadataEntry::parse(raw);
        assert_eq!(
            e,
            MetadataEntry {
                item_id: FILE_PARAMETERS,
                offset: 0x10000,
                length: 8,
                is_user: false,
                is_virtual_disk: false,
                is_required: true,
            }
        );
        let mut out = [0u8; ENTRY_SIZE];
        e.write_to(&mut out);
        assert_eq!(&out, raw);
    }
}
