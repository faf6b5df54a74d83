//! The block allocation table and block layout ("Block Allocation Table and
//! Data Blocks" in the Virtual Hard Disk Image Format Specification, 2006).
//!
//! The BAT is an array of big-endian u32 entries, one per block: the
//! absolute sector (512-byte unit) where the block starts, or `0xFFFFFFFF`
//! when the block is not allocated. A block starts with its sector bitmap
//! ([`crate::sector_bitmap`]), followed by `block_size` bytes of data.

use crate::{Error, Result};

/// The entry of an unallocated block.
pub const UNALLOCATED: u32 = u32::MAX;
/// Sector size of the format.
pub const SECTOR: u64 = 512;
/// BAT entries per 512-byte BAT sector.
pub const ENTRIES_PER_SECTOR: usize = 128;

/// The BAT sector (0 for the table's first 512 bytes) holding `block`'s
/// entry.
pub fn sector_of(block: u64) -> u64 {
    block / (SECTOR / 4)
}

const STRUCT: &str = "VHD BAT";

/// The in-memory BAT.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Bat {
    /// One entry per block (sector offset or [`UNALLOCATED`]).
    pub entries: Vec<u32>,
}

impl Bat {
    /// A table of `n` unallocated entries.
    pub fn new(n: usize) -> Self {
        Bat {
            entries: vec![UNALLOCATED; n],
        }
    }

    /// Parse a table from its bytes (a whole number of 4-byte entries).
    ///
    /// # Errors
    /// [`crate::ErrorKind::Corrupt`] when the length is not a multiple of 4.
    pub fn parse(buf: &[u8]) -> Result<Self> {
        if !buf.len().is_multiple_of(4) {
            return Err(Error::corrupt(
                STRUCT,
                0,
                format!(
                    "table of {} bytes is not a whole number of entries",
                    buf.len()
                ),
            ));
        }
        Ok(Bat {
            entries: buf
                .chunks_exact(4)
                .map(|c| u32::from_be_bytes([c[0], c[1], c[2], c[3]]))
                .collect(),
        })
    }

    /// Write entries `[first, first + buf.len()/4)` into `buf` (entries past
    /// the table are written as unallocated).
    pub fn write_to(&self, first: usize, buf: &mut [u8]) {
        for (i, c) in buf.chunks_exact_mut(4).enumerate() {
            let e = first
                .checked_add(i)
                .and_then(|j| self.entries.get(j))
                .copied()
                .unwrap_or(UNALLOCATED);
            c.copy_from_slice(&e.to_be_bytes());
        }
    }

    /// Set `block`'s entry (a sector offset or [`UNALLOCATED`]); blocks past
    /// the table are ignored.
    pub fn set(&mut self, block: u64, entry: u32) {
        if let Some(e) = usize::try_from(block)
            .ok()
            .and_then(|i| self.entries.get_mut(i))
        {
            *e = entry;
        }
    }

    /// The bytes of BAT sector `sector` (entries `sector * 128` on, up to
    /// 128 of them, fewer in a last sector the table does not fill).
    pub fn sector_bytes(&self, sector: u64) -> Vec<u8> {
        let first = usize::try_from(sector)
            .ok()
            .and_then(|s| s.checked_mul(ENTRIES_PER_SECTOR))
            .unwrap_or(usize::MAX);
        let n = self.len().saturating_sub(first).min(ENTRIES_PER_SECTOR);
        let mut buf = vec![0u8; n * 4];
        self.write_to(first, &mut buf);
        buf
    }

    /// The file offset of `block`'s sector bitmap, or None when the block is
    /// unallocated or out of the table.
    pub fn block_offset(&self, block: u64) -> Option<u64> {
        let e = *self.entries.get(usize::try_from(block).ok()?)?;
        (e != UNALLOCATED).then(|| u64::from(e) * SECTOR)
    }

    /// Number of entries.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// Whether the table has no entries.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parse_and_write() {
        let buf = [0, 0, 0, 3, 0xff, 0xff, 0xff, 0xff, 0, 1, 0, 0];
        let bat = Bat::parse(&buf).unwrap();
        assert_eq!(bat.entries, vec![3, UNALLOCATED, 0x10000]);
        assert_eq!(bat.block_offset(0), Some(1536));
        assert_eq!(bat.block_offset(1), None);
        assert_eq!(bat.block_offset(3), None);
        assert_eq!(bat.block_offset(u64::MAX), None);
        let mut out = [0u8; 16];
        bat.write_to(0, &mut out);
        assert_eq!(&out[..12], &buf);
        assert_eq!(&out[12..], &[0xff; 4]);
        let mut out = [0u8; 4];
        bat.write_to(2, &mut out);
        assert_eq!(out, [0, 1, 0, 0]);
        assert!(Bat::parse(&buf[..5]).is_err());
        assert_eq!(Bat::new(2).entries, vec![UNALLOCATED; 2]);
    }

    #[test]
    fn sectors_of_the_table() {
        // 300 entries: sectors of 128, 128 and 44 entries.
        let mut bat = Bat::new(300);
        assert_eq!((sector_of(0), sector_of(127), sector_of(128)), (0, 0, 1));
        bat.set(129, 7);
        bat.set(300, 9); // past the table: ignored
        bat.set(u64::MAX, 9);
        assert_eq!(bat.len(), 300);
        assert_eq!(bat.block_offset(129), Some(7 * 512));
        let s1 = bat.sector_bytes(1);
        assert_eq!(s1.len(), 512);
        assert_eq!(&s1[4..8], &[0, 0, 0, 7]);
        assert!(s1[..4] == [0xff; 4] && s1[8..].iter().all(|&b| b == 0xff));
        assert_eq!(bat.sector_bytes(2).len(), 44 * 4);
        assert!(bat.sector_bytes(3).is_empty());
        assert!(bat.sector_bytes(u64::MAX).is_empty());
    }
}
