//! An open VHDX image: open (with log replay), the block mapping, allocation,
//! flush through the log, discard, create and close.
//!
//! # Locks
//! Lock order: `flush_lock` → `header` → `bat` → `alloc_end`. Payload reads
//! and writes never hold a lock; metadata I/O (paging in a BAT page, the log
//! writes of a flush) holds only what the step needs.
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

use crate::bat::{BatEntry, BatGeometry, PayloadState};
use crate::bat_cache::{BatCache, ENTRIES_PER_PAGE, PAGE_BYTES};
use crate::file_identifier::FileIdentifier;
use crate::header::{self, Header};
use crate::log::{self, LogEntry, LogOp, LOG_SECTOR};
use crate::metadata::{FileParameters, Metadata, MetadataTable};
use crate::region_table::{RegionEntry, RegionTable, BAT_REGION, METADATA_REGION};
use crate::replay::{self, ReplayOverlay};
use crate::{Error, Result};
use disk::{
    Extent, FileOffset, FileStorage, Geometry, Mapping, ResultExt, Storage, VirtualDisk,
    WriteExtent,
};
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Mutex, MutexGuard, RwLock};
use uuid::Uuid;

const MIB: u64 = 1 << 20;
/// Largest metadata region we read whole (Windows writes 1 MiB).
const MAX_METADATA_REGION: u64 = 64 * MIB;
/// Largest log we read whole for replay.
const MAX_LOG: u64 = 256 * MIB;
/// Default cap of resident clean BAT pages (64 MiB of BAT).
pub const DEFAULT_BAT_CACHE_PAGES: usize = 16384;

/// How to open an image.
#[derive(Debug, Clone)]
pub struct OpenOptions {
    /// Open for writing (a dirty log is then replayed into the file).
    pub writable: bool,
    /// Cap on resident clean BAT pages (4 KiB each).
    pub bat_cache_pages: usize,
}

impl Default for OpenOptions {
    fn default() -> Self {
        OpenOptions {
            writable: false,
            bat_cache_pages: DEFAULT_BAT_CACHE_PAGES,
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
}

impl Info {
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
    bat: RwLock<BatCache>,
    alloc_end: Mutex<u64>,
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
        let storage = FileStorage::open(path.as_ref(), opts.writable)?;
        Self::open_storage(Box::new(storage), opts)
    }

    /// Open a VHDX on any storage.
    ///
    /// # Errors
    /// As [`Vhdx::open`].
    pub fn open_storage(storage: Box<dyn Storage>, opts: &OpenOptions) -> Result<Self> {
        let (vhdx, _) = Self::open_inner(storage, opts, false)?;
        Ok(vhdx)
    }

    /// Read an image's headers, regions and metadata without opening it for
    /// I/O: works for differencing disks whose parent is missing. A dirty log
    /// is replayed in memory only.
    ///
    /// # Errors
    /// Not a VHDX, or corrupt structures.
    pub fn inspect(path: impl AsRef<Path>) -> Result<Info> {
        let storage = FileStorage::open(path.as_ref(), false)?;
        let (_, info) = Self::open_inner(Box::new(storage), &OpenOptions::default(), true)?;
        Ok(info)
    }

    fn open_inner(
        storage: Box<dyn Storage>,
        opts: &OpenOptions,
        inspect_only: bool,
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
        };
        if metadata.file_parameters.has_parent && !inspect_only {
            return Err(missing_parent_error(&name, &metadata));
        }

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
        let alloc_end = cur_len.div_ceil(MIB) * MIB;
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
            bat: RwLock::new(BatCache::new(bat_geo.total_entries(), opts.bat_cache_pages)),
            alloc_end: Mutex::new(alloc_end),
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
        let storage = FileStorage::create(path.as_ref(), overwrite)?;
        Self::create_on(Box::new(storage), opts)
    }

    /// Create a new VHDX on empty storage.
    ///
    /// # Errors
    /// Invalid options, or I/O errors.
    pub fn create_on(storage: Box<dyn Storage>, opts: &CreateOptions) -> Result<Self> {
        validate_create(opts)?;
        let name = storage.name().to_string();
        let bat_geo = BatGeometry::new(
            opts.virtual_size,
            opts.block_size,
            opts.logical_sector_size,
            false,
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
                has_parent: false,
            },
            virtual_disk_size: opts.virtual_size,
            virtual_disk_id: Uuid::new_v4(),
            logical_sector_size: opts.logical_sector_size,
            physical_sector_size: opts.physical_sector_size,
            parent_locator: None,
        };
        let mbuf = metadata.build_region(meta_len as u32)?;
        storage.write_at(&mbuf, meta_offset)?;

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
        storage.flush()?;
        Self::open_storage(
            storage,
            &OpenOptions {
                writable: true,
                ..OpenOptions::default()
            },
        )
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
        // A sparse or short file reads as NOT_PRESENT past its end.
        if off < flen {
            let n = (flen - off).min(PAGE_BYTES as u64) as usize;
            self.storage.read_at(&mut bytes[..n], off)?;
        }
        let mut c = self.bat.write().unwrap_or_else(|e| e.into_inner());
        c.insert(p, &bytes);
        Ok(())
    }

    /// The payload state and file offset of `block`, validated.
    fn block_entry(&self, block: u64) -> Result<(PayloadState, u64)> {
        let idx = self.bat_geo.payload_index(block);
        let e = self.bat_entry(idx)?;
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

    /// Rewrite both headers for a write session (new FileWriteGuid,
    /// DataWriteGuid and LogGuid) before the first change after open.
    fn start_session(&self) -> Result<()> {
        if self.session_started.load(Ordering::Acquire) {
            return Ok(());
        }
        if !self.writable {
            return Err(Error::invalid("image is open read-only").in_file(self.name(), 0));
        }
        if self.closed.load(Ordering::Acquire) {
            return Err(Error::invalid("image is closed").in_file(self.name(), 0));
        }
        let mut hs = lock(&self.header);
        if self.session_started.load(Ordering::Acquire) {
            return Ok(());
        }
        let mut h = hs.current.clone();
        h.file_write_guid = Uuid::new_v4();
        h.data_write_guid = Uuid::new_v4();
        h.log_guid = Uuid::new_v4();
        hs.slot = write_header_pair(&*self.storage, &mut h, hs.slot)?;
        hs.session_log_guid = h.log_guid;
        hs.current = h;
        self.session_started.store(true, Ordering::Release);
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

    /// Scan the whole BAT (page by page, without keeping it resident).
    ///
    /// # Errors
    /// I/O errors or unknown block states.
    pub fn allocation_stats(&self) -> Result<AllocationStats> {
        let mut s = AllocationStats::default();
        let blocks = self.bat_geo.payload_blocks();
        for b in 0..blocks {
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
        let _f = lock(&self.flush_lock);
        let mut hs = lock(&self.header);
        let mut h = hs.current.clone();
        h.log_guid = Uuid::nil();
        hs.slot = write_header_pair(&*self.storage, &mut h, hs.slot)?;
        hs.current = h;
        Ok(())
    }

    fn flush_inner(&self) -> Result<()> {
        let _f = lock(&self.flush_lock);
        if !self.session_started.load(Ordering::Acquire) {
            return self.storage.flush();
        }
        // Snapshot (and pin) dirty pages first, then sync: every allocation
        // those pages point at has had its file extension done already.
        let (pages, last_file_offset) = {
            let mut c = self.bat.write().unwrap_or_else(|e| e.into_inner());
            let pages = c.take_dirty();
            (pages, *lock(&self.alloc_end))
        };
        let page_ids: Vec<usize> = pages.iter().map(|(p, _)| *p).collect();
        let result = self.log_and_apply(pages, last_file_offset);
        let mut c = self.bat.write().unwrap_or_else(|e| e.into_inner());
        if result.is_err() {
            c.redirty(page_ids);
        }
        c.unpin_all();
        result
    }

    fn log_and_apply(
        &self,
        pages: Vec<(usize, Box<[u8; PAGE_BYTES]>)>,
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
            .map(|(p, page)| LogOp::Data {
                file_offset: self.bat_offset + p as u64 * PAGE_BYTES as u64,
                page,
            })
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
    /// UNMAPPED and read as zeros. With LeaveBlocksAllocated the file space
    /// stays reserved for the block; otherwise it is simply no longer used.
    fn discard_blocks(&self, offset: u64, len: u64) -> Result<()> {
        let blocks = disk::whole_blocks(offset, len, self.block_size, self.geometry.virtual_size);
        if blocks.is_empty() {
            return Ok(());
        }
        self.start_session()?;
        let keep = self.info.metadata.file_parameters.leave_blocks_allocated;
        for b in blocks {
            let idx = self.bat_geo.payload_index(b);
            let (state, fo) = self.block_entry(b)?;
            if matches!(
                state,
                PayloadState::NotPresent | PayloadState::Unmapped | PayloadState::Undefined
            ) && !(keep && state == PayloadState::Unmapped)
            {
                continue;
            }
            let new = BatEntry::new(PayloadState::Unmapped as u8, if keep { fo } else { 0 });
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
fn write_header_pair(storage: &dyn Storage, h: &mut Header, current_slot: usize) -> Result<usize> {
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

/// The error for opening a differencing disk (chains are not implemented
/// yet): says whether its parent exists, naming every path tried.
fn missing_parent_error(name: &str, m: &Metadata) -> Error {
    let child_dir = Path::new(name).parent().unwrap_or(Path::new("."));
    let pl = m.parent_locator.as_ref();
    let linkage = pl.and_then(|pl| pl.get("parent_linkage")).unwrap_or("?");
    let mut tried = Vec::new();
    let mut found = None;
    for key in ["relative_path", "volume_path", "absolute_win32_path"] {
        let Some(v) = pl.and_then(|pl| pl.get(key)) else {
            continue;
        };
        // Windows paths: backslashes; a relative one is relative to the child.
        let unix = v.replace('\\', "/");
        let candidate = if key == "relative_path" {
            child_dir.join(unix.trim_start_matches("./"))
        } else {
            // "C:/dir/x.vhdx" or a volume path: try the file name beside the child.
            child_dir.join(unix.rsplit('/').next().unwrap_or(&unix))
        };
        tried.push(format!("{key}={v} (looked for {})", candidate.display()));
        if found.is_none() && candidate.is_file() {
            found = Some(candidate);
        }
    }
    let paths = if tried.is_empty() {
        "its parent locator names no path".to_string()
    } else {
        tried.join(", ")
    };
    match found {
        None => Error::invalid(format!(
            "differencing VHDX whose parent is missing: parent not found \
             (parent_linkage {linkage}; {paths})"
        ))
        .in_file(name, 0),
        Some(p) => Error::unsupported(format!(
            "differencing VHDX (parent {} found, parent_linkage {linkage}): \
             opening parent chains is not implemented yet",
            p.display()
        ))
        .in_file(name, 0),
    }
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
        let mapping = match state {
            PayloadState::FullyPresent => Mapping::Data(FileOffset(fo + within)),
            PayloadState::Zero => Mapping::Zero,
            PayloadState::NotPresent | PayloadState::Undefined | PayloadState::Unmapped => {
                Mapping::Unallocated
            }
            PayloadState::PartiallyPresent => {
                return Err(Error::unsupported(
                    "PARTIALLY_PRESENT blocks (differencing disks) are not implemented yet",
                )
                .in_file(self.name(), 0))
            }
        };
        Ok(Extent {
            offset,
            len: run,
            mapping,
        })
    }

    fn map_write(&self, offset: u64, len: u64) -> Result<WriteExtent> {
        self.start_session()?;
        let block = offset / self.block_size;
        let within = offset % self.block_size;
        let run = len.min(self.block_size - within);
        let (state, fo) = self.block_entry(block)?;
        let fo = match state {
            PayloadState::FullyPresent => fo,
            _ => self.allocate(block)?,
        };
        Ok(WriteExtent {
            offset,
            len: run,
            file_offset: FileOffset(fo + within),
            fill_partial_sectors: false,
            token: 0,
        })
    }

    fn flush(&self) -> Result<()> {
        self.flush_inner()
    }

    fn discard(&self, offset: u64, len: u64) -> Result<()> {
        self.discard_blocks(offset, len)
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
