//! Sector bitmaps of differencing disks (MS-VHDX 2.5, 2.5.1.2): the
//! in-memory pages of the sector bitmap blocks.
//!
//! Each chunk of `chunk_ratio` payload blocks has one 1 MiB sector bitmap
//! block with a bit per logical sector (1 = the sector's data is in this
//! file, 0 = read it from the parent; bit 0 of byte 0 is the chunk's first
//! sector). Bits are metadata like BAT entries: they change in memory when a
//! write completes and reach the file only through the log at the next
//! flush, after the data they declare present is durable. Pages are paged in
//! 4 KiB at a time; clean pages are evicted past a cap, dirty pages and
//! pages whose log entry is being written stay resident.

use std::collections::{BTreeSet, HashMap};

/// Bytes in one bitmap page.
pub(crate) const PAGE: usize = 4096;
/// Bits in one bitmap page.
pub(crate) const PAGE_BITS: u64 = (PAGE * 8) as u64;

type Page = Box<[u8; PAGE]>;

/// Resident bitmap pages, keyed by the page's file offset. Guarded by the
/// driver's `bitmaps` lock.
pub(crate) struct BitmapCache {
    pages: HashMap<u64, Page>,
    dirty: BTreeSet<u64>,
    pinned: BTreeSet<u64>,
    cap: usize,
}

impl BitmapCache {
    /// A cache keeping at most about `cap` clean pages resident.
    pub(crate) fn new(cap: usize) -> Self {
        BitmapCache {
            pages: HashMap::new(),
            dirty: BTreeSet::new(),
            pinned: BTreeSet::new(),
            cap: cap.max(4),
        }
    }

    /// The page at file offset `off`, if resident.
    pub(crate) fn get(&self, off: u64) -> Option<&[u8; PAGE]> {
        self.pages.get(&off).map(|p| &**p)
    }

    /// Install the page at `off` from its on-disk bytes (no-op if resident).
    pub(crate) fn insert(&mut self, off: u64, bytes: Page) {
        if self.pages.contains_key(&off) {
            return;
        }
        if self.pages.len() >= self.cap {
            let (dirty, pinned) = (&self.dirty, &self.pinned);
            self.pages
                .retain(|k, _| dirty.contains(k) || pinned.contains(k));
        }
        self.pages.insert(off, bytes);
    }

    /// The resident page at `off`, marked dirty (None if not resident).
    pub(crate) fn get_mut(&mut self, off: u64) -> Option<&mut [u8; PAGE]> {
        let p = self.pages.get_mut(&off)?;
        self.dirty.insert(off);
        Some(&mut **p)
    }

    /// Copies of the dirty pages for a log entry, `(file offset, bytes)`;
    /// they become clean and stay pinned until [`BitmapCache::unpin_all`].
    pub(crate) fn take_dirty(&mut self) -> Vec<(u64, Page)> {
        let dirty = std::mem::take(&mut self.dirty);
        let mut out = Vec::with_capacity(dirty.len());
        for off in dirty {
            if let Some(p) = self.pages.get(&off) {
                out.push((off, p.clone()));
                self.pinned.insert(off);
            }
        }
        out
    }

    /// Mark pages dirty again (a flush failed before applying them).
    pub(crate) fn redirty(&mut self, offs: impl IntoIterator<Item = u64>) {
        for off in offs {
            if self.pages.contains_key(&off) {
                self.dirty.insert(off);
            }
        }
    }

    /// The pages taken by [`BitmapCache::take_dirty`] are applied in place.
    pub(crate) fn unpin_all(&mut self) {
        self.pinned.clear();
    }
}

/// Bit `i` of `page`.
pub(crate) fn bit(page: &[u8; PAGE], i: u64) -> bool {
    page[(i / 8) as usize] & (1 << (i % 8)) != 0
}

/// Length of the run of bits equal to bit `from` in `page[from..to)`.
pub(crate) fn run_len(page: &[u8; PAGE], from: u64, to: u64) -> u64 {
    let v = bit(page, from);
    let full = if v { 0xff } else { 0 };
    let mut i = from + 1;
    while i < to {
        if i.is_multiple_of(8) && i + 8 <= to && page[(i / 8) as usize] == full {
            i += 8;
            continue;
        }
        if bit(page, i) != v {
            break;
        }
        i += 1;
    }
    i - from
}

/// Set (or clear) bits `[from, to)` of `page`.
pub(crate) fn set_range(page: &mut [u8; PAGE], from: u64, to: u64, value: bool) {
    let mut i = from;
    while i < to {
        if i.is_multiple_of(8) && i + 8 <= to {
            page[(i / 8) as usize] = if value { 0xff } else { 0 };
            i += 8;
            continue;
        }
        let m = 1u8 << (i % 8);
        if value {
            page[(i / 8) as usize] |= m;
        } else {
            page[(i / 8) as usize] &= !m;
        }
        i += 1;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn runs_and_ranges() {
        let mut p = Box::new([0u8; PAGE]);
        set_range(&mut p, 3, 21, true);
        assert!(!bit(&p, 2) && bit(&p, 3) && bit(&p, 20) && !bit(&p, 21));
        assert_eq!(run_len(&p, 0, 100), 3);
        assert_eq!(run_len(&p, 3, 100), 18);
        assert_eq!(run_len(&p, 5, 10), 5);
        assert_eq!(run_len(&p, 21, PAGE_BITS), PAGE_BITS - 21);
        set_range(&mut p, 8, 16, false);
        assert_eq!(run_len(&p, 3, 100), 5);
        assert_eq!(p[1], 0);
    }

    #[test]
    fn dirty_and_pinned_pages_survive_eviction() {
        let mut c = BitmapCache::new(4);
        for i in 0..4 {
            c.insert(i * 4096, Box::new([0u8; PAGE]));
        }
        c.get_mut(0).unwrap()[0] = 1;
        let taken = c.take_dirty();
        assert_eq!(taken.len(), 1);
        c.get_mut(4096).unwrap()[0] = 2;
        c.insert(99 * 4096, Box::new([0u8; PAGE]));
        assert_eq!(c.get(0).map(|p| p[0]), Some(1), "pinned");
        assert_eq!(c.get(4096).map(|p| p[0]), Some(2), "dirty");
        assert!(c.get(8192).is_none(), "clean page evicted");
        c.unpin_all();
        c.redirty([4096, 12345]);
        assert_eq!(c.take_dirty().len(), 1);
    }
}
