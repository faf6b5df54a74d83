//! The VHDX headers (MS-VHDX 2.2.2): two 4 KiB copies at 64 KiB and
//! 128 KiB; the valid one with the larger `SequenceNumber` is current.
//!
//! Layout (offsets in bytes): `Signature` "head" (0), `Checksum` (4),
//! `SequenceNumber` (8), `FileWriteGuid` (16), `DataWriteGuid` (32),
//! `LogGuid` (48), `LogVersion` (64), `Version` (66), `LogLength` (68),
//! `LogOffset` (72), reserved (80..4096). The checksum is CRC-32C over the
//! 4 KiB with the checksum field taken as zero.

use crate::guid::{
    checked_structure, crc32c_zeroed, is_aligned, le_u16, le_u32, le_u64, put_u16, put_u32,
    put_u64, read_guid, write_guid,
};
use crate::{Error, Result};
use uuid::Uuid;

/// Structure name used in error messages.
const NAME: &str = "VHDX header";
/// `Signature` value: "head".
pub const SIGNATURE: [u8; 4] = *b"head";
/// The only defined `Version`.
pub const VERSION: u16 = 1;
/// The only defined `LogVersion`.
pub const LOG_VERSION: u16 = 0;
const MIB: u64 = 1024 * 1024;
const CHECKSUM_AT: usize = 4;

/// One VHDX header (MS-VHDX 2.2.2).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Header {
    /// Larger is newer; the current header is the valid one with the larger value.
    pub sequence_number: u64,
    /// Changed before the first modification of the file after each open.
    pub file_write_guid: Uuid,
    /// Changed before the first modification of user-visible data after each open.
    pub data_write_guid: Uuid,
    /// Identifies the valid log entries; nil when the log is empty.
    pub log_guid: Uuid,
    /// Log format version; must be 0.
    pub log_version: u16,
    /// File format version; must be 1.
    pub version: u16,
    /// Bytes of the log region (multiple of 1 MiB).
    pub log_length: u32,
    /// File offset of the log region (multiple of 1 MiB, at least 1 MiB).
    pub log_offset: u64,
}

impl Header {
    /// Bytes of one header.
    pub const SIZE: usize = 4096;
    /// File offsets of the two header copies.
    pub const OFFSETS: [u64; 2] = [0x10000, 0x20000];

    /// Parse and fully validate one header from `buf[..4096]`.
    pub fn parse(buf: &[u8]) -> Result<Self> {
        let buf = checked_structure(buf, NAME, Self::SIZE, &SIGNATURE, CHECKSUM_AT)?;
        let h = Header {
            sequence_number: le_u64(buf, 8),
            file_write_guid: read_guid(buf, 16),
            data_write_guid: read_guid(buf, 32),
            log_guid: read_guid(buf, 48),
            log_version: le_u16(buf, 64),
            version: le_u16(buf, 66),
            log_length: le_u32(buf, 68),
            log_offset: le_u64(buf, 72),
        };
        if h.version != VERSION {
            return Err(Error::corrupt(
                NAME,
                66,
                format!("Version is {} (expected {VERSION})", h.version),
            ));
        }
        if h.log_version != LOG_VERSION {
            return Err(Error::corrupt(
                NAME,
                64,
                format!("LogVersion is {} (expected {LOG_VERSION})", h.log_version),
            ));
        }
        if h.log_length == 0 || !is_aligned(u64::from(h.log_length), MIB) {
            return Err(Error::corrupt(
                NAME,
                68,
                format!(
                    "LogLength {:#x} is not a non-zero multiple of 1 MiB",
                    h.log_length
                ),
            ));
        }
        if h.log_offset < MIB || !is_aligned(h.log_offset, MIB) {
            return Err(Error::corrupt(
                NAME,
                72,
                format!(
                    "LogOffset {:#x} is not a multiple of 1 MiB at or beyond 1 MiB",
                    h.log_offset
                ),
            ));
        }
        if h.log_offset.checked_add(u64::from(h.log_length)).is_none() {
            return Err(Error::corrupt(
                NAME,
                72,
                format!(
                    "log region {:#x}+{:#x} overflows",
                    h.log_offset, h.log_length
                ),
            ));
        }
        Ok(h)
    }

    /// Write the header into `buf[..4096]`: fields, zeroed reserved space and
    /// the checksum.
    ///
    /// # Panics
    /// If `buf` is shorter than 4096 bytes.
    pub fn write_to(&self, buf: &mut [u8]) {
        let buf = &mut buf[..Self::SIZE];
        buf.fill(0);
        buf[..4].copy_from_slice(&SIGNATURE);
        put_u64(buf, 8, self.sequence_number);
        write_guid(buf, 16, self.file_write_guid);
        write_guid(buf, 32, self.data_write_guid);
        write_guid(buf, 48, self.log_guid);
        put_u16(buf, 64, self.log_version);
        put_u16(buf, 66, self.version);
        put_u32(buf, 68, self.log_length);
        put_u64(buf, 72, self.log_offset);
        let crc = crc32c_zeroed(buf, CHECKSUM_AT);
        put_u32(buf, CHECKSUM_AT, crc);
    }

    /// The header serialized into a fresh 4 KiB buffer.
    pub fn to_bytes(&self) -> Vec<u8> {
        let mut v = vec![0u8; Self::SIZE];
        self.write_to(&mut v);
        v
    }
}

/// Choose the current header from the parse results of the two copies
/// (MS-VHDX 2.2.2): the valid one with the larger sequence number, as
/// `(index, header)` with index 0 for the copy at 64 KiB.
///
/// The spec calls the file corrupt when both are valid with equal sequence
/// numbers, but some writers (Disk2vhd) produce exactly that with identical
/// content; it is accepted and copy 0 is returned.
pub fn select_current(first: Result<Header>, second: Result<Header>) -> Result<(usize, Header)> {
    match (first, second) {
        (Ok(a), Ok(b)) => {
            if b.sequence_number > a.sequence_number {
                Ok((1, b))
            } else {
                Ok((0, a))
            }
        }
        (Ok(a), Err(_)) => Ok((0, a)),
        (Err(_), Ok(b)) => Ok((1, b)),
        (Err(e1), Err(e2)) => Err(Error::corrupt(
            NAME,
            Header::OFFSETS[0],
            format!(
                "no valid header: first copy (at {:#x}): {e1}; second copy (at {:#x}): {e2}",
                Header::OFFSETS[0],
                Header::OFFSETS[1]
            ),
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ErrorKind;

    fn sample(seq: u64) -> Header {
        Header {
            sequence_number: seq,
            file_write_guid: Uuid::from_u128(0x1111),
            data_write_guid: Uuid::from_u128(0x2222),
            log_guid: Uuid::nil(),
            log_version: 0,
            version: 1,
            log_length: 0x100000,
            log_offset: 0x100000,
        }
    }

    #[test]
    fn round_trip() {
        let h = sample(7);
        let buf = h.to_bytes();
        assert_eq!(&buf[..4], b"head");
        assert_eq!(Header::parse(&buf).unwrap(), h);
    }

    #[test]
    fn any_flipped_byte_is_detected() {
        let buf = sample(3).to_bytes();
        for i in (0..Header::SIZE).step_by(37).chain([4, 5, 6, 7, 4095]) {
            let mut bad = buf.clone();
            bad[i] ^= 0x40;
            assert!(Header::parse(&bad).is_err(), "flip at {i}");
        }
        assert!(Header::parse(&buf[..4095]).is_err());
    }

    fn parse_err(h: &Header) -> String {
        Header::parse(&h.to_bytes()).unwrap_err().to_string()
    }

    #[test]
    fn field_validation() {
        let mut h = sample(1);
        h.version = 2;
        assert!(parse_err(&h).contains("Version is 2"));
        let mut h = sample(1);
        h.log_version = 1;
        assert!(parse_err(&h).contains("LogVersion is 1"));
        let mut h = sample(1);
        h.log_length = 0;
        assert!(parse_err(&h).contains("LogLength"));
        h.log_length = 0x180000;
        assert!(parse_err(&h).contains("LogLength 0x180000"));
        let mut h = sample(1);
        h.log_offset = 0;
        assert!(parse_err(&h).contains("LogOffset"));
        h.log_offset = 0x100800;
        assert!(parse_err(&h).contains("LogOffset 0x100800"));
        h.log_offset = u64::MAX - 0xFFFFF;
        assert!(parse_err(&h).contains("overflows"));
    }

    #[test]
    fn selection() {
        let bad = || Header::parse(&[0u8; 4096]);
        assert_eq!(select_current(Ok(sample(5)), Ok(sample(6))).unwrap().0, 1);
        assert_eq!(select_current(Ok(sample(6)), Ok(sample(5))).unwrap().0, 0);
        assert_eq!(select_current(Ok(sample(6)), Ok(sample(6))).unwrap().0, 0);
        assert_eq!(select_current(bad(), Ok(sample(1))).unwrap().0, 1);
        assert_eq!(select_current(Ok(sample(1)), bad()).unwrap().0, 0);
        let e = select_current(bad(), Header::parse(&[0u8; 10])).unwrap_err();
        assert_eq!(e.kind(), ErrorKind::Corrupt);
        let s = e.to_string();
        assert!(
            s.contains("bad signature") && s.contains("truncated"),
            "{s}"
        );
    }

    #[test]
    fn corpus_sample() {
        let path = concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../../shared/corpus/structs/image_header.1"
        );
        let Ok(buf) = std::fs::read(path) else {
            eprintln!("skipping: {path} not found");
            return;
        };
        let h = Header::parse(&buf).unwrap();
        assert_eq!(h.sequence_number, 6);
        assert_eq!(
            h.file_write_guid,
            Uuid::parse_str("a3cccdd4-e8ce-4321-9243-cdaa37d5a0e2").unwrap()
        );
        assert_eq!(
            h.data_write_guid,
            Uuid::parse_str("0ffbcd55-1320-498f-9c15-1a97335aafcd").unwrap()
        );
        assert!(h.log_guid.is_nil());
        assert_eq!((h.log_version, h.version), (0, 1));
        assert_eq!((h.log_length, h.log_offset), (0x100000, 0x100000));
        assert_eq!(h.to_bytes(), buf);
    }
}
