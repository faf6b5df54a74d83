//! Fault injection for crash tests: a storage that records every write and
//! flush, and can rebuild what the disk could hold after a power cut.
//!
//! Writes are recorded in 4 KiB-aligned pieces, so a cut can tear a large
//! write. A crash image at cut point `k` holds every operation up to the last
//! flush before `k`, plus any chosen subset of the writes after that flush
//! (the disk cache may have persisted some of them, in any order).

use crate::error::{Error, Result};
use crate::storage::Storage;
use std::sync::Mutex;

/// One recorded storage operation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Op {
    /// Bytes written at an offset (never crossing a 4 KiB boundary).
    Write {
        /// File offset.
        offset: u64,
        /// The bytes.
        data: Vec<u8>,
    },
    /// The length changed.
    SetLen(u64),
    /// A flush completed: everything before it is durable.
    Flush,
}

#[derive(Debug, Default)]
struct Inner {
    current: Vec<u8>,
    ops: Vec<Op>,
    recording: bool,
    fail_writes_after: Option<usize>,
    /// Fail the mutation (write, flush or set_len) after this many more,
    /// with this error.
    fail_mutation: Option<(usize, Fault)>,
}

/// The error an injected fault returns.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fault {
    /// EIO: the device failed.
    Eio,
    /// ENOSPC: no space left.
    Enospc,
}

impl Fault {
    fn error(self) -> std::io::Error {
        // Linux's errno values.
        std::io::Error::from_raw_os_error(match self {
            Fault::Eio => 5,
            Fault::Enospc => 28,
        })
    }
}

/// A recording in-memory storage; see the module docs.
#[derive(Debug)]
pub struct RecordingStorage {
    base: Mutex<Vec<u8>>,
    inner: Mutex<Inner>,
    name: String,
}

const PIECE: u64 = 4096;
/// [`PIECE`] as a length.
const PIECE_BYTES: usize = 4096;

impl RecordingStorage {
    /// Start from `initial` bytes; recording is on.
    pub fn new(name: impl Into<String>, initial: Vec<u8>) -> Self {
        RecordingStorage {
            base: Mutex::new(initial.clone()),
            inner: Mutex::new(Inner {
                current: initial,
                ops: Vec::new(),
                recording: true,
                fail_writes_after: None,
                fail_mutation: None,
            }),
            name: name.into(),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Forget the recorded operations: the current contents become the base.
    pub fn reset_recording(&self) {
        let mut g = self.lock();
        *self.base.lock().unwrap_or_else(|e| e.into_inner()) = g.current.clone();
        g.ops.clear();
    }

    /// Make every write after the next `n` fail with an I/O error (None: never).
    pub fn fail_writes_after(&self, n: Option<usize>) {
        self.lock().fail_writes_after = n;
    }

    /// Make the mutation (write, flush or set_len) after the next `n` fail
    /// with `fault`, once (None: never).
    pub fn fail_mutation_after(&self, n: Option<usize>, fault: Fault) {
        self.lock().fail_mutation = n.map(|n| (n, fault));
    }

    /// Whether an armed mutation fault has not fired yet.
    pub fn fault_pending(&self) -> bool {
        self.lock().fail_mutation.is_some()
    }

    /// Number of recorded operations.
    pub fn op_count(&self) -> usize {
        self.lock().ops.len()
    }

    /// The recorded operations.
    pub fn ops(&self) -> Vec<Op> {
        self.lock().ops.clone()
    }

    /// The current contents (as if nothing was lost).
    pub fn contents(&self) -> Vec<u8> {
        self.lock().current.clone()
    }

    /// What the disk may hold after a power cut just before operation `cut`:
    /// all operations before the last flush preceding `cut`, then those
    /// unflushed writes (and length changes) among `[last_flush, cut)` for
    /// which `keep(index)` is true, in order.
    pub fn crash_image(&self, cut: usize, mut keep: impl FnMut(usize) -> bool) -> Vec<u8> {
        let g = self.lock();
        let cut = cut.min(g.ops.len());
        let last_flush = g.ops[..cut]
            .iter()
            .rposition(|op| *op == Op::Flush)
            .map_or(0, |i| i + 1);
        let mut img = self.base.lock().unwrap_or_else(|e| e.into_inner()).clone();
        for (i, op) in g.ops[..cut].iter().enumerate() {
            if i >= last_flush && !keep(i) {
                continue;
            }
            apply(&mut img, op);
        }
        img
    }

    /// Indices of the flush operations.
    pub fn flush_points(&self) -> Vec<usize> {
        self.lock()
            .ops
            .iter()
            .enumerate()
            .filter(|(_, op)| **op == Op::Flush)
            .map(|(i, _)| i)
            .collect()
    }
}

/// Apply `op` to the in-memory image (test support: offsets and lengths
/// past the address space are a test's bug).
fn apply(img: &mut Vec<u8>, op: &Op) {
    let at = |x: u64| usize::try_from(x).expect("an in-memory image fits in memory");
    match op {
        Op::Write { offset, data } => {
            let start = at(*offset);
            let end = start + data.len();
            if img.len() < end {
                img.resize(end, 0);
            }
            img[start..end].copy_from_slice(data);
        }
        Op::SetLen(len) => img.resize(at(*len), 0),
        Op::Flush => {}
    }
}

/// Count a mutation against the armed fault; the fault's error when it
/// fires (once).
fn injected(g: &mut Inner, name: &str, what: impl Fn() -> String) -> Result<()> {
    match g.fail_mutation {
        Some((0, fault)) => {
            g.fail_mutation = None;
            Err(Error::io(format!("injected fault {}", what()), fault.error()).in_file(name, 0))
        }
        Some((n, fault)) => {
            g.fail_mutation = Some((n - 1, fault));
            Ok(())
        }
        None => Ok(()),
    }
}

impl Storage for RecordingStorage {
    fn name(&self) -> &str {
        &self.name
    }
    fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        let g = self.lock();
        let src = usize::try_from(offset)
            .ok()
            .and_then(|s| s.checked_add(buf.len()).and_then(|e| g.current.get(s..e)));
        match src {
            Some(src) => {
                buf.copy_from_slice(src);
                Ok(())
            }
            None => Err(Error::io(
                format!("read of {} bytes at offset {offset:#x}", buf.len()),
                std::io::ErrorKind::UnexpectedEof.into(),
            )
            .in_file(&self.name, 0)),
        }
    }
    fn write_at(&self, buf: &[u8], offset: u64) -> Result<()> {
        let mut g = self.lock();
        injected(&mut g, &self.name, || {
            format!("writing {} bytes at offset {offset:#x}", buf.len())
        })?;
        if let Some(n) = g.fail_writes_after {
            if n == 0 {
                return Err(Error::io(
                    format!("injected failure writing at offset {offset:#x}"),
                    std::io::Error::other("injected fault"),
                )
                .in_file(&self.name, 0));
            }
            g.fail_writes_after = Some(n - 1);
        }
        let mut pos = offset;
        let mut rest = buf;
        while !rest.is_empty() {
            let room = PIECE_BYTES - (pos % PIECE) as usize;
            let (piece, tail) = rest.split_at(room.min(rest.len()));
            let op = Op::Write {
                offset: pos,
                data: piece.to_vec(),
            };
            apply(&mut g.current, &op);
            if g.recording {
                g.ops.push(op);
            }
            pos += piece.len() as u64;
            rest = tail;
        }
        Ok(())
    }
    fn flush(&self) -> Result<()> {
        let mut g = self.lock();
        injected(&mut g, &self.name, || "flushing".to_string())?;
        if g.recording {
            g.ops.push(Op::Flush);
        }
        Ok(())
    }
    fn len(&self) -> Result<u64> {
        Ok(self.lock().current.len() as u64)
    }
    fn set_len(&self, len: u64) -> Result<()> {
        let mut g = self.lock();
        injected(&mut g, &self.name, || {
            format!("setting the length to {len:#x}")
        })?;
        let op = Op::SetLen(len);
        apply(&mut g.current, &op);
        if g.recording {
            g.ops.push(op);
        }
        Ok(())
    }
    fn is_writable(&self) -> bool {
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn crash_image_keeps_flushed_and_chosen_writes() {
        let s = RecordingStorage::new("t", vec![0; 8192]);
        s.write_at(&[1; 10], 0).unwrap(); // op 0
        s.flush().unwrap(); // op 1
        s.write_at(&[2; 8192], 0).unwrap(); // ops 2, 3 (two pieces)
        assert_eq!(s.op_count(), 4);
        let none = s.crash_image(4, |_| false);
        assert_eq!(&none[..10], &[1; 10]);
        assert_eq!(none[10], 0);
        let torn = s.crash_image(4, |i| i == 3);
        assert_eq!(&torn[..10], &[1; 10]);
        assert_eq!(torn[4096], 2);
        let all = s.crash_image(4, |_| true);
        assert_eq!(all, s.contents());
    }

    #[test]
    fn injected_write_failure() {
        let s = RecordingStorage::new("t", vec![]);
        s.fail_writes_after(Some(1));
        s.write_at(&[1], 0).unwrap();
        let e = s.write_at(&[1], 1).unwrap_err();
        assert_eq!(e.kind(), crate::ErrorKind::Io);
    }
}

/// An opener of real files whose mutations (writes, flushes, length
/// changes, across every file it opened or created) fail once, at the
/// n-th, with an injected EIO or ENOSPC: for running whole operations
/// (merges, checkpoints, conversions) into a failing disk.
#[derive(Debug)]
pub struct FaultOpener {
    plan: std::sync::Arc<Mutex<Option<(usize, Fault)>>>,
}

impl FaultOpener {
    /// Fail the mutation after the next `n`, with `fault` (once).
    pub fn new(n: usize, fault: Fault) -> FaultOpener {
        FaultOpener {
            plan: std::sync::Arc::new(Mutex::new(Some((n, fault)))),
        }
    }

    /// Whether the fault has not fired yet.
    pub fn pending(&self) -> bool {
        self.plan
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .is_some()
    }

    fn wrap(&self, inner: Box<dyn Storage>) -> Box<dyn Storage> {
        Box::new(Faulty {
            inner,
            plan: self.plan.clone(),
        })
    }
}

impl crate::Opener for FaultOpener {
    fn open(
        &self,
        path: &std::path::Path,
        writable: bool,
        lock: crate::LockMode,
    ) -> Result<Box<dyn Storage>> {
        Ok(self.wrap(crate::FileOpener.open(path, writable, lock)?))
    }
    fn create(&self, path: &std::path::Path, overwrite: bool) -> Result<Box<dyn Storage>> {
        Ok(self.wrap(crate::FileOpener.create(path, overwrite)?))
    }
}

/// A storage of [`FaultOpener`].
struct Faulty {
    inner: Box<dyn Storage>,
    plan: std::sync::Arc<Mutex<Option<(usize, Fault)>>>,
}

impl Faulty {
    fn check(&self, what: impl Fn() -> String) -> Result<()> {
        let mut p = self
            .plan
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        match *p {
            Some((0, fault)) => {
                *p = None;
                Err(
                    Error::io(format!("injected fault {}", what()), fault.error())
                        .in_file(self.inner.name(), 0),
                )
            }
            Some((n, fault)) => {
                *p = Some((n - 1, fault));
                Ok(())
            }
            None => Ok(()),
        }
    }
}

impl Storage for Faulty {
    fn name(&self) -> &str {
        self.inner.name()
    }
    fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        self.inner.read_at(buf, offset)
    }
    fn write_at(&self, buf: &[u8], offset: u64) -> Result<()> {
        self.check(|| format!("writing {} bytes at offset {offset:#x}", buf.len()))?;
        self.inner.write_at(buf, offset)
    }
    fn flush(&self) -> Result<()> {
        self.check(|| "flushing".to_string())?;
        self.inner.flush()
    }
    fn len(&self) -> Result<u64> {
        self.inner.len()
    }
    fn set_len(&self, len: u64) -> Result<()> {
        self.check(|| format!("setting the length to {len:#x}"))?;
        self.inner.set_len(len)
    }
    fn is_writable(&self) -> bool {
        self.inner.is_writable()
    }
    fn file_id(&self) -> Option<(u64, u64)> {
        self.inner.file_id()
    }
    fn data_run(&self, offset: u64) -> Result<Option<(u64, u64)>> {
        self.inner.data_run(offset)
    }
}
