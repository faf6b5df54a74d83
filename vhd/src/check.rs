//! Consistency check and repair of a VHD file (`vdisk check`, shaped like
//! `qemu-img check`, which has no check for this format), see
//! [`disk::check`] for the report.
//!
//! [`check`] reads every structure itself, trusting none (references are to
//! the Virtual Hard Disk Image Format Specification, 2006):
//!
//! - the footer ("Hard Disk Footer Format"): cookie, checksum, version,
//!   disk type and data offset; for dynamic and differencing disks also the
//!   copy at offset 0, which must be identical. Either copy damaged, or the
//!   two different, is a corruption that `-r all` repairs from the other
//!   copy (the footer at the end wins when both are valid);
//! - fixed disks: the data before the footer holds the disk size; bytes
//!   between the data and the footer are leaked;
//! - the dynamic disk header ("Dynamic Disk Header Format"): cookie,
//!   checksum, version, block size, a table large enough for the disk and
//!   inside the file, parent locator data inside the file;
//! - the BAT ("Block Allocation Table and Data Blocks"): every allocated
//!   block (its sector bitmap and data, sector-aligned by the entry's unit)
//!   lies inside the file before the footer, and overlaps neither the
//!   footer copy, the header, the BAT, the locators' data nor another block;
//! - differencing disks: the parent is found through the locators (under the
//!   parent policy), and its footer's unique id is the Parent Unique Id the
//!   header records;
//! - truncation: a file cut short has lost its footer (the copy at offset 0
//!   remains); every block that runs past the end of such a file is a
//!   corruption naming the block, its virtual range and file offset, and
//!   what is left of it is used space. The footer is then not restored
//!   (over the surviving part of a block it would destroy data, after it
//!   the block would run over it): the file keeps its length;
//! - leaks: unreferenced space big enough for a whole block (sector bitmap
//!   and data) — smaller gaps are the alignment padding Windows leaves
//!   between blocks. A leak just before the footer, past the last byte any
//!   block references, is reclaimed by moving the footer down and
//!   truncating; with the BAT unread, nothing is a leak.

use crate::bat::{self, SECTOR, UNALLOCATED};
use crate::dynamic_header::{DynamicHeader, HEADER_SIZE, LOCATOR_SIZE, LOCATOR_TABLE_OFFSET};
use crate::footer::{fourcc, DiskType, Footer, COOKIE, FOOTER_SIZE, OLD_FOOTER_SIZE};
use crate::image::{parent_candidates, read_locators};
use crate::{Error, OpenOptions, Result, Vhd};
use disk::check::{sweep, CheckReport, Problem, ProblemKind, RepairMode, RepairReport, Used};
use disk::parent::{ChainSearch, ParentPolicy};
use disk::{LockMode, ResultExt, Storage};
use std::path::Path;

/// `Used::what` of a structure (not a BAT entry): this bit plus
/// 0 = footer copy, 1 = dynamic disk header, 2 = BAT, 3 + i = locator i.
const STRUCTURE: u64 = 1 << 63;

pub use disk::check::CheckOptions;

/// Check the VHD file at `path` (opened read-only; never written).
///
/// # Errors
/// The file cannot be read, or is not a VHD (no footer cookie at all).
pub fn check_file(path: impl AsRef<Path>, opts: &CheckOptions) -> Result<CheckReport> {
    let storage = opts.opener.open(path.as_ref(), false, opts.lock)?;
    check(&*storage, opts)
}

/// Check the VHD on `storage` (read only). A differencing disk's parent is
/// looked for relative to the storage's name, taken as a path.
///
/// # Errors
/// I/O errors, or the storage does not hold a VHD (no footer cookie at the
/// end nor at offset 0); every other problem is in the report.
pub fn check(storage: &dyn Storage, opts: &CheckOptions) -> Result<CheckReport> {
    Ok(examine(storage, opts)?.report)
}

/// Repair the VHD file at `path` (opened read-write); see [`repair`].
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

/// Repair what `mode` allows; check again afterwards to see what remains.
///
/// [`RepairMode::All`] restores a damaged footer from its copy at offset 0
/// (written where the footer belongs: after the last structure, or over
/// the damaged one), or the copy at offset 0 from the footer. Both modes
/// reclaim a leak just before the footer: the footer is first written
/// again right after the last used structure (in the leaked space, synced),
/// then the file is cut after it; interrupted, the file still ends with
/// its old footer.
///
/// # Errors
/// The storage is read-only or is not a VHD, or I/O errors.
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
        if let Some(bytes) = f.footer_bytes {
            let mut changed = false;
            if let Some(at) = f.restore_tail {
                storage.write_at(&bytes, at)?;
                storage.flush()?;
                out.corruptions_fixed += 1;
                out.actions.push(format!("restored the footer at {at:#x}"));
                changed = true;
            }
            if f.restore_head {
                storage.write_at(&bytes, 0)?;
                storage.flush()?;
                out.corruptions_fixed += 1;
                out.actions
                    .push("restored the footer copy at offset 0 from the footer".to_string());
                changed = true;
            }
            if changed {
                f = examine(storage, opts)?;
            }
        }
    }
    if let (Some((at, clusters)), Some(bytes)) = (f.tail_leak, f.footer_bytes) {
        storage.write_at(&bytes, at)?;
        storage.flush()?;
        storage.set_len(at + FOOTER_SIZE as u64)?;
        storage.flush()?;
        out.leaks_fixed += clusters;
        out.actions.push(format!(
            "moved the footer to {at:#x} and truncated the unreferenced space before it"
        ));
    }
    Ok(out)
}

/// What [`examine`] found: the report and what a repair would do.
struct Findings {
    report: CheckReport,
    /// The valid footer in use (an old 511-byte one padded to 512).
    footer_bytes: Option<[u8; FOOTER_SIZE]>,
    /// Write the footer here: the one at the end is damaged.
    restore_tail: Option<u64>,
    /// Write the footer at offset 0: the copy there is damaged or differs.
    restore_head: bool,
    /// Writing the footer at `.0` (and cutting the file after it) reclaims
    /// `.1` leaked clusters.
    tail_leak: Option<(u64, u64)>,
}

/// The last 512 bytes of a file, `tail`, with the footer cookie put back,
/// when that makes a valid footer (checksum included): a footer that lost
/// only its cookie.
fn cookie_lost(tail: &[u8]) -> Option<[u8; FOOTER_SIZE]> {
    let mut b: [u8; FOOTER_SIZE] = tail.try_into().ok()?;
    if b[..COOKIE.len()] == COOKIE[..] {
        return None;
    }
    b[..COOKIE.len()].copy_from_slice(&COOKIE[..]);
    Footer::parse(&b).ok().map(|_| b)
}

fn read(storage: &dyn Storage, offset: u64, len: u64) -> Result<Vec<u8>> {
    let n = usize::try_from(len).map_err(|_| Error::invalid("read too large"))?;
    let mut buf = vec![0u8; n];
    storage.read_at(&mut buf, offset)?;
    Ok(buf)
}

fn examine(storage: &dyn Storage, opts: &CheckOptions) -> Result<Findings> {
    let name = storage.name().to_string();
    let file_len = storage.len()?;
    let mut f = Findings {
        report: CheckReport::new(&name, "vhd"),
        footer_bytes: None,
        restore_tail: None,
        restore_head: false,
        tail_leak: None,
    };
    f.report.file_size = file_len;
    if file_len < OLD_FOOTER_SIZE as u64 {
        return Err(Error::corrupt(
            "VHD footer",
            0,
            format!("file is {file_len} bytes, too short to hold a VHD footer"),
        )
        .in_file(&name, 0));
    }
    // The footer at the end: 512 bytes, or 511 in images made before
    // Virtual PC 2004.
    let tail_len = file_len.min(FOOTER_SIZE as u64);
    let tail_off = file_len - tail_len;
    let tail = read(storage, tail_off, tail_len)?;
    let tail_parsed = match Footer::parse(&tail).in_file(&name, tail_off) {
        Ok(ft) if tail.len() == FOOTER_SIZE => Ok((ft, tail_off, FOOTER_SIZE)),
        first => {
            let old = &tail[tail.len() - OLD_FOOTER_SIZE..];
            match Footer::parse(old) {
                Ok(ft) => Ok((ft, file_len - OLD_FOOTER_SIZE as u64, OLD_FOOTER_SIZE)),
                Err(_) => Err(first.err().unwrap_or_else(|| {
                    Error::corrupt("VHD footer", 0, "no valid footer at the end of the file")
                        .in_file(&name, tail_off)
                })),
            }
        }
    };
    // The copy at offset 0 (dynamic and differencing disks).
    let head = if file_len >= 2 * FOOTER_SIZE as u64 {
        Some(read(storage, 0, FOOTER_SIZE as u64)?)
    } else {
        None
    };
    let head_parsed = head.as_ref().map(|h| Footer::parse(h).in_file(&name, 0));
    let padded = |b: &[u8]| {
        let mut out = [0u8; FOOTER_SIZE];
        out[..b.len()].copy_from_slice(b);
        out
    };
    // (footer, its offset and size when it is the one at the end)
    let (footer, at_end) = match (tail_parsed, &head_parsed) {
        (Ok((ft, off, size)), _) => {
            let bytes = padded(&tail[tail.len() - size..]);
            f.footer_bytes = Some(bytes);
            if ft.disk_type != DiskType::Fixed {
                let problem = match (&head_parsed, &head) {
                    (Some(Ok(_)), Some(h)) if h[..size] == bytes[..size] => None,
                    (Some(Ok(_)), _) => Some(Problem::new(
                        ProblemKind::Corruption,
                        "VHD footer",
                        0,
                        format!("the footer copy at offset 0 differs from the footer at {off:#x}"),
                    )),
                    (Some(Err(e)), _) => {
                        let mut p = Problem::from_error(e, "VHD footer", 0);
                        p.message =
                            format!("the footer copy at offset 0 is damaged: {}", p.message);
                        Some(p)
                    }
                    (None, _) => Some(Problem::new(
                        ProblemKind::Corruption,
                        "VHD footer",
                        0,
                        "the file is too short to hold the footer copy at offset 0",
                    )),
                };
                if let Some(p) = problem {
                    let fixable = head.is_some();
                    f.report.add(
                        if fixable {
                            p.repairable(RepairMode::All)
                        } else {
                            p
                        },
                        0,
                    );
                    f.restore_head = fixable;
                }
            }
            (ft, Some((off, size as u64)))
        }
        (Err(te), Some(Ok(hf))) if hf.disk_type != DiskType::Fixed => {
            let mut p = Problem::from_error(&te, "VHD footer", tail_off);
            p.message = format!(
                "the footer at the end of the file is damaged ({}); its copy at offset 0 is intact",
                p.message
            );
            f.report.add(p.repairable(RepairMode::All), 0);
            if let Some(h) = &head {
                f.footer_bytes = Some(padded(h));
            }
            // Where the footer goes back is decided once every structure
            // is known (below): never over a referenced byte.
            (hf.clone(), None)
        }
        (Err(te), _) if cookie_lost(&tail).is_some() => {
            // Only the cookie was lost (zeroed or overwritten), at the end
            // and at offset 0: with "conectix" back, the footer at the end
            // checks (its checksum covers the cookie), so -r all writes it
            // back there and, for a dynamic disk, over the copy at 0.
            let bytes = cookie_lost(&tail).unwrap_or([0; FOOTER_SIZE]);
            let ft = Footer::parse(&bytes).in_file(&name, tail_off)?;
            f.report.add(
                Problem::new(
                    ProblemKind::Corruption,
                    "VHD footer",
                    tail_off,
                    format!(
                        "{}; with the cookie \"conectix\" restored the footer is valid (its \
                         checksum matches), so only the cookie is lost",
                        te.message()
                    ),
                )
                .repairable(RepairMode::All),
                0,
            );
            f.footer_bytes = Some(bytes);
            f.restore_head = ft.disk_type != DiskType::Fixed && head.is_some();
            if f.restore_head {
                f.report.add(
                    Problem::new(
                        ProblemKind::Corruption,
                        "VHD footer",
                        0,
                        "the footer copy at offset 0 is damaged too",
                    )
                    .repairable(RepairMode::All),
                    0,
                );
            }
            (ft, None)
        }
        (Err(te), _) => {
            let cookie_at = |b: &[u8], at: usize| b.get(at..at + COOKIE.len()) == Some(&COOKIE[..]);
            let any_cookie = cookie_at(&tail, tail.len().saturating_sub(FOOTER_SIZE))
                || cookie_at(&tail, tail.len() - OLD_FOOTER_SIZE)
                || head.as_ref().is_some_and(|h| cookie_at(h, 0));
            if !any_cookie {
                return Err(te); // not a VHD at all
            }
            f.report
                .add(Problem::from_error(&te, "VHD footer", tail_off), 0);
            return Ok(f);
        }
    };
    let size = footer.disk_size();
    let footer_size = at_end.map_or(FOOTER_SIZE as u64, |(_, s)| s);

    if footer.disk_type == DiskType::Fixed {
        // A fixed disk always has its footer at the end (or it would not
        // have been taken for one).
        let (off, _) = at_end.unwrap_or((tail_off, footer_size));
        f.report.cluster_size = SECTOR;
        f.report.total_clusters = size.div_ceil(SECTOR);
        f.report.allocated_clusters = f.report.total_clusters;
        if size > off {
            f.report.corrupt(
                "VHD footer",
                off + 48,
                format!("the disk size {size} exceeds the {off} bytes of data before the footer"),
            );
        } else if size < off {
            let len = off - size;
            let clusters = len.div_ceil(SECTOR);
            f.report.leak(size, len, clusters, true);
            f.tail_leak = Some((size, clusters));
        }
        f.report.image_end_offset = size.min(off) + footer_size;
        return Ok(f);
    }

    // Dynamic and differencing disks. The data area ends at the footer (or
    // at the end of the file when the footer there is damaged).
    let data_limit = at_end.map_or(file_len, |(off, _)| off);
    let footer_field = |field: u64| at_end.map_or(field, |(off, _)| off + field);
    let hdr_off = footer.data_offset;
    if hdr_off < FOOTER_SIZE as u64
        || hdr_off
            .checked_add(HEADER_SIZE as u64)
            .is_none_or(|e| e > data_limit)
    {
        f.report.corrupt(
            "VHD footer",
            footer_field(16),
            format!(
                "data offset {hdr_off:#x}: the dynamic disk header would lie outside the \
                 {data_limit:#x} bytes before the footer"
            ),
        );
        return Ok(f);
    }
    let hbuf = read(storage, hdr_off, HEADER_SIZE as u64)?;
    let header = match DynamicHeader::parse(&hbuf).in_file(&name, hdr_off) {
        Ok(h) => h,
        Err(e) => {
            f.report.add(
                Problem::from_error(&e, "VHD dynamic disk header", hdr_off),
                0,
            );
            return Ok(f);
        }
    };
    const H: &str = "VHD dynamic disk header";
    let bs = u64::from(header.block_size);
    let bitmap = bat::bitmap_size(header.block_size);
    let slot = bitmap + bs;
    let needed = size.div_ceil(bs);
    let entries = u64::from(header.max_table_entries);
    if entries < needed {
        f.report.corrupt(
            H,
            hdr_off + 28,
            format!(
                "max table entries {entries} is too small: a {size}-byte disk with {bs}-byte \
                 blocks needs {needed}"
            ),
        );
    }
    let table_off = header.table_offset;
    let table_bytes = entries * 4;
    let table_end = table_off.saturating_add(table_bytes.div_ceil(SECTOR) * SECTOR);
    let mut n = needed.min(entries);
    let mut table_unread = false;
    if table_off < FOOTER_SIZE as u64 || table_off.saturating_add(table_bytes) > data_limit {
        f.report.corrupt(
            H,
            hdr_off + 16,
            format!(
                "the BAT at table offset {table_off:#x} ({entries} entries, {table_bytes} bytes) \
                 does not fit between the footer copy and the {data_limit:#x} bytes before the \
                 footer"
            ),
        );
        n = if table_off < FOOTER_SIZE as u64 {
            0
        } else {
            n.min(data_limit.saturating_sub(table_off) / 4)
        };
        // Blocks whose entries are not read may lie anywhere.
        table_unread = true;
    }
    let mut used = vec![
        Used {
            start: 0,
            end: FOOTER_SIZE as u64,
            what: STRUCTURE,
        },
        Used {
            start: hdr_off,
            end: hdr_off + HEADER_SIZE as u64,
            what: STRUCTURE | 1,
        },
        Used {
            start: table_off,
            end: table_end.min(data_limit),
            what: STRUCTURE | 2,
        },
    ];
    for (i, l) in header.locators() {
        let len = l
            .data_space_bytes()
            .max(u64::from(l.data_length))
            .div_ceil(SECTOR)
            * SECTOR;
        let entry_at = hdr_off + (LOCATOR_TABLE_OFFSET + i * LOCATOR_SIZE) as u64;
        match l.data_offset.checked_add(len) {
            Some(end) if l.data_offset >= FOOTER_SIZE as u64 && end <= data_limit => {
                used.push(Used {
                    start: l.data_offset,
                    end,
                    what: STRUCTURE | (3 + i as u64),
                })
            }
            _ => f.report.corrupt(
                H,
                entry_at + 16,
                format!(
                    "parent locator {i} ({}): its data {:#x}+{len:#x} lies outside the \
                     {data_limit:#x} bytes before the footer",
                    fourcc(&l.platform_code),
                    l.data_offset
                ),
            ),
        }
    }

    // The BAT entries the disk uses, 64 Ki entries at a time. At most as
    // many blocks as the data area holds can be disjoint: past that many,
    // blocks are not kept for the overlap sweep (bounded memory on a
    // hostile table), the excess is one corruption.
    let max_blocks = data_limit / slot + 1;
    let mut kept = 0u64;
    // One past the last byte a block references, inside the file or not.
    let mut referenced_end = 0u64;
    let mut allocated = 0u64;
    let mut fragmented = 0u64;
    let mut prev_end: Option<u64> = None;
    let mut first = 0u64;
    while first < n {
        let k = (n - first).min(64 * 1024);
        let buf = read(storage, table_off + first * 4, k * 4)?;
        for (j, raw) in buf.chunks_exact(4).enumerate() {
            let e = u32::from_be_bytes(raw.try_into().expect("4 bytes"));
            if e == UNALLOCATED {
                continue;
            }
            let i = first + j as u64;
            allocated += 1;
            let start = u64::from(e) * SECTOR;
            let end = start + slot; // < 2^41 + 2^32: no overflow
            if prev_end.is_some_and(|p| p != start) {
                fragmented += 1;
            }
            prev_end = Some(end);
            referenced_end = referenced_end.max(end);
            if end > data_limit && at_end.is_none() {
                // No footer at the end and a block running past it: the
                // file was truncated. What is left of the block inside the
                // file is used (never a leak, never overwritten).
                if start < data_limit {
                    kept += 1;
                    if kept <= max_blocks {
                        used.push(Used {
                            start,
                            end: data_limit,
                            what: i,
                        });
                    }
                }
                f.report.truncated_block(
                    "VHD BAT",
                    table_off + i * 4,
                    &format!("block {i}"),
                    (i * bs, ((i + 1) * bs).min(size)),
                    start,
                    slot,
                    data_limit,
                );
                continue;
            }
            if end > data_limit {
                f.report.corrupt(
                    "VHD BAT",
                    table_off + i * 4,
                    format!(
                        "block {i} at sector {e:#x} (file offset {start:#x}+{slot:#x}: sector \
                         bitmap and data) extends past the end of the data area \
                         ({data_limit:#x}{})",
                        if at_end.is_some() {
                            ", where the footer is"
                        } else {
                            ", the end of the file"
                        }
                    ),
                );
                continue;
            }
            kept += 1;
            if kept == max_blocks + 1 {
                f.report.corrupt(
                    "VHD BAT",
                    table_off + i * 4,
                    format!(
                        "block {i}: more blocks than the {data_limit:#x} bytes of data area can \
                         hold side by side ({max_blocks} of {slot:#x} bytes): blocks overlap"
                    ),
                );
            }
            if kept <= max_blocks {
                used.push(Used {
                    start,
                    end,
                    what: i,
                });
            }
        }
        first += k;
    }
    f.report.cluster_size = bs;
    f.report.total_clusters = needed;
    f.report.allocated_clusters = allocated;
    f.report.fragmented_clusters = fragmented;

    let describe = |u: &Used| -> String {
        if u.what & STRUCTURE == 0 {
            return format!(
                "block {} (file offset {:#x}+{:#x})",
                u.what,
                u.start,
                u.end - u.start
            );
        }
        match u.what & !STRUCTURE {
            0 => "the footer copy at offset 0".to_string(),
            1 => format!("the dynamic disk header at {hdr_off:#x}"),
            2 => format!("the BAT ({table_off:#x}+{:#x})", u.end - u.start),
            k => format!(
                "the data of parent locator {} ({:#x}+{:#x})",
                k - 3,
                u.start,
                u.end - u.start
            ),
        }
    };
    let s = sweep(&mut used);
    for (a, b) in &s.overlaps {
        let (at, msg) = if b.what & STRUCTURE == 0 {
            (
                table_off + b.what * 4,
                format!("{} overlaps {}", describe(b), describe(a)),
            )
        } else if a.what & STRUCTURE == 0 {
            (
                table_off + a.what * 4,
                format!("{} overlaps {}", describe(a), describe(b)),
            )
        } else {
            f.report.corrupt(
                H,
                hdr_off,
                format!("{} overlaps {}", describe(b), describe(a)),
            );
            continue;
        };
        f.report.corrupt("VHD BAT", at, msg);
    }
    // Gaps smaller than a block are alignment padding, not leaks.
    for &(start, end) in &s.gaps {
        let len = end - start;
        if len >= slot {
            f.report.unused(start, len);
        }
    }
    let used_end = s.end.div_ceil(SECTOR) * SECTOR;
    let footer_at = match at_end {
        Some((off, _)) => off,
        None => {
            // Where the restored footer goes: over the damaged one, or
            // after the last structure if that reaches further.
            let at = used_end.max(file_len.saturating_sub(FOOTER_SIZE as u64));
            f.restore_tail = Some(at);
            at
        }
    };
    // Space is a leak only when nothing references it and it lies past the
    // last referenced byte.
    let may_leak = !table_unread && referenced_end <= used_end;
    let table_reach = table_off.saturating_add(table_bytes);
    if f.report.truncated_blocks > 0 || (at_end.is_none() && table_reach > data_limit) {
        // The footer cannot go back at the end: over the surviving part of
        // a truncated block (or BAT) it would destroy data, after it the
        // block (or BAT) would run over it. The damaged footer stays as it is (the image opens
        // read-only from the copy at offset 0).
        f.restore_tail = None;
        if let Some(p) = f
            .report
            .problems
            .iter_mut()
            .find(|p| p.structure == "VHD footer" && p.offset == tail_off && p.repair.is_some())
        {
            p.repair = None;
            p.message.push_str(
                "; it cannot be restored while blocks or the BAT run past the end of the file \
                 (the file is truncated): vdisk convert --salvage copies what is left",
            );
        }
    }
    if may_leak && footer_at > used_end && footer_at - used_end >= slot {
        let len = footer_at - used_end;
        f.report.leak(used_end, len, len / slot, true);
        f.tail_leak = Some((used_end, len / slot));
    }
    f.report.image_end_offset =
        used_end
            .max(referenced_end)
            .max(if f.tail_leak.is_some() { 0 } else { footer_at })
            + footer_size;

    if footer.disk_type == DiskType::Differencing && opts.check_parent {
        check_parent(
            &mut f.report,
            storage,
            hdr_off,
            &header,
            size,
            &opts.parent_policy,
            &OpenOptions {
                lock: opts.lock,
                opener: opts.opener.clone(),
                ..OpenOptions::default()
            },
        );
    }
    Ok(f)
}

/// Find a differencing disk's parent as opening would, and check that it is
/// this disk's parent: its footer's unique id is the header's Parent Unique
/// Id, its size is this disk's.
fn check_parent(
    report: &mut CheckReport,
    storage: &dyn Storage,
    hdr_off: u64,
    header: &DynamicHeader,
    size: u64,
    policy: &ParentPolicy,
    popts: &OpenOptions,
) {
    const H: &str = "VHD dynamic disk header";
    let name = storage.name();
    let Ok(file_len) = storage.len() else {
        report.check_error(H, hdr_off, "cannot read the file length");
        return;
    };
    let locators = read_locators(storage, header, file_len);
    let child = Path::new(name);
    let mut chain = ChainSearch::new(policy, child);
    if let Err(e) = chain.enter(name, child) {
        report.check_error(H, hdr_off, e);
        return;
    }
    // As opening does: the first candidate whose unique id is the one
    // recorded wins; a candidate with another id is skipped.
    let mut all = disk::parent::Resolution::default();
    let mut seen: Vec<std::path::PathBuf> = Vec::new();
    let mut mismatch: Option<String> = None;
    let mut found = None;
    for cand in parent_candidates(child, header, &locators) {
        let res = chain.resolve(std::slice::from_ref(&cand));
        all.tried.extend(res.tried);
        all.refused |= res.refused;
        let Some(path) = res.found else {
            continue;
        };
        let canon = std::fs::canonicalize(&path).unwrap_or_else(|_| path.clone());
        if seen.contains(&canon) {
            continue;
        }
        seen.push(canon);
        let pinfo = match Vhd::inspect_with(&path, popts) {
            Ok(i) => i,
            Err(e) => {
                report.check_error(
                    H,
                    hdr_off + 40,
                    format!("cannot read the parent {}: {e}", path.display()),
                );
                return;
            }
        };
        let pid = pinfo.footer.unique_id;
        if pid == header.parent_unique_id {
            found = Some((path, pinfo));
            break;
        }
        mismatch.get_or_insert_with(|| {
            format!(
                "the parent {} has unique id {pid}, but this differencing disk records Parent \
                 Unique Id {}: the parent is another disk, or its id was changed",
                path.display(),
                header.parent_unique_id
            )
        });
    }
    let Some((path, pinfo)) = found else {
        match mismatch {
            Some(m) => report.corrupt(H, hdr_off + 40, m),
            None => {
                let e = all.not_found_error(
                    name,
                    "VHD",
                    &format!(
                        "parent \"{}\" (id {}) not found",
                        header.parent_name(),
                        header.parent_unique_id
                    ),
                    "no parent locator or parent name names a path",
                );
                report.check_error(H, hdr_off + 40, e);
            }
        }
        return;
    };
    if pinfo.virtual_size != size {
        report.corrupt(
            H,
            hdr_off + 40,
            format!(
                "the parent {} has a virtual size of {} bytes, this disk {size}",
                path.display(),
                pinfo.virtual_size
            ),
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{CreateOptions, OpenOptions};
    use disk::{MemStorage, VirtualDisk};
    use std::sync::Arc;

    const MIB: u64 = 1 << 20;
    /// Layout of [`image`]: footer copy, header at 512, BAT at 1536 (one
    /// sector), first block at 2048; 2 MiB blocks with a 512-byte bitmap.
    const BAT: u64 = 1536;
    const FIRST: u64 = 2048;
    const SLOT: u64 = 2 * MIB + 512;

    /// A closed 8 MiB dynamic VHD with `blocks` written (block b holds the
    /// byte b + 1), in that order.
    fn image(blocks: &[u64]) -> Vec<u8> {
        let st = Arc::new(MemStorage::new("t.vhd"));
        let d = Vhd::create_on(Box::new(st.clone()), &CreateOptions::new(8 * MIB)).unwrap();
        for &b in blocks {
            d.write_at(&vec![b as u8 + 1; 2 * MIB as usize], b * 2 * MIB)
                .unwrap();
        }
        d.close().unwrap();
        st.to_vec()
    }

    fn run(bytes: Vec<u8>) -> CheckReport {
        check(
            &MemStorage::from_vec("t.vhd", bytes),
            &CheckOptions::default(),
        )
        .unwrap()
    }

    fn set_entry(img: &mut [u8], i: u64, sector: u32) {
        let at = (BAT + i * 4) as usize;
        img[at..at + 4].copy_from_slice(&sector.to_be_bytes());
    }

    fn only(r: &CheckReport, kind: ProblemKind) -> &Problem {
        let v: Vec<&Problem> = r.problems.iter().filter(|p| p.kind == kind).collect();
        assert_eq!(v.len(), 1, "{:#?}", r.problems);
        v[0]
    }

    fn contents(st: Arc<MemStorage>) -> Vec<u8> {
        let d = Vhd::open_storage(Box::new(st), &OpenOptions::default()).unwrap();
        disk::testing::read_all(&d)
    }

    #[test]
    fn clean_dynamic_and_fixed_images() {
        for blocks in [&[][..], &[0, 2], &[3, 1]] {
            let img = image(blocks);
            let len = img.len() as u64;
            let r = run(img);
            assert!(r.is_clean(), "{:#?}", r.problems);
            assert_eq!((r.total_clusters, r.cluster_size), (5, 2 * MIB));
            assert_eq!(r.allocated_clusters, blocks.len() as u64);
            assert_eq!(r.image_end_offset, len);
        }
        assert_eq!(run(image(&[3, 1, 2])).fragmented_clusters, 1);
        let st = Arc::new(MemStorage::new("f.vhd"));
        let mut o = CreateOptions::new(4 * MIB);
        o.fixed = true;
        Vhd::create_on(Box::new(st.clone()), &o)
            .unwrap()
            .close()
            .unwrap();
        let r = run(st.to_vec());
        assert!(r.is_clean(), "{:#?}", r.problems);
    }

    #[test]
    fn bat_entry_past_the_end_of_the_file() {
        let mut img = image(&[0]);
        set_entry(&mut img, 3, 0x10_0000); // 512 MiB
        let r = run(img);
        assert_eq!(r.exit_code(), 2);
        let p = only(&r, ProblemKind::Corruption);
        assert_eq!((p.structure.as_str(), p.offset), ("VHD BAT", BAT + 12));
        assert!(
            p.message.contains("0x20000000") && p.message.contains("past the end"),
            "{p}"
        );
    }

    #[test]
    fn overlapping_blocks_and_structures() {
        let mut img = image(&[0, 1]);
        set_entry(&mut img, 4, (FIRST / 512) as u32);
        let r = run(img.clone());
        let p = only(&r, ProblemKind::Corruption);
        assert_eq!(p.offset, BAT + 16);
        assert!(
            p.message.contains("block 4") && p.message.contains("block 0"),
            "{p}"
        );
        // A block over the dynamic disk header.
        set_entry(&mut img, 4, 1);
        let p = run(img).problems.remove(0);
        assert_eq!(p.offset, BAT + 16);
        assert!(p.message.contains("header"), "{p}");
    }

    /// `img` with `n` unreferenced bytes inserted before its footer.
    fn with_spare(img: &[u8], n: usize) -> Vec<u8> {
        let at = img.len() - 512;
        let mut v = img[..at].to_vec();
        v.extend(vec![0x5a; n]);
        v.extend_from_slice(&img[at..]);
        v
    }

    #[test]
    fn spare_block_before_the_footer_is_a_reclaimable_leak() {
        let img = image(&[0, 1]);
        let r = run(with_spare(&img, SLOT as usize));
        assert_eq!(r.exit_code(), 3);
        let p = only(&r, ProblemKind::Leak);
        assert_eq!((p.offset, p.length), (FIRST + 2 * SLOT, SLOT));
        assert_eq!(r.leaks, 1);
        // Less than a block is padding.
        assert!(run(with_spare(&img, 4096)).is_clean());
        let st = Arc::new(MemStorage::from_vec(
            "t.vhd",
            with_spare(&img, SLOT as usize + 4096),
        ));
        let want = contents(st.clone());
        let fix = repair(&*st, RepairMode::Leaks, &CheckOptions::default()).unwrap();
        assert_eq!(fix.leaks_fixed, 1);
        assert_eq!(st.to_vec(), img);
        assert!(check(&*st, &CheckOptions::default()).unwrap().is_clean());
        assert_eq!(contents(st), want);
    }

    #[test]
    fn unallocated_block_between_others_is_unused_space_not_a_leak() {
        let mut img = image(&[0, 1, 2]);
        set_entry(&mut img, 1, u32::MAX);
        let r = run(img);
        let p = only(&r, ProblemKind::Unused);
        assert_eq!((p.offset, p.length, p.repair), (FIRST + SLOT, SLOT, None));
        assert_eq!((r.leaks, r.unused_bytes, r.exit_code()), (0, SLOT, 0));
        assert!(r.is_clean());
        assert!(!r.needs_repair(RepairMode::All));
    }

    #[test]
    fn damaged_footer_is_restored_from_its_copy() {
        let img = image(&[1]);
        let end = img.len();
        let st = Arc::new(MemStorage::from_vec("t.vhd", img.clone()));
        let want = contents(st.clone());
        let mut bad = img.clone();
        bad[end - 512 + 30] ^= 0xff;
        let r = run(bad.clone());
        assert_eq!(r.exit_code(), 2);
        let p = only(&r, ProblemKind::Corruption);
        assert_eq!(
            (p.offset, p.repair),
            (end as u64 - 512 + 64, Some(RepairMode::All))
        );
        assert!(p.message.contains("copy at offset 0 is intact"), "{p}");
        let st = Arc::new(MemStorage::from_vec("t.vhd", bad));
        assert_eq!(
            repair(&*st, RepairMode::Leaks, &CheckOptions::default())
                .unwrap()
                .corruptions_fixed,
            0
        );
        let fix = repair(&*st, RepairMode::All, &CheckOptions::default()).unwrap();
        assert_eq!(fix.corruptions_fixed, 1);
        assert_eq!(st.to_vec(), img);
        assert_eq!(contents(st), want);
        // A footer cut short: restored after the last block.
        let mut cut = img.clone();
        cut.truncate(end - 100);
        let st = Arc::new(MemStorage::from_vec("t.vhd", cut));
        assert_eq!(
            check(&*st, &CheckOptions::default()).unwrap().exit_code(),
            2
        );
        repair(&*st, RepairMode::All, &CheckOptions::default()).unwrap();
        assert_eq!(st.to_vec(), img);
    }

    #[test]
    fn damaged_or_different_footer_copy() {
        let img = image(&[0]);
        let mut bad = img.clone();
        bad[3] = b'x';
        let r = run(bad.clone());
        let p = only(&r, ProblemKind::Corruption);
        assert_eq!((p.offset, p.repair), (0, Some(RepairMode::All)));
        assert!(p.message.contains("copy at offset 0 is damaged"), "{p}");
        let st = MemStorage::from_vec("t.vhd", bad);
        repair(&st, RepairMode::All, &CheckOptions::default()).unwrap();
        assert_eq!(st.to_vec(), img);
        // A valid copy that says something else.
        let mut other = img.clone();
        let mut f = Footer::parse(&img[..512]).unwrap();
        f.timestamp ^= 1;
        f.write_to(&mut other[..512]);
        let p = run(other).problems.remove(0);
        assert!(p.message.contains("differs"), "{p}");
    }

    #[test]
    fn fixed_disk_with_bytes_before_the_footer() {
        let st = Arc::new(MemStorage::new("f.vhd"));
        let mut o = CreateOptions::new(4 * MIB);
        o.fixed = true;
        Vhd::create_on(Box::new(st.clone()), &o)
            .unwrap()
            .close()
            .unwrap();
        let img = st.to_vec();
        let size = img.len() as u64 - 512;
        let r = run(with_spare(&img, 1024));
        let p = only(&r, ProblemKind::Leak);
        assert_eq!((p.offset, p.length, r.leaks), (size, 1024, 2));
        let st = MemStorage::from_vec("f.vhd", with_spare(&img, 1024));
        repair(&st, RepairMode::Leaks, &CheckOptions::default()).unwrap();
        assert_eq!(st.to_vec(), img);
        // A disk larger than its data.
        let mut big = img.clone();
        let at = big.len() - 512;
        let mut f = Footer::parse(&big[at..]).unwrap();
        f.current_size += MIB;
        f.write_to(&mut big[at..]);
        let r = run(big);
        let p = only(&r, ProblemKind::Corruption);
        assert_eq!(p.offset, size + 48);
    }

    #[test]
    fn header_damage_and_short_table() {
        let mut img = image(&[0]);
        img[512 + 100] ^= 1; // checksum
        let p = run(img).problems.remove(0);
        assert_eq!(
            (p.structure.as_str(), p.offset),
            ("VHD dynamic disk header", 512 + 36)
        );
        let mut img = image(&[0]);
        let mut h = DynamicHeader::parse(&img[512..1536]).unwrap();
        h.max_table_entries = 2;
        h.write_to(&mut img[512..1536]);
        let p = run(img).problems.remove(0);
        assert_eq!(p.offset, 512 + 28);
    }

    #[test]
    fn not_a_vhd_is_an_error() {
        assert!(check(
            &MemStorage::from_vec("x", vec![0u8; 4096]),
            &CheckOptions::default()
        )
        .is_err());
        assert!(check(
            &MemStorage::from_vec("x", vec![0u8; 10]),
            &CheckOptions::default()
        )
        .is_err());
    }

    #[test]
    fn garbage_never_panics() {
        let base = image(&[0, 2]);
        let mut x = 0x9876_5432u64;
        for round in 0..400 {
            let mut img = base.clone();
            for _ in 0..(1 + round % 6) {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                let n = img.len() as u64;
                // The structures: the copy, header and BAT, or the footer.
                let at = match x % 3 {
                    0 => x % 2048,
                    1 => n - 1 - (x >> 8) % 512,
                    _ => x % n,
                };
                img[at as usize] = (x >> 40) as u8;
            }
            // Keep the checksums right half of the time, to get past them.
            if round % 2 == 0 {
                let n = img.len();
                for (at, len, ck) in [(0, 512, 64), (n - 512, 512, 64), (512, 1024, 36)] {
                    let sum = crate::footer::checksum(&img[at..at + len], ck);
                    img[at + ck..at + ck + 4].copy_from_slice(&sum.to_be_bytes());
                }
            }
            if round % 37 == 0 {
                img.truncate((x % img.len() as u64) as usize);
            }
            let st = MemStorage::from_vec("g.vhd", img);
            if let Ok(r) = check(&st, &CheckOptions::default()) {
                let _ = r.exit_code();
                let _ = repair(&st, RepairMode::All, &CheckOptions::default());
            }
        }
    }

    #[test]
    fn differencing_parent_unique_id() {
        let dir = tempfile::tempdir().unwrap();
        let base = dir.path().join("base.vhd");
        let child = dir.path().join("child.vhd");
        Vhd::create(&base, &CreateOptions::new(8 * MIB), false)
            .unwrap()
            .close()
            .unwrap();
        let c =
            Vhd::create_differencing(&child, &base, &CreateOptions::new(8 * MIB), false).unwrap();
        c.write_at(&[2; 512], MIB).unwrap();
        c.close().unwrap();
        let r = check_file(&child, &CheckOptions::default()).unwrap();
        assert!(r.is_clean(), "{:#?}", r.problems);
        // Another disk in the parent's place.
        Vhd::create(&base, &CreateOptions::new(8 * MIB), true)
            .unwrap()
            .close()
            .unwrap();
        let r = check_file(&child, &CheckOptions::default()).unwrap();
        let p = only(&r, ProblemKind::Corruption);
        assert!(p.message.contains("unique id"), "{p}");
        assert_eq!(p.offset, 512 + 40);
        std::fs::remove_file(&base).unwrap();
        let r = check_file(&child, &CheckOptions::default()).unwrap();
        assert_eq!(r.exit_code(), 1);
        let opts = CheckOptions {
            check_parent: false,
            ..CheckOptions::default()
        };
        assert!(check_file(&child, &opts).unwrap().is_clean());
    }

    #[test]
    fn many_entries_on_the_same_block_stay_bounded() {
        let st = Arc::new(MemStorage::new("m.vhd"));
        let d = Vhd::create_on(Box::new(st.clone()), &CreateOptions::new(1 << 30)).unwrap();
        d.write_at(&[1; 512], 0).unwrap();
        d.close().unwrap();
        let mut img = st.to_vec();
        let first = u32::from_be_bytes(img[BAT as usize..BAT as usize + 4].try_into().unwrap());
        for i in 1..512 {
            set_entry(&mut img, i, first);
        }
        let r = run(img);
        assert!(r.corruptions > 1 && r.corruptions < 10, "{}", r.corruptions);
        assert!(r
            .problems
            .iter()
            .any(|p| p.message.contains("side by side")));
    }

    #[test]
    fn corpus_images() {
        let tmp = tempfile::tempdir().unwrap();
        for sub in ["vhd", "bad"] {
            let Some(dir) = disk::testing::corpus(sub) else {
                return;
            };
            let mut files: Vec<_> = std::fs::read_dir(dir)
                .unwrap()
                .map(|e| e.unwrap().path())
                .filter(|p| sub == "vhd" || p.to_string_lossy().contains(".vhd"))
                .collect();
            files.sort();
            for src in files {
                let img = disk::testing::decompress(&src, tmp.path());
                let name = src.file_name().unwrap().to_string_lossy().into_owned();
                let r = check_file(&img, &CheckOptions::default());
                eprintln!(
                    "{name}: {:?}",
                    r.as_ref().map(|r| (r.exit_code(), &r.problems))
                );
                if sub == "bad" {
                    // Refused or reported, never a panic.
                    assert!(r.map_or(true, |r| r.exit_code() != 0), "{name}");
                } else if name.contains("orphan") {
                    assert_eq!(r.unwrap().exit_code(), 1, "{name}");
                    let opts = CheckOptions {
                        check_parent: false,
                        ..CheckOptions::default()
                    };
                    let r = check_file(&img, &opts).unwrap();
                    assert!(r.is_clean(), "{name}: {:#?}", r.problems);
                } else {
                    let r = r.unwrap();
                    assert!(r.is_clean(), "{name}: {:#?}", r.problems);
                }
                std::fs::remove_file(&img).unwrap();
            }
        }
    }
}
