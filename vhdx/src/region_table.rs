//! The region table (MS-VHDX 2.2.3): two identical 64 KiB copies at
//! 192 KiB and 256 KiB listing the file's regions (BAT, metadata...).
//!
//! Header (MS-VHDX 2.2.3.1, 16 bytes): `Signature` "regi" (0), `Checksum`
//! (4, CRC-32C over the whole 64 KiB with this field as zero), `EntryCount`
//! (8, at most 2047), reserved (12). Entries (MS-VHDX 2.2.3.2, 32 bytes each)
//! follow: `Guid` (0), `FileOffset` (16), `Length` (24), `Required` (bit 0 of
//! the u32 at 28).

use crate::guid::{
    checked_structure, crc32c_zeroed, is_aligned, le_u32, le_u64, put_u32, put_u64, read_guid,
    write_guid,
};
use crate::{Error, Result};
use uuid::Uuid;

/// Structure name used in error messages.
const NAME: &str = "VHDX region table";
/// `Signature` value: "regi".
pub const SIGNATURE: [u8; 4] = *b"regi";
/// Maximum `EntryCount`.
pub const MAX_ENTRIES: u32 = 2047;
/// Bytes of the region table header.
pub const HEADER_SIZE: usize = 16;
/// Bytes of one region table entry.
pub const ENTRY_SIZE: usize = 32;
const CHECKSUM_AT: usize = 4;
const MIB: u64 = 1024 * 1024;

/// GUID of the BAT region (MS-VHDX 2.2.3.2).
pub const BAT_REGION: Uuid = Uuid::from_u128(0x2DC27766_F623_4200_9D64_115E9BFD4A08);
/// GUID of the metadata region (MS-VHDX 2.2.3.2).
pub const METADATA_REGION: Uuid = Uuid::from_u128(0x8B7CA206_4790_4B9A_B8FE_575F050F886E);

/// One region table entry (MS-VHDX 2.2.3.2).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RegionEntry {
    /// Identifies the region ([`BAT_REGION`], [`METADATA_REGION`] or other).
    pub guid: Uuid,
    /// File offset of the region (multiple of 1 MiB, at least 1 MiB).
    pub file_offset: u64,
    /// Bytes of the region (non-zero multiple of 1 MiB).
    pub length: u32,
    /// Whether an implementation that does not know the region must refuse the file.
    pub required: bool,
}

impl RegionEntry {
    /// Decode one 32-byte entry. Only field decoding: the checks that need
    /// the whole table are in [`RegionTable::parse`], the per-entry range
    /// checks in [`RegionEntry::validate`].
    pub fn parse(b: &[u8; ENTRY_SIZE]) -> Self {
        RegionEntry {
            guid: read_guid(b, 0),
            file_offset: le_u64(b, 16),
            length: le_u32(b, 24),
            required: le_u32(b, 28) & 1 != 0,
        }
    }

    /// Encode into 32 bytes (reserved bits zero).
    pub fn write_to(&self, b: &mut [u8; ENTRY_SIZE]) {
        write_guid(b, 0, self.guid);
        put_u64(b, 16, self.file_offset);
        put_u32(b, 24, self.length);
        put_u32(b, 28, u32::from(self.required));
    }

    /// Check the entry's own fields: offset a multiple of 1 MiB and at
    /// least 1 MiB, length a non-zero multiple of 1 MiB, no overflow.
    /// `at` is the entry's offset within the table, for the error.
    pub fn validate(&self, at: u64) -> Result<()> {
        if self.file_offset < MIB || !is_aligned(self.file_offset, MIB) {
            return Err(Error::corrupt(
                NAME,
                at + 16,
                format!(
                    "region {} FileOffset {:#x} is not a multiple of 1 MiB at or beyond 1 MiB",
                    self.guid, self.file_offset
                ),
            ));
        }
        if self.length == 0 || !is_aligned(u64::from(self.length), MIB) {
            return Err(Error::corrupt(
                NAME,
                at + 24,
                format!(
                    "region {} Length {:#x} is not a non-zero multiple of 1 MiB",
                    self.guid, self.length
                ),
            ));
        }
        if self.end().is_none() {
            return Err(Error::corrupt(
                NAME,
                at + 16,
                format!(
                    "region {} {:#x}+{:#x} overflows",
                    self.guid, self.file_offset, self.length
                ),
            ));
        }
        Ok(())
    }

    /// File offset just past the region, `None` on overflow.
    pub fn end(&self) -> Option<u64> {
        self.file_offset.checked_add(u64::from(self.length))
    }
}

/// The region table (MS-VHDX 2.2.3). A parsed table always contains the BAT
/// and metadata regions.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RegionTable {
    /// The entries in on-disk order.
    pub entries: Vec<RegionEntry>,
}

/// A region's name for messages.
pub(crate) fn region_name(guid: Uuid) -> String {
    match guid {
        BAT_REGION => "BAT region".to_string(),
        METADATA_REGION => "metadata region".to_string(),
        g => format!("region {g}"),
    }
}

impl RegionTable {
    /// Bytes of one copy of the table.
    pub const SIZE: usize = 64 * 1024;
    /// File offsets of the two copies.
    pub const OFFSETS: [u64; 2] = [0x30000, 0x40000];

    /// Parse and fully validate one copy from `buf[..65536]`.
    ///
    /// Unknown regions flagged required are an `Unsupported` error; unknown
    /// optional regions are kept in `entries` (the driver must not allocate
    /// over them).
    pub fn parse(buf: &[u8]) -> Result<Self> {
        let buf = checked_structure(buf, NAME, Self::SIZE, &SIGNATURE, CHECKSUM_AT)?;
        let count = le_u32(buf, 8);
        if count > MAX_ENTRIES {
            return Err(Error::corrupt(
                NAME,
                8,
                format!("EntryCount {count} exceeds {MAX_ENTRIES}"),
            ));
        }
        let mut entries: Vec<RegionEntry> = Vec::with_capacity(count as usize);
        for i in 0..count as usize {
            let at = HEADER_SIZE + i * ENTRY_SIZE;
            let raw: &[u8; ENTRY_SIZE] = buf[at..at + ENTRY_SIZE]
                .try_into()
                .expect("entry slice has entry size");
            let e = RegionEntry::parse(raw);
            let at = at as u64;
            e.validate(at)?;
            for prev in &entries {
                if prev.guid == e.guid {
                    return Err(Error::corrupt(
                        NAME,
                        at,
                        format!("region {} listed twice", e.guid),
                    ));
                }
                // Both ends are known not to overflow (validated).
                if e.file_offset < prev.file_offset + u64::from(prev.length)
                    && prev.file_offset < e.file_offset + u64::from(e.length)
                {
                    return Err(Error::corrupt(
                        NAME,
                        at + 16,
                        format!(
                            "region {} ({:#x}+{:#x}) overlaps region {} ({:#x}+{:#x})",
                            e.guid,
                            e.file_offset,
                            e.length,
                            prev.guid,
                            prev.file_offset,
                            prev.length
                        ),
                    ));
                }
            }
            if e.required && e.guid != BAT_REGION && e.guid != METADATA_REGION {
                return Err(Error::unsupported(format!(
                    "required region {} is not known to this implementation",
                    e.guid
                )));
            }
            entries.push(e);
        }
        for (guid, what) in [(BAT_REGION, "BAT"), (METADATA_REGION, "metadata")] {
            if !entries.iter().any(|e| e.guid == guid) {
                return Err(Error::corrupt(
                    NAME,
                    8,
                    format!("no {what} region ({guid}) in the table"),
                ));
            }
        }
        Ok(RegionTable { entries })
    }

    /// Write the table into `buf[..65536]` (unused space zeroed, checksum set).
    ///
    /// # Panics
    /// If `buf` is shorter than 64 KiB or there are more than 2047 entries.
    pub fn write_to(&self, buf: &mut [u8]) {
        let count = u32::try_from(self.entries.len())
            .ok()
            .filter(|&n| n <= MAX_ENTRIES)
            .expect("too many regions");
        let buf = &mut buf[..Self::SIZE];
        buf.fill(0);
        buf[..4].copy_from_slice(&SIGNATURE);
        put_u32(buf, 8, count);
        for (i, e) in self.entries.iter().enumerate() {
            let at = HEADER_SIZE + i * ENTRY_SIZE;
            let raw: &mut [u8; ENTRY_SIZE] = (&mut buf[at..at + ENTRY_SIZE])
                .try_into()
                .expect("entry slice has entry size");
            e.write_to(raw);
        }
        let crc = crc32c_zeroed(buf, CHECKSUM_AT);
        put_u32(buf, CHECKSUM_AT, crc);
    }

    /// The table serialized into a fresh 64 KiB buffer.
    pub fn to_bytes(&self) -> Vec<u8> {
        let mut v = vec![0u8; Self::SIZE];
        self.write_to(&mut v);
        v
    }

    /// The first region overlapping the file range `offset..offset + length`
    /// (for example the log, or space about to be allocated), if any.
    pub fn overlapping(&self, offset: u64, length: u64) -> Option<&RegionEntry> {
        let end = offset.saturating_add(length);
        self.entries
            .iter()
            .find(|e| length != 0 && e.file_offset < end && offset < e.end().unwrap_or(u64::MAX))
    }

    /// The entry for `guid`, if present.
    pub fn find(&self, guid: Uuid) -> Option<&RegionEntry> {
        self.entries.iter().find(|e| e.guid == guid)
    }

    /// The BAT region.
    ///
    /// # Panics
    /// If the table lacks one (never for a table from [`RegionTable::parse`]).
    pub fn bat(&self) -> &RegionEntry {
        self.find(BAT_REGION)
            .expect("region table has a BAT region")
    }

    /// The metadata region.
    ///
    /// # Panics
    /// If the table lacks one (never for a table from [`RegionTable::parse`]).
    pub fn metadata(&self) -> &RegionEntry {
        self.find(METADATA_REGION)
            .expect("region table has a metadata region")
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ErrorKind;

    fn entry(guid: Uuid, off_mib: u64, len_mib: u32) -> RegionEntry {
        RegionEntry {
            guid,
            file_offset: off_mib * MIB,
            length: len_mib << 20,
            required: true,
        }
    }

    fn sample() -> RegionTable {
        RegionTable {
            entries: vec![entry(BAT_REGION, 3, 1), entry(METADATA_REGION, 2, 1)],
        }
    }

    fn err(t: &RegionTable) -> crate::Error {
        RegionTable::parse(&t.to_bytes()).unwrap_err()
    }

    #[test]
    fn round_trip() {
        let t = sample();
        let buf = t.to_bytes();
        let back = RegionTable::parse(&buf).unwrap();
        assert_eq!(back, t);
        assert_eq!(back.bat().file_offset, 3 * MIB);
        assert_eq!(back.metadata().file_offset, 2 * MIB);
        assert_eq!(back.overlapping(MIB, MIB), None);
        assert_eq!(
            back.overlapping(MIB, MIB + 1).unwrap().guid,
            METADATA_REGION
        );
        assert_eq!(back.overlapping(4 * MIB - 1, 10).unwrap().guid, BAT_REGION);
        assert_eq!(back.overlapping(4 * MIB, u64::MAX), None);
        assert_eq!(back.overlapping(3 * MIB, 0), None);
    }

    #[test]
    fn checksum_covers_whole_table() {
        let buf = sample().to_bytes();
        for i in [0usize, 4, 9, 20, 100, 40000, 65535] {
            let mut bad = buf.clone();
            bad[i] ^= 1;
            assert!(RegionTable::parse(&bad).is_err(), "flip at {i}");
        }
        assert!(RegionTable::parse(&buf[..65535]).is_err());
    }

    #[test]
    fn validation() {
        let mut t = sample();
        t.entries[0].file_offset = 0;
        assert!(err(&t).to_string().contains("FileOffset 0x0"));
        let mut t = sample();
        t.entries[0].file_offset = 3 * MIB + 4096;
        assert!(err(&t).to_string().contains("FileOffset"));
        let mut t = sample();
        t.entries[0].length = 0;
        assert!(err(&t).to_string().contains("Length 0x0"));
        let mut t = sample();
        t.entries[0].file_offset = u64::MAX - (MIB - 1);
        assert!(err(&t).to_string().contains("overflows"));
        let mut t = sample();
        t.entries[1].file_offset = 3 * MIB;
        assert!(err(&t).to_string().contains("overlaps"));
        let mut t = sample();
        t.entries[1].length = 2 << 20;
        t.entries[1].file_offset = 2 * MIB;
        assert!(err(&t).to_string().contains("overlaps"));
        let mut t = sample();
        t.entries[1].guid = BAT_REGION;
        assert!(err(&t).to_string().contains("twice"));
        let mut t = sample();
        t.entries.pop();
        assert!(err(&t).to_string().contains("no metadata region"));
        let mut t = sample();
        t.entries.push(entry(Uuid::from_u128(5), 10, 1));
        assert_eq!(err(&t).kind(), ErrorKind::Unsupported);
        t.entries[2].required = false;
        assert_eq!(RegionTable::parse(&t.to_bytes()).unwrap().entries.len(), 3);
        let mut buf = sample().to_bytes();
        put_u32(&mut buf, 8, 2048);
        let crc = crc32c_zeroed(&buf, 4);
        put_u32(&mut buf, 4, crc);
        assert!(RegionTable::parse(&buf)
            .unwrap_err()
            .to_string()
            .contains("EntryCount 2048"));
    }

    #[test]
    fn corpus_region_table() {
        // The sample holds the used prefix of a table; the rest is zero.
        let Some(prefix) = crate::guid::corpus_struct("region_table.1") else {
            return;
        };
        let mut buf = vec![0u8; RegionTable::SIZE];
        buf[..prefix.len()].copy_from_slice(&prefix);
        let t = RegionTable::parse(&buf).unwrap();
        assert_eq!(t.entries.len(), 2);
        assert_eq!(*t.bat(), entry(BAT_REGION, 3, 1));
        assert_eq!(*t.metadata(), entry(METADATA_REGION, 2, 1));
        assert_eq!(t.to_bytes(), buf);
    }

    #[test]
    fn corpus_region_table_header_and_entry() {
        if let Some(h) = crate::guid::corpus_struct("region_table_header.1") {
            assert_eq!(&h[..4], b"regi");
            assert_eq!(le_u32(&h, 4), 0xc66b_8cae);
            assert_eq!(le_u32(&h, 8), 2);
        }
        if let Some(e) = crate::guid::corpus_struct("region_table_entry.1") {
            let raw: &[u8; ENTRY_SIZE] = e[..ENTRY_SIZE].try_into().unwrap();
            let e = RegionEntry::parse(raw);
            assert_eq!(e, entry(BAT_REGION, 3, 1));
            e.validate(0).unwrap();
            let mut out = [0u8; ENTRY_SIZE];
            e.write_to(&mut out);
            assert_eq!(&out, raw);
        }
    }
}
