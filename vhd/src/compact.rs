//! Compacting a dynamic or differencing VHD ([`Vhd::compact`]), like
//! Hyper-V's `Optimize-VHD`: blocks whose contents add nothing become
//! unallocated, then the blocks at the end of the file move into the holes
//! and the file is cut short.
//!
//! It works on the open image's own BAT and allocation state (`block_map`).
//!
//! # What is freed
//! A block ("Block Allocation Table and Data Blocks" in the Virtual Hard
//! Disk Image Format Specification, 2006: a sector bitmap, then the data) is
//! freed when it reads exactly as it would unallocated: every sector its
//! bitmap marks present (inside the virtual size) holds what an unallocated
//! block reads there, zeros in a dynamic disk and the parent's bytes in a
//! differencing disk ("Differencing Hard Disk Image"), where a block of
//! zeros over a parent that is not zero there is kept: the BAT has no
//! "zero" state. Sectors not marked present already read as unallocated, so
//! a block with no present sector is always freed.
//!
//! # Where blocks go
//! As the allocator places them: at a sector boundary, sector bitmap and
//! data together, never below the end of the BAT's last sector. A hole is a
//! run of the file between there and the trailing footer that no block,
//! dynamic disk header, BAT or parent locator data uses, big enough for a
//! whole block. The block at the highest offset moves into the lowest hole
//! below it, then the next highest, until no hole below the highest
//! remaining block can take it; the file then ends after the last used
//! byte. The header and the BAT are not changed.
//!
//! # Crash safety
//! The trailing footer ("Hard Disk Footer Format": the last 512 bytes of the
//! file) is what a reader uses, and every BAT entry on disk always points
//! at a durable copy of its block's bitmap and data. The writes, in order:
//!
//! 0. the open image's flush: in-memory BAT entries and bitmaps reach the
//!    file (see the write protocol in `image`), which is the truth from
//!    then on;
//! 1. free: the freed blocks' BAT entries become `0xFFFFFFFF` (their BAT
//!    sectors written), **sync**. A power cut leaves each entry old or new
//!    (an entry is 4 bytes of one sector), and both read the same. Only
//!    after this sync is the freed space referenced by nothing on disk, so
//!    only then may step 2 write there;
//! 2. move, one block at a time: its bitmap and data are copied into the
//!    hole, **sync**, then its BAT entry points at the hole, **sync**. Until
//!    the entry persists, the old copy is the one read and the hole was
//!    unreferenced; after, the new copy, identical and already durable. The
//!    old copy's space is never written again by the compaction (holes lie
//!    below it), so a torn copy never matters;
//! 3. the file end: the footer (the same bytes as the trailing one) at the
//!    new end, **sync**, the file truncated just after it, **sync**. The new
//!    footer lies at least 512 bytes before the old one (else the file is
//!    not cut), so until the truncation persists the last 512 bytes are
//!    still the old trailing footer, which a reader uses: identical to the
//!    new one, it describes the same disk, and the space between the new
//!    end and it is a leak (given back by compacting again, or by
//!    `vdisk check -r leaks`). After, the new footer is the last 512 bytes.
//!    The footer's contents, and so the copy at offset 0, never change.
//!
//! A crash at any point therefore leaves an image that reads exactly as
//! before, opens read-write from its trailing footer, and compacts again.

use crate::bat::{self, SECTOR, UNALLOCATED};
use crate::block_map::{Dyn, DynState};
use crate::dynamic_header::{DynamicHeader, HEADER_SIZE};
use crate::footer::{Footer, FOOTER_SIZE};
use crate::image::{lock, read_vec, FooterSource, Vhd, MIB};
use crate::{sector_bitmap, Error, Result};
use disk::check::{sweep, Used};
use disk::{CompactReport, Progress, Step};
use disk::{Storage, VirtualDisk};
use std::collections::BTreeSet;
use std::sync::atomic::Ordering;

/// Bytes read or copied at a time.
const CHUNK: u64 = MIB;
/// `Used::what` of a structure (blocks use their index): this bit plus 0 =
/// the dynamic disk header, 1 = the BAT, 2 + i = parent locator i's data.
const STRUCTURE: u64 = 1 << 63;

impl Vhd {
    /// Compact this dynamic or differencing VHD, opened writable: free the
    /// blocks that read as if unallocated (zeros; in a differencing disk,
    /// the parent's bytes), move the last blocks into the holes, and cut the
    /// file short. Every byte reads as before; the image stays open and
    /// usable (new blocks go at the new end of the file). See the module
    /// docs of `compact` for the rules and the crash-safe order of the
    /// writes.
    ///
    /// `progress` is called with a fixed `total` (twice the allocated
    /// blocks, plus one), `done` only growing to `total`, and `copied`
    /// counting the bytes of the blocks moved (sector bitmap and data).
    ///
    /// # Errors
    /// [`ErrorKind::InvalidInput`](crate::ErrorKind) when the image is open
    /// read-only (or closed), or is a fixed disk (it has no blocks to give
    /// back: convert it to a dynamic disk); a differencing disk whose parent
    /// is not open; [`ErrorKind::Corrupt`](crate::ErrorKind) when a BAT
    /// entry points outside the data area or at a block that overlaps
    /// another structure; I/O errors (the image then still reads as
    /// before).
    pub fn compact(&mut self, progress: Progress<'_>) -> Result<CompactReport> {
        let name = self.name().to_string();
        if !self.writable {
            let why = self
                .read_only_reason
                .as_deref()
                .map_or(String::new(), |r| format!(" ({r})"));
            return Err(Error::invalid(format!(
                "cannot compact: the image is open read-only{why}"
            ))
            .in_file(&name, 0));
        }
        if self.closed.load(Ordering::Acquire) {
            return Err(Error::invalid("cannot compact: the image is closed").in_file(&name, 0));
        }
        let (Some(d), Some(header)) = (&self.dynamic, &self.info.header) else {
            return Err(Error::invalid(
                "cannot compact a fixed VHD: it stores every sector of the disk, so it has no \
                 blocks to give back (convert it to a dynamic VHD instead)",
            )
            .in_file(&name, 0));
        };
        let parent = match (&self.parent, self.differencing) {
            (Some(p), true) => Some(p.as_ref()),
            (None, true) => {
                return Err(Error::invalid(
                    "cannot compact a differencing disk whose parent is not open",
                )
                .in_file(&name, 0))
            }
            (_, false) => None,
        };
        self.flush_inner()?;
        let c = Compactor {
            v: self,
            d,
            header,
            name: &name,
            parent,
            slot: d.bitmap_size + d.block_size,
        };
        let out = c.run(progress)?;
        self.info.allocated_blocks = out.allocated;
        self.info.file_size = out.report.new_file_size;
        if let Some(at) = out.footer_at {
            self.info.footer_offset = at;
            self.info.footer_source = FooterSource::End;
        }
        Ok(out.report)
    }
}

struct Compactor<'a> {
    v: &'a Vhd,
    d: &'a Dyn,
    header: &'a DynamicHeader,
    name: &'a str,
    /// A differencing disk's parent (what an unallocated block reads).
    parent: Option<&'a dyn VirtualDisk>,
    /// Bytes of a block in the file: sector bitmap and data.
    slot: u64,
}

struct Outcome {
    report: CompactReport,
    /// Where the trailing footer now is, when the file was cut.
    footer_at: Option<u64>,
    /// Blocks still allocated.
    allocated: u64,
}

/// The file's structures, as [`Compactor::layout`] finds them.
struct Layout {
    /// Header, BAT and parent locator data (clipped to the data area).
    structures: Vec<Used>,
    /// Where the last of them ends.
    end: u64,
    /// No block goes below this: the end of the BAT's last sector.
    floor: u64,
}

/// `(block, from, to)`: a block's bitmap and data move from one file
/// offset to another.
type Move = (u64, u64, u64);

fn sector_align(x: u64) -> u64 {
    x.div_ceil(SECTOR) * SECTOR
}

impl Compactor<'_> {
    fn st(&self) -> &dyn Storage {
        &*self.v.storage
    }

    fn entry_corrupt(&self, block: u64, msg: String) -> Error {
        Error::corrupt("VHD BAT", self.d.table_offset + block * 4, msg).in_file(self.name, 0)
    }

    fn run(&self, progress: Progress<'_>) -> Result<Outcome> {
        let file_len = self.st().len()?;
        // The trailing footer: where the allocator put it last, or where
        // the open found it (nothing allocated since).
        let (footer_at, blocks) = {
            let st = lock(&self.d.state);
            let at = if st.end.checked_add(FOOTER_SIZE as u64) == Some(file_len) {
                st.end
            } else {
                self.v.info.footer_offset
            };
            let blocks: Vec<(u64, u64)> = st
                .bat
                .entries
                .iter()
                .enumerate()
                .filter(|(_, &e)| e != UNALLOCATED)
                .map(|(b, &e)| (b as u64, u64::from(e) * SECTOR))
                .collect();
            (at, blocks)
        };
        for &(b, off) in &blocks {
            if off < FOOTER_SIZE as u64 || off.checked_add(self.slot).is_none_or(|e| e > footer_at)
            {
                return Err(self.entry_corrupt(
                    b,
                    format!(
                        "block {b} at offset {off:#x} ({:#x} bytes of sector bitmap and data) \
                         does not lie between the footer copy and the trailing footer at \
                         {footer_at:#x}",
                        self.slot
                    ),
                ));
            }
        }
        // Refuse overlapping blocks before writing anything.
        let layout = self.layout(footer_at);
        self.sweep(
            &layout,
            &mut blocks.iter().map(|&(b, off)| (off, b)).collect::<Vec<_>>(),
        )?;
        let n = blocks.len() as u64;
        let total = 2 * n + 1;
        let mut copied = 0u64;
        let mut progress = |done: u64, copied: u64| {
            progress(Step {
                done,
                total,
                copied,
            })
        };
        progress(0, 0);

        // 1. Free.
        let mut freed = BTreeSet::new();
        let mut kept = Vec::with_capacity(blocks.len());
        for (i, &(b, off)) in blocks.iter().enumerate() {
            if self.reads_as_unallocated(b, off)? {
                freed.insert(b);
            } else {
                kept.push((off, b));
            }
            progress(i as u64 + 1, 0);
        }
        if !freed.is_empty() {
            let mut st = lock(&self.d.state);
            for &b in &freed {
                st.bat.set(b, UNALLOCATED);
                st.set_full(b, false);
                st.overlay.remove(&b);
            }
            let sectors: BTreeSet<u64> = freed.iter().map(|&b| bat::sector_of(b)).collect();
            self.write_bat(&mut st, &sectors)?;
        }

        // 2. Move.
        let (moves, new_end) = self.plan(&layout, &mut kept)?;
        let m = moves.len() as u64;
        for (k, &(b, from, to)) in moves.iter().enumerate() {
            disk::copy_range(self.st(), from, to, self.slot)?;
            self.st().flush()?;
            let sector = u32::try_from(to / SECTOR)
                .ok()
                .filter(|&s| s != UNALLOCATED)
                .ok_or_else(|| self.entry_corrupt(b, format!("offset {to:#x} out of range")))?;
            let mut st = lock(&self.d.state);
            st.bat.set(b, sector);
            self.write_bat(&mut st, &BTreeSet::from([bat::sector_of(b)]))?;
            drop(st);
            copied += self.slot;
            let k = k as u64 + 1;
            progress(
                n + u64::try_from(u128::from(n) * u128::from(k) / u128::from(m)).unwrap_or(n),
                copied,
            );
        }
        if m == 0 {
            progress(2 * n, copied);
        }

        // 3. The file end.
        let mut cut = None;
        if new_end
            .checked_add(FOOTER_SIZE as u64)
            .is_some_and(|e| e <= footer_at)
        {
            let footer = self.trailing_footer(footer_at, file_len)?;
            self.st().write_at(&footer, new_end)?;
            self.st().flush()?;
            self.st().set_len(new_end + FOOTER_SIZE as u64)?;
            self.st().flush()?;
            lock(&self.d.state).end = new_end;
            cut = Some(new_end);
        }
        progress(total, copied);
        Ok(Outcome {
            report: CompactReport {
                blocks_freed: freed.len() as u64,
                blocks_moved: m,
                old_file_size: file_len,
                new_file_size: self.st().len()?,
            },
            footer_at: cut,
            allocated: kept.len() as u64,
        })
    }

    /// Whether block `b`, at file offset `off`, reads exactly as it would
    /// unallocated: each present sector inside the disk holds zeros, or
    /// what the parent reads there.
    fn reads_as_unallocated(&self, b: u64, off: u64) -> Result<bool> {
        let d = self.d;
        let bits = read_vec(self.st(), off, d.bitmap_size)?;
        let start = b * d.block_size; // b < blocks of the disk: no overflow
        let limit = (self.v.virtual_size - start).min(d.block_size);
        let sectors = limit.div_ceil(SECTOR);
        let mut s = 0;
        while s < sectors {
            if !sector_bitmap::bit(&bits, s) {
                s += 1;
                continue;
            }
            let mut e = s + 1;
            while e < sectors && sector_bitmap::bit(&bits, e) && (e - s) * SECTOR < CHUNK {
                e += 1;
            }
            let from = s * SECTOR;
            let len = (e * SECTOR).min(limit) - from;
            let at = off + d.bitmap_size + from;
            if !disk::compact::reads_as(self.st(), at, self.parent, start + from, len)? {
                return Ok(false);
            }
            s = e;
        }
        Ok(true)
    }

    /// Write BAT sectors `sectors` from the in-memory BAT, then sync. On
    /// failure they stay dirty, for the next flush to write.
    fn write_bat(&self, st: &mut DynState, sectors: &BTreeSet<u64>) -> Result<()> {
        let r = (|| {
            for &s in sectors {
                let buf = st.bat.sector_bytes(s);
                self.st().write_at(&buf, self.d.table_offset + s * SECTOR)?;
            }
            self.st().flush()
        })();
        if r.is_err() {
            st.dirty_bat.extend(sectors.iter().copied());
        }
        r
    }

    /// The structures' ranges in the file (header, BAT, parent locator
    /// data), as far as they lie before the trailing footer at `footer_at`.
    fn layout(&self, footer_at: u64) -> Layout {
        let h = self.header;
        let hdr_off = self.v.info.footer.data_offset;
        let table_end = h
            .table_offset
            .saturating_add(sector_align(u64::from(h.max_table_entries) * 4));
        let mut used = vec![
            Used {
                start: hdr_off,
                end: hdr_off.saturating_add(HEADER_SIZE as u64),
                what: STRUCTURE,
            },
            Used {
                start: h.table_offset,
                end: table_end,
                what: STRUCTURE | 1,
            },
        ];
        for (i, l) in h.locators() {
            let len = sector_align(l.data_space_bytes().max(u64::from(l.data_length)));
            used.push(Used {
                start: l.data_offset,
                end: l.data_offset.saturating_add(len),
                what: STRUCTURE | (2 + i as u64),
            });
        }
        // Nothing past the trailing footer is ours (a locator pointing
        // there is not data we keep).
        used.retain(|u| u.start < footer_at);
        for u in &mut used {
            u.end = u.end.min(footer_at);
        }
        Layout {
            end: used.iter().map(|u| u.end).max().unwrap_or(0),
            structures: used,
            floor: table_end.max(FOOTER_SIZE as u64),
        }
    }

    /// Sweep the structures and `blocks` (`(offset, block)`): a block that
    /// overlaps anything is corrupt; else the gaps between them.
    fn sweep(&self, layout: &Layout, blocks: &mut [(u64, u64)]) -> Result<Vec<(u64, u64)>> {
        let mut used = layout.structures.clone();
        used.extend(blocks.iter().map(|&(off, b)| Used {
            start: off,
            end: off + self.slot,
            what: b,
        }));
        let s = sweep(&mut used);
        let describe = |u: &Used| match u.what {
            STRUCTURE => format!("the dynamic disk header at {:#x}", u.start),
            w if w == STRUCTURE | 1 => format!("the BAT ({:#x}..{:#x})", u.start, u.end),
            w if w & STRUCTURE != 0 => format!(
                "the data of parent locator {} ({:#x}..{:#x})",
                (w & !STRUCTURE) - 2,
                u.start,
                u.end
            ),
            b => format!("block {b} ({:#x}..{:#x})", u.start, u.end),
        };
        for (a, b) in &s.overlaps {
            let (blk, other) = if b.what & STRUCTURE == 0 {
                (b, a)
            } else if a.what & STRUCTURE == 0 {
                (a, b)
            } else {
                continue; // structures only: no block is at stake
            };
            return Err(self.entry_corrupt(
                blk.what,
                format!(
                    "{} overlaps {}: refusing to compact",
                    describe(blk),
                    describe(other)
                ),
            ));
        }
        Ok(s.gaps)
    }

    /// The holes left between the structures and the `kept` blocks
    /// (`(offset, block)`), and the moves that fill the lowest holes with
    /// the highest blocks; returns the moves and where the file's data then
    /// ends.
    fn plan(&self, layout: &Layout, kept: &mut [(u64, u64)]) -> Result<(Vec<Move>, u64)> {
        let floor = layout.floor;
        let mut holes: Vec<(u64, u64)> = self
            .sweep(layout, kept)?
            .into_iter()
            .map(|(a, b)| (sector_align(a.max(floor)), b))
            .filter(|&(a, b)| a < b && b - a >= self.slot)
            .collect();
        // Highest block into the lowest hole below it, one after another.
        // A hole too small now stays too small (holes only shrink), and the
        // lowest hole that fits lies above every block left once it lies
        // above the highest.
        kept.sort_unstable_by(|x, y| y.cmp(x));
        let mut moves = Vec::new();
        let mut hi = 0;
        for &(off, b) in kept.iter() {
            while holes.get(hi).is_some_and(|&(a, e)| e - a < self.slot) {
                hi += 1;
            }
            let Some(hole) = holes.get_mut(hi) else { break };
            if hole.0 + self.slot > off {
                break;
            }
            moves.push((b, off, hole.0));
            hole.0 += self.slot;
        }
        let blocks_end = kept[moves.len()..]
            .iter()
            .map(|&(off, _)| off + self.slot)
            .chain(moves.iter().map(|&(_, _, to)| to + self.slot))
            .max()
            .unwrap_or(0);
        let new_end = sector_align(layout.end.max(blocks_end).max(floor));
        Ok((moves, new_end))
    }

    /// The bytes of the trailing footer at `at`, to write again at the new
    /// end: as found when it is the last 512 bytes and valid (so that it
    /// stays identical to the copy at offset 0), else as the image writes
    /// it when allocating.
    fn trailing_footer(&self, at: u64, file_len: u64) -> Result<[u8; FOOTER_SIZE]> {
        if at.checked_add(FOOTER_SIZE as u64) == Some(file_len) {
            let mut b = [0u8; FOOTER_SIZE];
            self.st().read_at(&mut b, at)?;
            if Footer::parse(&b).is_ok() {
                return Ok(b);
            }
        }
        Ok(self.v.footer_bytes)
    }
}
