//! Where the blocks of a VHDX are (MS-VHDX 2.5): BAT entries paged in and
//! validated against the file (a truncated file is an error naming the
//! block), blocks allocated at the end of the file, discard and zeroing of
//! whole blocks, and the [`VirtualDisk`] mapping the shared I/O loop uses.

use crate::bat::{BatEntry, PayloadState};
use crate::bat_cache::{ENTRIES_PER_PAGE, PAGE_BYTES};
use crate::image::{lock, MIB, MIB_BYTES};
use crate::region_table::{BAT_REGION, METADATA_REGION};
use crate::scan;
use crate::{AllocationStats, Error, Result, Vhdx};
use disk::{Extent, FileOffset, Geometry, Mapping, Storage, VirtualDisk, WriteExtent};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use uuid::Uuid;

impl Vhdx {
    /// The BAT entry at `index`, paging it in if needed.
    pub(crate) fn bat_entry(&self, index: u64) -> Result<BatEntry> {
        {
            let c = self.bat.read().unwrap_or_else(|e| e.into_inner());
            if let Some(e) = c.get(index) {
                return Ok(e);
            }
        }
        let p = (index / ENTRIES_PER_PAGE) as usize;
        self.page_in(p)?;
        let c = self.bat.read().unwrap_or_else(|e| e.into_inner());
        c.get(index).ok_or_else(|| {
            Error::corrupt("BAT", self.bat_offset + index * 8, "entry out of range")
                .in_file(self.name(), 0)
        })
    }

    /// Read BAT page `p` from disk into the cache (I/O outside the lock).
    pub(crate) fn page_in(&self, p: usize) -> Result<()> {
        let mut bytes = Box::new([0u8; PAGE_BYTES]);
        let off = self.bat_offset + (p as u64) * PAGE_BYTES as u64;
        let flen = self.storage.len()?;
        // Bytes past the end of the file read as zeros here, but no writer
        // leaves the BAT past the end (this library, QEMU and every corpus
        // image extend the file over it): an entry past the end is a file
        // truncated inside the BAT, which `entry_in_file` turns into an
        // error naming the block rather than NOT_PRESENT.
        if off < flen {
            let n = usize::try_from(flen - off).map_or(PAGE_BYTES, |r| r.min(PAGE_BYTES));
            self.storage.read_at(&mut bytes[..n], off)?;
        }
        let mut c = self.bat.write().unwrap_or_else(|e| e.into_inner());
        c.insert(p, &bytes);
        Ok(())
    }

    /// The file's length, asking the storage only when `end` lies past the
    /// length last seen (the file may have grown since).
    pub(crate) fn file_len_for(&self, end: u64) -> Result<u64> {
        let known = self.known_len.load(Ordering::Acquire);
        if end <= known {
            return Ok(known);
        }
        let now = self.storage.len()?;
        self.known_len.store(now, Ordering::Release);
        Ok(now)
    }

    /// How many of the `run` bytes from `within` of the block of BAT index
    /// `idx` (at file offset `fo`, `len` bytes long) lie inside the file:
    /// all, the ones before its end, or none, which is an error naming the
    /// block, its virtual range and file range (a truncated file).
    pub(crate) fn in_file(
        &self,
        idx: u64,
        fo: u64,
        len: u64,
        within: u64,
        run: u64,
    ) -> Result<u64> {
        let start = fo + within;
        let flen = self.file_len_for(start + run)?;
        if start + run <= flen {
            Ok(run)
        } else if start < flen {
            Ok(flen - start)
        } else {
            Err(scan::truncated_error(
                self.name(),
                &self.bat_geo,
                idx,
                fo,
                len,
                flen,
            ))
        }
    }

    /// Fail unless the whole block of BAT index `idx` (at `fo`, `len`
    /// bytes) lies inside the file: a write into a truncated block would
    /// put zeros where data was lost, and a sector bitmap cut short would
    /// read as "nothing present".
    pub(crate) fn whole_in_file(&self, idx: u64, fo: u64, len: u64) -> Result<()> {
        let flen = self.file_len_for(fo + len)?;
        if fo + len <= flen {
            return Ok(());
        }
        Err(scan::truncated_error(
            self.name(),
            &self.bat_geo,
            idx,
            fo,
            len,
            flen,
        ))
    }

    /// Fail when entry `idx` lies wholly or partly past the end of the
    /// file: a file truncated inside the BAT must not read the blocks whose
    /// entries it lost as zeros, nor use an entry cut in two (its low bytes
    /// kept, the high bytes of its file offset read as zeros: another
    /// block's data). No writer leaves the BAT region past the end of the
    /// file (this library, QEMU and Windows all write it or extend the file
    /// over it).
    pub(crate) fn entry_in_file(&self, idx: u64) -> Result<()> {
        let at = self.bat_offset + idx * 8;
        if at + 8 <= self.known_len.load(Ordering::Acquire) {
            return Ok(());
        }
        let flen = self.file_len_for(at + 8)?;
        if at + 8 <= flen {
            return Ok(());
        }
        Err(scan::lost_entry_error(
            self.name(),
            &self.bat_geo,
            idx,
            at,
            flen,
        ))
    }

    /// The payload state and file offset of `block`, validated.
    pub(crate) fn block_entry(&self, block: u64) -> Result<(PayloadState, u64)> {
        let idx = self.bat_geo.payload_index(block);
        let e = self.bat_entry(idx)?;
        self.entry_in_file(idx)?;
        let at = self.bat_offset + idx * 8;
        let state = e
            .payload_state()
            .map_err(|err| err.in_file(self.name(), at))?;
        let fo = e.file_offset();
        if matches!(
            state,
            PayloadState::FullyPresent | PayloadState::PartiallyPresent
        ) && (fo < MIB || fo.checked_add(self.block_size).is_none())
        {
            return Err(Error::corrupt(
                "BAT entry",
                at,
                format!("block {block} is present at invalid file offset {fo:#x}"),
            )
            .in_file(self.name(), 0));
        }
        if matches!(
            state,
            PayloadState::FullyPresent | PayloadState::PartiallyPresent
        ) {
            if let Some(what) = self.structure_at(fo, self.block_size) {
                return Err(Error::corrupt(
                    "BAT entry",
                    at,
                    format!(
                        "block {block} at file offset {fo:#x} (+{:#x}) overlaps {what}: reading \
                         it would show that structure, writing it would destroy it",
                        self.block_size
                    ),
                )
                .in_file(self.name(), 0));
            }
        }
        if state == PayloadState::PartiallyPresent && !self.bat_geo.has_parent {
            return Err(Error::corrupt(
                "BAT entry",
                at,
                format!("block {block} is PARTIALLY_PRESENT in a disk without a parent"),
            )
            .in_file(self.name(), 0));
        }
        Ok((state, fo))
    }

    /// The fixed structure of the file (the header section, the log, a
    /// region) that the file range `fo..fo + len` overlaps, described, if
    /// any. No block may overlap one (MS-VHDX 2.5, 2.2.3): a hostile BAT
    /// entry pointing into the metadata would otherwise read it as data,
    /// and a write there would overwrite it.
    pub(crate) fn structure_at(&self, fo: u64, len: u64) -> Option<String> {
        let end = fo.saturating_add(len);
        let meets = |start: u64, length: u64| fo < start.saturating_add(length) && start < end;
        if meets(0, MIB) {
            return Some("the header section (0x0+0x100000)".to_string());
        }
        let h = &self.info.header;
        if meets(h.log_offset, u64::from(h.log_length)) {
            return Some(format!("the log ({:#x}+{:#x})", h.log_offset, h.log_length));
        }
        self.info
            .regions
            .iter()
            .find(|r| meets(r.file_offset, u64::from(r.length)))
            .map(|r| {
                let what = match r.guid {
                    BAT_REGION => "the BAT region".to_string(),
                    METADATA_REGION => "the metadata region".to_string(),
                    g => format!("region {g}"),
                };
                format!("{what} ({:#x}+{:#x})", r.file_offset, r.length)
            })
    }

    /// Allocate file space for `block` and point its BAT entry at it.
    /// Returns the block's file offset.
    pub(crate) fn allocate(&self, block: u64) -> Result<u64> {
        let idx = self.bat_geo.payload_index(block);
        // Make sure the page is resident before taking the write lock.
        self.bat_entry(idx)?;
        let mut c = self.bat.write().unwrap_or_else(|e| e.into_inner());
        if c.get(idx).is_none() {
            drop(c);
            self.page_in((idx / ENTRIES_PER_PAGE) as usize)?;
            c = self.bat.write().unwrap_or_else(|e| e.into_inner());
        }
        let cur = c.get(idx).unwrap_or_default();
        let state = cur
            .payload_state()
            .map_err(|e| e.in_file(self.name(), self.bat_offset + idx * 8))?;
        if state == PayloadState::FullyPresent {
            return Ok(cur.file_offset()); // another thread got here first
        }
        let kept = cur.file_offset();
        let fo = if state == PayloadState::Unmapped
            && kept >= MIB
            && kept.saturating_add(self.block_size) <= self.kept_limit
        {
            // LeaveBlocksAllocated kept the space: reuse it, zeroed, for this
            // same block (it was never handed to another block). Space kept
            // beyond kept_limit is ignored (never this file's space).
            let fo = cur.file_offset();
            if let Some(what) = self.structure_at(fo, self.block_size) {
                return Err(Error::corrupt(
                    "BAT entry",
                    self.bat_offset + idx * 8,
                    format!(
                        "the space kept for block {block} at file offset {fo:#x} (+{:#x}) \
                         overlaps {what}: zeroing it for a write would destroy it",
                        self.block_size
                    ),
                )
                .in_file(self.name(), 0));
            }
            let zeros = vec![0u8; MIB_BYTES];
            let mut done = 0;
            while done < self.block_size {
                self.storage.write_at(&zeros, fo + done)?;
                done += MIB;
            }
            fo
        } else {
            let mut end = lock(&self.alloc_end);
            let fo = *end;
            let new_end = fo.checked_add(self.block_size).ok_or_else(|| {
                Error::invalid("file would exceed the maximum size").in_file(self.name(), 0)
            })?;
            self.storage.set_len(new_end)?;
            *end = new_end;
            fo
        };
        c.set(idx, BatEntry::new(PayloadState::FullyPresent as u8, fo));
        Ok(fo)
    }

    /// Scan the BAT as stored for blocks that run past the end of the file
    /// (a truncated file) and entries past it (a file truncated inside the
    /// BAT); see [`scan::BatScan`]. Reads the whole BAT region in the file
    /// (its holes skipped).
    ///
    /// # Errors
    /// I/O errors.
    pub fn truncation(&self) -> Result<scan::BatScan> {
        scan::scan(&*self.storage, self.bat_offset, &self.bat_geo, None)
    }

    /// Scan the whole BAT (page by page, without keeping it resident).
    ///
    /// # Errors
    /// I/O errors or unknown block states.
    pub fn allocation_stats(&self) -> Result<AllocationStats> {
        let mut s = AllocationStats::default();
        let blocks = self.bat_geo.payload_blocks();
        let file_len = self.storage.len()?;
        for b in 0..blocks {
            // An entry past the end of the file (truncated inside the BAT)
            // is unknown: not counted as allocated.
            if self.bat_offset + self.bat_geo.payload_index(b) * 8 + 8 > file_len {
                s.absent_blocks += 1;
                continue;
            }
            let (state, _) = self.block_entry(b)?;
            match state {
                PayloadState::FullyPresent | PayloadState::PartiallyPresent => {
                    s.present_blocks += 1;
                    let start = b * self.block_size;
                    s.allocated_bytes += (self.geometry.virtual_size - start).min(self.block_size);
                }
                PayloadState::Zero => s.zero_blocks += 1,
                PayloadState::Unmapped => s.unmapped_blocks += 1,
                PayloadState::NotPresent | PayloadState::Undefined => s.absent_blocks += 1,
            }
        }
        Ok(s)
    }

    /// Deallocate the whole blocks inside `[offset, offset+len)`: they become
    /// UNMAPPED and read as zeros (in a differencing disk too, rather than
    /// the parent's data). With LeaveBlocksAllocated the file space
    /// stays reserved for the block; otherwise it is simply no longer used.
    pub(crate) fn discard_blocks(&self, offset: u64, len: u64) -> Result<()> {
        let blocks = disk::whole_blocks(offset, len, self.block_size, self.geometry.virtual_size);
        // LeaveBlocksAllocated is ignored when HasParent is set (2.6.2.1).
        let keep =
            self.info.metadata.file_parameters.leave_blocks_allocated && !self.bat_geo.has_parent;
        let has_parent = self.bat_geo.has_parent;
        self.set_block_entries(blocks, |state, fo| {
            // In a differencing disk every discarded block becomes UNMAPPED
            // (zeros), whether it was here or in the parent, so that a
            // discard reads the same whatever the chain holds.
            let skip = if has_parent {
                state == PayloadState::Unmapped
            } else {
                matches!(
                    state,
                    PayloadState::NotPresent | PayloadState::Unmapped | PayloadState::Undefined
                ) && !(keep && state == PayloadState::Unmapped)
            };
            (!skip).then(|| BatEntry::new(PayloadState::Unmapped as u8, if keep { fo } else { 0 }))
        })
    }

    /// `write_zeroes` of whole blocks: each becomes PAYLOAD_BLOCK_ZERO
    /// (MS-VHDX 2.5.1.1: reads zeros, in a differencing disk too), keeping
    /// the file space it has unless `unmap` (or LeaveBlocksAllocated asks
    /// to keep it). Like a write, this reaches the file through the log at
    /// the next flush; space given up is never handed out again in this
    /// session (new blocks go at the end of the file).
    pub(crate) fn zero_blocks(&self, blocks: std::ops::Range<u64>, unmap: bool) -> Result<()> {
        let keep = !unmap
            || (self.info.metadata.file_parameters.leave_blocks_allocated
                && !self.bat_geo.has_parent);
        self.set_block_entries(blocks, |state, fo| {
            let fo = match state {
                PayloadState::FullyPresent | PayloadState::PartiallyPresent => fo,
                // Space kept by an UNMAPPED or ZERO entry stays with it.
                PayloadState::Unmapped | PayloadState::Zero => fo,
                _ => 0,
            };
            let fo = if keep { fo } else { 0 };
            let same = state == PayloadState::Zero && fo == 0;
            (!same).then(|| BatEntry::new(PayloadState::Zero as u8, fo))
        })
    }

    /// Give each of `blocks` the BAT entry `entry` returns for its state and
    /// file offset (`None`: leave it), in memory: the log takes the pages
    /// at the next flush.
    pub(crate) fn set_block_entries(
        &self,
        blocks: std::ops::Range<u64>,
        entry: impl Fn(PayloadState, u64) -> Option<BatEntry>,
    ) -> Result<()> {
        if blocks.is_empty() {
            return Ok(());
        }
        self.start_session(true)?;
        for b in blocks {
            let idx = self.bat_geo.payload_index(b);
            let (state, fo) = self.block_entry(b)?;
            let Some(new) = entry(state, fo) else {
                continue;
            };
            let mut c = self.bat.write().unwrap_or_else(|e| e.into_inner());
            if c.get(idx).is_none() {
                drop(c);
                self.page_in((idx / ENTRIES_PER_PAGE) as usize)?;
                c = self.bat.write().unwrap_or_else(|e| e.into_inner());
            }
            c.set(idx, new);
        }
        Ok(())
    }
}

impl VirtualDisk for Vhdx {
    fn geometry(&self) -> Geometry {
        self.geometry
    }

    fn storage(&self) -> &dyn Storage {
        &*self.storage
    }

    fn map(&self, offset: u64, len: u64) -> Result<Extent> {
        let block = offset / self.block_size;
        let within = offset % self.block_size;
        let run = len.min(self.block_size - within);
        let (state, fo) = self.block_entry(block)?;
        let has_parent = self.bat_geo.has_parent;
        let idx = self.bat_geo.payload_index(block);
        let bs = self.block_size;
        let (mapping, len) = match state {
            PayloadState::FullyPresent => (
                Mapping::Data(FileOffset(fo + within)),
                self.in_file(idx, fo, bs, within, run)?,
            ),
            PayloadState::Zero => (Mapping::Zero, run),
            // MS-VHDX 2.5.1.1: in a differencing disk a block not present is
            // read from the parent; UNDEFINED may read anything, and the
            // parent's data is the least surprising. UNMAPPED reads zeros.
            PayloadState::NotPresent | PayloadState::Undefined if has_parent => {
                (Mapping::Parent, run)
            }
            PayloadState::Unmapped if has_parent => (Mapping::Zero, run),
            PayloadState::NotPresent | PayloadState::Undefined | PayloadState::Unmapped => {
                (Mapping::Unallocated, run)
            }
            PayloadState::PartiallyPresent => match self.map_partial(block, within, run, fo)? {
                (m @ Mapping::Data(_), len) => (m, self.in_file(idx, fo, bs, within, len)?),
                other => other,
            },
        };
        Ok(Extent {
            offset,
            len,
            mapping,
        })
    }

    fn map_write(&self, offset: u64, len: u64) -> Result<WriteExtent> {
        self.start_session(true)?;
        let block = offset / self.block_size;
        let within = offset % self.block_size;
        let run = len.min(self.block_size - within);
        let (state, fo) = self.block_entry(block)?;
        let (state, fo) = match state {
            PayloadState::FullyPresent | PayloadState::PartiallyPresent => {
                self.whole_in_file(self.bat_geo.payload_index(block), fo, self.block_size)?;
                (state, fo)
            }
            PayloadState::NotPresent | PayloadState::Undefined if self.bat_geo.has_parent => {
                self.allocate_partial(block)?
            }
            _ => (PayloadState::FullyPresent, self.allocate(block)?),
        };
        let mut fill_partial_sectors = false;
        let mut token = 0;
        if state == PayloadState::PartiallyPresent {
            // Without its sector bitmap block the write could not be
            // recorded: refused before anything is written (it used to
            // succeed and be lost once the chunk got a bitmap block).
            self.partial_bitmap(block)?;
            token = block + 1;
            // A sector not yet present holds undefined bytes in the file: if
            // this write covers it only partly, the shared write loop merges
            // it with the parent's bytes first.
            let ss = u64::from(self.geometry.logical_sector_size);
            let end = within + run;
            let head = !within.is_multiple_of(ss);
            let tail = !end.is_multiple_of(ss);
            if head || tail {
                let (m0, _) = self.map_partial(block, within - within % ss, ss, fo)?;
                let (m1, _) = self.map_partial(block, (end - 1) / ss * ss, ss, fo)?;
                fill_partial_sectors =
                    (head && m0 == Mapping::Parent) || (tail && m1 == Mapping::Parent);
            }
        }
        Ok(WriteExtent {
            offset,
            len: run,
            file_offset: FileOffset(fo + within),
            fill_partial_sectors,
            token,
            // Sectors tracked one by one: serialize their copy-up.
            copy_up: (token != 0).then_some(block),
        })
    }

    fn commit_write(&self, ext: &WriteExtent) -> Result<()> {
        if ext.token == 0 {
            return Ok(());
        }
        self.commit_partial(ext)
    }

    fn parent(&self) -> Option<&Arc<dyn VirtualDisk>> {
        self.parent.as_ref()
    }

    fn copy_up_locks(&self) -> Option<&disk::CopyUpLocks> {
        Some(&self.copy_up)
    }

    fn flush(&self) -> Result<()> {
        self.flush_inner()
    }

    fn close(&self) -> Result<()> {
        self.close_inner()
    }

    fn discard(&self, offset: u64, len: u64) -> Result<()> {
        self.discard_blocks(offset, len)
    }

    fn write_zeroes(&self, offset: u64, len: u64, unmap: bool) -> Result<()> {
        let size = self.geometry.virtual_size;
        let end = offset.saturating_add(len);
        let blocks = disk::whole_blocks(offset, len, self.block_size, size);
        if blocks.is_empty() || end > size {
            return disk::write_zero_bytes(self, offset, len);
        }
        let first = blocks.start * self.block_size;
        let past = (blocks.end * self.block_size).min(size);
        disk::write_zero_bytes(self, offset, first - offset)?;
        self.zero_blocks(blocks, unmap)?;
        disk::write_zero_bytes(self, past, end - past)
    }

    fn discard_granularity(&self) -> u64 {
        self.block_size
    }

    fn disk_id(&self) -> Option<Uuid> {
        Some(self.info.metadata.virtual_disk_id)
    }

    fn is_writable(&self) -> bool {
        self.writable
    }
}

#[cfg(test)]
mod tests {
    use crate::bat::{BatEntry, PayloadState};
    use crate::image::MIB;
    use crate::{CreateOptions, OpenOptions, Vhdx};
    use disk::{Mapping, MemStorage, Storage, VirtualDisk};
    use std::sync::Arc;

    /// Where `d` maps virtual `at`.
    fn file_offset(d: &Vhdx, at: u64) -> u64 {
        match d.map(at, 4096).unwrap().mapping {
            Mapping::Data(fo) => fo.0,
            m => panic!("{m:?}"),
        }
    }

    #[test]
    fn space_kept_at_an_absurd_offset_is_neither_reused_nor_allocated_after() {
        // A fuzz finding (vhdx_open, chain): an UNMAPPED entry keeping
        // space at file offset 0x7461646174800000 made a writable open put
        // every new block past it, extending an 8 MiB file by exabytes (an
        // in-memory file ran out of memory).
        let st = Arc::new(MemStorage::new("k.vhdx"));
        let mut o = CreateOptions::new(16 * MIB);
        o.block_size = 1 << 20;
        let d = Vhdx::create_on(Box::new(st.clone()), &o).unwrap();
        d.write_at(&[1; 4096], 0).unwrap();
        let bat = d.bat_offset;
        d.close().unwrap();
        let len = st.len().unwrap();
        let absurd = BatEntry::new(PayloadState::Unmapped as u8, 0x7461_6461_7480_0000);
        st.write_at(&absurd.0.to_le_bytes(), bat + 3 * 8).unwrap();
        let rw = OpenOptions {
            writable: true,
            ..OpenOptions::default()
        };
        let d = Vhdx::open_storage(Box::new(st.clone()), &rw).unwrap();
        // Another block goes at the end of the file, and block 3 gets new
        // space after it rather than its "kept" space.
        d.write_at(&[2; 4096], 5 * MIB).unwrap();
        d.write_at(&[3; 4096], 3 * MIB).unwrap();
        assert_eq!(file_offset(&d, 5 * MIB), len);
        assert_eq!(file_offset(&d, 3 * MIB), len + MIB);
        d.close().unwrap();
        assert_eq!(st.len().unwrap(), len + 2 * MIB);
        let d = Vhdx::open_storage(Box::new(st.clone()), &OpenOptions::default()).unwrap();
        for (at, b) in [(0, 1u8), (5 * MIB, 2), (3 * MIB, 3)] {
            let mut got = [0u8; 4096];
            d.read_at(&mut got, at).unwrap();
            assert!(got.iter().all(|&x| x == b), "virtual {at:#x}");
        }
    }
}
