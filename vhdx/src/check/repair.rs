//! Repairs of what the passes found (see the module docs of `check`).

use super::{examine, CheckOptions};
use crate::region_table::RegionTable;
use crate::session::write_header_pair;
use crate::{replay, Error, Result};
use disk::check::{RepairMode, RepairReport};
use disk::{LockMode, Storage};
use std::path::Path;
use uuid::Uuid;

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

/// Repair what `mode` allows (see the [module docs](crate::check)); check again afterwards
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
