//! What survives of a VHDX whose file type identifier (MS-VHDX 2.2.1) is
//! gone: for the error that refuses to take such a file for a raw image
//! (see `checkpoint::detect`), so that it can say what is left to recover.
//!
//! Only fixed places are looked at, each structure validated as an open
//! would: the `Creator` field after the signature, both headers (2.2.2,
//! 64 KiB and 128 KiB: signature, CRC-32C and fields) and both region table
//! copies (2.2.3, 192 KiB and 256 KiB). At most 200 KiB are read.

use crate::file_identifier::USED_SIZE;
use crate::header::{self, Header};
use crate::region_table::{self, RegionTable};
use disk::Storage;

/// The VHDX structures found in `st`, one phrase each ("a valid VHDX
/// header at 0x20000 (sequence 5)"), in file order. Unreadable places
/// (past the end of a short file, I/O errors) count as nothing found.
pub fn traces(st: &dyn Storage) -> Vec<String> {
    let mut out = Vec::new();
    let len = st.len().unwrap_or(0);
    let read = |off: u64, n: usize| -> Option<Vec<u8>> {
        if off.checked_add(n as u64)? > len {
            return None;
        }
        let mut b = vec![0u8; n];
        st.read_at(&mut b, off).ok()?;
        Some(b)
    };
    if let Some(c) = read(0, USED_SIZE).and_then(|b| creator(&b[8..])) {
        out.push(format!(
            "the creator of the VHDX file identifier at 0x8 (\"{c}\")"
        ));
    }
    for off in Header::OFFSETS {
        let Some(b) = read(off, Header::SIZE) else {
            continue;
        };
        match Header::parse(&b) {
            Ok(h) => out.push(format!(
                "a valid VHDX header at {off:#x} (sequence {})",
                h.sequence_number
            )),
            Err(e) if b[..4] == header::SIGNATURE => {
                out.push(format!(
                    "a damaged VHDX header at {off:#x} ({})",
                    e.message()
                ));
            }
            Err(_) => {}
        }
    }
    for off in RegionTable::OFFSETS {
        let Some(b) = read(off, RegionTable::SIZE) else {
            continue;
        };
        match RegionTable::parse(&b) {
            Ok(t) => out.push(format!(
                "a valid VHDX region table at {off:#x} ({} regions)",
                t.entries.len()
            )),
            Err(e) if b[..4] == region_table::SIGNATURE => {
                out.push(format!(
                    "a damaged VHDX region table at {off:#x} ({})",
                    e.message()
                ));
            }
            Err(_) => {}
        }
    }
    out
}

/// The `Creator` field (UTF-16LE, NUL-padded) when it holds printable text.
fn creator(field: &[u8]) -> Option<String> {
    let units: Vec<u16> = field
        .chunks_exact(2)
        .map(|c| u16::from_le_bytes([c[0], c[1]]))
        .take_while(|&u| u != 0)
        .collect();
    let s = String::from_utf16(&units).ok()?;
    (!s.is_empty() && s.chars().all(|c| !c.is_control())).then_some(s)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{CreateOptions, Vhdx};
    use disk::MemStorage;
    use std::sync::Arc;

    #[test]
    fn finds_what_survives_a_lost_signature() {
        let st = Arc::new(MemStorage::new("t.vhdx"));
        Vhdx::create_on(Box::new(st.clone()), &CreateOptions::new(8 << 20))
            .unwrap()
            .close()
            .unwrap();
        let mut bytes = st.to_vec();
        bytes[..8].fill(0);
        let t = traces(&MemStorage::from_vec("t", bytes.clone()));
        assert_eq!(t.len(), 5, "{t:?}");
        assert!(
            t[0].starts_with("the creator of the VHDX file identifier"),
            "{t:?}"
        );
        assert!(
            t[1].starts_with("a valid VHDX header at 0x10000 (sequence"),
            "{t:?}"
        );
        assert!(
            t[2].starts_with("a valid VHDX header at 0x20000 (sequence"),
            "{t:?}"
        );
        assert_eq!(t[3], "a valid VHDX region table at 0x30000 (2 regions)");
        assert_eq!(t[4], "a valid VHDX region table at 0x40000 (2 regions)");
        // A header whose checksum fails is found, damaged.
        bytes[0x10000 + 100] ^= 1;
        bytes[..USED_SIZE].fill(0);
        let t = traces(&MemStorage::from_vec("t", bytes));
        assert!(
            t[0].starts_with("a damaged VHDX header at 0x10000 ("),
            "{t:?}"
        );
        assert!(t[0].contains("checksum"), "{t:?}");
        assert_eq!(t.len(), 4, "{t:?}");
    }

    #[test]
    fn nothing_in_a_short_or_empty_file() {
        assert!(traces(&MemStorage::new("e")).is_empty());
        assert!(traces(&MemStorage::from_vec("z", vec![0u8; 300 << 10])).is_empty());
    }
}
