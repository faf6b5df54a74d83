//! The front door of the library: open or create any image — raw, VHD,
//! VHDX, a differencing disk with its whole chain — in one call.
//!
//! - [`open`]: the given or probed format, opened with its chain (parents
//!   found under a [`disk::ParentPolicy`], read-only), claimed with image
//!   locks ([`disk::lock`]), reached through an [`disk::Opener`]; returns
//!   an [`Image`]: the disk to read and write (`Arc<dyn VirtualDisk>`, a
//!   [`disk::ChainView`] for a chain) and the format's own driver.
//! - [`create`]: a new raw, VHD or VHDX image, or a differencing child;
//!   [`create_closed`] the same, closed, a child made in O(1).
//! - [`probe()`]: a file's format from its content. Opt-in: see its docs for
//!   why a VMM must give the format of a disk a guest writes.
//! - [`chain`]: a chain's files, opening layers over a disk already open,
//!   relinking.
//! - [`convert()`]: a disk's contents copied into a new image (zero ranges
//!   skipped, unreadable ranges salvaged on request); a failed convert
//!   removes the target it created.
//!
//! Every consumer (the `vdisk` commands, the mount, the checkpoint crate,
//! the benchmarks) opens images through here. What survives a crash, which
//! operations are atomic, what a concurrent reader may see and what a
//! hostile image can make us do: [`guarantees`].
//!
//! ```
//! use disk::VirtualDisk;
//! use image::{CreateOptions, Format, Kind, OpenOptions};
//! let dir = tempfile::tempdir().unwrap();
//! let base = dir.path().join("base.vhdx");
//! let child = dir.path().join("child.avhdx");
//! let img = image::create(&base, &CreateOptions::new(Kind::Vhdx(vhdx::CreateOptions::new(8 << 20)))).unwrap();
//! img.disk().write_at(b"base", 0).unwrap();
//! img.close().unwrap();
//! let mut o = CreateOptions::new(Kind::Vhdx(vhdx::CreateOptions::new(0)));
//! o.parent = Some(base.clone());
//! image::create(&child, &o).unwrap().close().unwrap();
//! // Probe the format (trusted files only) and read through the chain.
//! let img = image::open(&child, &OpenOptions::probing()).unwrap();
//! assert_eq!(img.format(), Format::Vhdx);
//! let mut buf = [0u8; 4];
//! img.disk().read_at(&mut buf, 0).unwrap();
//! assert_eq!(&buf, b"base");
//! ```

#![forbid(unsafe_code)]

pub mod chain;
pub mod convert;
mod create;
mod format;
pub mod guard;
#[doc = include_str!("guarantees.md")]
pub mod guarantees {}
mod open;
pub mod probe;

pub use convert::{convert, Converted};
pub use create::{create, create_closed, CreateOptions, Kind};
pub use disk::{Error, ErrorKind, Result};
pub use format::Format;
pub use open::{open, Driver, Image, OpenOptions, RawDriver};
pub use probe::{probe, sniff};
