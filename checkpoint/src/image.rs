//! Opening, creating and relinking the layers of a chain, VHDX or VHD alike.

use crate::{Error, Result};
use disk::{ChainView, ParentPolicy, VirtualDisk};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use vhd::Vhd;
use vhdx::Vhdx;

/// A differencing-capable image format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Format {
    /// Microsoft VHDX (`.vhdx`, children `.avhdx`).
    Vhdx,
    /// Microsoft VHD (`.vhd`, children `.avhd`).
    Vhd,
}

impl Format {
    /// File extension of a base disk.
    pub fn base_extension(self) -> &'static str {
        match self {
            Format::Vhdx => "vhdx",
            Format::Vhd => "vhd",
        }
    }

    /// File extension of a differencing disk, as Hyper-V names checkpoints.
    pub fn child_extension(self) -> &'static str {
        match self {
            Format::Vhdx => "avhdx",
            Format::Vhd => "avhd",
        }
    }
}

/// The format of the VHDX or VHD file at `path`, from its signature (see
/// [`crate::detect::sniff`]).
///
/// # Errors
/// The file cannot be read, is neither VHDX nor VHD, or is named as one
/// but lacks its signature (corrupt).
pub fn detect(path: &Path) -> Result<Format> {
    crate::detect::sniff(path)?.ok_or_else(|| {
        Error::invalid("not a VHDX or VHD image").in_file(&path.display().to_string(), 0)
    })
}

/// How to open a chain.
#[derive(Debug, Clone, Default)]
pub struct ChainOptions {
    /// Open the top layer for writing (parents are always read-only).
    pub writable: bool,
    /// Which parent files may be followed.
    pub policy: ParentPolicy,
}

/// One open layer, with its format-specific handle.
pub enum Layer {
    /// A VHDX layer.
    Vhdx(Box<Vhdx>),
    /// A VHD layer.
    Vhd(Box<Vhd>),
}

impl Layer {
    /// Open the image at `path` with its chain. `keep_identity`: writes do
    /// not change the identity the image's children link to (for writes
    /// that do not change what it reads).
    ///
    /// # Errors
    /// As [`Vhdx::open`] and [`Vhd::open`].
    pub fn open(path: &Path, opts: &ChainOptions, keep_identity: bool) -> Result<Layer> {
        Ok(match detect(path)? {
            Format::Vhdx => Layer::Vhdx(Box::new(Vhdx::open(
                path,
                &vhdx::OpenOptions {
                    writable: opts.writable,
                    parent_policy: opts.policy.clone(),
                    keep_data_write_guid: keep_identity,
                    ..vhdx::OpenOptions::default()
                },
            )?)),
            Format::Vhd => Layer::Vhd(Box::new(Vhd::open(
                path,
                &vhd::OpenOptions {
                    writable: opts.writable,
                    parent_policy: opts.policy.clone(),
                    ..vhd::OpenOptions::default()
                },
            )?)),
        })
    }

    /// The layer as a virtual disk (reads go down the chain).
    pub fn disk(&self) -> &dyn VirtualDisk {
        match self {
            Layer::Vhdx(d) => &**d,
            Layer::Vhd(d) => &**d,
        }
    }

    /// Flush and close.
    ///
    /// # Errors
    /// I/O errors.
    pub fn close(self) -> Result<()> {
        match self {
            Layer::Vhdx(d) => d.close(),
            Layer::Vhd(d) => d.close(),
        }
    }

    /// Turn a differencing layer into a standalone one (see
    /// [`Vhdx::make_standalone`], [`Vhd::make_standalone`]); closes it.
    ///
    /// # Errors
    /// Not differencing, I/O errors.
    pub fn make_standalone(self, path: &Path) -> Result<()> {
        match self {
            Layer::Vhdx(d) => d.make_standalone(),
            Layer::Vhd(d) => {
                d.close()?;
                Vhd::make_standalone(path)
            }
        }
    }
}

/// Open the image at `path` with its whole chain, as one disk. Chains are
/// wrapped in a [`ChainView`], so reads of data deep in the chain cost one
/// lookup, not one per layer.
///
/// # Errors
/// As [`Layer::open`].
pub fn open(path: &Path, opts: &ChainOptions) -> Result<Arc<dyn VirtualDisk>> {
    let d: Arc<dyn VirtualDisk> = match Layer::open(path, opts, false)? {
        Layer::Vhdx(d) => Arc::new(*d),
        Layer::Vhd(d) => Arc::new(*d),
    };
    if d.parent().is_some() {
        Ok(Arc::new(ChainView::new(d)))
    } else {
        Ok(d)
    }
}

/// Open the layers `files` (a chain's files, the top first) read-only,
/// each over the next, the last over `bottom` (already open: the disk the
/// last file's parent locator names). Returns the layers, the top first.
/// The links are not verified again: the caller opened the whole chain
/// once before (e.g. [`chain_files`]).
///
/// # Errors
/// A file cannot be opened, or does not fit over the disk below it.
pub fn open_over(
    files: &[PathBuf],
    bottom: Arc<dyn VirtualDisk>,
) -> Result<Vec<Arc<dyn VirtualDisk>>> {
    let mut below = bottom;
    let mut out: Vec<Arc<dyn VirtualDisk>> = Vec::with_capacity(files.len());
    for f in files.iter().rev() {
        let d: Arc<dyn VirtualDisk> = match detect(f)? {
            Format::Vhdx => Arc::new(Vhdx::open_with_parent(
                f,
                &vhdx::OpenOptions::default(),
                below,
            )?),
            Format::Vhd => Arc::new(Vhd::open_with_parent(
                f,
                &vhd::OpenOptions::default(),
                below,
            )?),
        };
        below = d.clone();
        out.push(d);
    }
    out.reverse();
    Ok(out)
}

/// The files of the chain of the image at `path`, the image first.
///
/// # Errors
/// As [`Layer::open`].
pub fn chain_files(path: &Path, policy: &ParentPolicy) -> Result<Vec<PathBuf>> {
    let top = Layer::open(
        path,
        &ChainOptions {
            writable: false,
            policy: policy.clone(),
        },
        false,
    )?;
    let mut out = vec![path.to_path_buf()];
    let mut cur = top.disk().parent().cloned();
    while let Some(p) = cur {
        out.push(PathBuf::from(p.storage().name()));
        cur = p.parent().cloned();
    }
    Ok(out)
}

/// Create a differencing image at `path` over the image at `parent` (same
/// format as the parent), overwriting an existing file, and close it. A
/// VHDX child is made from the parent's headers and metadata alone (the
/// parent's chain is not opened: the cost does not grow with the chain or
/// the disk); a VHD child from the parent's footer alone (its BAT, which
/// the VHD format sizes to the disk, is written out: 4 bytes per block).
///
/// # Errors
/// The parent cannot be read, I/O errors.
pub fn create_child(path: &Path, parent: &Path) -> Result<()> {
    match detect(parent)? {
        Format::Vhdx => {
            let mut o = vhdx::CreateOptions::new(0);
            o.block_size = vhdx::DEFAULT_DIFFERENCING_BLOCK_SIZE;
            Vhdx::create_differencing_file(path, parent, &o, true)
        }
        Format::Vhd => {
            Vhd::create_differencing_file(path, parent, &vhd::CreateOptions::new(0), true)
        }
    }
}

/// Make a spare child for [`create_vhd_child_using_spare`]: a blank child
/// of the VHD `parent` written to `spare` + `.tmp`, synced, then renamed to
/// `spare`, so a file at `spare` is always complete. (Only VHD needs one:
/// its child creation writes a BAT sized to the disk; a VHDX child costs
/// the same at any size.)
///
/// # Errors
/// The parent cannot be read or is no VHD, I/O errors.
pub fn make_spare(spare: &Path, parent: &Path) -> Result<()> {
    let mut tmp = spare.as_os_str().to_owned();
    tmp.push(".tmp");
    let tmp = PathBuf::from(tmp);
    Vhd::create_differencing_file(&tmp, parent, &vhd::CreateOptions::new(0), true)?;
    std::fs::rename(&tmp, spare).map_err(|e| {
        Error::io(format!("cannot rename to {}", spare.display()), e)
            .in_file(&tmp.display().to_string(), 0)
    })
}

/// [`create_child`] of the VHD `parent`, in O(1) when `spare` holds a
/// spare made by [`make_spare`] over a disk of the same size: the spare is
/// renamed to `path` and its header rewritten for `parent`
/// ([`Vhd::create_differencing_from_spare`]). Without a fitting spare, the
/// child is created from scratch. The spare is used up either way.
///
/// # Errors
/// As [`create_child`].
pub fn create_vhd_child_using_spare(path: &Path, parent: &Path, spare: &Path) -> Result<()> {
    if std::fs::rename(spare, path).is_ok()
        && Vhd::create_differencing_from_spare(path, parent, &vhd::CreateOptions::new(0))?
    {
        return Ok(());
    }
    create_child(path, parent)
}

/// Point the differencing image `child` at `parent`; see [`Vhdx::set_parent`]
/// and [`Vhd::set_parent`]. `adopt`: record the new parent's identity
/// (the caller guarantees the child reads the same through it).
///
/// # Errors
/// Not the child's parent (unless `adopt`), I/O errors.
pub fn set_parent(child: &Path, parent: &Path, adopt: bool, policy: &ParentPolicy) -> Result<()> {
    match detect(child)? {
        Format::Vhdx => Vhdx::set_parent(
            child,
            parent,
            adopt,
            &vhdx::OpenOptions {
                parent_policy: policy.clone(),
                ..vhdx::OpenOptions::default()
            },
        ),
        Format::Vhd => Vhd::set_parent(
            child,
            parent,
            adopt,
            &vhd::OpenOptions {
                parent_policy: policy.clone(),
                ..vhd::OpenOptions::default()
            },
        ),
    }
}
