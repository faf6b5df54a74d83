//! Openers: where the disk crates get the storage behind a path.
//!
//! Every open or creation of a file by path in the format drivers, the
//! parent search, merges and checkpoint bundles goes through an [`Opener`]
//! carried in the caller's options, so that a caller decides how files are
//! reached: [`FileOpener`] (the default) opens real files with their image
//! locks ([`crate::lock`]); a test passes an opener that journals every
//! write to rebuild what a power cut would leave, or that injects faults.
//! Shipped code has no test hooks: the journaling lives in the opener the
//! test passes.

use crate::error::Result;
use crate::lock::LockMode;
use crate::storage::{FileStorage, Storage};
use std::path::Path;
use std::sync::Arc;

/// How the disk crates reach the files behind paths (see the module docs).
pub trait Opener: Send + Sync + std::fmt::Debug {
    /// Open the existing file at `path`, read-only unless `writable`,
    /// claiming it as `lock` says.
    ///
    /// # Errors
    /// The file cannot be opened, or another open holds it.
    fn open(&self, path: &Path, writable: bool, lock: LockMode) -> Result<Box<dyn Storage>>;

    /// Create the file at `path` (failing if it exists unless `overwrite`,
    /// which empties it), claimed exclusively.
    ///
    /// # Errors
    /// The file cannot be created, or another open holds it.
    fn create(&self, path: &Path, overwrite: bool) -> Result<Box<dyn Storage>>;
}

/// Real files, through [`FileStorage`] (with image locks).
#[derive(Debug, Default, Clone, Copy)]
pub struct FileOpener;

impl Opener for FileOpener {
    fn open(&self, path: &Path, writable: bool, lock: LockMode) -> Result<Box<dyn Storage>> {
        Ok(Box::new(FileStorage::open_with(path, writable, lock)?))
    }

    fn create(&self, path: &Path, overwrite: bool) -> Result<Box<dyn Storage>> {
        Ok(Box::new(FileStorage::create(path, overwrite)?))
    }
}

/// The default opener: real files ([`FileOpener`]).
pub fn file_opener() -> Arc<dyn Opener> {
    Arc::new(FileOpener)
}
