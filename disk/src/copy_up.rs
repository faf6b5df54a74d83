//! The copy-up lock of a disk whose sectors are tracked one by one (a
//! differencing disk's partly present blocks, a VHD block whose bitmap is
//! not full).
//!
//! A write that covers a sector not yet present only in part must first
//! merge its bytes with the sector's current contents (the parent's, or
//! zeros): the shared write loop reads them, merges, writes the whole
//! sector, and then the driver marks the sector present. Two such writes to
//! one sector, or one of them and a write of the whole sector, must not
//! interleave, or one merges with stale bytes and undoes the other. So the
//! loop holds the lock of the write's block from that read until the
//! driver has recorded the write ([`crate::VirtualDisk::commit_write`]);
//! every write to a sector-tracked block takes it
//! ([`crate::WriteExtent::copy_up`]). Blocks share a fixed number of locks
//! (stripes): writes to other blocks wait only when their stripe collides.
//!
//! Lock order: a copy-up lock is taken before any lock of the driver (which
//! `read_at`, the storage write and `commit_write` take and release
//! inside), and no other copy-up lock is taken while one is held.

use std::sync::{Mutex, MutexGuard};

/// How many locks the blocks share.
const STRIPES: usize = 64;

/// The copy-up locks of one disk.
#[derive(Debug)]
pub struct CopyUpLocks {
    stripes: Vec<Mutex<()>>,
}

impl Default for CopyUpLocks {
    fn default() -> Self {
        CopyUpLocks {
            stripes: (0..STRIPES).map(|_| Mutex::new(())).collect(),
        }
    }
}

impl CopyUpLocks {
    /// Hold the lock of `block` (released when the guard is dropped).
    pub fn lock(&self, block: u64) -> MutexGuard<'_, ()> {
        let i = usize::try_from(block % STRIPES as u64).unwrap_or(0);
        self.stripes[i]
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_block_one_lock() {
        let l = CopyUpLocks::default();
        let g = l.lock(3);
        // Another block on another stripe is free; the same stripe is not.
        assert!(l.stripes[4].try_lock().is_ok());
        assert!(l.stripes[3].try_lock().is_err());
        drop(g);
        let _g = l.lock(3 + STRIPES as u64);
        assert!(l.stripes[3].try_lock().is_err());
    }
}
