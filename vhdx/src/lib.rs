//! Read and write Microsoft VHDX virtual disks, exactly as MS-VHDX v1.0
//! specifies and as Hyper-V writes them, including the metadata log.
//!
//! Besides reading and writing: create (dynamic, fixed, differencing),
//! [`Vhdx::resize`], [`Vhdx::compact`] (like Hyper-V's Optimize-VHD: frees
//! zero blocks, packs the file and cuts it short, crash-safe), and
//! [`check`] / repair.
//!
//! # The shape shared with the `vhd` crate
//! Both drivers have the same names and shapes, so that callers (the
//! `image` crate, the `vdisk` commands) treat them alike:
//! - [`Vhdx::open`] / [`Vhdx::create`] on a path, [`Vhdx::open_storage`] /
//!   [`Vhdx::create_on`] on any storage, given as a `Box<dyn Storage>`;
//!   [`Vhdx::open_with_parent`] over a parent already open;
//! - [`Vhdx::block_size`] in bytes, as a `u64`;
//! - [`Vhdx::resize`]`(&mut self, new_size, force)` and
//!   [`Vhdx::make_standalone`]`(self)` as methods of the open image;
//! - `check::{check, check_file, repair, repair_file}`, and the
//!   [`disk::VirtualDisk`] trait for all I/O.
//!
//! ```
//! use disk::{MemStorage, VirtualDisk};
//! use vhdx::{CreateOptions, Vhdx};
//! let disk = Vhdx::create_on(Box::new(MemStorage::new("doc.vhdx")), &CreateOptions::new(64 << 20)).unwrap();
//! disk.write_at(b"hello", 1 << 20).unwrap();
//! disk.flush().unwrap();
//! let mut buf = [0u8; 5];
//! disk.read_at(&mut buf, 1 << 20).unwrap();
//! assert_eq!(&buf, b"hello");
//! ```

pub mod bat;
mod bat_cache;
mod block_map;
pub mod check;
mod compact;
mod create;
mod differencing;
pub mod file_identifier;
pub mod guid;
pub mod header;
mod image;
pub mod log;
pub mod metadata;
mod open;
pub mod parent_locator;
mod parent_search;
pub mod probe;
pub mod region_table;
mod relink;
mod replay;
mod resize;
pub mod scan;
mod sector_bitmap;
mod session;

pub use disk::{Error, ErrorKind, Result};
pub use image::{
    AllocationStats, CreateOptions, Info, OpenOptions, Vhdx, DEFAULT_BAT_CACHE_PAGES,
    DEFAULT_DIFFERENCING_BLOCK_SIZE,
};
pub use parent_search::{linkage_string, parent_locator_for};
