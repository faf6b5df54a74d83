//! The BAT (MS-VHDX 2.5): every entry's state (2.5.1.1, 2.5.1.2), every
//! present payload block and sector bitmap block inside the file, outside
//! the fixed structures and clear of every other block (recorded as used
//! space for `space`), truncated blocks, entries lost past the end of the
//! file, and a sector bitmap block for every chunk with a
//! PARTIALLY_PRESENT block.

use super::log::View;
use super::space::{Layout, Space};
use super::{MIB, RESERVED};
use crate::bat::{BatEntry, BatGeometry, PayloadState, SB_BLOCK_PRESENT};
use crate::region_table::BAT_REGION;
use crate::scan;
use crate::Result;
use disk::check::{CheckReport, Problem, Used};
use std::collections::{BTreeMap, BTreeSet};

/// BAT entries read at a time (1 MiB of BAT).
const BAT_CHUNK: u64 = 128 * 1024;

/// Every entry of the BAT the region table names, for a disk of geometry
/// `geo` in a file (as the log makes it) of `view_len` bytes; fills in the
/// report's cluster counts.
pub(super) fn entries(
    view: &View<'_>,
    name: &str,
    layout: &Layout<'_>,
    geo: &BatGeometry,
    view_len: u64,
    space: &mut Space,
    report: &mut CheckReport,
) -> Result<()> {
    let bat = *layout.table.bat();
    let bat_index = layout
        .table
        .entries
        .iter()
        .position(|r| r.guid == BAT_REGION)
        .unwrap_or(0);
    let total = geo.total_entries();
    let fits = u64::from(bat.length) / BatEntry::SIZE as u64;
    if total > fits {
        report.corrupt(
            "VHDX region table",
            layout.entry_at(bat_index) + 24,
            format!(
                "the BAT region is {} bytes but the disk needs {} bytes of BAT",
                bat.length,
                geo.bat_bytes()
            ),
        );
    }
    let n = total.min(fits);
    let block_size = u64::from(geo.block_size);
    let ratio = geo.chunk_ratio();
    let mut allocated = 0u64;
    let mut fragmented = 0u64;
    let mut prev_end: Option<u64> = None;
    let mut bitmaps: BTreeSet<u64> = BTreeSet::new();
    // Chunk → BAT index of its first PARTIALLY_PRESENT block.
    let mut partial: BTreeMap<u64, u64> = BTreeMap::new();
    // At most as many blocks as the file holds side by side are kept for
    // the overlap sweep (bounded memory on a hostile BAT); one past that
    // is one corruption (blocks must overlap), the rest are not kept.
    let max_kept = space.used.len() as u64 + view_len / MIB + 1;
    let keep = |used: &mut Vec<Used>, u: Used, report: &mut CheckReport, at: u64| {
        let n = used.len() as u64;
        if n < max_kept {
            used.push(u);
        } else if n == max_kept {
            used.push(u);
            report.corrupt(
                "VHDX BAT",
                at,
                format!(
                    "more blocks than the {view_len:#x}-byte file can hold side by side: \
                     blocks overlap"
                ),
            );
        }
    };
    // Entries past the end of the file (a file truncated inside the BAT)
    // read as zeros: say which blocks can no longer be found.
    let entries_in_file = view_len.saturating_sub(bat.file_offset) / 8;
    if entries_in_file < n {
        let (first, _) = geo.entry_virtual_range(entries_in_file);
        report.corrupt(
            "VHDX BAT",
            bat.file_offset + entries_in_file * 8,
            format!(
                "entries {entries_in_file}..{n} lie past the end of the file ({view_len:#x} \
                 bytes): the file is truncated inside the BAT, and the blocks of virtual \
                 {first:#x}..{:#x} cannot be found",
                geo.virtual_size
            ),
        );
    }
    let mut idx = 0u64;
    while idx < n {
        let k = (n - idx).min(BAT_CHUNK);
        let buf = view.read(bat.file_offset + idx * 8, k * 8)?;
        for (j, raw) in buf.chunks_exact(8).enumerate() {
            let i = idx + j as u64;
            let e = BatEntry(u64::from_le_bytes(raw.try_into().expect("8 bytes")));
            let at = bat.file_offset + i * 8;
            if let Err(err) = geo.check_entry(i, e) {
                let err = err.in_file(name, bat.file_offset);
                report.add(Problem::from_error(&err, "VHDX BAT", at), 0);
                continue;
            }
            let fo = e.file_offset();
            let (len, what) = if geo.is_bitmap_index(i) {
                if e.state() != SB_BLOCK_PRESENT {
                    continue;
                }
                bitmaps.insert(i / (ratio + 1));
                (MIB, i)
            } else {
                match e.payload_state() {
                    Ok(PayloadState::FullyPresent | PayloadState::PartiallyPresent) => {
                        allocated += 1;
                        if prev_end.is_some_and(|p| p != fo) {
                            fragmented += 1;
                        }
                        prev_end = fo.checked_add(block_size);
                        if e.state() == PayloadState::PartiallyPresent as u8 {
                            let block = i - i / (ratio + 1);
                            partial.entry(block / ratio).or_insert(i);
                        }
                        (block_size, i)
                    }
                    Ok(PayloadState::Unmapped | PayloadState::Zero) if fo >= MIB => {
                        // Space kept for the block (LeaveBlocksAllocated):
                        // the driver reuses it, so it must not overlap
                        // anything; past the end of the file it is harmless.
                        if let Some(end) = fo.checked_add(block_size).filter(|&e| e <= view_len) {
                            let u = Used {
                                start: fo,
                                end,
                                what: i | RESERVED,
                            };
                            keep(&mut space.used, u, report, at);
                        }
                        continue;
                    }
                    _ => continue,
                }
            };
            match fo.checked_add(len) {
                Some(end) if end <= view_len => {
                    let u = Used {
                        start: fo,
                        end,
                        what,
                    };
                    keep(&mut space.used, u, report, at);
                    space.referenced_end = space.referenced_end.max(end);
                }
                Some(end) => {
                    // A block that runs past the end of the file: the file
                    // was truncated. What is left of it inside the file is
                    // used (never a leak), and nothing past it is a leak.
                    space.referenced_end = space.referenced_end.max(end);
                    if fo < view_len {
                        let u = Used {
                            start: fo,
                            end: view_len,
                            what,
                        };
                        keep(&mut space.used, u, report, at);
                    }
                    report.truncated_block(
                        "VHDX BAT",
                        at,
                        &format!("entry {i}: {}", scan::describe(geo, i)),
                        geo.entry_virtual_range(i),
                        fo,
                        len,
                        view_len,
                    );
                }
                None => report.corrupt(
                    "VHDX BAT",
                    at,
                    format!(
                        "entry {i}: {} points past the end of the file: file offset {fo:#x}+{len:#x} \
                         but the file is {view_len:#x} bytes",
                        scan::describe(geo, i)
                    ),
                ),
            }
        }
        idx += k;
    }
    for (chunk, i) in &partial {
        if !bitmaps.contains(chunk) {
            report.corrupt(
                "VHDX BAT",
                bat.file_offset + i * 8,
                format!(
                    "entry {i}: {} is PARTIALLY_PRESENT but its chunk {chunk} has no sector \
                     bitmap block",
                    scan::describe(geo, *i)
                ),
            );
        }
    }
    report.cluster_size = block_size;
    report.total_clusters = geo.payload_blocks();
    report.allocated_clusters = allocated;
    report.fragmented_clusters = fragmented;
    Ok(())
}
