//! The shared virtual-disk layer under the `vhd` and `vhdx` crates.
//!
//! - [`Storage`]: positional byte storage under an image ([`FileStorage`],
//!   [`MemStorage`]; with the feature `testing`, `fault::RecordingStorage`
//!   for crash tests), reached by path through an [`Opener`].
//! - [`VirtualDisk`]: what every format, chain, mount and VMM uses. A format
//!   driver answers where a range lives ([`VirtualDisk::map`]); the provided
//!   `read_at`/`write_at` are the one I/O loop shared by all formats.
//! - [`Error`]: the error type of the disk crates, with an [`ErrorKind`].
//!
//! ```
//! use disk::{MemStorage, RawDisk, VirtualDisk};
//! let raw = RawDisk::create(MemStorage::new("scratch"), 4096).unwrap();
//! raw.write_at(b"hello", 510).unwrap();
//! let mut buf = [0u8; 7];
//! raw.read_at(&mut buf, 509).unwrap();
//! assert_eq!(&buf, b"\0hello\0");
//! ```

mod chain;
pub mod check;
pub mod compact;
pub mod copy_up;
mod error;
#[cfg(feature = "testing")]
pub mod fault;
pub mod lock;
mod opener;
pub mod parent;
pub mod partition;
mod raw;
mod storage;
#[cfg(feature = "testing")]
pub mod testing;
mod virtual_disk;

pub use chain::ChainView;
pub use compact::{CompactReport, Progress, Step};
pub use copy_up::CopyUpLocks;
pub use error::{Error, ErrorKind, Result, ResultExt};
pub use lock::LockMode;
pub use opener::{file_opener, FileOpener, Opener};
pub use parent::{ChainSearch, ParentPolicy};
pub use raw::RawDisk;
pub use storage::{copy_range, fill_range, range_is, FileStorage, MemStorage, Storage};
pub use virtual_disk::{
    whole_blocks, write_zero_bytes, Cursor, Extent, FileOffset, Geometry, Mapping, VirtualDisk,
    WriteExtent,
};
