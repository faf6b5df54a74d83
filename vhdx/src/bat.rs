//! The block allocation table (MS-VHDX 2.5): one 64-bit entry per payload
//! block, with one sector bitmap entry interleaved after every
//! `chunk_ratio` payload entries.
//!
//! A BAT entry (MS-VHDX 2.5.1) holds `State` in bits 0..3, reserved bits
//! 3..20 and `FileOffsetMB` (the block's file offset in MiB) in bits 20..64.
//! Payload block states are in MS-VHDX 2.5.1.1, sector bitmap block states in
//! 2.5.1.2. The entry count and interleaving rules are in MS-VHDX 2.5.

use crate::metadata::{MAX_BLOCK_SIZE, MAX_VIRTUAL_DISK_SIZE, MIN_BLOCK_SIZE};
use crate::{Error, Result};

/// Structure name used in error messages.
const NAME: &str = "VHDX BAT";
const MIB: u64 = 1 << 20;
const STATE_MASK: u64 = 0b111;
const OFFSET_MASK: u64 = !(MIB - 1);

/// Sector bitmap block state: no bitmap in the file (MS-VHDX 2.5.1.2).
pub const SB_BLOCK_NOT_PRESENT: u8 = 0;
/// Sector bitmap block state: the bitmap is at `FileOffsetMB` (MS-VHDX 2.5.1.2).
pub const SB_BLOCK_PRESENT: u8 = 6;

/// Payload block states (MS-VHDX 2.5.1.1).
#[repr(u8)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PayloadState {
    /// Not allocated; reads return zeros (or the parent's data in a
    /// differencing disk).
    NotPresent = 0,
    /// Content undefined (treated like [`PayloadState::NotPresent`] on read).
    Undefined = 1,
    /// Reads return zeros.
    Zero = 2,
    /// Unmapped by a trim; content may be zero or stale.
    Unmapped = 3,
    /// The whole block is in the file at `FileOffsetMB`.
    FullyPresent = 6,
    /// Differencing disks only: the sector bitmap says which sectors are in
    /// the file and which come from the parent.
    PartiallyPresent = 7,
}

impl PayloadState {
    /// The state for a raw 3-bit value, `None` for the undefined values 4 and 5.
    pub fn from_raw(v: u8) -> Option<Self> {
        Some(match v {
            0 => PayloadState::NotPresent,
            1 => PayloadState::Undefined,
            2 => PayloadState::Zero,
            3 => PayloadState::Unmapped,
            6 => PayloadState::FullyPresent,
            7 => PayloadState::PartiallyPresent,
            _ => return None,
        })
    }
}

/// One raw BAT entry (MS-VHDX 2.5.1).
#[derive(Clone, Copy, PartialEq, Eq, Debug, Default)]
pub struct BatEntry(pub u64);

impl BatEntry {
    /// Bytes of one entry.
    pub const SIZE: usize = 8;

    /// An entry with `state` (low three bits) and `file_offset`, which must
    /// be a multiple of 1 MiB (the low 20 bits are dropped).
    pub fn new(state: u8, file_offset: u64) -> Self {
        debug_assert!(
            crate::guid::is_aligned(file_offset, MIB),
            "BAT offset {file_offset:#x} not MiB-aligned"
        );
        debug_assert!(
            u64::from(state) <= STATE_MASK,
            "BAT state {state} too large"
        );
        BatEntry((file_offset & OFFSET_MASK) | (u64::from(state) & STATE_MASK))
    }

    /// The raw 3-bit `State` field.
    pub fn state(self) -> u8 {
        (self.0 & STATE_MASK) as u8
    }

    /// The state as a payload block state; values 4 and 5 are `Corrupt`.
    pub fn payload_state(self) -> Result<PayloadState> {
        PayloadState::from_raw(self.state()).ok_or_else(|| {
            Error::corrupt(
                NAME,
                0,
                format!(
                    "payload BAT entry {:#018x} has undefined state {}",
                    self.0,
                    self.state()
                ),
            )
        })
    }

    /// The file offset in bytes (`FileOffsetMB << 20`).
    pub fn file_offset(self) -> u64 {
        self.0 & OFFSET_MASK
    }

    /// The reserved bits 3..20 (zero in entries this library writes).
    pub fn reserved(self) -> u64 {
        self.0 & !OFFSET_MASK & !STATE_MASK
    }

    /// Entry `index` of a BAT held in `bat`, `None` past its end.
    pub fn read(bat: &[u8], index: u64) -> Option<Self> {
        let at = usize::try_from(index.checked_mul(8)?).ok()?;
        let b = bat.get(at..at.checked_add(8)?)?;
        Some(BatEntry(u64::from_le_bytes(b.try_into().ok()?)))
    }

    /// Store the entry at `index` of a BAT held in `bat`.
    ///
    /// # Panics
    /// If `index` is past the end of `bat`.
    pub fn write(self, bat: &mut [u8], index: u64) {
        let at = usize::try_from(index * 8).expect("BAT index fits in memory");
        bat[at..at + 8].copy_from_slice(&self.0.to_le_bytes());
    }
}

/// The BAT's shape, derived from the metadata (MS-VHDX 2.5).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BatGeometry {
    /// Virtual disk size in bytes.
    pub virtual_size: u64,
    /// Payload block size in bytes.
    pub block_size: u32,
    /// Logical sector size in bytes.
    pub logical_sector_size: u32,
    /// Differencing disk (sector bitmaps are in use).
    pub has_parent: bool,
}

impl BatGeometry {
    /// Validate and build: virtual size a non-zero multiple of the logical
    /// sector size up to 64 TiB, block size a power of two from 1 MiB to
    /// 256 MiB, logical sector size 512 or 4096 (`InvalidInput` otherwise).
    pub fn new(
        virtual_size: u64,
        block_size: u32,
        logical_sector_size: u32,
        has_parent: bool,
    ) -> Result<Self> {
        if logical_sector_size != 512 && logical_sector_size != 4096 {
            return Err(Error::invalid(format!(
                "logical sector size {logical_sector_size} is neither 512 nor 4096"
            )));
        }
        if !block_size.is_power_of_two() || !(MIN_BLOCK_SIZE..=MAX_BLOCK_SIZE).contains(&block_size)
        {
            return Err(Error::invalid(format!(
                "block size {block_size:#x} is not a power of two from 1 MiB to 256 MiB"
            )));
        }
        if virtual_size == 0
            || virtual_size > MAX_VIRTUAL_DISK_SIZE
            || !crate::guid::is_aligned(virtual_size, u64::from(logical_sector_size))
        {
            return Err(Error::invalid(format!(
                "virtual size {virtual_size:#x} is not a non-zero multiple of {logical_sector_size} up to 64 TiB"
            )));
        }
        Ok(BatGeometry {
            virtual_size,
            block_size,
            logical_sector_size,
            has_parent,
        })
    }

    /// Payload blocks described by one sector bitmap block:
    /// `2^23 * logical_sector_size / block_size`.
    ///
    /// The geometry methods assume the values [`BatGeometry::new`] accepts;
    /// with others they return meaningless numbers but do not panic.
    pub fn chunk_ratio(&self) -> u64 {
        ((1u64 << 23) * u64::from(self.logical_sector_size))
            .checked_div(u64::from(self.block_size))
            .unwrap_or(1)
            .max(1)
    }

    /// Bytes of virtual disk covered by one chunk (one sector bitmap block).
    pub fn chunk_size(&self) -> u64 {
        self.chunk_ratio()
            .saturating_mul(u64::from(self.block_size))
    }

    /// Number of payload blocks: `ceil(virtual_size / block_size)`.
    pub fn payload_blocks(&self) -> u64 {
        self.virtual_size
            .div_ceil(u64::from(self.block_size.max(1)))
    }

    /// Number of sector bitmap blocks: `ceil(payload_blocks / chunk_ratio)`.
    pub fn bitmap_blocks(&self) -> u64 {
        self.payload_blocks().div_ceil(self.chunk_ratio())
    }

    /// Number of BAT entries (MS-VHDX 2.5): without a parent
    /// `payload_blocks + floor((payload_blocks - 1) / chunk_ratio)`, with a
    /// parent `bitmap_blocks * (chunk_ratio + 1)`.
    pub fn total_entries(&self) -> u64 {
        if self.has_parent {
            self.bitmap_blocks()
                .saturating_mul(self.chunk_ratio().saturating_add(1))
        } else {
            let p = self.payload_blocks();
            p.saturating_add(p.saturating_sub(1) / self.chunk_ratio())
        }
    }

    /// Bytes of BAT entries (`total_entries * 8`).
    pub fn bat_bytes(&self) -> u64 {
        self.total_entries().saturating_mul(8)
    }

    /// BAT index of payload block `block`: `block + block / chunk_ratio`.
    pub fn payload_index(&self, block: u64) -> u64 {
        block.saturating_add(block / self.chunk_ratio())
    }

    /// BAT index of the sector bitmap block of chunk `chunk`:
    /// `chunk * (chunk_ratio + 1) + chunk_ratio`.
    pub fn bitmap_index(&self, chunk: u64) -> u64 {
        let r = self.chunk_ratio();
        chunk.saturating_mul(r.saturating_add(1)).saturating_add(r)
    }

    /// Whether BAT index `i` holds a sector bitmap entry rather than a
    /// payload entry.
    pub fn is_bitmap_index(&self, i: u64) -> bool {
        let r = self.chunk_ratio();
        i % r.saturating_add(1) == r
    }

    /// The virtual byte range `[start, end)` whose data BAT entry `i`
    /// describes: its payload block's, or for a sector bitmap entry the
    /// range of every block of its chunk (clamped to the disk).
    pub fn entry_virtual_range(&self, i: u64) -> (u64, u64) {
        let r = self.chunk_ratio().saturating_add(1);
        let bs = u64::from(self.block_size);
        let (first, last) = if self.is_bitmap_index(i) {
            let chunk = i / r;
            let first = chunk.saturating_mul(r - 1);
            (first, first.saturating_add(r - 1))
        } else {
            let block = i - i / r;
            (block, block.saturating_add(1))
        };
        let clamp = |b: u64| b.saturating_mul(bs).min(self.virtual_size);
        (clamp(first), clamp(last))
    }

    /// Validate entry `index` of the BAT (the offset in errors is the entry's
    /// byte offset in the BAT): payload entries need a defined payload state,
    /// `PartiallyPresent` only in differencing disks; sector bitmap entries
    /// are `NotPresent`, or `Present` in differencing disks; present blocks
    /// need a file offset of at least 1 MiB. Reserved bits are not checked.
    pub fn check_entry(&self, index: u64, e: BatEntry) -> Result<()> {
        let at = index.saturating_mul(8);
        let err = |msg: String| {
            Err(Error::corrupt(
                NAME,
                at,
                format!("entry {index} ({:#018x}): {msg}", e.0),
            ))
        };
        let present = if self.is_bitmap_index(index) {
            match e.state() {
                SB_BLOCK_NOT_PRESENT => false,
                SB_BLOCK_PRESENT if self.has_parent => true,
                SB_BLOCK_PRESENT => {
                    return err("sector bitmap block present in a disk without a parent".into())
                }
                s => return err(format!("undefined sector bitmap state {s}")),
            }
        } else {
            match PayloadState::from_raw(e.state()) {
                None => return err(format!("undefined payload state {}", e.state())),
                Some(PayloadState::PartiallyPresent) if !self.has_parent => {
                    return err("partially present block in a disk without a parent".into())
                }
                Some(PayloadState::FullyPresent | PayloadState::PartiallyPresent) => true,
                Some(_) => false,
            }
        };
        if present && e.file_offset() < MIB {
            return err(format!(
                "present block at file offset {:#x}, inside the header section",
                e.file_offset()
            ));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ErrorKind;

    #[test]
    fn entry_fields() {
        let e = BatEntry::new(PayloadState::FullyPresent as u8, 0x1234 * MIB);
        assert_eq!(e.0, (0x1234 << 20) | 6);
        assert_eq!(e.state(), 6);
        assert_eq!(e.payload_state().unwrap(), PayloadState::FullyPresent);
        assert_eq!(e.file_offset(), 0x1234 * MIB);
        assert_eq!(e.reserved(), 0);
        // FileOffsetMB uses all 44 high bits.
        let e = BatEntry(u64::MAX);
        assert_eq!(e.file_offset(), !(MIB - 1));
        assert_eq!(e.state(), 7);
        assert_eq!(e.reserved(), 0xFFFF8);
        for s in [4u64, 5] {
            let e = BatEntry(s).payload_state().unwrap_err();
            assert_eq!(e.kind(), ErrorKind::Corrupt);
            assert!(e.to_string().contains(&format!("undefined state {s}")));
        }
        for s in [0u8, 1, 2, 3, 6, 7] {
            assert_eq!(PayloadState::from_raw(s).unwrap() as u8, s);
        }
    }

    #[test]
    fn virtual_range_of_entries() {
        // 1 MiB blocks, 512-byte sectors: 4096 blocks a chunk; a disk of
        // 4096 + 10 blocks and a half.
        let size = (4096 + 10) * MIB + MIB / 2;
        let g = BatGeometry::new(size, 1 << 20, 512, true).unwrap();
        assert_eq!(g.entry_virtual_range(0), (0, MIB));
        assert_eq!(g.entry_virtual_range(4095), (4095 * MIB, 4096 * MIB));
        // Index 4096 is chunk 0's sector bitmap: blocks 0..4096.
        assert!(g.is_bitmap_index(4096));
        assert_eq!(g.entry_virtual_range(4096), (0, 4096 * MIB));
        assert_eq!(g.entry_virtual_range(4097), (4096 * MIB, 4097 * MIB));
        // The last block and chunk end at the disk's end.
        assert_eq!(g.entry_virtual_range(4097 + 10), (4106 * MIB, size));
        assert_eq!(g.entry_virtual_range(2 * 4097 - 1), (4096 * MIB, size));
    }

    #[test]
    fn read_write_table() {
        let mut bat = vec![0u8; 24];
        BatEntry::new(6, 5 * MIB).write(&mut bat, 2);
        assert_eq!(BatEntry::read(&bat, 2), Some(BatEntry::new(6, 5 * MIB)));
        assert_eq!(BatEntry::read(&bat, 0), Some(BatEntry(0)));
        assert_eq!(BatEntry::read(&bat, 3), None);
        assert_eq!(BatEntry::read(&bat, u64::MAX), None);
    }

    #[test]
    fn geometry_formulas() {
        // 512-byte sectors, 32 MiB blocks: chunk ratio 2^23 * 2^9 / 2^25 = 128.
        let g = BatGeometry::new(10 << 30, 32 << 20, 512, false).unwrap();
        assert_eq!(g.chunk_ratio(), 128);
        assert_eq!(g.chunk_size(), 4 << 30);
        assert_eq!(g.payload_blocks(), 320);
        assert_eq!(g.bitmap_blocks(), 3);
        assert_eq!(g.total_entries(), 320 + 319 / 128);
        assert_eq!(g.bat_bytes(), 322 * 8);
        assert_eq!(g.payload_index(0), 0);
        assert_eq!(g.payload_index(127), 127);
        assert_eq!(g.payload_index(128), 129);
        assert_eq!(g.bitmap_index(0), 128);
        assert_eq!(g.bitmap_index(1), 257);
        assert!(g.is_bitmap_index(128) && g.is_bitmap_index(257));
        assert!(!g.is_bitmap_index(127) && !g.is_bitmap_index(129));
        // The last payload block's index is the last entry.
        assert_eq!(
            g.payload_index(g.payload_blocks() - 1),
            g.total_entries() - 1
        );

        let d = BatGeometry {
            has_parent: true,
            ..g
        };
        assert_eq!(d.total_entries(), 3 * 129);
        assert_eq!(d.bitmap_index(d.bitmap_blocks() - 1), d.total_entries() - 1);

        // Exactly one chunk without a parent: no bitmap entry at all.
        let g = BatGeometry::new(4 << 30, 32 << 20, 512, false).unwrap();
        assert_eq!(g.total_entries(), 128);
        // 4 KiB sectors, 1 MiB blocks: ratio 2^15; 256 MiB blocks, 512: 16.
        assert_eq!(
            BatGeometry::new(1 << 20, 1 << 20, 4096, false)
                .unwrap()
                .chunk_ratio(),
            1 << 15
        );
        let g = BatGeometry::new(64 << 40, 256 << 20, 512, true).unwrap();
        assert_eq!(g.chunk_ratio(), 16);
        assert_eq!(g.payload_blocks(), 1 << 18);
        assert_eq!(g.total_entries(), (1 << 18) / 16 * 17);
        // Partial last block.
        let g = BatGeometry::new((1 << 20) + 512, 1 << 20, 512, false).unwrap();
        assert_eq!(g.payload_blocks(), 2);
    }

    #[test]
    fn geometry_validation() {
        assert!(BatGeometry::new(0, 1 << 20, 512, false).is_err());
        assert!(BatGeometry::new(1000, 1 << 20, 512, false).is_err());
        assert!(BatGeometry::new((64 << 40) + 512, 1 << 20, 512, false).is_err());
        assert!(BatGeometry::new(1 << 30, 3 << 20, 512, false).is_err());
        assert!(BatGeometry::new(1 << 30, 512 << 20, 512, false).is_err());
        assert!(BatGeometry::new(1 << 30, 1 << 19, 512, false).is_err());
        assert!(BatGeometry::new(1 << 30, 1 << 20, 1024, false).is_err());
        assert_eq!(
            BatGeometry::new(1 << 30, 1 << 20, 1024, false)
                .unwrap_err()
                .kind(),
            ErrorKind::InvalidInput
        );
    }

    #[test]
    fn entry_checks() {
        let g = BatGeometry::new(10 << 30, 32 << 20, 512, false).unwrap();
        let d = BatGeometry {
            has_parent: true,
            ..g
        };
        g.check_entry(0, BatEntry::new(6, 4 * MIB)).unwrap();
        g.check_entry(0, BatEntry::new(2, 0)).unwrap();
        g.check_entry(128, BatEntry(0)).unwrap();
        assert!(g.check_entry(0, BatEntry::new(6, 0)).is_err());
        assert!(g.check_entry(0, BatEntry(4)).is_err());
        assert!(g.check_entry(0, BatEntry::new(7, 4 * MIB)).is_err());
        d.check_entry(0, BatEntry::new(7, 4 * MIB)).unwrap();
        assert!(g.check_entry(128, BatEntry::new(6, 4 * MIB)).is_err());
        d.check_entry(128, BatEntry::new(6, 4 * MIB)).unwrap();
        let e = d.check_entry(128, BatEntry::new(2, 0)).unwrap_err();
        assert!(e.to_string().contains("at offset 0x400: entry 128"), "{e}");
    }
}
