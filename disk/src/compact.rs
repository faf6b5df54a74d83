//! What the format drivers' `compact` operations report (`vdisk compact`,
//! like Hyper-V's Optimize-VHD).
//!
//! Compacting gives back unused space in two steps: blocks that read as all
//! zeros (or, in a differencing disk, read the same as the parent) become
//! unallocated, then the blocks at the end of the file are moved into the
//! holes so that the file can be cut short. Each format's driver documents
//! the order of its writes and why a crash at any point leaves every byte
//! readable as before.

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

/// Progress callback for long operations: `(units done, units total)`.
/// Drivers call it with a fixed total and a `done` that only grows.
pub type Progress<'a> = &'a mut dyn FnMut(u64, u64);
