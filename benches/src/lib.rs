//! Shared helpers of the criterion benchmarks (`benches/`), the `iobench`
//! example and `compare-qemu.sh`.
#![forbid(unsafe_code)]
#![warn(missing_docs)]

pub mod chain;

use disk::{Result, VirtualDisk};

/// Fill `buf` with pseudo-random bytes (xorshift64*, seeded): cheap, never
/// all zero, and different for every seed.
pub fn fill_random(buf: &mut [u8], seed: u64) {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    for chunk in buf.chunks_mut(8) {
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        let v = x.wrapping_mul(0x2545_F491_4F6C_DD1D).to_le_bytes();
        chunk.copy_from_slice(&v[..chunk.len()]);
    }
}

/// A zeroed buffer of `len` bytes, a benchmark's request or fixture size.
///
/// # Panics
/// When `len` does not fit this platform's address space (a benchmark
/// asked for more than any machine running it has).
pub fn buffer(len: u64) -> Vec<u8> {
    vec![0u8; usize::try_from(len).expect("a benchmark buffer fits in memory")]
}

/// Whether every byte of `buf` is zero.
pub fn is_zero(buf: &[u8]) -> bool {
    let mut words = buf.chunks_exact(16);
    words
        .by_ref()
        .all(|w| w.iter().fold(0u8, |acc, &b| acc | b) == 0)
        && words.remainder().iter().all(|&b| b == 0)
}

/// Copy the virtual contents of `src` into `dst` (at least as large) in
/// `chunk`-byte pieces, skipping pieces that are all zero (`dst` must read
/// as zeros where nothing is written, e.g. a fresh dynamic VHDX or sparse
/// raw file). Does not flush. Returns the number of bytes written.
///
/// # Errors
/// I/O errors of either disk.
pub fn copy_nonzero(src: &dyn VirtualDisk, dst: &dyn VirtualDisk, chunk: usize) -> Result<u64> {
    let size = src.virtual_size();
    let mut buf = vec![0u8; chunk.max(1)];
    let mut written = 0u64;
    let mut off = 0u64;
    while off < size {
        let n = usize::try_from(size - off).map_or(buf.len(), |r| r.min(buf.len()));
        let piece = &mut buf[..n];
        src.read_at(piece, off)?;
        if !is_zero(piece) {
            dst.write_at(piece, off)?;
            written += n as u64;
        }
        off += n as u64;
    }
    Ok(written)
}

/// The offsets of an I/O pattern like `qemu-img bench`'s: start at
/// `offset`, then add `step` modulo `size` after every request.
#[derive(Debug, Clone)]
pub struct Strided {
    next: u64,
    step: u64,
    size: u64,
}

impl Strided {
    /// A pattern over a disk of `size` bytes (> 0).
    pub fn new(offset: u64, step: u64, size: u64) -> Self {
        let size = size.max(1);
        Strided {
            next: offset % size,
            step: step % size,
            size,
        }
    }
}

impl Iterator for Strided {
    type Item = u64;
    fn next(&mut self) -> Option<u64> {
        let cur = self.next;
        // size ≤ 2^63 for any real disk, so this cannot overflow.
        self.next = (cur + self.step) % self.size;
        Some(cur)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn zero_detection() {
        let mut v = vec![0u8; 1000];
        assert!(is_zero(&v));
        v[999] = 1;
        assert!(!is_zero(&v));
        v[999] = 0;
        v[3] = 1;
        assert!(!is_zero(&v));
        assert!(is_zero(&[]));
    }

    #[test]
    fn random_is_not_zero_and_seeded() {
        let mut a = vec![0u8; 4099];
        let mut b = vec![0u8; 4099];
        fill_random(&mut a, 1);
        fill_random(&mut b, 2);
        assert!(!is_zero(&a));
        assert_ne!(a, b);
    }

    #[test]
    fn strided_wraps_like_qemu_img_bench() {
        let offs: Vec<u64> = Strided::new(0, 3 * 4096, 8 * 4096).take(9).collect();
        let pages: Vec<u64> = offs.iter().map(|o| o / 4096).collect();
        assert_eq!(pages, [0, 3, 6, 1, 4, 7, 2, 5, 0]);
    }
}
