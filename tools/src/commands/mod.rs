//! One module per subcommand, plus helpers they share.

pub mod chain;
pub mod changes;
pub mod check;
pub mod checkpoint;
pub mod compact;
pub mod compare;
pub mod completions;
pub mod convert;
pub mod create;
pub mod info;
pub mod map;
pub mod mount;
pub mod resize;
pub mod rw;

use disk::{Extent, Mapping, VirtualDisk};

/// Bytes moved per read or write: large enough for streaming speed, small
/// enough to stay in cache (measured: 4 MiB chunks cost 2-3x the CPU of
/// 256 KiB-1 MiB ones), and a divisor of every VHDX block size.
pub const CHUNK: usize = 1 << 20;

/// Write `text` to stdout. Unlike `print!`, which panics when stdout is a
/// closed pipe (`vdisk info disk.vhdx | head -1`), this returns the
/// `BrokenPipe` error, which `main` turns into a quiet exit.
pub fn print_out(text: &str) -> anyhow::Result<()> {
    print_bytes(text.as_bytes())
}

/// [`print_out`] for bytes.
pub fn print_bytes(bytes: &[u8]) -> anyhow::Result<()> {
    use std::io::Write;
    let mut out = std::io::stdout().lock();
    out.write_all(bytes)?;
    out.flush()?;
    Ok(())
}

/// The smaller of a byte count and a buffer length `limit`, as a length:
/// how much of `n` bytes one buffer takes.
pub fn min_len(n: u64, limit: usize) -> usize {
    usize::try_from(n).map_or(limit, |n| n.min(limit))
}

/// `println!` through [`print_out`]: evaluates to its `Result`.
#[macro_export]
macro_rules! outln {
    ($($arg:tt)*) => {
        $crate::commands::print_out(&format!("{}\n", format_args!($($arg)*)))
    };
}

/// The extent at `pos` (up to the end of the disk), checked to start at `pos`.
pub fn extent_at(d: &dyn VirtualDisk, pos: u64) -> disk::Result<Extent> {
    let size = d.virtual_size();
    let ext = d.map_allocation(pos, size - pos)?;
    if ext.offset != pos || ext.len == 0 {
        return Err(disk::Error::corrupt(
            "block mapping",
            pos,
            "driver returned an empty or misplaced extent",
        )
        .in_file(d.storage().name(), 0));
    }
    Ok(Extent {
        len: ext.len.min(size - pos),
        ..ext
    })
}

/// Whether an extent reads as zeros without looking at any data.
pub fn reads_as_zero(ext: &Extent) -> bool {
    matches!(ext.mapping, Mapping::Zero | Mapping::Unallocated)
}

/// Whether `buf` is all zeros, 64 bytes at a time (the inner loop vectorises).
pub fn is_zero(buf: &[u8]) -> bool {
    let mut blocks = buf.chunks_exact(64);
    for b in &mut blocks {
        let acc = b.chunks_exact(8).fold(0u64, |a, w| {
            a | u64::from_ne_bytes(w.try_into().expect("8 bytes"))
        });
        if acc != 0 {
            return false;
        }
    }
    blocks.remainder().iter().all(|&b| b == 0)
}

/// Index of the first byte where `a` and `b` differ (they have equal length).
pub fn first_difference(a: &[u8], b: &[u8]) -> Option<usize> {
    const PIECE: usize = 4096;
    let mut at = 0;
    for (pa, pb) in a.chunks(PIECE).zip(b.chunks(PIECE)) {
        if pa != pb {
            return pa.iter().zip(pb).position(|(x, y)| x != y).map(|i| at + i);
        }
        at += pa.len();
    }
    None
}

/// Index of the first nonzero byte of `buf`.
pub fn first_nonzero(buf: &[u8]) -> Option<usize> {
    const PIECE: usize = 4096;
    let mut at = 0;
    for p in buf.chunks(PIECE) {
        if !is_zero(p) {
            return p.iter().position(|&b| b != 0).map(|i| at + i);
        }
        at += p.len();
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn zero_tests() {
        let mut v = vec![0u8; 10_000];
        assert!(is_zero(&v));
        assert_eq!(first_nonzero(&v), None);
        for at in [0, 7, 63, 64, 4095, 4096, 9999] {
            v[at] = 1;
            assert!(!is_zero(&v));
            assert_eq!(first_nonzero(&v), Some(at));
            let z = vec![0u8; v.len()];
            assert_eq!(first_difference(&v, &z), Some(at));
            v[at] = 0;
        }
        assert_eq!(first_difference(&v, &v.clone()), None);
        assert!(is_zero(&[]));
    }
}
