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
pub mod serve;

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

/// Scanning helpers shared with the library's convert.
pub use image::convert::{extent_at, is_zero, reads_as_zero};

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
