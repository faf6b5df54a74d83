//! An open VHDX image: open (with log replay), the block mapping, allocation,
//! flush through the log, discard, create and close.
//!
//! # Locks
//! Lock order: `flush_lock` → `header` → `bat` → `alloc_end` → `bitmaps`.
//! Payload reads and writes never hold a lock; metadata I/O (paging in a BAT
//! or sector bitmap page, the log writes of a flush, clearing the bitmap of
//! a block being allocated) holds only what the step needs.
//!
//! # Differencing disks (MS-VHDX 2.5, 2.6.2.6)
//! A differencing disk (HasParent) reads a block from its parent when the
//! block is NOT_PRESENT (or UNDEFINED), and per logical sector from its
//! sector bitmap when it is PARTIALLY_PRESENT. Writing to a block not
//! present allocates it PARTIALLY_PRESENT with all bits 0 (and the chunk's
//! sector bitmap block if it has none); the written sectors' bits are set
//! in memory once the payload write returns, and reach the file through the
//! log at the next flush, after the data is durable, like BAT entries. A
//! block whose sectors are all present becomes FULLY_PRESENT. Sectors only
//! partly covered by a write are first filled with the parent's bytes by the
//! shared write loop. ZERO and UNMAPPED blocks read as zeros, not from the
//! parent. The parent is found through the parent locator under a
//! [`ParentPolicy`], must have the DataWriteGuid the locator's
//! `parent_linkage` (or `parent_linkage2`) records, and is opened
//! read-only.
//!
//! # Write protocol (MS-VHDX 2.3, `shared/design/vhdx-log.md`)
//! - Before the first change after open, both headers are rewritten with a
//!   new FileWriteGuid, DataWriteGuid and the LogGuid of this session.
//! - An allocating write reserves a block at the 1 MiB-aligned end of the
//!   file, writes the payload, and updates the in-memory BAT (page dirty).
//! - `flush` syncs the file (payload durable), writes one log entry carrying
//!   every dirty BAT page, syncs, writes the pages in place, syncs. Only then
//!   may the next entry overwrite that log space.
//! - A clean close leaves the log empty (LogGuid zero in the headers).

use crate::bat::{BatEntry, BatGeometry, PayloadState, SB_BLOCK_NOT_PRESENT, SB_BLOCK_PRESENT};
use crate::bat_cache::{BatCache, ENTRIES_PER_PAGE, PAGE_BYTES};
use crate::file_identifier::FileIdentifier;
use crate::header::{self, Header};
use crate::log::{self, LogEntry, LogOp, LOG_SECTOR};
use crate::metadata::{FileParameters, Metadata, MetadataTable, PARENT_LOCATOR};
use crate::parent_locator::{ParentLocator, VHDX_PARENT_LOCATOR_TYPE};
use crate::region_table::{RegionEntry, RegionTable, BAT_REGION, METADATA_REGION};
use crate::replay::{self, ReplayOverlay};
use crate::scan;
use crate::sector_bitmap::{self, BitmapCache, PAGE_BITS};
use crate::{Error, Result};
use disk::parent::{self, ChainSearch, ParentPolicy};
use disk::{
    Extent, FileOffset, Geometry, LockMode, Mapping, Opener, ResultExt, Storage, VirtualDisk,
    WriteExtent,
};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, RwLock};
use uuid::Uuid;

/// `Vhdx::compact`: a child module, like `resize`.
#[path = "compact.rs"]
mod compact;
/// `Vhdx::resize`: a child module, so that it uses the driver's internals
/// without widening their visibility.
#[path = "resize.rs"]
mod resize;

const MIB: u64 = 1 << 20;
/// Largest metadata region we read whole (Windows writes 1 MiB).
const MAX_METADATA_REGION: u64 = 64 * MIB;
/// Largest log we read whole for replay.
const MAX_LOG: u64 = 256 * MIB;
/// Default cap of resident clean BAT pages (64 MiB of BAT).
pub const DEFAULT_BAT_CACHE_PAGES: usize = 16384;
/// Cap of resident clean sector bitmap pages (16 MiB).
const BITMAP_CACHE_PAGES: usize = 4096;
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
            block_size: 32 * MIB as u32,
            logical_sector_size: 512,
            physical_sector_size: 4096,
            log_size: MIB as u32,
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

struct HeaderState {
    current: Header,
    slot: usize,
    /// LogGuid of this write session (nil until the first change).
    session_log_guid: Uuid,
    next_sequence: u64,
}

/// An open VHDX image. `Send + Sync`; see the module docs for locking.
pub struct Vhdx {
    storage: Box<dyn Storage>,
    writable: bool,
    info: Info,
    geometry: Geometry,
    bat_geo: BatGeometry,
    block_size: u64,
    bat_offset: u64,
    flush_lock: Mutex<()>,
    header: Mutex<HeaderState>,
    session_started: AtomicBool,
    /// The DataWriteGuid has been renewed in this session.
    data_guid_renewed: AtomicBool,
    keep_data_write_guid: bool,
    next_data_write_guid: Option<Uuid>,
    bat: RwLock<BatCache>,
    alloc_end: Mutex<u64>,
    /// The file length last seen: a block reaching past it is checked
    /// against the file's length now (it may have grown), and what lies
    /// past that is a truncated block.
    known_len: AtomicU64,
    bitmaps: Mutex<BitmapCache>,
    parent: Option<Arc<dyn VirtualDisk>>,
    closed: AtomicBool,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

fn read_vec(storage: &dyn Storage, offset: u64, len: u64, what: &str) -> Result<Vec<u8>> {
    let file_len = storage.len()?;
    if offset.checked_add(len).is_none_or(|e| e > file_len) {
        return Err(Error::corrupt(
            "file",
            offset,
            format!("{what} ({len} bytes) extends past the end of the file ({file_len} bytes)"),
        )
        .in_file(storage.name(), 0));
    }
    let mut v = vec![0u8; len as usize];
    storage.read_at(&mut v, offset)?;
    Ok(v)
}

impl Vhdx {
    /// Open the VHDX file at `path`.
    ///
    /// # Errors
    /// The file cannot be opened, is not a VHDX, is corrupt, or needs an
    /// unsupported feature (a differencing disk: its parent is named).
    pub fn open(path: impl AsRef<Path>, opts: &OpenOptions) -> Result<Self> {
        let path = path.as_ref();
        let mut chain = ChainSearch::new(&opts.parent_policy, path);
        chain.enter(&path.display().to_string(), path)?;
        Self::open_path(path, opts, &mut chain)
    }

    fn open_path(path: &Path, opts: &OpenOptions, chain: &mut ChainSearch) -> Result<Self> {
        let storage = opts.opener.open(path, opts.writable, opts.lock)?;
        let (vhdx, _) = Self::open_inner(
            storage,
            opts,
            ParentSource::Search {
                child: path.to_path_buf(),
                chain,
            },
        )?;
        vhdx.update_stale_parent_paths(path)?;
        Ok(vhdx)
    }

    /// MS-VHDX 2.6.2.6.3: "Upon successful open of a chain, an
    /// implementation has to update any existing stale path entries to point
    /// to its current parent file." Done when the disk is open writable and
    /// its parent was found by searching from `child` (its path): each
    /// `relative_path` or `absolute_win32_path` entry present that does not
    /// lead to the parent file opened is rewritten to one that does, through
    /// the log ([`Vhdx::set_parent_locator`]); the linkage entries and the
    /// DataWriteGuid are kept, so the disk's own children stay linked. A
    /// `volume_path` (a Windows volume GUID path, which cannot be made here)
    /// is left as it is, and so is an `absolute_win32_path` naming a drive,
    /// UNC or volume path (`C:\vms\base.vhdx`, as Windows writes it): it
    /// names a file on another system, which may well be right there, and
    /// no path of this system could replace it. Entries that still lead to
    /// the parent, whatever their spelling, are not touched.
    fn update_stale_parent_paths(&self, child: &Path) -> Result<()> {
        let (Some(parent), Some(loc)) = (
            self.info.parent_file.as_deref(),
            self.info.metadata.parent_locator.as_ref(),
        ) else {
            return Ok(());
        };
        if !self.writable {
            return Ok(());
        }
        let Ok(parent_abs) = std::fs::canonicalize(parent) else {
            return Ok(());
        };
        let dir = parent::dir_of(child);
        let leads_to_parent = |key: &str, v: &str| {
            locator_path(dir, key, v)
                .and_then(|c| std::fs::canonicalize(c).ok())
                .is_some_and(|c| c == parent_abs)
        };
        let fresh = parent_locator_for(child, &parent_abs, Uuid::nil())?;
        let mut updated = loc.clone();
        let mut changed = false;
        for (key, value) in updated.entries.iter_mut() {
            let windows_drive_path = key == "absolute_win32_path"
                && parent::is_windows_absolute(value)
                && parent::absolute_candidate(dir, value).is_none();
            if !matches!(key.as_str(), "relative_path" | "absolute_win32_path")
                || windows_drive_path
                || leads_to_parent(key, value)
            {
                continue;
            }
            if let Some(v) = fresh.get(key) {
                *value = v.to_string();
                changed = true;
            }
        }
        if changed {
            self.set_parent_locator(&updated)?;
        }
        Ok(())
    }

    /// Open a VHDX on any storage. A differencing disk's parent is searched
    /// for relative to the storage's name, taken as a path.
    ///
    /// # Errors
    /// As [`Vhdx::open`].
    pub fn open_storage(storage: Box<dyn Storage>, opts: &OpenOptions) -> Result<Self> {
        let child = PathBuf::from(storage.name());
        let mut chain = ChainSearch::new(&opts.parent_policy, &child);
        chain.enter(storage.name(), &child)?;
        let (vhdx, _) = Self::open_inner(
            storage,
            opts,
            ParentSource::Search {
                child: child.clone(),
                chain: &mut chain,
            },
        )?;
        vhdx.update_stale_parent_paths(&child)?;
        Ok(vhdx)
    }

    /// Open a differencing VHDX whose parent the caller has already opened.
    /// The parent's virtual size and logical sector size must match; its
    /// identity (linkage) is the caller's responsibility.
    ///
    /// # Errors
    /// As [`Vhdx::open`]; also when the image is not a differencing disk.
    pub fn open_with_parent(
        path: impl AsRef<Path>,
        opts: &OpenOptions,
        parent: Arc<dyn VirtualDisk>,
    ) -> Result<Self> {
        let storage = opts.opener.open(path.as_ref(), opts.writable, opts.lock)?;
        Self::open_storage_with_parent(storage, opts, parent)
    }

    /// [`Vhdx::open_with_parent`] on any storage.
    ///
    /// # Errors
    /// As [`Vhdx::open_with_parent`].
    pub fn open_storage_with_parent(
        storage: Box<dyn Storage>,
        opts: &OpenOptions,
        parent: Arc<dyn VirtualDisk>,
    ) -> Result<Self> {
        let (vhdx, _) = Self::open_inner(storage, opts, ParentSource::Given(parent))?;
        Ok(vhdx)
    }

    /// Read an image's headers, regions and metadata without opening it for
    /// I/O: works for differencing disks whose parent is missing. A dirty log
    /// is replayed in memory only.
    ///
    /// # Errors
    /// Not a VHDX, or corrupt structures.
    pub fn inspect(path: impl AsRef<Path>) -> Result<Info> {
        Self::inspect_with(path, &OpenOptions::default())
    }

    /// [`Vhdx::inspect`] (always read-only) with the lock mode and opener
    /// of `opts` (a shared claim by default; [`LockMode::ForceShare`] to
    /// read an image another process is writing).
    ///
    /// # Errors
    /// As [`Vhdx::inspect`].
    pub fn inspect_with(path: impl AsRef<Path>, opts: &OpenOptions) -> Result<Info> {
        let storage = opts.opener.open(path.as_ref(), false, opts.lock)?;
        let (_, info) = Self::open_inner(storage, &OpenOptions::default(), ParentSource::Inspect)?;
        Ok(info)
    }

    fn open_inner(
        storage: Box<dyn Storage>,
        opts: &OpenOptions,
        parent_source: ParentSource<'_>,
    ) -> Result<(Self, Info)> {
        let name = storage.name().to_string();
        let writable = opts.writable && storage.is_writable();
        let file_size = storage.len()?;
        if file_size < 5 * 64 * 1024 {
            return Err(Error::corrupt(
                "file identifier",
                0,
                format!("file is {file_size} bytes, too short to be a VHDX"),
            )
            .in_file(&name, 0));
        }
        // 2.2.1 file type identifier.
        let ident_buf = read_vec(&*storage, 0, 520, "file identifier")?;
        let ident = FileIdentifier::parse(&ident_buf).in_file(&name, 0)?;

        // 2.2.2 headers: the valid one with the larger sequence number.
        let mut hdrs = Vec::with_capacity(2);
        for off in Header::OFFSETS {
            let buf = read_vec(&*storage, off, Header::SIZE as u64, "header")?;
            hdrs.push(Header::parse(&buf).in_file(&name, off));
        }
        let second = hdrs.pop().expect("two headers");
        let first = hdrs.pop().expect("two headers");
        let (slot, hdr) = header::select_current(first, second).in_file(&name, 0)?;

        // 2.3.3 log replay, before reading anything the log may have changed.
        let mut storage = storage;
        let mut log_entries = 0usize;
        let mut hdr = hdr;
        let mut slot = slot;
        if !hdr.log_guid.is_nil() {
            if u64::from(hdr.log_length) > MAX_LOG {
                return Err(Error::unsupported(format!(
                    "log of {} bytes is larger than {MAX_LOG}",
                    hdr.log_length
                ))
                .in_file(&name, 0));
            }
            let log_buf = read_vec(&*storage, hdr.log_offset, u64::from(hdr.log_length), "log")?;
            let seq = log::find_active_sequence(&log_buf, hdr.log_guid);
            log_entries = seq.len();
            if let Some((_, head)) = seq.last() {
                let flushed = head.flushed_file_offset;
                let last = head.last_file_offset;
                if flushed > file_size {
                    return Err(Error::corrupt(
                        "log entry",
                        hdr.log_offset + seq.last().map_or(0, |(o, _)| *o as u64),
                        format!(
                            "FlushedFileOffset {flushed:#x} is beyond the end of the file \
                             ({file_size:#x}): the file was truncated after the log was written"
                        ),
                    )
                    .in_file(&name, 0));
                }
                let ops: Vec<LogOp> = seq.into_iter().flat_map(|(_, e)| e.ops).collect();
                if writable {
                    replay::apply(&*storage, &ops)?;
                    if storage.len()? < last {
                        storage.set_len(last)?;
                    }
                    storage.flush()?;
                } else {
                    storage = Box::new(ReplayOverlay::new(storage, ops, last)?);
                }
            }
            if writable {
                // The log is now applied: record that it is empty.
                let mut h = hdr.clone();
                h.log_guid = Uuid::nil();
                slot = write_header_pair(&*storage, &mut h, slot)?;
                hdr = h;
            }
        }

        // 2.2.3 region tables: the first valid one.
        let mut rt_err = None;
        let mut regions = None;
        for off in RegionTable::OFFSETS {
            let buf = read_vec(&*storage, off, RegionTable::SIZE as u64, "region table")?;
            match RegionTable::parse(&buf).in_file(&name, off) {
                Ok(t) => {
                    regions = Some(t);
                    break;
                }
                Err(e) if e.kind() == disk::ErrorKind::Unsupported => return Err(e),
                Err(e) => rt_err = rt_err.or(Some(e)),
            }
        }
        let regions = match regions {
            Some(r) => r,
            None => return Err(rt_err.expect("an error when no table parsed")),
        };
        let bat_region = *regions.bat();
        let meta_region = *regions.metadata();
        let _ = (BAT_REGION, METADATA_REGION);

        // 2.2.4 / 2.6 metadata.
        if u64::from(meta_region.length) > MAX_METADATA_REGION {
            return Err(Error::unsupported(format!(
                "metadata region of {} bytes is larger than {MAX_METADATA_REGION}",
                meta_region.length
            ))
            .in_file(&name, 0));
        }
        let meta_buf = read_vec(
            &*storage,
            meta_region.file_offset,
            u64::from(meta_region.length),
            "metadata region",
        )?;
        let (metadata_table, metadata) =
            Metadata::parse(&meta_buf).in_file(&name, meta_region.file_offset)?;

        let info = Info {
            creator: ident.creator,
            header: hdr.clone(),
            header_slot: slot,
            regions: regions.entries.clone(),
            metadata_table,
            metadata: metadata.clone(),
            log_replayed: log_entries > 0,
            log_entries,
            file_size,
            parent_file: None,
        };
        let mut info = info;
        let parent = if metadata.file_parameters.has_parent {
            let loc = metadata.parent_locator.as_ref().ok_or_else(|| {
                Error::corrupt(
                    "metadata",
                    0,
                    "HasParent is set but there is no parent locator",
                )
                .in_file(&name, meta_region.file_offset)
            })?;
            if loc.locator_type != VHDX_PARENT_LOCATOR_TYPE
                && !matches!(parent_source, ParentSource::Inspect)
            {
                return Err(Error::unsupported(format!(
                    "parent locator type {} (only VHDX parents, {VHDX_PARENT_LOCATOR_TYPE}, are supported)",
                    loc.locator_type
                ))
                .in_file(&name, 0));
            }
            let p = match parent_source {
                ParentSource::Inspect => None,
                ParentSource::Given(p) => Some(p),
                ParentSource::Search { child, chain } => {
                    Some(find_parent(&name, &child, loc, &info, opts, chain)?)
                }
            };
            if let Some(p) = &p {
                let g = p.geometry();
                if g.virtual_size != metadata.virtual_disk_size
                    || g.logical_sector_size != metadata.logical_sector_size
                {
                    return Err(Error::invalid(format!(
                        "the parent {} has a virtual size of {} bytes and {}-byte sectors, but \
                         this differencing VHDX has {} bytes and {}-byte sectors: it is not \
                         this disk's parent",
                        p.storage().name(),
                        g.virtual_size,
                        g.logical_sector_size,
                        metadata.virtual_disk_size,
                        metadata.logical_sector_size
                    ))
                    .in_file(&name, 0));
                }
                info.parent_file = Some(p.storage().name().to_string());
            }
            p
        } else {
            if let ParentSource::Given(p) = parent_source {
                return Err(Error::invalid(format!(
                    "a parent ({}) was given, but this VHDX is not a differencing disk",
                    p.storage().name()
                ))
                .in_file(&name, 0));
            }
            None
        };

        // 2.5 BAT.
        let fp: FileParameters = metadata.file_parameters;
        let bat_geo = BatGeometry::new(
            metadata.virtual_disk_size,
            fp.block_size,
            metadata.logical_sector_size,
            fp.has_parent,
        )
        .in_file(&name, meta_region.file_offset)?;
        if bat_geo.bat_bytes() > u64::from(bat_region.length) {
            return Err(Error::corrupt(
                "region table",
                RegionTable::OFFSETS[0],
                format!(
                    "BAT region is {} bytes but the disk needs {} bytes of BAT",
                    bat_region.length,
                    bat_geo.bat_bytes()
                ),
            )
            .in_file(&name, 0));
        }
        let cur_len = storage.len()?;
        // New blocks go past every byte the BAT references, inside the file
        // or not (space kept for an unmapped block past the end; a block
        // of a file truncated since it was opened), at a 1 MiB boundary.
        // Only a writable open needs this scan, which also refuses a
        // truncated file.
        let mut alloc_end = cur_len;
        if writable {
            let s = scan::scan(&*storage, bat_region.file_offset, &bat_geo)?;
            if s.entries_in_file < s.total_entries {
                return Err(scan::lost_entry_error(
                    &name,
                    &bat_geo,
                    s.entries_in_file,
                    bat_region.file_offset + s.entries_in_file * 8,
                    cur_len,
                ));
            }
            if let Some(b) = s.truncated.first() {
                // New blocks would extend the file over the lost part of
                // the truncated blocks, which would then read as zeros
                // instead of failing: data lost silently. (QEMU refuses to
                // open such an image at all.)
                return Err(Error::corrupt(
                    "BAT",
                    bat_region.file_offset + b.index * 8,
                    format!(
                        "the image is truncated: {} blocks lie past the end of the file (the \
                         first: {}, virtual {:#x}..{:#x}, file offset {:#x}+{:#x}); it opens \
                         read-only only, as writing would make their lost data read as zeros \
                         (vdisk convert --salvage copies what is left)",
                        s.truncated_blocks,
                        scan::describe(&bat_geo, b.index),
                        b.virtual_range.0,
                        b.virtual_range.1,
                        b.file_offset,
                        b.length
                    ),
                )
                .in_file(&name, 0));
            }
            alloc_end = alloc_end.max(s.referenced_end);
        }
        let alloc_end = alloc_end.div_ceil(MIB) * MIB;
        let next_sequence = 1;
        let vhdx = Vhdx {
            geometry: Geometry {
                virtual_size: metadata.virtual_disk_size,
                logical_sector_size: metadata.logical_sector_size,
                physical_sector_size: metadata.physical_sector_size,
            },
            bat_geo,
            block_size: u64::from(fp.block_size),
            bat_offset: bat_region.file_offset,
            writable,
            flush_lock: Mutex::new(()),
            header: Mutex::new(HeaderState {
                current: hdr,
                slot,
                session_log_guid: Uuid::nil(),
                next_sequence,
            }),
            session_started: AtomicBool::new(false),
            data_guid_renewed: AtomicBool::new(false),
            keep_data_write_guid: opts.keep_data_write_guid,
            next_data_write_guid: opts.data_write_guid,
            bat: RwLock::new(BatCache::new(bat_geo.total_entries(), opts.bat_cache_pages)),
            alloc_end: Mutex::new(alloc_end),
            known_len: AtomicU64::new(cur_len),
            bitmaps: Mutex::new(BitmapCache::new(BITMAP_CACHE_PAGES)),
            parent,
            closed: AtomicBool::new(false),
            storage,
            info: info.clone(),
        };
        Ok((vhdx, info))
    }

    /// Create a new VHDX file at `path` (failing if it exists unless `overwrite`).
    ///
    /// # Errors
    /// Invalid options, or I/O errors.
    pub fn create(path: impl AsRef<Path>, opts: &CreateOptions, overwrite: bool) -> Result<Self> {
        validate_create(opts)?;
        let storage = opts.opener.create(path.as_ref(), overwrite)?;
        Self::create_on(storage, opts)
    }

    /// Create a new VHDX on empty storage.
    ///
    /// # Errors
    /// Invalid options, or I/O errors.
    pub fn create_on(storage: Box<dyn Storage>, opts: &CreateOptions) -> Result<Self> {
        Self::create_inner(storage, opts, None)
    }

    /// Create a differencing VHDX at `path` whose parent is the VHDX at
    /// `parent_path` (opened read-only with `parent_opts`, its own chain
    /// included). The child takes the parent's virtual size and sector
    /// sizes; `opts` gives its block size (Hyper-V uses
    /// [`DEFAULT_DIFFERENCING_BLOCK_SIZE`]) and log size. The locator
    /// records the parent's DataWriteGuid, its path relative to the child
    /// (`relative_path`, as Windows writes it) and its absolute path
    /// (`absolute_win32_path`, in Win32 syntax: see [`parent_locator_for`]).
    ///
    /// # Errors
    /// The parent cannot be opened, invalid options, I/O errors.
    pub fn create_differencing(
        path: impl AsRef<Path>,
        parent_path: impl AsRef<Path>,
        opts: &CreateOptions,
        parent_opts: &OpenOptions,
        overwrite: bool,
    ) -> Result<Self> {
        let path = path.as_ref();
        let parent_path = parent_path.as_ref();
        let popts = OpenOptions {
            writable: false,
            ..parent_opts.clone()
        };
        let parent = Vhdx::open(parent_path, &popts)?;
        let locator = parent_locator_for(path, parent_path, parent.info.header.data_write_guid)?;
        let storage = opts.opener.create(path, overwrite)?;
        Self::create_inner(storage, opts, Some((locator, Arc::new(parent))))
    }

    /// Create a differencing VHDX on empty storage, with the given parent
    /// (already open) and parent locator.
    ///
    /// # Errors
    /// Invalid options or locator, or I/O errors.
    pub fn create_differencing_on(
        storage: Box<dyn Storage>,
        opts: &CreateOptions,
        locator: ParentLocator,
        parent: Arc<dyn VirtualDisk>,
    ) -> Result<Self> {
        Self::create_inner(storage, opts, Some((locator, parent)))
    }

    /// Create a differencing VHDX file at `path` over the VHDX at
    /// `parent_path` without opening the parent's chain: only the parent's
    /// headers and metadata are read (for its identity and geometry), so the
    /// cost does not depend on the chain's depth or the disk's size. The new
    /// file is durable when this returns; open it to use it.
    ///
    /// # Errors
    /// The parent is not a readable VHDX, invalid options, I/O errors.
    pub fn create_differencing_file(
        path: impl AsRef<Path>,
        parent_path: impl AsRef<Path>,
        opts: &CreateOptions,
        overwrite: bool,
    ) -> Result<()> {
        let (path, parent_path) = (path.as_ref(), parent_path.as_ref());
        let popts = OpenOptions {
            opener: opts.opener.clone(),
            ..OpenOptions::default()
        };
        let info = Vhdx::inspect_with(parent_path, &popts)?;
        let m = &info.metadata;
        let geo = Geometry {
            virtual_size: m.virtual_disk_size,
            logical_sector_size: m.logical_sector_size,
            physical_sector_size: m.physical_sector_size,
        };
        let locator = parent_locator_for(path, parent_path, info.header.data_write_guid)?;
        let storage = opts.opener.create(path, overwrite)?;
        Self::write_new(&*storage, opts, Some((locator, geo)))
    }

    fn create_inner(
        storage: Box<dyn Storage>,
        opts: &CreateOptions,
        parent: Option<(ParentLocator, Arc<dyn VirtualDisk>)>,
    ) -> Result<Self> {
        let geo = parent.as_ref().map(|(l, p)| (l.clone(), p.geometry()));
        Self::write_new(&*storage, opts, geo)?;
        let rw = OpenOptions {
            writable: true,
            ..OpenOptions::default()
        };
        match parent {
            Some((_, p)) => Self::open_storage_with_parent(storage, &rw, p),
            None => Self::open_storage(storage, &rw),
        }
    }

    /// Write a new, empty image on `storage` and sync it.
    fn write_new(
        storage: &dyn Storage,
        opts: &CreateOptions,
        parent: Option<(ParentLocator, Geometry)>,
    ) -> Result<()> {
        let name = storage.name().to_string();
        let mut opts = opts.clone();
        if let Some((loc, g)) = &parent {
            opts.virtual_size = g.virtual_size;
            opts.logical_sector_size = g.logical_sector_size;
            opts.physical_sector_size = g.physical_sector_size;
            if opts.fixed {
                return Err(Error::invalid("a differencing disk cannot be fixed").in_file(&name, 0));
            }
            loc.validate().in_file(&name, 0)?;
            if loc.get("parent_linkage").and_then(parse_linkage).is_none() {
                return Err(
                    Error::invalid("the parent locator needs a parent_linkage GUID")
                        .in_file(&name, 0),
                );
            }
        }
        let opts = &opts;
        validate_create(opts)?;
        let bat_geo = BatGeometry::new(
            opts.virtual_size,
            opts.block_size,
            opts.logical_sector_size,
            parent.is_some(),
        )
        .in_file(&name, 0)?;
        let log_offset = MIB;
        let meta_offset = log_offset + u64::from(opts.log_size);
        let meta_len = MIB;
        let bat_offset = meta_offset + meta_len;
        let bat_len = bat_geo.bat_bytes().div_ceil(MIB).max(1) * MIB;
        let payload_start = bat_offset + bat_len;
        let bat_len32 = u32::try_from(bat_len)
            .map_err(|_| Error::invalid("BAT too large for the region table").in_file(&name, 0))?;

        let mut buf = vec![0u8; 64 * 1024];
        FileIdentifier {
            creator: format!("vdisk {}", env!("CARGO_PKG_VERSION")),
        }
        .write_to(&mut buf);
        storage.write_at(&buf, 0)?;

        let regions = RegionTable {
            entries: vec![
                RegionEntry {
                    guid: BAT_REGION,
                    file_offset: bat_offset,
                    length: bat_len32,
                    required: true,
                },
                RegionEntry {
                    guid: METADATA_REGION,
                    file_offset: meta_offset,
                    length: meta_len as u32,
                    required: true,
                },
            ],
        };
        let mut rbuf = vec![0u8; RegionTable::SIZE];
        regions.write_to(&mut rbuf);
        for off in RegionTable::OFFSETS {
            storage.write_at(&rbuf, off)?;
        }

        let metadata = Metadata {
            file_parameters: FileParameters {
                block_size: opts.block_size,
                leave_blocks_allocated: opts.fixed,
                has_parent: parent.is_some(),
            },
            virtual_disk_size: opts.virtual_size,
            virtual_disk_id: Uuid::new_v4(),
            logical_sector_size: opts.logical_sector_size,
            physical_sector_size: opts.physical_sector_size,
            parent_locator: parent.as_ref().map(|(l, _)| l.clone()),
        };
        let mbuf = metadata.build_region(meta_len as u32)?;
        // Write the used part only: the rest of the region stays sparse
        // (zeros) in the new file.
        let used = mbuf.iter().rposition(|&b| b != 0).map_or(0, |i| i + 1);
        let used = used.div_ceil(4096) * 4096;
        storage.write_at(&mbuf[..used], meta_offset)?;

        // The log region reads as zeros (no valid entry) and the BAT as
        // NOT_PRESENT: extending the file leaves both sparse.
        let mut end = payload_start;
        if opts.fixed {
            let payload_blocks = bat_geo.payload_blocks();
            end = payload_start
                .checked_add(payload_blocks * u64::from(opts.block_size))
                .ok_or_else(|| Error::invalid("disk too large").in_file(&name, 0))?;
            storage.set_len(end)?;
            // Write the BAT page by page: FULLY_PRESENT, contiguous payload.
            let total = bat_geo.total_entries();
            let mut page = vec![0u8; PAGE_BYTES];
            let mut idx = 0u64;
            let mut block = 0u64;
            while idx < total {
                page.fill(0);
                let n = (total - idx).min(ENTRIES_PER_PAGE);
                for i in 0..n {
                    let e = if bat_geo.is_bitmap_index(idx + i) {
                        BatEntry(0)
                    } else {
                        let fo = payload_start + block * u64::from(opts.block_size);
                        block += 1;
                        BatEntry::new(PayloadState::FullyPresent as u8, fo)
                    };
                    page[i as usize * 8..i as usize * 8 + 8].copy_from_slice(&e.0.to_le_bytes());
                }
                storage.write_at(&page, bat_offset + idx * 8)?;
                idx += n;
            }
        } else {
            storage.set_len(end)?;
        }

        let mut h = Header {
            sequence_number: 0,
            file_write_guid: Uuid::new_v4(),
            data_write_guid: Uuid::new_v4(),
            log_guid: Uuid::nil(),
            log_version: 0,
            version: 1,
            log_length: opts.log_size,
            log_offset,
        };
        let mut hbuf = vec![0u8; Header::SIZE];
        for (i, off) in Header::OFFSETS.into_iter().enumerate() {
            h.sequence_number = i as u64;
            h.write_to(&mut hbuf);
            storage.write_at(&hbuf, off)?;
        }
        storage.flush()
    }

    /// Headers, regions and metadata as read at open.
    pub fn info(&self) -> &Info {
        &self.info
    }

    /// The block size in bytes.
    pub fn block_size(&self) -> u64 {
        self.block_size
    }

    fn name(&self) -> &str {
        self.storage.name()
    }

    /// The BAT entry at `index`, paging it in if needed.
    fn bat_entry(&self, index: u64) -> Result<BatEntry> {
        {
            let c = self.bat.read().unwrap_or_else(|e| e.into_inner());
            if let Some(e) = c.get(index) {
                return Ok(e);
            }
        }
        let p = (index / ENTRIES_PER_PAGE) as usize;
        self.page_in(p)?;
        let c = self.bat.read().unwrap_or_else(|e| e.into_inner());
        c.get(index).ok_or_else(|| {
            Error::corrupt("BAT", self.bat_offset + index * 8, "entry out of range")
                .in_file(self.name(), 0)
        })
    }

    /// Read BAT page `p` from disk into the cache (I/O outside the lock).
    fn page_in(&self, p: usize) -> Result<()> {
        let mut bytes = Box::new([0u8; PAGE_BYTES]);
        let off = self.bat_offset + (p as u64) * PAGE_BYTES as u64;
        let flen = self.storage.len()?;
        // Bytes past the end of the file read as zeros here, but no writer
        // leaves the BAT past the end (this library, QEMU and every corpus
        // image extend the file over it): an entry past the end is a file
        // truncated inside the BAT, which `entry_in_file` turns into an
        // error naming the block rather than NOT_PRESENT.
        if off < flen {
            let n = (flen - off).min(PAGE_BYTES as u64) as usize;
            self.storage.read_at(&mut bytes[..n], off)?;
        }
        let mut c = self.bat.write().unwrap_or_else(|e| e.into_inner());
        c.insert(p, &bytes);
        Ok(())
    }

    /// The file's length, asking the storage only when `end` lies past the
    /// length last seen (the file may have grown since).
    fn file_len_for(&self, end: u64) -> Result<u64> {
        let known = self.known_len.load(Ordering::Acquire);
        if end <= known {
            return Ok(known);
        }
        let now = self.storage.len()?;
        self.known_len.store(now, Ordering::Release);
        Ok(now)
    }

    /// How many of the `run` bytes from `within` of the block of BAT index
    /// `idx` (at file offset `fo`, `len` bytes long) lie inside the file:
    /// all, the ones before its end, or none, which is an error naming the
    /// block, its virtual range and file range (a truncated file).
    fn in_file(&self, idx: u64, fo: u64, len: u64, within: u64, run: u64) -> Result<u64> {
        let start = fo + within;
        let flen = self.file_len_for(start + run)?;
        if start + run <= flen {
            Ok(run)
        } else if start < flen {
            Ok(flen - start)
        } else {
            Err(scan::truncated_error(
                self.name(),
                &self.bat_geo,
                idx,
                fo,
                len,
                flen,
            ))
        }
    }

    /// Fail unless the whole block of BAT index `idx` (at `fo`, `len`
    /// bytes) lies inside the file: a write into a truncated block would
    /// put zeros where data was lost, and a sector bitmap cut short would
    /// read as "nothing present".
    fn whole_in_file(&self, idx: u64, fo: u64, len: u64) -> Result<()> {
        let flen = self.file_len_for(fo + len)?;
        if fo + len <= flen {
            return Ok(());
        }
        Err(scan::truncated_error(
            self.name(),
            &self.bat_geo,
            idx,
            fo,
            len,
            flen,
        ))
    }

    /// Fail when entry `idx` (read as zeros) lies past the end of the
    /// file: a file truncated inside the BAT must not read the blocks whose
    /// entries it lost as zeros. No writer leaves the BAT region past the
    /// end of the file (this library, QEMU and Windows all write it or
    /// extend the file over it).
    fn entry_in_file(&self, idx: u64, e: BatEntry) -> Result<()> {
        let at = self.bat_offset + idx * 8;
        if e.0 != 0 || at + 8 <= self.known_len.load(Ordering::Acquire) {
            return Ok(());
        }
        let flen = self.file_len_for(at + 8)?;
        if at + 8 <= flen {
            return Ok(());
        }
        Err(scan::lost_entry_error(
            self.name(),
            &self.bat_geo,
            idx,
            at,
            flen,
        ))
    }

    /// The payload state and file offset of `block`, validated.
    fn block_entry(&self, block: u64) -> Result<(PayloadState, u64)> {
        let idx = self.bat_geo.payload_index(block);
        let e = self.bat_entry(idx)?;
        self.entry_in_file(idx, e)?;
        let at = self.bat_offset + idx * 8;
        let state = e
            .payload_state()
            .map_err(|err| err.in_file(self.name(), at))?;
        let fo = e.file_offset();
        if matches!(
            state,
            PayloadState::FullyPresent | PayloadState::PartiallyPresent
        ) && (fo < MIB || fo.checked_add(self.block_size).is_none())
        {
            return Err(Error::corrupt(
                "BAT entry",
                at,
                format!("block {block} is present at invalid file offset {fo:#x}"),
            )
            .in_file(self.name(), 0));
        }
        if state == PayloadState::PartiallyPresent && !self.bat_geo.has_parent {
            return Err(Error::corrupt(
                "BAT entry",
                at,
                format!("block {block} is PARTIALLY_PRESENT in a disk without a parent"),
            )
            .in_file(self.name(), 0));
        }
        Ok((state, fo))
    }

    /// Rewrite both headers for a write session (new FileWriteGuid and
    /// LogGuid) before the first change after open; before the first change
    /// of the disk's data (`data`), also a new DataWriteGuid (MS-VHDX 2.2.2),
    /// unless the caller asked to keep it.
    fn start_session(&self, data: bool) -> Result<()> {
        let renew_data = data && !self.keep_data_write_guid;
        if self.session_started.load(Ordering::Acquire)
            && (!renew_data || self.data_guid_renewed.load(Ordering::Acquire))
        {
            return Ok(());
        }
        if !self.writable {
            return Err(Error::invalid("image is open read-only").in_file(self.name(), 0));
        }
        if self.closed.load(Ordering::Acquire) {
            return Err(Error::invalid("image is closed").in_file(self.name(), 0));
        }
        let mut hs = lock(&self.header);
        let started = self.session_started.load(Ordering::Acquire);
        let renewed = self.data_guid_renewed.load(Ordering::Acquire);
        if started && (!renew_data || renewed) {
            return Ok(());
        }
        let mut h = hs.current.clone();
        if !started {
            h.file_write_guid = Uuid::new_v4();
            h.log_guid = Uuid::new_v4();
        }
        if renew_data && !renewed {
            h.data_write_guid = self.next_data_write_guid.unwrap_or_else(Uuid::new_v4);
        }
        hs.slot = write_header_pair(&*self.storage, &mut h, hs.slot)?;
        hs.session_log_guid = h.log_guid;
        hs.current = h;
        if renew_data {
            self.data_guid_renewed.store(true, Ordering::Release);
        }
        self.session_started.store(true, Ordering::Release);
        Ok(())
    }

    /// The header as it is now (DataWriteGuid of this session included).
    pub fn current_header(&self) -> Header {
        lock(&self.header).current.clone()
    }

    /// The parent of a differencing disk, if it was opened.
    pub fn parent_disk(&self) -> Option<&Arc<dyn VirtualDisk>> {
        self.parent.as_ref()
    }

    /// Sectors per payload block.
    fn sectors_per_block(&self) -> u64 {
        self.block_size / u64::from(self.geometry.logical_sector_size)
    }

    /// Sectors of `block` inside the virtual disk.
    fn block_sectors(&self, block: u64) -> u64 {
        let start = block * self.block_size;
        (self.geometry.virtual_size - start).min(self.block_size)
            / u64::from(self.geometry.logical_sector_size)
    }

    /// The file offset of the sector bitmap block of `block`'s chunk, if
    /// allocated, validated.
    fn bitmap_block(&self, block: u64) -> Result<Option<u64>> {
        let idx = self
            .bat_geo
            .bitmap_index(block / self.bat_geo.chunk_ratio());
        let e = self.bat_entry(idx)?;
        self.entry_in_file(idx, e)?;
        let at = self.bat_offset + idx * 8;
        match e.state() {
            SB_BLOCK_NOT_PRESENT => Ok(None),
            SB_BLOCK_PRESENT => {
                let fo = e.file_offset();
                if fo < MIB || fo.checked_add(MIB).is_none() {
                    return Err(Error::corrupt(
                        "BAT entry",
                        at,
                        format!("sector bitmap block at invalid file offset {fo:#x}"),
                    )
                    .in_file(self.name(), 0));
                }
                self.whole_in_file(idx, fo, MIB)?;
                Ok(Some(fo))
            }
            s => Err(Error::corrupt(
                "BAT entry",
                at,
                format!("sector bitmap entry in undefined state {s}"),
            )
            .in_file(self.name(), 0)),
        }
    }

    /// The bit index, within its sector bitmap block, of `block`'s first sector.
    fn first_bit(&self, block: u64) -> u64 {
        (block % self.bat_geo.chunk_ratio()) * self.sectors_per_block()
    }

    /// Make the bitmap page at file offset `page_off` resident.
    fn bitmap_page_in(&self, page_off: u64) -> Result<()> {
        if lock(&self.bitmaps).get(page_off).is_some() {
            return Ok(());
        }
        let mut bytes = Box::new([0u8; sector_bitmap::PAGE]);
        let flen = self.storage.len()?;
        if page_off < flen {
            let n = (flen - page_off).min(sector_bitmap::PAGE as u64) as usize;
            self.storage.read_at(&mut bytes[..n], page_off)?;
        }
        lock(&self.bitmaps).insert(page_off, bytes);
        Ok(())
    }

    /// Whether sector `bit` of the bitmap block at `sb` is present, and how
    /// many sectors from it (at most `count`) share that state.
    fn bitmap_run(&self, sb: u64, bit: u64, count: u64) -> Result<(bool, u64)> {
        let mut done = 0u64;
        let mut state = None;
        while done < count {
            let b = bit + done;
            let page_off = sb + (b / PAGE_BITS) * sector_bitmap::PAGE as u64;
            let in_page = b % PAGE_BITS;
            let want = (count - done).min(PAGE_BITS - in_page);
            loop {
                let c = lock(&self.bitmaps);
                if let Some(page) = c.get(page_off) {
                    let v = sector_bitmap::bit(page, in_page);
                    if state.is_some_and(|s| s != v) {
                        return Ok((state.unwrap_or(v), done));
                    }
                    state = Some(v);
                    let n = sector_bitmap::run_len(page, in_page, in_page + want);
                    done += n;
                    if n < want {
                        return Ok((v, done));
                    }
                    break;
                }
                drop(c);
                self.bitmap_page_in(page_off)?;
            }
        }
        Ok((state.unwrap_or(false), done))
    }

    /// Set or clear bits `[from, to)` of the bitmap block at `sb` in memory
    /// (dirty: logged at the next flush).
    fn bitmap_set(&self, sb: u64, from: u64, to: u64, value: bool) -> Result<()> {
        let mut b = from;
        while b < to {
            let page_off = sb + (b / PAGE_BITS) * sector_bitmap::PAGE as u64;
            let in_page = b % PAGE_BITS;
            let n = (to - b).min(PAGE_BITS - in_page);
            loop {
                let mut c = lock(&self.bitmaps);
                if let Some(page) = c.get_mut(page_off) {
                    sector_bitmap::set_range(page, in_page, in_page + n, value);
                    break;
                }
                drop(c);
                self.bitmap_page_in(page_off)?;
            }
            b += n;
        }
        Ok(())
    }

    /// Map part of a PARTIALLY_PRESENT block by its sector bitmap.
    fn map_partial(&self, block: u64, within: u64, run: u64, fo: u64) -> Result<(Mapping, u64)> {
        let sb = self.bitmap_block(block)?.ok_or_else(|| {
            Error::corrupt(
                "BAT entry",
                self.bat_offset + self.bat_geo.payload_index(block) * 8,
                format!(
                    "block {block} is PARTIALLY_PRESENT but its chunk has no sector bitmap block"
                ),
            )
            .in_file(self.name(), 0)
        })?;
        let ss = u64::from(self.geometry.logical_sector_size);
        let s0 = within / ss;
        let last = (within + run - 1) / ss;
        let (present, n) = self.bitmap_run(sb, self.first_bit(block) + s0, last - s0 + 1)?;
        let len = ((s0 + n) * ss).min(within + run) - within;
        let mapping = if present {
            Mapping::Data(FileOffset(fo + within))
        } else {
            Mapping::Parent
        };
        Ok((mapping, len))
    }

    /// Allocate `block` of a differencing disk PARTIALLY_PRESENT (no sector
    /// present yet), with its chunk's sector bitmap block. Returns the
    /// block's state and file offset after the call (another thread may have
    /// allocated it first).
    fn allocate_partial(&self, block: u64) -> Result<(PayloadState, u64)> {
        let idx = self.bat_geo.payload_index(block);
        let sb_idx = self
            .bat_geo
            .bitmap_index(block / self.bat_geo.chunk_ratio());
        // Make both pages resident before taking the write lock.
        self.bat_entry(idx)?;
        self.bat_entry(sb_idx)?;
        let mut c = self.bat.write().unwrap_or_else(|e| e.into_inner());
        while c.get(idx).is_none() || c.get(sb_idx).is_none() {
            drop(c);
            self.page_in((idx / ENTRIES_PER_PAGE) as usize)?;
            self.page_in((sb_idx / ENTRIES_PER_PAGE) as usize)?;
            c = self.bat.write().unwrap_or_else(|e| e.into_inner());
        }
        let cur = c.get(idx).unwrap_or_default();
        let state = cur
            .payload_state()
            .map_err(|e| e.in_file(self.name(), self.bat_offset + idx * 8))?;
        if matches!(
            state,
            PayloadState::FullyPresent | PayloadState::PartiallyPresent
        ) {
            return Ok((state, cur.file_offset()));
        }
        let sb_entry = c.get(sb_idx).unwrap_or_default();
        let mut end = lock(&self.alloc_end);
        let grow = |end: &mut u64, n: u64| -> Result<u64> {
            let fo = *end;
            let new_end = fo.checked_add(n).ok_or_else(|| {
                Error::invalid("file would exceed the maximum size").in_file(self.name(), 0)
            })?;
            self.storage.set_len(new_end)?;
            *end = new_end;
            Ok(fo)
        };
        let (sb, fresh) = match sb_entry.state() {
            SB_BLOCK_PRESENT if sb_entry.file_offset() >= MIB => (sb_entry.file_offset(), false),
            SB_BLOCK_NOT_PRESENT => {
                let sb = grow(&mut end, MIB)?;
                c.set(sb_idx, BatEntry::new(SB_BLOCK_PRESENT, sb));
                (sb, true)
            }
            _ => {
                return Err(Error::corrupt(
                    "BAT entry",
                    self.bat_offset + sb_idx * 8,
                    "invalid sector bitmap entry",
                )
                .in_file(self.name(), 0))
            }
        };
        let fo = grow(&mut end, self.block_size)?;
        drop(end);
        // The block's bits may hold junk from an earlier life: clear them
        // (a new bitmap block reads as zeros already).
        if !fresh {
            let first = self.first_bit(block);
            self.bitmap_set(sb, first, first + self.sectors_per_block(), false)?;
        }
        c.set(idx, BatEntry::new(PayloadState::PartiallyPresent as u8, fo));
        Ok((PayloadState::PartiallyPresent, fo))
    }

    /// Record that sectors of a PARTIALLY_PRESENT block were written: set
    /// their bits, and make the block FULLY_PRESENT once all are set.
    fn commit_partial(&self, ext: &WriteExtent) -> Result<()> {
        let block = ext.token - 1;
        let (state, fo) = self.block_entry(block)?;
        if state != PayloadState::PartiallyPresent {
            return Ok(());
        }
        let Some(sb) = self.bitmap_block(block)? else {
            return Ok(());
        };
        let ss = u64::from(self.geometry.logical_sector_size);
        let within = ext.offset % self.block_size;
        let first = self.first_bit(block);
        let s0 = within / ss;
        let s1 = (within + ext.len).div_ceil(ss);
        self.bitmap_set(sb, first + s0, first + s1, true)?;
        let n = self.block_sectors(block);
        let (present, run) = self.bitmap_run(sb, first, n)?;
        if present && run == n {
            let idx = self.bat_geo.payload_index(block);
            let mut c = self.bat.write().unwrap_or_else(|e| e.into_inner());
            if c.get(idx).map(|e| e.state()) == Some(PayloadState::PartiallyPresent as u8) {
                c.set(idx, BatEntry::new(PayloadState::FullyPresent as u8, fo));
            }
        }
        Ok(())
    }

    /// Allocate file space for `block` and point its BAT entry at it.
    /// Returns the block's file offset.
    fn allocate(&self, block: u64) -> Result<u64> {
        let idx = self.bat_geo.payload_index(block);
        // Make sure the page is resident before taking the write lock.
        self.bat_entry(idx)?;
        let mut c = self.bat.write().unwrap_or_else(|e| e.into_inner());
        if c.get(idx).is_none() {
            drop(c);
            self.page_in((idx / ENTRIES_PER_PAGE) as usize)?;
            c = self.bat.write().unwrap_or_else(|e| e.into_inner());
        }
        let cur = c.get(idx).unwrap_or_default();
        let state = cur
            .payload_state()
            .map_err(|e| e.in_file(self.name(), self.bat_offset + idx * 8))?;
        if state == PayloadState::FullyPresent {
            return Ok(cur.file_offset()); // another thread got here first
        }
        let fo = if state == PayloadState::Unmapped && cur.file_offset() >= MIB {
            // LeaveBlocksAllocated kept the space: reuse it, zeroed, for this
            // same block (it was never handed to another block).
            let fo = cur.file_offset();
            let zeros = vec![0u8; MIB as usize];
            let mut done = 0;
            while done < self.block_size {
                self.storage.write_at(&zeros, fo + done)?;
                done += MIB;
            }
            fo
        } else {
            let mut end = lock(&self.alloc_end);
            let fo = *end;
            let new_end = fo.checked_add(self.block_size).ok_or_else(|| {
                Error::invalid("file would exceed the maximum size").in_file(self.name(), 0)
            })?;
            self.storage.set_len(new_end)?;
            *end = new_end;
            fo
        };
        c.set(idx, BatEntry::new(PayloadState::FullyPresent as u8, fo));
        Ok(fo)
    }

    /// Replace the parent locator of this differencing disk (the parent it
    /// reads from now is unchanged; the new locator takes effect at the next
    /// open). The locator item is rewritten in place, or after the last item
    /// when it grew, and the changed metadata pages go through the log with
    /// the next flush, which this call does: a crash leaves the old locator
    /// or the new one, never a mix. The DataWriteGuid is kept: what the disk
    /// reads does not change, so its own children stay linked to it.
    ///
    /// # Errors
    /// Not a differencing disk, read-only, a locator that does not fit the
    /// metadata region, I/O errors.
    pub fn set_parent_locator(&self, loc: &ParentLocator) -> Result<()> {
        if !self.bat_geo.has_parent {
            return Err(
                Error::invalid("not a differencing disk: it has no parent locator")
                    .in_file(self.name(), 0),
            );
        }
        loc.validate().in_file(self.name(), 0)?;
        self.start_session(false)?;
        let bytes = loc.to_bytes();
        let name = self.name().to_string();
        let pages = self.edit_metadata(|table, region| {
            let item_end = table
                .entries
                .iter()
                .map(|e| u64::from(e.offset) + u64::from(e.length))
                .max()
                .unwrap_or(crate::metadata::TABLE_SIZE as u64);
            let len = region.len() as u64;
            let Some(e) = table
                .entries
                .iter_mut()
                .find(|e| e.item_id == PARENT_LOCATOR && !e.is_user)
            else {
                return Err(Error::corrupt("metadata", 0, "no parent locator item"));
            };
            let (old_off, old_len) = (e.offset as usize, e.length as usize);
            let new_off = if bytes.len() <= old_len {
                old_off
            } else {
                let at = item_end.div_ceil(8) * 8;
                if at + bytes.len() as u64 > len {
                    return Err(Error::invalid(format!(
                        "the new parent locator ({} bytes) does not fit in the metadata region of {name}",
                        bytes.len()
                    )));
                }
                at as usize
            };
            region[old_off..old_off + old_len].fill(0);
            region[new_off..new_off + bytes.len()].copy_from_slice(&bytes);
            e.offset = new_off as u32;
            e.length = bytes.len() as u32;
            Ok(())
        })?;
        self.flush_with(pages)
    }

    /// Apply `edit` to a copy of the metadata region (its table and bytes),
    /// check that the result parses, and return the changed 4 KiB pages with
    /// their file offsets, for logging.
    fn edit_metadata(
        &self,
        edit: impl FnOnce(&mut MetadataTable, &mut Vec<u8>) -> Result<()>,
    ) -> Result<Vec<(u64, Box<[u8; PAGE_BYTES]>)>> {
        let meta = *self
            .info
            .regions
            .iter()
            .find(|r| r.guid == METADATA_REGION)
            .ok_or_else(|| {
                Error::corrupt("region table", 0, "no metadata region").in_file(self.name(), 0)
            })?;
        let len = u64::from(meta.length);
        let old = read_vec(&*self.storage, meta.file_offset, len, "metadata region")?;
        let mut table = MetadataTable::parse(&old, len).in_file(self.name(), meta.file_offset)?;
        let mut region = old.clone();
        edit(&mut table, &mut region).in_file(self.name(), meta.file_offset)?;
        table.write_to(&mut region);
        Metadata::parse(&region).in_file(self.name(), meta.file_offset)?;
        let mut pages = Vec::new();
        for (i, (new, old)) in region
            .chunks(PAGE_BYTES)
            .zip(old.chunks(PAGE_BYTES))
            .enumerate()
        {
            if new != old {
                let mut page = Box::new([0u8; PAGE_BYTES]);
                page.copy_from_slice(new);
                pages.push((meta.file_offset + (i * PAGE_BYTES) as u64, page));
            }
        }
        Ok(pages)
    }

    /// Turn this differencing disk into a dynamic disk that reads, on its
    /// own, what it reads now where its sectors are present and zeros
    /// elsewhere: the last step of merging a base disk into its only child
    /// (the caller has copied every parent sector the child needs). Then
    /// closes it.
    ///
    /// Steps, each crash-safe: (1) the absent sectors of PARTIALLY_PRESENT
    /// blocks are zero-filled and the blocks become FULLY_PRESENT (a flush:
    /// the disk is still a valid differencing disk, reading as before);
    /// (2) one last flush logs the sector bitmap entries going NOT_PRESENT
    /// and, last, the metadata pages that clear HasParent and drop the
    /// parent locator. A crash before (2) completes leaves a differencing
    /// disk with no partial blocks (valid, same reads); after, a dynamic
    /// disk.
    ///
    /// # Errors
    /// Not a differencing disk, read-only, I/O errors.
    pub fn make_standalone(self) -> Result<()> {
        if !self.bat_geo.has_parent {
            return Err(Error::invalid("not a differencing disk").in_file(self.name(), 0));
        }
        self.start_session(false)?;
        let ss = u64::from(self.geometry.logical_sector_size);
        let zeros = vec![0u8; MIB as usize];
        for block in 0..self.bat_geo.payload_blocks() {
            let (state, fo) = self.block_entry(block)?;
            if state != PayloadState::PartiallyPresent {
                continue;
            }
            let n = self.block_sectors(block);
            let mut s = 0;
            while s < n {
                let (m, len) = self.map_partial(block, s * ss, (n - s) * ss, fo)?;
                if m == Mapping::Parent {
                    let mut done = 0;
                    while done < len {
                        let k = (len - done).min(MIB);
                        self.storage
                            .write_at(&zeros[..k as usize], fo + s * ss + done)?;
                        done += k;
                    }
                }
                s += len / ss;
            }
            let idx = self.bat_geo.payload_index(block);
            self.bat_entry(idx)?;
            let mut c = self.bat.write().unwrap_or_else(|e| e.into_inner());
            while c.get(idx).is_none() {
                drop(c);
                self.page_in((idx / ENTRIES_PER_PAGE) as usize)?;
                c = self.bat.write().unwrap_or_else(|e| e.into_inner());
            }
            c.set(idx, BatEntry::new(PayloadState::FullyPresent as u8, fo));
        }
        self.flush_inner()?;
        for chunk in 0..self.bat_geo.bitmap_blocks() {
            let idx = self.bat_geo.bitmap_index(chunk);
            if self.bat_entry(idx)?.0 == 0 {
                continue;
            }
            let mut c = self.bat.write().unwrap_or_else(|e| e.into_inner());
            while c.get(idx).is_none() {
                drop(c);
                self.page_in((idx / ENTRIES_PER_PAGE) as usize)?;
                c = self.bat.write().unwrap_or_else(|e| e.into_inner());
            }
            c.set(idx, BatEntry(0));
        }
        let pages = self.edit_metadata(|table, region| {
            let fp = table
                .find(crate::metadata::FILE_PARAMETERS)
                .copied()
                .ok_or_else(|| Error::corrupt("metadata", 0, "no file parameters item"))?;
            let at = fp.offset as usize;
            let mut params = FileParameters::parse(&region[at..at + FileParameters::SIZE])?;
            params.has_parent = false;
            params.write_to(&mut region[at..at + FileParameters::SIZE]);
            if let Some(i) = table
                .entries
                .iter()
                .position(|e| e.item_id == PARENT_LOCATOR && !e.is_user)
            {
                let e = table.entries.remove(i);
                region[e.offset as usize..(e.offset + e.length) as usize].fill(0);
            }
            Ok(())
        })?;
        self.flush_with(pages)?;
        self.close()
    }

    /// Point the differencing disk `child` at the parent `new_parent` (like
    /// `Set-VHD -ParentPath`): the parent's DataWriteGuid must be one the
    /// child's locator records, unless `adopt` (the caller guarantees the new
    /// parent reads what the old one did; its DataWriteGuid is recorded).
    /// The new parent's own chain is opened under `parent_opts`.
    ///
    /// # Errors
    /// The new parent cannot be opened or is not the child's parent, the
    /// child is not a differencing VHDX, I/O errors.
    pub fn set_parent(
        child: impl AsRef<Path>,
        new_parent: impl AsRef<Path>,
        adopt: bool,
        parent_opts: &OpenOptions,
    ) -> Result<()> {
        let (child, new_parent) = (child.as_ref(), new_parent.as_ref());
        let popts = OpenOptions {
            writable: false,
            ..parent_opts.clone()
        };
        let parent = Vhdx::open(new_parent, &popts)?;
        let dwg = parent.info.header.data_write_guid;
        let rw = OpenOptions {
            writable: true,
            keep_data_write_guid: true,
            ..OpenOptions::default()
        };
        let c = Vhdx::open_with_parent(child, &rw, Arc::new(parent))?;
        let linkages = c.info.parent_linkages();
        if !adopt && !linkages.contains(&dwg) {
            return Err(Error::invalid(format!(
                "{} has DataWriteGuid {}, but this differencing VHDX expects parent_linkage {}: \
                 it is not this disk's parent",
                new_parent.display(),
                linkage_string(dwg),
                linkages
                    .first()
                    .map_or("(none)".to_string(), |g| linkage_string(*g))
            ))
            .in_file(c.name(), 0));
        }
        let loc = parent_locator_for(child, new_parent, dwg)?;
        c.set_parent_locator(&loc)?;
        c.close()
    }

    /// Scan the BAT as stored for blocks that run past the end of the file
    /// (a truncated file) and entries past it (a file truncated inside the
    /// BAT); see [`scan::BatScan`]. Reads the whole BAT region in the file
    /// (its holes skipped).
    ///
    /// # Errors
    /// I/O errors.
    pub fn truncation(&self) -> Result<scan::BatScan> {
        scan::scan(&*self.storage, self.bat_offset, &self.bat_geo)
    }

    /// Scan the whole BAT (page by page, without keeping it resident).
    ///
    /// # Errors
    /// I/O errors or unknown block states.
    pub fn allocation_stats(&self) -> Result<AllocationStats> {
        let mut s = AllocationStats::default();
        let blocks = self.bat_geo.payload_blocks();
        let file_len = self.storage.len()?;
        for b in 0..blocks {
            // An entry past the end of the file (truncated inside the BAT)
            // is unknown: not counted as allocated.
            if self.bat_offset + self.bat_geo.payload_index(b) * 8 + 8 > file_len {
                s.absent_blocks += 1;
                continue;
            }
            let (state, _) = self.block_entry(b)?;
            match state {
                PayloadState::FullyPresent | PayloadState::PartiallyPresent => {
                    s.present_blocks += 1;
                    let start = b * self.block_size;
                    s.allocated_bytes += (self.geometry.virtual_size - start).min(self.block_size);
                }
                PayloadState::Zero => s.zero_blocks += 1,
                PayloadState::Unmapped => s.unmapped_blocks += 1,
                PayloadState::NotPresent | PayloadState::Undefined => s.absent_blocks += 1,
            }
        }
        Ok(s)
    }

    /// Flush and write a clean header (empty log). Also done on drop, where
    /// errors can only be ignored; call this to see them.
    ///
    /// # Errors
    /// I/O errors.
    pub fn close(self) -> Result<()> {
        self.close_inner()
    }

    fn close_inner(&self) -> Result<()> {
        if self.closed.swap(true, Ordering::AcqRel) {
            return Ok(());
        }
        if !self.session_started.load(Ordering::Acquire) {
            return Ok(());
        }
        self.flush_inner()?;
        self.end_session()
    }

    /// End the write session after a flush: both headers record an empty
    /// log (LogGuid nil, as a clean close leaves them); the next change
    /// starts a new session (new FileWriteGuid and LogGuid).
    fn end_session(&self) -> Result<()> {
        let _f = lock(&self.flush_lock);
        let mut hs = lock(&self.header);
        let mut h = hs.current.clone();
        h.log_guid = Uuid::nil();
        hs.slot = write_header_pair(&*self.storage, &mut h, hs.slot)?;
        hs.current = h;
        hs.session_log_guid = Uuid::nil();
        self.session_started.store(false, Ordering::Release);
        Ok(())
    }

    fn flush_inner(&self) -> Result<()> {
        self.flush_with(Vec::new())
    }

    /// Flush, logging `extra` pages (file offset, bytes) in the same log
    /// entries as the dirty BAT and sector bitmap pages.
    fn flush_with(&self, extra: Vec<(u64, Box<[u8; PAGE_BYTES]>)>) -> Result<()> {
        let _f = lock(&self.flush_lock);
        if !self.session_started.load(Ordering::Acquire) {
            return self.storage.flush();
        }
        // Snapshot (and pin) dirty pages first, then sync: every allocation
        // those pages point at has had its file extension done already.
        // Sector bitmap pages go first: should a large flush need several
        // log entries, bits land before the BAT entries that make them
        // count (a bit of a block not yet PARTIALLY_PRESENT is ignored).
        let (bitmap_pages, bat_pages, last_file_offset) = {
            let mut c = self.bat.write().unwrap_or_else(|e| e.into_inner());
            let bat_pages = c.take_dirty();
            let end = *lock(&self.alloc_end);
            let bitmap_pages = lock(&self.bitmaps).take_dirty();
            (bitmap_pages, bat_pages, end)
        };
        let bat_ids: Vec<usize> = bat_pages.iter().map(|(p, _)| *p).collect();
        let bitmap_ids: Vec<u64> = bitmap_pages.iter().map(|(o, _)| *o).collect();
        let mut pages: Vec<(u64, Box<[u8; PAGE_BYTES]>)> = bitmap_pages;
        pages.extend(
            bat_pages
                .into_iter()
                .map(|(p, page)| (self.bat_offset + p as u64 * PAGE_BYTES as u64, page)),
        );
        pages.extend(extra);
        let result = self.log_and_apply(pages, last_file_offset);
        let mut c = self.bat.write().unwrap_or_else(|e| e.into_inner());
        let mut b = lock(&self.bitmaps);
        if result.is_err() {
            c.redirty(bat_ids);
            b.redirty(bitmap_ids);
        }
        c.unpin_all();
        b.unpin_all();
        result
    }

    /// Log `pages` (file offset, 4 KiB page) and apply them in place, after
    /// making every payload write durable.
    fn log_and_apply(
        &self,
        pages: Vec<(u64, Box<[u8; PAGE_BYTES]>)>,
        last_file_offset: u64,
    ) -> Result<()> {
        self.storage.flush()?;
        if pages.is_empty() {
            return Ok(());
        }
        let (log_guid, log_offset, log_length, mut seq) = {
            let hs = lock(&self.header);
            (
                hs.session_log_guid,
                hs.current.log_offset,
                u64::from(hs.current.log_length),
                hs.next_sequence,
            )
        };
        let log_sectors = (log_length / LOG_SECTOR as u64) as usize;
        // Largest number of pages one entry can carry in this log.
        let mut per_entry = log_sectors.saturating_sub(1).max(1);
        while per_entry > 1 && LogEntry::sectors_needed(per_entry, per_entry) > log_sectors {
            per_entry -= 1;
        }
        let flushed_file_offset = self.storage.len()?;
        let mut ops: Vec<LogOp> = pages
            .into_iter()
            .map(|(file_offset, page)| LogOp::Data { file_offset, page })
            .collect();
        while !ops.is_empty() {
            let rest = ops.split_off(ops.len().min(per_entry));
            let batch = std::mem::replace(&mut ops, rest);
            let entry = LogEntry {
                sequence_number: seq,
                log_guid,
                tail: 0,
                flushed_file_offset,
                last_file_offset: last_file_offset.max(flushed_file_offset),
                entry_length: 0,
                ops: batch,
            };
            let bytes = entry.encode();
            // Each entry starts a new sequence at the start of the log: the
            // previous entry is applied and synced, so its space is free.
            self.storage.write_at(&bytes, log_offset)?;
            self.storage.flush()?;
            replay::apply(&*self.storage, &entry.ops)?;
            self.storage.flush()?;
            seq += 1;
            lock(&self.header).next_sequence = seq;
        }
        Ok(())
    }

    /// Deallocate the whole blocks inside `[offset, offset+len)`: they become
    /// UNMAPPED and read as zeros (in a differencing disk too, rather than
    /// the parent's data). With LeaveBlocksAllocated the file space
    /// stays reserved for the block; otherwise it is simply no longer used.
    fn discard_blocks(&self, offset: u64, len: u64) -> Result<()> {
        let blocks = disk::whole_blocks(offset, len, self.block_size, self.geometry.virtual_size);
        // LeaveBlocksAllocated is ignored when HasParent is set (2.6.2.1).
        let keep =
            self.info.metadata.file_parameters.leave_blocks_allocated && !self.bat_geo.has_parent;
        let has_parent = self.bat_geo.has_parent;
        self.set_block_entries(blocks, |state, fo| {
            // In a differencing disk every discarded block becomes UNMAPPED
            // (zeros), whether it was here or in the parent, so that a
            // discard reads the same whatever the chain holds.
            let skip = if has_parent {
                state == PayloadState::Unmapped
            } else {
                matches!(
                    state,
                    PayloadState::NotPresent | PayloadState::Unmapped | PayloadState::Undefined
                ) && !(keep && state == PayloadState::Unmapped)
            };
            (!skip).then(|| BatEntry::new(PayloadState::Unmapped as u8, if keep { fo } else { 0 }))
        })
    }

    /// `write_zeroes` of whole blocks: each becomes PAYLOAD_BLOCK_ZERO
    /// (MS-VHDX 2.5.1.1: reads zeros, in a differencing disk too), keeping
    /// the file space it has unless `unmap` (or LeaveBlocksAllocated asks
    /// to keep it). Like a write, this reaches the file through the log at
    /// the next flush; space given up is never handed out again in this
    /// session (new blocks go at the end of the file).
    fn zero_blocks(&self, blocks: std::ops::Range<u64>, unmap: bool) -> Result<()> {
        let keep = !unmap
            || (self.info.metadata.file_parameters.leave_blocks_allocated
                && !self.bat_geo.has_parent);
        self.set_block_entries(blocks, |state, fo| {
            let fo = match state {
                PayloadState::FullyPresent | PayloadState::PartiallyPresent => fo,
                // Space kept by an UNMAPPED or ZERO entry stays with it.
                PayloadState::Unmapped | PayloadState::Zero => fo,
                _ => 0,
            };
            let fo = if keep { fo } else { 0 };
            let same = state == PayloadState::Zero && fo == 0;
            (!same).then(|| BatEntry::new(PayloadState::Zero as u8, fo))
        })
    }

    /// Give each of `blocks` the BAT entry `entry` returns for its state and
    /// file offset (`None`: leave it), in memory: the log takes the pages
    /// at the next flush.
    fn set_block_entries(
        &self,
        blocks: std::ops::Range<u64>,
        entry: impl Fn(PayloadState, u64) -> Option<BatEntry>,
    ) -> Result<()> {
        if blocks.is_empty() {
            return Ok(());
        }
        self.start_session(true)?;
        for b in blocks {
            let idx = self.bat_geo.payload_index(b);
            let (state, fo) = self.block_entry(b)?;
            let Some(new) = entry(state, fo) else {
                continue;
            };
            let mut c = self.bat.write().unwrap_or_else(|e| e.into_inner());
            if c.get(idx).is_none() {
                drop(c);
                self.page_in((idx / ENTRIES_PER_PAGE) as usize)?;
                c = self.bat.write().unwrap_or_else(|e| e.into_inner());
            }
            c.set(idx, new);
        }
        Ok(())
    }
}

/// Write `h` (sequence number bumped) into the non-current slot, sync, then
/// into the other slot, sync. Returns the slot that is now current.
pub(crate) fn write_header_pair(
    storage: &dyn Storage,
    h: &mut Header,
    current_slot: usize,
) -> Result<usize> {
    let mut buf = vec![0u8; Header::SIZE];
    let mut slot = current_slot;
    for _ in 0..2 {
        slot = 1 - slot;
        h.sequence_number = h.sequence_number.checked_add(1).ok_or_else(|| {
            Error::corrupt("header", Header::OFFSETS[slot], "sequence number overflow")
                .in_file(storage.name(), 0)
        })?;
        h.write_to(&mut buf);
        storage.write_at(&buf, Header::OFFSETS[slot])?;
        storage.flush()?;
    }
    Ok(slot)
}

/// How `open_inner` gets a differencing disk's parent.
enum ParentSource<'a> {
    /// Not at all: only inspecting.
    Inspect,
    /// Given by the caller.
    Given(Arc<dyn VirtualDisk>),
    /// Searched for through the locator, relative to `child`.
    Search {
        child: PathBuf,
        chain: &'a mut ChainSearch,
    },
}

/// A `parent_linkage` value (`{83ed0ec3-...}`) as a GUID.
fn parse_linkage(v: &str) -> Option<Uuid> {
    Uuid::parse_str(v.trim().trim_start_matches('{').trim_end_matches('}')).ok()
}

/// A GUID as a locator writes it: lowercase, in braces.
pub fn linkage_string(g: Uuid) -> String {
    format!("{{{}}}", g.hyphenated())
}

/// The locator a new child at `child` records for the parent at
/// `parent_path` whose DataWriteGuid is `linkage`, the way Windows writes
/// one (as in the corpus image made by Hyper-V, in its order):
/// `parent_linkage`, `absolute_win32_path` and `relative_path` (MS-VHDX
/// 2.6.2.6.3 requires the linkage and at least one path).
///
/// `relative_path` is relative to the child's directory, with backslashes
/// (`.\base.vhdx`, `..\dir\base.vhdx`). `absolute_win32_path` is the
/// parent's absolute path in Win32 syntax: Windows writes `C:\dir\base.vhdx`;
/// a Unix path has no drive letter, so this is the rooted path
/// `\dir\base.vhdx` ([`parent::windows_absolute_path`]), which our parent
/// search reads back as `/dir/base.vhdx`. The entry must be there and use
/// backslashes: libvhdi (`vhdimount`) takes the parent's file name from it
/// (or from `volume_path`), as the part after its last backslash, and
/// looks for that file beside the child; it ignores `relative_path`.
/// Windows itself tries `relative_path` first. When a name on the way holds
/// a backslash (legal on Unix, a separator in Win32 syntax) there is no
/// Windows form: `relative_path` is left out and `absolute_win32_path` is
/// the Unix path, as this library wrote before (only it reads that).
///
/// # Errors
/// The parent's path cannot be made absolute.
pub fn parent_locator_for(
    child: &Path,
    parent_path: &Path,
    linkage: Uuid,
) -> Result<ParentLocator> {
    let abs = std::fs::canonicalize(parent_path).map_err(|e| {
        Error::io(
            format!("cannot resolve the parent path {}", parent_path.display()),
            e,
        )
    })?;
    let child_dir = parent::dir_of(child).to_path_buf();
    let child_dir = std::fs::canonicalize(&child_dir).unwrap_or(child_dir);
    let absolute = parent::windows_absolute_path(&abs).unwrap_or_else(|| abs.display().to_string());
    let mut entries = vec![
        ("parent_linkage".to_string(), linkage_string(linkage)),
        ("absolute_win32_path".to_string(), absolute),
    ];
    if let Some(rel) = parent::windows_relative_path(&child_dir, &abs) {
        entries.push(("relative_path".to_string(), rel));
    }
    Ok(ParentLocator {
        locator_type: VHDX_PARENT_LOCATOR_TYPE,
        entries,
    })
}

/// The path on this system that the locator entry `key` = `value` names,
/// for a child in `dir`: `relative_path` is relative to it, the other
/// path entries are absolute (None: not a path here).
fn locator_path(dir: &Path, key: &str, value: &str) -> Option<PathBuf> {
    if key == "relative_path" {
        parent::relative_candidate(dir, value)
    } else {
        parent::absolute_candidate(dir, value)
    }
}

/// Where a differencing disk's parent may be, best first (MS-VHDX
/// 2.6.2.6.3): `relative_path`, `volume_path`, `absolute_win32_path`, then
/// the file name those paths end in, beside the child (Windows drive and
/// volume paths cannot exist here: a moved chain is usually one directory).
pub(crate) fn parent_candidates(
    child: &Path,
    loc: &ParentLocator,
) -> Vec<(String, Option<PathBuf>)> {
    let dir = parent::dir_of(child);
    let keys = ["relative_path", "volume_path", "absolute_win32_path"];
    let mut out = Vec::new();
    for key in keys {
        if let Some(v) = loc.get(key) {
            out.push((format!("{key}={v}"), locator_path(dir, key, v)));
        }
    }
    let mut names: Vec<&str> = Vec::new();
    for key in keys {
        if let Some(f) = loc.get(key).and_then(parent::file_name_of) {
            if !names.contains(&f) {
                names.push(f);
                out.push((
                    format!("file name \"{f}\" beside the child"),
                    Some(dir.join(f)),
                ));
            }
        }
    }
    out
}

/// Find, open (read-only, with its own chain) and check a differencing
/// disk's parent.
fn find_parent(
    name: &str,
    child: &Path,
    loc: &ParentLocator,
    info: &Info,
    opts: &OpenOptions,
    chain: &mut ChainSearch,
) -> Result<Arc<dyn VirtualDisk>> {
    let linkages = info.parent_linkages();
    let linkage_text = loc.get("parent_linkage").unwrap_or("(none)");
    let res = chain.resolve(&parent_candidates(child, loc));
    let Some(path) = res.found else {
        return Err(res.not_found_error(
            name,
            "VHDX",
            &format!("parent not found (parent_linkage {linkage_text})"),
            "its parent locator names no path",
        ));
    };
    let depth = chain.depth();
    chain.enter(name, &path)?;
    let popts = OpenOptions {
        writable: false,
        keep_data_write_guid: false,
        data_write_guid: None,
        ..opts.clone()
    };
    let parent = Vhdx::open_path(&path, &popts, chain);
    chain.truncate(depth);
    let parent = parent.map_err(|e| parent::parent_error(e, name, &path))?;
    let dwg = parent.info.header.data_write_guid;
    if !linkages.contains(&dwg) && !opts.ignore_parent_linkage {
        return Err(Error::invalid(format!(
            "parent {} has DataWriteGuid {}, but this differencing VHDX expects \
             parent_linkage {linkage_text}: it is not this disk's parent, or it was modified \
             after the child was made (open ignoring the parent linkage to use it anyway)",
            path.display(),
            linkage_string(dwg),
        ))
        .in_file(name, 0));
    }
    Ok(Arc::new(parent))
}

fn validate_create(o: &CreateOptions) -> Result<()> {
    let bad = |m: String| Err(Error::invalid(m));
    if !matches!(o.logical_sector_size, 512 | 4096) {
        return bad(format!(
            "logical sector size {} is not 512 or 4096",
            o.logical_sector_size
        ));
    }
    if !matches!(o.physical_sector_size, 512 | 4096) {
        return bad(format!(
            "physical sector size {} is not 512 or 4096",
            o.physical_sector_size
        ));
    }
    if !o.block_size.is_power_of_two() || !(MIB as u32..=256 * MIB as u32).contains(&o.block_size) {
        return bad(format!(
            "block size {} is not a power of two from 1 MiB to 256 MiB",
            o.block_size
        ));
    }
    if o.log_size == 0 || u64::from(o.log_size) % MIB != 0 {
        return bad(format!(
            "log size {} is not a positive multiple of 1 MiB",
            o.log_size
        ));
    }
    if o.virtual_size == 0
        || !o
            .virtual_size
            .is_multiple_of(u64::from(o.logical_sector_size))
        || o.virtual_size > 64 << 40
    {
        return bad(format!(
            "virtual size {} must be a positive multiple of the logical sector size ({}) and at most 64 TiB",
            o.virtual_size, o.logical_sector_size
        ));
    }
    Ok(())
}

impl VirtualDisk for Vhdx {
    fn geometry(&self) -> Geometry {
        self.geometry
    }

    fn storage(&self) -> &dyn Storage {
        &*self.storage
    }

    fn map(&self, offset: u64, len: u64) -> Result<Extent> {
        let block = offset / self.block_size;
        let within = offset % self.block_size;
        let run = len.min(self.block_size - within);
        let (state, fo) = self.block_entry(block)?;
        let has_parent = self.bat_geo.has_parent;
        let idx = self.bat_geo.payload_index(block);
        let bs = self.block_size;
        let (mapping, len) = match state {
            PayloadState::FullyPresent => (
                Mapping::Data(FileOffset(fo + within)),
                self.in_file(idx, fo, bs, within, run)?,
            ),
            PayloadState::Zero => (Mapping::Zero, run),
            // MS-VHDX 2.5.1.1: in a differencing disk a block not present is
            // read from the parent; UNDEFINED may read anything, and the
            // parent's data is the least surprising. UNMAPPED reads zeros.
            PayloadState::NotPresent | PayloadState::Undefined if has_parent => {
                (Mapping::Parent, run)
            }
            PayloadState::Unmapped if has_parent => (Mapping::Zero, run),
            PayloadState::NotPresent | PayloadState::Undefined | PayloadState::Unmapped => {
                (Mapping::Unallocated, run)
            }
            PayloadState::PartiallyPresent => match self.map_partial(block, within, run, fo)? {
                (m @ Mapping::Data(_), len) => (m, self.in_file(idx, fo, bs, within, len)?),
                other => other,
            },
        };
        Ok(Extent {
            offset,
            len,
            mapping,
        })
    }

    fn map_write(&self, offset: u64, len: u64) -> Result<WriteExtent> {
        self.start_session(true)?;
        let block = offset / self.block_size;
        let within = offset % self.block_size;
        let run = len.min(self.block_size - within);
        let (state, fo) = self.block_entry(block)?;
        let (state, fo) = match state {
            PayloadState::FullyPresent | PayloadState::PartiallyPresent => {
                self.whole_in_file(self.bat_geo.payload_index(block), fo, self.block_size)?;
                (state, fo)
            }
            PayloadState::NotPresent | PayloadState::Undefined if self.bat_geo.has_parent => {
                self.allocate_partial(block)?
            }
            _ => (PayloadState::FullyPresent, self.allocate(block)?),
        };
        let mut fill_partial_sectors = false;
        let mut token = 0;
        if state == PayloadState::PartiallyPresent {
            token = block + 1;
            // A sector not yet present holds undefined bytes in the file: if
            // this write covers it only partly, the shared write loop merges
            // it with the parent's bytes first.
            let ss = u64::from(self.geometry.logical_sector_size);
            let end = within + run;
            let head = !within.is_multiple_of(ss);
            let tail = !end.is_multiple_of(ss);
            if head || tail {
                let (m0, _) = self.map_partial(block, within - within % ss, ss, fo)?;
                let (m1, _) = self.map_partial(block, (end - 1) / ss * ss, ss, fo)?;
                fill_partial_sectors =
                    (head && m0 == Mapping::Parent) || (tail && m1 == Mapping::Parent);
            }
        }
        Ok(WriteExtent {
            offset,
            len: run,
            file_offset: FileOffset(fo + within),
            fill_partial_sectors,
            token,
        })
    }

    fn commit_write(&self, ext: &WriteExtent) -> Result<()> {
        if ext.token == 0 {
            return Ok(());
        }
        self.commit_partial(ext)
    }

    fn parent(&self) -> Option<&Arc<dyn VirtualDisk>> {
        self.parent.as_ref()
    }

    fn flush(&self) -> Result<()> {
        self.flush_inner()
    }

    fn close(&self) -> Result<()> {
        self.close_inner()
    }

    fn discard(&self, offset: u64, len: u64) -> Result<()> {
        self.discard_blocks(offset, len)
    }

    fn write_zeroes(&self, offset: u64, len: u64, unmap: bool) -> Result<()> {
        let size = self.geometry.virtual_size;
        let end = offset.saturating_add(len);
        let blocks = disk::whole_blocks(offset, len, self.block_size, size);
        if blocks.is_empty() || end > size {
            return disk::write_zero_bytes(self, offset, len);
        }
        let first = blocks.start * self.block_size;
        let past = (blocks.end * self.block_size).min(size);
        disk::write_zero_bytes(self, offset, first - offset)?;
        self.zero_blocks(blocks, unmap)?;
        disk::write_zero_bytes(self, past, end - past)
    }

    fn discard_granularity(&self) -> u64 {
        self.block_size
    }

    fn disk_id(&self) -> Option<Uuid> {
        Some(self.info.metadata.virtual_disk_id)
    }

    fn is_writable(&self) -> bool {
        self.writable
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
    fn write_read_reopen() {
        let (st, d) = mem_disk(64 * MIB, MIB as u32);
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
