//! A sparse in-memory file: 4 KiB pages in a map, absent pages read as
//! zeros (holes). A VHDX file of a few MiB, almost all zeros, costs a few
//! pages instead of MiBs to zero and copy for every input, and a file
//! extended by gigabytes costs nothing. Like a file on a file system with
//! holes: `data_run` reports the pages that hold data, a page written with
//! zeros becomes a hole again, and a read-only file refuses writes.

use disk::{Error, Result, Storage};
use std::collections::BTreeMap;
use std::sync::{Arc, RwLock, RwLockReadGuard, RwLockWriteGuard};

/// Bytes per page.
pub const PAGE: usize = 4096;
/// [`PAGE`] as a file offset.
const PAGE64: u64 = PAGE as u64;

/// A page of the file: shared between snapshots, copied on write.
type Page = Arc<[u8; PAGE]>;

/// Zeros to compare with (a memcmp: the fuzz build instruments every
/// byte comparison of a loop).
static ZEROS: [u8; PAGE] = [0; PAGE];

fn is_zero(b: &[u8]) -> bool {
    b == &ZEROS[..b.len()]
}

#[derive(Clone, Default)]
struct Inner {
    /// Pages holding data (never all zeros), by index.
    pages: BTreeMap<u64, Page>,
    len: u64,
    /// The largest length the file has had.
    max_len: u64,
}

impl Inner {
    /// Write `buf` at `offset` (no overflow: checked by the caller).
    fn write(&mut self, buf: &[u8], offset: u64) {
        let mut done = 0usize;
        while done < buf.len() {
            let pos = offset + done as u64;
            let (idx, inside) = (pos / PAGE64, (pos % PAGE64) as usize);
            let n = (PAGE - inside).min(buf.len() - done);
            let src = &buf[done..done + n];
            let zeros = is_zero(src);
            match self.pages.get_mut(&idx) {
                Some(p) => {
                    Arc::make_mut(p)[inside..inside + n].copy_from_slice(src);
                    if zeros && is_zero(&p[..]) {
                        self.pages.remove(&idx);
                    }
                }
                None if zeros => {}
                None => {
                    let mut p = [0u8; PAGE];
                    p[inside..inside + n].copy_from_slice(src);
                    self.pages.insert(idx, Arc::new(p));
                }
            }
            done += n;
        }
        self.grow(offset + buf.len() as u64);
    }

    fn grow(&mut self, end: u64) {
        self.len = self.len.max(end);
        self.max_len = self.max_len.max(self.len);
    }
}

/// A sparse in-memory file (module docs). Snapshots share pages.
pub struct SparseStorage {
    name: String,
    writable: bool,
    inner: RwLock<Inner>,
}

impl SparseStorage {
    /// An empty writable file.
    pub fn new(name: &str) -> Self {
        SparseStorage {
            name: name.to_string(),
            writable: true,
            inner: RwLock::default(),
        }
    }

    /// A writable file holding `bytes`.
    pub fn from_bytes(name: &str, bytes: &[u8]) -> Self {
        let s = SparseStorage::new(name);
        {
            let mut i = s.lock_mut();
            i.write(bytes, 0);
            i.grow(bytes.len() as u64);
        }
        s
    }

    /// A writable file holding what the sparse input `data` decodes to (as
    /// [`crate::decode_sparse`] does, without the dense buffer).
    pub fn decode(name: &str, data: &[u8]) -> Self {
        let s = SparseStorage::new(name);
        {
            let mut i = s.lock_mut();
            crate::for_each_record(data, |at, bytes| {
                i.write(bytes, at as u64);
                i.grow((at + bytes.len()) as u64);
            });
        }
        s
    }

    /// A copy of the file as it is now (pages shared until written), under
    /// `name`, writable or not.
    pub fn snapshot(&self, name: &str, writable: bool) -> Self {
        let mut inner = self.lock().clone();
        inner.max_len = inner.len;
        SparseStorage {
            name: name.to_string(),
            writable,
            inner: RwLock::new(inner),
        }
    }

    /// The largest length the file has had.
    pub fn max_len(&self) -> u64 {
        self.lock().max_len
    }

    /// Indices of the pages holding data.
    pub fn pages(&self) -> Vec<u64> {
        self.lock().pages.keys().copied().collect()
    }

    /// The whole file (for tests).
    pub fn to_vec(&self) -> Vec<u8> {
        let i = self.lock();
        // Test files are small.
        let mut v = vec![0u8; i.len as usize];
        for (&idx, p) in &i.pages {
            let at = (idx * PAGE64) as usize;
            let n = PAGE.min(v.len() - at);
            v[at..at + n].copy_from_slice(&p[..n]);
        }
        v
    }

    fn lock(&self) -> RwLockReadGuard<'_, Inner> {
        self.inner.read().unwrap_or_else(|e| e.into_inner())
    }

    fn lock_mut(&self) -> RwLockWriteGuard<'_, Inner> {
        self.inner.write().unwrap_or_else(|e| e.into_inner())
    }

    fn check_writable(&self) -> Result<()> {
        if self.writable {
            Ok(())
        } else {
            Err(Error::io(
                "write to a file opened read-only",
                std::io::ErrorKind::PermissionDenied.into(),
            )
            .in_file(&self.name, 0))
        }
    }
}

impl Storage for SparseStorage {
    fn name(&self) -> &str {
        &self.name
    }

    // Every index is inside `buf` or a page: no cast below truncates.
    #[allow(clippy::cast_possible_truncation)]
    fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        let i = self.lock();
        let end = offset
            .checked_add(buf.len() as u64)
            .filter(|&e| e <= i.len)
            .ok_or_else(|| {
                Error::io(
                    format!("read of {} bytes at offset {offset:#x}", buf.len()),
                    std::io::ErrorKind::UnexpectedEof.into(),
                )
                .in_file(&self.name, 0)
            })?;
        if buf.is_empty() {
            return Ok(());
        }
        let mut done = 0usize;
        for (&idx, p) in i.pages.range(offset / PAGE64..=(end - 1) / PAGE64) {
            let start = idx * PAGE64;
            let (s, e) = (start.max(offset), (start + PAGE64).min(end));
            let (bs, be) = ((s - offset) as usize, (e - offset) as usize);
            buf[done..bs].fill(0);
            buf[bs..be].copy_from_slice(&p[(s - start) as usize..(e - start) as usize]);
            done = be;
        }
        buf[done..].fill(0);
        Ok(())
    }

    fn write_at(&self, buf: &[u8], offset: u64) -> Result<()> {
        self.check_writable()?;
        let end = offset.checked_add(buf.len() as u64).ok_or_else(|| {
            Error::invalid(format!(
                "write of {} bytes at offset {offset:#x}",
                buf.len()
            ))
            .in_file(&self.name, 0)
        })?;
        let mut i = self.lock_mut();
        i.write(buf, offset);
        i.grow(end);
        Ok(())
    }

    fn flush(&self) -> Result<()> {
        Ok(())
    }

    fn len(&self) -> Result<u64> {
        Ok(self.lock().len)
    }

    // The tail of a cut page is inside the page.
    #[allow(clippy::cast_possible_truncation)]
    fn set_len(&self, len: u64) -> Result<()> {
        self.check_writable()?;
        let mut i = self.lock_mut();
        if len < i.len {
            let keep = len.div_ceil(PAGE64);
            let _ = i.pages.split_off(&keep);
            let cut = (len % PAGE64) as usize;
            if cut != 0 {
                let idx = len / PAGE64;
                if let Some(p) = i.pages.get_mut(&idx) {
                    Arc::make_mut(p)[cut..].fill(0);
                    if is_zero(&p[..]) {
                        i.pages.remove(&idx);
                    }
                }
            }
            i.len = len;
        } else {
            i.grow(len);
        }
        Ok(())
    }

    fn is_writable(&self) -> bool {
        self.writable
    }

    fn data_run(&self, offset: u64) -> Result<Option<(u64, u64)>> {
        let i = self.lock();
        if offset >= i.len {
            return Ok(None);
        }
        let mut run = i.pages.range(offset / PAGE64..);
        let Some((&first, _)) = run.next() else {
            return Ok(None);
        };
        let mut last = first;
        for (&idx, _) in run {
            if idx != last + 1 {
                break;
            }
            last = idx;
        }
        let start = (first * PAGE64).max(offset);
        let end = ((last + 1) * PAGE64).min(i.len);
        Ok((start < end).then_some((start, end)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use disk::MemStorage;

    /// A tiny deterministic generator.
    struct Rng(u64);
    impl Rng {
        fn next(&mut self) -> u64 {
            self.0 ^= self.0 << 13;
            self.0 ^= self.0 >> 7;
            self.0 ^= self.0 << 17;
            self.0
        }
        fn below(&mut self, n: u64) -> u64 {
            self.next() % n
        }
    }

    /// Random writes, truncations, extensions and reads do the same to a
    /// sparse file and to a dense one, and data_run covers every non-zero
    /// byte.
    #[test]
    fn behaves_like_a_dense_file() {
        let mut r = Rng(0x1234_5678_9abc_def1);
        for round in 0..200 {
            let s = SparseStorage::new("s");
            let m = MemStorage::new("m");
            for _ in 0..20 {
                let at = r.below(64 << 10);
                let n = r.below(10_000) as usize;
                match r.below(5) {
                    0 => {
                        let len = r.below(80 << 10);
                        s.set_len(len).unwrap();
                        m.set_len(len).unwrap();
                    }
                    1 => {
                        // Zeros: may turn pages back into holes.
                        let b = vec![0u8; n];
                        s.write_at(&b, at).unwrap();
                        m.write_at(&b, at).unwrap();
                    }
                    _ => {
                        let b: Vec<u8> = (0..n).map(|_| (r.next() % 3) as u8).collect();
                        s.write_at(&b, at).unwrap();
                        m.write_at(&b, at).unwrap();
                    }
                }
                assert_eq!(s.len().unwrap(), m.len().unwrap(), "round {round}");
                let (at, n) = (r.below(90 << 10), r.below(9000) as usize);
                let (mut a, mut b) = (vec![7u8; n], vec![7u8; n]);
                let (x, y) = (s.read_at(&mut a, at), m.read_at(&mut b, at));
                assert_eq!(x.is_ok(), y.is_ok(), "round {round}: read {n} at {at}");
                assert_eq!(a, b, "round {round}: read {n} at {at}");
            }
            let dense = m.to_vec();
            assert_eq!(s.to_vec(), dense, "round {round}");
            // Every non-zero byte lies in a data run.
            let mut covered = vec![false; dense.len()];
            let mut pos = 0;
            while let Some((a, b)) = s.data_run(pos).unwrap() {
                assert!(a >= pos && b > a && b <= dense.len() as u64);
                covered[a as usize..b as usize].fill(true);
                pos = b;
            }
            for (k, &byte) in dense.iter().enumerate() {
                assert!(
                    byte == 0 || covered[k],
                    "round {round}: byte {k} outside data"
                );
            }
        }
    }

    #[test]
    fn decodes_like_the_dense_decoder() {
        let mut r = Rng(42);
        for _ in 0..300 {
            let n = r.below(3000) as usize;
            let mut data: Vec<u8> = (0..n).map(|_| r.next() as u8).collect();
            // Skips small enough to stay under MAX_FILE now and then.
            for k in (0..n).step_by(7) {
                if r.below(2) == 0 {
                    data[k] &= 0x0f;
                }
            }
            let s = SparseStorage::decode("s", &data);
            assert_eq!(s.to_vec(), crate::decode_sparse(&data));
        }
    }

    #[test]
    fn snapshots_and_read_only_files() {
        let s = SparseStorage::from_bytes("s", &[1, 2, 3]);
        let ro = s.snapshot("ro", false);
        s.write_at(&[9], 0).unwrap();
        assert_eq!(ro.to_vec(), vec![1, 2, 3]);
        assert!(ro.write_at(&[1], 0).is_err());
        assert!(ro.set_len(0).is_err());
        assert!(!ro.is_writable());
        s.set_len(5 << 30).unwrap();
        assert_eq!(s.max_len(), 5 << 30);
        s.set_len(3).unwrap();
        assert_eq!((s.len().unwrap(), s.max_len()), (3, 5 << 30));
        assert_eq!(s.to_vec(), vec![9, 2, 3]);
    }
}
