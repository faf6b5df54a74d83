//! Little-endian field access, GUIDs and CRC-32C shared by the VHDX structures.
//!
//! MS-VHDX stores every integer little-endian and every GUID in the Windows
//! mixed-endian `GUID` layout (MS-VHDX 1.3, "Data1..Data3 little-endian,
//! Data4 as bytes"), which is what [`uuid::Uuid::from_bytes_le`] reads.
//! Checksums are CRC-32C (Castagnoli) computed over a structure with its
//! checksum field taken as zero (MS-VHDX 2.2.2, 2.2.3, 2.3.1.1).
//!
//! The accessors here are for fixed-layout fields whose bounds the caller has
//! already checked; they panic on out-of-range offsets like slice indexing.

use uuid::Uuid;

/// Read the GUID stored at `buf[at..at + 16]` in the on-disk (mixed-endian) layout.
pub fn read_guid(buf: &[u8], at: usize) -> Uuid {
    let mut b = [0u8; 16];
    b.copy_from_slice(&buf[at..at + 16]);
    Uuid::from_bytes_le(b)
}

/// Write `g` at `buf[at..at + 16]` in the on-disk (mixed-endian) layout.
pub fn write_guid(buf: &mut [u8], at: usize, g: Uuid) {
    buf[at..at + 16].copy_from_slice(&g.to_bytes_le());
}

/// Read a little-endian `u16` at `at`.
pub fn le_u16(buf: &[u8], at: usize) -> u16 {
    u16::from_le_bytes([buf[at], buf[at + 1]])
}

/// Read a little-endian `u32` at `at`.
pub fn le_u32(buf: &[u8], at: usize) -> u32 {
    let mut b = [0u8; 4];
    b.copy_from_slice(&buf[at..at + 4]);
    u32::from_le_bytes(b)
}

/// Read a little-endian `u64` at `at`.
pub fn le_u64(buf: &[u8], at: usize) -> u64 {
    let mut b = [0u8; 8];
    b.copy_from_slice(&buf[at..at + 8]);
    u64::from_le_bytes(b)
}

/// Write `v` little-endian at `at`.
pub fn put_u16(buf: &mut [u8], at: usize, v: u16) {
    buf[at..at + 2].copy_from_slice(&v.to_le_bytes());
}

/// Write `v` little-endian at `at`.
pub fn put_u32(buf: &mut [u8], at: usize, v: u32) {
    buf[at..at + 4].copy_from_slice(&v.to_le_bytes());
}

/// Write `v` little-endian at `at`.
pub fn put_u64(buf: &mut [u8], at: usize, v: u64) {
    buf[at..at + 8].copy_from_slice(&v.to_le_bytes());
}

/// Whether `v` is a multiple of `align`, which must be a power of two.
pub fn is_aligned(v: u64, align: u64) -> bool {
    debug_assert!(align.is_power_of_two());
    v & align.wrapping_sub(1) == 0
}

/// CRC-32C of `buf` with the four bytes at `checksum_at` taken as zero,
/// without copying `buf`.
pub fn crc32c_zeroed(buf: &[u8], checksum_at: usize) -> u32 {
    let crc = crc32c::crc32c(&buf[..checksum_at]);
    let crc = crc32c::crc32c_append(crc, &[0u8; 4]);
    crc32c::crc32c_append(crc, &buf[checksum_at + 4..])
}

/// The structure's four- or eight-byte ASCII signature, printable for error
/// messages (non-printable bytes are escaped).
pub(crate) fn show_signature(sig: &[u8]) -> String {
    sig.escape_ascii().to_string()
}

/// The common start of parsing a checksummed structure: `buf` must hold
/// `size` bytes, begin with `signature`, and carry a valid CRC-32C at
/// `checksum_at` (computed with that field as zero). Returns `buf[..size]`.
pub(crate) fn checked_structure<'a>(
    buf: &'a [u8],
    name: &'static str,
    size: usize,
    signature: &[u8],
    checksum_at: usize,
) -> crate::Result<&'a [u8]> {
    let Some(buf) = buf.get(..size) else {
        return Err(crate::Error::corrupt(
            name,
            0,
            format!("structure truncated: {} bytes, need {size}", buf.len()),
        ));
    };
    if buf[..signature.len()] != *signature {
        return Err(crate::Error::corrupt(
            name,
            0,
            format!(
                "bad signature \"{}\" (expected \"{}\")",
                show_signature(&buf[..signature.len()]),
                show_signature(signature)
            ),
        ));
    }
    let stored = le_u32(buf, checksum_at);
    let computed = crc32c_zeroed(buf, checksum_at);
    if stored != computed {
        return Err(crate::Error::corrupt(
            name,
            checksum_at as u64,
            format!("checksum mismatch: stored {stored:#010x}, computed {computed:#010x}"),
        ));
    }
    Ok(buf)
}

/// Test support: a structure sample from `../shared/corpus/structs`, or
/// `None` (with a message) when the corpus is absent.
#[cfg(test)]
pub(crate) fn corpus_struct(name: &str) -> Option<Vec<u8>> {
    let path = format!(
        "{}/../../shared/corpus/structs/{name}",
        env!("CARGO_MANIFEST_DIR")
    );
    match std::fs::read(&path) {
        Ok(b) => Some(b),
        Err(_) => {
            eprintln!("skipping: {path} not found");
            None
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn guid_uses_windows_mixed_endian_layout() {
        let g = Uuid::from_u128(0x2DC27766_F623_4200_9D64_115E9BFD4A08);
        let mut buf = [0u8; 20];
        write_guid(&mut buf, 2, g);
        assert_eq!(
            &buf[2..18],
            &[
                0x66, 0x77, 0xc2, 0x2d, 0x23, 0xf6, 0x00, 0x42, 0x9d, 0x64, 0x11, 0x5e, 0x9b, 0xfd,
                0x4a, 0x08
            ]
        );
        assert_eq!(read_guid(&buf, 2), g);
    }

    #[test]
    fn integers_are_little_endian() {
        let mut buf = [0u8; 16];
        put_u16(&mut buf, 0, 0x0102);
        put_u32(&mut buf, 2, 0x0304_0506);
        put_u64(&mut buf, 6, 0x0708_090a_0b0c_0d0e);
        assert_eq!(&buf[..4], &[2, 1, 6, 5]);
        assert_eq!(le_u16(&buf, 0), 0x0102);
        assert_eq!(le_u32(&buf, 2), 0x0304_0506);
        assert_eq!(le_u64(&buf, 6), 0x0708_090a_0b0c_0d0e);
    }

    #[test]
    fn alignment() {
        assert!(is_aligned(0, 4096) && is_aligned(8192, 4096) && is_aligned(u64::MAX, 1));
        assert!(!is_aligned(4097, 4096) && !is_aligned(u64::MAX, 2));
    }

    #[test]
    fn crc_with_zeroed_field_matches_copying_version() {
        let mut buf: Vec<u8> = (0..1000u32).map(|i| (i * 7 + 3).to_le_bytes()[0]).collect();
        let fast = crc32c_zeroed(&buf, 4);
        buf[4..8].fill(0);
        assert_eq!(fast, crc32c::crc32c(&buf));
        // Known CRC-32C test vector (RFC 3720): "123456789" -> 0xE3069283.
        assert_eq!(crc32c::crc32c(b"123456789"), 0xE306_9283);
    }
}
