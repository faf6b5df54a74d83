//! The files of a differencing chain: listing them, opening some over a
//! disk already open, relinking a child.

use crate::open::{open, OpenOptions};
use crate::probe::probe;
use crate::Format;
use disk::{Error, Result, VirtualDisk};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use vhd::Vhd;
use vhdx::Vhdx;

/// The format `opts` gives, or the one `path` probes as.
fn format_of(path: &Path, opts: &OpenOptions) -> Result<Format> {
    match opts.format {
        Some(f) => Ok(f),
        None => probe(path, &*opts.opener),
    }
}

/// The files of the chain of the image at `path` (opened read-only, with
/// its chain, and closed again), the image first.
///
/// # Errors
/// As [`open`].
pub fn chain_files(path: &Path, opts: &OpenOptions) -> Result<Vec<PathBuf>> {
    let opts = OpenOptions {
        writable: false,
        ..opts.clone()
    };
    let img = open(path, &opts)?;
    let mut out = vec![path.to_path_buf()];
    let mut cur = img.driver().disk().parent().cloned();
    while let Some(p) = cur {
        out.push(PathBuf::from(p.storage().name()));
        cur = p.parent().cloned();
    }
    Ok(out)
}

/// Open the layers `files` (a chain's files, the top first; all of one
/// format, a parent having its child's format) read-only, each over the
/// next, the last over `bottom` (already open: the disk the last file's
/// parent locator names). Returns the layers, the top first. The links are
/// not verified again: the caller opened the whole chain once before
/// (e.g. [`chain_files`]). This opens each file once even when `bottom`
/// is open for writing (an image lock refuses a second open of a file
/// this process writes).
///
/// # Errors
/// A file cannot be opened, or does not fit over the disk below it.
pub fn open_over(
    files: &[PathBuf],
    bottom: Arc<dyn VirtualDisk>,
    opts: &OpenOptions,
) -> Result<Vec<Arc<dyn VirtualDisk>>> {
    let opts = OpenOptions {
        writable: false,
        ..opts.clone()
    };
    let mut below = bottom;
    let mut out: Vec<Arc<dyn VirtualDisk>> = Vec::with_capacity(files.len());
    for f in files.iter().rev() {
        let d: Arc<dyn VirtualDisk> = match format_of(f, &opts)? {
            Format::Vhdx => Arc::new(Vhdx::open_with_parent(f, &opts.vhdx(), below)?),
            Format::Vhd => Arc::new(Vhd::open_with_parent(f, &opts.vhd(), below)?),
            Format::Raw => {
                return Err(Error::invalid("a raw image has no parent")
                    .in_file(&f.display().to_string(), 0))
            }
        };
        below = d.clone();
        out.push(d);
    }
    out.reverse();
    Ok(out)
}

/// Point the differencing image `child` at `parent`; see
/// [`Vhdx::set_parent`] and [`Vhd::set_parent`]. `adopt`: record the new
/// parent's identity (the caller guarantees the child reads the same
/// through it). `opts` gives the format (or probes it), the parent policy,
/// locks and opener.
///
/// # Errors
/// Not the child's parent (unless `adopt`), a raw image, I/O errors.
pub fn set_parent(child: &Path, parent: &Path, adopt: bool, opts: &OpenOptions) -> Result<()> {
    match format_of(child, opts)? {
        Format::Vhdx => Vhdx::set_parent(child, parent, adopt, &opts.vhdx()),
        Format::Vhd => Vhd::set_parent(child, parent, adopt, &opts.vhd()),
        Format::Raw => {
            Err(Error::invalid("a raw image has no parent")
                .in_file(&child.display().to_string(), 0))
        }
    }
}
