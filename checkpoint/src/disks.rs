//! The disks of a bundle: their format, and making the new child of a
//! checkpoint (from scratch, or from a VHD bundle's spare).

use crate::{Error, Result};
use disk::Opener;
use std::path::{Path, PathBuf};
use vhd::Vhd;

/// The format of a bundle's disks (recorded in its manifest): one that
/// has differencing disks.
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

    /// The image format (for the front door, [`image`]).
    pub fn image(self) -> image::Format {
        match self {
            Format::Vhdx => image::Format::Vhdx,
            Format::Vhd => image::Format::Vhd,
        }
    }

    /// The bundle format of an image format; `None` for raw, which has no
    /// differencing disks.
    pub fn of(f: image::Format) -> Option<Format> {
        match f {
            image::Format::Vhdx => Some(Format::Vhdx),
            image::Format::Vhd => Some(Format::Vhd),
            image::Format::Raw => None,
        }
    }
}

/// The format of the VHDX or VHD file at `path`, probed from its content
/// (see [`image::sniff`]): bundle disks are files the bundle made.
///
/// # Errors
/// The file cannot be read, is neither VHDX nor VHD, or is named as one
/// but lacks its signature (corrupt).
pub fn detect(path: &Path, opener: &dyn Opener) -> Result<Format> {
    image::sniff(path, opener)?
        .and_then(Format::of)
        .ok_or_else(|| {
            Error::invalid("not a VHDX or VHD image").in_file(&path.display().to_string(), 0)
        })
}

/// Create a differencing image of `format` at `path` over the image at
/// `parent`, overwriting an existing file, and close it. A VHDX child is
/// made from the parent's headers and metadata alone (the parent's chain
/// is not opened: the cost does not grow with the chain or the disk); a
/// VHD child from the parent's footer alone (its BAT, which the VHD format
/// sizes to the disk, is written out: 4 bytes per block).
///
/// # Errors
/// The parent cannot be read, I/O errors.
pub fn create_child(
    format: Format,
    path: &Path,
    parent: &Path,
    opener: &std::sync::Arc<dyn Opener>,
) -> Result<()> {
    let kind = match format {
        Format::Vhdx => {
            let mut o = vhdx::CreateOptions::new(0);
            o.block_size = vhdx::DEFAULT_DIFFERENCING_BLOCK_SIZE;
            image::Kind::Vhdx(o)
        }
        Format::Vhd => image::Kind::Vhd(vhd::CreateOptions::new(0)),
    };
    let opts = image::CreateOptions {
        parent: Some(parent.to_path_buf()),
        overwrite: true,
        opener: opener.clone(),
        ..image::CreateOptions::new(kind)
    };
    image::create_closed(path, &opts)
}

fn vhd_options(opener: &std::sync::Arc<dyn Opener>) -> vhd::CreateOptions {
    let mut o = vhd::CreateOptions::new(0);
    o.opener = opener.clone();
    o
}

/// Make a spare child for [`create_vhd_child_using_spare`]: a blank child
/// of the VHD `parent` written to `spare` + `.tmp`, synced, then renamed to
/// `spare`, so a file at `spare` is always complete. (Only VHD needs one:
/// its child creation writes a BAT sized to the disk; a VHDX child costs
/// the same at any size.)
///
/// # Errors
/// The parent cannot be read or is no VHD, I/O errors.
pub fn make_spare(spare: &Path, parent: &Path, opener: &std::sync::Arc<dyn Opener>) -> Result<()> {
    let mut tmp = spare.as_os_str().to_owned();
    tmp.push(".tmp");
    let tmp = PathBuf::from(tmp);
    create_child(Format::Vhd, &tmp, parent, opener)?;
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
pub fn create_vhd_child_using_spare(
    path: &Path,
    parent: &Path,
    spare: &Path,
    opener: &std::sync::Arc<dyn Opener>,
) -> Result<()> {
    if std::fs::rename(spare, path).is_ok()
        && Vhd::create_differencing_from_spare(path, parent, &vhd_options(opener))?
    {
        return Ok(());
    }
    create_child(Format::Vhd, path, parent, opener)
}
