//! Consistency check and repair of a VHDX file (`vdisk check`, shaped like
//! `qemu-img check`), see [`disk::check`] for the report.
//!
//! [`check`] reads every structure itself, trusting none, and keeps going
//! after a problem wherever the rest can still be checked:
//!
//! - the file type identifier (MS-VHDX 2.2.1): without it the file is not a
//!   VHDX and the check fails;
//! - both headers (2.2.2): signature, checksum and fields of each copy,
//!   which one is current (the valid one with the larger SequenceNumber; two
//!   valid copies with the same number must be identical);
//! - the log (2.3): a LogGuid with a valid active sequence (2.3.3) is a log
//!   that was never replayed — the image was not closed cleanly — which is
//!   a corruption until replayed (`-r all`); a FlushedFileOffset beyond the
//!   end of the file means the file was cut after the log was written. The
//!   rest of the check looks at the file as the replayed log makes it;
//! - both region table copies (2.2.3): checksum, entries, the required BAT
//!   and metadata regions, no overlap, the copies identical, every region
//!   inside the file;
//! - the metadata table and the system items (2.6);
//! - the BAT (2.5): every entry's state (2.5.1.1, 2.5.1.2); every present
//!   payload block (FULLY_ or PARTIALLY_PRESENT) and sector bitmap block
//!   lies inside the file (FileOffsetMB makes it 1 MiB-aligned), outside the
//!   header section, the log and every region, and overlaps no other block;
//!   a PARTIALLY_PRESENT block's chunk has a sector bitmap block. A block
//!   that runs past the end of the file is a *truncated* block (the file
//!   was cut short): a corruption naming the block, its virtual range and
//!   file offset; the part of it still inside the file is used space. A
//!   file cut inside the BAT names the entries (and blocks) it lost;
//! - differencing disks (2.6.2.6): the parent is found through the parent
//!   locator (under the parent policy) and its DataWriteGuid is one the
//!   locator's `parent_linkage` or `parent_linkage2` records;
//! - leaks: whole MiBs at the end of the file that no structure uses and
//!   that lie past the last byte any structure references (the slack of a
//!   file whose length is not a multiple of 1 MiB is not a leak: new blocks
//!   go at the next 1 MiB boundary). With a structure running past the end
//!   of the file, or the BAT unread (damaged metadata), nothing is a leak.
//!   Only a leak can be reclaimed (by truncating it); unused space between
//!   structures is listed, not reclaimed.
//!
//! [`repair`] with [`RepairMode::All`] replays a dirty log into the file
//! (the same steps as a writable open: apply, sync, then both headers with
//! an empty LogGuid), rewrites a damaged or inconsistent header pair from
//! the current header, and copies the valid region table over a damaged or
//! different copy; with either mode it truncates a leaked tail, never below
//! the last referenced byte. Damaged BAT entries and truncated blocks are
//! reported, never "repaired" by dropping data: a truncated file keeps its
//! length (as `qemu-img check -r all` leaves it).

use crate::bat::{BatEntry, BatGeometry, PayloadState, SB_BLOCK_PRESENT};
use crate::file_identifier::FileIdentifier;
use crate::header::Header;
use crate::log::{self, LogOp, LOG_SECTOR};
use crate::metadata::{Metadata, PARENT_LOCATOR};
use crate::parent_locator::VHDX_PARENT_LOCATOR_TYPE;
use crate::parent_search::parent_candidates;
use crate::region_table::{RegionTable, BAT_REGION, METADATA_REGION};
use crate::session::write_header_pair;
use crate::{replay, Error, ErrorKind, OpenOptions, Result, Vhdx};
use disk::check::{sweep, CheckReport, Problem, RepairMode, RepairReport, Used};
use disk::parent::{ChainSearch, ParentPolicy};
use disk::{LockMode, ResultExt, Storage};
use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use uuid::Uuid;

const MIB: u64 = 1 << 20;
/// The header section (MS-VHDX 2.2): identifier, headers, region tables.
const HEADER_SECTION: u64 = MIB;
/// Smallest file that holds the header section's structures.
const MIN_FILE: u64 = 5 * 64 * 1024;
/// Largest log read (as the driver).
const MAX_LOG: u64 = 256 * MIB;
/// Largest metadata region read (as the driver).
const MAX_METADATA_REGION: u64 = 64 * MIB;
/// BAT entries read at a time (1 MiB of BAT).
const BAT_CHUNK: u64 = 128 * 1024;
/// `Used::what` of a structure (not a BAT entry): this bit, plus
/// 0 = header section, 1 = log, 2 + i = region table entry i.
const STRUCTURE: u64 = 1 << 63;
/// `Used::what` of a BAT entry whose block is not present but keeps its
/// file space (UNMAPPED or ZERO with a file offset): this bit plus the index.
const RESERVED: u64 = 1 << 62;

pub use disk::check::CheckOptions;

/// Check the VHDX file at `path` (opened read-only; never written).
///
/// # Errors
/// The file cannot be read, or is not a VHDX (no file type identifier).
pub fn check_file(path: impl AsRef<Path>, opts: &CheckOptions) -> Result<CheckReport> {
    let storage = opts.opener.open(path.as_ref(), false, opts.lock)?;
    check(&*storage, opts)
}

/// Check the VHDX on `storage` (read only). A differencing disk's parent is
/// looked for relative to the storage's name, taken as a path.
///
/// # Errors
/// I/O errors, or the storage does not hold a VHDX (no file type
/// identifier); every other problem is in the report.
pub fn check(storage: &dyn Storage, opts: &CheckOptions) -> Result<CheckReport> {
    Ok(examine(storage, opts)?.report)
}

/// Repair the VHDX file at `path` (opened read-write); see [`repair`].
///
/// # Errors
/// As [`repair`], or the file cannot be opened for writing.
pub fn repair_file(
    path: impl AsRef<Path>,
    mode: RepairMode,
    opts: &CheckOptions,
) -> Result<RepairReport> {
    let storage = opts.opener.open(path.as_ref(), true, LockMode::Auto)?;
    repair(&*storage, mode, opts)
}

/// Repair what `mode` allows (see the module docs); check again afterwards
/// to see what remains. Each step leaves a valid file if interrupted: the
/// log is applied before the headers stop naming it, a header copy is
/// rewritten only while the other one is valid, a region table copy only
/// from the other, valid one, and a leaked tail holds nothing.
///
/// # Errors
/// The storage is read-only, is not a VHDX, or I/O errors.
pub fn repair(
    storage: &dyn Storage,
    mode: RepairMode,
    opts: &CheckOptions,
) -> Result<RepairReport> {
    let name = storage.name().to_string();
    if !storage.is_writable() {
        return Err(Error::invalid("cannot repair: the image is open read-only").in_file(&name, 0));
    }
    let mut out = RepairReport::default();
    let mut f = examine(storage, opts)?;
    if mode == RepairMode::All {
        let mut changed = false;
        if f.identifier_fix {
            // One sector-contained write: the creator after it is kept.
            storage.write_at(&crate::file_identifier::SIGNATURE, 0)?;
            storage.flush()?;
            out.corruptions_fixed += 1;
            out.actions
                .push("restored the signature of the file type identifier".to_string());
            changed = true;
        }
        if let Some((slot, mut h)) = f.header.clone() {
            if let Some(r) = f.replay.take() {
                // MS-VHDX 2.3.3: apply the active sequence, make it durable,
                // then record in both headers that the log is empty.
                replay::apply(storage, &r.ops)?;
                if storage.len()? < r.last_file_offset {
                    storage.set_len(r.last_file_offset)?;
                }
                storage.flush()?;
                out.corruptions_fixed += 1;
                out.actions
                    .push(format!("replayed {} log entries into the file", r.entries));
            }
            if !h.log_guid.is_nil() || f.header_fix > 0 {
                h.log_guid = Uuid::nil();
                write_header_pair(storage, &mut h, slot)?;
                out.corruptions_fixed += f.header_fix;
                out.actions
                    .push("rewrote both headers from the current one (empty log)".to_string());
            }
            changed = true;
        }
        if let Some((from, to)) = f.region_fix {
            let mut buf = vec![0u8; RegionTable::SIZE];
            storage.read_at(&mut buf, from)?;
            storage.write_at(&buf, to)?;
            storage.flush()?;
            out.corruptions_fixed += 1;
            out.actions.push(format!(
                "copied the region table at {from:#x} over the copy at {to:#x}"
            ));
            changed = true;
        }
        if changed {
            f = examine(storage, opts)?;
        }
    }
    if let Some((end, clusters)) = f.tail_leak {
        // Never cut a referenced byte, whatever else is wrong.
        if f.referenced_end.is_none_or(|r| r > end) {
            return Err(Error::corrupt(
                "file",
                end,
                "refusing to truncate: the space to cut is referenced",
            )
            .in_file(&name, 0));
        }
        storage.set_len(end)?;
        storage.flush()?;
        out.leaks_fixed += clusters;
        out.actions.push(format!(
            "truncated the file to {end:#x} bytes (its unreferenced tail)"
        ));
    }
    Ok(out)
}

/// A log to replay: its operations in order.
#[derive(Debug, Clone)]
struct Replay {
    ops: Vec<LogOp>,
    last_file_offset: u64,
    entries: usize,
}

/// What [`examine`] found: the report and what a repair would do.
struct Findings {
    report: CheckReport,
    /// The current header and its slot.
    header: Option<(usize, Header)>,
    /// Header problems a rewrite of the pair fixes.
    header_fix: u64,
    /// A dirty log that can be replayed.
    replay: Option<Replay>,
    /// Copy the region table at `.0` over the one at `.1`.
    region_fix: Option<(u64, u64)>,
    /// Truncating to `.0` reclaims `.1` leaked clusters.
    tail_leak: Option<(u64, u64)>,
    /// One past the last referenced byte, when the BAT was read.
    referenced_end: Option<u64>,
    /// The file type identifier's signature is lost (all else is a VHDX).
    identifier_fix: bool,
}

/// The file as the replayed log makes it (reads only).
struct View<'a> {
    inner: &'a dyn Storage,
    inner_len: u64,
    ops: &'a [LogOp],
}

impl View<'_> {
    /// `len` bytes at `offset`; bytes past the end of the file read as
    /// zeros (as the driver reads a short BAT).
    fn read(&self, offset: u64, len: u64) -> Result<Vec<u8>> {
        let n = usize::try_from(len).map_err(|_| Error::invalid("read too large"))?;
        let mut buf = vec![0u8; n];
        let end = offset.saturating_add(len);
        let from_file = end.min(self.inner_len).saturating_sub(offset);
        if from_file > 0 {
            self.inner.read_at(&mut buf[..from_file as usize], offset)?;
        }
        for op in self.ops {
            let (at, n) = match op {
                LogOp::Data { file_offset, .. } => (*file_offset, LOG_SECTOR as u64),
                LogOp::Zero {
                    file_offset,
                    length,
                } => (*file_offset, *length),
            };
            let (s, e) = (offset.max(at), end.min(at.saturating_add(n)));
            if s >= e {
                continue;
            }
            let dst = &mut buf[(s - offset) as usize..(e - offset) as usize];
            match op {
                LogOp::Data { page, .. } => {
                    dst.copy_from_slice(&page[(s - at) as usize..(e - at) as usize]);
                }
                LogOp::Zero { .. } => dst.fill(0),
            }
        }
        Ok(buf)
    }
}

fn read(storage: &dyn Storage, offset: u64, len: u64) -> Result<Vec<u8>> {
    let n = usize::try_from(len).map_err(|_| Error::invalid("read too large"))?;
    let mut buf = vec![0u8; n];
    storage.read_at(&mut buf, offset)?;
    Ok(buf)
}

/// A region's name for messages.
fn region_name(guid: Uuid) -> String {
    match guid {
        BAT_REGION => "BAT region".to_string(),
        METADATA_REGION => "metadata region".to_string(),
        g => format!("region {g}"),
    }
}

fn examine(storage: &dyn Storage, opts: &CheckOptions) -> Result<Findings> {
    let name = storage.name().to_string();
    let file_len = storage.len()?;
    let mut f = Findings {
        report: CheckReport::new(&name, "vhdx"),
        header: None,
        header_fix: 0,
        replay: None,
        region_fix: None,
        tail_leak: None,
        referenced_end: None,
        identifier_fix: false,
    };
    f.report.file_size = file_len;
    if file_len < MIN_FILE {
        return Err(Error::corrupt(
            "VHDX file identifier",
            0,
            format!("file is {file_len} bytes, too short to be a VHDX"),
        )
        .in_file(&name, 0));
    }
    // 2.2.1: without the identifier this is not a VHDX at all, unless a
    // header and a region table are intact: then only the signature was
    // lost (zeroed or overwritten), and -r all writes it back.
    if let Err(e) = FileIdentifier::parse(&read(storage, 0, 520)?).in_file(&name, 0) {
        let header_ok = Header::OFFSETS.iter().any(|&off| {
            read(storage, off, Header::SIZE as u64).is_ok_and(|b| Header::parse(&b).is_ok())
        });
        let regions_ok = RegionTable::OFFSETS.iter().any(|&off| {
            read(storage, off, RegionTable::SIZE as u64)
                .is_ok_and(|b| RegionTable::parse(&b).is_ok())
        });
        if !(header_ok && regions_ok) {
            return Err(e);
        }
        f.report.add(
            Problem::new(
                disk::check::ProblemKind::Corruption,
                "VHDX file identifier",
                0,
                format!(
                    "{}; a header and a region table are intact, so only the signature is lost",
                    e.message()
                ),
            )
            .repairable(RepairMode::All),
            0,
        );
        f.identifier_fix = true;
    }

    // 2.2.2 headers.
    let mut hdrs: Vec<(u64, Vec<u8>, std::result::Result<Header, Error>)> = Vec::new();
    for off in Header::OFFSETS {
        let buf = read(storage, off, Header::SIZE as u64)?;
        let parsed = Header::parse(&buf).in_file(&name, off);
        hdrs.push((off, buf, parsed));
    }
    let current = match (&hdrs[0].2, &hdrs[1].2) {
        (Ok(a), Ok(b)) => {
            if a.sequence_number == b.sequence_number && hdrs[0].1 != hdrs[1].1 {
                f.report.add(
                    Problem::new(
                        disk::check::ProblemKind::Corruption,
                        "VHDX header",
                        Header::OFFSETS[1] + 8,
                        format!(
                            "both headers have SequenceNumber {} but different contents",
                            a.sequence_number
                        ),
                    )
                    .repairable(RepairMode::All),
                    0,
                );
                f.header_fix += 1;
            }
            if b.sequence_number > a.sequence_number {
                (1, b.clone())
            } else {
                (0, a.clone())
            }
        }
        (Ok(h), Err(e)) | (Err(e), Ok(h)) => {
            let (slot, bad) = if hdrs[0].2.is_ok() { (0, 1) } else { (1, 0) };
            f.report.add(
                Problem::from_error(e, "VHDX header", Header::OFFSETS[bad])
                    .repairable(RepairMode::All),
                0,
            );
            f.header_fix += 1;
            (slot, h.clone())
        }
        (Err(e0), Err(e1)) => {
            for (e, off) in [(e0, Header::OFFSETS[0]), (e1, Header::OFFSETS[1])] {
                f.report.add(Problem::from_error(e, "VHDX header", off), 0);
            }
            return Ok(f);
        }
    };
    let (slot, hdr) = current;
    f.header = Some((slot, hdr.clone()));
    let hdr_off = Header::OFFSETS[slot];
    let log_off = hdr.log_offset;
    let log_len = u64::from(hdr.log_length);
    // Header::parse checked that this does not overflow.
    let log_end = log_off.saturating_add(log_len);
    if log_end > file_len {
        f.report.corrupt(
            "VHDX header",
            hdr_off + 72,
            format!(
                "the log region {log_off:#x}+{log_len:#x} extends past the end of the file \
                 ({file_len:#x} bytes)"
            ),
        );
    }

    // 2.3 log: an active sequence is a log that still needs replaying.
    let mut ops: Vec<LogOp> = Vec::new();
    let mut view_len = file_len;
    if !hdr.log_guid.is_nil() {
        if log_len > MAX_LOG {
            f.report.check_error(
                "VHDX log",
                log_off,
                format!("a log of {log_len} bytes is larger than {MAX_LOG}: not checked"),
            );
        } else if log_end <= file_len {
            let log_buf = read(storage, log_off, log_len)?;
            let seq = log::find_active_sequence(&log_buf, hdr.log_guid);
            if let Some((at, head)) = seq.last() {
                let at = log_off + *at as u64;
                let (first, last) = (
                    seq.first().map_or(0, |(_, e)| e.sequence_number),
                    head.sequence_number,
                );
                if head.flushed_file_offset > file_len {
                    f.report.corrupt(
                        "VHDX log entry",
                        at,
                        format!(
                            "FlushedFileOffset {:#x} is beyond the end of the file ({file_len:#x}): \
                             the file was truncated after the log was written, the log cannot be \
                             replayed",
                            head.flushed_file_offset
                        ),
                    );
                } else {
                    let entries = seq.len();
                    f.report.add(
                        Problem::new(
                            disk::check::ProblemKind::Corruption,
                            "VHDX log",
                            at,
                            format!(
                                "dirty log: {entries} entries (sequence numbers {first}..={last}) \
                                 were never replayed into the file (the image was not closed \
                                 cleanly); the log needs replay"
                            ),
                        )
                        .repairable(RepairMode::All),
                        0,
                    );
                    let last_file_offset = head.last_file_offset;
                    view_len = view_len.max(last_file_offset);
                    ops = seq.into_iter().flat_map(|(_, e)| e.ops).collect();
                    f.replay = Some(Replay {
                        ops: ops.clone(),
                        last_file_offset,
                        entries,
                    });
                }
            }
        }
    }
    let view = View {
        inner: storage,
        inner_len: file_len,
        ops: &ops,
    };

    // 2.2.3 region tables: both copies, identical.
    let mut tables: Vec<(u64, Vec<u8>, std::result::Result<RegionTable, Error>)> = Vec::new();
    for off in RegionTable::OFFSETS {
        let buf = view.read(off, RegionTable::SIZE as u64)?;
        let parsed = RegionTable::parse(&buf).in_file(&name, off);
        if let Err(e) = &parsed {
            if e.kind() == ErrorKind::Unsupported {
                f.report
                    .add(Problem::from_error(e, "VHDX region table", off), 0);
                return Ok(f);
            }
        }
        tables.push((off, buf, parsed));
    }
    let (table_off, table) = match (&tables[0].2, &tables[1].2) {
        (Ok(a), Ok(_)) => {
            if tables[0].1 != tables[1].1 {
                f.report.add(
                    Problem::new(
                        disk::check::ProblemKind::Corruption,
                        "VHDX region table",
                        tables[1].0,
                        format!(
                            "the two region table copies (at {:#x} and {:#x}) differ",
                            tables[0].0, tables[1].0
                        ),
                    )
                    .repairable(RepairMode::All),
                    0,
                );
                f.region_fix = Some((tables[0].0, tables[1].0));
            }
            (tables[0].0, a.clone())
        }
        (Ok(t), Err(e)) | (Err(e), Ok(t)) => {
            let (good, bad) = if tables[0].2.is_ok() { (0, 1) } else { (1, 0) };
            f.report.add(
                Problem::from_error(e, "VHDX region table", tables[bad].0)
                    .repairable(RepairMode::All),
                0,
            );
            f.region_fix = Some((tables[good].0, tables[bad].0));
            (tables[good].0, t.clone())
        }
        (Err(e0), Err(e1)) => {
            for (e, off) in [(e0, tables[0].0), (e1, tables[1].0)] {
                f.report
                    .add(Problem::from_error(e, "VHDX region table", off), 0);
            }
            return Ok(f);
        }
    };

    // Every structure's file space, for overlaps and leaks.
    let mut used: Vec<Used> = vec![Used {
        start: 0,
        end: HEADER_SECTION,
        what: STRUCTURE,
    }];
    used.push(Used {
        start: log_off,
        end: log_end.min(view_len),
        what: STRUCTURE | 1,
    });
    // One past the last byte any structure references, inside the file or
    // not: nothing before it is a leak.
    let mut referenced_end = HEADER_SECTION.max(log_end);
    // Region table entry i is at table_off + 16 + 32 i (MS-VHDX 2.2.3.2).
    let entry_at = |i: usize| table_off + 16 + 32 * i as u64;
    let mut regions_ok = true;
    for (i, r) in table.entries.iter().enumerate() {
        // RegionTable::parse validated that the end does not overflow.
        let end = r.end().unwrap_or(u64::MAX);
        if end > view_len {
            f.report.corrupt(
                "VHDX region table",
                entry_at(i) + 16,
                format!(
                    "the {} {:#x}+{:#x} extends past the end of the file ({view_len:#x} bytes)",
                    region_name(r.guid),
                    r.file_offset,
                    r.length
                ),
            );
            if r.guid == METADATA_REGION {
                regions_ok = false;
            }
        }
        used.push(Used {
            start: r.file_offset,
            end: end.min(view_len),
            what: STRUCTURE | (2 + i as u64),
        });
        referenced_end = referenced_end.max(end);
    }
    let describe = |what: u64, start: u64, end: u64, geo: Option<&BatGeometry>| -> String {
        if what & STRUCTURE != 0 {
            match what & !STRUCTURE {
                0 => "the header section (0..0x100000)".to_string(),
                1 => format!("the log ({log_off:#x}+{log_len:#x})"),
                k => match table.entries.get((k - 2) as usize) {
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
    };
    if !regions_ok {
        return Ok(finish(f, used, &describe, None, &table, view_len, None));
    }

    // 2.6 metadata.
    let meta = *table.metadata();
    let meta_len = u64::from(meta.length);
    if meta_len > MAX_METADATA_REGION {
        f.report.check_error(
            "VHDX metadata",
            meta.file_offset,
            format!("a metadata region of {meta_len} bytes is larger than {MAX_METADATA_REGION}: not checked"),
        );
        return Ok(finish(f, used, &describe, None, &table, view_len, None));
    }
    let meta_buf = view.read(meta.file_offset, meta_len)?;
    let (meta_table, md) = match Metadata::parse(&meta_buf).in_file(&name, meta.file_offset) {
        Ok(m) => m,
        Err(e) => {
            f.report.add(
                Problem::from_error(&e, "VHDX metadata", meta.file_offset),
                0,
            );
            return Ok(finish(f, used, &describe, None, &table, view_len, None));
        }
    };
    let fp = md.file_parameters;
    let geo = match BatGeometry::new(
        md.virtual_disk_size,
        fp.block_size,
        md.logical_sector_size,
        fp.has_parent,
    ) {
        Ok(g) => g,
        Err(e) => {
            f.report.corrupt("VHDX metadata", meta.file_offset, e);
            return Ok(finish(f, used, &describe, None, &table, view_len, None));
        }
    };

    // 2.5 BAT.
    let bat = *table.bat();
    let bat_index = table
        .entries
        .iter()
        .position(|r| r.guid == BAT_REGION)
        .unwrap_or(0);
    let total = geo.total_entries();
    let fits = u64::from(bat.length) / BatEntry::SIZE as u64;
    if total > fits {
        f.report.corrupt(
            "VHDX region table",
            entry_at(bat_index) + 24,
            format!(
                "the BAT region is {} bytes but the disk needs {} bytes of BAT",
                bat.length,
                geo.bat_bytes()
            ),
        );
    }
    let n = total.min(fits);
    let block_size = u64::from(fp.block_size);
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
    let max_kept = used.len() as u64 + view_len / MIB + 1;
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
        f.report.corrupt(
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
                let err = err.in_file(&name, bat.file_offset);
                f.report.add(Problem::from_error(&err, "VHDX BAT", at), 0);
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
                            keep(&mut used, u, &mut f.report, at);
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
                    keep(&mut used, u, &mut f.report, at);
                    referenced_end = referenced_end.max(end);
                }
                Some(end) => {
                    // A block that runs past the end of the file: the file
                    // was truncated. What is left of it inside the file is
                    // used (never a leak), and nothing past it is a leak.
                    referenced_end = referenced_end.max(end);
                    if fo < view_len {
                        let u = Used {
                            start: fo,
                            end: view_len,
                            what,
                        };
                        keep(&mut used, u, &mut f.report, at);
                    }
                    f.report.truncated_block(
                        "VHDX BAT",
                        at,
                        &format!("entry {i}: {}", crate::scan::describe(&geo, i)),
                        geo.entry_virtual_range(i),
                        fo,
                        len,
                        view_len,
                    );
                }
                None => f.report.corrupt(
                    "VHDX BAT",
                    at,
                    format!(
                        "entry {i}: {} points past the end of the file: file offset {fo:#x}+{len:#x} \
                         but the file is {view_len:#x} bytes",
                        crate::scan::describe(&geo, i)
                    ),
                ),
            }
        }
        idx += k;
    }
    for (chunk, i) in &partial {
        if !bitmaps.contains(chunk) {
            f.report.corrupt(
                "VHDX BAT",
                bat.file_offset + i * 8,
                format!(
                    "entry {i}: {} is PARTIALLY_PRESENT but its chunk {chunk} has no sector \
                     bitmap block",
                    crate::scan::describe(&geo, *i)
                ),
            );
        }
    }
    f.report.cluster_size = block_size;
    f.report.total_clusters = geo.payload_blocks();
    f.report.allocated_clusters = allocated;
    f.report.fragmented_clusters = fragmented;

    // 2.6.2.6 the parent.
    if fp.has_parent && opts.check_parent {
        let loc_at = meta_table
            .find(PARENT_LOCATOR)
            .map_or(meta.file_offset, |e| meta.file_offset + u64::from(e.offset));
        check_parent(
            &mut f.report,
            &name,
            &md,
            loc_at,
            &opts.parent_policy,
            &OpenOptions {
                lock: opts.lock,
                opener: opts.opener.clone(),
                ..OpenOptions::default()
            },
        );
    }
    Ok(finish(
        f,
        used,
        &describe,
        Some(&geo),
        &table,
        view_len,
        Some(referenced_end),
    ))
}

/// Describes the user of a used range: `(what, start, end, geometry)`.
type Describe<'a> = dyn Fn(u64, u64, u64, Option<&BatGeometry>) -> String + 'a;

/// Overlaps and leaks from the used ranges; fills in the report.
/// `referenced_end` is one past the last byte any structure references
/// (`None` when the BAT could not be read: then nothing is known to be
/// unreferenced, and no space is a leak).
fn finish(
    mut f: Findings,
    mut used: Vec<Used>,
    describe: &Describe<'_>,
    geo: Option<&BatGeometry>,
    table: &RegionTable,
    view_len: u64,
    referenced_end: Option<u64>,
) -> Findings {
    let s = sweep(&mut used);
    let bat_offset = |what: u64| -> Option<u64> {
        (what & STRUCTURE == 0).then(|| {
            let off = table.bat().file_offset;
            off + (what & !RESERVED) * 8
        })
    };
    for (a, b) in &s.overlaps {
        let da = describe(a.what, a.start, a.end, geo);
        let db = describe(b.what, b.start, b.end, geo);
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

/// Find a differencing disk's parent as opening would, and check that it is
/// this disk's parent: its DataWriteGuid is a linkage the locator records
/// (MS-VHDX 2.6.2.6.2), its size and sector size are this disk's.
fn check_parent(
    report: &mut CheckReport,
    name: &str,
    md: &Metadata,
    loc_at: u64,
    policy: &ParentPolicy,
    popts: &OpenOptions,
) {
    const S: &str = "VHDX parent locator";
    let Some(loc) = &md.parent_locator else {
        return; // Metadata::parse requires one with HasParent.
    };
    if loc.locator_type != VHDX_PARENT_LOCATOR_TYPE {
        report.check_error(
            S,
            loc_at,
            format!(
                "parent locator type {} is not the VHDX one: the parent is not checked",
                loc.locator_type
            ),
        );
        return;
    }
    let linkages: Vec<Uuid> = ["parent_linkage", "parent_linkage2"]
        .iter()
        .filter_map(|k| loc.get(k))
        .filter_map(|v| {
            Uuid::parse_str(v.trim().trim_start_matches('{').trim_end_matches('}')).ok()
        })
        .collect();
    if linkages.is_empty() {
        report.corrupt(
            S,
            loc_at,
            "the parent locator has no valid parent_linkage GUID",
        );
        return;
    }
    let child = Path::new(name);
    let mut chain = ChainSearch::new(policy, child);
    if let Err(e) = chain.enter(name, child) {
        report.check_error(S, loc_at, e);
        return;
    }
    let res = chain.resolve(&parent_candidates(child, loc));
    let Some(path) = res.found.clone() else {
        let e = res.not_found_error(
            name,
            "VHDX",
            &format!(
                "parent not found (parent_linkage {})",
                loc.get("parent_linkage").unwrap_or("(none)")
            ),
            "its parent locator names no path",
        );
        report.check_error(S, loc_at, e);
        return;
    };
    let pinfo = match Vhdx::inspect_with(&path, popts) {
        Ok(i) => i,
        Err(e) => {
            report.check_error(
                S,
                loc_at,
                format!("cannot read the parent {}: {e}", path.display()),
            );
            return;
        }
    };
    let dwg = pinfo.header.data_write_guid;
    if !linkages.contains(&dwg) {
        report.corrupt(
            S,
            loc_at,
            format!(
                "the parent {} has DataWriteGuid {}, but the parent locator's parent_linkage is \
                 {}: the parent was changed after this disk was made, or is another disk",
                path.display(),
                crate::linkage_string(dwg),
                loc.get("parent_linkage").unwrap_or("(none)")
            ),
        );
    }
    let pm = &pinfo.metadata;
    if pm.virtual_disk_size != md.virtual_disk_size
        || pm.logical_sector_size != md.logical_sector_size
    {
        report.corrupt(
            S,
            loc_at,
            format!(
                "the parent {} has a virtual size of {} bytes and {}-byte sectors, this disk {} \
                 and {}",
                path.display(),
                pm.virtual_disk_size,
                pm.logical_sector_size,
                md.virtual_disk_size,
                md.logical_sector_size
            ),
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::header::Header;
    use crate::{CreateOptions, OpenOptions};
    use disk::check::ProblemKind;
    use disk::fault::RecordingStorage;
    use disk::{MemStorage, VirtualDisk};
    use std::sync::Arc;

    /// Layout of [`image`]: log at 1 MiB, metadata at 2 MiB, BAT at 3 MiB,
    /// payload from 4 MiB; 1 MiB blocks.
    const BAT: u64 = 3 * MIB;
    const PAYLOAD: u64 = 4 * MIB;

    /// A closed 8 MiB dynamic VHDX with 1 MiB blocks and `blocks` written
    /// (block b holds the byte b + 1), in allocation order.
    fn image(blocks: &[u64]) -> Vec<u8> {
        let st = Arc::new(MemStorage::new("t.vhdx"));
        let mut o = CreateOptions::new(8 * MIB);
        o.block_size = MIB as u32;
        let d = Vhdx::create_on(Box::new(st.clone()), &o).unwrap();
        for &b in blocks {
            d.write_at(&vec![b as u8 + 1; MIB as usize], b * MIB)
                .unwrap();
        }
        d.close().unwrap();
        st.to_vec()
    }

    fn run(bytes: Vec<u8>) -> CheckReport {
        check(
            &MemStorage::from_vec("t.vhdx", bytes),
            &CheckOptions::default(),
        )
        .unwrap()
    }

    fn set_entry(img: &mut [u8], idx: u64, e: BatEntry) {
        let at = (BAT + idx * 8) as usize;
        img[at..at + 8].copy_from_slice(&e.0.to_le_bytes());
    }

    fn only(r: &CheckReport, kind: ProblemKind) -> &Problem {
        let v: Vec<&Problem> = r.problems.iter().filter(|p| p.kind == kind).collect();
        assert_eq!(v.len(), 1, "{:#?}", r.problems);
        v[0]
    }

    #[test]
    fn clean_images_have_no_problem() {
        for blocks in [&[][..], &[0, 3, 7]] {
            let r = run(image(blocks));
            assert!(r.is_clean(), "{:#?}", r.problems);
            assert_eq!(r.exit_code(), 0);
            assert_eq!(r.total_clusters, 8);
            assert_eq!(r.allocated_clusters, blocks.len() as u64);
            assert_eq!(r.cluster_size, MIB);
            assert_eq!(r.image_end_offset, PAYLOAD + blocks.len() as u64 * MIB);
        }
        // Block 3 was written before block 0: not in disk order.
        let r = run(image(&[3, 0]));
        assert_eq!(r.fragmented_clusters, 1);
    }

    #[test]
    fn fixed_image_is_clean() {
        let st = Arc::new(MemStorage::new("f.vhdx"));
        let mut o = CreateOptions::new(4 * MIB);
        o.block_size = MIB as u32;
        o.fixed = true;
        Vhdx::create_on(Box::new(st.clone()), &o)
            .unwrap()
            .close()
            .unwrap();
        let r = run(st.to_vec());
        assert!(r.is_clean(), "{:#?}", r.problems);
        assert_eq!((r.allocated_clusters, r.total_clusters), (4, 4));
    }

    #[test]
    fn bat_entry_past_the_end_of_the_file() {
        let mut img = image(&[0]);
        set_entry(
            &mut img,
            2,
            BatEntry::new(PayloadState::FullyPresent as u8, 64 * MIB),
        );
        let r = run(img);
        assert_eq!(r.exit_code(), 2);
        let p = only(&r, ProblemKind::Corruption);
        assert_eq!((p.structure.as_str(), p.offset), ("VHDX BAT", BAT + 16));
        assert!(p.message.contains("past the end of the file"), "{p}");
        assert!(p.message.contains("0x4000000"), "{p}");
        assert_eq!(p.repair, None);
    }

    #[test]
    fn overlapping_blocks() {
        let mut img = image(&[0, 1]);
        // Block 5 claims block 0's space.
        set_entry(
            &mut img,
            5,
            BatEntry::new(PayloadState::FullyPresent as u8, PAYLOAD),
        );
        let r = run(img);
        assert_eq!(r.exit_code(), 2);
        let p = only(&r, ProblemKind::Corruption);
        assert_eq!(p.offset, BAT + 5 * 8);
        assert!(
            p.message.contains("block 5") && p.message.contains("block 0"),
            "{p}"
        );
    }

    #[test]
    fn block_over_a_structure() {
        let mut img = image(&[0]);
        // Block 1 on the metadata region.
        set_entry(
            &mut img,
            1,
            BatEntry::new(PayloadState::FullyPresent as u8, 2 * MIB),
        );
        let r = run(img.clone());
        let p = only(&r, ProblemKind::Corruption);
        assert_eq!(p.offset, BAT + 8);
        assert!(p.message.contains("metadata region"), "{p}");
        // And on the log.
        set_entry(
            &mut img,
            1,
            BatEntry::new(PayloadState::FullyPresent as u8, MIB),
        );
        let p = run(img).problems.remove(0);
        assert!(p.message.contains("the log"), "{p}");
    }

    #[test]
    fn undefined_state_and_partial_without_parent() {
        let mut img = image(&[]);
        set_entry(&mut img, 1, BatEntry(4));
        set_entry(
            &mut img,
            2,
            BatEntry::new(PayloadState::PartiallyPresent as u8, PAYLOAD),
        );
        let r = run(img);
        assert_eq!(r.corruptions, 2, "{:#?}", r.problems);
        assert_eq!(r.problems[0].offset, BAT + 8);
        assert_eq!(r.problems[1].offset, BAT + 16);
    }

    #[test]
    fn leaks_at_the_end_and_unused_space_between_blocks() {
        let mut img = image(&[0, 1, 2]);
        // 1 MiB past the end, plus 100 bytes of slack that is no leak.
        img.extend(vec![7u8; MIB as usize + 100]);
        let r = run(img.clone());
        assert_eq!(r.exit_code(), 3);
        let p = only(&r, ProblemKind::Leak);
        assert_eq!((p.offset, p.length), (PAYLOAD + 3 * MIB, MIB));
        assert_eq!(p.repair, Some(RepairMode::Leaks));
        assert_eq!(r.leaks, 1);
        assert_eq!(r.image_end_offset, PAYLOAD + 3 * MIB);
        // Unmapping block 1 (without LeaveBlocksAllocated) leaves a hole.
        set_entry(
            &mut img,
            1,
            BatEntry::new(PayloadState::NotPresent as u8, 0),
        );
        // That is unused space, not a leak: the tail is the one leak.
        let r = run(img.clone());
        assert_eq!((r.leaks, r.unused_bytes), (1, MIB));
        assert_eq!(r.problems[0].kind, ProblemKind::Unused);
        assert_eq!(r.problems[0].offset, PAYLOAD + MIB);
        assert_eq!(r.problems[0].repair, None);
        // -r leaks truncates the tail only.
        let st = MemStorage::from_vec("t.vhdx", img);
        let fix = repair(&st, RepairMode::Leaks, &CheckOptions::default()).unwrap();
        assert_eq!(fix.leaks_fixed, 1);
        assert_eq!(st.len().unwrap(), PAYLOAD + 3 * MIB);
        let r = check(&st, &CheckOptions::default()).unwrap();
        assert_eq!((r.exit_code(), r.leaks, r.unused_bytes), (0, 0, MIB));
    }

    #[test]
    fn damaged_header_and_region_table_copies_are_repaired() {
        let mut img = image(&[0]);
        img[Header::OFFSETS[1] as usize + 100] ^= 1;
        img[RegionTable::OFFSETS[0] as usize + 40] ^= 1;
        let r = run(img.clone());
        assert_eq!(r.corruptions, 2, "{:#?}", r.problems);
        assert_eq!(r.problems[0].offset, Header::OFFSETS[1] + 4);
        assert_eq!(r.problems[1].offset, RegionTable::OFFSETS[0] + 4);
        assert!(r.problems.iter().all(|p| p.repair == Some(RepairMode::All)));
        let st = Arc::new(MemStorage::from_vec("t.vhdx", img));
        let fix = repair(&*st, RepairMode::Leaks, &CheckOptions::default()).unwrap();
        assert_eq!(fix.corruptions_fixed, 0);
        let fix = repair(&*st, RepairMode::All, &CheckOptions::default()).unwrap();
        assert_eq!(fix.corruptions_fixed, 2, "{fix:?}");
        assert!(check(&*st, &CheckOptions::default()).unwrap().is_clean());
        let d = Vhdx::open_storage(Box::new(st), &OpenOptions::default()).unwrap();
        let mut b = vec![0u8; 512];
        d.read_at(&mut b, 0).unwrap();
        assert_eq!(b, vec![1u8; 512]);
    }

    #[test]
    fn both_headers_bad_is_unrepairable() {
        let mut img = image(&[]);
        img[Header::OFFSETS[0] as usize] = b'x';
        img[Header::OFFSETS[1] as usize] = b'x';
        let r = run(img);
        assert_eq!(r.corruptions, 2);
        assert!(!r.needs_repair(RepairMode::All));
    }

    #[test]
    fn overlapping_regions_and_past_eof() {
        let mut img = image(&[]);
        let mut t = RegionTable::parse(&img[0x30000..0x40000]).unwrap();
        t.entries[0].file_offset = 64 * MIB; // the BAT, far past the end
        let b = t.to_bytes();
        img[0x30000..0x40000].copy_from_slice(&b);
        img[0x40000..0x50000].copy_from_slice(&b);
        let r = run(img);
        assert!(r.corruptions >= 1);
        assert_eq!(r.problems[0].offset, 0x30000 + 16 + 16);
        assert!(
            r.problems[0].message.contains("past the end"),
            "{:?}",
            r.problems
        );
    }

    #[test]
    fn not_a_vhdx_is_an_error() {
        let e = check(
            &MemStorage::from_vec("x", vec![0u8; 1 << 20]),
            &CheckOptions::default(),
        )
        .unwrap_err();
        assert_eq!(e.kind(), ErrorKind::Corrupt);
        assert!(check(
            &MemStorage::from_vec("x", vec![0u8; 10]),
            &CheckOptions::default()
        )
        .is_err());
    }

    #[test]
    fn garbage_never_panics() {
        let base = image(&[0, 2]);
        let mut x = 0x1234_5678u64;
        for round in 0..300 {
            let mut img = base.clone();
            for _ in 0..(1 + round % 8) {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                // Hit the structures more often than the payload.
                let at = if x.is_multiple_of(3) {
                    x % img.len() as u64
                } else {
                    x % (4 * MIB)
                };
                img[at as usize] = (x >> 32) as u8;
            }
            if round % 50 == 0 {
                img.truncate((x % img.len() as u64) as usize);
            }
            let st = MemStorage::from_vec("g.vhdx", img);
            if let Ok(r) = check(&st, &CheckOptions::default()) {
                let _ = repair(&st, RepairMode::All, &CheckOptions::default());
                let _ = r.exit_code();
            }
        }
    }

    /// A 16 MiB image whose last flush left its log entry unapplied: the
    /// log is dirty and the BAT on disk does not yet know the block.
    fn dirty_log_image() -> Vec<u8> {
        let base = image(&[]);
        let rec = Arc::new(RecordingStorage::new("rec", base));
        let d = Vhdx::open_storage(
            Box::new(rec.clone()),
            &OpenOptions {
                writable: true,
                ..OpenOptions::default()
            },
        )
        .unwrap();
        d.write_at(&[0xAB; 4096], 5 * MIB).unwrap();
        d.flush().unwrap();
        std::mem::forget(d);
        // The flush: sync, log write, sync, BAT write, sync. Cut right
        // after the log entry's sync: the BAT page never reached the file.
        let flushes = rec.flush_points();
        let cut = flushes[flushes.len() - 2] + 1;
        rec.crash_image(cut, |_| true)
    }

    #[test]
    fn dirty_log_is_a_corruption_until_replayed() {
        let img = dirty_log_image();
        let r = run(img.clone());
        assert_eq!(r.exit_code(), 2, "{:#?}", r.problems);
        let p = only(&r, ProblemKind::Corruption);
        assert_eq!(p.structure, "VHDX log");
        assert_eq!(p.offset, MIB);
        assert!(p.message.contains("needs replay"), "{p}");
        assert_eq!(p.repair, Some(RepairMode::All));
        // The check sees the block the log allocates: no leak, one block.
        assert_eq!(r.allocated_clusters, 1);
        assert_eq!(r.leaks, 0);
        let st = Arc::new(MemStorage::from_vec("t.vhdx", img));
        let fix = repair(&*st, RepairMode::All, &CheckOptions::default()).unwrap();
        assert_eq!(fix.corruptions_fixed, 1, "{fix:?}");
        let r = check(&*st, &CheckOptions::default()).unwrap();
        assert!(r.is_clean(), "{:#?}", r.problems);
        let d = Vhdx::open_storage(Box::new(st), &OpenOptions::default()).unwrap();
        assert!(!d.info().log_replayed);
        let mut b = [0u8; 4096];
        d.read_at(&mut b, 5 * MIB).unwrap();
        assert_eq!(b, [0xAB; 4096]);
    }

    #[test]
    fn differencing_parent_linkage() {
        let dir = tempfile::tempdir().unwrap();
        let base = dir.path().join("base.vhdx");
        let child = dir.path().join("child.avhdx");
        let mut o = CreateOptions::new(8 * MIB);
        o.block_size = MIB as u32;
        let p = Vhdx::create(&base, &o, false).unwrap();
        p.write_at(&[1; 4096], 0).unwrap();
        p.close().unwrap();
        let c =
            Vhdx::create_differencing(&child, &base, &o, &OpenOptions::default(), false).unwrap();
        c.write_at(&[2; 512], MIB + 512).unwrap();
        c.close().unwrap();
        let r = check_file(&child, &CheckOptions::default()).unwrap();
        assert!(r.is_clean(), "{:#?}", r.problems);
        assert_eq!(r.allocated_clusters, 1);
        // Writing to the parent changes its DataWriteGuid: the link breaks.
        let p = Vhdx::open(
            &base,
            &OpenOptions {
                writable: true,
                ..OpenOptions::default()
            },
        )
        .unwrap();
        p.write_at(&[3; 512], 0).unwrap();
        p.close().unwrap();
        let r = check_file(&child, &CheckOptions::default()).unwrap();
        assert_eq!(r.exit_code(), 2);
        let p = only(&r, ProblemKind::Corruption);
        assert_eq!(p.structure, "VHDX parent locator");
        assert!(p.message.contains("DataWriteGuid"), "{p}");
        // A missing parent: the check cannot be completed.
        std::fs::remove_file(&base).unwrap();
        let r = check_file(&child, &CheckOptions::default()).unwrap();
        assert_eq!(r.exit_code(), 1);
        assert!(only(&r, ProblemKind::CheckError)
            .message
            .contains("missing"));
        // Without the parent check, the file itself is fine.
        let opts = CheckOptions {
            check_parent: false,
            ..CheckOptions::default()
        };
        assert!(check_file(&child, &opts).unwrap().is_clean());
    }

    #[test]
    fn partially_present_block_without_bitmap() {
        let dir = tempfile::tempdir().unwrap();
        let base = dir.path().join("base.vhdx");
        let child = dir.path().join("child.avhdx");
        let mut o = CreateOptions::new(8 * MIB);
        o.block_size = MIB as u32;
        Vhdx::create(&base, &o, false).unwrap().close().unwrap();
        let c =
            Vhdx::create_differencing(&child, &base, &o, &OpenOptions::default(), false).unwrap();
        c.write_at(&[2; 512], 512).unwrap();
        c.close().unwrap();
        let mut img = std::fs::read(&child).unwrap();
        let t = RegionTable::parse(&img[0x30000..0x40000]).unwrap();
        let bat = t.bat().file_offset as usize;
        let info = Vhdx::inspect(&child).unwrap();
        let geo = BatGeometry::new(8 * MIB, MIB as u32, 512, true).unwrap();
        let _ = info;
        let sb = geo.bitmap_index(0) as usize;
        let e = u64::from_le_bytes(img[bat + sb * 8..bat + sb * 8 + 8].try_into().unwrap());
        assert_eq!(BatEntry(e).state(), SB_BLOCK_PRESENT);
        let bitmap_at = BatEntry(e).file_offset();
        img[bat + sb * 8..bat + sb * 8 + 8].fill(0);
        std::fs::write(&child, &img).unwrap();
        let r = check_file(&child, &CheckOptions::default()).unwrap();
        assert_eq!(r.corruptions, 1, "{:#?}", r.problems);
        assert_eq!(r.problems[0].offset, t.bat().file_offset);
        assert!(r.problems[0].message.contains("no sector bitmap"));
        // The bitmap block's space is now unreferenced.
        assert!(r.problems.iter().any(|p| matches!(
            p.kind,
            ProblemKind::Leak | ProblemKind::Unused
        ) && p.offset == bitmap_at));
    }

    #[test]
    fn many_entries_on_the_same_block_stay_bounded() {
        let st = Arc::new(MemStorage::new("m.vhdx"));
        let mut o = CreateOptions::new(1 << 30);
        o.block_size = MIB as u32;
        let d = Vhdx::create_on(Box::new(st.clone()), &o).unwrap();
        d.write_at(&[1; 512], 0).unwrap();
        d.close().unwrap();
        let mut img = st.to_vec();
        let e = BatEntry::new(PayloadState::FullyPresent as u8, PAYLOAD);
        for i in 1..1024 {
            set_entry(&mut img, i, e);
        }
        let r = run(img);
        assert!(r.corruptions > 1 && r.corruptions < 20, "{}", r.corruptions);
        assert!(r
            .problems
            .iter()
            .any(|p| p.message.contains("side by side")));
    }

    #[test]
    fn corpus_images() {
        let Some(dir) = disk::testing::corpus("vhdx") else {
            return;
        };
        let tmp = tempfile::tempdir().unwrap();
        let mut files: Vec<_> = std::fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().path())
            .collect();
        files.sort();
        for src in files {
            let img = disk::testing::decompress(&src, tmp.path());
            let name = src.file_name().unwrap().to_string_lossy().into_owned();
            let r = check_file(&img, &CheckOptions::default()).unwrap();
            eprintln!("{name}: exit {} {:?}", r.exit_code(), r.problems);
            if name.contains("orphan") {
                assert_eq!(r.exit_code(), 1, "{name}");
                let opts = CheckOptions {
                    check_parent: false,
                    ..CheckOptions::default()
                };
                let r = check_file(&img, &opts).unwrap();
                assert!(r.is_clean(), "{name}: {:#?}", r.problems);
            } else if name.contains("dirtylog") || name.contains("log-replay") {
                assert_eq!(r.exit_code(), 2, "{name}");
                assert_eq!(r.problems[0].structure, "VHDX log", "{name}");
                let before = {
                    let d = Vhdx::open(&img, &OpenOptions::default()).unwrap();
                    content_hash(&d)
                };
                repair_file(&img, RepairMode::All, &CheckOptions::default()).unwrap();
                // QEMU 1.6 left unreferenced blocks between used ones in
                // the iotest image (qemu-img check does not look for VHDX
                // leaks): unused space, which only a compaction reclaims.
                let r = check_file(&img, &CheckOptions::default()).unwrap();
                assert_eq!(
                    r.corruptions + r.check_errors,
                    0,
                    "{name}: {:#?}",
                    r.problems
                );
                assert_eq!(r.leaks, 0, "{name}");
                let d = Vhdx::open(&img, &OpenOptions::default()).unwrap();
                assert!(!d.info().log_replayed);
                assert_eq!(content_hash(&d), before, "{name}");
            } else {
                assert!(r.is_clean(), "{name}: {:#?}", r.problems);
                assert_eq!(r.image_end_offset, r.file_size / MIB * MIB, "{name}");
            }
            std::fs::remove_file(&img).unwrap();
        }
    }

    /// A hash of the virtual contents (data extents only; zeros elsewhere).
    fn content_hash(d: &dyn VirtualDisk) -> u64 {
        use std::hash::{Hash, Hasher};
        let mut h = std::collections::hash_map::DefaultHasher::new();
        let size = d.virtual_size();
        let mut pos = 0;
        let mut buf = vec![0u8; MIB as usize];
        while pos < size {
            let e = d.map(pos, size - pos).unwrap();
            let len = e.len.min(MIB);
            if let disk::Mapping::Data(_) = e.mapping {
                d.read_at(&mut buf[..len as usize], pos).unwrap();
                if buf[..len as usize].iter().any(|&b| b != 0) {
                    pos.hash(&mut h);
                    buf[..len as usize].hash(&mut h);
                }
            }
            pos += len;
        }
        h.finish()
    }
}
