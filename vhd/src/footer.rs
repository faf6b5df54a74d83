//! The hard disk footer ("Hard Disk Footer Format" in the Virtual Hard Disk
//! Image Format Specification, 2006) and the CHS geometry of the appendix
//! "CHS Calculation".
//!
//! Every VHD ends with this 512-byte structure; dynamic and differencing
//! disks also keep a copy at offset 0. Images made before Virtual PC 2004
//! may end with a 511-byte footer (one reserved byte short); [`Footer::parse`]
//! accepts both lengths. All fields are big-endian.

use crate::{Error, Result};
use uuid::Uuid;

/// Size of the footer in bytes.
pub const FOOTER_SIZE: usize = 512;
/// Size of the footer written by tools older than Virtual PC 2004.
pub const OLD_FOOTER_SIZE: usize = 511;
/// The footer cookie.
pub const COOKIE: &[u8; 8] = b"conectix";
/// The only file format version defined (1.0).
pub const VERSION: u32 = 0x0001_0000;
/// The data offset of a fixed disk (no dynamic header).
pub const FIXED_DATA_OFFSET: u64 = u64::MAX;
/// Features bit 1 is reserved and always set.
pub const FEATURES_RESERVED: u32 = 0x2;
/// Features bit 0: the disk is a candidate for deletion on shutdown.
pub const FEATURES_TEMPORARY: u32 = 0x1;
/// Seconds from 1970-01-01 to 2000-01-01 (the VHD epoch), both UTC.
pub const VHD_EPOCH_UNIX: u64 = 946_684_800;

const STRUCT: &str = "VHD footer";

/// The type of a VHD ("Disk Type" field).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DiskType {
    /// 2: the data is stored flat before the footer.
    Fixed,
    /// 3: blocks allocated on demand through a BAT.
    Dynamic,
    /// 4: a dynamic disk whose unallocated sectors come from a parent.
    Differencing,
}

impl DiskType {
    /// The on-disk value.
    pub fn to_u32(self) -> u32 {
        match self {
            DiskType::Fixed => 2,
            DiskType::Dynamic => 3,
            DiskType::Differencing => 4,
        }
    }

    /// The name `qemu-img` and `vdisk` use ("fixed", "dynamic", "differencing").
    pub fn name(self) -> &'static str {
        match self {
            DiskType::Fixed => "fixed",
            DiskType::Dynamic => "dynamic",
            DiskType::Differencing => "differencing",
        }
    }
}

/// Cylinders, heads and sectors per track ("Disk Geometry" field).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ChsGeometry {
    /// Cylinders.
    pub cylinders: u16,
    /// Heads.
    pub heads: u8,
    /// Sectors per track.
    pub sectors_per_track: u8,
}

impl ChsGeometry {
    /// The largest geometry (65535/16/255): disks of that many sectors or more.
    pub const MAX: ChsGeometry = ChsGeometry {
        cylinders: 65535,
        heads: 16,
        sectors_per_track: 255,
    };

    /// The geometry the specification's appendix ("CHS Calculation")
    /// assigns to a disk of `total_sectors` 512-byte sectors. Its product may
    /// be smaller than `total_sectors` (the algorithm rounds down).
    pub fn from_sectors(total_sectors: u64) -> Self {
        let max = ChsGeometry::MAX.total_sectors();
        let total = total_sectors.min(max);
        let (spt, heads, cth) = if total >= 65535 * 16 * 63 {
            (255u64, 16u64, total / 255)
        } else {
            let mut spt = 17u64;
            let mut cth = total / spt;
            let mut heads = cth.div_ceil(1024).max(4);
            if cth >= heads * 1024 || heads > 16 {
                spt = 31;
                heads = 16;
                cth = total / spt;
            }
            if cth >= heads * 1024 {
                spt = 63;
                heads = 16;
                cth = total / spt;
            }
            (spt, heads, cth)
        };
        // heads ≤ 16 and spt ≤ 255 by the algorithm, cylinders ≤ 65535: the
        // conversions never saturate.
        ChsGeometry {
            cylinders: u16::try_from(cth / heads).unwrap_or(u16::MAX),
            heads: u8::try_from(heads).unwrap_or(16),
            sectors_per_track: u8::try_from(spt).unwrap_or(u8::MAX),
        }
    }

    /// The smallest size of at least `size` bytes whose CHS geometry covers it
    /// exactly (what Virtual PC and `qemu-img` create), with its geometry.
    /// Sizes at or beyond the maximum geometry are returned rounded up to a
    /// whole sector, with [`ChsGeometry::MAX`].
    pub fn round_up(size: u64) -> (u64, ChsGeometry) {
        let sectors = size.div_ceil(512);
        let max = ChsGeometry::MAX.total_sectors();
        let mut t = sectors;
        // Within one branch of the algorithm heads and sectors per track are
        // constant, so adding the shortfall reaches the next cylinder; at a
        // branch boundary a few more steps settle it.
        for _ in 0..64 {
            if t >= max {
                break;
            }
            let g = ChsGeometry::from_sectors(t);
            let p = g.total_sectors();
            if p >= sectors {
                return (p * 512, g);
            }
            t += (sectors - p).max(1);
        }
        (sectors * 512, ChsGeometry::MAX)
    }

    /// Cylinders × heads × sectors per track.
    pub fn total_sectors(&self) -> u64 {
        u64::from(self.cylinders) * u64::from(self.heads) * u64::from(self.sectors_per_track)
    }

    fn from_u32(v: u32) -> Self {
        let [c1, c0, heads, sectors_per_track] = v.to_be_bytes();
        ChsGeometry {
            cylinders: u16::from_be_bytes([c1, c0]),
            heads,
            sectors_per_track,
        }
    }

    fn to_u32(self) -> u32 {
        (u32::from(self.cylinders) << 16)
            | (u32::from(self.heads) << 8)
            | u32::from(self.sectors_per_track)
    }
}

/// The hard disk footer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Footer {
    /// Features (bit 0 temporary, bit 1 reserved, always set).
    pub features: u32,
    /// File format version (0x00010000).
    pub version: u32,
    /// Absolute offset of the dynamic disk header; all ones for fixed disks.
    pub data_offset: u64,
    /// Creation time, seconds since 2000-01-01 00:00:00 UTC.
    pub timestamp: u32,
    /// Creator application, e.g. `b"vpc "`, `b"win "`, `b"d2v "`, `b"qemu"`.
    pub creator_application: [u8; 4],
    /// Creator version (major in the high 16 bits).
    pub creator_version: u32,
    /// Creator host OS, e.g. `b"Wi2k"` or `b"Mac "`.
    pub creator_host_os: [u8; 4],
    /// Size of the disk at creation, bytes.
    pub original_size: u64,
    /// Current size of the disk, bytes.
    pub current_size: u64,
    /// CHS geometry.
    pub geometry: ChsGeometry,
    /// Fixed, dynamic or differencing.
    pub disk_type: DiskType,
    /// The stored checksum (verified by [`Footer::parse`], recomputed by
    /// [`Footer::write_to`]).
    pub checksum: u32,
    /// The disk's unique id (stored as 16 bytes in the order given).
    pub unique_id: Uuid,
    /// 1 when the disk is in a saved state.
    pub saved_state: u8,
}

/// One's complement of the byte sum of `buf`, skipping `buf[skip..skip+4]`
/// (the checksum field), as the specification defines for the footer and
/// the dynamic disk header.
pub fn checksum(buf: &[u8], skip: usize) -> u32 {
    let mut sum = 0u32;
    for (i, &b) in buf.iter().enumerate() {
        if !(skip..skip + 4).contains(&i) {
            sum = sum.wrapping_add(u32::from(b));
        }
    }
    !sum
}

pub(crate) fn be32(b: &[u8], at: usize) -> u32 {
    let mut a = [0u8; 4];
    if let Some(s) = b.get(at..at + 4) {
        a.copy_from_slice(s);
    }
    u32::from_be_bytes(a)
}

pub(crate) fn be64(b: &[u8], at: usize) -> u64 {
    let mut a = [0u8; 8];
    if let Some(s) = b.get(at..at + 8) {
        a.copy_from_slice(s);
    }
    u64::from_be_bytes(a)
}

pub(crate) fn arr<const N: usize>(b: &[u8], at: usize) -> [u8; N] {
    let mut a = [0u8; N];
    if let Some(s) = b.get(at..at + N) {
        a.copy_from_slice(s);
    }
    a
}

/// A 4-character code for messages (non-printable bytes escaped).
pub fn fourcc(c: &[u8; 4]) -> String {
    c.iter()
        .flat_map(|b| std::ascii::escape_default(*b))
        .map(char::from)
        .collect()
}

impl Footer {
    /// Parse and validate a footer from a 512-byte (or old 511-byte) buffer.
    ///
    /// # Errors
    /// [`crate::ErrorKind::Corrupt`] (offsets relative to the footer) for a
    /// short buffer, a wrong cookie or checksum, an unknown version or disk
    /// type, or a data offset that contradicts the disk type.
    pub fn parse(buf: &[u8]) -> Result<Self> {
        if buf.len() != FOOTER_SIZE && buf.len() != OLD_FOOTER_SIZE {
            return Err(Error::corrupt(
                STRUCT,
                0,
                format!("footer is {} bytes, expected 512", buf.len()),
            ));
        }
        if buf.get(0..8) != Some(&COOKIE[..]) {
            return Err(Error::corrupt(
                STRUCT,
                0,
                "bad cookie (expected \"conectix\"): not a VHD",
            ));
        }
        let stored = be32(buf, 64);
        let computed = checksum(buf, 64);
        if stored != computed {
            return Err(Error::corrupt(
                STRUCT,
                64,
                format!("checksum mismatch: stored {stored:#010x}, computed {computed:#010x}"),
            ));
        }
        let version = be32(buf, 12);
        if version >> 16 != 1 {
            return Err(Error::corrupt(
                STRUCT,
                12,
                format!("unknown file format version {version:#010x} (expected 0x00010000)"),
            ));
        }
        let disk_type = match be32(buf, 60) {
            2 => DiskType::Fixed,
            3 => DiskType::Dynamic,
            4 => DiskType::Differencing,
            t => {
                return Err(Error::corrupt(
                    STRUCT,
                    60,
                    format!(
                        "unknown disk type {t} (expected 2 fixed, 3 dynamic or 4 differencing)"
                    ),
                ))
            }
        };
        let data_offset = be64(buf, 16);
        match disk_type {
            DiskType::Fixed if data_offset != FIXED_DATA_OFFSET => {
                return Err(Error::corrupt(
                    STRUCT,
                    16,
                    format!(
                        "data offset {data_offset:#x} of a fixed disk is not 0xFFFFFFFFFFFFFFFF"
                    ),
                ))
            }
            DiskType::Dynamic | DiskType::Differencing
                if data_offset == FIXED_DATA_OFFSET || !data_offset.is_multiple_of(512) =>
            {
                return Err(Error::corrupt(
                    STRUCT,
                    16,
                    format!(
                        "data offset {data_offset:#x} of a {} disk is not a sector offset",
                        disk_type.name()
                    ),
                ))
            }
            _ => {}
        }
        let current_size = be64(buf, 48);
        if !current_size.is_multiple_of(512) {
            return Err(Error::corrupt(
                STRUCT,
                48,
                format!("current size {current_size} is not a multiple of 512"),
            ));
        }
        Ok(Footer {
            features: be32(buf, 8),
            version,
            data_offset,
            timestamp: be32(buf, 24),
            creator_application: arr(buf, 28),
            creator_version: be32(buf, 32),
            creator_host_os: arr(buf, 36),
            original_size: be64(buf, 40),
            current_size,
            geometry: ChsGeometry::from_u32(be32(buf, 56)),
            disk_type,
            checksum: stored,
            unique_id: Uuid::from_bytes(arr(buf, 68)),
            saved_state: buf.get(84).copied().unwrap_or(0),
        })
    }

    /// Write the footer into `buf` (at least 512 bytes; the rest of the
    /// first 512 is zeroed) with a freshly computed checksum, which is also
    /// stored into `self.checksum`.
    ///
    /// # Panics
    /// If `buf` is shorter than 512 bytes (a caller bug).
    pub fn write_to(&mut self, buf: &mut [u8]) {
        let b = &mut buf[..FOOTER_SIZE];
        b.fill(0);
        b[0..8].copy_from_slice(COOKIE);
        b[8..12].copy_from_slice(&self.features.to_be_bytes());
        b[12..16].copy_from_slice(&self.version.to_be_bytes());
        b[16..24].copy_from_slice(&self.data_offset.to_be_bytes());
        b[24..28].copy_from_slice(&self.timestamp.to_be_bytes());
        b[28..32].copy_from_slice(&self.creator_application);
        b[32..36].copy_from_slice(&self.creator_version.to_be_bytes());
        b[36..40].copy_from_slice(&self.creator_host_os);
        b[40..48].copy_from_slice(&self.original_size.to_be_bytes());
        b[48..56].copy_from_slice(&self.current_size.to_be_bytes());
        b[56..60].copy_from_slice(&self.geometry.to_u32().to_be_bytes());
        b[60..64].copy_from_slice(&self.disk_type.to_u32().to_be_bytes());
        b[68..84].copy_from_slice(self.unique_id.as_bytes());
        b[84] = self.saved_state;
        self.checksum = checksum(b, 64);
        b[64..68].copy_from_slice(&self.checksum.to_be_bytes());
    }

    /// The footer as 512 bytes.
    pub fn to_bytes(&self) -> [u8; FOOTER_SIZE] {
        let mut b = [0u8; FOOTER_SIZE];
        self.clone().write_to(&mut b);
        b
    }

    /// The virtual disk size in bytes.
    ///
    /// Virtual PC (creator application `"vpc "`) sizes the disk by its CHS
    /// geometry, so for those images the size is cylinders × heads × sectors
    /// × 512 — unless the geometry is the maximum 65535/16/255, which cannot
    /// describe a larger disk. Every other creator (`"win "`, `"d2v "`,
    /// `"qemu"`, ...) and the maximum geometry use the current size field.
    pub fn disk_size(&self) -> u64 {
        if &self.creator_application == b"vpc " && self.geometry != ChsGeometry::MAX {
            self.geometry.total_sectors() * 512
        } else {
            self.current_size
        }
    }

    /// The creation time as seconds since the Unix epoch.
    pub fn timestamp_unix(&self) -> u64 {
        VHD_EPOCH_UNIX + u64::from(self.timestamp)
    }

    /// The current time as a VHD timestamp (saturating).
    pub fn now_timestamp() -> u32 {
        let unix = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        u32::try_from(unix.saturating_sub(VHD_EPOCH_UNIX)).unwrap_or(u32::MAX)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Footer {
        Footer {
            features: FEATURES_RESERVED,
            version: VERSION,
            data_offset: 512,
            timestamp: 0x1234_5678,
            creator_application: *b"vdsk",
            creator_version: 0x0001_0000,
            creator_host_os: *b"Wi2k",
            original_size: 100 << 20,
            current_size: 100 << 20,
            geometry: ChsGeometry::from_sectors(204800),
            disk_type: DiskType::Dynamic,
            checksum: 0,
            unique_id: Uuid::from_bytes([7; 16]),
            saved_state: 0,
        }
    }

    #[test]
    fn roundtrip_and_checksum() {
        let mut f = sample();
        let mut buf = [0u8; 512];
        f.write_to(&mut buf);
        let g = Footer::parse(&buf).unwrap();
        assert_eq!(f, g);
        buf[100] = 1; // a reserved byte: checksum now wrong
        let e = Footer::parse(&buf).unwrap_err();
        assert!(e.to_string().contains("checksum mismatch"), "{e}");
    }

    #[test]
    fn old_511_byte_footer_is_accepted() {
        let mut buf = [0u8; 512];
        sample().write_to(&mut buf);
        let f = Footer::parse(&buf[..511]).unwrap();
        assert_eq!(f.current_size, 100 << 20);
    }

    #[test]
    fn rejects_bad_fields() {
        let mut buf = [0u8; 512];
        let e = Footer::parse(&buf).unwrap_err();
        assert!(e.to_string().contains("cookie"), "{e}");
        let mut f = sample();
        f.data_offset = FIXED_DATA_OFFSET;
        f.write_to(&mut buf);
        let e = Footer::parse(&buf).unwrap_err();
        assert!(e.to_string().contains("data offset"), "{e}");
        // Unknown disk type with a valid checksum.
        let mut f = sample();
        f.write_to(&mut buf);
        buf[63] = 5;
        let c = checksum(&buf, 64);
        buf[64..68].copy_from_slice(&c.to_be_bytes());
        let e = Footer::parse(&buf).unwrap_err();
        assert!(e.to_string().contains("disk type 5"), "{e}");
        assert!(Footer::parse(&buf[..100]).is_err());
    }

    #[test]
    fn chs_algorithm() {
        // 100 MiB: 17 sectors per track.
        let g = ChsGeometry::from_sectors(204800);
        assert_eq!((g.cylinders, g.heads, g.sectors_per_track), (1003, 12, 17));
        assert_eq!(ChsGeometry::round_up(100 << 20).0, 104_865_792);
        // 10 MiB: Windows writes 301/4/17.
        let g = ChsGeometry::from_sectors(20480);
        assert_eq!((g.cylinders, g.heads, g.sectors_per_track), (301, 4, 17));
        // 512 MiB: 1040/16/63.
        let g = ChsGeometry::from_sectors(1 << 20);
        assert_eq!((g.cylinders, g.heads, g.sectors_per_track), (1040, 16, 63));
        // Beyond 127 GiB: the maximum.
        assert_eq!(ChsGeometry::from_sectors(u64::MAX), ChsGeometry::MAX);
        assert_eq!(
            ChsGeometry::round_up(200 << 30),
            (200 << 30, ChsGeometry::MAX)
        );
        // round_up always covers the request with an exact geometry.
        for s in [
            1u64,
            511,
            512,
            1 << 20,
            3 << 20,
            4 << 30,
            40 << 30,
            127 << 30,
        ] {
            let (size, g) = ChsGeometry::round_up(s);
            assert!(size >= s);
            if g != ChsGeometry::MAX {
                assert_eq!(g.total_sectors() * 512, size);
                assert_eq!(ChsGeometry::from_sectors(g.total_sectors()), g);
            }
        }
    }

    #[test]
    fn disk_size_rule() {
        let mut f = sample();
        f.creator_application = *b"vpc ";
        assert_eq!(f.disk_size(), f.geometry.total_sectors() * 512);
        f.geometry = ChsGeometry::MAX;
        assert_eq!(f.disk_size(), f.current_size);
        f.creator_application = *b"win ";
        f.geometry = ChsGeometry::from_sectors(204800);
        assert_eq!(f.disk_size(), f.current_size);
    }

    #[test]
    fn corpus_sample_file_footer() {
        let p = concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../../shared/corpus/structs/file_footer.1"
        );
        let Ok(buf) = std::fs::read(p) else {
            eprintln!("SKIP: {p} is absent");
            return;
        };
        let f = Footer::parse(&buf).unwrap();
        assert_eq!(f.features, 2);
        assert_eq!(f.version, VERSION);
        assert_eq!(f.data_offset, 512);
        assert_eq!(f.timestamp, 0x1922_15f0);
        assert_eq!(&f.creator_application, b"vpc ");
        assert_eq!(f.creator_version, 0x0001_0000);
        assert_eq!(&f.creator_host_os, b"Wi2k");
        assert_eq!(f.original_size, 0x2000_0000);
        assert_eq!(f.current_size, 0x2000_0000);
        assert_eq!(
            f.geometry,
            ChsGeometry {
                cylinders: 1040,
                heads: 16,
                sectors_per_track: 63
            }
        );
        assert_eq!(f.disk_type, DiskType::Differencing);
        assert_eq!(f.checksum, 0xffff_f023);
        assert_eq!(
            f.unique_id.to_string(),
            "40d56d36-9ab8-4fe4-a31a-121fe2bf15eb"
        );
        assert_eq!(f.saved_state, 0);
        // Virtual PC: the size comes from the geometry.
        assert_eq!(f.disk_size(), 1040 * 16 * 63 * 512);
        assert_eq!(f.to_bytes().to_vec(), buf);
    }
}
