//! Compacting an open VHDX ([`Vhdx::compact`]), like Hyper-V's
//! Optimize-VHD: blocks that hold nothing become unallocated, then the
//! blocks at the end of the file move into the holes and the file is cut
//! short.
//!
//! It uses the driver's BAT cache, log and allocation (crate-visible
//! internals of [`Vhdx`]).
//!
//! # What changes, and in which order
//! 0. Nothing is written before the whole BAT (MS-VHDX 2.5) has been read
//!    and checked: every allocated payload block and sector bitmap block
//!    (2.5.1.1, 2.5.1.2) must lie inside the file, clear of the header
//!    section, the log (2.3) and the regions (2.2.3), and overlap no other
//!    block. A hostile BAT gives a `Corrupt` error naming the entry.
//! 1. Free (one logged flush, MS-VHDX 2.3): a FULLY_PRESENT block that
//!    reads all zeros becomes NOT_PRESENT (offset 0). In a differencing
//!    disk, a FULLY_PRESENT block that holds exactly what the parent reads
//!    there becomes NOT_PRESENT (it then reads from the parent), and
//!    otherwise, when it reads all zeros, PAYLOAD_BLOCK_ZERO, which reads as
//!    zeros without the parent (2.5.1.1). A PARTIALLY_PRESENT block whose
//!    present sectors (by its sector bitmap) hold what the parent reads at
//!    those sectors becomes NOT_PRESENT: its other sectors come from the
//!    parent already. ZERO,
//!    UNMAPPED, UNDEFINED (and NOT_PRESENT) entries that still hold a file
//!    offset keep their state with offset 0. Each entry is on disk as old or
//!    new after a crash (the log replays whole entries), and both read the
//!    same, and no data moves.
//! 2. A second logged flush makes NOT_PRESENT the sector bitmap blocks of
//!    chunks left with no PARTIALLY_PRESENT block (nothing reads them).
//!    It comes after step 1 is durable, so no PARTIALLY_PRESENT entry is
//!    ever on disk without its chunk's bitmap.
//! 3. Pack, in rounds: the holes are the whole MiBs between the end of the
//!    fixed structures (header section, log, every region; the highest end,
//!    rounded up to 1 MiB) and the last block that no durable BAT entry
//!    uses. The highest blocks (payload and sector bitmap) are assigned the
//!    lowest hole below them that fits them; their bytes are copied there,
//!    the copies synced, and only then are the entries repointed through
//!    the log (a flush). Until that entry is durable nothing points at the
//!    copies; after, nothing points at the old places, which become holes
//!    for the next round. Each entry is old or new after a crash, both
//!    pointing at the same bytes. Rounds repeat until no block lies above a
//!    hole that fits it.
//! 4. Cut: MS-VHDX 2.3.1.1 (FlushedFileOffset) requires a log in use to
//!    record the target size before the file shrinks, because replay checks
//!    that the file is not shorter than FlushedFileOffset (our open refuses
//!    such a file as truncated). Instead of writing a special entry, the log
//!    session is ended first: every entry is applied and synced already, so
//!    both headers are rewritten with a nil LogGuid (2.2.2, as a clean close
//!    leaves them), and a log that is not in use constrains nothing. Only
//!    then is the file cut to the end of the last block (a multiple of
//!    1 MiB, never below the fixed structures) and synced. A crash before
//!    the headers are durable replays an entry whose FlushedFileOffset is
//!    the old, uncut length; after, nothing is replayed; the bytes cut are
//!    used by no entry, so either length reads the same.
//!
//! The image stays open and usable: the next write starts a new log
//! session, and allocates from the new end of the file. The DataWriteGuid
//! is kept (the disk reads the same), so the children of a compacted
//! parent stay linked to it.

use crate::bat::{BatEntry, PayloadState};
use crate::header::Header;
use crate::image::{lock, BITMAP_CACHE_PAGES, MIB};
use crate::region_table::RegionTable;
use crate::sector_bitmap::BitmapCache;
use crate::{Error, Result, Vhdx};
use disk::{CompactReport, Progress, Step};
use disk::{Mapping, VirtualDisk};
use std::collections::BTreeSet;
use std::sync::atomic::Ordering;

/// One allocated block: a payload block or a sector bitmap block.
#[derive(Clone, Copy, Debug)]
struct Placed {
    /// Index of its BAT entry.
    idx: u64,
    /// File offset (a multiple of 1 MiB).
    offset: u64,
    /// Bytes: the block size, or 1 MiB for a sector bitmap block.
    len: u64,
}

/// A fixed structure of the file: start, end, and what it is (for errors).
type Structure = (u64, u64, String);

/// Reports progress with a fixed total, at most about a thousand times;
/// `copied` counts the bytes of the blocks moved.
struct Meter<'a> {
    f: Progress<'a>,
    done: u64,
    total: u64,
    reported: u64,
    copied: u64,
}

impl Meter<'_> {
    fn report(&mut self) {
        (self.f)(Step {
            done: self.done,
            total: self.total,
            copied: self.copied,
        });
    }

    fn advance(&mut self, n: u64) {
        self.done = self.done.saturating_add(n).min(self.total);
        if self.done - self.reported >= (self.total / 1000).max(1) {
            self.reported = self.done;
            self.report();
        }
    }

    fn finish(&mut self) {
        self.done = self.total;
        self.reported = self.total;
        self.report();
    }
}

impl Vhdx {
    /// Give back unused space, like Hyper-V's Optimize-VHD (see the module
    /// docs of `compact` for the order of the writes and why a crash at any
    /// point leaves the image reading as before): blocks that read as zeros
    /// become unallocated (in a differencing disk: blocks that hold what the
    /// parent reads become unallocated, and other blocks of zeros
    /// PAYLOAD_BLOCK_ZERO), the last blocks move into the holes,
    /// and the file is cut short. Every byte reads the same afterwards; the
    /// image stays open and writable. `progress` is called with a fixed
    /// total (the payload blocks scanned plus the allocated blocks that may
    /// move) and a growing count, ending at the total; its `copied` counts
    /// the bytes of the blocks moved.
    ///
    /// `blocks_freed` counts the payload blocks given up, the file space
    /// released by ZERO, UNMAPPED or UNDEFINED entries that kept some, and
    /// the sector bitmap blocks no longer needed; `blocks_moved` counts
    /// payload and sector bitmap blocks moved (a block may move twice).
    ///
    /// # Errors
    /// Read-only image; a fixed disk (LeaveBlocksAllocated: every block is
    /// allocated by design); a corrupt BAT (an allocated block outside the
    /// file or over another block or structure), checked before anything is
    /// written; I/O errors. After an error the image reads as before.
    pub fn compact(&mut self, progress: Progress<'_>) -> Result<CompactReport> {
        let name = self.name().to_string();
        if !self.writable {
            return Err(
                Error::invalid("cannot compact: the image is open read-only").in_file(&name, 0),
            );
        }
        // LeaveBlocksAllocated is ignored when HasParent is set (2.6.2.1).
        // Optimize-VHD documents the same ("except for fixed virtual hard
        // disks"), and CompactVirtualDisk (virtdisk.h) is for dynamic and
        // differencing disks only. (The WMI CompactVirtualHardDisk method
        // does list "Fixed VHDX" among the types it accepts; a fixed file
        // cannot shrink without ceasing to be fixed, so we refuse.)
        if self.info.metadata.file_parameters.leave_blocks_allocated && !self.bat_geo.has_parent {
            return Err(Error::invalid(
                "cannot compact a fixed VHDX: fixed disks keep every block allocated by design \
                 (convert it to a dynamic disk to shrink it)",
            )
            .in_file(&name, 0));
        }
        // Start from a clean cache: everything written so far is in the file.
        self.flush_inner()?;
        let old_file_size = self.storage.len()?;
        let (structures, fixed_end) = self.structures()?;
        let mut placed = self.allocated_blocks(old_file_size, &structures)?;
        let scan = self.bat_geo.payload_blocks();
        let mut meter = Meter {
            f: progress,
            done: 0,
            total: scan.saturating_add(placed.len() as u64),
            reported: 0,
            copied: 0,
        };
        meter.report();

        let (mut blocks_freed, gone) = self.free_blocks(&mut meter)?;
        placed.retain(|p| !gone.contains(&p.idx));
        self.reset_bitmap_cache();
        blocks_freed += self.free_bitmaps(&mut placed)?;
        let blocks_moved = self.pack(&mut placed, fixed_end, &mut meter)?;

        let end = placed
            .iter()
            .map(|p| p.offset + p.len)
            .fold(fixed_end, u64::max);
        if end < old_file_size {
            if self.session_started.load(Ordering::Acquire) {
                self.end_session()?;
            }
            self.storage.set_len(end)?;
            self.storage.flush()?;
            *lock(&self.alloc_end) = end;
        }
        meter.finish();
        Ok(CompactReport {
            blocks_freed,
            blocks_moved,
            old_file_size,
            new_file_size: self.storage.len()?,
        })
    }

    /// The fixed structures (start, end, what) and the end of the highest
    /// of them rounded up to 1 MiB: where the holes may start.
    pub(super) fn structures(&self) -> Result<(Vec<Structure>, u64)> {
        let name = self.name().to_string();
        let overflow = |structure: &'static str, at: u64, what: &str| {
            Error::corrupt(structure, at, format!("{what} extends past 2^64")).in_file(&name, 0)
        };
        let (log_off, log_len, slot) = {
            let hs = lock(&self.header);
            let h = &hs.current;
            (h.log_offset, u64::from(h.log_length), hs.slot)
        };
        let mut v = vec![(0, MIB, "the header section".to_string())];
        let log_end = log_off
            .checked_add(log_len)
            .ok_or_else(|| overflow("header", Header::OFFSETS[slot], "the log"))?;
        v.push((log_off, log_end, "the log".to_string()));
        for r in &self.info.regions {
            let end = r
                .end()
                .ok_or_else(|| overflow("region table", RegionTable::OFFSETS[0], "a region"))?;
            v.push((r.file_offset, end, format!("region {}", r.guid)));
        }
        let top = v.iter().map(|s| s.1).max().unwrap_or(MIB);
        let fixed_end = top
            .checked_next_multiple_of(MIB)
            .ok_or_else(|| overflow("region table", RegionTable::OFFSETS[0], "a structure"))?;
        Ok((v, fixed_end))
    }

    /// Step 0 (module docs): every allocated block, sorted by file offset,
    /// checked against the file length, the structures and each other.
    fn allocated_blocks(&self, file_len: u64, structures: &[Structure]) -> Result<Vec<Placed>> {
        let name = self.name().to_string();
        let geo = self.bat_geo;
        let entry_at = |idx: u64| self.bat_offset.saturating_add(idx.saturating_mul(8));
        // Blocks that do not overlap fit in the file this many times at most:
        // more means overlaps, and bounds the memory a hostile BAT can take.
        let cap = file_len / MIB;
        let mut v: Vec<Placed> = Vec::new();
        let mut push = |p: Placed, what: String| -> Result<()> {
            if p.offset.checked_add(p.len).is_none_or(|e| e > file_len) {
                return Err(Error::corrupt(
                    "BAT entry",
                    entry_at(p.idx),
                    format!(
                        "{what} at file offset {:#x}+{:#x} extends past the end of the file \
                         ({file_len:#x} bytes)",
                        p.offset, p.len
                    ),
                )
                .in_file(&name, 0));
            }
            if v.len() as u64 >= cap {
                return Err(Error::corrupt(
                    "BAT entry",
                    entry_at(p.idx),
                    format!("{what}: more blocks are allocated than the file can hold"),
                )
                .in_file(&name, 0));
            }
            v.push(p);
            Ok(())
        };
        for b in 0..geo.payload_blocks() {
            let (state, fo) = self.block_entry(b)?;
            if matches!(
                state,
                PayloadState::FullyPresent | PayloadState::PartiallyPresent
            ) {
                let p = Placed {
                    idx: geo.payload_index(b),
                    offset: fo,
                    len: self.block_size,
                };
                push(p, format!("block {b}"))?;
            }
        }
        // Sector bitmap entries matter (and are read) in differencing disks
        // only (MS-VHDX 2.5.1.2).
        if geo.has_parent {
            let ratio = geo.chunk_ratio();
            for chunk in 0..geo.bitmap_blocks() {
                if let Some(fo) = self.bitmap_block(chunk * ratio)? {
                    let p = Placed {
                        idx: geo.bitmap_index(chunk),
                        offset: fo,
                        len: MIB,
                    };
                    push(p, format!("the sector bitmap block of chunk {chunk}"))?;
                }
            }
        }
        v.sort_by_key(|p| p.offset);
        let describe = |p: &Placed| {
            if geo.is_bitmap_index(p.idx) {
                format!("the sector bitmap block at {:#x}", p.offset)
            } else {
                format!(
                    "block {} at {:#x}",
                    p.idx - p.idx / (geo.chunk_ratio() + 1),
                    p.offset
                )
            }
        };
        for w in v.windows(2) {
            if w[0].offset + w[0].len > w[1].offset {
                return Err(Error::corrupt(
                    "BAT entry",
                    entry_at(w[1].idx),
                    format!("{} overlaps {}", describe(&w[1]), describe(&w[0])),
                )
                .in_file(&name, 0));
            }
        }
        for p in &v {
            if let Some(s) = structures
                .iter()
                .find(|s| p.offset < s.1 && s.0 < p.offset + p.len)
            {
                return Err(Error::corrupt(
                    "BAT entry",
                    entry_at(p.idx),
                    format!("{} overlaps {}", describe(p), s.2),
                )
                .in_file(&name, 0));
            }
        }
        Ok(v)
    }

    /// Step 1 (module docs). Returns the number of entries whose file space
    /// was given back, and the BAT indices of the allocated blocks freed.
    fn free_blocks(&mut self, meter: &mut Meter<'_>) -> Result<(u64, BTreeSet<u64>)> {
        let geo = self.bat_geo;
        let ss = u64::from(self.geometry.logical_sector_size);
        let parent = self.parent.clone();
        let mut freed = 0u64;
        let mut gone = BTreeSet::new();
        for b in 0..geo.payload_blocks() {
            meter.advance(1);
            let (state, fo) = self.block_entry(b)?;
            let virt = b * self.block_size;
            let len = self.block_sectors(b) * ss;
            let new = match state {
                PayloadState::FullyPresent => {
                    if let (true, Some(p)) = (geo.has_parent, parent.as_deref()) {
                        if disk::compact::reads_as(&*self.storage, fo, Some(p), virt, len)? {
                            Some(PayloadState::NotPresent)
                        } else if self.nonzero(fo, len)? {
                            None
                        } else {
                            Some(PayloadState::Zero)
                        }
                    } else if self.nonzero(fo, len)? {
                        None
                    } else if geo.has_parent {
                        Some(PayloadState::Zero)
                    } else {
                        Some(PayloadState::NotPresent)
                    }
                }
                PayloadState::PartiallyPresent => match parent.as_deref() {
                    Some(p) if self.partial_is_free(b, fo, p)? => Some(PayloadState::NotPresent),
                    _ => None,
                },
                // Space kept for a trimmed block: give it back.
                _ if fo != 0 => Some(state),
                _ => None,
            };
            let Some(new) = new else { continue };
            let idx = geo.payload_index(b);
            self.start_session(false)?;
            self.set_entry(idx, BatEntry::new(new as u8, 0))?;
            match state {
                PayloadState::FullyPresent | PayloadState::PartiallyPresent => {
                    gone.insert(idx);
                    freed += 1;
                }
                // NOT_PRESENT never reserves space; the others may (check).
                PayloadState::NotPresent => {}
                _ => freed += 1,
            }
        }
        self.flush_inner()?;
        Ok((freed, gone))
    }

    /// Whether every present sector of PARTIALLY_PRESENT `block` (at `fo`)
    /// holds what `parent` reads there.
    fn partial_is_free(&self, block: u64, fo: u64, parent: &dyn VirtualDisk) -> Result<bool> {
        let ss = u64::from(self.geometry.logical_sector_size);
        let n = self.block_sectors(block);
        let virt = block * self.block_size;
        let mut s = 0;
        while s < n {
            let (m, len) = self.map_partial(block, s * ss, (n - s) * ss, fo)?;
            if len < ss {
                return Err(Error::corrupt(
                    "sector bitmap",
                    fo,
                    format!("empty sector run in block {block}"),
                )
                .in_file(self.name(), 0));
            }
            if let Mapping::Data(_) = m {
                if !disk::compact::reads_as(
                    &*self.storage,
                    fo + s * ss,
                    Some(parent),
                    virt + s * ss,
                    len,
                )? {
                    return Ok(false);
                }
            }
            s += len / ss;
        }
        Ok(true)
    }

    /// Step 2 (module docs): the sector bitmap blocks of chunks without a
    /// PARTIALLY_PRESENT block become NOT_PRESENT. Returns how many.
    fn free_bitmaps(&mut self, placed: &mut Vec<Placed>) -> Result<u64> {
        let geo = self.bat_geo;
        if !geo.has_parent {
            return Ok(0);
        }
        let ratio = geo.chunk_ratio();
        let mut unused = BTreeSet::new();
        for p in placed.iter().filter(|p| geo.is_bitmap_index(p.idx)) {
            let chunk = p.idx / (ratio + 1);
            let first = chunk * ratio;
            let last = first.saturating_add(ratio).min(geo.payload_blocks());
            let mut partial = false;
            for b in first..last {
                if self.block_entry(b)?.0 == PayloadState::PartiallyPresent {
                    partial = true;
                    break;
                }
            }
            if !partial {
                unused.insert(p.idx);
            }
        }
        if unused.is_empty() {
            return Ok(0);
        }
        self.start_session(false)?;
        for &idx in &unused {
            self.set_entry(idx, BatEntry(0))?;
        }
        self.flush_inner()?;
        self.reset_bitmap_cache();
        placed.retain(|p| !unused.contains(&p.idx));
        Ok(unused.len() as u64)
    }

    /// Step 3 (module docs). Returns the number of blocks moved.
    fn pack(
        &mut self,
        placed: &mut [Placed],
        fixed_end: u64,
        meter: &mut Meter<'_>,
    ) -> Result<u64> {
        let mut moved = 0u64;
        loop {
            placed.sort_by_key(|p| p.offset);
            let plan = plan_moves(placed, fixed_end);
            if plan.is_empty() {
                return Ok(moved);
            }
            for &(i, to) in &plan {
                let p = placed[i];
                disk::copy_range(&*self.storage, p.offset, to, p.len)?;
            }
            self.start_session(false)?;
            for &(i, to) in &plan {
                let p = &mut placed[i];
                let state = self.bat_entry(p.idx)?.state();
                self.set_entry(p.idx, BatEntry::new(state, to))?;
                p.offset = to;
            }
            // Syncs the copies, then logs and applies the entries.
            self.flush_inner()?;
            self.reset_bitmap_cache();
            moved += plan.len() as u64;
            meter.copied += plan.iter().map(|&(i, _)| placed[i].len).sum::<u64>();
            meter.advance(plan.len() as u64);
        }
    }

    /// Drop the cached sector bitmap pages (all clean after a flush): they
    /// are keyed by file offset, and bitmap blocks moved or were freed.
    fn reset_bitmap_cache(&mut self) {
        *self.bitmaps.get_mut().unwrap_or_else(|e| e.into_inner()) =
            BitmapCache::new(BITMAP_CACHE_PAGES);
    }
}

/// One round of moves for `placed` (sorted by offset): `(index in placed,
/// new offset)`. The holes are the gaps above `fixed_end` between the
/// blocks; the highest blocks take the lowest hole below them that fits.
fn plan_moves(placed: &[Placed], fixed_end: u64) -> Vec<(usize, u64)> {
    let mut holes: Vec<(u64, u64)> = Vec::new();
    let mut cur = fixed_end;
    for p in placed.iter().filter(|p| p.offset >= fixed_end) {
        if p.offset > cur {
            holes.push((cur, p.offset));
        }
        cur = cur.max(p.offset + p.len);
    }
    // Per block length, the first hole that may still fit it: holes only
    // shrink, so one too small stays too small.
    let mut cursors: Vec<(u64, usize)> = Vec::new();
    let mut plan = Vec::new();
    for (i, p) in placed.iter().enumerate().rev() {
        if p.offset < fixed_end || holes.is_empty() {
            break;
        }
        let c = match cursors.iter().position(|c| c.0 == p.len) {
            Some(c) => c,
            None => {
                cursors.push((p.len, 0));
                cursors.len() - 1
            }
        };
        let mut h = cursors[c].1;
        while h < holes.len() && holes[h].1 - holes[h].0 < p.len {
            h += 1;
        }
        cursors[c].1 = h;
        if h < holes.len() && holes[h].0 < p.offset {
            plan.push((i, holes[h].0));
            holes[h].0 += p.len;
        }
    }
    plan
}
