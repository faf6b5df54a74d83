//! The file type identifier (MS-VHDX 2.2.1): the first structure of every
//! VHDX file, at offset 0, occupying the first 64 KiB.
//!
//! Layout: `Signature` (8 bytes, "vhdxfile"), `Creator` (512 bytes, UTF-16LE,
//! informational, NUL-padded), then reserved space up to 64 KiB.

use crate::{Error, Result};

/// Structure name used in error messages.
const NAME: &str = "VHDX file identifier";
/// `Signature` value: "vhdxfile".
pub const SIGNATURE: [u8; 8] = *b"vhdxfile";
/// Bytes of the `Creator` field.
const CREATOR_BYTES: usize = 512;
/// Bytes the structure actually uses (signature + creator).
pub const USED_SIZE: usize = 8 + CREATOR_BYTES;

/// The VHDX file type identifier (MS-VHDX 2.2.1).
#[derive(Clone, Debug, PartialEq, Eq, Default)]
pub struct FileIdentifier {
    /// The application that created the file (informational only).
    pub creator: String,
}

impl FileIdentifier {
    /// File offset of the identifier.
    pub const OFFSET: u64 = 0;
    /// Space the identifier occupies in the file (64 KiB).
    pub const SIZE: usize = 64 * 1024;

    /// Parse the identifier from the start of `buf` (at least 520 bytes).
    ///
    /// The creator is decoded up to its first NUL; invalid UTF-16 is replaced
    /// (the field is informational).
    pub fn parse(buf: &[u8]) -> Result<Self> {
        let Some(used) = buf.get(..USED_SIZE) else {
            return Err(Error::corrupt(
                NAME,
                0,
                format!("structure truncated: {} bytes, need {USED_SIZE}", buf.len()),
            ));
        };
        if used[..8] != SIGNATURE {
            return Err(Error::corrupt(
                NAME,
                0,
                format!(
                    "bad signature \"{}\" (expected \"vhdxfile\")",
                    crate::guid::show_signature(&used[..8])
                ),
            ));
        }
        let units: Vec<u16> = used[8..]
            .chunks_exact(2)
            .map(|c| u16::from_le_bytes([c[0], c[1]]))
            .take_while(|&u| u != 0)
            .collect();
        Ok(FileIdentifier {
            creator: String::from_utf16_lossy(&units),
        })
    }

    /// Write the signature and the creator (truncated to whole characters
    /// within 255 UTF-16 units, so a terminating NUL always fits) into `buf[..520]`, zero-padding the
    /// creator field. Bytes beyond 520 are left untouched.
    ///
    /// # Panics
    /// If `buf` is shorter than 520 bytes.
    pub fn write_to(&self, buf: &mut [u8]) {
        let out = &mut buf[..USED_SIZE];
        out.fill(0);
        out[..8].copy_from_slice(&SIGNATURE);
        // Whole characters only, so a surrogate pair is never split.
        let mut at = 8;
        for c in self.creator.chars() {
            let mut units = [0u16; 2];
            let units = c.encode_utf16(&mut units);
            if at + 2 * units.len() > USED_SIZE - 2 {
                break;
            }
            for u in units.iter() {
                out[at..at + 2].copy_from_slice(&u.to_le_bytes());
                at += 2;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ErrorKind;

    #[test]
    fn round_trip() {
        let id = FileIdentifier {
            creator: "vhdx-rs test \u{e9}\u{1F600}".to_string(),
        };
        let mut buf = vec![0xAAu8; FileIdentifier::SIZE];
        id.write_to(&mut buf);
        assert_eq!(&buf[..8], b"vhdxfile");
        assert_eq!(FileIdentifier::parse(&buf).unwrap(), id);
        assert!(buf[520..].iter().all(|&b| b == 0xAA));
    }

    #[test]
    fn long_creator_is_truncated_with_room_for_nul() {
        let id = FileIdentifier {
            creator: "x".repeat(1000),
        };
        let mut buf = vec![0u8; USED_SIZE];
        id.write_to(&mut buf);
        let back = FileIdentifier::parse(&buf).unwrap();
        assert_eq!(back.creator.len(), 255);
        assert_eq!(&buf[518..520], &[0, 0]);
        // A surrogate pair that does not fit whole is dropped, not split.
        let id = FileIdentifier {
            creator: format!("{}\u{1F600}", "y".repeat(254)),
        };
        id.write_to(&mut buf);
        assert_eq!(
            FileIdentifier::parse(&buf).unwrap().creator,
            "y".repeat(254)
        );
    }

    #[test]
    fn rejects_bad_signature_and_short_buffer() {
        let mut buf = vec![0u8; USED_SIZE];
        FileIdentifier::default().write_to(&mut buf);
        assert!(FileIdentifier::parse(&buf[..519]).is_err());
        buf[0] = b'V';
        let e = FileIdentifier::parse(&buf).unwrap_err();
        assert_eq!(e.kind(), ErrorKind::Corrupt);
        assert!(e.to_string().contains("Vhdxfile"), "{e}");
    }

    #[test]
    fn corpus_sample() {
        let path = concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../../shared/corpus/structs/file_identifier.1"
        );
        let Ok(buf) = std::fs::read(path) else {
            eprintln!("skipping: {path} not found");
            return;
        };
        let id = FileIdentifier::parse(&buf).unwrap();
        assert_eq!(id.creator, "Microsoft Windows 10.0.19041.0");
        let mut out = vec![0u8; USED_SIZE];
        id.write_to(&mut out);
        assert_eq!(out, buf[..USED_SIZE]);
    }
}
