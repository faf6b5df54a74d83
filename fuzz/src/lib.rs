//! Helpers shared by the fuzz targets: the sparse encoding of VHDX inputs,
//! and the open / read / write / flush / reopen exercise every whole-image
//! target runs.

use disk::{MemStorage, VirtualDisk};
use std::sync::Arc;

/// The largest file a sparse input decodes to.
pub const MAX_FILE: usize = 8 << 20;
/// The most of a disk read back (its start).
pub const MAX_READ: u64 = 4 << 20;

/// A VHDX file is at least a few MiB, almost all zeros (regions are 1 MiB
/// aligned), too large for a fuzz input. Inputs of the VHDX targets are
/// therefore a sparse encoding of the file: records of `skip: u16 LE`
/// (that many 512-byte units of zeros), `n: u16 LE`, then `n` bytes. The
/// file ends where the last record does, at most [`MAX_FILE`] bytes.
pub fn decode_sparse(data: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    let mut i = 0;
    while i + 4 <= data.len() {
        let skip = usize::from(u16::from_le_bytes([data[i], data[i + 1]])) * 512;
        let n = usize::from(u16::from_le_bytes([data[i + 2], data[i + 3]]));
        i += 4;
        let n = n.min(data.len() - i);
        let end = (out.len() + skip).min(MAX_FILE);
        out.resize(end, 0);
        let take = n.min(MAX_FILE - out.len());
        out.extend_from_slice(&data[i..i + take]);
        i += n;
    }
    out
}

/// The sparse encoding of `file` (for seeds): runs of whole zero 512-byte
/// units become skips.
pub fn encode_sparse(file: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    let units: Vec<&[u8]> = file.chunks(512).collect();
    let mut u = 0;
    while u < units.len() {
        let mut skip = 0usize;
        while u < units.len()
            && skip < 0xffff
            && units[u].len() == 512
            && units[u].iter().all(|&b| b == 0)
        {
            skip += 1;
            u += 1;
        }
        let mut data = Vec::new();
        while u < units.len()
            && data.len() + units[u].len() <= 0xffff
            && !(units[u].len() == 512 && units[u].iter().all(|&b| b == 0))
        {
            data.extend_from_slice(units[u]);
            u += 1;
        }
        out.extend_from_slice(&(skip as u16).to_le_bytes());
        out.extend_from_slice(&(data.len() as u16).to_le_bytes());
        out.extend_from_slice(&data);
    }
    out
}

/// Read the start of `d` (up to [`MAX_READ`]) in 64 KiB pieces, stopping
/// at the first error.
pub fn read_all(d: &dyn VirtualDisk) {
    let size = d.virtual_size().min(MAX_READ);
    let mut buf = vec![0u8; 65536];
    let mut pos = 0;
    while pos < size {
        let n = (size - pos).min(buf.len() as u64) as usize;
        if d.read_at(&mut buf[..n], pos).is_err() {
            break;
        }
        pos += n as u64;
    }
}

/// Writes that succeeded: (offset, bytes).
pub type Written = Vec<(u64, Vec<u8>)>;

/// Write a 4 KiB pattern at the start, the middle and the end of the first
/// [`MAX_READ`] bytes of `d`, then flush; returns the writes that
/// succeeded before a successful flush (empty if the flush failed).
pub fn write_some(d: &dyn VirtualDisk, seed: u8) -> Written {
    let size = d.virtual_size().min(MAX_READ) / 4096 * 4096;
    if size == 0 {
        return Vec::new();
    }
    let mut done = Vec::new();
    for (k, at) in [0, size / 2 / 4096 * 4096, size - 4096]
        .into_iter()
        .enumerate()
    {
        let buf: Vec<u8> = (0..4096u32)
            .map(|i| (i as u8) ^ seed ^ (k as u8).wrapping_mul(0x55) | 1)
            .collect();
        if d.write_at(&buf, at).is_ok() {
            done.retain(|(o, _): &(u64, Vec<u8>)| *o != at);
            done.push((at, buf));
        }
    }
    if d.flush().is_err() {
        return Vec::new();
    }
    done
}

/// Assert that a reopened disk reads back what was written and flushed.
pub fn check_written(d: &dyn VirtualDisk, written: &Written) {
    for (at, want) in written {
        let mut got = vec![0u8; want.len()];
        if d.read_at(&mut got, *at).is_ok() {
            assert!(
                got == *want,
                "a flushed write of {} bytes at {at:#x} reads back different after a reopen",
                want.len()
            );
        }
    }
}

/// Storage shared between a disk and the target (to reopen its bytes).
pub fn shared(name: &str, bytes: Vec<u8>) -> Arc<MemStorage> {
    Arc::new(MemStorage::from_vec(name, bytes))
}

/// The bytes of shared storage.
pub fn bytes_of(st: &Arc<MemStorage>) -> Vec<u8> {
    st.to_vec()
}
