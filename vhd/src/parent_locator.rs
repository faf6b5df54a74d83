//! Parent locator entries ("Parent Locator Entries" in the Virtual Hard Disk
//! Image Format Specification, 2006): the eight 24-byte entries of the
//! dynamic disk header (from offset 576) that say where a differencing
//! disk's parent file is, and the locator data they point at.
//!
//! Each entry is big-endian: platform code (4 bytes), platform data space
//! (4), platform data length (4), reserved (4), platform data offset (8).
//! The data is the parent's path, encoded by platform code:
//!
//! | code   | data                                                   |
//! |--------|--------------------------------------------------------|
//! | `W2ru` | path relative to the child's directory, UTF-16LE       |
//! | `W2ku` | absolute path, UTF-16LE                                |
//! | `Wi2r` | relative path, ANSI (deprecated; read as UTF-8)        |
//! | `Wi2k` | absolute path, ANSI (deprecated; read as UTF-8)        |
//! | `Mac ` | a Mac OS alias blob (not decoded)                      |
//! | `MacX` | a file URL, UTF-8                                      |
//!
//! Windows writes `W2ku` and `W2ru`, and so does this library.

use crate::dynamic_header::DynamicHeader;
use crate::footer::{arr, be32, be64, fourcc};
use crate::image::read_vec;
use crate::{Error, Result};
use disk::Storage;

/// Size of one parent locator entry.
pub const SIZE: usize = 24;
/// Largest locator data read or written (real paths are a few hundred
/// bytes).
pub const MAX_DATA: u32 = 64 * 1024;

/// Platform code: path relative to the child's directory, UTF-16LE.
pub const W2RU: [u8; 4] = *b"W2ru";
/// Platform code: absolute path, UTF-16LE.
pub const W2KU: [u8; 4] = *b"W2ku";
/// Platform code (deprecated): relative path, ANSI.
pub const WI2R: [u8; 4] = *b"Wi2r";
/// Platform code (deprecated): absolute path, ANSI.
pub const WI2K: [u8; 4] = *b"Wi2k";
/// Platform code: Mac OS alias blob.
pub const MAC: [u8; 4] = *b"Mac ";
/// Platform code: Mac OS X file URL, UTF-8.
pub const MACX: [u8; 4] = *b"MacX";

const STRUCT: &str = "VHD parent locator";

/// One parent locator entry.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct ParentLocator {
    /// Platform code: [`W2RU`]/[`W2KU`] (UTF-16LE relative/absolute Windows
    /// path), [`WI2R`]/[`WI2K`] (deprecated, ANSI relative/absolute path),
    /// [`MAC`] (alias blob), [`MACX`] (UTF-8 file URL), or zero for none.
    pub platform_code: [u8; 4],
    /// Space reserved for the locator data. The specification counts it in
    /// 512-byte sectors, but old Virtual PC images store a byte count; see
    /// [`ParentLocator::data_space_bytes`].
    pub data_space: u32,
    /// Length of the locator data in bytes.
    pub data_length: u32,
    /// Reserved (should be zero; kept for exact round trips).
    pub reserved: u32,
    /// Absolute file offset of the locator data.
    pub data_offset: u64,
}

impl ParentLocator {
    /// Parse an entry from its 24 bytes (any platform code is kept; which
    /// ones name a path is decided by [`ParentLocator::decode_path`]).
    ///
    /// # Errors
    /// [`crate::ErrorKind::Corrupt`] when `b` is shorter than 24 bytes.
    pub fn parse(b: &[u8]) -> Result<Self> {
        if b.len() < SIZE {
            return Err(Error::corrupt(
                STRUCT,
                0,
                format!("entry is {} bytes, expected {SIZE}", b.len()),
            ));
        }
        Ok(ParentLocator {
            platform_code: arr(b, 0),
            data_space: be32(b, 4),
            data_length: be32(b, 8),
            reserved: be32(b, 12),
            data_offset: be64(b, 16),
        })
    }

    /// Write the entry into the first 24 bytes of `b`.
    ///
    /// # Panics
    /// If `b` is shorter than 24 bytes (a caller bug).
    pub fn write_to(&self, b: &mut [u8]) {
        let b = &mut b[..SIZE];
        b[0..4].copy_from_slice(&self.platform_code);
        b[4..8].copy_from_slice(&self.data_space.to_be_bytes());
        b[8..12].copy_from_slice(&self.data_length.to_be_bytes());
        b[12..16].copy_from_slice(&self.reserved.to_be_bytes());
        b[16..24].copy_from_slice(&self.data_offset.to_be_bytes());
    }

    /// Whether this entry is unused (platform code zero).
    pub fn is_empty(&self) -> bool {
        self.platform_code == [0; 4]
    }

    /// The reserved space in bytes: `data_space` sectors, except that values
    /// of 512 and more are taken as a byte count (old Virtual PC images write
    /// bytes; no real locator needs 256 KiB).
    pub fn data_space_bytes(&self) -> u64 {
        if self.data_space >= 512 {
            u64::from(self.data_space)
        } else {
            u64::from(self.data_space) * 512
        }
    }

    /// Decode this locator's data (read from `data_offset`, `data_length`
    /// bytes) as a path, by platform code. `None` for `Mac ` aliases, empty
    /// entries and undecodable data.
    pub fn decode_path(&self, data: &[u8]) -> Option<String> {
        let s = match self.platform_code {
            W2RU | W2KU => {
                let units: Vec<u16> = data
                    .chunks_exact(2)
                    .map(|c| u16::from_le_bytes([c[0], c[1]]))
                    .collect();
                String::from_utf16(&units).ok()?
            }
            WI2R | WI2K | MACX => String::from_utf8(data.to_vec()).ok()?,
            _ => return None,
        };
        let s = s.trim_end_matches('\0').to_string();
        if s.is_empty() {
            None
        } else {
            Some(s)
        }
    }
}

/// The locator data of a `W2ku` or `W2ru` entry naming `path`: UTF-16LE,
/// no terminator.
pub fn encode_path(path: &str) -> Vec<u8> {
    path.encode_utf16().flat_map(u16::to_le_bytes).collect()
}

/// Read and decode the parent locators of a differencing disk whose file
/// is `file_len` bytes: `(platform code, path)` in entry order (bounded;
/// undecodable or out-of-file entries are skipped).
pub(crate) fn read_locators(
    storage: &dyn Storage,
    h: &DynamicHeader,
    file_len: u64,
) -> Vec<(String, String)> {
    let mut out = Vec::new();
    for (_, l) in h.locators() {
        if l.data_length == 0 || l.data_length > MAX_DATA {
            continue;
        }
        let len = u64::from(l.data_length);
        if l.data_offset.checked_add(len).is_none_or(|e| e > file_len) {
            continue;
        }
        let Ok(data) = read_vec(storage, l.data_offset, len) else {
            continue;
        };
        if let Some(p) = l.decode_path(&data) {
            out.push((fourcc(&l.platform_code), p));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn roundtrip_and_short_entry() {
        let l = ParentLocator {
            platform_code: W2KU,
            data_space: 0x1000,
            data_length: 42,
            reserved: 7,
            data_offset: 0x1_0000_1200,
        };
        let mut b = [0u8; SIZE];
        l.write_to(&mut b);
        assert_eq!(&b[..4], b"W2ku");
        assert_eq!(&b[4..8], &[0, 0, 0x10, 0]);
        assert_eq!(&b[16..24], &[0, 0, 0, 1, 0, 0, 0x12, 0]);
        assert_eq!(ParentLocator::parse(&b).unwrap(), l);
        let e = ParentLocator::parse(&b[..23]).unwrap_err();
        assert_eq!(e.kind(), crate::ErrorKind::Corrupt);
        assert!(e.to_string().contains("23 bytes"), "{e}");
    }

    #[test]
    fn data_space_in_sectors_or_bytes() {
        let l = |data_space| ParentLocator {
            data_space,
            ..Default::default()
        };
        assert_eq!(l(1).data_space_bytes(), 512);
        assert_eq!(l(8).data_space_bytes(), 4096);
        assert_eq!(l(0x200).data_space_bytes(), 512);
        assert_eq!(l(0x10000).data_space_bytes(), 0x10000);
    }

    #[test]
    fn decode_locator_paths() {
        let l = ParentLocator {
            platform_code: W2RU,
            ..Default::default()
        };
        assert_eq!(l.decode_path(&encode_path(".\\a.vhd")).unwrap(), ".\\a.vhd");
        let l = ParentLocator {
            platform_code: WI2K,
            ..Default::default()
        };
        assert_eq!(l.decode_path(b"C:\\x.vhd\0").unwrap(), "C:\\x.vhd");
        let l = ParentLocator {
            platform_code: MAC,
            ..Default::default()
        };
        assert_eq!(l.decode_path(b"xx"), None);
        let l = ParentLocator::default();
        assert!(l.is_empty());
        assert_eq!(l.decode_path(b"x"), None);
    }
}
