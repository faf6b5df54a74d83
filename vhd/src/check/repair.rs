//! Repairs ([`repair`]): what the passes found repairable, written in a
//! crash-safe order.

use super::{examine, CheckOptions};
use crate::footer::FOOTER_SIZE;
use crate::{Error, Result};
use disk::check::{RepairMode, RepairReport};
use disk::{LockMode, Storage};
use std::path::Path;

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
