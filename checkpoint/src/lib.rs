//! Differencing-disk chains and checkpoint trees over VHDX and VHD.
//!
//! - [`detect`]: an image's format from its content, refusing a damaged
//!   VHDX or VHD (by its name) rather than taking it for raw.
//! - [`image`]: open a chain as one disk (through a merged block view),
//!   create a differencing child, relink a child to another parent.
//! - [`merge`]: fold a parent into its child, or a run of a chain into an
//!   ancestor, crash-safe.
//! - [`Bundle`]: a checkpoint tree in a directory with a JSON manifest:
//!   create, list, revert, delete and merge checkpoints, every change
//!   atomic and finished at the next open if interrupted.
//!
//! ```
//! use checkpoint::{Bundle, Format};
//! use disk::VirtualDisk;
//! let dir = tempfile::tempdir().unwrap();
//! let mut b = Bundle::init(&dir.path().join("vm"), Format::Vhdx, 8 << 20).unwrap();
//! let d = checkpoint::image::open(&b.active_path(), &checkpoint::image::ChainOptions { writable: true, ..Default::default() }).unwrap();
//! d.write_at(b"before", 0).unwrap();
//! drop(d);
//! b.create("clean").unwrap();
//! let d = checkpoint::image::open(&b.active_path(), &checkpoint::image::ChainOptions { writable: true, ..Default::default() }).unwrap();
//! d.write_at(b"after!", 0).unwrap();
//! drop(d);
//! b.revert("clean").unwrap();
//! let d = checkpoint::image::open(&b.active_path(), &Default::default()).unwrap();
//! let mut buf = [0u8; 6];
//! d.read_at(&mut buf, 0).unwrap();
//! assert_eq!(&buf, b"before");
//! ```
#![forbid(unsafe_code)]
#![warn(missing_docs)]

mod bundle;
pub mod detect;
pub mod image;
pub mod merge;

pub use bundle::{format_utc, Bundle, Manifest, Node, NodeInfo, Pending, MANIFEST, SPARE};
pub use disk::{Error, ErrorKind, Result};
pub use image::Format;
