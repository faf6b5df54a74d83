//! Opening any image: [`open`], its options and what it returns.

use crate::guard::ProbedRaw;
use crate::probe::probe;
use crate::Format;
use disk::{
    ChainView, Error, LockMode, Opener, ParentPolicy, RawDisk, Result, Storage, VirtualDisk,
};
use std::path::Path;
use std::sync::Arc;
use vhd::Vhd;
use vhdx::Vhdx;

/// The raw driver the front door opens.
pub type RawDriver = RawDisk<Box<dyn Storage>>;

/// How to open an image.
#[derive(Debug, Clone)]
pub struct OpenOptions {
    /// The format, or `None` to probe it from the content (see
    /// [`crate::probe()`], and why a VMM must give it). A probed raw image
    /// refuses writes to its first sector and writes that would make it
    /// probe as a fixed VHD ([`crate::guard`]).
    pub format: Option<Format>,
    /// Open for writing (the parents of a differencing disk are always
    /// read-only).
    pub writable: bool,
    /// Which files a differencing disk's parents may be
    /// ([`disk::parent`]).
    pub parent_policy: ParentPolicy,
    /// How the image and its parents are claimed against other opens
    /// ([`disk::lock`]): exclusively when writable, shared when not, by
    /// default.
    pub lock: LockMode,
    /// How files are reached (real files by default; see [`disk::Opener`]).
    pub opener: Arc<dyn Opener>,
    /// VHDX: writes keep the image's DataWriteGuid, so that its children
    /// stay linked to it. Only for writes that do not change what the
    /// image reads (copying its parent's data into it, a relink).
    pub keep_identity: bool,
}

impl OpenOptions {
    /// Open an image of `format`, read-only, under the default parent
    /// policy, locks and files.
    pub fn new(format: Format) -> OpenOptions {
        OpenOptions {
            format: Some(format),
            ..OpenOptions::probing()
        }
    }

    /// Open an image whose format is probed from its content
    /// ([`crate::probe()`]): for images the caller trusts, never for a
    /// disk a guest writes.
    pub fn probing() -> OpenOptions {
        OpenOptions {
            format: None,
            writable: false,
            parent_policy: ParentPolicy::default(),
            lock: LockMode::Auto,
            opener: disk::file_opener(),
            keep_identity: false,
        }
    }

    /// These options for the VHDX driver.
    pub fn vhdx(&self) -> vhdx::OpenOptions {
        vhdx::OpenOptions {
            writable: self.writable,
            parent_policy: self.parent_policy.clone(),
            keep_data_write_guid: self.keep_identity,
            lock: self.lock,
            opener: self.opener.clone(),
            ..vhdx::OpenOptions::default()
        }
    }

    /// These options for the VHD driver.
    pub fn vhd(&self) -> vhd::OpenOptions {
        vhd::OpenOptions {
            writable: self.writable,
            parent_policy: self.parent_policy.clone(),
            lock: self.lock,
            opener: self.opener.clone(),
            ..vhd::OpenOptions::default()
        }
    }
}

/// The driver of an open image's own file (its top layer), for what only
/// that format does (VHDX log state, VHD footer, compact, resize...).
#[derive(Clone)]
pub enum Driver {
    /// A raw file.
    Raw(Arc<RawDriver>),
    /// A VHDX image.
    Vhdx(Arc<Vhdx>),
    /// A VHD image.
    Vhd(Arc<Vhd>),
}

impl Driver {
    /// The driver as a disk (for a differencing disk: its own layer, which
    /// reads through its parent).
    pub fn disk(&self) -> Arc<dyn VirtualDisk> {
        match self {
            Driver::Raw(d) => d.clone(),
            Driver::Vhdx(d) => d.clone(),
            Driver::Vhd(d) => d.clone(),
        }
    }
}

/// An open image: its format and the disk to read and write.
pub struct Image {
    format: Format,
    probed: bool,
    driver: Driver,
    disk: Arc<dyn VirtualDisk>,
}

impl Image {
    fn new(format: Format, probed: bool, driver: Driver) -> Image {
        let top = driver.disk();
        let disk: Arc<dyn VirtualDisk> = match &driver {
            Driver::Raw(r) if probed => Arc::new(ProbedRaw::new(r.clone())),
            _ if top.parent().is_some() => Arc::new(ChainView::new(top)),
            _ => top,
        };
        Image {
            format,
            probed,
            driver,
            disk,
        }
    }

    /// The format (given or probed).
    pub fn format(&self) -> Format {
        self.format
    }

    /// Whether the format was probed rather than given.
    pub fn probed(&self) -> bool {
        self.probed
    }

    /// The disk: what to read and write. A differencing disk's whole chain
    /// behind one block view ([`ChainView`]); a probed raw image guarded.
    pub fn disk(&self) -> &Arc<dyn VirtualDisk> {
        &self.disk
    }

    /// The driver of the image's own file.
    pub fn driver(&self) -> &Driver {
        &self.driver
    }

    /// The VHDX driver, for a VHDX.
    pub fn vhdx(&self) -> Option<&Vhdx> {
        match &self.driver {
            Driver::Vhdx(d) => Some(d),
            _ => None,
        }
    }

    /// The VHD driver, for a VHD.
    pub fn vhd(&self) -> Option<&Vhd> {
        match &self.driver {
            Driver::Vhd(d) => Some(d),
            _ => None,
        }
    }

    /// The image's own file.
    pub fn storage(&self) -> &dyn Storage {
        match &self.driver {
            Driver::Raw(d) => d.storage(),
            Driver::Vhdx(d) => d.storage(),
            Driver::Vhd(d) => d.storage(),
        }
    }

    /// Flush, close cleanly ([`VirtualDisk::close`]) and let go of the
    /// image: its file and image lock are released once no disk taken from
    /// it ([`Image::disk`]) is left. A disk still shared can be closed
    /// through [`VirtualDisk::close`] (`&self`, idempotent).
    ///
    /// # Errors
    /// I/O errors.
    pub fn close(self) -> Result<()> {
        self.disk.close()
    }

    /// The driver alone, once this image and every disk taken from it are
    /// dropped but the returned one: for operations that restructure the
    /// file (compact, resize) and need the driver to themselves.
    pub fn into_driver(self) -> Driver {
        self.driver
    }
}

impl Driver {
    /// The VHDX driver, owned: the image must no longer be shared.
    ///
    /// # Errors
    /// Not a VHDX, or another handle still shares it.
    pub fn into_vhdx(self) -> Result<Vhdx> {
        match self {
            Driver::Vhdx(d) => Arc::try_unwrap(d).map_err(|d| still_shared(d.storage())),
            other => Err(not_format(other.storage(), "VHDX")),
        }
    }

    /// The VHD driver, owned: the image must no longer be shared.
    ///
    /// # Errors
    /// Not a VHD, or another handle still shares it.
    pub fn into_vhd(self) -> Result<Vhd> {
        match self {
            Driver::Vhd(d) => Arc::try_unwrap(d).map_err(|d| still_shared(d.storage())),
            other => Err(not_format(other.storage(), "VHD")),
        }
    }

    fn storage(&self) -> &dyn Storage {
        match self {
            Driver::Raw(d) => d.storage(),
            Driver::Vhdx(d) => d.storage(),
            Driver::Vhd(d) => d.storage(),
        }
    }
}

fn still_shared(st: &dyn Storage) -> Error {
    Error::invalid("the image is still in use by another handle of this process")
        .in_file(st.name(), 0)
}

fn not_format(st: &dyn Storage, what: &str) -> Error {
    Error::invalid(format!("not a {what}")).in_file(st.name(), 0)
}

/// Open the image at `path`: the given format or, with `format: None`, the
/// probed one; a differencing disk with its chain (parents found under the
/// parent policy, opened read-only through the same opener and locks).
///
/// ```
/// use disk::VirtualDisk;
/// let dir = tempfile::tempdir().unwrap();
/// let path = dir.path().join("d.vhdx");
/// let opts = image::CreateOptions::new(image::Kind::Vhdx(vhdx::CreateOptions::new(8 << 20)));
/// image::create(&path, &opts).unwrap().close().unwrap();
/// let img = image::open(&path, &image::OpenOptions::new(image::Format::Vhdx).writable()).unwrap();
/// img.disk().write_at(b"hello", 4096).unwrap();
/// img.close().unwrap();
/// ```
///
/// # Errors
/// The file cannot be opened or is locked by another open, probing refuses
/// a damaged VHD or VHDX, the image is corrupt, a parent is missing or
/// refused by the policy.
pub fn open(path: impl AsRef<Path>, opts: &OpenOptions) -> Result<Image> {
    let path = path.as_ref();
    let (format, probed) = match opts.format {
        Some(f) => (f, false),
        None => (probe(path, &*opts.opener)?, true),
    };
    let driver = match format {
        Format::Raw => Driver::Raw(Arc::new(RawDisk::new(opts.opener.open(
            path,
            opts.writable,
            opts.lock,
        )?)?)),
        Format::Vhdx => Driver::Vhdx(Arc::new(Vhdx::open(path, &opts.vhdx())?)),
        Format::Vhd => Driver::Vhd(Arc::new(Vhd::open(path, &opts.vhd())?)),
    };
    Ok(Image::new(format, probed, driver))
}

impl OpenOptions {
    /// These options, writable.
    pub fn writable(mut self) -> OpenOptions {
        self.writable = true;
        self
    }
}

/// An [`Image`] made from a driver opened elsewhere (create).
pub(crate) fn image_of(format: Format, driver: Driver) -> Image {
    Image::new(format, false, driver)
}
