//! The block mapping of a dynamic or differencing VHD ("Block Allocation
//! Table and Data Blocks" in the VHD specification, 2006): where a virtual
//! offset lies (in this file, in the parent, or nowhere), allocating a
//! block at the end of the file, the in-memory BAT and bitmap updates a
//! completed write makes, and discard. The write protocol and why each
//! sync is where it is: the module docs of `image`.

use crate::bat::{self, Bat, SECTOR, UNALLOCATED};
use crate::image::{buf_len, lock, Vhd};
use crate::sector_bitmap::{self, Overlay};
use crate::{Error, Result};
use disk::{Extent, FileOffset, Mapping, VirtualDisk, WriteExtent};
use std::collections::{BTreeSet, HashMap};
use std::sync::Mutex;

/// A dynamic or differencing disk's layout and block state.
pub(crate) struct Dyn {
    /// File offset of the BAT.
    pub(crate) table_offset: u64,
    /// Bytes of data per block.
    pub(crate) block_size: u64,
    /// Bytes of the sector bitmap before each block's data.
    pub(crate) bitmap_size: u64,
    /// A truncated file (opened read-only): the end of the file, past
    /// which blocks have lost their bytes.
    pub(crate) data_limit: Option<u64>,
    /// The BAT and bitmaps in memory.
    pub(crate) state: Mutex<DynState>,
}

/// The mutable state of a dynamic disk, under its lock.
pub(crate) struct DynState {
    pub(crate) bat: Bat,
    /// Per block: its bitmap is known to mark every sector present.
    pub(crate) full: Vec<bool>,
    /// Bitmaps changed in memory (bits set by writes), by block.
    pub(crate) overlay: HashMap<u64, Overlay>,
    /// BAT sectors (index = entry / 128) changed in memory.
    pub(crate) dirty_bat: BTreeSet<u64>,
    /// Offset of the trailing footer: where the next block goes.
    pub(crate) end: u64,
}

impl DynState {
    /// Whether `block`'s bitmap is known to mark every sector present
    /// (None past the table).
    pub(crate) fn is_full(&self, block: u64) -> Option<bool> {
        usize::try_from(block)
            .ok()
            .and_then(|i| self.full.get(i))
            .copied()
    }

    /// Record whether `block`'s bitmap marks every sector present (ignored
    /// past the table).
    pub(crate) fn set_full(&mut self, block: u64, full: bool) {
        if let Some(f) = usize::try_from(block)
            .ok()
            .and_then(|i| self.full.get_mut(i))
        {
            *f = full;
        }
    }
}

impl Vhd {
    /// Sectors of `block` that lie inside the virtual disk.
    pub(crate) fn block_sectors(&self, d: &Dyn, block: u64) -> u64 {
        let start = block * d.block_size;
        (self.virtual_size - start)
            .min(d.block_size)
            .div_ceil(SECTOR)
    }

    /// The mapping of a sector not present in this layer.
    fn absent(&self) -> Mapping {
        if self.differencing {
            Mapping::Parent
        } else {
            Mapping::Unallocated
        }
    }

    /// In a truncated file, how many of the `run` bytes from `within` of
    /// `block` (at `block_off`) lie inside the file: all, the ones before
    /// its end, or none (or its sector bitmap is lost), which is an error
    /// naming the block, its virtual range and file range.
    fn in_file(&self, d: &Dyn, block: u64, block_off: u64, within: u64, run: u64) -> Result<u64> {
        let Some(limit) = d.data_limit else {
            return Ok(run);
        };
        let data = block_off + d.bitmap_size + within;
        if data + run <= limit {
            return Ok(run);
        }
        if data < limit && block_off + d.bitmap_size <= limit {
            return Ok(limit - data);
        }
        let slot = d.bitmap_size + d.block_size;
        let vs = block * d.block_size;
        let ve = (vs + d.block_size).min(self.virtual_size);
        let lost = if block_off + d.bitmap_size > limit {
            vs
        } else {
            (vs + (limit - block_off - d.bitmap_size)).min(ve)
        };
        Err(Error::corrupt(
            "VHD block",
            block_off,
            format!(
                "block {block} (virtual {vs:#x}..{ve:#x}) at file offset {block_off:#x}+{slot:#x} \
                 (sector bitmap and data) runs past the end of the file ({limit:#x} bytes): the \
                 image is truncated, virtual {lost:#x}..{ve:#x} is lost"
            ),
        )
        .in_file(self.name(), 0))
    }

    /// Map `run` bytes at `offset` (inside one block) of a dynamic or
    /// differencing disk for reading.
    pub(crate) fn map_dynamic(&self, d: &Dyn, offset: u64, run: u64) -> Result<Extent> {
        let block = offset / d.block_size;
        let within = offset % d.block_size;
        let (block_off, full, overlay) = {
            let st = lock(&d.state);
            let Some(off) = st.bat.block_offset(block) else {
                return Ok(Extent {
                    offset,
                    len: run,
                    mapping: self.absent(),
                });
            };
            let full = st.is_full(block).unwrap_or(false);
            let ov = if full {
                None
            } else {
                st.overlay.get(&block).map(|o| o.bits.clone())
            };
            (off, full, ov)
        };
        let data = block_off + d.bitmap_size;
        let run = self.in_file(d, block, block_off, within, run)?;
        if full {
            return Ok(Extent {
                offset,
                len: run,
                mapping: Mapping::Data(FileOffset(data + within)),
            });
        }
        let bits = match overlay {
            Some(b) => b,
            None => {
                let b = self.read_bitmap(d, block_off)?;
                if sector_bitmap::all_set(&b, self.block_sectors(d, block)) {
                    let mut st = lock(&d.state);
                    if st.bat.block_offset(block) == Some(block_off) {
                        st.set_full(block, true);
                    }
                }
                b
            }
        };
        let end = within + run;
        let s0 = within / SECTOR;
        let last = (end - 1) / SECTOR;
        let present = sector_bitmap::bit(&bits, s0);
        let mut s = s0 + 1;
        while s <= last && sector_bitmap::bit(&bits, s) == present {
            s += 1;
        }
        let len = end.min(s * SECTOR) - within;
        Ok(Extent {
            offset,
            len,
            mapping: if present {
                Mapping::Data(FileOffset(data + within))
            } else {
                self.absent()
            },
        })
    }

    /// Allocate `block` at the end of the file (see the module docs) and
    /// return its file offset. Called with the state lock held.
    fn allocate(&self, d: &Dyn, st: &mut DynState, block: u64) -> Result<u64> {
        let at = st.end;
        let new_end = at
            .checked_add(d.bitmap_size + d.block_size)
            .filter(|e| e / SECTOR < u64::from(UNALLOCATED))
            .ok_or_else(|| {
                Error::invalid("the file would exceed the VHD maximum").in_file(self.name(), 0)
            })?;
        let sector = u32::try_from(at / SECTOR)
            .ok()
            .filter(|&s| s != UNALLOCATED)
            .ok_or_else(|| {
                Error::invalid("the file would exceed the VHD maximum").in_file(self.name(), 0)
            })?;
        // 1. The new footer at the new end; 2. sync (see the module docs).
        self.storage.write_at(&self.footer_bytes, new_end)?;
        self.storage.flush()?;
        // 3. The bitmap (over the old footer): every sector present, or for
        // a differencing disk none (they come from the parent until written).
        let fill = if self.differencing { 0 } else { 0xff };
        let bits = vec![fill; buf_len(d.bitmap_size)?];
        self.storage.write_at(&bits, at)?;
        // 4. The BAT entry, in memory until the next flush.
        let idx = usize::try_from(block).map_err(|_| Error::invalid("block out of range"))?;
        if let Some(e) = st.bat.entries.get_mut(idx) {
            *e = sector;
        }
        if let Some(f) = st.full.get_mut(idx) {
            *f = !self.differencing;
        }
        if self.differencing {
            st.overlay.insert(block, Overlay { bits, dirty: false });
        } else {
            st.overlay.remove(&block);
        }
        st.dirty_bat.insert(bat::sector_of(block));
        st.end = new_end;
        Ok(at)
    }

    /// Map `run` bytes at `offset` (inside one block) for writing,
    /// allocating the block if needed.
    pub(crate) fn map_write_dynamic(&self, d: &Dyn, offset: u64, run: u64) -> Result<WriteExtent> {
        let block = offset / d.block_size;
        let within = offset % d.block_size;
        let mut st = lock(&d.state);
        let (block_off, full) = match st.bat.block_offset(block) {
            Some(o) => (o, st.is_full(block).unwrap_or(false)),
            None => (self.allocate(d, &mut st, block)?, !self.differencing),
        };
        let end = within + run;
        let head_partial = !within.is_multiple_of(SECTOR);
        let tail_partial = !end.is_multiple_of(SECTOR);
        // A sector not yet present holds undefined bytes in the file: if
        // this write covers it only partly, the shared write loop merges it
        // with its current contents (zeros, or the parent's bytes) first.
        let fill_partial_sectors = !full && (head_partial || tail_partial) && {
            let bits = &self.overlay(d, &mut st, block, block_off)?.bits;
            (head_partial && !sector_bitmap::bit(bits, within / SECTOR))
                || (tail_partial && !sector_bitmap::bit(bits, (end - 1) / SECTOR))
        };
        Ok(WriteExtent {
            offset,
            len: run,
            file_offset: FileOffset(block_off + d.bitmap_size + within),
            fill_partial_sectors,
            token: if full { 0 } else { block + 1 },
            // Sectors tracked one by one: serialize their copy-up.
            copy_up: (!full).then_some(block),
        })
    }

    /// A write through `ext` completed: set its sectors' bits in the
    /// in-memory bitmap (they reach the file at the next flush).
    pub(crate) fn commit_dynamic(&self, d: &Dyn, ext: &WriteExtent) -> Result<()> {
        if ext.token == 0 {
            return Ok(());
        }
        let block = ext.token - 1;
        let within = ext.offset % d.block_size;
        let first = within / SECTOR;
        let end = (within + ext.len).div_ceil(SECTOR);
        let mut st = lock(&d.state);
        if st.is_full(block).unwrap_or(true) {
            return Ok(());
        }
        let Some(block_off) = st.bat.block_offset(block) else {
            return Ok(());
        };
        let n = self.block_sectors(d, block);
        let o = self.overlay(d, &mut st, block, block_off)?;
        // In memory only: the flush writes the bitmap once the data it
        // covers is durable (see the module docs).
        sector_bitmap::set_bits(&mut o.bits, first, end);
        o.dirty = true;
        let now_full = sector_bitmap::all_set(&o.bits, n);
        if now_full {
            st.set_full(block, true);
        }
        Ok(())
    }

    /// Deallocate the whole blocks of a dynamic (not differencing) disk
    /// inside `[offset, offset+len)`: their BAT entries become unallocated
    /// in memory, and reach the disk at the next flush like any BAT change.
    /// They then read as zeros. The file space is not reused (a later write
    /// allocates at the end), so a crash at any point leaves each block
    /// either as it was or unallocated. Fixed and differencing disks ignore
    /// discard: a fixed disk cannot deallocate, and unallocating a child's
    /// block would expose the parent's older contents.
    pub(crate) fn discard_blocks(&self, offset: u64, len: u64) -> Result<()> {
        self.check_writable()?;
        let Some(d) = &self.dynamic else {
            return Ok(());
        };
        if self.parent.is_some() {
            return Ok(());
        }
        let blocks = disk::whole_blocks(offset, len, d.block_size, self.geometry().virtual_size);
        let mut st = lock(&d.state);
        for b in blocks {
            let Ok(idx) = usize::try_from(b) else { break };
            let Some(e) = st.bat.entries.get_mut(idx) else {
                break;
            };
            if *e == UNALLOCATED {
                continue;
            }
            *e = UNALLOCATED;
            if let Some(f) = st.full.get_mut(idx) {
                *f = false;
            }
            st.overlay.remove(&b);
            st.dirty_bat.insert(bat::sector_of(b));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::footer::{ChsGeometry, Footer};
    use crate::image::testutil::{mem, reopen};
    use crate::image::{OpenOptions, MIB};
    use disk::MemStorage;
    use std::sync::Arc;

    #[test]
    fn write_read_reopen_both_types() {
        for fixed in [false, true] {
            let (st, d) = mem(20 * MIB, fixed);
            assert_eq!(d.block_size(), if fixed { 0 } else { 2 * MIB });
            assert_eq!(d.virtual_size(), ChsGeometry::round_up(20 * MIB).0);
            let data: Vec<u8> = (0..10000u32).map(|i| (i % 251) as u8 + 1).collect();
            d.write_at(&data, 3 * MIB - 77).unwrap();
            d.write_at(&data, 2 * MIB - 5000).unwrap(); // across a block boundary
            let mut back = vec![0u8; data.len()];
            d.read_at(&mut back, 2 * MIB - 5000).unwrap();
            assert_eq!(back, data);
            d.close().unwrap();
            let d2 = reopen(&st);
            let mut back = vec![0u8; data.len() + 2];
            d2.read_at(&mut back, 3 * MIB - 78).unwrap();
            assert_eq!(&back[1..data.len() + 1], &data[..]);
            assert_eq!(back[0], 0);
            assert_eq!(
                d2.info().subformat(),
                if fixed { "fixed" } else { "dynamic" }
            );
            if !fixed {
                assert_eq!(d2.info().allocated_blocks, 2);
                let f = d2.info().footer.clone();
                // The copy at 0 equals the trailing footer.
                let v = st.to_vec();
                assert_eq!(Footer::parse(&v[..512]).unwrap(), f);
            }
        }
    }

    #[test]
    fn partial_bitmap_reads_zero_and_write_sets_bits() {
        let (st, d) = mem(8 * MIB, false);
        d.write_at(&[7u8; 1024], 0).unwrap();
        d.close().unwrap();
        // Clear every bitmap bit except sector 1 (a foreign tool's image).
        let mut v = st.to_vec();
        let bat0 = u32::from_be_bytes([v[1536], v[1537], v[1538], v[1539]]) as usize * 512;
        v[bat0..bat0 + 512].fill(0);
        v[bat0] = 0x40;
        let st2 = Arc::new(MemStorage::from_vec("p.vhd", v));
        let d = Vhd::open_storage(
            Box::new(st2.clone()),
            &OpenOptions {
                writable: true,
                ..OpenOptions::default()
            },
        )
        .unwrap();
        let e = d.map(0, 4096).unwrap();
        assert_eq!((e.len, e.mapping), (512, Mapping::Unallocated));
        let e = d.map(512, 4096).unwrap();
        assert_eq!(e.len, 512);
        assert!(matches!(e.mapping, Mapping::Data(_)));
        let mut b = [1u8; 1024];
        d.read_at(&mut b, 0).unwrap();
        assert_eq!(&b[..512], &[0u8; 512]);
        assert_eq!(&b[512..], &[7u8; 512]);
        // A partial-sector write into a non-present sector keeps the rest zero.
        d.write_at(&[9u8; 10], 2048 + 100).unwrap();
        let mut b = [1u8; 512];
        d.read_at(&mut b, 2048).unwrap();
        assert!(b[..100].iter().all(|&x| x == 0) && b[100..110] == [9; 10]);
        assert!(b[110..].iter().all(|&x| x == 0));
        d.close().unwrap();
        let d = reopen(&st2);
        let mut b = [1u8; 512];
        d.read_at(&mut b, 2048).unwrap();
        assert_eq!(&b[100..110], &[9u8; 10]);
        assert!(matches!(
            d.map(2048, 512).unwrap().mapping,
            Mapping::Data(_)
        ));
    }
}
