//! The file's space as the passes found it used: overlaps between
//! structures and blocks, unused space between them, and a leaked tail.

use super::regions::region_name;
use super::{Findings, HEADER_SECTION, MIB, RESERVED, STRUCTURE};
use crate::bat::BatGeometry;
use crate::region_table::RegionTable;
use disk::check::{sweep, Used};

/// Where the fixed structures are: the log of the current header and the
/// region table in use (for messages and for the regions' space).
pub(super) struct Layout<'a> {
    pub(super) log_offset: u64,
    pub(super) log_length: u64,
    pub(super) table: &'a RegionTable,
    /// File offset of the region table copy in use.
    pub(super) table_offset: u64,
}

impl Layout<'_> {
    /// File offset of region table entry `i` (MS-VHDX 2.2.3.2).
    pub(super) fn entry_at(&self, i: usize) -> u64 {
        self.table_offset + 16 + 32 * i as u64
    }

    /// What uses the range `start..end` of a [`Used`] whose `what` is
    /// `what`, for messages (BAT entries named by `geo` when known).
    pub(super) fn describe(
        &self,
        what: u64,
        start: u64,
        end: u64,
        geo: Option<&BatGeometry>,
    ) -> String {
        let (log_off, log_len) = (self.log_offset, self.log_length);
        if what & STRUCTURE != 0 {
            match what & !STRUCTURE {
                0 => "the header section (0..0x100000)".to_string(),
                1 => format!("the log ({log_off:#x}+{log_len:#x})"),
                k => match usize::try_from(k - 2)
                    .ok()
                    .and_then(|i| self.table.entries.get(i))
                {
                    Some(r) => format!(
                        "the {} ({:#x}+{:#x})",
                        region_name(r.guid),
                        r.file_offset,
                        r.length
                    ),
                    None => "a region".to_string(),
                },
            }
        } else {
            let idx = what & !RESERVED;
            let Some(g) = geo else {
                return format!("BAT entry {idx}");
            };
            let kind = if g.is_bitmap_index(idx) {
                format!(
                    "the sector bitmap block of chunk {}",
                    idx / (g.chunk_ratio() + 1)
                )
            } else {
                let block = idx - idx / (g.chunk_ratio() + 1);
                if what & RESERVED != 0 {
                    format!("the space kept for unmapped block {block}")
                } else {
                    format!("block {block}")
                }
            };
            format!(
                "{kind} (BAT entry {idx}, file offset {start:#x}+{:#x})",
                end - start
            )
        }
    }
}

/// Every structure's file space, for overlaps and leaks, and one past the
/// last byte any structure references, inside the file or not: nothing
/// before it is a leak.
pub(super) struct Space {
    pub(super) used: Vec<Used>,
    pub(super) referenced_end: u64,
}

impl Space {
    /// The header section and the log of a `view_len`-byte file.
    pub(super) fn new(layout: &Layout<'_>, view_len: u64) -> Space {
        // Header::parse checked that this does not overflow.
        let log_end = layout.log_offset.saturating_add(layout.log_length);
        Space {
            used: vec![
                Used {
                    start: 0,
                    end: HEADER_SECTION,
                    what: STRUCTURE,
                },
                Used {
                    start: layout.log_offset,
                    end: log_end.min(view_len),
                    what: STRUCTURE | 1,
                },
            ],
            referenced_end: HEADER_SECTION.max(log_end),
        }
    }
}

/// Overlaps and leaks from the used ranges; fills in the report.
/// `referenced_end` is one past the last byte any structure references
/// (`None` when the BAT could not be read: then nothing is known to be
/// unreferenced, and no space is a leak).
pub(super) fn finish(
    mut f: Findings,
    space: Space,
    layout: &Layout<'_>,
    geo: Option<&BatGeometry>,
    view_len: u64,
    referenced_end: Option<u64>,
) -> Findings {
    let mut used = space.used;
    let s = sweep(&mut used);
    let bat_offset = |what: u64| -> Option<u64> {
        (what & STRUCTURE == 0).then(|| {
            let off = layout.table.bat().file_offset;
            off + (what & !RESERVED) * 8
        })
    };
    for (a, b) in &s.overlaps {
        let da = layout.describe(a.what, a.start, a.end, geo);
        let db = layout.describe(b.what, b.start, b.end, geo);
        // Blame a BAT entry when one is involved: that is what is wrong.
        let (structure, at, msg) = match (bat_offset(b.what), bat_offset(a.what)) {
            (Some(at), _) => ("VHDX BAT", at, format!("{db} overlaps {da}")),
            (None, Some(at)) => ("VHDX BAT", at, format!("{da} overlaps {db}")),
            (None, None) => (
                "VHDX region table",
                RegionTable::OFFSETS[0],
                format!("{db} overlaps {da}"),
            ),
        };
        f.report.corrupt(structure, at, msg);
    }
    let cluster = f.report.cluster_size.max(MIB);
    let reclaimable = f.replay.is_none();
    for &(start, end) in &s.gaps {
        let len = end - start;
        f.report.unused(start, len);
    }
    // New blocks go at the next 1 MiB boundary: slack below it is no leak.
    let tail_end = view_len / MIB * MIB;
    // Space is a leak only when nothing references it and it lies past the
    // last referenced byte: with the BAT unread, or a structure running
    // past the end of the file (truncated), a repair must not cut anything.
    let may_leak = referenced_end.is_some_and(|e| e <= view_len);
    if tail_end > s.end && !may_leak {
        if referenced_end.is_some() {
            f.report.unused(s.end, tail_end - s.end);
        }
    } else if tail_end > s.end {
        let len = tail_end - s.end;
        let clusters = len.div_ceil(cluster);
        f.report.leak(s.end, len, clusters, reclaimable);
        if reclaimable {
            f.tail_leak = Some((s.end, clusters));
        }
    }
    f.report.image_end_offset = s.end.max(referenced_end.unwrap_or(0));
    f.referenced_end = referenced_end;
    f
}
