//! An open VHD image: the [`Vhd`] type, its options and what `info` shows.
//! The driver is split by concern, each module an `impl Vhd` block or an
//! on-disk structure: `open` (footer, header and BAT validation, parent
//! search through `parent_search`), `create`, `block_map` (mapping and
//! allocation), `sector_bitmap`, `flush`, `virtual_disk` (the
//! [`VirtualDisk`] impl), `relink` ([`Vhd::set_parent`]), `standalone`
//! ([`Vhd::make_standalone`]), `resize` and `compact`.
//!
//! # Layout
//! - Fixed: the virtual disk's bytes from offset 0, then the footer.
//! - Dynamic: a footer copy at 0, the dynamic disk header at the footer's
//!   data offset, the BAT, then blocks (sector bitmap + data) in allocation
//!   order, then the footer. New blocks go where the trailing footer is.
//! - Differencing: a dynamic disk whose header names its parent (unique id,
//!   name, and locators whose data this library writes between the BAT and
//!   the first block). Sectors whose bitmap bit is 0, and unallocated
//!   blocks, read from the parent ([`Mapping::Parent`]). The parent is
//!   opened read-only and never written.
//!
//! # Write protocol and why each sync is there
//! The in-memory BAT and sector bitmaps are the truth while the image is
//! open; the BAT on disk only ever points at blocks that are durable.
//!
//! Allocating block `b` (under the state lock), with `E` the offset of the
//! trailing footer and `E' = E + bitmap + block_size`:
//! 1. write the footer at `E'` (the file grows; the new block reads as zeros);
//! 2. **sync**: the file's tail must already be a valid footer before any
//!    byte of the new block can reach the disk. Otherwise a power cut could
//!    persist the block's bitmap (which overwrites the old footer) or data
//!    (which extends the file) without the new footer, leaving no footer at
//!    the end of the file. This is the one sync per allocation, and the only
//!    sync outside `flush`.
//! 3. write the block's sector bitmap at `E`: all ones for a dynamic disk
//!    (the block is zero-filled, so without a parent every sector is
//!    present), all zeros for a differencing disk (every sector still comes
//!    from the parent);
//! 4. set `BAT[b] = E / 512` in memory only (the BAT sector is dirty).
//!
//! Writing to sectors whose bitmap bit is 0 (every new block of a
//! differencing disk; blocks of dynamic images made by other tools) writes
//! whole sectors: a sector the write covers only partly is first merged
//! with its current virtual contents (the parent's bytes, or zeros without
//! a parent) by the shared write loop (`fill_partial_sectors`), so the file
//! never holds a sector that is part new data, part junk. Only once the
//! payload write has returned are the sectors' bits set, in an in-memory
//! copy of the bitmap (`commit_write`); whole blocks are never copied from
//! the parent.
//!
//! A bitmap bit is metadata like a BAT entry: on disk, a bit set to 1 must
//! never precede the durability of the sector data it declares present,
//! or a power cut would expose junk (or stale zeros) in place of the
//! parent's bytes. Bits therefore reach the disk only in `flush`, after its
//! first sync. A power cut before that leaves the bit 0 on disk: the sector
//! reads from the parent again (an unflushed write is lost, never torn into
//! garbage).
//!
//! `flush` (under the flush lock): snapshot the dirty BAT sectors and
//! bitmaps, **sync** (every payload write, bitmap and footer the snapshot
//! refers to is now durable: a BAT entry or bitmap bit must never reach the
//! disk before the data it describes), write the snapshot, **sync** (the
//! flush's promise). Bitmap bits are only ever set, so a snapshot bitmap
//! torn by a power cut is a mix of old and new bits, each of them covering
//! durable data. A power cut before the second sync leaves each BAT
//! entry either old (unallocated: the unflushed writes are lost, the block's
//! space leaks until the next writable open gives it back, see `open`) or new (pointing at a durable block): either way the image
//! opens and every write acknowledged by an earlier flush reads back.
//!
//! `discard` of whole blocks of a dynamic disk marks them unallocated in the
//! in-memory BAT (written at the next flush); the space is not reused until
//! a compact. Fixed and differencing disks ignore discard.
//!
//! # Relinking and making standalone
//! [`Vhd::set_parent`] rewrites a differencing disk's parent link in place
//! (locator data into the existing locator spaces, sync, then the header,
//! the commit point, sync); [`Vhd::make_standalone`] turns a differencing
//! disk whose parent's data it already holds into a dynamic disk (trailing
//! footer, sync, footer copy, sync, header, sync). Their docs list the
//! states a power cut can leave.
//!
//! # Locks
//! `flush_lock` → `state`. Payload reads and writes hold no lock.

use crate::block_map::Dyn;
use crate::dynamic_header::DynamicHeader;
use crate::footer::{Footer, FOOTER_SIZE};
use crate::{Error, Result};
use disk::parent::ParentPolicy;
use disk::{LockMode, Opener, Storage, VirtualDisk};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

/// One mebibyte.
pub(crate) const MIB: u64 = 1 << 20;
/// The largest virtual size this library creates: 2040 GiB, the limit of
/// the format as Virtual PC, Virtual Server and Hyper-V implement it.
pub const MAX_VIRTUAL_SIZE: u64 = 2040 << 30;
/// The default block size of a dynamic disk: 2 MiB, the only size Windows
/// creates.
pub const DEFAULT_BLOCK_SIZE: u32 = 2 << 20;
/// The deepest differencing chain opened (the child included).
pub const MAX_CHAIN: usize = disk::parent::DEFAULT_MAX_DEPTH;

/// How to open an image.
#[derive(Debug, Clone)]
pub struct OpenOptions {
    /// Open for writing (the parents of a differencing disk are always
    /// opened read-only).
    pub writable: bool,
    /// Differencing disks: use the parent found by the locators even when
    /// its unique id is not the one the child's header records (applies to
    /// the whole chain). Only for a parent known to hold the right data,
    /// e.g. one whose id another tool changed.
    pub ignore_parent_id: bool,
    /// Which parent files may be followed (by default only files under the
    /// directory of the image opened; see [`disk::parent`]).
    pub parent_policy: ParentPolicy,
    /// How the image file and its parents' files are claimed against other
    /// opens ([`disk::lock`]): by default the image exclusively when
    /// writable, shared when not, and every parent shared.
    pub lock: LockMode,
    /// How the image file and its parents' files are reached (real files by
    /// default; see [`disk::Opener`]).
    pub opener: Arc<dyn Opener>,
}

impl Default for OpenOptions {
    fn default() -> Self {
        OpenOptions {
            writable: false,
            ignore_parent_id: false,
            parent_policy: ParentPolicy::default(),
            lock: LockMode::Auto,
            opener: disk::file_opener(),
        }
    }
}

/// How to create an image.
#[derive(Debug, Clone)]
pub struct CreateOptions {
    /// Virtual size in bytes, at most [`MAX_VIRTUAL_SIZE`]. Unless `azure`,
    /// it is rounded up to the next size a CHS geometry describes exactly
    /// (as Virtual PC and `qemu-img` do), so that every reader agrees on it.
    pub virtual_size: u64,
    /// Fixed (data stored flat) or dynamic.
    pub fixed: bool,
    /// Dynamic disks: bytes per block, a power of two from 4 KiB to 256 MiB
    /// (default 2 MiB, the only size Windows creates).
    pub block_size: u32,
    /// Azure mode: a fixed disk whose virtual size is a whole number of MiB
    /// and whose footer current size is exactly that size (no CHS rounding).
    /// Sizes that are not a whole number of MiB are refused.
    pub azure: bool,
    /// How the new file (and a differencing disk's parent, read for its
    /// footer) is reached: real files by default ([`disk::Opener`]).
    pub opener: Arc<dyn Opener>,
}

impl CreateOptions {
    /// Dynamic, 2 MiB blocks.
    pub fn new(virtual_size: u64) -> Self {
        CreateOptions {
            virtual_size,
            fixed: false,
            block_size: DEFAULT_BLOCK_SIZE,
            azure: false,
            opener: disk::file_opener(),
        }
    }
}

/// Where the footer in use was found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FooterSource {
    /// The last 512 bytes of the file.
    End,
    /// The last 511 bytes (images made before Virtual PC 2004).
    End511,
    /// The trailing footer is damaged; the copy at offset 0 of a dynamic
    /// disk is used and the image is read-only.
    CopyAtStart,
}

/// What `info` shows about an image.
#[derive(Debug, Clone)]
pub struct Info {
    /// The footer in use.
    pub footer: Footer,
    /// Its file offset.
    pub footer_offset: u64,
    /// Where it came from.
    pub footer_source: FooterSource,
    /// The dynamic disk header (dynamic and differencing disks).
    pub header: Option<DynamicHeader>,
    /// The virtual size ([`Footer::disk_size`]).
    pub virtual_size: u64,
    /// File length in bytes at open.
    pub file_size: u64,
    /// Allocated blocks at open (dynamic and differencing disks).
    pub allocated_blocks: u64,
    /// Allocated blocks that run past the end of the file (a truncated
    /// file: its footer is gone, the copy at offset 0 is in use). Reading
    /// their lost part fails, naming the block.
    pub truncated_blocks: u64,
    /// Differencing disks: the parent paths the locators name, with their
    /// platform codes.
    pub parent_locators: Vec<(String, String)>,
    /// Differencing disks opened for I/O: the name of the parent's storage
    /// (its path when found by the locators).
    pub parent_file: Option<String>,
    /// Anomalies that did not prevent opening (e.g. a damaged trailing footer).
    pub warnings: Vec<String>,
}

impl Info {
    /// "fixed", "dynamic" or "differencing".
    pub fn subformat(&self) -> &'static str {
        self.footer.disk_type.name()
    }

    /// The block size of a dynamic or differencing disk.
    pub fn block_size(&self) -> Option<u32> {
        self.header.as_ref().map(|h| h.block_size)
    }
}

/// An open VHD image. `Send + Sync`; see the module docs for the write
/// protocol.
pub struct Vhd {
    pub(crate) storage: Box<dyn Storage>,
    pub(crate) writable: bool,
    pub(crate) read_only_reason: Option<String>,
    pub(crate) footer_bytes: [u8; FOOTER_SIZE],
    pub(crate) virtual_size: u64,
    pub(crate) dynamic: Option<Dyn>,
    /// A differencing disk's parent (None for other disks, and when only
    /// inspecting).
    pub(crate) parent: Option<Arc<dyn VirtualDisk>>,
    /// A differencing disk: sectors not present in this layer come from
    /// the parent, and new blocks start with an all-zero bitmap.
    pub(crate) differencing: bool,
    pub(crate) flush_lock: Mutex<()>,
    /// Serializes writes into blocks whose bitmap is not full (see
    /// `disk::copy_up`).
    pub(crate) copy_up: disk::CopyUpLocks,
    pub(crate) closed: AtomicBool,
    pub(crate) info: Info,
}

/// A mutex's guard, poisoned or not (the state stays consistent: every
/// critical section only ever completes its updates).
pub(crate) fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// `len` bytes at `offset` of `storage`, in a new buffer.
pub(crate) fn read_vec(storage: &dyn Storage, offset: u64, len: u64) -> Result<Vec<u8>> {
    let mut v = vec![0u8; buf_len(len)?];
    storage.read_at(&mut v, offset)?;
    Ok(v)
}

/// `len` as an in-memory buffer length.
///
/// # Errors
/// [`crate::ErrorKind::InvalidInput`] when it does not fit this platform's
/// address space.
pub(crate) fn buf_len(len: u64) -> Result<usize> {
    usize::try_from(len)
        .map_err(|_| Error::invalid(format!("a buffer of {len} bytes is too large for memory")))
}

/// Whether the ranges `[a, a + a_len)` and `[b, b + b_len)` meet.
pub(crate) fn overlaps(a: u64, a_len: u64, b: u64, b_len: u64) -> bool {
    a < b.saturating_add(b_len) && b < a.saturating_add(a_len)
}

impl Vhd {
    /// Footer, header and layout as read at open.
    pub fn info(&self) -> &Info {
        &self.info
    }

    /// Bytes per block of a dynamic or differencing disk; 0 for a fixed
    /// disk, which has no blocks (as [`VirtualDisk::discard_granularity`]
    /// says "none" with 0).
    pub fn block_size(&self) -> u64 {
        self.dynamic.as_ref().map_or(0, |d| d.block_size)
    }

    /// The storage's name (its path for a file), for messages.
    pub(crate) fn name(&self) -> &str {
        self.storage.name()
    }

    /// Flush. Also done on drop, where errors can only be ignored; call this
    /// to see them.
    ///
    /// # Errors
    /// I/O errors.
    pub fn close(self) -> Result<()> {
        self.close_inner()
    }

    /// Refuse writes: the image is open read-only (saying why) or closed.
    pub(crate) fn check_writable(&self) -> Result<()> {
        if !self.writable {
            let why = self
                .read_only_reason
                .as_deref()
                .map_or(String::new(), |r| format!(" ({r})"));
            return Err(
                Error::invalid(format!("image is open read-only{why}")).in_file(self.name(), 0)
            );
        }
        if self.closed.load(Ordering::Acquire) {
            return Err(Error::invalid("image is closed").in_file(self.name(), 0));
        }
        Ok(())
    }
}

/// Images in memory for the unit tests of the driver's modules.
#[cfg(test)]
pub(crate) mod testutil {
    use super::*;
    use disk::MemStorage;

    /// A new dynamic (or fixed) image of `size` bytes in memory, open.
    pub(crate) fn mem(size: u64, fixed: bool) -> (Arc<MemStorage>, Vhd) {
        let st = Arc::new(MemStorage::new("mem.vhd"));
        let mut o = CreateOptions::new(size);
        o.fixed = fixed;
        let d = Vhd::create_on(Box::new(st.clone()), &o).unwrap();
        (st, d)
    }

    /// A copy of `st`'s bytes opened read-only.
    pub(crate) fn reopen(st: &MemStorage) -> Vhd {
        Vhd::open_storage(
            Box::new(MemStorage::from_vec("again.vhd", st.to_vec())),
            &OpenOptions::default(),
        )
        .unwrap()
    }
}
