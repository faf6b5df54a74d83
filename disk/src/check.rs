//! Consistency checks of image files, shaped like `qemu-img check`: the
//! report every format's checker fills in (`vhdx::check`, `vhd::check`).
//!
//! A check reads the file's structures without trusting any of them and
//! sorts what it finds into three classes, which decide the exit status of
//! `vdisk check` exactly as they do for `qemu-img check`:
//!
//! - [`ProblemKind::Corruption`]: a structure contradicts its specification
//!   or another structure (a BAT entry past the end of the file, two blocks
//!   on the same bytes, a bad checksum, a log that still needs replaying):
//!   data may read wrong, or further writes may corrupt it (exit status 2).
//!   A block that runs past the end of the file is a truncated block
//!   ([`CheckReport::truncated_block`]), with the virtual range it held.
//! - [`ProblemKind::Leak`]: file space at the end of the file that no
//!   structure references and that lies past the last referenced byte:
//!   wasted space, no harm to data (exit status 3 when there is nothing
//!   worse).
//! - [`ProblemKind::CheckError`]: something the check could not verify (the
//!   parent of a differencing disk is missing, an unsupported feature) (exit
//!   status 1).
//!
//! Every problem names the structure and the absolute file offset it is
//! about. A repair ([`RepairMode`]) fixes what can be fixed without losing
//! data (it never cuts or overwrites a referenced byte); the caller then
//! checks again and reports what remains.

use crate::error::Error;
use crate::{LockMode, Opener, ParentPolicy};
use std::fmt;
use std::sync::Arc;

/// At most this many problems are kept in a report (the counts stay exact):
/// a hostile image can have millions of bad BAT entries.
pub const MAX_PROBLEMS: usize = 1000;

/// What to check besides the file itself.
#[derive(Debug, Clone)]
pub struct CheckOptions {
    /// Which files a differencing disk's parent may be (as when opening).
    pub parent_policy: ParentPolicy,
    /// Look for a differencing disk's parent and check that it is the
    /// parent (VHDX: its DataWriteGuid is a linkage; VHD: its unique id).
    pub check_parent: bool,
    /// How a check (a read-only open) claims the image and its parent
    /// ([`crate::lock`]); a repair always claims the image exclusively.
    pub lock: LockMode,
    /// How the image and its parent are reached (real files by default).
    pub opener: Arc<dyn Opener>,
}

impl Default for CheckOptions {
    fn default() -> Self {
        CheckOptions {
            parent_policy: ParentPolicy::default(),
            check_parent: true,
            lock: LockMode::Auto,
            opener: crate::file_opener(),
        }
    }
}

/// The class of a [`Problem`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ProblemKind {
    /// A structure is invalid or contradicts another one.
    Corruption,
    /// File space at the end of the file that no structure references
    /// (a check repair cuts it off).
    Leak,
    /// File space between used structures that none references. Not a
    /// leak: no data is lost, and a check repair cannot give it back by
    /// truncating (`vdisk compact` packs blocks into it). QEMU, for one,
    /// leaves 4 MiB of it in every VHDX it creates.
    Unused,
    /// Something the check could not verify.
    CheckError,
}

impl ProblemKind {
    /// A lowercase name for machine-readable output: `corruption`, `leak`
    /// or `check-error`.
    pub fn name(self) -> &'static str {
        match self {
            ProblemKind::Corruption => "corruption",
            ProblemKind::Leak => "leak",
            ProblemKind::CheckError => "check-error",
            ProblemKind::Unused => "unused",
        }
    }
}

/// What a repair may change (`qemu-img check -r leaks|all`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum RepairMode {
    /// Only reclaim leaked space (never touches referenced data).
    Leaks,
    /// Also repair corruptions that can be repaired without losing data
    /// (replay a log, restore a damaged copy of a redundant structure).
    All,
}

/// One thing a check found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problem {
    /// Corruption, leak or check error.
    pub kind: ProblemKind,
    /// The on-disk structure, e.g. "VHDX BAT" or "VHD footer".
    pub structure: String,
    /// Absolute file offset of the structure (or field) concerned.
    pub offset: u64,
    /// Bytes concerned (leaked bytes for a leak; 0 when not a range).
    pub length: u64,
    /// What is wrong.
    pub message: String,
    /// The least repair mode that fixes it, `None` when no repair can.
    pub repair: Option<RepairMode>,
    /// The virtual byte range `[start, end)` whose data the problem
    /// concerns (a truncated block), when it concerns one.
    pub virtual_range: Option<(u64, u64)>,
}

impl Problem {
    /// A problem of `kind` about `structure` at `offset`.
    pub fn new(
        kind: ProblemKind,
        structure: impl Into<String>,
        offset: u64,
        message: impl fmt::Display,
    ) -> Self {
        Problem {
            kind,
            structure: structure.into(),
            offset,
            length: 0,
            message: message.to_string(),
            repair: None,
            virtual_range: None,
        }
    }

    /// The problem an error describes: a corruption error keeps its
    /// structure and (absolute) offset; other errors become check errors
    /// about `structure` at `offset`.
    pub fn from_error(e: &Error, structure: &str, offset: u64) -> Self {
        match e {
            Error::Corrupt {
                structure: s,
                offset: o,
                msg,
                ..
            } => Problem::new(ProblemKind::Corruption, *s, *o, msg),
            _ => Problem::new(ProblemKind::CheckError, structure, offset, e),
        }
    }

    /// The same problem, fixed by `mode`.
    pub fn repairable(mut self, mode: RepairMode) -> Self {
        self.repair = Some(mode);
        self
    }

    /// Whether a repair in `mode` fixes it.
    pub fn fixed_by(&self, mode: RepairMode) -> bool {
        self.repair.is_some_and(|m| m <= mode)
    }
}

impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} at offset {:#x}: {}",
            self.structure, self.offset, self.message
        )
    }
}

/// What a check found (see the module docs), with the counts `qemu-img
/// check` reports.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct CheckReport {
    /// The file checked.
    pub filename: String,
    /// Its format ("vhdx", "vhd").
    pub format: &'static str,
    /// The problems found, at most [`MAX_PROBLEMS`] of them.
    pub problems: Vec<Problem>,
    /// Problems found but not kept in `problems`.
    pub problems_omitted: u64,
    /// Corruptions found.
    pub corruptions: u64,
    /// Leaked clusters (units of `cluster_size`) found.
    pub leaks: u64,
    /// Leaked bytes found.
    pub leaked_bytes: u64,
    /// Bytes between used structures that none references (see
    /// [`ProblemKind::Unused`]; not counted as leaks).
    pub unused_bytes: u64,
    /// Blocks (payload or sector bitmap blocks) that run past the end of
    /// the file: the file was truncated (each is also a corruption).
    pub truncated_blocks: u64,
    /// Things the check could not verify.
    pub check_errors: u64,
    /// The unit of the cluster counts, in bytes (the block size).
    pub cluster_size: u64,
    /// Clusters (blocks) of the virtual disk.
    pub total_clusters: u64,
    /// Clusters (blocks) stored in the file.
    pub allocated_clusters: u64,
    /// Allocated clusters not stored right after the previous allocated
    /// cluster of the virtual disk.
    pub fragmented_clusters: u64,
    /// Where the last byte any structure uses ends.
    pub image_end_offset: u64,
    /// The file's length.
    pub file_size: u64,
}

impl CheckReport {
    /// An empty report for `filename` in `format`.
    pub fn new(filename: impl Into<String>, format: &'static str) -> Self {
        CheckReport {
            filename: filename.into(),
            format,
            ..CheckReport::default()
        }
    }

    /// Record a problem: counted, and kept unless there are too many.
    /// Leaks count `clusters` leaked clusters.
    pub fn add(&mut self, p: Problem, clusters: u64) {
        match p.kind {
            ProblemKind::Corruption => self.corruptions += 1,
            ProblemKind::Leak => {
                self.leaks = self.leaks.saturating_add(clusters);
                self.leaked_bytes = self.leaked_bytes.saturating_add(p.length);
            }
            ProblemKind::CheckError => self.check_errors += 1,
            ProblemKind::Unused => {
                self.unused_bytes = self.unused_bytes.saturating_add(p.length);
            }
        }
        if self.problems.len() < MAX_PROBLEMS {
            self.problems.push(p);
        } else {
            self.problems_omitted += 1;
        }
    }

    /// Record a corruption of `structure` at `offset`.
    pub fn corrupt(&mut self, structure: &str, offset: u64, msg: impl fmt::Display) {
        self.add(
            Problem::new(ProblemKind::Corruption, structure, offset, msg),
            0,
        );
    }

    /// Record a check error about `structure` at `offset`.
    pub fn check_error(&mut self, structure: &str, offset: u64, msg: impl fmt::Display) {
        self.add(
            Problem::new(ProblemKind::CheckError, structure, offset, msg),
            0,
        );
    }

    /// Record `length` leaked bytes at `offset` (`clusters` clusters),
    /// reclaimable by `-r leaks` when `reclaimable`.
    pub fn leak(&mut self, offset: u64, length: u64, clusters: u64, reclaimable: bool) {
        let mut p = Problem::new(
            ProblemKind::Leak,
            "file space",
            offset,
            format!(
                "{length} bytes ({offset:#x}..{:#x}) are not referenced by any structure{}",
                offset.saturating_add(length),
                if reclaimable {
                    ""
                } else {
                    " (reclaimable once the image is repaired)"
                }
            ),
        );
        p.length = length;
        if reclaimable {
            p.repair = Some(RepairMode::Leaks);
        }
        self.add(p, clusters);
    }

    /// Record a block that runs past the end of the file (`file_len`
    /// bytes): a corruption about `structure` at `offset` (the block's BAT
    /// entry), naming the block (`what`, e.g. "block 66"), the virtual range
    /// `[virt_start, virt_end)` whose data it holds and its file range
    /// `file_offset + length`. No repair brings the lost bytes back; the
    /// bytes still inside the file are used space, never a leak.
    #[allow(clippy::too_many_arguments)]
    pub fn truncated_block(
        &mut self,
        structure: &str,
        offset: u64,
        what: &str,
        (virt_start, virt_end): (u64, u64),
        file_offset: u64,
        length: u64,
        file_len: u64,
    ) {
        let inside = file_len.saturating_sub(file_offset).min(length);
        let lost = length - inside;
        let mut p = Problem::new(
            ProblemKind::Corruption,
            structure,
            offset,
            format!(
                "{what} (virtual {virt_start:#x}..{virt_end:#x}) at file offset \
                 {file_offset:#x}+{length:#x} runs past the end of the file ({file_len:#x} \
                 bytes): the file is truncated, {lost:#x} of its {length:#x} bytes are lost{}",
                if inside > 0 {
                    format!(" ({inside:#x} bytes are still inside the file)")
                } else {
                    String::new()
                }
            ),
        );
        p.length = length;
        p.virtual_range = Some((virt_start, virt_end));
        self.truncated_blocks += 1;
        self.add(p, 0);
    }

    /// Record unused space between used structures (not a leak).
    pub fn unused(&mut self, offset: u64, length: u64) {
        let mut p = Problem::new(
            ProblemKind::Unused,
            "file space",
            offset,
            format!(
                "{length} bytes ({offset:#x}..{:#x}) between used structures are not referenced \
                 by any structure (vdisk compact packs blocks into such space)",
                offset.saturating_add(length)
            ),
        );
        p.length = length;
        self.add(p, 0);
    }

    /// No problem at all.
    pub fn is_clean(&self) -> bool {
        self.corruptions == 0 && self.leaks == 0 && self.check_errors == 0
    }

    /// Whether a repair in `mode` has something to fix.
    pub fn needs_repair(&self, mode: RepairMode) -> bool {
        self.problems.iter().any(|p| p.fixed_by(mode))
    }

    /// The exit status `qemu-img check` would give: 1 when the check could
    /// not be completed, else 2 for corruptions, else 3 for leaks, else 0.
    pub fn exit_code(&self) -> u8 {
        if self.check_errors > 0 {
            1
        } else if self.corruptions > 0 {
            2
        } else if self.leaks > 0 {
            3
        } else {
            0
        }
    }
}

/// What a repair did.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct RepairReport {
    /// Corruptions repaired.
    pub corruptions_fixed: u64,
    /// Leaked clusters reclaimed.
    pub leaks_fixed: u64,
    /// What was done, one line each.
    pub actions: Vec<String>,
}

/// A used range of a file while looking for overlaps and leaks: `[start,
/// end)` and what uses it (`what` indexes the caller's own list).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct Used {
    /// First byte.
    pub start: u64,
    /// One past the last byte.
    pub end: u64,
    /// The caller's identifier of the user.
    pub what: u64,
}

/// What [`sweep`] found.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Sweep {
    /// Pairs `(a, b)` of ranges that overlap: `b` starts inside `a`.
    pub overlaps: Vec<(Used, Used)>,
    /// Ranges `[start, end)` below the last used byte that nothing uses.
    pub gaps: Vec<(u64, u64)>,
    /// One past the last used byte (0 when nothing is used).
    pub end: u64,
}

/// Sort `used` and walk it once: which ranges overlap another, and which
/// bytes between them nobody uses. Empty ranges are ignored. Cost
/// `O(n log n)` in the number of ranges, whatever their sizes.
pub fn sweep(used: &mut [Used]) -> Sweep {
    used.sort_unstable();
    let mut s = Sweep::default();
    let mut cover: Option<Used> = None; // the range reaching furthest so far
    for &u in used.iter().filter(|u| u.end > u.start) {
        match cover {
            None => {
                if u.start > 0 {
                    s.gaps.push((0, u.start));
                }
                cover = Some(u);
            }
            Some(c) => {
                if u.start < c.end {
                    s.overlaps.push((c, u));
                } else if u.start > c.end {
                    s.gaps.push((c.end, u.start));
                }
                if u.end > c.end {
                    cover = Some(u);
                }
            }
        }
    }
    s.end = cover.map_or(0, |c| c.end);
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_and_exit_codes() {
        let mut r = CheckReport::new("a", "vhdx");
        assert!(r.is_clean());
        assert_eq!(r.exit_code(), 0);
        r.leak(0x100000, 0x100000, 1, true);
        assert_eq!((r.leaks, r.leaked_bytes, r.exit_code()), (1, 0x100000, 3));
        assert!(r.needs_repair(RepairMode::Leaks));
        r.corrupt("VHDX BAT", 0x300008, "bad");
        assert_eq!(r.exit_code(), 2);
        assert!(!r.problems[1].fixed_by(RepairMode::All));
        r.check_error("parent", 0, "missing");
        assert_eq!(r.exit_code(), 1);
        assert_eq!(
            r.problems[1].to_string(),
            "VHDX BAT at offset 0x300008: bad"
        );
        for _ in 0..MAX_PROBLEMS {
            r.corrupt("x", 0, "y");
        }
        assert_eq!(r.problems.len(), MAX_PROBLEMS);
        assert_eq!(r.problems_omitted, 3);
        assert_eq!(r.corruptions, MAX_PROBLEMS as u64 + 1);
    }

    #[test]
    fn truncated_block_is_a_corruption_with_its_virtual_range() {
        let mut r = CheckReport::new("a", "vhdx");
        r.truncated_block(
            "VHDX BAT",
            0x300210,
            "block 66",
            (0x8400_0000, 0x8600_0000),
            0xa40_0000,
            0x200_0000,
            0xb53_2b80,
        );
        assert_eq!(
            (r.corruptions, r.truncated_blocks, r.exit_code()),
            (1, 1, 2)
        );
        let p = &r.problems[0];
        assert_eq!(p.virtual_range, Some((0x8400_0000, 0x8600_0000)));
        assert_eq!((p.offset, p.length, p.repair), (0x300210, 0x200_0000, None));
        assert!(
            p.message.contains(
                "block 66 (virtual 0x84000000..0x86000000) at file offset \
                 0xa400000+0x2000000 runs past the end of the file (0xb532b80 bytes)"
            ),
            "{p}"
        );
        assert!(
            p.message
                .contains("0xecd480 of its 0x2000000 bytes are lost"),
            "{p}"
        );
        assert!(
            p.message.contains("0x1132b80 bytes are still inside"),
            "{p}"
        );
        // Wholly past the end: nothing inside.
        r.truncated_block("VHD BAT", 8, "block 2", (0, 1), 0x1000, 0x200, 0x800);
        assert!(!r.problems[1].message.contains("still inside"));
        assert_eq!(r.truncated_blocks, 2);
    }

    #[test]
    fn repair_modes_order() {
        let p =
            Problem::new(ProblemKind::Corruption, "log", 0, "dirty").repairable(RepairMode::All);
        assert!(!p.fixed_by(RepairMode::Leaks));
        assert!(p.fixed_by(RepairMode::All));
        let l = Problem::new(ProblemKind::Leak, "f", 0, "l").repairable(RepairMode::Leaks);
        assert!(l.fixed_by(RepairMode::Leaks) && l.fixed_by(RepairMode::All));
    }

    #[test]
    fn from_error_keeps_structure_and_offset() {
        let e = Error::corrupt("VHD footer", 64, "checksum").in_file("f", 0x1000);
        let p = Problem::from_error(&e, "ignored", 0);
        assert_eq!(p.kind, ProblemKind::Corruption);
        assert_eq!((p.structure.as_str(), p.offset), ("VHD footer", 0x1040));
        let e = Error::unsupported("feature");
        let p = Problem::from_error(&e, "region table", 7);
        assert_eq!(p.kind, ProblemKind::CheckError);
        assert_eq!((p.structure.as_str(), p.offset), ("region table", 7));
    }

    #[test]
    fn sweep_finds_overlaps_and_gaps() {
        let u = |start, end, what| Used { start, end, what };
        let mut v = vec![
            u(10, 20, 1),
            u(0, 5, 0),
            u(15, 30, 2),
            u(40, 50, 3),
            u(45, 46, 4),
        ];
        let s = sweep(&mut v);
        let whats: Vec<(u64, u64)> = s.overlaps.iter().map(|(a, b)| (a.what, b.what)).collect();
        assert_eq!(whats, vec![(1, 2), (3, 4)]);
        assert_eq!(s.overlaps[0].1, u(15, 30, 2));
        assert_eq!(s.gaps, vec![(5, 10), (30, 40)]);
        assert_eq!(s.end, 50);
        let mut v = vec![u(8, 9, 0), u(3, 3, 1)];
        let s = sweep(&mut v);
        assert_eq!((s.gaps, s.end), (vec![(0, 8)], 9));
        assert_eq!(sweep(&mut []).end, 0);
    }
}
