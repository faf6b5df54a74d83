//! Differencing disks (MS-VHDX 2.5, 2.6.2.6): sector bitmaps and
//! PARTIALLY_PRESENT blocks.
//!
//! A differencing disk (HasParent) reads a block from its parent when the
//! block is NOT_PRESENT (or UNDEFINED), and per logical sector from its
//! sector bitmap when it is PARTIALLY_PRESENT. Writing to a block not
//! present allocates it PARTIALLY_PRESENT with all bits 0 (and the chunk's
//! sector bitmap block if it has none); the written sectors' bits are set
//! in memory once the payload write returns, and reach the file through the
//! log at the next flush, after the data is durable, like BAT entries. A
//! block whose sectors are all present becomes FULLY_PRESENT. Sectors only
//! partly covered by a write are first filled with the parent's bytes by the
//! shared write loop. ZERO and UNMAPPED blocks read as zeros, not from the
//! parent. The parent is found through the parent locator under a
//! [`disk::ParentPolicy`] (see `parent_search`), must have the
//! DataWriteGuid the locator's `parent_linkage` (or `parent_linkage2`)
//! records, and is opened read-only.

use crate::bat::{BatEntry, PayloadState, SB_BLOCK_NOT_PRESENT, SB_BLOCK_PRESENT};
use crate::bat_cache::ENTRIES_PER_PAGE;
use crate::image::{lock, MIB};
use crate::sector_bitmap::{self, PAGE_BITS};
use crate::{Error, Result, Vhdx};
use disk::{FileOffset, Mapping, WriteExtent};

impl Vhdx {
    /// Sectors per payload block.
    pub(crate) fn sectors_per_block(&self) -> u64 {
        self.block_size / u64::from(self.geometry.logical_sector_size)
    }

    /// Sectors of `block` inside the virtual disk.
    pub(crate) fn block_sectors(&self, block: u64) -> u64 {
        let start = block * self.block_size;
        (self.geometry.virtual_size - start).min(self.block_size)
            / u64::from(self.geometry.logical_sector_size)
    }

    /// The file offset of the sector bitmap block of `block`'s chunk, if
    /// allocated, validated.
    pub(crate) fn bitmap_block(&self, block: u64) -> Result<Option<u64>> {
        let idx = self
            .bat_geo
            .bitmap_index(block / self.bat_geo.chunk_ratio());
        let e = self.bat_entry(idx)?;
        self.entry_in_file(idx)?;
        let at = self.bat_offset + idx * 8;
        match e.state() {
            SB_BLOCK_NOT_PRESENT => Ok(None),
            SB_BLOCK_PRESENT => {
                let fo = e.file_offset();
                if fo < MIB || fo.checked_add(MIB).is_none() {
                    return Err(Error::corrupt(
                        "BAT entry",
                        at,
                        format!("sector bitmap block at invalid file offset {fo:#x}"),
                    )
                    .in_file(self.name(), 0));
                }
                if let Some(what) = self.structure_at(fo, MIB) {
                    return Err(Error::corrupt(
                        "BAT entry",
                        at,
                        format!(
                            "the sector bitmap block of chunk {} at file offset {fo:#x} \
                             (+0x100000) overlaps {what}",
                            block / self.bat_geo.chunk_ratio()
                        ),
                    )
                    .in_file(self.name(), 0));
                }
                self.whole_in_file(idx, fo, MIB)?;
                Ok(Some(fo))
            }
            s => Err(Error::corrupt(
                "BAT entry",
                at,
                format!("sector bitmap entry in undefined state {s}"),
            )
            .in_file(self.name(), 0)),
        }
    }

    /// The bit index, within its sector bitmap block, of `block`'s first sector.
    pub(crate) fn first_bit(&self, block: u64) -> u64 {
        (block % self.bat_geo.chunk_ratio()) * self.sectors_per_block()
    }

    /// Make the bitmap page at file offset `page_off` resident.
    pub(crate) fn bitmap_page_in(&self, page_off: u64) -> Result<()> {
        if lock(&self.bitmaps).get(page_off).is_some() {
            return Ok(());
        }
        let mut bytes = Box::new([0u8; sector_bitmap::PAGE]);
        let flen = self.storage.len()?;
        if page_off < flen {
            let page = sector_bitmap::PAGE;
            let n = usize::try_from(flen - page_off).map_or(page, |r| r.min(page));
            self.storage.read_at(&mut bytes[..n], page_off)?;
        }
        lock(&self.bitmaps).insert(page_off, bytes);
        Ok(())
    }

    /// Whether sector `bit` of the bitmap block at `sb` is present, and how
    /// many sectors from it (at most `count`) share that state.
    pub(crate) fn bitmap_run(&self, sb: u64, bit: u64, count: u64) -> Result<(bool, u64)> {
        let mut done = 0u64;
        let mut state = None;
        while done < count {
            let b = bit + done;
            let page_off = sb + (b / PAGE_BITS) * sector_bitmap::PAGE as u64;
            let in_page = b % PAGE_BITS;
            let want = (count - done).min(PAGE_BITS - in_page);
            loop {
                let c = lock(&self.bitmaps);
                if let Some(page) = c.get(page_off) {
                    let v = sector_bitmap::bit(page, in_page);
                    if state.is_some_and(|s| s != v) {
                        return Ok((state.unwrap_or(v), done));
                    }
                    state = Some(v);
                    let n = sector_bitmap::run_len(page, in_page, in_page + want);
                    done += n;
                    if n < want {
                        return Ok((v, done));
                    }
                    break;
                }
                drop(c);
                self.bitmap_page_in(page_off)?;
            }
        }
        Ok((state.unwrap_or(false), done))
    }

    /// Set or clear bits `[from, to)` of the bitmap block at `sb` in memory
    /// (dirty: logged at the next flush).
    pub(crate) fn bitmap_set(&self, sb: u64, from: u64, to: u64, value: bool) -> Result<()> {
        let mut b = from;
        while b < to {
            let page_off = sb + (b / PAGE_BITS) * sector_bitmap::PAGE as u64;
            let in_page = b % PAGE_BITS;
            let n = (to - b).min(PAGE_BITS - in_page);
            loop {
                let mut c = lock(&self.bitmaps);
                if let Some(page) = c.get_mut(page_off) {
                    sector_bitmap::set_range(page, in_page, in_page + n, value);
                    break;
                }
                drop(c);
                self.bitmap_page_in(page_off)?;
            }
            b += n;
        }
        Ok(())
    }

    /// The sector bitmap block of PARTIALLY_PRESENT `block`'s chunk. A
    /// chunk without one is corrupt: which of the block's sectors are
    /// present cannot be told, so neither reads nor writes can go there.
    pub(crate) fn partial_bitmap(&self, block: u64) -> Result<u64> {
        self.bitmap_block(block)?.ok_or_else(|| {
            Error::corrupt(
                "BAT entry",
                self.bat_offset + self.bat_geo.payload_index(block) * 8,
                format!(
                    "block {block} is PARTIALLY_PRESENT but its chunk has no sector bitmap block"
                ),
            )
            .in_file(self.name(), 0)
        })
    }

    /// Map part of a PARTIALLY_PRESENT block by its sector bitmap.
    pub(crate) fn map_partial(
        &self,
        block: u64,
        within: u64,
        run: u64,
        fo: u64,
    ) -> Result<(Mapping, u64)> {
        let sb = self.partial_bitmap(block)?;
        let ss = u64::from(self.geometry.logical_sector_size);
        let s0 = within / ss;
        let last = (within + run - 1) / ss;
        let (present, n) = self.bitmap_run(sb, self.first_bit(block) + s0, last - s0 + 1)?;
        let len = ((s0 + n) * ss).min(within + run) - within;
        let mapping = if present {
            Mapping::Data(FileOffset(fo + within))
        } else {
            Mapping::Parent
        };
        Ok((mapping, len))
    }

    /// Allocate `block` of a differencing disk PARTIALLY_PRESENT (no sector
    /// present yet), with its chunk's sector bitmap block. Returns the
    /// block's state and file offset after the call (another thread may have
    /// allocated it first).
    pub(crate) fn allocate_partial(&self, block: u64) -> Result<(PayloadState, u64)> {
        let idx = self.bat_geo.payload_index(block);
        let sb_idx = self
            .bat_geo
            .bitmap_index(block / self.bat_geo.chunk_ratio());
        // Make both pages resident before taking the write lock.
        self.bat_entry(idx)?;
        self.bat_entry(sb_idx)?;
        let mut c = self.bat.write().unwrap_or_else(|e| e.into_inner());
        while c.get(idx).is_none() || c.get(sb_idx).is_none() {
            drop(c);
            self.page_in((idx / ENTRIES_PER_PAGE) as usize)?;
            self.page_in((sb_idx / ENTRIES_PER_PAGE) as usize)?;
            c = self.bat.write().unwrap_or_else(|e| e.into_inner());
        }
        let cur = c.get(idx).unwrap_or_default();
        let state = cur
            .payload_state()
            .map_err(|e| e.in_file(self.name(), self.bat_offset + idx * 8))?;
        if matches!(
            state,
            PayloadState::FullyPresent | PayloadState::PartiallyPresent
        ) {
            return Ok((state, cur.file_offset()));
        }
        let sb_entry = c.get(sb_idx).unwrap_or_default();
        let mut end = lock(&self.alloc_end);
        let grow = |end: &mut u64, n: u64| -> Result<u64> {
            let fo = *end;
            let new_end = fo.checked_add(n).ok_or_else(|| {
                Error::invalid("file would exceed the maximum size").in_file(self.name(), 0)
            })?;
            self.storage.set_len(new_end)?;
            *end = new_end;
            Ok(fo)
        };
        let (sb, fresh) = match sb_entry.state() {
            SB_BLOCK_PRESENT if sb_entry.file_offset() >= MIB => (sb_entry.file_offset(), false),
            SB_BLOCK_NOT_PRESENT => {
                let sb = grow(&mut end, MIB)?;
                c.set(sb_idx, BatEntry::new(SB_BLOCK_PRESENT, sb));
                (sb, true)
            }
            _ => {
                return Err(Error::corrupt(
                    "BAT entry",
                    self.bat_offset + sb_idx * 8,
                    "invalid sector bitmap entry",
                )
                .in_file(self.name(), 0))
            }
        };
        let fo = grow(&mut end, self.block_size)?;
        drop(end);
        // The block's bits may hold junk from an earlier life: clear them
        // (a new bitmap block reads as zeros already).
        if !fresh {
            let first = self.first_bit(block);
            self.bitmap_set(sb, first, first + self.sectors_per_block(), false)?;
        }
        c.set(idx, BatEntry::new(PayloadState::PartiallyPresent as u8, fo));
        Ok((PayloadState::PartiallyPresent, fo))
    }

    /// Record that sectors of a PARTIALLY_PRESENT block were written: set
    /// their bits, and make the block FULLY_PRESENT once all are set.
    pub(crate) fn commit_partial(&self, ext: &WriteExtent) -> Result<()> {
        let block = ext.token - 1;
        let (state, fo) = self.block_entry(block)?;
        if state != PayloadState::PartiallyPresent {
            return Ok(());
        }
        let sb = self.partial_bitmap(block)?;
        let ss = u64::from(self.geometry.logical_sector_size);
        let within = ext.offset % self.block_size;
        let first = self.first_bit(block);
        let s0 = within / ss;
        let s1 = (within + ext.len).div_ceil(ss);
        self.bitmap_set(sb, first + s0, first + s1, true)?;
        let n = self.block_sectors(block);
        let (present, run) = self.bitmap_run(sb, first, n)?;
        if present && run == n {
            let idx = self.bat_geo.payload_index(block);
            let mut c = self.bat.write().unwrap_or_else(|e| e.into_inner());
            if c.get(idx).map(|e| e.state()) == Some(PayloadState::PartiallyPresent as u8) {
                c.set(idx, BatEntry::new(PayloadState::FullyPresent as u8, fo));
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use crate::bat::BatEntry;
    use crate::image::MIB;
    use crate::{parent_locator_for, CreateOptions, ErrorKind, OpenOptions, Vhdx};
    use disk::{MemStorage, Storage, VirtualDisk};
    use std::path::Path;
    use std::sync::Arc;

    fn parent() -> Arc<dyn VirtualDisk> {
        let st = Arc::new(MemStorage::new("parent.vhdx"));
        let mut o = CreateOptions::new(8 * MIB);
        o.block_size = 1 << 20;
        let d = Vhdx::create_on(Box::new(st.clone()), &o).unwrap();
        d.write_at(&[0x11; 4096], 0).unwrap();
        d.close().unwrap();
        Arc::new(
            Vhdx::open_storage(
                Box::new(MemStorage::from_vec("parent.vhdx", st.to_vec())),
                &OpenOptions::default(),
            )
            .unwrap(),
        )
    }

    #[test]
    fn a_write_into_a_partial_block_without_a_sector_bitmap_block_is_refused() {
        // A fuzz finding (chain): block 0 PARTIALLY_PRESENT, its chunk with
        // no sector bitmap block. A write there succeeded without being
        // recorded; once a write elsewhere gave the chunk a (zeroed) bitmap
        // block, block 0 read the parent again: a flushed write lost.
        let p = parent();
        let loc = parent_locator_for(
            Path::new("/nonexistent/child.avhdx"),
            Path::new("/"),
            uuid::Uuid::nil(), // the linkage is not checked below
        )
        .unwrap();
        let st = Arc::new(MemStorage::new("child.avhdx"));
        let mut o = CreateOptions::new(8 * MIB);
        o.block_size = 1 << 20;
        let d = Vhdx::create_differencing_on(Box::new(st.clone()), &o, loc, p.clone()).unwrap();
        d.write_at(&[0x22; 4096], 0).unwrap();
        let (bat, sb_idx) = (d.bat_offset, d.bat_geo.bitmap_index(0));
        d.close().unwrap();
        // Forget the chunk's sector bitmap block.
        st.write_at(&BatEntry(0).0.to_le_bytes(), bat + sb_idx * 8)
            .unwrap();
        let rw = OpenOptions {
            writable: true,
            ignore_parent_linkage: true,
            ..OpenOptions::default()
        };
        let d = Vhdx::open_storage_with_parent(Box::new(st.clone()), &rw, p).unwrap();
        for at in [0, 4096, 512] {
            let e = d.write_at(&[0x33; 4096], at).unwrap_err();
            assert_eq!(e.kind(), ErrorKind::Corrupt, "{e}");
            assert!(e.to_string().contains("no sector bitmap block"), "{e}");
        }
        // Another block of the chunk gets a bitmap block; block 0 still
        // does not read as written (it was never written).
        d.write_at(&[0x44; 4096], 7 * MIB).unwrap();
        d.flush().unwrap();
        let mut b = [0u8; 4096];
        d.read_at(&mut b, 7 * MIB).unwrap();
        assert_eq!(b, [0x44; 4096]);
        d.read_at(&mut b, 0).unwrap();
        assert!(b != [0x33; 4096]);
    }
}
