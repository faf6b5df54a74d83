//! Merging layers of a chain, crash-safe, at a cost proportional to the
//! data merged (plus a scan of the block tables), never to the virtual size.
//!
//! - [`merge_into_child`] folds a disk's parent into it (the disk then links
//!   to its grandparent, or stands alone): how a checkpoint is deleted
//!   without changing what anything else reads.
//! - [`merge_into_ancestor`] folds a disk and the layers above an ancestor
//!   into that ancestor (like `Merge-VHD` and `qemu-img commit`).
//!
//! # Crash safety
//! Into a child: the child receives only sectors it was reading from the
//! parent, with the bytes it was reading, so at every point it reads what it
//! read before; its identity is kept (its own children stay linked). The
//! relink to the grandparent is one logged (VHDX) or one-page (VHD) write,
//! after the copied data is flushed. Interrupted, the merge is simply run
//! again (it copies nothing twice that matters).
//!
//! Into an ancestor: the layers above it are only read, so each reads what
//! it read before at every point. The ancestor changes (that is the point),
//! so its VHDX DataWriteGuid changes; its direct child is first given a
//! `parent_linkage2` with the ancestor's next DataWriteGuid, so the chain
//! still opens after a crash and the merge can be run again.

use crate::{Error, Result};
use disk::{Mapping, VirtualDisk};
use image::chain::{chain_files, open_over, set_parent};
use image::{Driver, Format, Image, OpenOptions};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use uuid::Uuid;
use vhdx::Vhdx;

/// Bytes copied per I/O.
const CHUNK: u64 = CHUNK_BYTES as u64;
/// [`CHUNK`] as a buffer length.
const CHUNK_BYTES: usize = 1 << 20;

/// `n` bytes (a part of a [`CHUNK`]) as a length in memory.
fn len_of(n: u64) -> Result<usize> {
    usize::try_from(n).map_err(|_| Error::invalid(format!("{n} bytes do not fit in memory")))
}

/// What a merge did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct MergeStats {
    /// Bytes of virtual disk copied.
    pub bytes_copied: u64,
}

/// Progress callback: `done` bytes of the virtual disk scanned of `total`
/// (the virtual size), and the bytes `copied` into the target so far (as
/// [`MergeStats::bytes_copied`] counts them).
pub type Progress<'a> = disk::Progress<'a>;

/// The [`disk::Step`] at `off` of `size`, with what `stats` copied.
fn step(off: u64, size: u64, stats: &MergeStats) -> disk::Step {
    disk::Step {
        done: off,
        total: size,
        copied: stats.bytes_copied,
    }
}

/// Fold the parent of the differencing disk `child` into it: every sector
/// the child reads from its parent's own data is copied into the child, then
/// the child links to the parent's parent (or, when the parent is a base
/// disk, becomes a standalone dynamic disk). The parent file is not changed
/// or deleted. Returns what was copied.
///
/// # Errors
/// `child` is not a differencing disk, the chain cannot be opened, I/O
/// errors.
pub fn merge_into_child(
    child: &Path,
    opts: &OpenOptions,
    progress: Progress<'_>,
) -> Result<MergeStats> {
    let img = image::open(
        child,
        &OpenOptions {
            writable: true,
            keep_identity: true,
            ..opts.clone()
        },
    )?;
    // The child's own layer (which reads what it lacks from its parent).
    let c = img.driver().disk();
    let name = child.display().to_string();
    let p = c.parent().cloned().ok_or_else(|| {
        Error::invalid("not a differencing disk: no parent to merge").in_file(&name, 0)
    })?;
    let grandparent = p.parent().map(|g| PathBuf::from(g.storage().name()));
    let size = c.virtual_size();
    let mut buf = vec![0u8; CHUNK_BYTES];
    let mut stats = MergeStats::default();
    let mut off = 0;
    while off < size {
        let ce = c.map(off, size - off)?;
        if ce.mapping == Mapping::Parent {
            let end = off + ce.len;
            let mut o = off;
            while o < end {
                let pe = p.map(o, (end - o).min(CHUNK))?;
                let n = pe.len.min(end - o);
                let copy = match pe.mapping {
                    Mapping::Parent => false,
                    Mapping::Data(_) | Mapping::Ancestor { .. } => true,
                    // Zeros over a grandparent must be copied; over nothing
                    // they are what the standalone child reads anyway.
                    Mapping::Zero | Mapping::Unallocated => grandparent.is_some(),
                };
                if copy {
                    let b = &mut buf[..len_of(n)?];
                    p.read_at(b, o)?;
                    c.write_at(b, o)?;
                    stats.bytes_copied += n;
                }
                o += n;
            }
        }
        off += ce.len;
        progress(step(off, size, &stats));
    }
    c.flush()?;
    drop((p, c));
    match grandparent {
        Some(g) => {
            img.close()?;
            set_parent(child, &g, true, opts)?;
        }
        None => make_standalone(img, child)?,
    }
    Ok(stats)
}

/// Turn the differencing image `img` (at `path`) into a standalone one
/// (see [`vhdx::Vhdx::make_standalone`], [`vhd::Vhd::make_standalone`]);
/// closes it.
fn make_standalone(img: Image, path: &Path) -> Result<()> {
    match img.into_driver() {
        d @ Driver::Vhdx(_) => d.into_vhdx()?.make_standalone(),
        d @ Driver::Vhd(_) => d.into_vhd()?.make_standalone(),
        Driver::Raw(_) => Err(Error::invalid("a raw image is no differencing disk")
            .in_file(&path.display().to_string(), 0)),
    }
}

/// Fold `top` and the layers between it and its ancestor `depth` levels
/// down (1 = its parent) into that ancestor: afterwards the ancestor reads
/// what `top` reads. The layers above the ancestor are not changed (the
/// caller deletes them, or keeps them: they still read the same). Returns
/// the ancestor's path and what was copied.
///
/// # Errors
/// `depth` is 0 or beyond the chain, the chain cannot be opened, I/O
/// errors.
pub fn merge_into_ancestor(
    top: &Path,
    depth: usize,
    opts: &OpenOptions,
    progress: Progress<'_>,
) -> Result<(PathBuf, MergeStats)> {
    let name = top.display().to_string();
    let files = chain_files(top, opts)?;
    if depth == 0 || depth >= files.len() {
        return Err(Error::invalid(format!(
            "cannot merge into the layer {depth} levels down: the chain has {} layers",
            files.len()
        ))
        .in_file(&name, 0));
    }
    let ancestor = files[depth].clone();
    let format = match opts.format {
        Some(f) => f,
        None => image::probe(&ancestor, &*opts.opener)?,
    };
    let opts = OpenOptions {
        format: Some(format),
        ..opts.clone()
    };
    let mut next_guid = None;
    if format == Format::Vhdx {
        // Let the ancestor's direct child accept the ancestor's next
        // identity before the ancestor changes (see the module docs).
        let info = Vhdx::inspect_with(&ancestor, &opts.vhdx())?;
        let cur = info.header.data_write_guid;
        let new = Uuid::new_v4();
        let a = Vhdx::open(&ancestor, &opts.vhdx())?;
        let child_path = &files[depth - 1];
        let child = Vhdx::open_with_parent(
            child_path,
            &vhdx::OpenOptions {
                writable: true,
                keep_data_write_guid: true,
                ..opts.vhdx()
            },
            Arc::new(a),
        )?;
        let linkages = child.info().parent_linkages();
        if !linkages.contains(&cur) {
            return Err(Error::invalid(format!(
                "{} does not link to {} (DataWriteGuid {}): the chain is inconsistent",
                child_path.display(),
                ancestor.display(),
                vhdx::linkage_string(cur)
            ))
            .in_file(&name, 0));
        }
        let mut loc = vhdx::parent_locator_for(child_path, &ancestor, cur)?;
        loc.entries
            .insert(1, ("parent_linkage2".into(), vhdx::linkage_string(new)));
        child.set_parent_locator(&loc)?;
        child.close()?;
        next_guid = Some(new);
    }
    // The ancestor, writable, with its own chain; then the layers above it,
    // read-only, each over the one below, down to the ancestor: every file
    // is open once (an image lock refuses a second open of a file this
    // process writes). `chain_files` above checked the links.
    let target: Arc<dyn VirtualDisk> = match format {
        Format::Vhdx => Arc::new(Vhdx::open(
            &ancestor,
            &vhdx::OpenOptions {
                writable: true,
                data_write_guid: next_guid,
                ..opts.vhdx()
            },
        )?),
        _ => image::open(&ancestor, &opts.clone().writable())?
            .driver()
            .disk(),
    };
    let layers = open_over(&files[..depth], target.clone(), &opts)?;
    let layer = |i: usize| -> &dyn VirtualDisk { &*layers[i] };
    let top_disk = layer(0);
    let size = top_disk.virtual_size();
    let mut buf = vec![0u8; CHUNK_BYTES];
    let mut stats = MergeStats::default();
    let mut off = 0;
    while off < size {
        // Resolve through the layers above the ancestor only.
        let mut len = (size - off).min(CHUNK);
        let mut found = None;
        for i in 0..depth {
            let e = layer(i).map(off, len)?;
            len = e.len.min(len);
            if e.mapping != Mapping::Parent {
                found = Some(i);
                break;
            }
        }
        if let Some(i) = found {
            let b = &mut buf[..len_of(len)?];
            layer(i).read_at(b, off)?;
            target.write_at(b, off)?;
            stats.bytes_copied += len;
        }
        off += len;
        progress(step(off, size, &stats));
    }
    // Flushed and closed here, where an error is reported (dropping the
    // last handle would close it too, silently: a failing close, which
    // ends a VHDX's log session or writes a VHD's footer, would pass for
    // a completed merge).
    target.flush()?;
    drop(layers);
    target.close()?;
    Ok((ancestor, stats))
}

/// Give the differencing disk `child` a new parent without changing what it
/// reads (like `qemu-img rebase -b`): where the child reads from its old
/// chain and the new parent reads something else, the old bytes are copied
/// into the child; then the child links to `new_parent`, recording its
/// identity. When `new_parent` is the same disk the child links to (for
/// instance moved or copied), only the link is rewritten. Crash-safe like
/// [`merge_into_child`]: the child only receives the bytes it reads.
///
/// # Errors
/// `child` is not a differencing disk, a different virtual size, the chains
/// cannot be opened, I/O errors.
pub fn rebase(
    child: &Path,
    new_parent: &Path,
    opts: &OpenOptions,
    progress: Progress<'_>,
) -> Result<MergeStats> {
    // Same identity: a verified relink is enough. Any other refusal (not
    // the child's parent, another size...) means copying; a failing disk or
    // a lock does not, and is reported (a relink the fault cut short is
    // completed by running this again).
    match set_parent(child, new_parent, false, opts) {
        Ok(()) => return Ok(MergeStats::default()),
        Err(e) if matches!(e.kind(), disk::ErrorKind::Io | disk::ErrorKind::Locked) => {
            return Err(e)
        }
        Err(_) => {}
    }
    let name = child.display().to_string();
    let img = image::open(
        child,
        &OpenOptions {
            writable: true,
            keep_identity: true,
            ..opts.clone()
        },
    )?;
    let c = img.driver().disk();
    let old = c.parent().cloned().ok_or_else(|| {
        Error::invalid("not a differencing disk: it has no parent").in_file(&name, 0)
    })?;
    let new_img = image::open(
        new_parent,
        &OpenOptions {
            writable: false,
            ..opts.clone()
        },
    )?;
    let new = new_img.disk();
    if new.virtual_size() != c.virtual_size() {
        return Err(Error::invalid(format!(
            "the new parent {} has a virtual size of {} bytes, the child {}",
            new_parent.display(),
            new.virtual_size(),
            c.virtual_size()
        ))
        .in_file(&name, 0));
    }
    let size = c.virtual_size();
    let mut a = vec![0u8; CHUNK_BYTES];
    let mut b = vec![0u8; CHUNK_BYTES];
    let mut stats = MergeStats::default();
    let mut off = 0;
    while off < size {
        let e = c.map(off, (size - off).min(CHUNK))?;
        let n = len_of(e.len)?;
        if e.mapping == Mapping::Parent {
            old.read_at(&mut a[..n], off)?;
            new.read_at(&mut b[..n], off)?;
            if a[..n] != b[..n] {
                c.write_at(&a[..n], off)?;
                stats.bytes_copied += e.len;
            }
        }
        off += e.len;
        progress(step(off, size, &stats));
    }
    c.flush()?;
    drop((old, c));
    img.close()?;
    drop(new_img);
    set_parent(child, new_parent, true, opts)?;
    Ok(stats)
}
