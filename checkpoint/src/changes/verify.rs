//! [`Changes::verify`]: check the reported changes against the data.

use super::{Change, Changes};
use crate::{Error, Result};
use disk::VirtualDisk;

/// Bytes read from each disk at a time.
const CHUNK: u64 = 1 << 20;

/// How many ranges outside the changes [`VerifyReport::missed`] lists.
pub const MAX_MISSED: usize = 16;

/// What [`Changes::verify`] found.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct VerifyReport {
    /// Bytes of each disk read and compared (the whole virtual size).
    pub bytes_compared: u64,
    /// Bytes of the sectors where FROM and TO differ.
    pub differing_bytes: u64,
    /// Changes reported, and their bytes.
    pub changes: u64,
    /// Bytes the changes cover.
    pub reported_bytes: u64,
    /// Bytes of differing sectors outside every change (0 when the changes
    /// are right).
    pub missed_bytes: u64,
    /// The first [`MAX_MISSED`] differing ranges outside the changes
    /// (offset, length).
    pub missed: Vec<(u64, u64)>,
}

impl VerifyReport {
    /// Whether every differing sector lies inside a reported change.
    pub fn ok(&self) -> bool {
        self.missed_bytes == 0
    }
}

/// The changes (handed out in order by `next`), walked in step with the
/// comparison, which hands differing ranges in order to
/// [`Covering::differ`].
pub(super) struct Covering<'a> {
    pub(super) next: &'a mut dyn FnMut() -> Result<Option<Change>>,
    pub(super) cur: Option<Change>,
    pub(super) done: bool,
    pub(super) report: &'a mut VerifyReport,
}

impl Covering<'_> {
    /// Move to the first change that ends past `at`.
    pub(super) fn seek(&mut self, at: u64) -> Result<()> {
        while !self.done && self.cur.is_none_or(|c| c.end() <= at) {
            self.cur = (self.next)()?;
            match self.cur {
                Some(c) => {
                    self.report.changes += 1;
                    self.report.reported_bytes += c.length;
                }
                None => self.done = true,
            }
        }
        Ok(())
    }

    /// Record the differing range `[a, b)`, and what of it no change covers.
    pub(super) fn differ(&mut self, a: u64, b: u64) -> Result<()> {
        self.report.differing_bytes += b - a;
        let mut x = a;
        while x < b {
            self.seek(x)?;
            let (lo, hi) = match self.cur {
                Some(c) if c.start <= x => (x, x),
                Some(c) => (x, c.start.min(b)),
                None => (x, b),
            };
            if hi > lo {
                self.report.missed_bytes += hi - lo;
                let missed = &mut self.report.missed;
                let full = missed.len() >= MAX_MISSED;
                match missed.last_mut() {
                    Some(m) if m.0 + m.1 == lo => m.1 += hi - lo,
                    _ if !full => missed.push((lo, hi - lo)),
                    _ => {}
                }
                x = hi;
            } else {
                let end = self.cur.map_or(b, |c| c.end());
                x = end.min(b);
            }
        }
        Ok(())
    }
}

impl Changes {
    /// Read FROM and TO whole, compare them sector by sector (TO's logical
    /// sector size), and check that every differing sector lies inside a
    /// change. Walks the changes from the start (and leaves the walk
    /// finished); `progress` gets the bytes compared.
    ///
    /// # Errors
    /// Read errors, errors walking the changes.
    pub fn verify(&mut self, progress: disk::Progress<'_>) -> Result<VerifyReport> {
        self.rewind();
        let from = self.from_disk().clone();
        let to = self.to_disk().clone();
        let size = self.size;
        let ss = u64::from(to.geometry().logical_sector_size.max(1));
        let chunk = CHUNK.max(ss) / ss * ss;
        let n = usize::try_from(chunk)
            .map_err(|_| Error::invalid("the sector size does not fit in memory"))?;
        let (mut a, mut b) = (vec![0u8; n], vec![0u8; n]);
        let mut report = VerifyReport::default();
        let mut next = || self.next_change();
        let mut cov = Covering {
            next: &mut next,
            cur: None,
            done: false,
            report: &mut report,
        };
        let mut off = 0;
        // A differing run carried across chunks.
        let mut run: Option<u64> = None;
        while off < size {
            let len = chunk.min(size - off);
            let l = usize::try_from(len).unwrap_or(n);
            from.read_at(&mut a[..l], off)?;
            to.read_at(&mut b[..l], off)?;
            let step = usize::try_from(ss).unwrap_or(l);
            for (k, (x, y)) in a[..l].chunks(step).zip(b[..l].chunks(step)).enumerate() {
                let at = off + k as u64 * ss;
                match (x != y, run) {
                    (true, None) => run = Some(at),
                    (false, Some(s)) => {
                        cov.differ(s, at)?;
                        run = None;
                    }
                    _ => {}
                }
            }
            off += len;
            cov.report.bytes_compared += len;
            progress(disk::Step {
                done: off,
                total: size,
                copied: cov.report.bytes_compared,
            });
        }
        if let Some(s) = run {
            cov.differ(s, size)?;
        }
        // Count the changes past the last difference too.
        cov.seek(u64::MAX)?;
        Ok(report)
    }
}
