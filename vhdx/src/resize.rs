//! Changing the virtual size of an open VHDX ([`Vhdx::resize`]).
//!
//! It uses the driver's BAT cache, allocation and log (crate-visible
//! internals of [`Vhdx`]).
//!
//! # What changes, and in which order
//! The virtual size is the Virtual Disk Size metadata item (MS-VHDX
//! 2.6.2.2). The BAT holds `payload_blocks` payload entries with a sector
//! bitmap entry after every `chunk_ratio` of them (MS-VHDX 2.5); the chunk
//! ratio does not depend on the size, so the entries of existing blocks keep
//! their indices and only the number of entries changes.
//!
//! Growing:
//! 1. When the BAT region (MS-VHDX 2.2.3) is too small for the new entry
//!    count, the range it must grow into, `R`, is freed: payload blocks in
//!    `R` are copied to the end of the file, the copies synced, and their BAT
//!    entries repointed through the log (a crash leaves each entry old or
//!    new, both pointing at the same durable data); `R` is then zeroed and
//!    synced (no BAT entry points into it any more, and the zeros are
//!    NOT_PRESENT entries). Only then are the two region table copies
//!    rewritten with the longer BAT region, the copy at 192 KiB first, each
//!    synced. The region table is not covered by the log, but a crash at any
//!    point leaves a valid file: a torn copy fails its checksum and the other
//!    one is used, and both the old length (which fits the old size) and the
//!    new length (a region of zeros past the old entries, with nothing else
//!    in it) describe a consistent file at the old size.
//!
//!    When R holds something that cannot move (another region, the log, a
//!    sector bitmap block), the BAT moves instead: everything is flushed
//!    and the log session ended (headers with a nil LogGuid, so that no
//!    log entry aimed at the old BAT is replayed once that space is
//!    reused), the BAT is copied to a new region at the end of the file
//!    (zeros past the old entries) and synced, then the region table
//!    copies are rewritten as above to point at it, and a new session
//!    starts. A crash leaves the old table (the old BAT, untouched) or the
//!    new one (the complete copy). The old BAT's space stays unused until
//!    `vdisk compact` packs blocks into it.
//! 2. The tail of the old last block past the old size is zeroed when the
//!    size was not a multiple of the block size (so that bytes cut by an
//!    earlier shrink never reappear).
//! 3. The new entries are made NOT_PRESENT where they are not already zero
//!    (a fixed disk gets FULLY_PRESENT blocks, allocated at the end of the
//!    file), and the changed BAT pages are logged with, last, the metadata
//!    page holding the new size: one flush (MS-VHDX 2.3). BAT entries past
//!    the old size are ignored at the old size, so a crash leaves the old or
//!    the new size, each with its data.
//!
//! Shrinking: blocks wholly past the new end must not hold data (allocated
//! blocks of a dynamic disk; non-zero bytes of a fixed disk, whose blocks
//! are all allocated by design), unless `force`; their entries become
//! NOT_PRESENT in the same logged flush as the new size, before it. That
//! flush applies the entries in place and syncs them. Then the file gives
//! back its tail that nothing uses any more, as `compact` cuts the file
//! (step 4 of its module docs): the end is that of the last block still
//! in use (present, or space a ZERO or UNMAPPED entry keeps for its block;
//! a present sector bitmap block) or of the fixed structures (header
//! section, log, regions; rounded up to 1 MiB), whichever is higher. When
//! the file is longer, the log session
//! is ended first (every entry is applied and synced already; both headers
//! get a nil LogGuid, MS-VHDX 2.2.2), because a log in use records the file
//! length (FlushedFileOffset, 2.3.1.1) and a file shorter than that is
//! truncated for a replay; only then is the file cut and synced. A crash
//! before the headers are durable replays the shrink's entry over the
//! uncut file; after, nothing is replayed; the bytes cut are used by no
//! entry either way. Freed blocks below the end stay as unused space (not
//! a leak: `vdisk compact` packs blocks into it). A fixed disk's blocks lie
//! in order, so its file shrinks by the blocks cut.

use crate::bat::{BatEntry, BatGeometry, PayloadState, SB_BLOCK_PRESENT};
use crate::bat_cache::{BatCache, ENTRIES_PER_PAGE, PAGE_BYTES};
use crate::image::{lock, MIB};
use crate::region_table::{RegionEntry, RegionTable, BAT_REGION};
use crate::{Error, Result, Vhdx, DEFAULT_BAT_CACHE_PAGES};
use std::sync::atomic::Ordering;

impl Vhdx {
    /// Change the virtual size to `new_size` bytes, through the log (see the
    /// module docs of `resize` for the order of the writes). The image stays
    /// open at the new size. `new_size` must be a non-zero multiple of the
    /// logical sector size, at most 64 TiB; returns the size now recorded
    /// (as `Vhd::resize`, whose sizes are rounded). Shrinking refuses when a block
    /// wholly past the new end holds data (a dynamic disk: the block is
    /// allocated; a fixed disk: its bytes are not all zero), unless `force`,
    /// which discards those blocks. A fixed disk (LeaveBlocksAllocated)
    /// grows with FULLY_PRESENT blocks, so its file grows.
    ///
    /// # Errors
    /// Read-only image, differencing disk (its size must match its
    /// parent's), invalid size, data in the cut part without `force`, I/O
    /// errors. After an error the size on disk is the
    /// old one or the new one; close the image.
    pub fn resize(&mut self, new_size: u64, force: bool) -> Result<u64> {
        self.resize_to(new_size, force)?;
        Ok(self.geometry.virtual_size)
    }

    fn resize_to(&mut self, new_size: u64, force: bool) -> Result<()> {
        let name = self.name().to_string();
        if !self.writable {
            return Err(Error::invalid("image is open read-only").in_file(&name, 0));
        }
        if self.bat_geo.has_parent {
            return Err(Error::invalid(
                "cannot resize a differencing disk: its size must match its parent's (resize \
                 the base disk, then recreate or merge the children)",
            )
            .in_file(&name, 0));
        }
        let old_size = self.geometry.virtual_size;
        let new_geo = BatGeometry::new(
            new_size,
            self.bat_geo.block_size,
            self.bat_geo.logical_sector_size,
            false,
        )
        .map_err(|_| {
            Error::invalid(format!(
                "new size {new_size} must be a positive multiple of the logical sector size ({}) \
                 and at most 64 TiB",
                self.geometry.logical_sector_size
            ))
            .in_file(&name, 0)
        })?;
        if new_size == old_size {
            return Ok(());
        }
        // Start from a clean cache: everything written so far is in the file.
        self.flush_inner()?;
        self.start_session(true)?;
        if new_size < old_size {
            self.shrink(new_geo, force)?;
        } else {
            self.grow(new_geo)?;
        }
        self.geometry.virtual_size = new_size;
        self.info.metadata.virtual_disk_size = new_size;
        Ok(())
    }

    fn fixed(&self) -> bool {
        self.info.metadata.file_parameters.leave_blocks_allocated
    }

    /// Whether payload block `block` holds data in `[from, block end)`.
    fn block_holds_data(&self, block: u64, from: u64) -> Result<bool> {
        let (state, fo) = self.block_entry(block)?;
        match state {
            PayloadState::FullyPresent | PayloadState::PartiallyPresent if !self.fixed() => {
                Ok(from == 0 || self.nonzero(fo + from, self.block_size - from)?)
            }
            PayloadState::FullyPresent | PayloadState::PartiallyPresent => {
                self.nonzero(fo + from, self.block_size - from)
            }
            _ => Ok(false),
        }
    }

    /// Whether the file holds a non-zero byte in `[off, off + len)` (bytes
    /// past the end of the file read as zeros).
    pub(super) fn nonzero(&self, off: u64, len: u64) -> Result<bool> {
        let flen = self.storage.len()?;
        let end = off.saturating_add(len).min(flen);
        Ok(end > off && !disk::range_is(&*self.storage, off, end - off, 0)?)
    }

    /// Set BAT entry `idx` in the cache (paging it in), dirty.
    pub(super) fn set_entry(&self, idx: u64, e: BatEntry) -> Result<()> {
        self.bat_entry(idx)?;
        let mut c = self.bat.write().unwrap_or_else(|e| e.into_inner());
        while c.get(idx).is_none() {
            drop(c);
            self.page_in((idx / ENTRIES_PER_PAGE) as usize)?;
            c = self.bat.write().unwrap_or_else(|e| e.into_inner());
        }
        c.set(idx, e);
        Ok(())
    }

    /// The metadata pages that record `size` as the Virtual Disk Size.
    fn size_pages(&self, size: u64) -> Result<Vec<(u64, Box<[u8; PAGE_BYTES]>)>> {
        self.edit_metadata(|table, region| {
            let e = table
                .find(crate::metadata::VIRTUAL_DISK_SIZE)
                .copied()
                .ok_or_else(|| Error::corrupt("metadata", 0, "no virtual disk size item"))?;
            let at = e.offset as usize;
            let item = region
                .get_mut(at..at + 8)
                .filter(|_| e.length >= 8)
                .ok_or_else(|| {
                    Error::corrupt("metadata", at as u64, "virtual disk size item too short")
                })?;
            item.copy_from_slice(&size.to_le_bytes());
            Ok(())
        })
    }

    fn shrink(&mut self, new_geo: BatGeometry, force: bool) -> Result<()> {
        let name = self.name().to_string();
        let first_cut = new_geo.payload_blocks();
        let old_blocks = self.bat_geo.payload_blocks();
        let mut cut = Vec::new();
        for b in first_cut..old_blocks {
            let (state, _) = self.block_entry(b)?;
            if state == PayloadState::NotPresent {
                continue;
            }
            if !force && self.block_holds_data(b, 0)? {
                return Err(Error::invalid(format!(
                    "block {b} (virtual offset {}) lies past the new end ({} bytes) and holds \
                     data: shrinking would lose it (use --force to discard it)",
                    b * self.block_size,
                    new_geo.virtual_size
                ))
                .in_file(&name, 0));
            }
            cut.push(b);
        }
        for b in cut {
            self.set_entry(self.bat_geo.payload_index(b), BatEntry(0))?;
        }
        // BAT pages first, the size last (`flush_with` puts extra pages last).
        let pages = self.size_pages(new_geo.virtual_size)?;
        self.flush_with(pages)?;
        self.bat_geo = new_geo;
        let pages_cap = self.bat_cap();
        *self.bat.get_mut().unwrap_or_else(|e| e.into_inner()) =
            BatCache::new(new_geo.total_entries(), pages_cap);
        self.cut_tail()
    }

    /// After a shrink: cut the file after the last block or structure
    /// still in use (module docs).
    fn cut_tail(&mut self) -> Result<()> {
        let old_len = self.storage.len()?;
        let (_, mut end) = self.structures()?;
        for b in 0..self.bat_geo.payload_blocks() {
            let (state, fo) = self.block_entry(b)?;
            let used = match state {
                PayloadState::FullyPresent | PayloadState::PartiallyPresent => true,
                // Space kept for the block, which a write reuses.
                PayloadState::Unmapped | PayloadState::Zero => fo >= MIB,
                _ => false,
            };
            if used {
                end = end.max(fo.saturating_add(self.block_size));
            }
        }
        // Sector bitmap blocks matter only in differencing disks (which are
        // not resized), but the check counts any present one as used.
        for chunk in 0..self.bat_geo.bitmap_blocks() {
            let idx = self.bat_geo.bitmap_index(chunk);
            if idx >= self.bat_geo.total_entries() {
                break;
            }
            let e = self.bat_entry(idx)?;
            if e.state() == SB_BLOCK_PRESENT && e.file_offset() != 0 {
                end = end.max(e.file_offset().saturating_add(MIB));
            }
        }
        if end < old_len {
            if self.session_started.load(Ordering::Acquire) {
                self.end_session()?;
            }
            self.storage.set_len(end)?;
            self.storage.flush()?;
            *lock(&self.alloc_end) = end;
        }
        Ok(())
    }

    fn bat_cap(&self) -> usize {
        DEFAULT_BAT_CACHE_PAGES
    }

    fn grow(&mut self, new_geo: BatGeometry) -> Result<()> {
        let name = self.name().to_string();
        let old_geo = self.bat_geo;
        let bat_region = *self
            .info
            .regions
            .iter()
            .find(|r| r.guid == BAT_REGION)
            .ok_or_else(|| Error::corrupt("region table", 0, "no BAT region").in_file(&name, 0))?;
        if new_geo.bat_bytes() > u64::from(bat_region.length) {
            self.grow_bat_region(bat_region, new_geo.bat_bytes())?;
        }
        // 2. Zero the tail of the old last block past the old size.
        let old_size = old_geo.virtual_size;
        if !old_size.is_multiple_of(self.block_size) {
            let last = old_size / self.block_size;
            let (state, fo) = self.block_entry(last)?;
            if state == PayloadState::FullyPresent {
                let from = old_size % self.block_size;
                disk::fill_range(&*self.storage, fo + from, self.block_size - from, 0)?;
            }
        }
        // 3. The new geometry, new entries NOT_PRESENT (or allocated).
        self.bat_geo = new_geo;
        *self.bat.get_mut().unwrap_or_else(|e| e.into_inner()) =
            BatCache::new(new_geo.total_entries(), self.bat_cap());
        let old_total = old_geo.total_entries();
        for idx in old_total..new_geo.total_entries() {
            if self.bat_entry(idx)?.0 != 0 {
                self.set_entry(idx, BatEntry(0))?;
            }
        }
        if self.fixed() {
            for b in old_geo.payload_blocks()..new_geo.payload_blocks() {
                self.allocate(b)?;
            }
        }
        let pages = self.size_pages(new_geo.virtual_size);
        let result = pages.and_then(|p| self.flush_with(p));
        if result.is_err() {
            // The size on disk is still the old one (or the log entry made
            // it the new one, which a reopen shows): keep the old view.
            self.bat_geo = old_geo;
            *self.bat.get_mut().unwrap_or_else(|e| e.into_inner()) =
                BatCache::new(old_geo.total_entries(), self.bat_cap());
        }
        result
    }

    /// Step 1 of growing (module docs): make the BAT region at least
    /// `needed` bytes, relocating the payload blocks in its way.
    fn grow_bat_region(&mut self, bat_region: RegionEntry, needed: u64) -> Result<()> {
        let name = self.name().to_string();
        let new_len = needed.div_ceil(MIB) * MIB;
        let new_len32 = u32::try_from(new_len)
            .map_err(|_| Error::invalid("BAT too large for the region table").in_file(&name, 0))?;
        let r_start = bat_region.end().ok_or_else(|| {
            Error::corrupt("region table", 0, "BAT region overflows").in_file(&name, 0)
        })?;
        let r_end = bat_region
            .file_offset
            .checked_add(new_len)
            .ok_or_else(|| Error::invalid("BAT region would overflow").in_file(&name, 0))?;
        let r_len = r_end - r_start;
        // Other regions, the log and sector bitmap blocks do not move: when
        // one is in R, the BAT moves instead.
        let table = RegionTable {
            entries: self.info.regions.clone(),
        };
        let region_in_r = table
            .overlapping(r_start, r_len)
            .is_some_and(|e| e.guid != BAT_REGION);
        let (log_off, log_len) = {
            let hs = lock(&self.header);
            (hs.current.log_offset, u64::from(hs.current.log_length))
        };
        let log_in_r = log_off < r_end && r_start < log_off.saturating_add(log_len);
        let mut bitmap_in_r = false;
        for chunk in 0..self.bat_geo.bitmap_blocks() {
            let idx = self.bat_geo.bitmap_index(chunk);
            if idx >= self.bat_geo.total_entries() {
                break;
            }
            let fo = self.bat_entry(idx)?.file_offset();
            bitmap_in_r |= fo != 0 && fo < r_end && fo.saturating_add(MIB) > r_start;
        }
        if region_in_r || log_in_r || bitmap_in_r {
            return self.move_bat_region(bat_region, new_len32);
        }
        // New allocations (the copies) go past R.
        {
            let mut end = lock(&self.alloc_end);
            if *end < r_end {
                *end = r_end;
                if self.storage.len()? < r_end {
                    self.storage.set_len(r_end)?;
                }
            }
        }
        // Relocate the payload blocks in R.
        let mut moved = false;
        for b in 0..self.bat_geo.payload_blocks() {
            let idx = self.bat_geo.payload_index(b);
            let e = self.bat_entry(idx)?;
            let state = e
                .payload_state()
                .map_err(|err| err.in_file(&name, self.bat_offset + idx * 8))?;
            let fo = e.file_offset();
            if fo == 0 || fo >= r_end || fo.saturating_add(self.block_size) <= r_start {
                continue;
            }
            match state {
                PayloadState::FullyPresent | PayloadState::PartiallyPresent => {
                    let to = {
                        let mut end = lock(&self.alloc_end);
                        let to = *end;
                        let new_end = to.checked_add(self.block_size).ok_or_else(|| {
                            Error::invalid("file would exceed the maximum size").in_file(&name, 0)
                        })?;
                        self.storage.set_len(new_end)?;
                        *end = new_end;
                        to
                    };
                    disk::copy_range(&*self.storage, fo, to, self.block_size)?;
                    self.set_entry(idx, BatEntry::new(state as u8, to))?;
                }
                // Space kept for a trimmed block: forget it.
                _ => self.set_entry(idx, BatEntry::new(state as u8, 0))?,
            }
            moved = true;
        }
        if moved {
            // Copies synced, then the entries through the log.
            self.flush_inner()?;
        }
        // R is unused now: zero it (NOT_PRESENT entries), sync.
        disk::fill_range(&*self.storage, r_start, r_len, 0)?;
        self.storage.flush()?;
        self.set_bat_region(bat_region.file_offset, new_len32)
    }

    /// Step 1 when the BAT region cannot grow in place (module docs): the
    /// BAT moves to a new region of `new_len` bytes at the end of the file.
    fn move_bat_region(&mut self, bat_region: RegionEntry, new_len: u32) -> Result<()> {
        let name = self.name().to_string();
        // Every change is in place (resize flushed first). The log session
        // ends, so that no log entry aimed at the old BAT can be replayed
        // after a crash, once that space holds something else.
        self.flush_inner()?;
        self.end_session()?;
        let new_off = {
            let mut end = lock(&self.alloc_end);
            let off = end.div_ceil(MIB) * MIB;
            let new_end = off.checked_add(u64::from(new_len)).ok_or_else(|| {
                Error::invalid("file would exceed the maximum size").in_file(&name, 0)
            })?;
            if self.storage.len()? < new_end {
                // Zeros: NOT_PRESENT entries past the copied ones.
                self.storage.set_len(new_end)?;
            }
            *end = new_end;
            off
        };
        disk::copy_range(
            &*self.storage,
            bat_region.file_offset,
            new_off,
            u64::from(bat_region.length),
        )?;
        self.storage.flush()?;
        self.set_bat_region(new_off, new_len)?;
        self.bat_offset = new_off;
        // A new session (new FileWriteGuid and LogGuid) for the rest.
        self.start_session(true)
    }

    /// Point the BAT region entry at `offset`, `len` bytes: the region
    /// table, copy by copy, each synced (see the module docs).
    fn set_bat_region(&mut self, offset: u64, len: u32) -> Result<()> {
        let mut entries = self.info.regions.clone();
        for e in entries.iter_mut().filter(|e| e.guid == BAT_REGION) {
            e.file_offset = offset;
            e.length = len;
        }
        let bytes = RegionTable {
            entries: entries.clone(),
        }
        .to_bytes();
        for off in RegionTable::OFFSETS {
            self.storage.write_at(&bytes, off)?;
            self.storage.flush()?;
        }
        self.info.regions = entries;
        Ok(())
    }
}
