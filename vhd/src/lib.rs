//! Read and write Microsoft VHD (Virtual Hard Disk Image Format
//! Specification, 2006) images: fixed, dynamic and differencing disks
//! (whose parent chains are found by their locators, or given). Dynamic and
//! differencing images can be compacted in place, crash-safely
//! ([`Vhd::compact`]).
//!
//! ```
//! use disk::{MemStorage, VirtualDisk};
//! use vhd::{CreateOptions, Vhd};
//! let disk = Vhd::create_on(Box::new(MemStorage::new("doc.vhd")), &CreateOptions::new(64 << 20)).unwrap();
//! disk.write_at(b"hello", 1 << 20).unwrap();
//! disk.flush().unwrap();
//! let mut buf = [0u8; 5];
//! disk.read_at(&mut buf, 1 << 20).unwrap();
//! assert_eq!(&buf, b"hello");
//! ```
#![forbid(unsafe_code)]
#![warn(missing_docs)]

pub mod bat;
mod block_map;
pub mod check;
mod compact;
mod create;
pub mod dynamic_header;
mod flush;
pub mod footer;
mod image;
mod open;
pub mod parent_locator;
mod parent_search;
pub mod probe;
mod relink;
mod resize;
pub mod sector_bitmap;
mod standalone;
mod virtual_disk;

pub use disk::{Error, ErrorKind, Result};
pub use image::{
    CreateOptions, FooterSource, Info, OpenOptions, Vhd, DEFAULT_BLOCK_SIZE, MAX_CHAIN,
    MAX_VIRTUAL_SIZE,
};
pub use parent_search::ParentLink;
