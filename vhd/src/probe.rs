//! What survives of a VHD whose footer cannot be found where a reader
//! looks for it (the last 512 bytes, or its copy at offset 0): for the
//! error that refuses to take such a file for a raw image (see
//! `checkpoint::detect`), so that it can say what is left to recover.
//!
//! Looked at, each structure validated as an open would: the footer copy
//! at offset 0, the dynamic disk header at 512 (where every VHD writer puts
//! it), and a footer at any sector boundary of the last MiB of the file (a
//! file extended past its footer, or whose last sectors were lost). At
//! most 1 MiB and 1.5 KiB are read.

use crate::dynamic_header::{self, DynamicHeader, HEADER_SIZE};
use crate::footer::{self, Footer, FOOTER_SIZE};
use disk::Storage;

/// How far from the end of the file a footer is looked for.
const TAIL_WINDOW: u64 = 1 << 20;
/// Sector size: footers lie at sector boundaries.
const SECTOR: u64 = 512;
/// Footers near the end reported at most (a file of footer copies).
const MAX_FOOTERS: usize = 3;

/// The VHD structures found in `st`, one phrase each ("a valid VHD
/// dynamic disk header at 0x200 (...)"), in file order. Unreadable places
/// (past the end of a short file, I/O errors) count as nothing found.
pub fn traces(st: &dyn Storage) -> Vec<String> {
    let mut out = Vec::new();
    let len = st.len().unwrap_or(0);
    let read = |off: u64, n: u64| -> Option<Vec<u8>> {
        if off.checked_add(n)? > len {
            return None;
        }
        let mut b = vec![0u8; usize::try_from(n).ok()?];
        st.read_at(&mut b, off).ok()?;
        Some(b)
    };
    if let Some(b) = read(0, FOOTER_SIZE as u64) {
        if let Some(t) = footer_trace(&b, 0, len) {
            out.push(t);
        }
    }
    if let Some(b) = read(SECTOR, HEADER_SIZE as u64) {
        match DynamicHeader::parse(&b) {
            Ok(h) => out.push(format!(
                "a valid VHD dynamic disk header at 0x200 (block size {}, {} BAT entries at \
                 {:#x})",
                h.block_size, h.max_table_entries, h.table_offset
            )),
            Err(e) if b[..8] == dynamic_header::COOKIE[..] => out.push(format!(
                "a damaged VHD dynamic disk header at 0x200 ({})",
                e.message()
            )),
            Err(_) => {}
        }
    }
    let start = len
        .saturating_sub(TAIL_WINDOW)
        .div_ceil(SECTOR)
        .max(1)
        .saturating_mul(SECTOR);
    if let Some(tail) = read(start, len.saturating_sub(start)) {
        let found = tail
            .chunks(FOOTER_SIZE)
            .enumerate()
            .filter(|(_, c)| c.len() == FOOTER_SIZE)
            .filter_map(|(i, c)| footer_trace(c, start + i as u64 * SECTOR, len))
            .collect::<Vec<_>>();
        // The last ones: the nearest to where a reader looks.
        let skip = found.len().saturating_sub(MAX_FOOTERS);
        out.extend(found.into_iter().skip(skip));
    }
    out
}

/// A phrase for the footer in `b` (512 bytes at `off` of a file of `len`
/// bytes), if it starts with the cookie.
fn footer_trace(b: &[u8], off: u64, len: u64) -> Option<String> {
    if b.get(..8)? != footer::COOKIE {
        return None;
    }
    let place = if off == 0 {
        "VHD footer copy at 0x0".to_string()
    } else if off + FOOTER_SIZE as u64 == len {
        format!("VHD footer at {off:#x} (the end of the file)")
    } else {
        format!(
            "VHD footer at {off:#x} ({} bytes before the end of the file)",
            len - off
        )
    };
    Some(match Footer::parse(b) {
        Ok(f) => format!(
            "a valid {place}: a {} disk of {} bytes",
            f.disk_type.name(),
            f.disk_size()
        ),
        Err(e) => format!("a damaged {place}: {}", e.message()),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{CreateOptions, Vhd};
    use disk::MemStorage;
    use std::sync::Arc;

    fn dynamic() -> Vec<u8> {
        let st = Arc::new(MemStorage::new("t.vhd"));
        Vhd::create_on(Box::new(st.clone()), &CreateOptions::new(8 << 20))
            .unwrap()
            .close()
            .unwrap();
        st.to_vec()
    }

    #[test]
    fn a_dynamic_disk_without_its_footers() {
        let mut b = dynamic();
        let len = b.len();
        b[..8].fill(0);
        b[len - 512..len - 504].fill(0);
        let t = traces(&MemStorage::from_vec("t", b.clone()));
        assert_eq!(t.len(), 1, "{t:?}");
        assert!(
            t[0].starts_with("a valid VHD dynamic disk header at 0x200 (block size 2097152"),
            "{t:?}"
        );
        // A header whose checksum fails is found, damaged.
        b[512 + 100] ^= 1;
        let t = traces(&MemStorage::from_vec("t", b));
        assert_eq!(t.len(), 1, "{t:?}");
        assert!(
            t[0].starts_with("a damaged VHD dynamic disk header at 0x200 (checksum mismatch"),
            "{t:?}"
        );
        // The file extended past the footer (two sectors of zeros): the
        // footer is found where it was.
        let mut b = dynamic();
        b[..512].fill(0);
        let at = b.len() - 512;
        b.extend_from_slice(&[0u8; 1024]);
        let t = traces(&MemStorage::from_vec("t", b));
        let want = format!(
            "a valid VHD footer at {at:#x} (1536 bytes before the end of the file): a dynamic \
             disk of "
        );
        assert!(t.last().unwrap().starts_with(&want), "{t:?}");
    }

    #[test]
    fn nothing_in_zeros() {
        assert!(traces(&MemStorage::new("e")).is_empty());
        assert!(traces(&MemStorage::from_vec("z", vec![0u8; 3 << 20])).is_empty());
    }
}
