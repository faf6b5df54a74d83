//! The block allocation table and block layout ("Block Allocation Table and
//! Data Blocks" in the Virtual Hard Disk Image Format Specification, 2006).
//!
//! The BAT is an array of big-endian u32 entries, one per block: the
//! absolute sector (512-byte unit) where the block starts, or `0xFFFFFFFF`
//! when the block is not allocated. A block starts with its sector bitmap
//! (one bit per sector, most significant bit first, padded to a whole
//! sector), followed by `block_size` bytes of data.

use crate::{Error, Result};

/// The entry of an unallocated block.
pub const UNALLOCATED: u32 = u32::MAX;
/// Sector size of the format.
pub const SECTOR: u64 = 512;

const STRUCT: &str = "VHD BAT";

/// Size in bytes of the sector bitmap that precedes each block's data:
/// ceil(sectors per block / 8) rounded up to a whole sector.
pub fn bitmap_size(block_size: u32) -> u64 {
    let sectors = u64::from(block_size).div_ceil(SECTOR);
    sectors.div_ceil(8).div_ceil(SECTOR) * SECTOR
}

/// Whether sector `i` is marked present in a sector bitmap (MSB first).
pub fn bit(bitmap: &[u8], i: u64) -> bool {
    let byte = usize::try_from(i / 8).ok().and_then(|b| bitmap.get(b));
    byte.is_some_and(|b| b & (0x80 >> (i % 8)) != 0)
}

/// Mark sectors `[first, end)` present in a sector bitmap (bits beyond the
/// bitmap are ignored).
pub fn set_bits(bitmap: &mut [u8], first: u64, end: u64) {
    for i in first..end {
        if let Some(b) = usize::try_from(i / 8).ok().and_then(|b| bitmap.get_mut(b)) {
            *b |= 0x80 >> (i % 8);
        }
    }
}

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
    fn bitmap_sizes() {
        assert_eq!(bitmap_size(2 << 20), 512); // 4096 sectors → 512 bytes
        assert_eq!(bitmap_size(512), 512); // 1 sector → 1 byte → 512
        assert_eq!(bitmap_size(4096), 512);
        assert_eq!(bitmap_size(4 << 20), 1024);
        assert_eq!(bitmap_size(256 << 20), 64 << 10);
        assert_eq!(bitmap_size(1 << 31), 512 << 10);
    }

    #[test]
    fn bits_are_msb_first() {
        let mut b = [0u8; 2];
        set_bits(&mut b, 0, 1);
        assert_eq!(b, [0x80, 0]);
        set_bits(&mut b, 7, 10);
        assert_eq!(b, [0x81, 0xc0]);
        assert!(bit(&b, 0) && !bit(&b, 1) && bit(&b, 9) && !bit(&b, 10));
        assert!(!bit(&b, 1000));
        set_bits(&mut b, 14, 100); // past the end: ignored
        assert_eq!(b, [0x81, 0xc3]);
    }

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
}
