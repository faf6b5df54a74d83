//! Helpers shared by the fuzz targets: the sparse encoding of VHDX inputs,
//! a sparse in-memory storage, and the open / read / write / flush /
//! reopen exercise every whole-image target runs.

use disk::{MemStorage, Storage, VirtualDisk};
use std::sync::Arc;

mod sparse;
pub use sparse::SparseStorage;

/// The largest file a sparse input decodes to.
pub const MAX_FILE: usize = 8 << 20;
/// The most of a disk [`read_all`] reads back (its start).
pub const MAX_READ: u64 = 4 << 20;
/// The length of each range a [`Plan`] reads.
pub const RANGE: u64 = 64 << 10;
/// The length of each write of a [`Plan`].
pub const WRITE: usize = 4096;

/// A VHDX file is at least a few MiB, almost all zeros (regions are 1 MiB
/// aligned), too large for a fuzz input. Inputs of the VHDX targets are
/// therefore a sparse encoding of the file: records of `skip: u16 LE`
/// (that many 512-byte units of zeros), `n: u16 LE`, then `n` bytes. The
/// file ends where the last record does, at most [`MAX_FILE`] bytes.
/// [`SparseStorage::decode`] decodes the same way without the dense buffer.
pub fn decode_sparse(data: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    for_each_record(data, |at, bytes| {
        out.resize(at, 0);
        out.extend_from_slice(bytes);
    });
    out
}

/// Walk the records of a sparse input: `f(at, bytes)` for each, where
/// `bytes` go at `at`; the file ends where the last record's bytes do.
pub(crate) fn for_each_record(data: &[u8], mut f: impl FnMut(usize, &[u8])) {
    let mut len = 0usize;
    let mut i = 0;
    while i + 4 <= data.len() {
        let skip = usize::from(u16::from_le_bytes([data[i], data[i + 1]])) * 512;
        let n = usize::from(u16::from_le_bytes([data[i + 2], data[i + 3]]));
        i += 4;
        let n = n.min(data.len() - i);
        let at = (len + skip).min(MAX_FILE);
        let take = n.min(MAX_FILE - at);
        len = at + take;
        f(at, &data[i..i + take]);
        i += n;
    }
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

/// A hash of the input's length and of up to 128 bytes at each end: where
/// a [`Plan`] puts its input-chosen ranges.
fn hash(data: &[u8]) -> u64 {
    let ends = data.len().min(128);
    let (head, tail) = (&data[..ends], &data[data.len() - ends..]);
    let mut h = 0xcbf2_9ce4_8422_2325u64 ^ data.len() as u64;
    for c in head.chunks(8).chain(tail.chunks(8)) {
        let mut w = [0u8; 8];
        w[..c.len()].copy_from_slice(c);
        h = (h ^ u64::from_le_bytes(w))
            .wrapping_mul(0x0100_0000_01b3)
            .rotate_left(29);
    }
    h
}

/// What a whole-image target reads and writes in a disk of a given size:
/// [`RANGE`]-byte ranges at the start and the end of the disk, across the
/// block boundaries of the usual block sizes (1, 2, 32, 256 MiB) and the
/// 4 GiB sector bitmap chunk, around each write, and two at offsets
/// chosen by the input (any byte alignment); and three [`WRITE`]-byte
/// writes: at the start, at an input-chosen offset (any alignment), and at
/// the last 4 KiB of the disk. The ranges are clipped to the disk.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Plan {
    /// (offset, length) of each read, inside the disk.
    pub reads: Vec<(u64, usize)>,
    /// Offsets of the writes, inside the disk.
    pub writes: Vec<u64>,
}

impl Plan {
    /// The plan for a disk of `size` bytes and the input `data`.
    pub fn new(size: u64, data: &[u8]) -> Plan {
        let h = hash(data);
        let h2 = h.rotate_left(32) ^ 0x9e37_79b9_7f4a_7c15;
        let h3 = h.wrapping_mul(0xff51_afd7_ed55_8ccd);
        let w = WRITE as u64;
        let writes = if size < w {
            Vec::new()
        } else {
            let last = size / w * w - w;
            vec![0, h3 % (size - w + 1), last]
        };
        let mut starts = vec![
            0,
            size.saturating_sub(RANGE),
            h % size.max(1),
            h2 % size.max(1),
        ];
        for b in [1u64 << 20, 2 << 20, 32 << 20, 256 << 20, 4 << 30] {
            starts.push(b.saturating_sub(RANGE / 2));
        }
        for &at in &writes {
            starts.push(at.saturating_sub(RANGE / 2));
        }
        let mut reads = Vec::new();
        for s in starts {
            if s < size {
                // At most RANGE (64 KiB): fits a usize.
                let n = (size - s).min(RANGE) as usize;
                if !reads.contains(&(s, n)) {
                    reads.push((s, n));
                }
            }
        }
        Plan { reads, writes }
    }

    /// Read every range of the plan from `d` (each on its own: an error
    /// in one does not stop the others).
    pub fn read(&self, d: &dyn VirtualDisk) {
        let mut buf = vec![0u8; RANGE as usize];
        for &(at, n) in &self.reads {
            let _ = d.read_at(&mut buf[..n], at);
        }
    }

    /// Read every range of the plan from `a` and `b` and assert that
    /// where both reads succeed they return the same bytes.
    pub fn compare(&self, a: &dyn VirtualDisk, b: &dyn VirtualDisk, what: &str) {
        let (mut x, mut y) = (vec![0u8; RANGE as usize], vec![0u8; RANGE as usize]);
        for &(at, n) in &self.reads {
            if a.read_at(&mut x[..n], at).is_ok() && b.read_at(&mut y[..n], at).is_ok() {
                assert!(x[..n] == y[..n], "{what}: {n} bytes at {at:#x} differ");
            }
        }
    }

    /// Write a pattern at each write offset of the plan, then flush;
    /// returns the writes that succeeded before a successful flush (empty
    /// if the flush failed).
    pub fn write(&self, d: &dyn VirtualDisk, seed: u8) -> Written {
        let mut done: Written = Vec::new();
        for (k, &at) in self.writes.iter().enumerate() {
            let buf: Vec<u8> = (0..WRITE as u32)
                .map(|i| (i as u8) ^ seed ^ (k as u8).wrapping_mul(0x55) | 1)
                .collect();
            if d.write_at(&buf, at).is_ok() {
                // A later write wins where it overlaps an earlier one.
                for (o, old) in &mut done {
                    overwrite(old, *o, &buf, at);
                }
                done.push((at, buf));
            }
        }
        if d.flush().is_err() {
            return Vec::new();
        }
        done
    }
}

/// Apply `new` (at `new_at`) to the copy `old` of what was written at
/// `old_at`, where they overlap.
fn overwrite(old: &mut [u8], old_at: u64, new: &[u8], new_at: u64) {
    let s = old_at.max(new_at);
    let e = (old_at + old.len() as u64).min(new_at + new.len() as u64);
    if s < e {
        // Offsets inside 4 KiB buffers.
        let (a, b, n) = (
            (s - old_at) as usize,
            (s - new_at) as usize,
            (e - s) as usize,
        );
        old[a..a + n].copy_from_slice(&new[b..b + n]);
    }
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

/// Assert that a writable session on a disk of `virtual_size` bytes never
/// made its file (`initial` bytes when opened) absurdly large: past the
/// file, twice the disk and 2 GiB (every block of the disk allocated once
/// with its sector bitmaps, the three blocks the writes allocate, the log
/// and slack). What a dense in-memory file would have shown as running out
/// of memory.
pub fn check_growth(st: &SparseStorage, initial: u64, virtual_size: u64) {
    let bound = initial
        .saturating_add(virtual_size.saturating_mul(2))
        .saturating_add(2 << 30);
    assert!(
        st.max_len() <= bound,
        "a writable session on a {virtual_size:#x}-byte disk grew its {initial:#x}-byte file \
         to {:#x} bytes",
        st.max_len()
    );
}

/// Storage shared between a disk and the target (to reopen its bytes).
pub fn shared(name: &str, bytes: Vec<u8>) -> Arc<MemStorage> {
    Arc::new(MemStorage::from_vec(name, bytes))
}

/// The bytes of shared storage.
pub fn bytes_of(st: &Arc<MemStorage>) -> Vec<u8> {
    st.to_vec()
}

/// Assert that the read-only view `ro` of a file with a replayed log laid
/// over it (a read-only open's storage) holds the same bytes as `rw`, the
/// file the log was replayed into, except in the headers (64 KiB..192 KiB:
/// the writable open recorded there that the log is empty). Compared: every
/// 4 KiB page that holds data in `before` (the file as it was) or `rw`;
/// the others are zeros in `rw` and untouched by the log. The writable
/// open may have cut an unreferenced tail after the replay (space a crash
/// left between allocating blocks and referencing them, given back as
/// `check -r leaks` would): `rw` may be shorter, and is compared up to its
/// end.
pub fn compare_replayed(ro: &dyn Storage, rw: &SparseStorage, before: &SparseStorage) {
    let (Ok(len), Ok(rw_len)) = (ro.len(), rw.len()) else {
        return;
    };
    assert!(
        rw_len <= len,
        "the replayed file ({rw_len} bytes) is longer than the overlaid one ({len} bytes)"
    );
    let len = rw_len;
    let mut pages: Vec<u64> = before.pages();
    pages.extend(rw.pages());
    pages.sort_unstable();
    pages.dedup();
    let page = sparse::PAGE as u64;
    let (mut x, mut y) = (vec![0u8; sparse::PAGE], vec![0u8; sparse::PAGE]);
    for p in pages {
        let at = p * page;
        if (64 << 10..192 << 10).contains(&at) || at >= len {
            continue;
        }
        // Inside a page: fits a usize.
        let n = (len - at).min(page) as usize;
        if ro.read_at(&mut x[..n], at).is_ok() && rw.read_at(&mut y[..n], at).is_ok() {
            assert!(
                x[..n] == y[..n],
                "the overlaid and the replayed file differ in the page at {at:#x}"
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_plan_stays_inside_the_disk() {
        for size in [
            0u64,
            1,
            512,
            4095,
            4096,
            70_000,
            1 << 20,
            8 << 20,
            5 << 30,
            64 << 40,
        ] {
            for input in [&b""[..], b"x", &[7u8; 300]] {
                let p = Plan::new(size, input);
                assert_eq!(p, Plan::new(size, input), "deterministic");
                for &(at, n) in &p.reads {
                    assert!(n > 0 && n as u64 <= RANGE && at + n as u64 <= size);
                }
                for &at in &p.writes {
                    assert!(at + WRITE as u64 <= size);
                }
                assert_eq!(p.writes.len(), if size >= 4096 { 3 } else { 0 });
                if size > 0 {
                    assert!(p.reads.contains(&(0, size.min(RANGE) as usize)));
                    assert!(p.reads.iter().any(|&(at, n)| at + n as u64 == size));
                }
            }
        }
        // Block boundaries inside the disk are read across.
        let p = Plan::new(64 << 20, b"");
        for b in [1u64 << 20, 2 << 20, 32 << 20] {
            assert!(p.reads.contains(&(b - RANGE / 2, RANGE as usize)), "{b:#x}");
        }
    }

    #[test]
    fn overlapping_writes_are_recorded_as_the_disk_holds_them() {
        let mut old = vec![1u8; 8];
        overwrite(&mut old, 100, &[2u8; 4], 104);
        overwrite(&mut old, 100, &[3u8; 4], 98);
        overwrite(&mut old, 100, &[4u8; 4], 200);
        assert_eq!(old, [3, 3, 1, 1, 2, 2, 2, 2]);
    }
}
