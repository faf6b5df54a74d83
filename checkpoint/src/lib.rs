//! Checkpoint trees and merges of differencing chains, VHDX or VHD, built
//! on the front door ([`image`]).
//!
//! - [`merge`]: fold a parent into its child, or a run of a chain into an
//!   ancestor, or rebase a child, crash-safe.
//! - [`Bundle`]: a checkpoint tree in a directory with a JSON manifest:
//!   create, list, revert, delete and merge checkpoints, every change
//!   atomic and finished at the next open if interrupted.
//! - [`disks`]: a bundle's disk format and how a checkpoint's new child is
//!   made.
//! - [`changes`]: changed-block tracking: the ranges that may differ between
//!   two checkpoints (or two disks of one chain), from the layers' block
//!   tables alone; checked against the data, or written out as a delta
//!   disk (an incremental backup).
//!
//! ```
//! use checkpoint::{Bundle, Format};
//! use disk::VirtualDisk;
//! use image::OpenOptions;
//! let dir = tempfile::tempdir().unwrap();
//! let mut b = Bundle::init(&dir.path().join("vm"), Format::Vhdx, 8 << 20).unwrap();
//! let rw = OpenOptions::new(image::Format::Vhdx).writable();
//! let d = image::open(&b.active_path(), &rw).unwrap();
//! d.disk().write_at(b"before", 0).unwrap();
//! drop(d);
//! b.create("clean").unwrap();
//! let d = image::open(&b.active_path(), &rw).unwrap();
//! d.disk().write_at(b"after!", 0).unwrap();
//! drop(d);
//! b.revert("clean").unwrap();
//! let d = image::open(&b.active_path(), &OpenOptions::new(image::Format::Vhdx)).unwrap();
//! let mut buf = [0u8; 6];
//! d.disk().read_at(&mut buf, 0).unwrap();
//! assert_eq!(&buf, b"before");
//! ```

mod bundle;
pub mod changes;
pub mod disks;
mod manifest;
pub mod merge;
mod ops;

pub use bundle::{Bundle, NodeInfo, VM_STATE_DIR};
pub use changes::{Change, Changes};
pub use disk::{Error, ErrorKind, Result};
pub use disks::Format;
pub use manifest::{format_utc, Manifest, Node, Pending, MANIFEST, SPARE};
