//! The dynamic disk header ("Dynamic Disk Header Format" in the Virtual Hard
//! Disk Image Format Specification, 2006), which holds the parent locator
//! entries ([`crate::parent_locator`]).
//!
//! Dynamic and differencing disks carry this 1024-byte structure at the
//! footer's data offset (usually 512). All fields are big-endian, except the
//! parent's Unicode name, which is UTF-16 big-endian.

use crate::footer::{arr, be32, be64, checksum, fourcc};
use crate::parent_locator::{self, ParentLocator};
use crate::{Error, Result};
use uuid::Uuid;

/// Size of the header in bytes.
pub const HEADER_SIZE: usize = 1024;
/// The header cookie.
pub const COOKIE: &[u8; 8] = b"cxsparse";
/// The only header version defined (1.0).
pub const VERSION: u32 = 0x0001_0000;
/// Number of parent locator entries.
pub const LOCATORS: usize = 8;
/// Offset of the first parent locator entry in the header.
pub const LOCATOR_TABLE_OFFSET: usize = 576;
/// Size of the parent Unicode name field.
pub const PARENT_NAME_SIZE: usize = 512;

const STRUCT: &str = "VHD dynamic disk header";

/// The dynamic disk header.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DynamicHeader {
    /// Unused; all ones.
    pub data_offset: u64,
    /// Absolute file offset of the block allocation table.
    pub table_offset: u64,
    /// Header version (0x00010000).
    pub header_version: u32,
    /// Number of BAT entries.
    pub max_table_entries: u32,
    /// Bytes of data per block (a power of two, 2 MiB by default); each
    /// block is preceded by its sector bitmap.
    pub block_size: u32,
    /// The stored checksum (verified by parse, recomputed by write_to).
    pub checksum: u32,
    /// Differencing disks: the parent's footer unique id.
    pub parent_unique_id: Uuid,
    /// Differencing disks: the parent's modification time (seconds since 2000).
    pub parent_timestamp: u32,
    /// Reserved field at offset 60 (kept for exact round trips).
    pub reserved1: u32,
    /// Differencing disks: the parent's file name, UTF-16BE, NUL-padded
    /// (raw bytes; see [`DynamicHeader::parent_name`]).
    pub parent_unicode_name: [u8; PARENT_NAME_SIZE],
    /// Differencing disks: where to find the parent.
    pub parent_locators: [ParentLocator; LOCATORS],
}

impl DynamicHeader {
    /// A header for a new dynamic disk (no parent).
    pub fn new(table_offset: u64, max_table_entries: u32, block_size: u32) -> Self {
        DynamicHeader {
            data_offset: u64::MAX,
            table_offset,
            header_version: VERSION,
            max_table_entries,
            block_size,
            checksum: 0,
            parent_unique_id: Uuid::nil(),
            parent_timestamp: 0,
            reserved1: 0,
            parent_unicode_name: [0; PARENT_NAME_SIZE],
            parent_locators: [ParentLocator::default(); LOCATORS],
        }
    }

    /// Parse and validate a header from a 1024-byte buffer.
    ///
    /// # Errors
    /// [`crate::ErrorKind::Corrupt`] (offsets relative to the header) for a
    /// short buffer, a wrong cookie or checksum, an unknown version, or a
    /// block size that is not a power of two of at least 512 bytes.
    /// Whether the table fits the file and the disk is checked at open.
    pub fn parse(buf: &[u8]) -> Result<Self> {
        if buf.len() < HEADER_SIZE {
            return Err(Error::corrupt(
                STRUCT,
                0,
                format!("header is {} bytes, expected 1024", buf.len()),
            ));
        }
        let buf = &buf[..HEADER_SIZE];
        if buf.get(0..8) != Some(&COOKIE[..]) {
            return Err(Error::corrupt(
                STRUCT,
                0,
                "bad cookie (expected \"cxsparse\")",
            ));
        }
        let stored = be32(buf, 36);
        let computed = checksum(buf, 36);
        if stored != computed {
            return Err(Error::corrupt(
                STRUCT,
                36,
                format!("checksum mismatch: stored {stored:#010x}, computed {computed:#010x}"),
            ));
        }
        let header_version = be32(buf, 24);
        if header_version >> 16 != 1 {
            return Err(Error::corrupt(
                STRUCT,
                24,
                format!("unknown header version {header_version:#010x} (expected 0x00010000)"),
            ));
        }
        let block_size = be32(buf, 32);
        if !block_size.is_power_of_two() || block_size < 512 {
            return Err(Error::corrupt(
                STRUCT,
                32,
                format!("block size {block_size} is not a power of two of at least 512"),
            ));
        }
        let table_offset = be64(buf, 16);
        if !table_offset.is_multiple_of(512) {
            return Err(Error::corrupt(
                STRUCT,
                16,
                format!("table offset {table_offset:#x} is not sector-aligned"),
            ));
        }
        let mut parent_locators = [ParentLocator::default(); LOCATORS];
        for (i, l) in parent_locators.iter_mut().enumerate() {
            let at = LOCATOR_TABLE_OFFSET + i * parent_locator::SIZE;
            *l = ParentLocator::parse(&buf[at..at + parent_locator::SIZE])?;
        }
        Ok(DynamicHeader {
            data_offset: be64(buf, 8),
            table_offset,
            header_version,
            max_table_entries: be32(buf, 28),
            block_size,
            checksum: stored,
            parent_unique_id: Uuid::from_bytes(arr(buf, 40)),
            parent_timestamp: be32(buf, 56),
            reserved1: be32(buf, 60),
            parent_unicode_name: arr(buf, 64),
            parent_locators,
        })
    }

    /// Write the header into `buf` (at least 1024 bytes) with a fresh
    /// checksum, also stored into `self.checksum`.
    ///
    /// # Panics
    /// If `buf` is shorter than 1024 bytes (a caller bug).
    pub fn write_to(&mut self, buf: &mut [u8]) {
        let b = &mut buf[..HEADER_SIZE];
        b.fill(0);
        b[0..8].copy_from_slice(COOKIE);
        b[8..16].copy_from_slice(&self.data_offset.to_be_bytes());
        b[16..24].copy_from_slice(&self.table_offset.to_be_bytes());
        b[24..28].copy_from_slice(&self.header_version.to_be_bytes());
        b[28..32].copy_from_slice(&self.max_table_entries.to_be_bytes());
        b[32..36].copy_from_slice(&self.block_size.to_be_bytes());
        b[40..56].copy_from_slice(self.parent_unique_id.as_bytes());
        b[56..60].copy_from_slice(&self.parent_timestamp.to_be_bytes());
        b[60..64].copy_from_slice(&self.reserved1.to_be_bytes());
        b[64..64 + PARENT_NAME_SIZE].copy_from_slice(&self.parent_unicode_name);
        for (i, l) in self.parent_locators.iter().enumerate() {
            let at = LOCATOR_TABLE_OFFSET + i * parent_locator::SIZE;
            l.write_to(&mut b[at..at + parent_locator::SIZE]);
        }
        self.checksum = checksum(b, 36);
        b[36..40].copy_from_slice(&self.checksum.to_be_bytes());
    }

    /// The parent's name, decoded up to the first NUL (invalid UTF-16 is
    /// replaced by U+FFFD).
    pub fn parent_name(&self) -> String {
        let units: Vec<u16> = self
            .parent_unicode_name
            .chunks_exact(2)
            .map(|c| u16::from_be_bytes([c[0], c[1]]))
            .take_while(|&u| u != 0)
            .collect();
        String::from_utf16_lossy(&units)
    }

    /// Record a parent: its unique id, time stamp and name (UTF-16 big
    /// endian, the rest of the field zeroed).
    ///
    /// # Errors
    /// The name does not fit the 512-byte field (`InvalidInput`).
    pub fn set_parent(&mut self, id: Uuid, timestamp: u32, name: &str) -> Result<()> {
        let uname: Vec<u8> = name.encode_utf16().flat_map(u16::to_be_bytes).collect();
        if uname.len() > PARENT_NAME_SIZE {
            return Err(Error::invalid(format!(
                "the parent's file name \"{name}\" is too long for the 512-byte parent name field"
            )));
        }
        self.parent_unique_id = id;
        self.parent_timestamp = timestamp;
        self.parent_unicode_name = [0; PARENT_NAME_SIZE];
        self.parent_unicode_name[..uname.len()].copy_from_slice(&uname);
        Ok(())
    }

    /// The used parent locators with their index.
    pub fn locators(&self) -> impl Iterator<Item = (usize, &ParentLocator)> {
        self.parent_locators
            .iter()
            .enumerate()
            .filter(|(_, l)| !l.is_empty())
    }

    /// A short description of the used locators, e.g. `W2ku@0x1200+42`.
    pub fn locator_summary(&self) -> String {
        let v: Vec<String> = self
            .locators()
            .map(|(_, l)| {
                format!(
                    "{}@{:#x}+{}",
                    fourcc(&l.platform_code),
                    l.data_offset,
                    l.data_length
                )
            })
            .collect();
        v.join(", ")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn roundtrip() {
        let mut h = DynamicHeader::new(1536, 50, 2 << 20);
        h.parent_locators[1] = ParentLocator {
            platform_code: *b"W2ku",
            data_space: 1,
            data_length: 20,
            reserved: 0,
            data_offset: 0x1000,
        };
        let name: Vec<u8> = "p.vhd".encode_utf16().flat_map(u16::to_be_bytes).collect();
        h.parent_unicode_name[..name.len()].copy_from_slice(&name);
        let mut buf = [0u8; 1024];
        h.write_to(&mut buf);
        let g = DynamicHeader::parse(&buf).unwrap();
        assert_eq!(g, h);
        assert_eq!(g.parent_name(), "p.vhd");
        assert_eq!(g.locators().count(), 1);
        assert_eq!(g.parent_locators[1].data_space_bytes(), 512);
        assert!(g.locator_summary().contains("W2ku@0x1000+20"));
    }

    #[test]
    fn rejects_bad_fields() {
        let mut buf = [0u8; 1024];
        assert!(DynamicHeader::parse(&buf)
            .unwrap_err()
            .to_string()
            .contains("cookie"));
        let mut h = DynamicHeader::new(1536, 50, 3000);
        h.write_to(&mut buf);
        let e = DynamicHeader::parse(&buf).unwrap_err();
        assert!(e.to_string().contains("block size 3000"), "{e}");
        let mut h = DynamicHeader::new(1536, 50, 1 << 21);
        h.write_to(&mut buf);
        buf[900] = 1;
        let e = DynamicHeader::parse(&buf).unwrap_err();
        assert!(e.to_string().contains("checksum"), "{e}");
        assert!(DynamicHeader::parse(&buf[..1000]).is_err());
    }

    #[test]
    fn corpus_sample_dynamic_header() {
        let p = concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../../shared/corpus/structs/dynamic_disk_header.1"
        );
        let Ok(buf) = std::fs::read(p) else {
            eprintln!("SKIP: {p} is absent");
            return;
        };
        let h = DynamicHeader::parse(&buf).unwrap();
        assert_eq!(h.data_offset, u64::MAX);
        assert_eq!(h.table_offset, 0x600);
        assert_eq!(h.header_version, VERSION);
        assert_eq!(h.max_table_entries, 256);
        assert_eq!(h.block_size, 2 << 20);
        assert_eq!(h.checksum, 0xffff_e1c1);
        assert_eq!(
            h.parent_unique_id.to_string(),
            "d49c5c80-350a-4a89-898a-5ad6d10f6578"
        );
        assert_eq!(h.parent_timestamp, 0x1922_077c);
        assert_eq!(h.parent_name(), "dynamic.vhd");
        let codes: Vec<[u8; 4]> = h.locators().map(|(_, l)| l.platform_code).collect();
        assert_eq!(codes, vec![*b"W2ku", *b"W2ru", *b"Wi2k", *b"Wi2r"]);
        // Entries 0-3 are empty; 4-7 are used.
        assert!(h.parent_locators[..4].iter().all(ParentLocator::is_empty));
        let l = &h.parent_locators[4..];
        // Old Virtual PC images: the data space is a byte count (0x200).
        assert_eq!(
            (l[0].data_space, l[0].data_length, l[0].data_offset),
            (0x200, 0x2a, 0x1200)
        );
        assert_eq!(l[0].data_space_bytes(), 512);
        assert_eq!((l[1].data_length, l[1].data_offset), (0x1a, 0x1000));
        assert_eq!((l[2].data_length, l[2].data_offset), (0x15, 0xe00));
        assert_eq!((l[3].data_length, l[3].data_offset), (0x0d, 0xc00));
        let mut h2 = h.clone();
        let mut out = [0u8; 1024];
        h2.write_to(&mut out);
        assert_eq!(out.to_vec(), buf[..1024].to_vec());
    }
}
