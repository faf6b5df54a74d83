//! Image formats: naming them, detecting them from content, opening and
//! creating images, and closing them durably.

use anyhow::{anyhow, bail, Result};
use disk::{FileStorage, RawDisk, VirtualDisk};
use std::fs::File;
use std::io::Read;
use std::path::Path;
use vhdx::{CreateOptions, OpenOptions, Vhdx};

/// An image format name as given on the command line.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    /// The virtual disk is the file itself.
    Raw,
    /// Microsoft VHDX.
    Vhdx,
    /// Microsoft VHD ("vpc" in qemu-img); recognised but not implemented yet.
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
                "unknown image format '{s}' (known formats: raw, vhdx, vhd)"
            )),
        }
    }
}

/// The error for every VHD request until VHD support lands.
pub fn vhd_unsupported() -> anyhow::Error {
    anyhow!("VHD support is not implemented yet")
}

/// VHDX file type identifier signature (MS-VHDX 2.2.1).
const VHDX_SIGNATURE: &[u8; 8] = b"vhdxfile";
/// VHD footer cookie; dynamic VHDs start with a copy of the footer.
const VHD_COOKIE: &[u8; 8] = b"conectix";

/// Guess the format of the file at `path` from its first bytes: VHDX when
/// they are "vhdxfile", VHD when they are "conectix", else raw.
pub fn detect(path: &Path) -> Result<Format> {
    let name = path.display().to_string();
    let mut file =
        File::open(path).map_err(|e| disk::Error::io("cannot open", e).in_file(&name, 0))?;
    let mut magic = Vec::with_capacity(8);
    file.by_ref()
        .take(8)
        .read_to_end(&mut magic)
        .map_err(|e| disk::Error::io("cannot read the first bytes", e).in_file(&name, 0))?;
    Ok(if magic == VHDX_SIGNATURE {
        Format::Vhdx
    } else if magic == VHD_COOKIE {
        Format::Vhd
    } else {
        Format::Raw
    })
}

/// The format to use for `path`: `given`, or detected from the content.
pub fn resolve(path: &Path, given: Option<Format>) -> Result<Format> {
    let fmt = match given {
        Some(f) => f,
        None => detect(path)?,
    };
    if fmt == Format::Vhd {
        if given.is_none() {
            bail!(
                "{}: this is a VHD image; VHD support is not implemented yet",
                path.display()
            );
        }
        return Err(vhd_unsupported());
    }
    Ok(fmt)
}

/// An open image of any supported format.
pub enum Image {
    /// A raw file.
    Raw(RawDisk<FileStorage>),
    /// A VHDX image (boxed: it is much larger than a raw disk).
    Vhdx(Box<Vhdx>),
}

impl Image {
    /// The image as a virtual disk.
    pub fn disk(&self) -> &dyn VirtualDisk {
        match self {
            Image::Raw(d) => d,
            Image::Vhdx(d) => &**d,
        }
    }

    /// Flush everything and close: for VHDX, also leave a clean header.
    pub fn close(self) -> Result<()> {
        match self {
            Image::Raw(d) => d.flush()?,
            Image::Vhdx(d) => d.close()?,
        }
        Ok(())
    }
}

/// Open the image at `path` (format given or detected), read-only unless `writable`.
pub fn open(path: &Path, format: Option<Format>, writable: bool) -> Result<Image> {
    Ok(match resolve(path, format)? {
        Format::Raw => Image::Raw(RawDisk::new(FileStorage::open(path, writable)?)?),
        Format::Vhdx => Image::Vhdx(Box::new(Vhdx::open(
            path,
            &OpenOptions {
                writable,
                ..OpenOptions::default()
            },
        )?)),
        Format::Vhd => return Err(vhd_unsupported()),
    })
}

/// Create (or overwrite, like qemu-img) a sparse raw image of `size` bytes.
pub fn create_raw(path: &Path, size: u64) -> Result<Image> {
    let storage = FileStorage::create(path, true)?;
    Ok(Image::Raw(RawDisk::create(storage, size)?))
}

/// Create (or overwrite, like qemu-img) a VHDX image.
pub fn create_vhdx(path: &Path, opts: &CreateOptions) -> Result<Image> {
    let name = path.display().to_string();
    let disk = Vhdx::create(path, opts, true).map_err(|e| e.in_file(&name, 0))?;
    Ok(Image::Vhdx(Box::new(disk)))
}

/// Make the directory entry of a newly created `path` durable.
pub fn sync_parent_dir(path: &Path) -> Result<()> {
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    let name = dir.display().to_string();
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(|e| disk::Error::io("cannot sync directory", e).in_file(&name, 0))?;
    Ok(())
}
