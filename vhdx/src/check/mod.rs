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
//!
//! One pass per on-disk structure, in file order, each in its own module:
//! `header` (identifier and headers), `log`, `regions`, `metadata`, `bat`,
//! `parent`; `space` finds overlaps and leaks from the space each pass
//! records as used; `repair` acts on what the passes found.

mod bat;
mod header;
mod log;
mod metadata;
mod parent;
mod regions;
mod repair;
mod space;
#[cfg(test)]
mod tests;

use crate::header::Header;
use crate::{Error, OpenOptions, Result};
use disk::check::CheckReport;
use disk::Storage;
use std::path::Path;

pub use disk::check::CheckOptions;
pub use repair::{repair, repair_file};

const MIB: u64 = 1 << 20;
/// The header section (MS-VHDX 2.2): identifier, headers, region tables.
const HEADER_SECTION: u64 = MIB;
/// Smallest file that holds the header section's structures.
const MIN_FILE: u64 = 5 * 64 * 1024;
/// `Used::what` of a structure (not a BAT entry): this bit, plus
/// 0 = header section, 1 = log, 2 + i = region table entry i.
const STRUCTURE: u64 = 1 << 63;
/// `Used::what` of a BAT entry whose block is not present but keeps its
/// file space (UNMAPPED or ZERO with a file offset): this bit plus the index.
const RESERVED: u64 = 1 << 62;

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

/// What [`examine`] found: the report and what a repair would do.
struct Findings {
    report: CheckReport,
    /// The current header and its slot.
    header: Option<(usize, Header)>,
    /// Header problems a rewrite of the pair fixes.
    header_fix: u64,
    /// A dirty log that can be replayed.
    replay: Option<log::Replay>,
    /// Copy the region table at `.0` over the one at `.1`.
    region_fix: Option<(u64, u64)>,
    /// Truncating to `.0` reclaims `.1` leaked clusters.
    tail_leak: Option<(u64, u64)>,
    /// One past the last referenced byte, when the BAT was read.
    referenced_end: Option<u64>,
    /// The file type identifier's signature is lost (all else is a VHDX).
    identifier_fix: bool,
}

fn read(storage: &dyn Storage, offset: u64, len: u64) -> Result<Vec<u8>> {
    let n = usize::try_from(len).map_err(|_| Error::invalid("read too large"))?;
    let mut buf = vec![0u8; n];
    storage.read_at(&mut buf, offset)?;
    Ok(buf)
}

/// Every pass in turn; a pass whose structure is too damaged for the next
/// ones to be read ends the check there (with what `space` can still say).
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
    header::identifier(storage, &name, &mut f)?;
    let Some(hdr) = header::headers(storage, &name, file_len, &mut f)? else {
        return Ok(f);
    };
    let (ops, view_len) = log::active_sequence(storage, &hdr, file_len, &mut f)?;
    let view = log::View {
        inner: storage,
        inner_len: file_len,
        ops: &ops,
    };
    let Some((table_off, table)) = regions::tables(&view, &name, &mut f)? else {
        return Ok(f);
    };
    let layout = space::Layout {
        log_offset: hdr.log_offset,
        log_length: u64::from(hdr.log_length),
        table: &table,
        table_offset: table_off,
    };
    let mut space = space::Space::new(&layout, view_len);
    if !regions::placement(&layout, view_len, &mut space, &mut f.report) {
        return Ok(space::finish(f, space, &layout, None, view_len, None));
    }
    let Some((meta_table, md, geo)) = metadata::items(&view, &name, &table, &mut f.report)? else {
        return Ok(space::finish(f, space, &layout, None, view_len, None));
    };
    bat::entries(
        &view,
        &name,
        &layout,
        &geo,
        view_len,
        &mut space,
        &mut f.report,
    )?;
    if md.file_parameters.has_parent && opts.check_parent {
        let meta = *table.metadata();
        let loc_at = meta_table
            .find(crate::metadata::PARENT_LOCATOR)
            .map_or(meta.file_offset, |e| meta.file_offset + u64::from(e.offset));
        parent::linkage(
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
    let referenced_end = space.referenced_end;
    Ok(space::finish(
        f,
        space,
        &layout,
        Some(&geo),
        view_len,
        Some(referenced_end),
    ))
}
