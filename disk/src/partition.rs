//! The partition table of a virtual disk: MBR (with extended partitions) or
//! GPT, read-only, so that `vdisk mount` can show each partition as a file.
//!
//! - MBR: the classic master boot record (signature 0x55AA at byte 510,
//!   four 16-byte entries at byte 446; a start LBA and a sector count, both
//!   32-bit, in units of the logical sector). An extended partition (type
//!   0x05, 0x0F or 0x85) holds a chain of extended boot records, each with
//!   one logical partition (relative to that record) and a link to the next
//!   record (relative to the extended partition's start). Numbering follows
//!   Linux: primaries 1-4 by slot, logical partitions from 5.
//! - GPT (UEFI specification 2.10, section 5.3): an MBR whose only use is a
//!   protective entry of type 0xEE, the GPT header at LBA 1 (signature
//!   "EFI PART", CRC32 over `header_size` bytes with its own CRC field
//!   zeroed) and the entry array it names (CRC32 over
//!   `entries * entry_size` bytes). When the primary header or its array
//!   fails a check, the backup header at the last LBA is used. Partitions
//!   are numbered by entry index + 1, unused entries (type all zeros)
//!   skipped.
//!
//! Partitions that reach past the end of the disk, are empty, or (MBR)
//! overlap the table's own sectors are skipped: they cannot be served
//! safely. Everything is bounded: at most [`MAX_LOGICAL`] logical
//! partitions and at most [`MAX_GPT_ARRAY`] bytes of GPT entries.

use crate::{Error, Result, VirtualDisk};
use uuid::Uuid;

/// Most logical partitions followed in an MBR extended partition (the
/// chain is also stopped at a loop).
pub const MAX_LOGICAL: usize = 128;
/// Largest GPT entry array read (the usual one is 16 KiB: 128 × 128 bytes).
pub const MAX_GPT_ARRAY: u64 = 1 << 20;

const GPT_SIGNATURE: &[u8; 8] = b"EFI PART";
const MBR_SIGNATURE: [u8; 2] = [0x55, 0xAA];
const PROTECTIVE: u8 = 0xEE;

/// Which table a partition comes from, with what it says about its kind.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PartitionKind {
    /// An MBR entry (primary or logical) and its type byte.
    Mbr {
        /// The system id, e.g. 0x83 Linux, 0x07 NTFS/exFAT, 0x0C FAT32 LBA.
        type_id: u8,
        /// Whether the entry's status byte is 0x80 (active/boot).
        bootable: bool,
    },
    /// A GPT entry.
    Gpt {
        /// Partition type GUID (e.g. EBD0A0A2-B9E5-4433-87C0-68B6B72699C7,
        /// Microsoft basic data).
        type_guid: Uuid,
        /// Unique partition GUID.
        unique_guid: Uuid,
        /// The entry's name (UTF-16LE, up to the first NUL).
        name: String,
    },
}

/// One partition: a byte range of the disk.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Partition {
    /// The number Linux would give it (sda1 → 1): MBR slot 1-4, logical
    /// partitions from 5, GPT entry index + 1.
    pub number: u32,
    /// Byte offset of the first byte on the disk.
    pub start: u64,
    /// Length in bytes.
    pub len: u64,
    /// The table entry's kind.
    pub kind: PartitionKind,
}

/// A buffer of `len` zero bytes (a sector, or a GPT entry array bounded
/// by [`MAX_GPT_ARRAY`]).
fn zeroed(len: u64) -> Result<Vec<u8>> {
    let n = usize::try_from(len)
        .map_err(|_| Error::invalid(format!("a buffer of {len} bytes does not fit in memory")))?;
    Ok(vec![0u8; n])
}

/// The partitions of `disk`, in number order: empty when the disk has no
/// recognised table (no MBR signature), e.g. a blank disk or a file system
/// on the whole disk.
///
/// # Errors
/// Read errors of the disk; a GPT whose primary and backup headers both
/// fail their checks (Corrupt, naming the structure and byte offset).
pub fn partitions(disk: &dyn VirtualDisk) -> Result<Vec<Partition>> {
    let geo = disk.geometry();
    let ss = u64::from(geo.logical_sector_size.max(512));
    let size = geo.virtual_size;
    if size < 2 * ss {
        return Ok(Vec::new());
    }
    let mut mbr = zeroed(ss)?;
    disk.read_at(&mut mbr, 0)?;
    if mbr[510..512] != MBR_SIGNATURE {
        return Ok(Vec::new());
    }
    let entries: Vec<MbrEntry> = (0..4).map(|i| MbrEntry::parse(&mbr, i)).collect();
    if entries.iter().any(|e| e.type_id == PROTECTIVE) {
        return gpt(disk, ss, size);
    }
    let mut out = Vec::new();
    for (number, e) in (1u32..).zip(&entries) {
        if e.type_id == 0 || e.sectors == 0 {
            continue;
        }
        if is_extended(e.type_id) {
            logical(disk, ss, size, e, &mut out)?;
            continue;
        }
        push_if_valid(&mut out, number, e, 0, ss, size);
    }
    out.sort_by_key(|p| p.number);
    Ok(out)
}

fn is_extended(type_id: u8) -> bool {
    matches!(type_id, 0x05 | 0x0F | 0x85)
}

/// One 16-byte MBR (or EBR) partition entry.
#[derive(Debug, Clone, Copy)]
struct MbrEntry {
    status: u8,
    type_id: u8,
    lba: u32,
    sectors: u32,
}

impl MbrEntry {
    fn parse(sector: &[u8], slot: usize) -> Self {
        let e = &sector[446 + slot * 16..446 + slot * 16 + 16];
        let u32_at = |o: usize| u32::from_le_bytes([e[o], e[o + 1], e[o + 2], e[o + 3]]);
        MbrEntry {
            status: e[0],
            type_id: e[4],
            lba: u32_at(8),
            sectors: u32_at(12),
        }
    }
}

/// Add the partition `e` (its LBA relative to sector `base`) when it lies
/// inside the disk and past sector 0.
fn push_if_valid(
    out: &mut Vec<Partition>,
    number: u32,
    e: &MbrEntry,
    base: u64,
    ss: u64,
    size: u64,
) {
    let Some(first) = base.checked_add(u64::from(e.lba)) else {
        return;
    };
    let (Some(start), Some(len)) = (first.checked_mul(ss), u64::from(e.sectors).checked_mul(ss))
    else {
        return;
    };
    if first == 0 || len == 0 || start.checked_add(len).is_none_or(|end| end > size) {
        return;
    }
    out.push(Partition {
        number,
        start,
        len,
        kind: PartitionKind::Mbr {
            type_id: e.type_id,
            bootable: e.status == 0x80,
        },
    });
}

/// Follow the chain of extended boot records of extended partition `ext`.
fn logical(
    disk: &dyn VirtualDisk,
    ss: u64,
    size: u64,
    ext: &MbrEntry,
    out: &mut Vec<Partition>,
) -> Result<()> {
    let ext_start = u64::from(ext.lba);
    let ext_end = ext_start + u64::from(ext.sectors);
    let mut ebr_lba = ext_start;
    let mut seen = Vec::new();
    let mut sector = zeroed(ss)?;
    let mut number = 5;
    while seen.len() < MAX_LOGICAL {
        if ebr_lba < ext_start || ebr_lba >= ext_end || seen.contains(&ebr_lba) {
            break;
        }
        let Some(at) = ebr_lba.checked_mul(ss).filter(|&a| a + ss <= size) else {
            break;
        };
        seen.push(ebr_lba);
        disk.read_at(&mut sector, at)?;
        if sector[510..512] != MBR_SIGNATURE {
            break;
        }
        let this = MbrEntry::parse(&sector, 0);
        let next = MbrEntry::parse(&sector, 1);
        if this.type_id != 0 && this.sectors != 0 {
            let before = out.len();
            push_if_valid(out, number, &this, ebr_lba, ss, size);
            // A logical partition must stay inside the extended one.
            if let Some(p) = out.get(before) {
                if p.start / ss < ext_start || (p.start + p.len) / ss > ext_end {
                    out.truncate(before);
                }
            }
            number += 1;
        }
        if next.type_id == 0 || next.lba == 0 {
            break;
        }
        ebr_lba = ext_start + u64::from(next.lba);
    }
    Ok(())
}

/// What a GPT header says (UEFI 2.10, table 5.21).
#[derive(Debug, Clone, Copy)]
struct GptHeader {
    first_usable: u64,
    last_usable: u64,
    entries_lba: u64,
    entries: u32,
    entry_size: u32,
    entries_crc: u32,
}

impl GptHeader {
    /// Parse and check the header in `sector` (read at byte `at`).
    fn parse(sector: &[u8], at: u64) -> Result<Self> {
        let bad = |off: u64, msg: &str| Error::corrupt("GPT header", at + off, msg.to_string());
        if &sector[..8] != GPT_SIGNATURE {
            return Err(bad(0, "no \"EFI PART\" signature"));
        }
        let u32_at = |o: usize| u32::from_le_bytes(sector[o..o + 4].try_into().unwrap_or([0; 4]));
        let u64_at = |o: usize| u64::from_le_bytes(sector[o..o + 8].try_into().unwrap_or([0; 8]));
        let header_size = u32_at(12) as usize;
        if !(92..=sector.len()).contains(&header_size) {
            return Err(bad(12, &format!("header size {header_size} out of range")));
        }
        let mut copy = sector[..header_size].to_vec();
        copy[16..20].fill(0);
        if crc32fast::hash(&copy) != u32_at(16) {
            return Err(bad(16, "header CRC32 mismatch"));
        }
        let h = GptHeader {
            first_usable: u64_at(40),
            last_usable: u64_at(48),
            entries_lba: u64_at(72),
            entries: u32_at(80),
            entry_size: u32_at(84),
            entries_crc: u32_at(88),
        };
        if h.entry_size < 128 || !h.entry_size.is_power_of_two() {
            return Err(bad(84, &format!("entry size {} invalid", h.entry_size)));
        }
        if u64::from(h.entries) * u64::from(h.entry_size) > MAX_GPT_ARRAY {
            return Err(bad(
                80,
                &format!(
                    "{} entries of {} bytes: more than {MAX_GPT_ARRAY} bytes",
                    h.entries, h.entry_size
                ),
            ));
        }
        Ok(h)
    }
}

fn gpt(disk: &dyn VirtualDisk, ss: u64, size: u64) -> Result<Vec<Partition>> {
    let last_lba = size / ss - 1;
    let mut first_err = None;
    for lba in [1, last_lba] {
        match gpt_at(disk, ss, size, lba) {
            Ok(parts) => return Ok(parts),
            Err(e) if first_err.is_none() => first_err = Some(e),
            Err(_) => {}
        }
    }
    Err(first_err.unwrap_or_else(|| Error::corrupt("GPT header", ss, "unreadable")))
}

/// The partitions of the GPT whose header is at `lba`.
fn gpt_at(disk: &dyn VirtualDisk, ss: u64, size: u64, lba: u64) -> Result<Vec<Partition>> {
    let at = lba * ss;
    let mut sector = zeroed(ss)?;
    disk.read_at(&mut sector, at)?;
    let h = GptHeader::parse(&sector, at)?;
    let array_len = u64::from(h.entries) * u64::from(h.entry_size);
    let array_at = h
        .entries_lba
        .checked_mul(ss)
        .filter(|a| a.checked_add(array_len).is_some_and(|end| end <= size))
        .ok_or_else(|| {
            Error::corrupt(
                "GPT header",
                at + 72,
                format!("entry array at LBA {} lies outside the disk", h.entries_lba),
            )
        })?;
    let mut array = zeroed(array_len)?;
    disk.read_at(&mut array, array_at)?;
    if crc32fast::hash(&array) != h.entries_crc {
        return Err(Error::corrupt(
            "GPT entry array",
            array_at,
            "entry array CRC32 mismatch",
        ));
    }
    let mut out = Vec::new();
    let entry_size = usize::try_from(h.entry_size)
        .map_err(|_| Error::corrupt("GPT header", at + 84, "entry size too large"))?;
    // At most MAX_GPT_ARRAY / 128 entries: numbers fit a u32.
    for (number, e) in (1u32..).zip(array.chunks_exact(entry_size)) {
        let type_guid = Uuid::from_bytes_le(e[..16].try_into().unwrap_or([0; 16]));
        if type_guid.is_nil() {
            continue;
        }
        let unique_guid = Uuid::from_bytes_le(e[16..32].try_into().unwrap_or([0; 16]));
        let first = u64::from_le_bytes(e[32..40].try_into().unwrap_or([0; 8]));
        let last = u64::from_le_bytes(e[40..48].try_into().unwrap_or([0; 8]));
        if first > last || first < h.first_usable.max(1) || last > h.last_usable {
            continue;
        }
        let (Some(start), Some(len)) = (first.checked_mul(ss), (last - first + 1).checked_mul(ss))
        else {
            continue;
        };
        if start.checked_add(len).is_none_or(|end| end > size) {
            continue;
        }
        let units: Vec<u16> = e[56..128]
            .chunks_exact(2)
            .map(|c| u16::from_le_bytes([c[0], c[1]]))
            .take_while(|&u| u != 0)
            .collect();
        out.push(Partition {
            number,
            start,
            len,
            kind: PartitionKind::Gpt {
                type_guid,
                unique_guid,
                name: String::from_utf16_lossy(&units),
            },
        });
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{MemStorage, RawDisk};

    const SS: u64 = 512;

    fn disk(size: u64) -> RawDisk<MemStorage> {
        RawDisk::create(MemStorage::new("t"), size).unwrap()
    }

    fn mbr_entry(sector: &mut [u8], slot: usize, status: u8, ty: u8, lba: u32, n: u32) {
        let e = &mut sector[446 + slot * 16..446 + slot * 16 + 16];
        e[0] = status;
        e[4] = ty;
        e[8..12].copy_from_slice(&lba.to_le_bytes());
        e[12..16].copy_from_slice(&n.to_le_bytes());
    }

    fn sign(sector: &mut [u8]) {
        sector[510] = 0x55;
        sector[511] = 0xAA;
    }

    #[test]
    fn blank_disk_has_no_partitions() {
        assert!(partitions(&disk(1 << 20)).unwrap().is_empty());
    }

    #[test]
    fn mbr_primaries_and_logicals() {
        let d = disk(64 << 20);
        let mut mbr = vec![0u8; 512];
        mbr_entry(&mut mbr, 0, 0x80, 0x83, 2048, 4096);
        mbr_entry(&mut mbr, 1, 0, 0x05, 8192, 40960);
        // Past the end of the disk: skipped.
        mbr_entry(&mut mbr, 3, 0, 0x07, 200_000, 100);
        sign(&mut mbr);
        d.write_at(&mbr, 0).unwrap();
        // EBR 1 at 8192: logical at +2048, next EBR at ext+20480.
        let mut ebr = vec![0u8; 512];
        mbr_entry(&mut ebr, 0, 0, 0x83, 2048, 1000);
        mbr_entry(&mut ebr, 1, 0, 0x05, 20480, 10000);
        sign(&mut ebr);
        d.write_at(&ebr, 8192 * SS).unwrap();
        // EBR 2 links back to EBR 1: the loop is cut.
        let mut ebr2 = vec![0u8; 512];
        mbr_entry(&mut ebr2, 0, 0, 0x0C, 100, 500);
        mbr_entry(&mut ebr2, 1, 0, 0x05, 0, 10000);
        sign(&mut ebr2);
        d.write_at(&ebr2, (8192 + 20480) * SS).unwrap();
        let p = partitions(&d).unwrap();
        let got: Vec<(u32, u64, u64)> = p.iter().map(|p| (p.number, p.start, p.len)).collect();
        assert_eq!(
            got,
            [
                (1, 2048 * SS, 4096 * SS),
                (5, (8192 + 2048) * SS, 1000 * SS),
                (6, (8192 + 20480 + 100) * SS, 500 * SS)
            ]
        );
        assert_eq!(
            p[0].kind,
            PartitionKind::Mbr {
                type_id: 0x83,
                bootable: true
            }
        );
    }

    /// A GPT disk of `size` bytes with one partition per `(first, last, name)`.
    fn gpt_disk(size: u64, parts: &[(u64, u64, &str)]) -> RawDisk<MemStorage> {
        let d = disk(size);
        let last_lba = size / SS - 1;
        let mut mbr = vec![0u8; 512];
        mbr_entry(
            &mut mbr,
            0,
            0,
            PROTECTIVE,
            1,
            u32::try_from(last_lba).unwrap_or(u32::MAX),
        );
        sign(&mut mbr);
        d.write_at(&mbr, 0).unwrap();
        let mut array = vec![0u8; 128 * 128];
        let basic = Uuid::parse_str("EBD0A0A2-B9E5-4433-87C0-68B6B72699C7").unwrap();
        for (i, (first, last, name)) in parts.iter().enumerate() {
            let e = &mut array[i * 128..i * 128 + 128];
            e[..16].copy_from_slice(&basic.to_bytes_le());
            e[16..32].copy_from_slice(&Uuid::from_u128(i as u128 + 1).to_bytes_le());
            e[32..40].copy_from_slice(&first.to_le_bytes());
            e[40..48].copy_from_slice(&last.to_le_bytes());
            for (k, u) in name.encode_utf16().enumerate() {
                e[56 + 2 * k..58 + 2 * k].copy_from_slice(&u.to_le_bytes());
            }
        }
        let write_header = |my: u64, alt: u64, entries_lba: u64| {
            let mut h = vec![0u8; 512];
            h[..8].copy_from_slice(GPT_SIGNATURE);
            h[8..12].copy_from_slice(&0x0001_0000u32.to_le_bytes());
            h[12..16].copy_from_slice(&92u32.to_le_bytes());
            h[24..32].copy_from_slice(&my.to_le_bytes());
            h[32..40].copy_from_slice(&alt.to_le_bytes());
            h[40..48].copy_from_slice(&34u64.to_le_bytes());
            h[48..56].copy_from_slice(&(last_lba - 33).to_le_bytes());
            h[72..80].copy_from_slice(&entries_lba.to_le_bytes());
            h[80..84].copy_from_slice(&128u32.to_le_bytes());
            h[84..88].copy_from_slice(&128u32.to_le_bytes());
            h[88..92].copy_from_slice(&crc32fast::hash(&array).to_le_bytes());
            let crc = crc32fast::hash(&h[..92]);
            h[16..20].copy_from_slice(&crc.to_le_bytes());
            d.write_at(&h, my * SS).unwrap();
            d.write_at(&array, entries_lba * SS).unwrap();
        };
        write_header(1, last_lba, 2);
        write_header(last_lba, 1, last_lba - 32);
        d
    }

    #[test]
    fn gpt_partitions_and_backup_header() {
        let d = gpt_disk(16 << 20, &[(2048, 4095, "EFI"), (4096, 30000, "data")]);
        let p = partitions(&d).unwrap();
        assert_eq!(p.len(), 2);
        assert_eq!(
            (p[0].number, p[0].start, p[0].len),
            (1, 2048 * SS, 2048 * SS)
        );
        assert_eq!((p[1].number, p[1].start), (2, 4096 * SS));
        match &p[1].kind {
            PartitionKind::Gpt {
                name, type_guid, ..
            } => {
                assert_eq!(name, "data");
                assert_eq!(
                    type_guid.to_string().to_uppercase(),
                    "EBD0A0A2-B9E5-4433-87C0-68B6B72699C7"
                );
            }
            k => panic!("{k:?}"),
        }
        // Damage the primary header: the backup still gives the table.
        d.write_at(&[0xFF], SS + 30).unwrap();
        assert_eq!(partitions(&d).unwrap(), p);
        // Damage the backup's entry array too: corrupt, naming the primary.
        let last = (16u64 << 20) / SS - 1;
        d.write_at(&[0xFF], (last - 32) * SS).unwrap();
        let e = partitions(&d).unwrap_err();
        assert_eq!(e.kind(), crate::ErrorKind::Corrupt);
        assert!(e.to_string().contains("GPT header"), "{e}");
    }

    #[test]
    fn gpt_bounds_are_enforced() {
        // A partition past last_usable is skipped; a huge array is refused.
        let d = gpt_disk(16 << 20, &[(2048, 4095, "a"), (2048, 40_000, "too far")]);
        let p = partitions(&d).unwrap();
        assert_eq!(p.len(), 1);
        let mut h = vec![0u8; 512];
        d.read_at(&mut h, SS).unwrap();
        h[80..84].copy_from_slice(&1_000_000u32.to_le_bytes());
        h[16..20].fill(0);
        let crc = crc32fast::hash(&h[..92]);
        h[16..20].copy_from_slice(&crc.to_le_bytes());
        assert!(GptHeader::parse(&h, SS)
            .unwrap_err()
            .to_string()
            .contains("more than"));
    }
}
