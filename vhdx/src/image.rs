//! An open VHDX image: the driver type [`Vhdx`], its options and what
//! `info` shows. The driver's work is split by concern, each an `impl Vhdx`
//! in its own module:
//!
//! - `open`: open, with log replay (MS-VHDX 2.3.3), and inspect;
//! - `create`: new dynamic, fixed and differencing images;
//! - `block_map`: the BAT (paged), block allocation, the
//!   [`disk::VirtualDisk`] mapping, discard and zeroing;
//! - `differencing`: sector bitmaps and PARTIALLY_PRESENT blocks;
//! - `session`: the write session (headers), flush through the log, close;
//! - `parent_search`: parent locators made and followed, stale paths
//!   updated;
//! - `relink`: a new parent locator, `set_parent`, `make_standalone`;
//! - `resize`, `compact`.
//!
//! # Locks
//! Lock order: `flush_lock` → `header` → `bat` → `alloc_end` → `bitmaps`.
//! Payload reads and writes never hold a lock; metadata I/O (paging in a BAT
//! or sector bitmap page, the log writes of a flush, clearing the bitmap of
//! a block being allocated) holds only what the step needs.

use crate::bat::BatGeometry;
use crate::bat_cache::BatCache;
use crate::header::Header;
use crate::metadata::{Metadata, MetadataTable};
use crate::parent_search::parse_linkage;
use crate::region_table::RegionEntry;
use crate::sector_bitmap::BitmapCache;
use crate::{Error, Result};
use disk::parent::ParentPolicy;
use disk::{Geometry, LockMode, Opener, Storage, VirtualDisk};
use std::sync::atomic::{AtomicBool, AtomicU64};
use std::sync::{Arc, Mutex, MutexGuard, RwLock};
use uuid::Uuid;

pub(crate) const MIB: u64 = 1 << 20;
/// [`MIB`] as a buffer length.
pub(crate) const MIB_BYTES: usize = 1 << 20;
/// Largest metadata region we read whole (Windows writes 1 MiB).
pub(crate) const MAX_METADATA_REGION: u64 = 64 * MIB;
/// Largest log we read whole for replay.
pub(crate) const MAX_LOG: u64 = 256 * MIB;
/// Default cap of resident clean BAT pages (64 MiB of BAT).
pub const DEFAULT_BAT_CACHE_PAGES: usize = 16384;
/// Cap of resident clean sector bitmap pages (16 MiB).
pub(crate) const BITMAP_CACHE_PAGES: usize = 4096;
/// The default block size of differencing disks (as Hyper-V creates them).
pub const DEFAULT_DIFFERENCING_BLOCK_SIZE: u32 = 2 << 20;

/// How to open an image.
#[derive(Debug, Clone)]
pub struct OpenOptions {
    /// Open for writing (a dirty log is then replayed into the file).
    pub writable: bool,
    /// Cap on resident clean BAT pages (4 KiB each).
    pub bat_cache_pages: usize,
    /// Which parent files a differencing disk may lead to (by default only
    /// files under the directory of the image opened; see [`disk::parent`]).
    pub parent_policy: ParentPolicy,
    /// Use the parent the locator finds even when its DataWriteGuid is not
    /// the one the child records (applies to the whole chain). Only for a
    /// parent known to hold the right data.
    pub ignore_parent_linkage: bool,
    /// Keep the DataWriteGuid when writing. Only for writes that do not
    /// change what the disk reads (merging its parent's data into it), so
    /// that its own children stay linked to it.
    pub keep_data_write_guid: bool,
    /// The DataWriteGuid to take when this session renews it (instead of a
    /// random one): lets a caller record it in a child's `parent_linkage2`
    /// before changing this disk (a crash-safe merge into a parent).
    pub data_write_guid: Option<Uuid>,
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
            bat_cache_pages: DEFAULT_BAT_CACHE_PAGES,
            parent_policy: ParentPolicy::default(),
            ignore_parent_linkage: false,
            keep_data_write_guid: false,
            data_write_guid: None,
            lock: LockMode::Auto,
            opener: disk::file_opener(),
        }
    }
}

/// How to create an image.
#[derive(Debug, Clone)]
pub struct CreateOptions {
    /// Virtual size in bytes (a multiple of the logical sector size, ≤ 64 TiB).
    pub virtual_size: u64,
    /// Fixed (all blocks allocated up front) or dynamic.
    pub fixed: bool,
    /// Block size: a power of two from 1 MiB to 256 MiB (default 32 MiB).
    pub block_size: u32,
    /// 512 or 4096.
    pub logical_sector_size: u32,
    /// 512 or 4096.
    pub physical_sector_size: u32,
    /// Log size: a multiple of 1 MiB (default 1 MiB).
    pub log_size: u32,
    /// How the new file (and a differencing disk's parent, read for its
    /// identity) is reached: real files by default ([`disk::Opener`]).
    pub opener: Arc<dyn Opener>,
}

impl CreateOptions {
    /// Dynamic, 32 MiB blocks, 512-byte logical and 4096-byte physical sectors, 1 MiB log.
    pub fn new(virtual_size: u64) -> Self {
        CreateOptions {
            virtual_size,
            fixed: false,
            block_size: 32 << 20,
            logical_sector_size: 512,
            physical_sector_size: 4096,
            log_size: 1 << 20,
            opener: disk::file_opener(),
        }
    }
}

/// What `info` shows about an image.
#[derive(Debug, Clone)]
pub struct Info {
    /// Creator string of the file identifier.
    pub creator: String,
    /// The current header.
    pub header: Header,
    /// Which header slot (0 or 1) is current.
    pub header_slot: usize,
    /// The region table.
    pub regions: Vec<RegionEntry>,
    /// The metadata table.
    pub metadata_table: MetadataTable,
    /// The parsed metadata items.
    pub metadata: Metadata,
    /// Whether the log held entries to replay at open.
    pub log_replayed: bool,
    /// Number of log entries in the replayed sequence.
    pub log_entries: usize,
    /// File length in bytes.
    pub file_size: u64,
    /// The parent file of a differencing disk, when it was opened.
    pub parent_file: Option<String>,
}

impl Info {
    /// The parent identities a differencing disk accepts: the
    /// `parent_linkage` and `parent_linkage2` GUIDs of its locator.
    pub fn parent_linkages(&self) -> Vec<Uuid> {
        let Some(pl) = &self.metadata.parent_locator else {
            return Vec::new();
        };
        ["parent_linkage", "parent_linkage2"]
            .iter()
            .filter_map(|k| pl.get(k).and_then(parse_linkage))
            .collect()
    }

    /// "fixed" when LeaveBlocksAllocated is set (Hyper-V and QEMU set it on
    /// fixed disks), "differencing" with a parent, else "dynamic".
    pub fn subformat(&self) -> &'static str {
        let fp = &self.metadata.file_parameters;
        if fp.has_parent {
            "differencing"
        } else if fp.leave_blocks_allocated {
            "fixed"
        } else {
            "dynamic"
        }
    }
}

/// Counts of block states, from a scan of the BAT.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct AllocationStats {
    /// Payload blocks in state FULLY_PRESENT or PARTIALLY_PRESENT.
    pub present_blocks: u64,
    /// Payload blocks in state ZERO.
    pub zero_blocks: u64,
    /// Payload blocks in state UNMAPPED.
    pub unmapped_blocks: u64,
    /// Payload blocks NOT_PRESENT or UNDEFINED.
    pub absent_blocks: u64,
    /// Bytes of the virtual disk backed by present blocks.
    pub allocated_bytes: u64,
}

pub(crate) struct HeaderState {
    pub(crate) current: Header,
    pub(crate) slot: usize,
    /// LogGuid of this write session (nil until the first change).
    pub(crate) session_log_guid: Uuid,
    pub(crate) next_sequence: u64,
}

/// An open VHDX image. `Send + Sync`; see the module docs for locking.
pub struct Vhdx {
    pub(crate) storage: Box<dyn Storage>,
    pub(crate) writable: bool,
    pub(crate) info: Info,
    pub(crate) geometry: Geometry,
    pub(crate) bat_geo: BatGeometry,
    pub(crate) block_size: u64,
    pub(crate) bat_offset: u64,
    pub(crate) flush_lock: Mutex<()>,
    pub(crate) header: Mutex<HeaderState>,
    pub(crate) session_started: AtomicBool,
    /// The DataWriteGuid has been renewed in this session.
    pub(crate) data_guid_renewed: AtomicBool,
    pub(crate) keep_data_write_guid: bool,
    pub(crate) next_data_write_guid: Option<Uuid>,
    pub(crate) bat: RwLock<BatCache>,
    pub(crate) alloc_end: Mutex<u64>,
    /// Space kept for an UNMAPPED block is reused only if it ends at or
    /// before this offset (`scan::kept_limit` of the file as
    /// opened); new blocks may have been placed over space kept beyond.
    pub(crate) kept_limit: u64,
    /// The file length last seen: a block reaching past it is checked
    /// against the file's length now (it may have grown), and what lies
    /// past that is a truncated block.
    pub(crate) known_len: AtomicU64,
    pub(crate) bitmaps: Mutex<BitmapCache>,
    /// The operations of a log entry that is durable in the log but whose
    /// in-place application failed: applied again before anything else is
    /// logged, and until then the session does not end clean (the next open
    /// would replay the entry).
    pub(crate) unapplied: Mutex<Option<Vec<crate::log::LogOp>>>,
    pub(crate) parent: Option<Arc<dyn VirtualDisk>>,
    /// Serializes writes into PARTIALLY_PRESENT blocks (see `disk::copy_up`).
    pub(crate) copy_up: disk::CopyUpLocks,
    pub(crate) closed: AtomicBool,
}

pub(crate) fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// Refuse `what`, `len` bytes at `offset`, when it extends past the end of
/// the file.
pub(crate) fn check_in_file(
    storage: &dyn Storage,
    offset: u64,
    len: u64,
    what: &'static str,
) -> Result<()> {
    let file_len = storage.len()?;
    if offset.checked_add(len).is_none_or(|e| e > file_len) {
        return Err(Error::corrupt(
            what,
            offset,
            format!(
                "its {len} bytes at {offset:#x} extend past the end of the file ({file_len} bytes)"
            ),
        )
        .in_file(storage.name(), 0));
    }
    Ok(())
}

pub(crate) fn read_vec(
    storage: &dyn Storage,
    offset: u64,
    len: u64,
    what: &'static str,
) -> Result<Vec<u8>> {
    check_in_file(storage, offset, len, what)?;
    let n = usize::try_from(len).map_err(|_| {
        Error::invalid(format!("{what} ({len} bytes) does not fit in memory"))
            .in_file(storage.name(), 0)
    })?;
    let mut v = vec![0u8; n];
    storage.read_at(&mut v, offset)?;
    Ok(v)
}

impl Vhdx {
    /// Headers, regions and metadata as read at open.
    pub fn info(&self) -> &Info {
        &self.info
    }

    /// The block size in bytes.
    pub fn block_size(&self) -> u64 {
        self.block_size
    }

    pub(crate) fn name(&self) -> &str {
        self.storage.name()
    }

    /// The header as it is now (DataWriteGuid of this session included).
    pub fn current_header(&self) -> Header {
        lock(&self.header).current.clone()
    }

    /// The parent of a differencing disk, if it was opened.
    pub fn parent_disk(&self) -> Option<&Arc<dyn VirtualDisk>> {
        self.parent.as_ref()
    }
}

impl Drop for Vhdx {
    fn drop(&mut self) {
        let _ = self.close_inner();
    }
}

impl std::fmt::Debug for Vhdx {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Vhdx")
            .field("file", &self.name())
            .field("virtual_size", &self.geometry.virtual_size)
            .field("block_size", &self.block_size)
            .field("writable", &self.writable)
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use disk::MemStorage;
    use std::sync::Arc;

    fn mem_disk(size: u64, block: u32) -> (Arc<MemStorage>, Vhdx) {
        let st = Arc::new(MemStorage::new("mem.vhdx"));
        let mut o = CreateOptions::new(size);
        o.block_size = block;
        let d = Vhdx::create_on(Box::new(st.clone()), &o).unwrap();
        (st, d)
    }

    #[test]
    fn a_block_on_the_bat_region_opens_read_only_only() {
        // A fuzz finding (vhdx_open): block 0's entry pointed at the BAT
        // region; a write to the block went into the BAT, and the flush of
        // the BAT then overwrote it: the flushed write read back different.
        let (st, d) = mem_disk(8 * MIB, 1 << 20);
        d.write_at(&[7; 4096], 0).unwrap();
        let bat = d.bat_offset;
        d.close().unwrap();
        let e = crate::bat::BatEntry::new(crate::bat::PayloadState::FullyPresent as u8, bat);
        st.write_at(&e.0.to_le_bytes(), bat).unwrap();
        let rw = OpenOptions {
            writable: true,
            ..OpenOptions::default()
        };
        let err = Vhdx::open_storage(Box::new(st.clone()), &rw).unwrap_err();
        assert_eq!(err.kind(), disk::ErrorKind::Corrupt);
        let msg = err.to_string();
        assert!(
            msg.contains(&format!(
                "block 0 (BAT entry 0) at file offset {bat:#x}+0x100000 overlaps the BAT region \
                 ({bat:#x}+0x100000)"
            )),
            "{msg}"
        );
        // Read-only, it opens; reading the block is refused, naming the
        // structure it lies on (never the BAT's bytes shown as data).
        let d = Vhdx::open_storage(Box::new(st.clone()), &OpenOptions::default()).unwrap();
        let mut b = [0u8; 8];
        let err = d.read_at(&mut b, 0).unwrap_err();
        assert_eq!(err.kind(), disk::ErrorKind::Corrupt);
        assert!(err.to_string().contains("overlaps the BAT region"), "{err}");
    }

    #[test]
    fn write_read_reopen() {
        let (st, d) = mem_disk(64 * MIB, 1 << 20);
        let data: Vec<u8> = (0..10000u32).map(|i| (i % 251) as u8).collect();
        d.write_at(&data, 3 * MIB - 77).unwrap();
        let mut back = vec![0u8; data.len()];
        d.read_at(&mut back, 3 * MIB - 77).unwrap();
        assert_eq!(back, data);
        d.close().unwrap();
        let d2 = Vhdx::open_storage(
            Box::new(MemStorage::from_vec("again", st.to_vec())),
            &OpenOptions::default(),
        )
        .unwrap();
        let mut back = vec![0u8; data.len() + 2];
        d2.read_at(&mut back, 3 * MIB - 78).unwrap();
        assert_eq!(&back[1..data.len() + 1], &data[..]);
        assert_eq!(back[0], 0);
        assert!(!d2.info().log_replayed);
        assert!(d2.info().header.log_guid.is_nil());
    }
}
