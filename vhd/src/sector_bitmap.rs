//! Sector bitmaps ("Block Allocation Table and Data Blocks" in the VHD
//! specification, 2006): each block of a dynamic or differencing disk
//! starts with one bit per sector of the block, most significant bit first,
//! padded to a whole 512-byte sector. A set bit means the sector's data is
//! in this file; a clear one, in a differencing disk, that it comes from
//! the parent (in a dynamic disk, that it reads as zeros).
//!
//! Bits are metadata like BAT entries: a write sets them in an in-memory
//! copy of the bitmap (`Overlay`), and the copy reaches the file at the
//! next flush, after the data it declares present is durable (see the
//! write protocol in the module docs of `image`).

use crate::bat::SECTOR;
use crate::block_map::{Dyn, DynState};
use crate::image::{read_vec, Vhd};
use crate::Result;
use std::collections::hash_map::Entry;

/// Size in bytes of the sector bitmap that precedes each block's data:
/// ceil(sectors per block / 8) rounded up to a whole sector.
pub fn size(block_size: u32) -> u64 {
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

/// Whether sectors `[0, n)` are all marked present.
pub(crate) fn all_set(bits: &[u8], n: u64) -> bool {
    let whole = usize::try_from(n / 8).unwrap_or(usize::MAX);
    match bits.get(..whole) {
        Some(b) if b.iter().all(|&x| x == 0xff) => (whole as u64 * 8..n).all(|i| bit(bits, i)),
        _ => false,
    }
}

/// The in-memory copy of one block's sector bitmap.
pub(crate) struct Overlay {
    /// The bitmap's bytes, with the bits of completed writes set.
    pub(crate) bits: Vec<u8>,
    /// Changed since the file's copy was last written.
    pub(crate) dirty: bool,
}

impl Vhd {
    /// Read the sector bitmap of the block at `block_off` from the file.
    pub(crate) fn read_bitmap(&self, d: &Dyn, block_off: u64) -> Result<Vec<u8>> {
        read_vec(&*self.storage, block_off, d.bitmap_size)
    }

    /// The in-memory copy of `block`'s sector bitmap, read from the file
    /// the first time. Called with the state lock held.
    pub(crate) fn overlay<'a>(
        &self,
        d: &Dyn,
        st: &'a mut DynState,
        block: u64,
        block_off: u64,
    ) -> Result<&'a mut Overlay> {
        Ok(match st.overlay.entry(block) {
            Entry::Occupied(o) => o.into_mut(),
            Entry::Vacant(v) => {
                let bits = self.read_bitmap(d, block_off)?;
                v.insert(Overlay { bits, dirty: false })
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bitmap_sizes() {
        assert_eq!(size(2 << 20), 512); // 4096 sectors → 512 bytes
        assert_eq!(size(512), 512); // 1 sector → 1 byte → 512
        assert_eq!(size(4096), 512);
        assert_eq!(size(4 << 20), 1024);
        assert_eq!(size(256 << 20), 64 << 10);
        assert_eq!(size(1 << 31), 512 << 10);
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
    fn all_set_counts_only_the_first_n_bits() {
        let mut b = [0u8; 4];
        assert!(all_set(&b, 0));
        assert!(!all_set(&b, 1));
        set_bits(&mut b, 0, 13);
        assert!(all_set(&b, 13));
        assert!(all_set(&b, 8));
        assert!(!all_set(&b, 14));
        assert!(!all_set(&b, 1000));
    }
}
