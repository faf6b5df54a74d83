//! What the format drivers' `compact` operations report (`vdisk compact`,
//! like Hyper-V's Optimize-VHD).
//!
//! Compacting gives back unused space in two steps: blocks that read as all
//! zeros (or, in a differencing disk, read the same as the parent) become
//! unallocated, then the blocks at the end of the file are moved into the
//! holes so that the file can be cut short. Each format's driver documents
//! the order of its writes and why a crash at any point leaves every byte
//! readable as before.

use crate::{Result, Storage, VirtualDisk};

/// Bytes compared at a time by [`reads_as`].
const COMPARE_CHUNK: usize = 1 << 20;

/// Whether the bytes of `storage` at `[at, at + len)` are what `lower`
/// reads at `[virt, virt + len)` (zeros when there is no lower layer): the
/// test for a block, or run of sectors, that a layer may give up without
/// changing what it reads.
///
/// # Errors
/// Read errors of either side.
pub fn reads_as(
    storage: &dyn Storage,
    at: u64,
    lower: Option<&dyn VirtualDisk>,
    virt: u64,
    len: u64,
) -> Result<bool> {
    let chunk = usize::try_from(len).map_or(COMPARE_CHUNK, |l| l.min(COMPARE_CHUNK));
    let (mut mine, mut theirs) = (vec![0u8; chunk], vec![0u8; chunk]);
    let mut done = 0;
    while done < len {
        let n = usize::try_from(len - done).map_or(chunk, |r| r.min(chunk));
        storage.read_at(&mut mine[..n], at + done)?;
        let same = match lower {
            None => mine[..n].iter().all(|&b| b == 0),
            Some(l) => {
                l.read_at(&mut theirs[..n], virt + done)?;
                mine[..n] == theirs[..n]
            }
        };
        if !same {
            return Ok(false);
        }
        done += n as u64;
    }
    Ok(true)
}

/// The outcome of a compaction.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct CompactReport {
    /// Blocks that were allocated and are now unallocated (their contents
    /// were zeros, or what the parent reads).
    pub blocks_freed: u64,
    /// Blocks (payload or bitmap) whose data moved to an earlier file offset.
    pub blocks_moved: u64,
    /// The image file's length before.
    pub old_file_size: u64,
    /// The image file's length after.
    pub new_file_size: u64,
}

impl CompactReport {
    /// Bytes given back to the host file system.
    pub fn reclaimed(&self) -> u64 {
        self.old_file_size.saturating_sub(self.new_file_size)
    }
}

/// How far a long operation is, as its progress callback sees it.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Step {
    /// Units done (blocks, or bytes of the virtual disk: the operation
    /// says which); only grows.
    pub done: u64,
    /// Units in all; fixed once the work has started.
    pub total: u64,
    /// Bytes of data copied so far (the operation says which: blocks
    /// moved, bytes written into another layer); only grows. What a
    /// transfer rate is computed from, unlike `done`, which also counts
    /// what was only looked at.
    pub copied: u64,
}

/// Progress callback for long operations. Drivers call it with a fixed
/// total and a `done` and `copied` that only grow.
pub type Progress<'a> = &'a mut dyn FnMut(Step);
