//! Image formats: their names, and the format a file's name claims.

use std::fmt;
use std::path::Path;

/// An image format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Format {
    /// The virtual disk is the file itself.
    Raw,
    /// Microsoft VHDX (MS-VHDX v1.0): `.vhdx`, differencing `.avhdx`.
    Vhdx,
    /// Microsoft VHD, fixed, dynamic or differencing ("vpc" in qemu-img):
    /// `.vhd`, differencing `.avhd`.
    Vhd,
}

impl Format {
    /// The canonical name: `raw`, `vhdx` or `vhd`.
    pub fn name(self) -> &'static str {
        match self {
            Format::Raw => "raw",
            Format::Vhdx => "vhdx",
            Format::Vhd => "vhd",
        }
    }

    /// Parse a format name: `raw`, `vhdx`, `vhd` or its qemu-img alias
    /// `vpc` (any case).
    ///
    /// # Errors
    /// An unknown name, with the known ones.
    pub fn parse(s: &str) -> Result<Format, String> {
        match s.to_ascii_lowercase().as_str() {
            "raw" => Ok(Format::Raw),
            "vhdx" => Ok(Format::Vhdx),
            "vhd" | "vpc" => Ok(Format::Vhd),
            _ => Err(format!(
                "unknown image format '{s}' (known formats: raw, vhdx, vhd (alias vpc))"
            )),
        }
    }

    /// The format the name of `path` claims: `.vhdx` and `.avhdx` VHDX,
    /// `.vhd` and `.avhd` VHD (any case, as Windows picks the format by
    /// extension); `None` for any other name.
    pub fn claimed_by(path: &Path) -> Option<Format> {
        let ext = path.extension()?.to_str()?.to_ascii_lowercase();
        match ext.as_str() {
            "vhdx" | "avhdx" => Some(Format::Vhdx),
            "vhd" | "avhd" => Some(Format::Vhd),
            _ => None,
        }
    }

    /// The format for a new file at `path` when none is given: the one its
    /// name claims, raw for any other name.
    pub fn for_new_file(path: &Path) -> Format {
        Format::claimed_by(path).unwrap_or(Format::Raw)
    }

    /// "a raw image", "a VHDX", "a VHD" (for messages).
    pub fn describe(self) -> &'static str {
        match self {
            Format::Raw => "a raw image",
            Format::Vhdx => "a VHDX",
            Format::Vhd => "a VHD",
        }
    }
}

impl fmt::Display for Format {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_and_extensions() {
        for (n, f) in [
            ("raw", Format::Raw),
            ("VHDX", Format::Vhdx),
            ("vpc", Format::Vhd),
        ] {
            assert_eq!(Format::parse(n), Ok(f));
        }
        assert!(Format::parse("qcow2")
            .unwrap_err()
            .contains("known formats"));
        for (n, f) in [
            ("a.vhdx", Some(Format::Vhdx)),
            ("dir.d/B.AVHDX", Some(Format::Vhdx)),
            ("a.VHD", Some(Format::Vhd)),
            ("a.avhd", Some(Format::Vhd)),
            ("a.raw", None),
            ("vhdx", None),
            ("a.vhdx.bak", None),
        ] {
            assert_eq!(Format::claimed_by(Path::new(n)), f, "{n}");
        }
        assert_eq!(Format::for_new_file(Path::new("x.img")), Format::Raw);
        assert_eq!(Format::for_new_file(Path::new("x.avhdx")), Format::Vhdx);
    }
}
