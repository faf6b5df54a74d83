//! Hostile partition tables inside a valid image (what `vdisk mount`
//! reads): GPT headers that fail their checks, entry arrays claiming 4
//! billion entries or lying outside the disk, MBR extended-partition
//! chains that loop or never end.

use crate::harness::*;
use disk::{ErrorKind, VirtualDisk};
use image::{Format, OpenOptions};
use std::path::{Path, PathBuf};

const SS: u64 = 512;

/// CRC-32 (IEEE, as GPT uses it), bit by bit.
fn crc32(data: &[u8]) -> u32 {
    let mut c = !0u32;
    for &b in data {
        c ^= u32::from(b);
        for _ in 0..8 {
            c = if c & 1 != 0 {
                (c >> 1) ^ 0xEDB8_8320
            } else {
                c >> 1
            };
        }
    }
    !c
}

/// An 8 MiB VHDX whose virtual disk starts with `sectors` (LBA, bytes).
fn disk_with(name: &str, sectors: &[(u64, Vec<u8>)]) -> (tempfile::TempDir, PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    let p = vhdx_sized(dir.path(), name, SIZE, false);
    let img = image::open(&p, &OpenOptions::new(Format::Vhdx).writable()).unwrap();
    for (lba, b) in sectors {
        img.disk().write_at(b, lba * SS).unwrap();
    }
    img.close().unwrap();
    (dir, p)
}

fn mbr_entry(sector: &mut [u8], slot: usize, ty: u8, lba: u32, n: u32) {
    let e = &mut sector[446 + slot * 16..446 + slot * 16 + 16];
    e[4] = ty;
    e[8..12].copy_from_slice(&lba.to_le_bytes());
    e[12..16].copy_from_slice(&n.to_le_bytes());
}

fn signed(mut s: Vec<u8>) -> Vec<u8> {
    s[510] = 0x55;
    s[511] = 0xAA;
    s
}

fn protective() -> Vec<u8> {
    let mut m = vec![0u8; 512];
    mbr_entry(&mut m, 0, 0xEE, 1, u32::MAX);
    signed(m)
}

/// A GPT header at `lba` naming `entries` entries of 128 bytes at
/// `entries_lba` (array CRC of an empty array), with a valid CRC.
fn gpt_header(lba: u64, entries: u32, entries_lba: u64) -> Vec<u8> {
    let mut h = vec![0u8; 512];
    h[..8].copy_from_slice(b"EFI PART");
    h[8..12].copy_from_slice(&0x0001_0000u32.to_le_bytes());
    h[12..16].copy_from_slice(&92u32.to_le_bytes());
    h[24..32].copy_from_slice(&lba.to_le_bytes());
    h[40..48].copy_from_slice(&34u64.to_le_bytes());
    h[48..56].copy_from_slice(&(SIZE / SS - 34).to_le_bytes());
    h[72..80].copy_from_slice(&entries_lba.to_le_bytes());
    h[80..84].copy_from_slice(&entries.to_le_bytes());
    h[84..88].copy_from_slice(&128u32.to_le_bytes());
    let crc = crc32(&h[..92]);
    h[16..20].copy_from_slice(&crc.to_le_bytes());
    h
}

/// The partitions of the image at `p`, measured.
fn partitions(what: &str, p: &Path) -> disk::Result<Vec<disk::partition::Partition>> {
    let img = image::open(p, &OpenOptions::new(Format::Vhdx)).unwrap();
    let (r, peak) = measure(|| disk::partition::partitions(&**img.disk()));
    assert_bounded(what, peak);
    r
}

#[test]
fn gpt_with_both_headers_failing_their_crc_is_corrupt() {
    let mut h = gpt_header(1, 128, 2);
    h[16] ^= 1;
    let mut backup = gpt_header(SIZE / SS - 1, 128, 2);
    backup[16] ^= 1;
    let (_d, p) = disk_with(
        "g1.vhdx",
        &[(0, protective()), (1, h), (SIZE / SS - 1, backup)],
    );
    let e = partitions("GPT both headers bad", &p).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Corrupt);
    assert_corrupt(&e, "GPT header", SS + 16);
    has_words(&e, &["CRC32 mismatch"]);
}

#[test]
fn gpt_claiming_4_billion_entries_is_corrupt() {
    let (_d, p) = disk_with(
        "g2.vhdx",
        &[(0, protective()), (1, gpt_header(1, u32::MAX, 2))],
    );
    let e = partitions("GPT of 2^32-1 entries", &p).unwrap_err();
    assert_corrupt(&e, "GPT header", SS + 80);
    has_words(&e, &["4294967295 entries"]);
}

#[test]
fn gpt_entry_array_outside_the_disk_is_corrupt() {
    let (_d, p) = disk_with(
        "g3.vhdx",
        &[(0, protective()), (1, gpt_header(1, 128, 1 << 40))],
    );
    let e = partitions("GPT array outside the disk", &p).unwrap_err();
    assert_corrupt(&e, "GPT header", SS + 72);
    has_words(&e, &["outside the disk"]);
}

#[test]
fn mbr_extended_chains_that_loop_or_never_end_stop() {
    // A chain of extended boot records, each with one logical partition of
    // one sector, longer than the 128 followed, then one that loops.
    let mut mbr = vec![0u8; 512];
    mbr_entry(&mut mbr, 0, 0x05, 2048, 8192);
    let mut sectors = vec![(0, signed(mbr))];
    for i in 0..200u32 {
        let mut ebr = vec![0u8; 512];
        mbr_entry(&mut ebr, 0, 0x83, 1, 1);
        mbr_entry(&mut ebr, 1, 0x05, 2 * (i + 1), 2);
        sectors.push((2048 + 2 * u64::from(i), signed(ebr)));
    }
    let (_d, p) = disk_with("m1.vhdx", &sectors);
    let parts = partitions("MBR chain of 200", &p).unwrap();
    assert_eq!(parts.len(), disk::partition::MAX_LOGICAL);
    // Now the second record points back at the first.
    let mut ebr = vec![0u8; 512];
    mbr_entry(&mut ebr, 0, 0x83, 1, 1);
    mbr_entry(&mut ebr, 1, 0x05, 0, 2);
    let img = image::open(&p, &OpenOptions::new(Format::Vhdx).writable()).unwrap();
    let mut second = signed(ebr);
    second[446 + 16 + 8..446 + 16 + 12].copy_from_slice(&2u32.to_le_bytes());
    img.disk().write_at(&second, (2048 + 2) * SS).unwrap();
    // The third points at the second: a loop of two.
    img.disk().write_at(&second, (2048 + 4) * SS).unwrap();
    img.close().unwrap();
    let parts = partitions("MBR chain loop", &p).unwrap();
    assert!(parts.len() <= 3, "{parts:?}");
}
