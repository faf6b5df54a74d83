//! Creating any image: [`create`] and its options.

use crate::open::{image_of, Driver, Image};
use crate::Format;
use disk::{Error, Opener, ParentPolicy, RawDisk, Result};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use vhd::Vhd;
use vhdx::Vhdx;

/// What to create.
#[derive(Debug, Clone)]
pub enum Kind {
    /// A sparse raw file of `size` bytes.
    Raw {
        /// Virtual size in bytes.
        size: u64,
    },
    /// A VHDX (with a parent: a differencing VHDX, whose size and sector
    /// sizes are the parent's).
    Vhdx(vhdx::CreateOptions),
    /// A VHD (with a parent: a differencing VHD of the parent's size).
    Vhd(vhd::CreateOptions),
}

impl Kind {
    /// The format this creates.
    pub fn format(&self) -> Format {
        match self {
            Kind::Raw { .. } => Format::Raw,
            Kind::Vhdx(_) => Format::Vhdx,
            Kind::Vhd(_) => Format::Vhd,
        }
    }
}

/// How to create an image.
#[derive(Debug, Clone)]
pub struct CreateOptions {
    /// The format and its options.
    pub kind: Kind,
    /// Make a differencing disk over this image (VHDX over a VHDX, VHD over
    /// a VHD), opened read-only and never changed.
    pub parent: Option<PathBuf>,
    /// Which files the parent's own chain may lead to (the new image's
    /// directory is allowed too, as opening it will allow it).
    pub parent_policy: ParentPolicy,
    /// Replace an existing file (as qemu-img create does); by default an
    /// existing file is an error. A file another open holds is refused
    /// either way, untouched.
    pub overwrite: bool,
    /// How files are reached (real files by default; see [`disk::Opener`]).
    pub opener: Arc<dyn Opener>,
}

impl CreateOptions {
    /// Create `kind`: no parent, the default parent policy, no overwrite,
    /// real files.
    pub fn new(kind: Kind) -> CreateOptions {
        CreateOptions {
            kind,
            parent: None,
            parent_policy: ParentPolicy::default(),
            overwrite: false,
            opener: disk::file_opener(),
        }
    }
}

/// Create the image at `path` as `opts` says, and return it open for
/// writing.
///
/// # Errors
/// Invalid options (a raw or mismatched-format parent among them), the
/// file exists (without `overwrite`) or another open holds it, the parent
/// cannot be opened, I/O errors.
pub fn create(path: impl AsRef<Path>, opts: &CreateOptions) -> Result<Image> {
    let path = path.as_ref();
    let name = path.display().to_string();
    let driver = create_driver(path, opts).map_err(|e| e.in_file(&name, 0))?;
    Ok(image_of(opts.kind.format(), driver))
}

/// Create the image at `path` as `opts` says and close it, the cheapest
/// way: a differencing child is made from its parent's headers and
/// metadata (VHDX) or footer (VHD) alone, without opening the parent's
/// chain, so the cost does not grow with the chain or the disk (what a
/// checkpoint needs). The file is durable when this returns.
///
/// # Errors
/// As [`create`].
pub fn create_closed(path: impl AsRef<Path>, opts: &CreateOptions) -> Result<()> {
    let path = path.as_ref();
    let name = path.display().to_string();
    let Some(parent) = &opts.parent else {
        return create(path, opts)?.close();
    };
    match &opts.kind {
        Kind::Vhdx(o) => {
            let o = vhdx::CreateOptions {
                opener: opts.opener.clone(),
                ..o.clone()
            };
            Vhdx::create_differencing_file(path, parent, &o, opts.overwrite)
        }
        Kind::Vhd(o) => {
            let o = vhd::CreateOptions {
                opener: opts.opener.clone(),
                ..o.clone()
            };
            Vhd::create_differencing_file(path, parent, &o, opts.overwrite)
        }
        Kind::Raw { .. } => Err(Error::invalid(
            "a raw image cannot be a differencing disk (make a VHDX or VHD child)",
        )),
    }
    .map_err(|e| e.in_file(&name, 0))
}

fn create_driver(path: &Path, opts: &CreateOptions) -> Result<Driver> {
    Ok(match (&opts.kind, &opts.parent) {
        (Kind::Raw { size }, None) => {
            let st = opts.opener.create(path, opts.overwrite)?;
            Driver::Raw(Arc::new(RawDisk::create(st, *size)?))
        }
        (Kind::Raw { .. }, Some(_)) => {
            return Err(Error::invalid(
                "a raw image cannot be a differencing disk (make a VHDX or VHD child)",
            ))
        }
        (Kind::Vhdx(o), None) => {
            let o = vhdx::CreateOptions {
                opener: opts.opener.clone(),
                ..o.clone()
            };
            Driver::Vhdx(Arc::new(Vhdx::create(path, &o, opts.overwrite)?))
        }
        (Kind::Vhdx(o), Some(parent)) => {
            let o = vhdx::CreateOptions {
                opener: opts.opener.clone(),
                ..o.clone()
            };
            let mut policy = opts.parent_policy.clone();
            policy
                .allowed_dirs
                .push(disk::parent::dir_of(path).to_path_buf());
            let popts = vhdx::OpenOptions {
                parent_policy: policy,
                opener: opts.opener.clone(),
                ..vhdx::OpenOptions::default()
            };
            Driver::Vhdx(Arc::new(Vhdx::create_differencing(
                path,
                parent,
                &o,
                &popts,
                opts.overwrite,
            )?))
        }
        (Kind::Vhd(o), parent) => {
            let o = vhd::CreateOptions {
                opener: opts.opener.clone(),
                ..o.clone()
            };
            Driver::Vhd(Arc::new(match parent {
                None => Vhd::create(path, &o, opts.overwrite)?,
                Some(p) => Vhd::create_differencing(path, p, &o, opts.overwrite)?,
            }))
        }
    })
}
