//! One pass over the whole BAT as stored: where the last referenced byte
//! of the file is, and which blocks run past the end of the file (a
//! truncated file).
//!
//! A writable open needs the first: new blocks must go past every byte any
//! entry references, not merely past the end of the file, or a block
//! allocated in a truncated file would land on the surviving part of a
//! truncated block. `vdisk info` needs the second. The BAT is read 4 MiB at
//! a time, and holes of a sparse file (a BAT nobody wrote reads as zeros:
//! NOT_PRESENT entries) are skipped without reading them.

use crate::bat::{BatEntry, BatGeometry, PayloadState, SB_BLOCK_PRESENT};
use crate::Error;
use disk::{Result, Storage};
use std::collections::HashMap;

const MIB: u64 = 1 << 20;
/// Bytes of BAT read at a time.
const SCAN_CHUNK: u64 = SCAN_CHUNK_BYTES as u64;
/// [`SCAN_CHUNK`] as a buffer length.
const SCAN_CHUNK_BYTES: usize = 4 << 20;
/// A page of zeros to compare BAT pages with (memcmp).
static ZERO_PAGE: [u8; 4096] = [0; 4096];
/// Truncated blocks listed in a [`BatScan`] (the count stays exact).
pub const MAX_LISTED: usize = 1000;

/// A block (payload or sector bitmap block) that runs past the end of the
/// file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TruncatedBlock {
    /// Its BAT index.
    pub index: u64,
    /// The virtual range `[start, end)` whose data it holds (for a sector
    /// bitmap block, every block of its chunk).
    pub virtual_range: (u64, u64),
    /// Its file offset.
    pub file_offset: u64,
    /// Its length in the file (the block size, or 1 MiB for a sector
    /// bitmap block).
    pub length: u64,
    /// Whether it is a sector bitmap block.
    pub bitmap: bool,
}

/// A block, sector bitmap block or kept space (which a write of its block
/// reuses) whose file space overlaps a structure or another one: the
/// driver would overwrite one with the other.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Overlap {
    /// Its BAT index.
    pub index: u64,
    /// Its file offset.
    pub file_offset: u64,
    /// Its length in the file.
    pub length: u64,
    /// Whether it is space kept for an UNMAPPED block.
    pub kept: bool,
}

/// What [`scan`] found.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct BatScan {
    /// One past the last byte a BAT entry references: present payload and
    /// sector bitmap blocks, and space kept for unmapped blocks
    /// (LeaveBlocksAllocated), which the driver may reuse, when it ends
    /// within `kept_limit` (beyond, it is not space this file ever had:
    /// ignored, never reused). 0 when none.
    pub referenced_end: u64,
    /// Blocks that run past the end of the file.
    pub truncated_blocks: u64,
    /// The first [`MAX_LISTED`] of them, in BAT order.
    pub truncated: Vec<TruncatedBlock>,
    /// BAT entries that lie inside the file; the others (a file truncated
    /// inside the BAT) are unknown.
    pub entries_in_file: u64,
    /// BAT entries the disk has.
    pub total_entries: u64,
    /// The first block (in BAT order) whose file space overlaps the given
    /// structures or an earlier block, when they were given.
    pub overlap: Option<Overlap>,
}

impl BatScan {
    /// Whether the file is truncated: a block, or part of the BAT, lies
    /// past its end.
    pub fn is_truncated(&self) -> bool {
        self.truncated_blocks > 0 || self.entries_in_file < self.total_entries
    }
}

/// How far space kept for an UNMAPPED or ZERO block (LeaveBlocksAllocated)
/// may reach in a file of `file_len` bytes with geometry `geo`: the file
/// plus every payload and sector bitmap block of the disk. A file never
/// needs more, so kept space ending beyond was never space of this file
/// (a corrupt entry): honouring it would put every new block there,
/// growing the file by up to 16 EiB. The driver ignores such space: it
/// neither reuses it nor places new blocks after it.
pub(crate) fn kept_limit(file_len: u64, geo: &BatGeometry) -> u64 {
    let blocks = geo
        .payload_blocks()
        .saturating_mul(u64::from(geo.block_size))
        .saturating_add(geo.bitmap_blocks().saturating_mul(MIB));
    file_len.saturating_add(blocks)
}

/// 1 MiB units of file space in one [`Claims`] chunk.
const CHUNK_UNITS: u64 = 1 << 15;

/// File space claimed so far, in 1 MiB units (structures, blocks and
/// sector bitmap blocks all start on a 1 MiB boundary): a sparse bitmap,
/// 4 KiB per 32 GiB of file that holds anything.
#[derive(Default)]
struct Claims {
    chunks: HashMap<u64, Box<[u64; (CHUNK_UNITS / 64) as usize]>>,
}

impl Claims {
    /// Claim `start..start + len`; whether any of it was claimed before.
    fn claim(&mut self, start: u64, len: u64) -> bool {
        let mut taken = false;
        for unit in start / MIB..start.saturating_add(len).div_ceil(MIB) {
            let chunk = self
                .chunks
                .entry(unit / CHUNK_UNITS)
                .or_insert_with(|| Box::new([0; (CHUNK_UNITS / 64) as usize]));
            // Below CHUNK_UNITS / 64: fits a usize.
            let (word, bit) = ((unit % CHUNK_UNITS / 64) as usize, unit % 64);
            taken |= chunk[word] & (1 << bit) != 0;
            chunk[word] |= 1 << bit;
        }
        taken
    }
}

/// What a pass over the BAT accumulates.
struct Pass<'a> {
    geo: &'a BatGeometry,
    file_len: u64,
    out: BatScan,
    /// When overlaps are looked for.
    claims: Option<Claims>,
}

/// Scan the BAT at `bat_offset` of `storage` (geometry `geo`). With
/// `structures` (file ranges the driver writes: headers, log, regions),
/// also find the first block, sector bitmap block or reused kept space
/// that overlaps one of them or an earlier one ([`BatScan::overlap`]).
///
/// # Errors
/// I/O errors.
pub(crate) fn scan(
    storage: &dyn Storage,
    bat_offset: u64,
    geo: &BatGeometry,
    structures: Option<&[(u64, u64)]>,
) -> Result<BatScan> {
    let file_len = storage.len()?;
    let total = geo.total_entries();
    let in_file = file_len.saturating_sub(bat_offset) / 8;
    let out = BatScan {
        entries_in_file: in_file.min(total),
        total_entries: total,
        ..BatScan::default()
    };
    let bat_end = bat_offset + out.entries_in_file * 8;
    let claims = structures.map(|list| {
        let mut c = Claims::default();
        for &(start, len) in list {
            c.claim(start, len);
        }
        c
    });
    let mut pass = Pass {
        geo,
        file_len,
        out,
        claims,
    };
    // No larger than the BAT: a small disk's BAT is a few bytes.
    let bat_bytes = usize::try_from(pass.out.entries_in_file * 8).unwrap_or(usize::MAX);
    let mut buf = vec![0u8; SCAN_CHUNK_BYTES.min(bat_bytes)];
    let mut pos = bat_offset;
    while pos < bat_end {
        // Skip holes: they read as zeros, NOT_PRESENT entries.
        let Some((data, run_end)) = storage.data_run(pos)? else {
            break;
        };
        // Round down to an entry: a run may start inside one.
        let start = pos.max(data - (data - bat_offset) % 8);
        if start >= bat_end {
            break;
        }
        let end = run_end.min(bat_end).min(start + SCAN_CHUNK);
        let end = end.max(start + 8).min(bat_end);
        // At most SCAN_CHUNK bytes (end ≤ start + SCAN_CHUNK).
        let n = usize::try_from(end - start).map_or(buf.len(), |n| n.min(buf.len()));
        storage.read_at(&mut buf[..n], start)?;
        let first = (start - bat_offset) / 8;
        for (k, page) in buf[..n].chunks(4096).enumerate() {
            // Most of a large BAT is NOT_PRESENT (zeros): skip such a page
            // with one memcmp instead of entry by entry.
            if page == &ZERO_PAGE[..page.len()] {
                continue;
            }
            scan_page(page, first + k as u64 * 512, &mut pass);
        }
        pos = start + n as u64;
    }
    Ok(pass.out)
}

/// Account for the entries in `page` (BAT entries from index `first`).
fn scan_page(page: &[u8], first: u64, pass: &mut Pass<'_>) {
    let (geo, file_len) = (pass.geo, pass.file_len);
    let out = &mut pass.out;
    let block_size = u64::from(geo.block_size);
    for (j, raw) in page.chunks_exact(8).enumerate() {
        let e = BatEntry(u64::from_le_bytes(raw.try_into().expect("8 bytes")));
        if e.0 == 0 {
            continue;
        }
        let i = first + j as u64;
        let fo = e.file_offset();
        let (len, bitmap) = if geo.is_bitmap_index(i) {
            if e.state() != SB_BLOCK_PRESENT {
                continue;
            }
            (MIB, true)
        } else {
            match e.payload_state() {
                Ok(PayloadState::FullyPresent | PayloadState::PartiallyPresent) => {
                    (block_size, false)
                }
                // Space kept for an unmapped block: the driver may reuse
                // it, so nothing else may go there (inside the file or
                // not), but it holds no data.
                Ok(state @ (PayloadState::Unmapped | PayloadState::Zero)) if fo >= MIB => {
                    let end = fo.saturating_add(block_size);
                    if end <= kept_limit(file_len, geo) {
                        out.referenced_end = out.referenced_end.max(end);
                        // A write of an UNMAPPED block zeroes its kept
                        // space and puts the block there.
                        if state == PayloadState::Unmapped {
                            claim(&mut pass.claims, out, i, fo, block_size, true);
                        }
                    }
                    continue;
                }
                _ => continue,
            }
        };
        claim(&mut pass.claims, out, i, fo, len, false);
        let block_end = fo.saturating_add(len);
        out.referenced_end = out.referenced_end.max(block_end);
        if block_end > file_len {
            out.truncated_blocks += 1;
            if out.truncated.len() < MAX_LISTED {
                out.truncated.push(TruncatedBlock {
                    index: i,
                    virtual_range: geo.entry_virtual_range(i),
                    file_offset: fo,
                    length: len,
                    bitmap,
                });
            }
        }
    }
}

/// Claim the file space of BAT entry `i` when overlaps are looked for;
/// record the first overlap.
fn claim(claims: &mut Option<Claims>, out: &mut BatScan, i: u64, fo: u64, len: u64, kept: bool) {
    if let Some(c) = claims {
        if c.claim(fo, len) && out.overlap.is_none() {
            out.overlap = Some(Overlap {
                index: i,
                file_offset: fo,
                length: len,
                kept,
            });
        }
    }
}

/// "block N" or "the sector bitmap block of chunk N" for BAT index `i`.
pub(crate) fn describe(geo: &BatGeometry, i: u64) -> String {
    let r = geo.chunk_ratio() + 1;
    if geo.is_bitmap_index(i) {
        format!("the sector bitmap block of chunk {}", i / r)
    } else {
        format!("block {}", i - i / r)
    }
}

/// The error for reaching the part of the block of BAT index `i` (at file
/// offset `fo`, `len` bytes) that lies past the end of the file
/// (`file_len` bytes): names the block, its virtual range, its file range
/// and what is lost.
pub(crate) fn truncated_error(
    name: &str,
    geo: &BatGeometry,
    i: u64,
    fo: u64,
    len: u64,
    file_len: u64,
) -> Error {
    let (vs, ve) = geo.entry_virtual_range(i);
    let lost_from = if geo.is_bitmap_index(i) {
        vs
    } else {
        (vs + file_len.saturating_sub(fo)).min(ve)
    };
    Error::corrupt(
        "VHDX block",
        fo,
        format!(
            "{} (BAT entry {i}, virtual {vs:#x}..{ve:#x}) at file offset {fo:#x}+{len:#x} runs \
             past the end of the file ({file_len:#x} bytes): the image is truncated, virtual \
             {lost_from:#x}..{ve:#x} is lost",
            describe(geo, i)
        ),
    )
    .in_file(name, 0)
}

/// The error for reaching BAT entry `i`, which lies past the end of the
/// file (`file_len` bytes) at `at`.
pub(crate) fn lost_entry_error(
    name: &str,
    geo: &BatGeometry,
    i: u64,
    at: u64,
    file_len: u64,
) -> Error {
    let (vs, ve) = geo.entry_virtual_range(i);
    Error::corrupt(
        "VHDX BAT",
        at,
        format!(
            "the entry of {} (BAT entry {i}, virtual {vs:#x}..{ve:#x}) lies past the end of the \
             file ({file_len:#x} bytes): the image is truncated inside the BAT, the block cannot \
             be found",
            describe(geo, i)
        ),
    )
    .in_file(name, 0)
}

#[cfg(test)]
// Test files of a few MiB: offsets and lengths fit in memory.
#[allow(clippy::cast_possible_truncation)]
mod tests {
    use super::*;
    use disk::MemStorage;

    const BAT: u64 = 3 * MIB;

    fn geo() -> BatGeometry {
        // 64 MiB, 1 MiB blocks, a differencing layout (sector bitmap entries).
        BatGeometry::new(64 * MIB, 1 << 20, 512, true).unwrap()
    }

    fn file(entries: &[(u64, BatEntry)], len: u64) -> MemStorage {
        let mut v = vec![0u8; len as usize];
        for &(i, e) in entries {
            let at = (BAT + i * 8) as usize;
            if at + 8 <= v.len() {
                v[at..at + 8].copy_from_slice(&e.0.to_le_bytes());
            }
        }
        MemStorage::from_vec("s.vhdx", v)
    }

    #[test]
    fn finds_the_last_referenced_byte_and_truncated_blocks() {
        let g = geo();
        let present = PayloadState::FullyPresent as u8;
        let sb = g.bitmap_index(0);
        let st = file(
            &[
                (0, BatEntry::new(present, 4 * MIB)),
                (5, BatEntry::new(present, 6 * MIB)),
                // Reserved space of an unmapped block, past the end.
                (7, BatEntry::new(PayloadState::Unmapped as u8, 20 * MIB)),
                (sb, BatEntry::new(SB_BLOCK_PRESENT, 5 * MIB)),
            ],
            6 * MIB + 1000,
        );
        let s = scan(&st, BAT, &g, None).unwrap();
        assert_eq!(s.referenced_end, 21 * MIB);
        assert_eq!(s.truncated_blocks, 1);
        assert_eq!(
            s.truncated,
            vec![TruncatedBlock {
                index: 5,
                virtual_range: (5 * MIB, 6 * MIB),
                file_offset: 6 * MIB,
                length: MIB,
                bitmap: false,
            }]
        );
        assert_eq!(s.entries_in_file, g.total_entries());
        assert!(s.is_truncated());
        let e = truncated_error("s.vhdx", &g, 5, 6 * MIB, MIB, 6 * MIB + 1000).to_string();
        assert!(
            e.contains(
                "block 5 (BAT entry 5, virtual 0x500000..0x600000) at file offset \
                        0x600000+0x100000 runs past the end of the file (0x6003e8 bytes)"
            ),
            "{e}"
        );
        assert!(e.contains("virtual 0x5003e8..0x600000 is lost"), "{e}");
    }

    #[test]
    fn a_bat_cut_short_leaves_entries_unknown() {
        let g = geo();
        let st = file(
            &[(1, BatEntry::new(PayloadState::FullyPresent as u8, 4 * MIB))],
            BAT + 80,
        );
        let s = scan(&st, BAT, &g, None).unwrap();
        assert_eq!(
            (s.entries_in_file, s.total_entries),
            (10, g.total_entries())
        );
        // Block 1 (4 MiB..5 MiB) lies wholly past the end.
        assert_eq!((s.truncated_blocks, s.referenced_end), (1, 5 * MIB));
        let e = lost_entry_error("s.vhdx", &g, 12, BAT + 96, BAT + 80).to_string();
        assert!(e.contains("at offset 0x300060"), "{e}");
        assert!(e.contains("block 12 (BAT entry 12"), "{e}");
    }

    #[test]
    fn kept_space_beyond_what_the_file_can_need_is_ignored() {
        // A fuzz finding: an UNMAPPED entry keeping space at an absurd file
        // offset made referenced_end (where new blocks go) exabytes long.
        let g = geo();
        let len = 6 * MIB;
        let limit = kept_limit(len, &g);
        // The file, 64 payload blocks of 1 MiB and 1 sector bitmap block.
        assert_eq!(limit, len + 64 * MIB + MIB);
        let unmapped = PayloadState::Unmapped as u8;
        let st = file(
            &[
                (0, BatEntry::new(PayloadState::FullyPresent as u8, 4 * MIB)),
                // Kept space ending exactly at the limit: honoured.
                (1, BatEntry::new(unmapped, limit - MIB)),
                (2, BatEntry::new(unmapped, 0x7461_6461_7480_0000)),
                (3, BatEntry::new(PayloadState::Zero as u8, limit)),
            ],
            len,
        );
        let s = scan(&st, BAT, &g, None).unwrap();
        assert_eq!(s.referenced_end, limit);
        assert!(!s.is_truncated());
        let st = file(&[(2, BatEntry::new(unmapped, 0x7461_6461_7480_0000))], len);
        assert_eq!(scan(&st, BAT, &g, None).unwrap().referenced_end, 0);
    }

    #[test]
    fn blocks_overlapping_structures_or_each_other_are_found() {
        // A fuzz finding: block 0 of a writable image lay on the BAT
        // region, so the flush of the BAT overwrote the block's data.
        let g = geo();
        let present = PayloadState::FullyPresent as u8;
        let unmapped = PayloadState::Unmapped as u8;
        let structures = [(0, MIB), (MIB, MIB), (BAT, MIB)];
        let overlap = |entries: &[(u64, BatEntry)]| {
            scan(&file(entries, 12 * MIB), BAT, &g, Some(&structures))
                .unwrap()
                .overlap
        };
        let at = |index, file_offset, kept| {
            Some(Overlap {
                index,
                file_offset,
                length: MIB,
                kept,
            })
        };
        assert_eq!(
            overlap(&[(0, BatEntry::new(present, BAT))]),
            at(0, BAT, false)
        );
        assert_eq!(
            overlap(&[
                (0, BatEntry::new(present, 4 * MIB)),
                (2, BatEntry::new(present, 5 * MIB)),
                (3, BatEntry::new(present, 4 * MIB)),
            ]),
            at(3, 4 * MIB, false)
        );
        // A sector bitmap block, and space kept for an UNMAPPED block (a
        // write of the block zeroes it), count; ZERO's kept space is never
        // written.
        let sb = g.bitmap_index(0);
        assert_eq!(
            overlap(&[
                (0, BatEntry::new(present, 4 * MIB)),
                (sb, BatEntry::new(SB_BLOCK_PRESENT, 4 * MIB)),
            ]),
            at(sb, 4 * MIB, false)
        );
        assert_eq!(
            overlap(&[
                (0, BatEntry::new(present, 4 * MIB)),
                (1, BatEntry::new(unmapped, 4 * MIB)),
            ]),
            at(1, 4 * MIB, true)
        );
        assert_eq!(
            overlap(&[
                (0, BatEntry::new(present, 4 * MIB)),
                (1, BatEntry::new(PayloadState::Zero as u8, 4 * MIB)),
                (2, BatEntry::new(unmapped, 5 * MIB)),
                (3, BatEntry::new(present, 6 * MIB)),
                (sb, BatEntry::new(SB_BLOCK_PRESENT, 7 * MIB)),
            ]),
            None
        );
        // Not looked for without structures.
        let st = file(&[(0, BatEntry::new(present, BAT))], 12 * MIB);
        assert_eq!(scan(&st, BAT, &g, None).unwrap().overlap, None);
    }

    #[test]
    fn clean_file_is_not_truncated() {
        let g = geo();
        let st = file(
            &[(0, BatEntry::new(PayloadState::FullyPresent as u8, 4 * MIB))],
            5 * MIB,
        );
        let s = scan(&st, BAT, &g, None).unwrap();
        assert!(!s.is_truncated());
        assert_eq!(s.referenced_end, 5 * MIB);
    }
}
