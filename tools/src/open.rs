//! Image formats: naming them, detecting them from content, opening and
//! creating images, and closing them durably.

use crate::guessed::RawImage;
use anyhow::Result;
use disk::{FileStorage, LockMode, ParentPolicy, RawDisk, VirtualDisk};
use std::fs::File;
use std::path::Path;
use std::sync::OnceLock;
use vhd::Vhd;
use vhdx::Vhdx;

/// The parent policy of this run (from `--parent-dir` and
/// `--allow-any-parent`), set once by `main`.
static POLICY: OnceLock<ParentPolicy> = OnceLock::new();

/// Set the parent policy of this run (the first call wins).
pub fn set_policy(policy: ParentPolicy) {
    let _ = POLICY.set(policy);
}

/// Which parent files differencing images may lead to: by default only
/// files under the directory of the image opened.
pub fn policy() -> &'static ParentPolicy {
    POLICY.get_or_init(ParentPolicy::default)
}

/// How this run's read-only opens claim their images (`-U` makes it
/// [`LockMode::ForceShare`]), set once by `main`.
static READ_LOCK: OnceLock<LockMode> = OnceLock::new();

/// Set how this run's read-only opens claim their images (the first call wins).
pub fn set_read_lock(mode: LockMode) {
    let _ = READ_LOCK.set(mode);
}

/// How a read-only open claims its image: shared (the default), or
/// force-share with `-U`. Writable opens always claim it exclusively.
pub fn read_lock() -> LockMode {
    *READ_LOCK.get_or_init(LockMode::default)
}

/// The lock mode of an open, read-only unless `writable`.
pub fn lock_for(writable: bool) -> LockMode {
    if writable {
        LockMode::Auto
    } else {
        read_lock()
    }
}

/// An image format name as given on the command line.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    /// The virtual disk is the file itself.
    Raw,
    /// Microsoft VHDX.
    Vhdx,
    /// Microsoft VHD ("vpc" in qemu-img): fixed, dynamic or differencing.
    Vhd,
}

impl Format {
    /// The canonical name.
    pub fn name(self) -> &'static str {
        match self {
            Format::Raw => "raw",
            Format::Vhdx => "vhdx",
            Format::Vhd => "vhd",
        }
    }

    /// Parse a format name (clap value parser): `raw`, `vhdx`, `vhd` or `vpc`.
    pub fn parse_arg(s: &str) -> Result<Format, String> {
        match s.to_ascii_lowercase().as_str() {
            "raw" => Ok(Format::Raw),
            "vhdx" => Ok(Format::Vhdx),
            "vhd" | "vpc" => Ok(Format::Vhd),
            _ => Err(format!(
                "unknown image format '{s}' (known formats: raw, vhdx, vhd (alias vpc))"
            )),
        }
    }
}

impl From<checkpoint::Format> for Format {
    fn from(f: checkpoint::Format) -> Format {
        match f {
            checkpoint::Format::Vhdx => Format::Vhdx,
            checkpoint::Format::Vhd => Format::Vhd,
        }
    }
}

/// The format of a new image at `path`: `given` (`flag`, -f or -O), or
/// the one its name claims (`.vhdx`/`.avhdx` VHDX, `.vhd`/`.avhd` VHD, any
/// case), raw for any other name. Says on stderr which format a missing
/// `flag` gave, and warns when `given` contradicts the name (Windows goes
/// by the name, and `vdisk` refuses a `.vhdx` or `.vhd` file without its
/// signature unless -f raw).
pub fn new_image_format(path: &Path, given: Option<Format>, flag: &str) -> Format {
    let claim = checkpoint::detect::claimed(path).map(Format::from);
    let n = path.display();
    match (given, claim) {
        (Some(f), Some(c)) if f != c => {
            let why = if f == Format::Raw {
                "opening it will need -f raw (a file so named without the signature is refused \
                 as damaged)"
            } else {
                "Windows, which goes by the name, will not open it"
            };
            eprintln!(
                "vdisk: warning: {n} will be {} although its name says it is {}: {why}",
                describe(f),
                describe(c)
            );
            f
        }
        (Some(f), _) => f,
        (None, Some(c)) => {
            eprintln!(
                "vdisk: note: no {flag} given: format {}, from the name {n}",
                c.name()
            );
            c
        }
        (None, None) => {
            eprintln!(
                "vdisk: note: no {flag} given: format raw (the name {n} does not end in .vhdx, \
                 .avhdx, .vhd or .avhd)"
            );
            Format::Raw
        }
    }
}

/// A format's name for messages ("a raw image", "a VHDX").
pub fn describe(f: Format) -> &'static str {
    match f {
        Format::Raw => "a raw image",
        Format::Vhdx => "a VHDX",
        Format::Vhd => "a VHD",
    }
}

/// Guess the format of the file at `path` from its content: VHDX when it
/// starts with "vhdxfile"; VHD when it starts with "conectix" (dynamic and
/// differencing disks) or its last 512 (or, for old images, 511) bytes
/// start with it (fixed disks); else raw, unless the name says VHDX or VHD:
/// such a file is refused as corrupt, saying what survives and how to go
/// on (see [`checkpoint::detect::sniff`]).
pub fn detect(path: &Path) -> Result<Format> {
    match checkpoint::detect::sniff(path) {
        Ok(f) => Ok(f.map_or(Format::Raw, Format::from)),
        Err(disk::Error::Corrupt {
            file,
            structure,
            offset,
            msg,
        }) => {
            let f = match checkpoint::detect::claimed(path) {
                Some(checkpoint::Format::Vhd) => "vhd",
                _ => "vhdx",
            };
            let n = path.display();
            Err(disk::Error::Corrupt {
                file,
                structure,
                offset,
                msg: format!(
                    "{msg}. To go on: `vdisk check -f {f} {n}` reports what is damaged (with \
                     -r all it restores a lost VHDX signature when a header and a region table \
                     are intact, and a VHD footer from its copy or when only its cookie was \
                     lost), then `vdisk convert --salvage \
                     -f {f}` copies out what can be read; or -f raw uses the file as a raw image \
                     anyway"
                ),
            }
            .into())
        }
        Err(e) => Err(e.into()),
    }
}

/// The format to use for `path`: `given`, or detected from the content.
pub fn resolve(path: &Path, given: Option<Format>) -> Result<Format> {
    match given {
        Some(f) => Ok(f),
        None => detect(path),
    }
}

/// An open image of any supported format.
pub enum Image {
    /// A raw file (guarded when its format was guessed).
    Raw(RawImage),
    /// A VHDX image (boxed: it is much larger than a raw disk).
    Vhdx(Box<Vhdx>),
    /// A VHD image.
    Vhd(Box<Vhd>),
}

impl Image {
    /// The image as a virtual disk.
    pub fn disk(&self) -> &dyn VirtualDisk {
        match self {
            Image::Raw(d) => d,
            Image::Vhdx(d) => &**d,
            Image::Vhd(d) => &**d,
        }
    }

    /// Flush everything and close: for VHDX, also leave a clean header.
    pub fn close(self) -> Result<()> {
        match self {
            Image::Raw(d) => d.flush()?,
            Image::Vhdx(d) => d.close()?,
            Image::Vhd(d) => d.close()?,
        }
        Ok(())
    }
}

/// How to open a VHDX: read-only unless `writable`, under the parent policy.
pub fn vhdx_options(writable: bool) -> vhdx::OpenOptions {
    vhdx::OpenOptions {
        writable,
        parent_policy: policy().clone(),
        lock: lock_for(writable),
        ..vhdx::OpenOptions::default()
    }
}

/// How to open a VHD: read-only unless `writable`, under the parent policy.
pub fn vhd_options(writable: bool) -> vhd::OpenOptions {
    vhd::OpenOptions {
        writable,
        parent_policy: policy().clone(),
        lock: lock_for(writable),
        ..vhd::OpenOptions::default()
    }
}

/// Open the image at `path` (format given or detected), read-only unless `writable`.
pub fn open(path: &Path, format: Option<Format>, writable: bool) -> Result<Image> {
    Ok(match resolve(path, format)? {
        Format::Raw => Image::Raw(RawImage::open(path, writable, format.is_none())?),
        Format::Vhdx => Image::Vhdx(Box::new(Vhdx::open(path, &vhdx_options(writable))?)),
        Format::Vhd => Image::Vhd(Box::new(Vhd::open(path, &vhd_options(writable))?)),
    })
}

/// Create (or overwrite, like qemu-img) a sparse raw image of `size` bytes.
pub fn create_raw(path: &Path, size: u64) -> Result<Image> {
    let storage = FileStorage::create(path, true)?;
    Ok(Image::Raw(RawImage::new(
        RawDisk::create(storage, size)?,
        false,
    )))
}

/// Create (or overwrite, like qemu-img) a VHDX image.
pub fn create_vhdx(path: &Path, opts: &vhdx::CreateOptions) -> Result<Image> {
    let name = path.display().to_string();
    let disk = Vhdx::create(path, opts, true).map_err(|e| e.in_file(&name, 0))?;
    Ok(Image::Vhdx(Box::new(disk)))
}

/// Create (or overwrite, like qemu-img) a VHD image.
pub fn create_vhd(path: &Path, opts: &vhd::CreateOptions) -> Result<Image> {
    let name = path.display().to_string();
    let disk = Vhd::create(path, opts, true).map_err(|e| e.in_file(&name, 0))?;
    Ok(Image::Vhd(Box::new(disk)))
}

/// Create (or overwrite, like qemu-img) a differencing VHD over `parent`.
pub fn create_vhd_differencing(
    path: &Path,
    parent: &Path,
    opts: &vhd::CreateOptions,
) -> Result<Image> {
    let name = path.display().to_string();
    let disk =
        Vhd::create_differencing(path, parent, opts, true).map_err(|e| e.in_file(&name, 0))?;
    Ok(Image::Vhd(Box::new(disk)))
}

/// Create (or overwrite, like qemu-img) a differencing VHDX over `parent`.
/// The parent's chain is opened under the parent policy, with the child's
/// directory allowed too (opening the child will allow it).
pub fn create_vhdx_differencing(
    path: &Path,
    parent: &Path,
    opts: &vhdx::CreateOptions,
) -> Result<Image> {
    let name = path.display().to_string();
    let mut popts = vhdx_options(false);
    let dir = disk::parent::dir_of(path);
    popts.parent_policy.allowed_dirs.push(dir.to_path_buf());
    let disk = Vhdx::create_differencing(path, parent, opts, &popts, true)
        .map_err(|e| e.in_file(&name, 0))?;
    Ok(Image::Vhdx(Box::new(disk)))
}

/// Make the directory entry of a newly created `path` durable.
pub fn sync_parent_dir(path: &Path) -> Result<()> {
    let dir = disk::parent::dir_of(path);
    let name = dir.display().to_string();
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(|e| disk::Error::io("cannot sync directory", e).in_file(&name, 0))?;
    Ok(())
}
