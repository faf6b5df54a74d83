//! The in-memory view of the BAT, paged in 4 KiB pages on demand.
//!
//! The in-memory BAT is the truth for readers of an open disk (see
//! `shared/design/vhdx-log.md`). Large BATs are not read whole: a 64 TiB disk
//! with 1 MiB blocks has a 512 MiB BAT, so only the pages that I/O touches are
//! resident, clean pages are evicted past a cap, and dirty pages (and pages
//! whose log entry is being written) stay pinned until applied in place.

use crate::bat::BatEntry;
use std::collections::BTreeSet;

/// Bytes in one BAT page.
pub(crate) const PAGE_BYTES: usize = 4096;
/// BAT entries in one page, as a length.
const PAGE_ENTRIES: usize = PAGE_BYTES / 8;
/// BAT entries in one page.
pub(crate) const ENTRIES_PER_PAGE: u64 = PAGE_ENTRIES as u64;

type Page = Box<[u64; PAGE_ENTRIES]>;

/// Resident pages, dirty set and pins. Guarded by the driver's `bat` lock.
pub(crate) struct BatCache {
    pages: Vec<Option<Page>>,
    dirty: BTreeSet<usize>,
    pinned: BTreeSet<usize>,
    resident: usize,
    cap: usize,
    clock: usize,
}

impl BatCache {
    /// A cache for a BAT of `entries` entries keeping at most about `cap`
    /// clean pages resident.
    pub(crate) fn new(entries: u64, cap: usize) -> Self {
        // BatGeometry bounds a BAT (64 TiB in 1 MiB blocks): at most about
        // 2^17 pages, which fits any usize.
        #[allow(clippy::cast_possible_truncation)]
        let pages = entries.div_ceil(ENTRIES_PER_PAGE) as usize;
        let mut v = Vec::new();
        v.resize_with(pages, || None);
        BatCache {
            pages: v,
            dirty: BTreeSet::new(),
            pinned: BTreeSet::new(),
            resident: 0,
            cap: cap.max(1),
            clock: 0,
        }
    }

    /// The entry at `index`, if its page is resident.
    pub(crate) fn get(&self, index: u64) -> Option<BatEntry> {
        let p = (index / ENTRIES_PER_PAGE) as usize;
        let page = self.pages.get(p)?.as_ref()?;
        Some(BatEntry(page[(index % ENTRIES_PER_PAGE) as usize]))
    }

    /// Whether page `p` is resident.
    #[cfg(test)]
    pub(crate) fn is_resident(&self, p: usize) -> bool {
        matches!(self.pages.get(p), Some(Some(_)))
    }

    /// Install page `p` from its on-disk bytes (no-op if already resident).
    pub(crate) fn insert(&mut self, p: usize, bytes: &[u8; PAGE_BYTES]) {
        if p >= self.pages.len() || self.pages[p].is_some() {
            return;
        }
        self.evict_if_needed();
        let mut page: Page = Box::new([0u64; PAGE_ENTRIES]);
        for (i, e) in page.iter_mut().enumerate() {
            let mut b = [0u8; 8];
            b.copy_from_slice(&bytes[i * 8..i * 8 + 8]);
            *e = u64::from_le_bytes(b);
        }
        self.pages[p] = Some(page);
        self.resident += 1;
    }

    /// Set the entry at `index` (its page must be resident) and mark it dirty.
    pub(crate) fn set(&mut self, index: u64, entry: BatEntry) {
        let p = (index / ENTRIES_PER_PAGE) as usize;
        if let Some(Some(page)) = self.pages.get_mut(p) {
            page[(index % ENTRIES_PER_PAGE) as usize] = entry.0;
            self.dirty.insert(p);
        }
    }

    /// Take the dirty pages for a log entry: returns `(page index, bytes)`,
    /// clears their dirty mark and pins them until [`BatCache::unpin_all`].
    pub(crate) fn take_dirty(&mut self) -> Vec<(usize, Box<[u8; PAGE_BYTES]>)> {
        let dirty = std::mem::take(&mut self.dirty);
        let mut out = Vec::with_capacity(dirty.len());
        for p in dirty {
            if let Some(Some(page)) = self.pages.get(p) {
                let mut bytes = Box::new([0u8; PAGE_BYTES]);
                for (i, e) in page.iter().enumerate() {
                    bytes[i * 8..i * 8 + 8].copy_from_slice(&e.to_le_bytes());
                }
                out.push((p, bytes));
                self.pinned.insert(p);
            }
        }
        out
    }

    /// Put pages back in the dirty set (a flush failed before applying them).
    pub(crate) fn redirty(&mut self, pages: impl IntoIterator<Item = usize>) {
        self.dirty.extend(pages);
    }

    /// The pages taken by [`BatCache::take_dirty`] are applied in place.
    pub(crate) fn unpin_all(&mut self) {
        self.pinned.clear();
        self.evict_if_needed();
    }

    /// Number of resident pages.
    #[cfg(test)]
    pub(crate) fn resident(&self) -> usize {
        self.resident
    }

    fn evict_if_needed(&mut self) {
        let n = self.pages.len();
        let mut scanned = 0;
        while self.resident >= self.cap && scanned < n {
            let p = self.clock;
            self.clock = (self.clock + 1) % n;
            scanned += 1;
            if self.pages[p].is_some() && !self.dirty.contains(&p) && !self.pinned.contains(&p) {
                self.pages[p] = None;
                self.resident -= 1;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn page_with(v: u64) -> [u8; PAGE_BYTES] {
        let mut b = [0u8; PAGE_BYTES];
        b[..8].copy_from_slice(&v.to_le_bytes());
        b
    }

    #[test]
    fn evicts_clean_pages_but_keeps_dirty_and_pinned() {
        let mut c = BatCache::new(ENTRIES_PER_PAGE * 10, 2);
        c.insert(0, &page_with(1));
        c.set(0, BatEntry(7)); // dirty
        c.insert(1, &page_with(2));
        let taken = c.take_dirty(); // page 0 pinned, not dirty
        assert_eq!(taken.len(), 1);
        assert_eq!(&taken[0].1[..8], &7u64.to_le_bytes());
        c.insert(2, &page_with(3));
        c.insert(3, &page_with(4));
        assert!(c.is_resident(0), "pinned page must stay");
        assert_eq!(c.get(0), Some(BatEntry(7)));
        assert!(c.resident() <= 3);
        c.unpin_all();
        c.insert(4, &page_with(5));
        assert!(c.resident() <= 2);
    }
}
