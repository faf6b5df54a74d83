//! An open VHD image: open, create, the block mapping, allocation, flush and
//! close.
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
//! space leaks) or new (pointing at a durable block): either way the image
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

use crate::bat::{self, Bat, SECTOR, UNALLOCATED};
use crate::dynamic_header::{DynamicHeader, ParentLocator, HEADER_SIZE};
use crate::footer::{
    fourcc, ChsGeometry, DiskType, Footer, FEATURES_RESERVED, FIXED_DATA_OFFSET, FOOTER_SIZE,
    OLD_FOOTER_SIZE, VERSION,
};
use crate::{Error, Result};
use disk::parent::{self, ChainSearch, ParentPolicy};
use disk::{
    Extent, FileOffset, Geometry, LockMode, Mapping, Opener, ResultExt, Storage, VirtualDisk,
    WriteExtent,
};
use std::collections::{BTreeSet, HashMap};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use uuid::Uuid;

/// `Vhd::resize`: a child module, so that it reuses the driver's validating
/// open without widening its visibility.
#[path = "resize.rs"]
mod resize;

/// `Vhd::compact`: a child module, so that it works on the open image's BAT
/// and allocation state without widening their visibility.
#[path = "compact.rs"]
mod compact;

const MIB: u64 = 1 << 20;
/// The largest virtual size this library creates: 2040 GiB, the limit of
/// the format as Virtual PC, Virtual Server and Hyper-V implement it.
pub const MAX_VIRTUAL_SIZE: u64 = 2040 << 30;
/// Largest parent locator we read (real ones are a few hundred bytes).
const MAX_LOCATOR: u32 = 64 * 1024;
/// The deepest differencing chain opened (the child included).
pub const MAX_CHAIN: usize = disk::parent::DEFAULT_MAX_DEPTH;
/// BAT entries per 512-byte BAT sector.
const ENTRIES_PER_SECTOR: u64 = SECTOR / 4;

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
            block_size: 2 * MIB as u32,
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

struct Overlay {
    bits: Vec<u8>,
    dirty: bool,
}

struct DynState {
    bat: Bat,
    /// Per block: its bitmap is known to mark every sector present.
    full: Vec<bool>,
    /// Bitmaps changed in memory (bits set by writes), by block.
    overlay: HashMap<u64, Overlay>,
    /// BAT sectors (index = entry / 128) changed in memory.
    dirty_bat: BTreeSet<u64>,
    /// Offset of the trailing footer: where the next block goes.
    end: u64,
}

struct Dyn {
    table_offset: u64,
    block_size: u64,
    bitmap_size: u64,
    /// A truncated file (opened read-only): the end of the file, past
    /// which blocks have lost their bytes.
    data_limit: Option<u64>,
    state: Mutex<DynState>,
}

/// An open VHD image. `Send + Sync`; see the module docs for the write
/// protocol.
pub struct Vhd {
    storage: Box<dyn Storage>,
    writable: bool,
    read_only_reason: Option<String>,
    footer_bytes: [u8; FOOTER_SIZE],
    virtual_size: u64,
    dynamic: Option<Dyn>,
    /// A differencing disk's parent (None for other disks, and when only
    /// inspecting).
    parent: Option<Arc<dyn VirtualDisk>>,
    /// A differencing disk: sectors not present in this layer come from
    /// the parent, and new blocks start with an all-zero bitmap.
    differencing: bool,
    flush_lock: Mutex<()>,
    closed: AtomicBool,
    info: Info,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

fn read_vec(storage: &dyn Storage, offset: u64, len: u64) -> Result<Vec<u8>> {
    let n = usize::try_from(len).map_err(|_| Error::invalid("read too large"))?;
    let mut v = vec![0u8; n];
    storage.read_at(&mut v, offset)?;
    Ok(v)
}

fn overlaps(a: u64, a_len: u64, b: u64, b_len: u64) -> bool {
    a < b.saturating_add(b_len) && b < a.saturating_add(a_len)
}

/// Whether sectors `[0, n)` are all marked present.
fn all_set(bits: &[u8], n: u64) -> bool {
    let whole = usize::try_from(n / 8).unwrap_or(usize::MAX);
    match bits.get(..whole) {
        Some(b) if b.iter().all(|&x| x == 0xff) => (whole as u64 * 8..n).all(|i| bat::bit(bits, i)),
        _ => false,
    }
}

impl Vhd {
    /// Open the VHD file at `path`.
    ///
    /// A differencing disk's parent is found by its locators (see
    /// `parent_candidates`) and opened read-only, recursively (at
    /// most [`MAX_CHAIN`] images deep; loops are refused). The parent must
    /// be a VHD of the same virtual size whose footer unique id is the one
    /// the child records (unless [`OpenOptions::ignore_parent_id`]).
    ///
    /// # Errors
    /// The file cannot be opened, is not a VHD, or is corrupt; a
    /// differencing disk's parent is missing (the error names every path
    /// tried), is not its parent, or cannot be opened.
    pub fn open(path: impl AsRef<Path>, opts: &OpenOptions) -> Result<Self> {
        let path = path.as_ref();
        let mut chain = ChainSearch::new(&opts.parent_policy, path);
        chain.enter(&path.display().to_string(), path)?;
        Self::open_path(path, opts, &mut chain)
    }

    /// Open the VHD file at `path`, a differencing disk whose parent the
    /// caller has already opened (e.g. a chain assembled elsewhere). The
    /// parent's virtual size must match; its identity is the caller's
    /// responsibility (no unique id check).
    ///
    /// # Errors
    /// As [`Vhd::open`]; also when the image is not a differencing disk.
    pub fn open_with_parent(
        path: impl AsRef<Path>,
        opts: &OpenOptions,
        parent: Arc<dyn VirtualDisk>,
    ) -> Result<Self> {
        let storage = opts.opener.open(path.as_ref(), opts.writable, opts.lock)?;
        Self::open_inner(storage, opts, ParentSource::Given(parent))
    }

    /// [`Vhd::open_with_parent`] on any storage.
    ///
    /// # Errors
    /// As [`Vhd::open_with_parent`].
    pub fn open_storage_with_parent(
        storage: Box<dyn Storage>,
        opts: &OpenOptions,
        parent: Arc<dyn VirtualDisk>,
    ) -> Result<Self> {
        Self::open_inner(storage, opts, ParentSource::Given(parent))
    }

    /// Open a VHD on any storage. A differencing disk's parent is searched
    /// for relative to the storage's name, taken as a path.
    ///
    /// # Errors
    /// As [`Vhd::open`].
    pub fn open_storage(storage: Box<dyn Storage>, opts: &OpenOptions) -> Result<Self> {
        let child = PathBuf::from(storage.name());
        let mut chain = ChainSearch::new(&opts.parent_policy, &child);
        chain.enter(storage.name(), &child)?;
        Self::open_inner(
            storage,
            opts,
            ParentSource::Search {
                child,
                chain: &mut chain,
            },
        )
    }

    fn open_path(path: &Path, opts: &OpenOptions, chain: &mut ChainSearch) -> Result<Self> {
        let storage = opts.opener.open(path, opts.writable, opts.lock)?;
        Self::open_inner(
            storage,
            opts,
            ParentSource::Search {
                child: path.to_path_buf(),
                chain,
            },
        )
    }

    /// Read an image's footer, header and BAT without opening it for I/O:
    /// works for differencing disks too (the parent is not looked for).
    ///
    /// # Errors
    /// Not a VHD, or corrupt structures.
    pub fn inspect(path: impl AsRef<Path>) -> Result<Info> {
        Self::inspect_with(path, &OpenOptions::default())
    }

    /// [`Vhd::inspect`] (always read-only) with the lock mode and opener of
    /// `opts` (a shared claim by default; [`LockMode::ForceShare`] to read
    /// an image another process is writing).
    ///
    /// # Errors
    /// As [`Vhd::inspect`].
    pub fn inspect_with(path: impl AsRef<Path>, opts: &OpenOptions) -> Result<Info> {
        let storage = opts.opener.open(path.as_ref(), false, opts.lock)?;
        let v = Self::open_inner(storage, &OpenOptions::default(), ParentSource::Inspect)?;
        Ok(v.info.clone())
    }

    /// Find the footer: the last 512 bytes, else the last 511, else (dynamic
    /// disks) the copy at offset 0.
    fn find_footer(
        storage: &dyn Storage,
        file_len: u64,
    ) -> Result<(Footer, u64, FooterSource, Vec<String>)> {
        let name = storage.name();
        if file_len < OLD_FOOTER_SIZE as u64 {
            return Err(Error::corrupt(
                "VHD footer",
                0,
                format!("file is {file_len} bytes, too short to hold a VHD footer"),
            )
            .in_file(name, 0));
        }
        let tail_len = file_len.min(FOOTER_SIZE as u64);
        let tail_off = file_len - tail_len;
        let tail = read_vec(storage, tail_off, tail_len)?;
        let first_err = match Footer::parse(&tail) {
            Ok(f) if tail.len() == FOOTER_SIZE => {
                return Ok((f, tail_off, FooterSource::End, vec![]))
            }
            Ok(_) => None,
            Err(e) => Some(e.in_file(name, tail_off)),
        };
        if let Some(t511) = tail.get(tail.len().saturating_sub(OLD_FOOTER_SIZE)..) {
            if let Ok(f) = Footer::parse(t511) {
                return Ok((
                    f,
                    file_len - OLD_FOOTER_SIZE as u64,
                    FooterSource::End511,
                    vec![],
                ));
            }
        }
        let first_err = first_err.unwrap_or_else(|| {
            Error::corrupt("VHD footer", 0, "no valid footer at the end of the file")
                .in_file(name, tail_off)
        });
        if file_len >= 2 * FOOTER_SIZE as u64 {
            let head = read_vec(storage, 0, FOOTER_SIZE as u64)?;
            if let Ok(f) = Footer::parse(&head) {
                if f.disk_type != DiskType::Fixed {
                    let w = format!(
                        "the trailing footer is damaged ({first_err}); using the footer copy at \
                         offset 0, read-only"
                    );
                    return Ok((f, 0, FooterSource::CopyAtStart, vec![w]));
                }
            }
        }
        Err(first_err)
    }

    fn open_inner(
        storage: Box<dyn Storage>,
        opts: &OpenOptions,
        parent_source: ParentSource<'_>,
    ) -> Result<Self> {
        let name = storage.name().to_string();
        let file_len = storage.len()?;
        let (footer, footer_offset, source, mut warnings) = Self::find_footer(&*storage, file_len)?;
        let mut writable = opts.writable && storage.is_writable();
        let mut read_only_reason = None;
        if source == FooterSource::CopyAtStart {
            writable = false;
            read_only_reason = warnings.first().cloned();
        }
        let virtual_size = footer.disk_size();
        // Where the payload area ends (the trailing footer, or the file end).
        let end = if source == FooterSource::CopyAtStart {
            file_len
        } else {
            footer_offset
        };
        let mut info = Info {
            footer: footer.clone(),
            footer_offset,
            footer_source: source,
            header: None,
            virtual_size,
            file_size: file_len,
            allocated_blocks: 0,
            truncated_blocks: 0,
            parent_locators: Vec::new(),
            parent_file: None,
            warnings: Vec::new(),
        };
        let mut footer_bytes = [0u8; FOOTER_SIZE];
        footer.clone().write_to(&mut footer_bytes);

        let mut parent: Option<Arc<dyn VirtualDisk>> = None;
        let differencing = footer.disk_type == DiskType::Differencing;
        let dynamic = match footer.disk_type {
            DiskType::Fixed => {
                if let ParentSource::Given(p) = parent_source {
                    return Err(not_differencing(&name, p.as_ref()));
                }
                if virtual_size > end {
                    return Err(Error::corrupt(
                        "VHD footer",
                        48,
                        format!(
                            "disk size {virtual_size} exceeds the {end} bytes of data before the footer"
                        ),
                    )
                    .in_file(&name, footer_offset));
                }
                None
            }
            DiskType::Dynamic | DiskType::Differencing => {
                let hdr_off = footer.data_offset;
                if hdr_off >= FOOTER_SIZE as u64 && hdr_off < end {
                    if let Some(e) = truncated_header_error(&*storage, hdr_off, end, file_len)? {
                        return Err(e);
                    }
                }
                if hdr_off < FOOTER_SIZE as u64
                    || hdr_off
                        .checked_add(HEADER_SIZE as u64)
                        .is_none_or(|e| e > end)
                {
                    return Err(Error::corrupt(
                        "VHD footer",
                        16,
                        format!(
                            "data offset {hdr_off:#x}: the dynamic disk header would lie outside \
                             the file's {end:#x} bytes before the footer"
                        ),
                    )
                    .in_file(&name, footer_offset));
                }
                let hbuf = read_vec(&*storage, hdr_off, HEADER_SIZE as u64)?;
                let header = DynamicHeader::parse(&hbuf).in_file(&name, hdr_off)?;
                info.header = Some(header.clone());
                let hcorrupt = |field_off: u64, msg: String| {
                    Error::corrupt("VHD dynamic disk header", field_off, msg)
                        .in_file(&name, hdr_off)
                };
                let bs = u64::from(header.block_size);
                let needed = virtual_size.div_ceil(bs);
                let entries = u64::from(header.max_table_entries);
                if entries < needed {
                    return Err(hcorrupt(
                        28,
                        format!(
                            "max table entries {entries} is too small: a {virtual_size}-byte disk \
                             with {bs}-byte blocks needs {needed}"
                        ),
                    ));
                }
                let table_off = header.table_offset;
                let table_bytes = entries * 4;
                if table_off < FOOTER_SIZE as u64
                    || table_off.checked_add(table_bytes).is_none_or(|e| e > end)
                {
                    return Err(hcorrupt(
                        28,
                        format!(
                            "max table entries {entries:#x} ({table_bytes} bytes of BAT at table \
                             offset {table_off:#x}) does not fit in the file ({file_len} bytes)"
                        ),
                    ));
                }
                let plausible = needed.max((2u64 << 40) / bs).saturating_mul(2);
                if entries > plausible {
                    return Err(hcorrupt(
                        28,
                        format!(
                            "max table entries {entries:#x} is far beyond the {needed} blocks a \
                             {virtual_size}-byte disk needs"
                        ),
                    ));
                }
                if overlaps(table_off, table_bytes, hdr_off, HEADER_SIZE as u64) {
                    return Err(hcorrupt(
                        16,
                        format!("the BAT at {table_off:#x} overlaps the dynamic disk header"),
                    ));
                }
                // Only the entries the disk uses are kept (bounded by the file).
                let tbuf = read_vec(&*storage, table_off, needed * 4)?;
                let batv = Bat::parse(&tbuf).in_file(&name, table_off)?;
                let bm = bat::bitmap_size(header.block_size);
                let mut allocated = 0u64;
                let mut truncated = 0u64;
                let mut max_end = table_off + table_bytes;
                for (i, &e) in batv.entries.iter().enumerate() {
                    if e == UNALLOCATED {
                        continue;
                    }
                    allocated += 1;
                    let start = u64::from(e) * SECTOR;
                    let len = bm + bs;
                    let bad = if start < FOOTER_SIZE as u64 {
                        Some("overlaps the footer copy at offset 0".to_string())
                    } else if source == FooterSource::CopyAtStart
                        && start.checked_add(len).is_some_and(|x| x > end)
                        && !overlaps(start, len, hdr_off, HEADER_SIZE as u64)
                        && !overlaps(start, len, table_off, table_bytes)
                    {
                        // The file ends without its footer and this block
                        // runs past the end: the file was truncated. Opened
                        // read-only (no footer); reading its lost part fails.
                        truncated += 1;
                        None
                    } else if start.checked_add(len).is_none_or(|x| x > end) {
                        Some(format!(
                            "extends past the end of the data area ({end:#x}, where the footer is)"
                        ))
                    } else if overlaps(start, len, hdr_off, HEADER_SIZE as u64) {
                        Some("overlaps the dynamic disk header".to_string())
                    } else if overlaps(start, len, table_off, table_bytes) {
                        Some("overlaps the BAT".to_string())
                    } else {
                        None
                    };
                    if let Some(why) = bad {
                        return Err(Error::corrupt(
                            "VHD BAT",
                            table_off + i as u64 * 4,
                            format!("block {i} at sector {e:#x} (offset {start:#x}) {why}"),
                        )
                        .in_file(&name, 0));
                    }
                    max_end = max_end.max(start + len);
                }
                info.allocated_blocks = allocated;
                info.truncated_blocks = truncated;
                if footer.disk_type == DiskType::Differencing {
                    info.parent_locators = read_locators(&*storage, &header, file_len);
                    parent = match parent_source {
                        ParentSource::Inspect => None,
                        ParentSource::Given(p) => Some(p),
                        ParentSource::Search { child, chain } => Some(find_parent(
                            &name,
                            &child,
                            hdr_off,
                            &header,
                            &info.parent_locators,
                            opts,
                            chain,
                        )?),
                    };
                    if let Some(p) = &parent {
                        check_parent_size(&name, p.as_ref(), virtual_size)?;
                        info.parent_file = Some(p.storage().name().to_string());
                    }
                } else if let ParentSource::Given(p) = parent_source {
                    return Err(not_differencing(&name, p.as_ref()));
                }
                let nblocks = batv.len();
                Some(Dyn {
                    table_offset: table_off,
                    block_size: bs,
                    bitmap_size: bm,
                    data_limit: (truncated > 0).then_some(end),
                    state: Mutex::new(DynState {
                        bat: batv,
                        full: vec![false; nblocks],
                        overlay: HashMap::new(),
                        dirty_bat: BTreeSet::new(),
                        end: end.div_ceil(SECTOR).max(max_end.div_ceil(SECTOR)) * SECTOR,
                    }),
                })
            }
        };
        warnings.append(&mut info.warnings);
        info.warnings = warnings;
        Ok(Vhd {
            storage,
            writable,
            read_only_reason,
            footer_bytes,
            virtual_size,
            dynamic,
            parent,
            differencing,
            flush_lock: Mutex::new(()),
            closed: AtomicBool::new(false),
            info,
        })
    }

    /// Create a new VHD file at `path` (failing if it exists unless
    /// `overwrite`).
    ///
    /// # Errors
    /// Invalid options (size 0 or above 2040 GiB, bad block size, an Azure
    /// size that is not a whole number of MiB), or I/O errors.
    pub fn create(path: impl AsRef<Path>, opts: &CreateOptions, overwrite: bool) -> Result<Self> {
        validate_create(opts).map_err(|e| e.in_file(&path.as_ref().display().to_string(), 0))?;
        let storage = opts.opener.create(path.as_ref(), overwrite)?;
        Self::create_on(storage, opts)
    }

    /// Create a new VHD on empty storage; the image is open read-write.
    ///
    /// # Errors
    /// As [`Vhd::create`].
    pub fn create_on(storage: Box<dyn Storage>, opts: &CreateOptions) -> Result<Self> {
        let name = storage.name().to_string();
        validate_create(opts).in_file(&name, 0)?;
        let (size, geometry) = if opts.azure {
            (
                opts.virtual_size,
                ChsGeometry::from_sectors(opts.virtual_size / SECTOR),
            )
        } else {
            ChsGeometry::round_up(opts.virtual_size)
        };
        let mut footer = Footer {
            features: FEATURES_RESERVED,
            version: VERSION,
            data_offset: if opts.fixed {
                FIXED_DATA_OFFSET
            } else {
                FOOTER_SIZE as u64
            },
            timestamp: Footer::now_timestamp(),
            creator_application: *b"vdsk",
            creator_version: creator_version(),
            creator_host_os: *b"Wi2k",
            original_size: size,
            current_size: size,
            geometry,
            disk_type: if opts.fixed {
                DiskType::Fixed
            } else {
                DiskType::Dynamic
            },
            checksum: 0,
            unique_id: Uuid::new_v4(),
            saved_state: 0,
        };
        let mut fbuf = [0u8; FOOTER_SIZE];
        footer.write_to(&mut fbuf);
        storage.set_len(0)?;
        if opts.fixed {
            storage.set_len(size)?;
            storage.write_at(&fbuf, size)?;
        } else {
            let table_offset = 3 * SECTOR;
            let entries = size.div_ceil(u64::from(opts.block_size));
            let entries32 = u32::try_from(entries)
                .map_err(|_| Error::invalid("too many blocks for a VHD BAT").in_file(&name, 0))?;
            let mut header = DynamicHeader::new(table_offset, entries32, opts.block_size);
            let mut hbuf = [0u8; HEADER_SIZE];
            header.write_to(&mut hbuf);
            storage.write_at(&fbuf, 0)?;
            storage.write_at(&hbuf, FOOTER_SIZE as u64)?;
            let table_len = (entries * 4).div_ceil(SECTOR) * SECTOR;
            disk::fill_range(&*storage, table_offset, table_len, 0xff)?;
            storage.write_at(&fbuf, table_offset + table_len)?;
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

    /// Create a differencing VHD at `path` (failing if it exists unless
    /// `overwrite`) whose parent is the VHD at `parent_path`: same virtual
    /// size (`opts.virtual_size` may be 0, the parent's size, or a size the
    /// parent's rounds up from), `opts.block_size` blocks, no sector present
    /// (everything reads from the parent). The parent is opened read-only
    /// and never written. The locators record the parent's path relative to
    /// the child's directory (`W2ru`) and its absolute path (`W2ku`); see
    /// [`ParentLink`].
    ///
    /// # Errors
    /// The parent cannot be opened; `opts` asks for a fixed or Azure disk,
    /// a bad block size or another size; the child is the parent; I/O errors.
    pub fn create_differencing(
        path: impl AsRef<Path>,
        parent_path: impl AsRef<Path>,
        opts: &CreateOptions,
        overwrite: bool,
    ) -> Result<Self> {
        let path = path.as_ref();
        let name = path.display().to_string();
        let parent_abs = differencing_parent_path(path, parent_path.as_ref())?;
        let parent = Vhd::open(&parent_abs, &OpenOptions::default())?;
        validate_differencing(opts, parent.virtual_size()).in_file(&name, 0)?;
        // The specification's Parent Time Stamp is "the modification time
        // stamp of the parent hard disk": the parent file's mtime, as Virtual
        // PC writes it (Windows' diskpart wrote 0 in the corpus image
        // dfvfs-fat-differential-orphan.vhd, and neither it nor QEMU checks
        // the field; nor do we, at open).
        let link = parent_link_for(path, &parent_abs)?;
        let storage = opts.opener.create(path, overwrite)?;
        Self::create_differencing_on(storage, parent, &link, opts)
    }

    /// Create a differencing VHD on empty storage, over the already open
    /// `parent` (kept as the new disk's parent), with locators from `link`.
    /// The image is open read-write.
    ///
    /// # Errors
    /// As [`Vhd::create_differencing`].
    pub fn create_differencing_on(
        storage: Box<dyn Storage>,
        parent: Vhd,
        link: &ParentLink,
        opts: &CreateOptions,
    ) -> Result<Self> {
        write_differencing(&*storage, &parent.info.footer, link, opts, BatFill::Write)?;
        let opts = OpenOptions {
            writable: true,
            ..OpenOptions::default()
        };
        Self::open_inner(storage, &opts, ParentSource::Given(Arc::new(parent)))
    }

    /// Create a differencing VHD at `path` over the VHD at `parent_path`,
    /// like [`Vhd::create_differencing`], without opening either for I/O:
    /// only the parent's footer is read (its size, geometry and unique id),
    /// so the parent's own chain is neither searched nor read and the cost
    /// does not grow with the chain. What remains proportional to the disk
    /// size is the child's BAT (4 bytes per block, all "not present"), which
    /// the VHD format requires to be written out.
    ///
    /// # Errors
    /// The parent cannot be read or has no valid footer; as
    /// [`Vhd::create_differencing`] otherwise.
    pub fn create_differencing_file(
        path: impl AsRef<Path>,
        parent_path: impl AsRef<Path>,
        opts: &CreateOptions,
        overwrite: bool,
    ) -> Result<()> {
        let path = path.as_ref();
        let (pfooter, link) = Self::differencing_parent(path, parent_path.as_ref(), opts)?;
        let storage = opts.opener.create(path, overwrite)?;
        write_differencing(&*storage, &pfooter, &link, opts, BatFill::Write)
    }

    /// [`Vhd::create_differencing_file`] in O(1): `path` is a blank
    /// differencing VHD made earlier by `create_differencing_file` (over
    /// any parent of the same size, with the same options) and never
    /// written since: a spare. Its BAT, which already says "not present"
    /// everywhere, is kept; the footer, header, locators and footer copy
    /// are rewritten for `parent_path` (its unique id, size, geometry,
    /// name, paths and modification time), and the file is synced. The
    /// result is byte for byte what `create_differencing_file` writes.
    ///
    /// Returns `Ok(false)`, leaving the file untouched, when it is not such
    /// a spare for this parent (another size or block size, a BAT entry in
    /// use, not a differencing VHD): the caller then creates the child with
    /// `create_differencing_file`.
    ///
    /// # Errors
    /// The parent cannot be read or has no valid footer; I/O errors.
    pub fn create_differencing_from_spare(
        path: impl AsRef<Path>,
        parent_path: impl AsRef<Path>,
        opts: &CreateOptions,
    ) -> Result<bool> {
        let path = path.as_ref();
        let (pfooter, link) = Self::differencing_parent(path, parent_path.as_ref(), opts)?;
        let storage = opts.opener.open(path, true, LockMode::Auto)?;
        if !is_blank_spare(&*storage, pfooter.disk_size(), opts)? {
            return Ok(false);
        }
        write_differencing(&*storage, &pfooter, &link, opts, BatFill::Keep)?;
        Ok(true)
    }

    /// For a child at `path` of the VHD at `parent_path`: the parent's
    /// footer (read alone) and the link to record, after checking `opts`
    /// against the parent's size.
    fn differencing_parent(
        path: &Path,
        parent_path: &Path,
        opts: &CreateOptions,
    ) -> Result<(Footer, ParentLink)> {
        let parent_abs = differencing_parent_path(path, parent_path)?;
        let pstorage = opts.opener.open(&parent_abs, false, LockMode::Auto)?;
        let (pfooter, ..) = Self::find_footer(&*pstorage, pstorage.len()?)?;
        validate_differencing(opts, pfooter.disk_size()).in_file(&path.display().to_string(), 0)?;
        let link = parent_link_for(path, &parent_abs)?;
        Ok((pfooter, link))
    }

    /// Footer, header and layout as read at open.
    pub fn info(&self) -> &Info {
        &self.info
    }

    /// The block size of a dynamic disk.
    pub fn block_size(&self) -> Option<u64> {
        self.dynamic.as_ref().map(|d| d.block_size)
    }

    fn name(&self) -> &str {
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

    fn close_inner(&self) -> Result<()> {
        if self.closed.load(Ordering::Acquire) {
            return Ok(());
        }
        let r = if self.writable {
            self.flush_inner()
        } else {
            Ok(())
        };
        self.closed.store(true, Ordering::Release);
        r
    }

    fn check_writable(&self) -> Result<()> {
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

    /// Sectors of `block` that lie inside the virtual disk.
    fn block_sectors(&self, d: &Dyn, block: u64) -> u64 {
        let start = block * d.block_size;
        (self.virtual_size - start)
            .min(d.block_size)
            .div_ceil(SECTOR)
    }

    fn read_bitmap(&self, d: &Dyn, block_off: u64) -> Result<Vec<u8>> {
        read_vec(&*self.storage, block_off, d.bitmap_size)
    }

    /// The mapping of a sector not present in this layer.
    fn absent(&self) -> Mapping {
        if self.differencing {
            Mapping::Parent
        } else {
            Mapping::Unallocated
        }
    }

    /// The in-memory copy of `block`'s sector bitmap, read from the file
    /// the first time. Called with the state lock held.
    fn overlay<'a>(
        &self,
        d: &Dyn,
        st: &'a mut DynState,
        block: u64,
        block_off: u64,
    ) -> Result<&'a mut Overlay> {
        Ok(match st.overlay.entry(block) {
            std::collections::hash_map::Entry::Occupied(o) => o.into_mut(),
            std::collections::hash_map::Entry::Vacant(v) => {
                let bits = self.read_bitmap(d, block_off)?;
                v.insert(Overlay { bits, dirty: false })
            }
        })
    }

    /// In a truncated file, how many of the `run` bytes from `within` of
    /// `block` (at `block_off`) lie inside the file: all, the ones before
    /// its end, or none (or its sector bitmap is lost), which is an error
    /// naming the block, its virtual range and file range.
    fn in_file(&self, d: &Dyn, block: u64, block_off: u64, within: u64, run: u64) -> Result<u64> {
        let Some(limit) = d.data_limit else {
            return Ok(run);
        };
        let data = block_off + d.bitmap_size + within;
        if data + run <= limit {
            return Ok(run);
        }
        if data < limit && block_off + d.bitmap_size <= limit {
            return Ok(limit - data);
        }
        let slot = d.bitmap_size + d.block_size;
        let vs = block * d.block_size;
        let ve = (vs + d.block_size).min(self.virtual_size);
        let lost = if block_off + d.bitmap_size > limit {
            vs
        } else {
            (vs + (limit - block_off - d.bitmap_size)).min(ve)
        };
        Err(Error::corrupt(
            "VHD block",
            block_off,
            format!(
                "block {block} (virtual {vs:#x}..{ve:#x}) at file offset {block_off:#x}+{slot:#x} \
                 (sector bitmap and data) runs past the end of the file ({limit:#x} bytes): the \
                 image is truncated, virtual {lost:#x}..{ve:#x} is lost"
            ),
        )
        .in_file(self.name(), 0))
    }

    fn map_dynamic(&self, d: &Dyn, offset: u64, run: u64) -> Result<Extent> {
        let block = offset / d.block_size;
        let within = offset % d.block_size;
        let (block_off, full, overlay) = {
            let st = lock(&d.state);
            let Some(off) = st.bat.block_offset(block) else {
                return Ok(Extent {
                    offset,
                    len: run,
                    mapping: self.absent(),
                });
            };
            let full = st.full.get(block as usize).copied().unwrap_or(false);
            let ov = if full {
                None
            } else {
                st.overlay.get(&block).map(|o| o.bits.clone())
            };
            (off, full, ov)
        };
        let data = block_off + d.bitmap_size;
        let run = self.in_file(d, block, block_off, within, run)?;
        if full {
            return Ok(Extent {
                offset,
                len: run,
                mapping: Mapping::Data(FileOffset(data + within)),
            });
        }
        let bits = match overlay {
            Some(b) => b,
            None => {
                let b = self.read_bitmap(d, block_off)?;
                if all_set(&b, self.block_sectors(d, block)) {
                    let mut st = lock(&d.state);
                    if st.bat.block_offset(block) == Some(block_off) {
                        if let Some(f) = st.full.get_mut(block as usize) {
                            *f = true;
                        }
                    }
                }
                b
            }
        };
        let end = within + run;
        let s0 = within / SECTOR;
        let last = (end - 1) / SECTOR;
        let present = bat::bit(&bits, s0);
        let mut s = s0 + 1;
        while s <= last && bat::bit(&bits, s) == present {
            s += 1;
        }
        let len = end.min(s * SECTOR) - within;
        Ok(Extent {
            offset,
            len,
            mapping: if present {
                Mapping::Data(FileOffset(data + within))
            } else {
                self.absent()
            },
        })
    }

    /// Allocate `block` at the end of the file (see the module docs) and
    /// return its file offset. Called with the state lock held.
    fn allocate(&self, d: &Dyn, st: &mut DynState, block: u64) -> Result<u64> {
        let at = st.end;
        let new_end = at
            .checked_add(d.bitmap_size + d.block_size)
            .filter(|e| e / SECTOR < u64::from(UNALLOCATED))
            .ok_or_else(|| {
                Error::invalid("the file would exceed the VHD maximum").in_file(self.name(), 0)
            })?;
        let sector = u32::try_from(at / SECTOR)
            .ok()
            .filter(|&s| s != UNALLOCATED)
            .ok_or_else(|| {
                Error::invalid("the file would exceed the VHD maximum").in_file(self.name(), 0)
            })?;
        // 1. The new footer at the new end; 2. sync (see the module docs).
        self.storage.write_at(&self.footer_bytes, new_end)?;
        self.storage.flush()?;
        // 3. The bitmap (over the old footer): every sector present, or for
        // a differencing disk none (they come from the parent until written).
        let fill = if self.differencing { 0 } else { 0xff };
        let bits = vec![fill; d.bitmap_size as usize];
        self.storage.write_at(&bits, at)?;
        // 4. The BAT entry, in memory until the next flush.
        let idx = usize::try_from(block).map_err(|_| Error::invalid("block out of range"))?;
        if let Some(e) = st.bat.entries.get_mut(idx) {
            *e = sector;
        }
        if let Some(f) = st.full.get_mut(idx) {
            *f = !self.differencing;
        }
        if self.differencing {
            st.overlay.insert(block, Overlay { bits, dirty: false });
        } else {
            st.overlay.remove(&block);
        }
        st.dirty_bat.insert(block / ENTRIES_PER_SECTOR);
        st.end = new_end;
        Ok(at)
    }

    fn map_write_dynamic(&self, d: &Dyn, offset: u64, run: u64) -> Result<WriteExtent> {
        let block = offset / d.block_size;
        let within = offset % d.block_size;
        let mut st = lock(&d.state);
        let (block_off, full) = match st.bat.block_offset(block) {
            Some(o) => (o, st.full.get(block as usize).copied().unwrap_or(false)),
            None => (self.allocate(d, &mut st, block)?, !self.differencing),
        };
        let end = within + run;
        let head_partial = !within.is_multiple_of(SECTOR);
        let tail_partial = !end.is_multiple_of(SECTOR);
        // A sector not yet present holds undefined bytes in the file: if
        // this write covers it only partly, the shared write loop merges it
        // with its current contents (zeros, or the parent's bytes) first.
        let fill_partial_sectors = !full && (head_partial || tail_partial) && {
            let bits = &self.overlay(d, &mut st, block, block_off)?.bits;
            (head_partial && !bat::bit(bits, within / SECTOR))
                || (tail_partial && !bat::bit(bits, (end - 1) / SECTOR))
        };
        Ok(WriteExtent {
            offset,
            len: run,
            file_offset: FileOffset(block_off + d.bitmap_size + within),
            fill_partial_sectors,
            token: if full { 0 } else { block + 1 },
        })
    }

    fn commit_dynamic(&self, d: &Dyn, ext: &WriteExtent) -> Result<()> {
        if ext.token == 0 {
            return Ok(());
        }
        let block = ext.token - 1;
        let within = ext.offset % d.block_size;
        let first = within / SECTOR;
        let end = (within + ext.len).div_ceil(SECTOR);
        let mut st = lock(&d.state);
        if st.full.get(block as usize).copied().unwrap_or(true) {
            return Ok(());
        }
        let Some(block_off) = st.bat.block_offset(block) else {
            return Ok(());
        };
        let n = self.block_sectors(d, block);
        let o = self.overlay(d, &mut st, block, block_off)?;
        // In memory only: the flush writes the bitmap once the data it
        // covers is durable (see the module docs).
        bat::set_bits(&mut o.bits, first, end);
        o.dirty = true;
        let now_full = all_set(&o.bits, n);
        if now_full {
            if let Some(f) = st.full.get_mut(block as usize) {
                *f = true;
            }
        }
        Ok(())
    }

    /// Deallocate the whole blocks of a dynamic (not differencing) disk
    /// inside `[offset, offset+len)`: their BAT entries become unallocated
    /// in memory, and reach the disk at the next flush like any BAT change.
    /// They then read as zeros. The file space is not reused (a later write
    /// allocates at the end), so a crash at any point leaves each block
    /// either as it was or unallocated. Fixed and differencing disks ignore
    /// discard: a fixed disk cannot deallocate, and unallocating a child's
    /// block would expose the parent's older contents.
    fn discard_blocks(&self, offset: u64, len: u64) -> Result<()> {
        self.check_writable()?;
        let Some(d) = &self.dynamic else {
            return Ok(());
        };
        if self.parent.is_some() {
            return Ok(());
        }
        let blocks = disk::whole_blocks(offset, len, d.block_size, self.geometry().virtual_size);
        let mut st = lock(&d.state);
        for b in blocks {
            let Ok(idx) = usize::try_from(b) else { break };
            let Some(e) = st.bat.entries.get_mut(idx) else {
                break;
            };
            if *e == UNALLOCATED {
                continue;
            }
            *e = UNALLOCATED;
            if let Some(f) = st.full.get_mut(idx) {
                *f = false;
            }
            st.overlay.remove(&b);
            st.dirty_bat.insert(b / ENTRIES_PER_SECTOR);
        }
        Ok(())
    }

    fn flush_inner(&self) -> Result<()> {
        let _f = lock(&self.flush_lock);
        let Some(d) = &self.dynamic else {
            return self.storage.flush();
        };
        // Snapshot what this flush will write.
        let (sectors, bitmaps) = {
            let mut st = lock(&d.state);
            let ids: Vec<u64> = std::mem::take(&mut st.dirty_bat).into_iter().collect();
            let mut sectors = Vec::with_capacity(ids.len());
            for s in ids {
                let first = s * ENTRIES_PER_SECTOR;
                let n = (st.bat.len() as u64 - first).min(ENTRIES_PER_SECTOR);
                let mut buf = vec![0u8; (n * 4) as usize];
                st.bat.write_to(first as usize, &mut buf);
                sectors.push((s, buf));
            }
            let mut bitmaps = Vec::new();
            let st = &mut *st;
            for (b, o) in st.overlay.iter_mut().filter(|(_, o)| o.dirty) {
                o.dirty = false;
                if let Some(off) = st.bat.block_offset(*b) {
                    bitmaps.push((*b, off, o.bits.clone()));
                }
            }
            (sectors, bitmaps)
        };
        let result = (|| {
            // Everything the snapshot points at is durable first.
            self.storage.flush()?;
            if sectors.is_empty() && bitmaps.is_empty() {
                return Ok(());
            }
            for (_, off, bits) in &bitmaps {
                self.storage.write_at(bits, *off)?;
            }
            for (s, buf) in &sectors {
                self.storage.write_at(buf, d.table_offset + s * SECTOR)?;
            }
            self.storage.flush()
        })();
        let mut st = lock(&d.state);
        if result.is_err() {
            st.dirty_bat.extend(sectors.iter().map(|(s, _)| *s));
            for (b, _, _) in &bitmaps {
                if let Some(o) = st.overlay.get_mut(b) {
                    o.dirty = true;
                }
            }
        } else {
            st.overlay.retain(|_, o| o.dirty);
        }
        result
    }
}

/// When the dynamic disk header at `hdr_off` is cut short by the end of the
/// data area, the error to report: its table size if that cannot fit the
/// file either (the more telling field), else the truncation itself.
fn truncated_header_error(
    storage: &dyn Storage,
    hdr_off: u64,
    end: u64,
    file_len: u64,
) -> Result<Option<Error>> {
    let avail = end - hdr_off;
    if avail >= HEADER_SIZE as u64 {
        return Ok(None);
    }
    let name = storage.name();
    let buf = read_vec(storage, hdr_off, avail)?;
    let note = format!("the header itself is truncated ({avail} of 1024 bytes before the end)");
    if buf.len() >= 32 {
        let table_off = crate::footer::be64(&buf, 16);
        let entries = u64::from(crate::footer::be32(&buf, 28));
        if table_off.checked_add(entries * 4).is_none_or(|e| e > end) {
            return Ok(Some(
                Error::corrupt(
                    "VHD dynamic disk header",
                    28,
                    format!(
                        "max table entries {entries:#x} ({} bytes of BAT at table offset \
                         {table_off:#x}) does not fit in the file ({file_len} bytes); {note}",
                        entries * 4
                    ),
                )
                .in_file(name, hdr_off),
            ));
        }
    }
    Ok(Some(
        Error::corrupt("VHD dynamic disk header", 0, note).in_file(name, hdr_off),
    ))
}

/// Read and decode the parent locators of a differencing disk (bounded;
/// undecodable or out-of-file entries are skipped).
pub(crate) fn read_locators(
    storage: &dyn Storage,
    h: &DynamicHeader,
    file_len: u64,
) -> Vec<(String, String)> {
    let mut out = Vec::new();
    for (_, l) in h.locators() {
        if l.data_length == 0 || l.data_length > MAX_LOCATOR {
            continue;
        }
        let len = u64::from(l.data_length);
        if l.data_offset.checked_add(len).is_none_or(|e| e > file_len) {
            continue;
        }
        let Ok(data) = read_vec(storage, l.data_offset, len) else {
            continue;
        };
        if let Some(p) = l.decode_path(&data) {
            out.push((fourcc(&l.platform_code), p));
        }
    }
    out
}

/// How `open_inner` gets a differencing disk's parent.
enum ParentSource<'a> {
    /// Not at all: only inspecting.
    Inspect,
    /// Given by the caller.
    Given(Arc<dyn VirtualDisk>),
    /// Searched for by the locators, relative to `child`; `chain` holds the
    /// canonical paths of the images already open in this chain.
    Search {
        child: PathBuf,
        chain: &'a mut ChainSearch,
    },
}

/// Where a differencing disk's parent may be, best first: the `W2ru`
/// locators (relative to the child's directory), the `W2ku` locators
/// (absolute; a Windows path such as `C:\dir\p.vhd` cannot exist here and
/// is skipped), the parent's Unicode name (its file name only) in the
/// child's directory, then the deprecated `Wi2r` and `Wi2k` locators and
/// `MacX` file URLs. Each with a label for messages; `None` when the
/// locator cannot name a file on this system.
pub(crate) fn parent_candidates(
    child: &Path,
    h: &DynamicHeader,
    locators: &[(String, String)],
) -> Vec<(String, Option<PathBuf>)> {
    let dir = parent::dir_of(child);
    let relative = |p: &str| parent::relative_candidate(dir, p);
    let absolute = |p: &str| parent::absolute_candidate(dir, p);
    let by_code = |code: &str, f: &dyn Fn(&str) -> Option<PathBuf>| {
        locators
            .iter()
            .filter(|(c, _)| c == code)
            .map(|(c, p)| (format!("{c}={p}"), f(p)))
            .collect::<Vec<_>>()
    };
    let mut out = by_code("W2ru", &relative);
    out.extend(by_code("W2ku", &absolute));
    let pname = h.parent_name();
    if let Some(file) = parent::file_name_of(&pname) {
        out.push((format!("parent name \"{pname}\""), Some(dir.join(file))));
    }
    out.extend(by_code("Wi2r", &relative));
    out.extend(by_code("Wi2k", &absolute));
    out.extend(by_code("MacX", &absolute));
    out
}

/// Find, open (read-only, recursively) and check a differencing disk's
/// parent: the first candidate (see [`parent_candidates`]) that exists, is
/// permitted, and has the unique id the header expects. A candidate with
/// another id is not this disk's parent and the search goes on: a relink
/// interrupted by a power cut can leave the old header (old id and name)
/// with locator data already naming the new parent, and the old parent is
/// then still found by its name (the relink is only done when both parents
/// read the same for this child, so either one is right). When no candidate
/// has the id, the error names the first one that was found.
fn find_parent(
    name: &str,
    child: &Path,
    hdr_off: u64,
    h: &DynamicHeader,
    locators: &[(String, String)],
    opts: &OpenOptions,
    chain: &mut ChainSearch,
) -> Result<Arc<dyn VirtualDisk>> {
    let mut all = parent::Resolution::default();
    let mut mismatch: Option<Error> = None;
    let mut seen: Vec<PathBuf> = Vec::new();
    for cand in parent_candidates(child, h, locators) {
        let res = chain.resolve(std::slice::from_ref(&cand));
        all.tried.extend(res.tried);
        all.refused |= res.refused;
        let Some(path) = res.found else {
            continue;
        };
        let canon = std::fs::canonicalize(&path).unwrap_or_else(|_| path.clone());
        if seen.contains(&canon) {
            continue;
        }
        seen.push(canon);
        let depth = chain.depth();
        chain.enter(name, &path)?;
        let popts = OpenOptions {
            writable: false,
            ..opts.clone()
        };
        let parent = Vhd::open_path(&path, &popts, chain);
        chain.truncate(depth);
        let parent = parent.map_err(|e| parent::parent_error(e, name, &path))?;
        let pid = parent.info.footer.unique_id;
        if pid == h.parent_unique_id || opts.ignore_parent_id {
            return Ok(Arc::new(parent));
        }
        mismatch.get_or_insert_with(|| {
            Error::invalid(format!(
                "parent {} has unique id {pid}, but this differencing VHD expects parent unique \
                 id {} (dynamic disk header at offset {:#x}): it is not this disk's parent, or \
                 its id was changed (open with ignore_parent_id to use it anyway)",
                path.display(),
                h.parent_unique_id,
                hdr_off + 40
            ))
            .in_file(name, 0)
        });
    }
    if let Some(e) = mismatch {
        return Err(e);
    }
    Err(all.not_found_error(
        name,
        "VHD",
        &format!(
            "parent \"{}\" (id {}) not found",
            h.parent_name(),
            h.parent_unique_id
        ),
        "no parent locator or parent name names a path",
    ))
}

fn check_parent_size(name: &str, parent: &dyn VirtualDisk, size: u64) -> Result<()> {
    let psize = parent.virtual_size();
    if psize != size {
        return Err(Error::invalid(format!(
            "the parent {} has a virtual size of {psize} bytes, but this differencing VHD has \
             {size}: it is not this disk's parent",
            parent.storage().name()
        ))
        .in_file(name, 0));
    }
    Ok(())
}

fn not_differencing(name: &str, parent: &dyn VirtualDisk) -> Error {
    Error::invalid(format!(
        "a parent ({}) was given, but this VHD is not a differencing disk",
        parent.storage().name()
    ))
    .in_file(name, 0)
}

/// What a new differencing disk records about its parent.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ParentLink {
    /// The parent's file name (the header's parent Unicode name).
    pub name: String,
    /// The `W2ru` locator: the parent's path relative to the child's
    /// directory, Windows style (`.\\parent.vhd`, `..\\dir\\parent.vhd`).
    pub relative: String,
    /// The `W2ku` locator: the parent's absolute path in Win32 syntax.
    /// Windows writes a drive path (`C:\\dir\\parent.vhd`); a Unix path has
    /// no drive, so this is the rooted path `\\dir\\parent.vhd`
    /// ([`parent::windows_absolute_path`]), which our parent search reads
    /// back as `/dir/parent.vhd` (disks this library made before hold the
    /// Unix path itself, which it still reads).
    pub absolute: String,
    /// The parent's modification time, seconds since 2000-01-01 UTC.
    pub timestamp: u32,
}

fn creator_version() -> u32 {
    (env!("CARGO_PKG_VERSION_MAJOR").parse::<u32>().unwrap_or(0) << 16)
        | env!("CARGO_PKG_VERSION_MINOR").parse::<u32>().unwrap_or(0)
}

/// A time as a VHD timestamp (seconds since 2000-01-01 UTC, saturating).
fn vhd_time(t: std::time::SystemTime) -> u32 {
    let unix = t
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    u32::try_from(unix.saturating_sub(crate::footer::VHD_EPOCH_UNIX)).unwrap_or(u32::MAX)
}

/// Fill `len` bytes at `offset` with 0xff (an empty BAT).
/// The canonical path of the parent named for a new differencing disk at
/// `path`; refuses a child that would overwrite its own parent.
fn differencing_parent_path(path: &Path, parent_path: &Path) -> Result<PathBuf> {
    let pname = parent_path.display().to_string();
    let parent_abs = std::fs::canonicalize(parent_path)
        .map_err(|e| Error::io("cannot find the parent", e).in_file(&pname, 0))?;
    if std::fs::canonicalize(path).is_ok_and(|c| c == parent_abs) {
        return Err(Error::invalid(format!(
            "the differencing disk would overwrite its own parent {pname}"
        ))
        .in_file(&path.display().to_string(), 0));
    }
    Ok(parent_abs)
}

/// Write a new differencing VHD onto empty `storage`: footer (and its copy),
/// dynamic header naming the parent whose footer is `pf`, an all-"not
/// present" BAT, and the parent locators of `link`; then flush.
/// VHD specification (2006), "Dynamic Disk Header Format" and "Hard Disk
/// Footer Format".
/// Whether [`write_differencing`] writes the BAT or finds it already
/// written (a spare: see [`Vhd::create_differencing_from_spare`]).
#[derive(Clone, Copy, PartialEq, Eq)]
enum BatFill {
    Write,
    Keep,
}

/// Where `write_differencing` puts the BAT of a disk of `size` bytes: its
/// offset, entry count and length in bytes (whole sectors).
fn differencing_bat(size: u64, opts: &CreateOptions) -> Option<(u64, u32, u64)> {
    let entries = size.div_ceil(u64::from(opts.block_size));
    let entries32 = u32::try_from(entries).ok()?;
    Some((
        3 * SECTOR,
        entries32,
        (entries * 4).div_ceil(SECTOR) * SECTOR,
    ))
}

/// Whether `storage` holds a differencing VHD laid out as
/// [`write_differencing`] lays out a disk of `size` bytes with `opts`,
/// whose BAT entries are all unused (0xFFFFFFFF).
fn is_blank_spare(storage: &dyn Storage, size: u64, opts: &CreateOptions) -> Result<bool> {
    let Some((table_offset, entries, table_len)) = differencing_bat(size, opts) else {
        return Ok(false);
    };
    if storage.len()? < table_offset + table_len + FOOTER_SIZE as u64 {
        return Ok(false);
    }
    let mut head = [0u8; FOOTER_SIZE + HEADER_SIZE];
    storage.read_at(&mut head, 0)?;
    let (Ok(footer), Ok(header)) = (
        Footer::parse(&head[..FOOTER_SIZE]),
        DynamicHeader::parse(&head[FOOTER_SIZE..]),
    ) else {
        return Ok(false);
    };
    if footer.disk_type != DiskType::Differencing
        || footer.current_size != size
        || footer.data_offset != FOOTER_SIZE as u64
        || header.table_offset != table_offset
        || header.max_table_entries != entries
        || header.block_size != opts.block_size
    {
        return Ok(false);
    }
    disk::range_is(storage, table_offset, table_len, 0xff)
}

fn write_differencing(
    storage: &dyn Storage,
    pf: &Footer,
    link: &ParentLink,
    opts: &CreateOptions,
    bat: BatFill,
) -> Result<()> {
    let name = storage.name().to_string();
    let size = pf.disk_size();
    validate_differencing(opts, size).in_file(&name, 0)?;
    let mut footer = Footer {
        features: FEATURES_RESERVED,
        version: VERSION,
        data_offset: FOOTER_SIZE as u64,
        timestamp: Footer::now_timestamp(),
        creator_application: *b"vdsk",
        creator_version: creator_version(),
        creator_host_os: *b"Wi2k",
        original_size: size,
        current_size: size,
        geometry: pf.geometry,
        disk_type: DiskType::Differencing,
        checksum: 0,
        unique_id: Uuid::new_v4(),
        saved_state: 0,
    };
    let (table_offset, entries32, table_len) = differencing_bat(size, opts)
        .ok_or_else(|| Error::invalid("too many blocks for a VHD BAT").in_file(&name, 0))?;
    let mut header = DynamicHeader::new(table_offset, entries32, opts.block_size);
    header
        .set_parent(pf.unique_id, link.timestamp, &link.name)
        .in_file(&name, 0)?;
    // Each locator's data in its own space after the BAT, in the order
    // of the header entries Windows writes (W2ku first, then W2ru).
    let utf16le = |p: &str| -> Vec<u8> { p.encode_utf16().flat_map(u16::to_le_bytes).collect() };
    let mut at = table_offset + table_len;
    let mut datas = Vec::new();
    for (i, (code, path)) in [(*b"W2ku", &link.absolute), (*b"W2ru", &link.relative)]
        .into_iter()
        .enumerate()
    {
        let data = utf16le(path);
        let len = u32::try_from(data.len())
            .ok()
            .filter(|&l| l > 0 && l <= MAX_LOCATOR)
            .ok_or_else(|| {
                Error::invalid(format!("parent path \"{path}\" is empty or too long"))
                    .in_file(&name, 0)
            })?;
        let space = u64::from(len).div_ceil(SECTOR) * SECTOR;
        // Platform Data Space: the specification counts 512-byte
        // sectors, but Windows writes a byte count (the diskpart-made
        // corpus image dfvfs-fat-differential-orphan.vhd has W2ku with
        // space 0x1000 and W2ru with space 0x10000, byte-sized regions
        // between the header, the BAT and the blocks), as do Virtual PC
        // and Hyper-V. We write bytes too: a multiple of 512, never
        // below 512, which readers that expect sectors (QEMU ignores
        // the field) only over-estimate.
        header.parent_locators[i] = ParentLocator {
            platform_code: code,
            data_space: space as u32,
            data_length: len,
            reserved: 0,
            data_offset: at,
        };
        // Zero-padded to the whole space (a reused spare may hold a
        // longer path there).
        let mut data = data;
        data.resize(space as usize, 0);
        datas.push((at, data));
        at += space;
    }
    let mut fbuf = [0u8; FOOTER_SIZE];
    footer.write_to(&mut fbuf);
    let mut hbuf = [0u8; HEADER_SIZE];
    header.write_to(&mut hbuf);
    if bat == BatFill::Write {
        storage.set_len(0)?;
    }
    storage.write_at(&fbuf, 0)?;
    storage.write_at(&hbuf, FOOTER_SIZE as u64)?;
    if bat == BatFill::Write {
        disk::fill_range(storage, table_offset, table_len, 0xff)?;
    }
    for (off, data) in &datas {
        storage.write_at(data, *off)?;
    }
    storage.write_at(&fbuf, at)?;
    storage.set_len(at + FOOTER_SIZE as u64)?;
    storage.flush()
}

/// `file` relative to the directory `dir` (both absolute), Windows style:
/// `.\\name` beside it, else `..\\` steps up then down. None when a
/// component is not valid Unicode or holds a backslash.
fn relative_windows_path(dir: &Path, file: &Path) -> Option<String> {
    let d: Vec<_> = dir.components().collect();
    let f: Vec<_> = file.components().collect();
    let common = d.iter().zip(&f).take_while(|(a, b)| a == b).count();
    let mut parts: Vec<String> = Vec::new();
    if common == d.len() {
        parts.push(".".into());
    }
    for _ in common..d.len() {
        parts.push("..".into());
    }
    for c in &f[common..] {
        // A backslash inside a name would read back as a separator.
        let name = c.as_os_str().to_str().filter(|n| !n.contains('\\'))?;
        parts.push(name.to_string());
    }
    Some(parts.join("\\"))
}

/// Options for a differencing disk over a parent of `parent_size` bytes.
fn validate_differencing(o: &CreateOptions, parent_size: u64) -> Result<()> {
    if o.fixed || o.azure {
        return Err(Error::invalid(
            "a differencing VHD is dynamic: it cannot be fixed or use Azure mode",
        ));
    }
    let s = o.virtual_size;
    if s != 0 && s != parent_size && ChsGeometry::round_up(s).0 != parent_size {
        return Err(Error::invalid(format!(
            "a differencing VHD has its parent's virtual size ({parent_size} bytes), not {s}"
        )));
    }
    validate_create(&CreateOptions {
        virtual_size: parent_size.max(1),
        ..o.clone()
    })
}

fn validate_create(o: &CreateOptions) -> Result<()> {
    if o.virtual_size == 0 || o.virtual_size > MAX_VIRTUAL_SIZE {
        return Err(Error::invalid(format!(
            "virtual size {} must be from 1 byte to 2040 GiB ({MAX_VIRTUAL_SIZE} bytes), the VHD limit",
            o.virtual_size
        )));
    }
    if o.azure {
        if !o.fixed {
            return Err(Error::invalid("Azure mode creates fixed VHDs only"));
        }
        if !o.virtual_size.is_multiple_of(MIB) {
            return Err(Error::invalid(format!(
                "Azure needs a virtual size that is a whole number of MiB; {} bytes is not \
                 (use {} bytes)",
                o.virtual_size,
                o.virtual_size.div_ceil(MIB) * MIB
            )));
        }
    }
    if !o.fixed
        && (!o.block_size.is_power_of_two() || !(4096..=256 * MIB as u32).contains(&o.block_size))
    {
        return Err(Error::invalid(format!(
            "block size {} is not a power of two from 4 KiB to 256 MiB",
            o.block_size
        )));
    }
    Ok(())
}

impl VirtualDisk for Vhd {
    fn geometry(&self) -> Geometry {
        Geometry {
            virtual_size: self.virtual_size,
            logical_sector_size: 512,
            physical_sector_size: 512,
        }
    }

    fn storage(&self) -> &dyn Storage {
        &*self.storage
    }

    fn parent(&self) -> Option<&Arc<dyn VirtualDisk>> {
        self.parent.as_ref()
    }

    fn map(&self, offset: u64, len: u64) -> Result<Extent> {
        if len == 0 || offset >= self.virtual_size {
            return Err(Error::invalid(format!(
                "map of {offset:#x}+{len:#x} outside the virtual size {:#x}",
                self.virtual_size
            ))
            .in_file(self.name(), 0));
        }
        let run = len.min(self.virtual_size - offset);
        match &self.dynamic {
            None => Ok(Extent {
                offset,
                len: run,
                mapping: Mapping::Data(FileOffset(offset)),
            }),
            Some(d) => {
                let run = run.min(d.block_size - offset % d.block_size);
                self.map_dynamic(d, offset, run)
            }
        }
    }

    fn map_write(&self, offset: u64, len: u64) -> Result<WriteExtent> {
        self.check_writable()?;
        if len == 0 || offset >= self.virtual_size {
            return Err(Error::invalid(format!(
                "write of {offset:#x}+{len:#x} outside the virtual size {:#x}",
                self.virtual_size
            ))
            .in_file(self.name(), 0));
        }
        let run = len.min(self.virtual_size - offset);
        match &self.dynamic {
            None => Ok(WriteExtent {
                offset,
                len: run,
                file_offset: FileOffset(offset),
                fill_partial_sectors: false,
                token: 0,
            }),
            Some(d) => {
                let run = run.min(d.block_size - offset % d.block_size);
                self.map_write_dynamic(d, offset, run)
            }
        }
    }

    fn commit_write(&self, ext: &WriteExtent) -> Result<()> {
        match &self.dynamic {
            Some(d) => self.commit_dynamic(d, ext),
            None => Ok(()),
        }
    }

    fn close(&self) -> Result<()> {
        self.close_inner()
    }

    fn flush(&self) -> Result<()> {
        if !self.writable {
            return Ok(());
        }
        self.flush_inner()
    }

    fn discard(&self, offset: u64, len: u64) -> Result<()> {
        self.discard_blocks(offset, len)
    }

    /// A dynamic disk without a parent unmaps whole blocks (they read as
    /// zeros once unallocated); the rest, and every differencing disk (an
    /// unallocated block would read the parent: VHD has no zero state),
    /// gets zeros written.
    fn write_zeroes(&self, offset: u64, len: u64, unmap: bool) -> Result<()> {
        let size = self.geometry().virtual_size;
        let end = offset.saturating_add(len);
        let bs = self.discard_granularity();
        if !unmap || bs == 0 || end > size {
            return disk::write_zero_bytes(self, offset, len);
        }
        let blocks = disk::whole_blocks(offset, len, bs, size);
        if blocks.is_empty() {
            return disk::write_zero_bytes(self, offset, len);
        }
        let (first, past) = (blocks.start * bs, (blocks.end * bs).min(size));
        disk::write_zero_bytes(self, offset, first - offset)?;
        self.discard_blocks(first, past - first)?;
        disk::write_zero_bytes(self, past, end - past)
    }

    fn discard_granularity(&self) -> u64 {
        match &self.dynamic {
            Some(d) if self.parent.is_none() => d.block_size,
            _ => 0,
        }
    }

    fn disk_id(&self) -> Option<Uuid> {
        Some(self.info.footer.unique_id)
    }

    fn is_writable(&self) -> bool {
        self.writable
    }
}

impl Drop for Vhd {
    fn drop(&mut self) {
        let _ = self.close_inner();
    }
}

impl std::fmt::Debug for Vhd {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Vhd")
            .field("file", &self.name())
            .field("type", &self.info.subformat())
            .field("virtual_size", &self.virtual_size)
            .field("writable", &self.writable)
            .finish()
    }
}

// ---- Relinking a differencing disk, and making it standalone. ----

/// One existing parent locator's data space, where relinking may write the
/// new locator data.
#[derive(Debug, Clone, Copy)]
struct LocatorSpace {
    /// The platform code of the entry that owns it.
    code: [u8; 4],
    /// Its file offset.
    offset: u64,
    /// The entry's data space field as found (sectors or bytes; kept so that
    /// the rewritten entry describes the same region the same way).
    data_space: u32,
    /// The space in bytes.
    bytes: u64,
    /// The old data's length (zeroed beyond the new data).
    old_len: u64,
}

/// The ranges of a dynamic disk's structures that relinking must never
/// write: the footer copy, the header, the BAT, every allocated block, and
/// everything from the trailing footer on.
fn protected_ranges(v: &Vhd, d: &Dyn, header: &DynamicHeader) -> Vec<(u64, u64)> {
    let mut out = vec![
        (0, FOOTER_SIZE as u64),
        (v.info.footer.data_offset, HEADER_SIZE as u64),
        (header.table_offset, u64::from(header.max_table_entries) * 4),
        (v.info.footer_offset, u64::MAX - v.info.footer_offset),
    ];
    let st = lock(&d.state);
    out.extend(
        st.bat
            .entries
            .iter()
            .filter(|&&e| e != UNALLOCATED)
            .map(|&e| (u64::from(e) * SECTOR, d.bitmap_size + d.block_size)),
    );
    out
}

/// What [`Vhd::set_parent`] records about the parent at `parent_abs`
/// (canonical) for the child at `child`: as [`Vhd::create_differencing`]
/// does.
fn parent_link_for(child: &Path, parent_abs: &Path) -> Result<ParentLink> {
    let name = child.display().to_string();
    let dir = parent::dir_of(child);
    let dir_abs = std::fs::canonicalize(dir)
        .map_err(|e| Error::io("cannot resolve the directory of", e).in_file(&name, 0))?;
    let unicode = |p: &Path| {
        p.to_str().map(str::to_string).ok_or_else(|| {
            Error::invalid(format!(
                "the parent path {} is not valid Unicode: a VHD locator cannot record it",
                p.display()
            ))
            .in_file(&name, 0)
        })
    };
    let file_name = parent_abs.file_name().map(Path::new).ok_or_else(|| {
        Error::invalid("the parent path has no file name")
            .in_file(&parent_abs.display().to_string(), 0)
    })?;
    let windows = |p: Option<String>| {
        p.ok_or_else(|| {
            Error::invalid(
                "the parent path cannot be written as a Windows path (a name in it is not \
                 valid Unicode, or holds a backslash)",
            )
            .in_file(&parent_abs.display().to_string(), 0)
        })
    };
    Ok(ParentLink {
        name: unicode(file_name)?,
        relative: windows(relative_windows_path(&dir_abs, parent_abs))?,
        absolute: windows(parent::windows_absolute_path(parent_abs))?,
        timestamp: std::fs::metadata(parent_abs)
            .and_then(|m| m.modified())
            .map_or(0, vhd_time),
    })
}

/// Refuse to rewrite a header that a power cut could tear: it must lie in
/// one 4 KiB page (it does in every layout seen: Virtual PC, Windows, QEMU
/// and this library put it at offset 512).
fn check_header_page(name: &str, hdr_off: u64) -> Result<()> {
    const PAGE: u64 = 4096;
    if hdr_off / PAGE != (hdr_off + HEADER_SIZE as u64 - 1) / PAGE {
        return Err(Error::unsupported(format!(
            "the dynamic disk header at offset {hdr_off:#x} straddles a 4 KiB page boundary, so \
             it cannot be rewritten atomically (a power cut could tear it); convert the image \
             instead"
        ))
        .in_file(name, 0));
    }
    Ok(())
}

/// Inspect a differencing disk about to be rewritten in place: it must be
/// a differencing VHD whose trailing footer is intact, on writable storage,
/// with a header that can be rewritten atomically.
fn inspect_for_rewrite(storage: &Arc<dyn Storage>, what: &str) -> Result<Vhd> {
    let name = storage.name().to_string();
    let v = Vhd::open_inner(
        Box::new(storage.clone()),
        &OpenOptions::default(),
        ParentSource::Inspect,
    )?;
    if v.info.footer.disk_type != DiskType::Differencing {
        return Err(Error::invalid(format!(
            "cannot {what}: this is a {} VHD, not a differencing disk",
            v.info.subformat()
        ))
        .in_file(&name, 0));
    }
    if v.info.footer_source == FooterSource::CopyAtStart {
        return Err(Error::invalid(format!(
            "cannot {what}: {}",
            v.info.warnings.first().map_or("", String::as_str)
        ))
        .in_file(&name, 0));
    }
    if !storage.is_writable() {
        return Err(
            Error::invalid(format!("cannot {what}: the file is open read-only")).in_file(&name, 0),
        );
    }
    check_header_page(&name, v.info.footer.data_offset)?;
    Ok(v)
}

impl Vhd {
    /// Point the differencing VHD `child` at `new_parent`, like Hyper-V's
    /// `Set-VHD -ParentPath`: after moving or renaming a parent, or to
    /// adopt a copy of it.
    ///
    /// `new_parent` is opened read-only with `parent_opts` (whose
    /// `parent_policy` governs the new parent's own chain) and must have the
    /// child's virtual size; unless `adopt`, its footer unique id must be
    /// the one the child's header records (else an
    /// [`ErrorKind::InvalidInput`](crate::ErrorKind) error saying it is
    /// "not this disk's parent"). With `adopt`, the header records the new
    /// parent's id: only for a disk known to hold the old parent's data
    /// (e.g. a copy whose id another tool changed), or the child reads
    /// garbage. A parent whose chain contains the child is refused (a
    /// loop).
    ///
    /// The child's dynamic disk header is rewritten: parent unique id,
    /// parent time stamp (the new parent's modification time), parent
    /// Unicode name (its file name), and two locators: `W2ru`, the path
    /// relative to the child's directory (`.\\sub\\p.vhd`, `..\\dir\\p.vhd`),
    /// and `W2ku`, the absolute path (see [`ParentLink`]). Other locators
    /// (`Wi2r`, `Wi2k`, `MacX`, `Mac `, which would still name the old
    /// path) are dropped. The new locator data goes into the child's
    /// existing locator data spaces (each path into its own code's space
    /// when it fits, else into the smallest free one that does); when the
    /// paths do not fit, the call fails with
    /// [`ErrorKind::InvalidInput`](crate::ErrorKind) and nothing is
    /// written: blocks are never moved to make room. The child's footer
    /// (and so its unique id: its own children stay linked), BAT and data
    /// are untouched. The child must not be open elsewhere meanwhile.
    ///
    /// # Crash safety
    /// 1. the new locator data is written over the old, then **sync**;
    /// 2. the 1024-byte header is written (the commit point: it lies in one
    ///    4 KiB page, which a power cut does not tear; a header that would
    ///    straddle a page is refused), then **sync**.
    ///
    /// A power cut after step 2's write persisted leaves the new link. One
    /// before it leaves the old header, whose locator entries may already
    /// describe partly (or, torn, partly of the two) overwritten data: the
    /// old locators are then not to be relied on. (When a new path went into
    /// its own code's space and is no longer than the old one, the old entry
    /// reads as the new path, as the rest of the old data is zeroed; a
    /// longer one reads as a truncated path, which usually names nothing.)
    /// The old parent is then found only by the parent name (the old file
    /// name, beside the child), or by the caller passing the parent
    /// explicitly ([`Vhd::open_with_parent`], which reads the same bytes:
    /// the data, BAT and bitmaps were never touched). When the new parent
    /// has another id (`adopt`), an open that finds it by the locators
    /// refuses it (id mismatch) until `set_parent` is run again. Running
    /// `set_parent` again, with the same arguments, completes the change.
    ///
    /// # Errors
    /// Either file cannot be opened; `child` is not a differencing VHD or
    /// its trailing footer is damaged; the sizes or (unless `adopt`) the
    /// ids differ; the new parent is the child or has it in its chain; the
    /// paths do not fit the locator data spaces or the parent's file name
    /// does not fit the 512-byte name field; I/O errors.
    pub fn set_parent(
        child: impl AsRef<Path>,
        new_parent: impl AsRef<Path>,
        adopt: bool,
        parent_opts: &OpenOptions,
    ) -> Result<()> {
        let child = child.as_ref();
        let new_parent = new_parent.as_ref();
        let name = child.display().to_string();
        let pname = new_parent.display().to_string();
        let child_abs = std::fs::canonicalize(child)
            .map_err(|e| Error::io("cannot find the differencing disk", e).in_file(&name, 0))?;
        let parent_abs = std::fs::canonicalize(new_parent)
            .map_err(|e| Error::io("cannot find the new parent", e).in_file(&pname, 0))?;
        if parent_abs == child_abs {
            return Err(
                Error::invalid("a differencing disk cannot be its own parent").in_file(&name, 0),
            );
        }
        let parent = Vhd::open(
            &parent_abs,
            &OpenOptions {
                writable: false,
                ..parent_opts.clone()
            },
        )?;
        let mut ancestor = parent.parent();
        while let Some(a) = ancestor {
            if std::fs::canonicalize(a.storage().name()).is_ok_and(|p| p == child_abs) {
                return Err(Error::invalid(format!(
                    "the new parent {pname} has this disk in its own chain: the chain would loop"
                ))
                .in_file(&name, 0));
            }
            ancestor = a.parent();
        }
        let link = parent_link_for(child, &parent_abs)?;
        let storage: Arc<dyn Storage> =
            parent_opts.opener.open(child, true, LockMode::Auto)?.into();
        Self::set_parent_on(storage, &parent, &link, adopt)
    }

    /// [`Vhd::set_parent`] on any storage: the child on `storage`, the new
    /// parent already open, the locators from `link` (whose `relative` path
    /// is the caller's to compute). The same checks (except the loop
    /// check, which needs paths), writes and crash safety.
    ///
    /// # Errors
    /// As [`Vhd::set_parent`].
    pub fn set_parent_on(
        storage: Arc<dyn Storage>,
        new_parent: &Vhd,
        link: &ParentLink,
        adopt: bool,
    ) -> Result<()> {
        let name = storage.name().to_string();
        let child = inspect_for_rewrite(&storage, "change the parent")?;
        let (Some(d), Some(header)) = (&child.dynamic, &child.info.header) else {
            return Err(Error::invalid("a differencing disk without a header").in_file(&name, 0));
        };
        let hdr_off = child.info.footer.data_offset;
        check_parent_size(&name, new_parent, child.virtual_size)?;
        let pid = new_parent.info.footer.unique_id;
        if !adopt && pid != header.parent_unique_id {
            return Err(Error::invalid(format!(
                "{} has unique id {pid}, but this differencing VHD expects parent unique id {} \
                 (dynamic disk header at offset {:#x}): it is not this disk's parent (adopt it \
                 to record its id instead, only if it holds the parent's data)",
                new_parent.name(),
                header.parent_unique_id,
                hdr_off + 40
            ))
            .in_file(&name, 0));
        }

        let mut h = header.clone();
        h.set_parent(pid, link.timestamp, &link.name)
            .in_file(&name, 0)?;

        // The existing data spaces, each cut short where another structure
        // begins (a space whose size field is wrong or in the other unit
        // must not let us write over the BAT or a block).
        let protected = protected_ranges(&child, d, header);
        let usable = |off: u64, declared: u64| {
            protected.iter().fold(declared, |cap, &(p, plen)| {
                if overlaps(off, 1, p, plen) {
                    0
                } else if p > off {
                    cap.min(p - off)
                } else {
                    cap
                }
            })
        };
        let spaces: Vec<LocatorSpace> = header
            .locators()
            .map(|(_, l)| {
                let bytes = usable(l.data_offset, l.data_space_bytes());
                LocatorSpace {
                    code: l.platform_code,
                    offset: l.data_offset,
                    data_space: l.data_space,
                    bytes,
                    old_len: u64::from(l.data_length).min(bytes),
                }
            })
            .filter(|s| s.bytes > 0)
            .collect();
        let utf16le =
            |p: &str| -> Vec<u8> { p.encode_utf16().flat_map(u16::to_le_bytes).collect() };
        let datas = [
            (*b"W2ku", utf16le(&link.absolute), &link.absolute),
            (*b"W2ru", utf16le(&link.relative), &link.relative),
        ];
        for (code, data, path) in &datas {
            if data.is_empty() || data.len() > MAX_LOCATOR as usize {
                return Err(Error::invalid(format!(
                    "the {} parent path \"{path}\" is empty or too long",
                    fourcc(code)
                ))
                .in_file(&name, 0));
            }
        }
        // Larger first, each into its own code's space if it fits, else the
        // smallest free one that does (with two paths this finds a fit
        // whenever one exists).
        let mut order = [0usize, 1];
        order.sort_by_key(|&i| std::cmp::Reverse(datas[i].1.len()));
        let mut chosen: [Option<usize>; 2] = [None, None];
        for i in order {
            let len = datas[i].1.len() as u64;
            let free = |j: usize| {
                let s = &spaces[j];
                len <= s.bytes
                    && chosen
                        .iter()
                        .flatten()
                        .all(|&c| !overlaps(s.offset, s.bytes, spaces[c].offset, spaces[c].bytes))
            };
            chosen[i] = (0..spaces.len())
                .filter(|&j| free(j))
                .min_by_key(|&j| (spaces[j].code != datas[i].0, spaces[j].bytes));
            if chosen[i].is_none() {
                let have: Vec<String> = spaces
                    .iter()
                    .map(|s| format!("{} bytes ({})", s.bytes, fourcc(&s.code)))
                    .collect();
                return Err(Error::invalid(format!(
                    "the new parent's paths do not fit this disk's parent locator data space: \
                     {} needs {} bytes for \"{}\" and {} needs {} bytes for \"{}\", but the \
                     spaces are {}; relinking does not move blocks to make room (use a shorter \
                     path, or copy the disk with a new parent)",
                    fourcc(&datas[0].0),
                    datas[0].1.len(),
                    datas[0].2,
                    fourcc(&datas[1].0),
                    datas[1].1.len(),
                    datas[1].2,
                    if have.is_empty() {
                        "none".to_string()
                    } else {
                        have.join(", ")
                    }
                ))
                .in_file(&name, 0));
            }
        }
        h.parent_locators = [ParentLocator::default(); crate::dynamic_header::LOCATORS];
        let mut writes = Vec::new();
        for (i, (code, data, _)) in datas.iter().enumerate() {
            let s = spaces[chosen[i].unwrap_or_default()];
            h.parent_locators[i] = ParentLocator {
                platform_code: *code,
                data_space: s.data_space,
                data_length: data.len() as u32,
                reserved: 0,
                data_offset: s.offset,
            };
            // Zero what is left of the old data, so that an old header
            // reading this space after a crash sees the new path (or a
            // truncated one), never a mix with the old.
            let mut buf = data.clone();
            buf.resize(data.len().max(s.old_len as usize), 0);
            writes.push((s.offset, buf));
        }
        let mut hbuf = [0u8; HEADER_SIZE];
        h.write_to(&mut hbuf);
        drop(child);

        for (off, buf) in &writes {
            storage.write_at(buf, *off)?;
        }
        storage.flush()?;
        storage.write_at(&hbuf, hdr_off)?;
        storage.flush()
    }

    /// Turn the differencing VHD `child` into a dynamic VHD whose content is
    /// what the child holds: its present sectors, and zeros wherever it
    /// would have read from its parent. The last step of merging a parent
    /// into its only child, once the caller has copied into the child every
    /// parent sector it needs (not checked here). The unique id, BAT,
    /// bitmaps and data are kept; the parent is not opened.
    ///
    /// # Crash safety
    /// 1. the trailing footer is rewritten with disk type dynamic (and a new
    ///    checksum; one 512-byte sector), **sync**;
    /// 2. the footer copy at offset 0, the same, **sync**;
    /// 3. the dynamic disk header with its parent fields cleared (unique
    ///    id, time stamp, name, locator entries; one 4 KiB page), **sync**.
    ///
    /// Each state a power cut can leave opens:
    /// - before step 1 persisted: the differencing disk, unchanged (it
    ///   still needs its parent, so the caller deletes the parent only
    ///   after this returns);
    /// - after step 1, before step 3: the trailing footer, the one every
    ///   reader uses, says dynamic, while the copy at 0 may still say
    ///   differencing and the header still names the parent. The disk opens
    ///   as dynamic: for a dynamic disk the parent fields are ignored (the
    ///   open code reads the locators and looks for a parent only when the
    ///   footer says differencing, and refuses a parent passed to
    ///   [`Vhd::open_with_parent`]), and sectors whose bitmap bit is 0 read
    ///   as zeros. Its content is already the final one;
    /// - after step 3: done.
    ///
    /// If the trailing footer were torn anyway, the copy at offset 0 (still
    /// differencing before step 2) is used, read-only, with the parent.
    ///
    /// # Errors
    /// The file cannot be opened; it is not a differencing VHD, or its
    /// trailing footer is damaged; I/O errors.
    pub fn make_standalone(child: impl AsRef<Path>, opener: &dyn Opener) -> Result<()> {
        let storage: Arc<dyn Storage> = opener.open(child.as_ref(), true, LockMode::Auto)?.into();
        Self::make_standalone_on(storage)
    }

    /// [`Vhd::make_standalone`] on any storage.
    ///
    /// # Errors
    /// As [`Vhd::make_standalone`].
    pub fn make_standalone_on(storage: Arc<dyn Storage>) -> Result<()> {
        let name = storage.name().to_string();
        let child = inspect_for_rewrite(&storage, "make the disk standalone")?;
        let Some(header) = &child.info.header else {
            return Err(Error::invalid("a differencing disk without a header").in_file(&name, 0));
        };
        let mut footer = child.info.footer.clone();
        footer.disk_type = DiskType::Dynamic;
        let mut fbuf = [0u8; FOOTER_SIZE];
        footer.write_to(&mut fbuf);
        let mut h = header.clone();
        h.parent_unique_id = Uuid::nil();
        h.parent_timestamp = 0;
        h.parent_unicode_name = [0; crate::dynamic_header::PARENT_NAME_SIZE];
        h.parent_locators = [ParentLocator::default(); crate::dynamic_header::LOCATORS];
        let mut hbuf = [0u8; HEADER_SIZE];
        h.write_to(&mut hbuf);
        let (footer_offset, hdr_off) = (child.info.footer_offset, footer.data_offset);
        drop(child);

        storage.write_at(&fbuf, footer_offset)?;
        storage.flush()?;
        storage.write_at(&fbuf, 0)?;
        storage.flush()?;
        storage.write_at(&hbuf, hdr_off)?;
        storage.flush()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use disk::MemStorage;
    use std::sync::Arc;

    fn mem(size: u64, fixed: bool) -> (Arc<MemStorage>, Vhd) {
        let st = Arc::new(MemStorage::new("mem.vhd"));
        let mut o = CreateOptions::new(size);
        o.fixed = fixed;
        let d = Vhd::create_on(Box::new(st.clone()), &o).unwrap();
        (st, d)
    }

    fn reopen(st: &MemStorage) -> Vhd {
        Vhd::open_storage(
            Box::new(MemStorage::from_vec("again.vhd", st.to_vec())),
            &OpenOptions::default(),
        )
        .unwrap()
    }

    #[test]
    fn write_read_reopen_both_types() {
        for fixed in [false, true] {
            let (st, d) = mem(20 * MIB, fixed);
            assert_eq!(d.virtual_size(), ChsGeometry::round_up(20 * MIB).0);
            let data: Vec<u8> = (0..10000u32).map(|i| (i % 251) as u8 + 1).collect();
            d.write_at(&data, 3 * MIB - 77).unwrap();
            d.write_at(&data, 2 * MIB - 5000).unwrap(); // across a block boundary
            let mut back = vec![0u8; data.len()];
            d.read_at(&mut back, 2 * MIB - 5000).unwrap();
            assert_eq!(back, data);
            d.close().unwrap();
            let d2 = reopen(&st);
            let mut back = vec![0u8; data.len() + 2];
            d2.read_at(&mut back, 3 * MIB - 78).unwrap();
            assert_eq!(&back[1..data.len() + 1], &data[..]);
            assert_eq!(back[0], 0);
            assert_eq!(
                d2.info().subformat(),
                if fixed { "fixed" } else { "dynamic" }
            );
            if !fixed {
                assert_eq!(d2.info().allocated_blocks, 2);
                let f = d2.info().footer.clone();
                // The copy at 0 equals the trailing footer.
                let v = st.to_vec();
                assert_eq!(Footer::parse(&v[..512]).unwrap(), f);
            }
        }
    }

    #[test]
    fn partial_bitmap_reads_zero_and_write_sets_bits() {
        let (st, d) = mem(8 * MIB, false);
        d.write_at(&[7u8; 1024], 0).unwrap();
        d.close().unwrap();
        // Clear every bitmap bit except sector 1 (a foreign tool's image).
        let mut v = st.to_vec();
        let bat0 = u32::from_be_bytes([v[1536], v[1537], v[1538], v[1539]]) as usize * 512;
        v[bat0..bat0 + 512].fill(0);
        v[bat0] = 0x40;
        let st2 = Arc::new(MemStorage::from_vec("p.vhd", v));
        let d = Vhd::open_storage(
            Box::new(st2.clone()),
            &OpenOptions {
                writable: true,
                ..OpenOptions::default()
            },
        )
        .unwrap();
        let e = d.map(0, 4096).unwrap();
        assert_eq!((e.len, e.mapping), (512, Mapping::Unallocated));
        let e = d.map(512, 4096).unwrap();
        assert_eq!(e.len, 512);
        assert!(matches!(e.mapping, Mapping::Data(_)));
        let mut b = [1u8; 1024];
        d.read_at(&mut b, 0).unwrap();
        assert_eq!(&b[..512], &[0u8; 512]);
        assert_eq!(&b[512..], &[7u8; 512]);
        // A partial-sector write into a non-present sector keeps the rest zero.
        d.write_at(&[9u8; 10], 2048 + 100).unwrap();
        let mut b = [1u8; 512];
        d.read_at(&mut b, 2048).unwrap();
        assert!(b[..100].iter().all(|&x| x == 0) && b[100..110] == [9; 10]);
        assert!(b[110..].iter().all(|&x| x == 0));
        d.close().unwrap();
        let d = reopen(&st2);
        let mut b = [1u8; 512];
        d.read_at(&mut b, 2048).unwrap();
        assert_eq!(&b[100..110], &[9u8; 10]);
        assert!(matches!(
            d.map(2048, 512).unwrap().mapping,
            Mapping::Data(_)
        ));
    }

    #[test]
    fn create_validation() {
        let st = || Box::new(MemStorage::new("v.vhd"));
        let e = Vhd::create_on(st(), &CreateOptions::new(2041 << 30)).unwrap_err();
        assert!(e.to_string().contains("2040 GiB"), "{e}");
        let mut o = CreateOptions::new(10 * MIB + 512);
        o.fixed = true;
        o.azure = true;
        let e = Vhd::create_on(st(), &o).unwrap_err();
        assert!(e.to_string().contains("whole number of MiB"), "{e}");
        o.virtual_size = 10 * MIB;
        let d = Vhd::create_on(st(), &o).unwrap();
        assert_eq!(d.virtual_size(), 10 * MIB);
        assert_eq!(d.info().footer.current_size, 10 * MIB);
        let mut o = CreateOptions::new(10 * MIB);
        o.block_size = 3 << 20;
        assert!(Vhd::create_on(st(), &o).is_err());
    }

    #[test]
    fn damaged_trailing_footer_uses_copy_read_only() {
        let (st, d) = mem(8 * MIB, false);
        d.write_at(&[5u8; 512], 4096).unwrap();
        d.close().unwrap();
        let mut v = st.to_vec();
        let n = v.len();
        v[n - 512] ^= 0xff;
        let s2 = MemStorage::from_vec("dmg.vhd", v);
        let d = Vhd::open_storage(
            Box::new(s2),
            &OpenOptions {
                writable: true,
                ..OpenOptions::default()
            },
        )
        .unwrap();
        assert_eq!(d.info().footer_source, FooterSource::CopyAtStart);
        assert!(!d.is_writable());
        assert!(d.info().warnings[0].contains("offset 0"));
        let mut b = [0u8; 512];
        d.read_at(&mut b, 4096).unwrap();
        assert_eq!(b, [5u8; 512]);
        let e = d.write_at(&b, 0).unwrap_err();
        assert!(e.to_string().contains("read-only"), "{e}");
    }

    #[test]
    fn old_511_byte_footer() {
        let (st, d) = mem(4 * MIB, true);
        d.write_at(&[3u8; 512], 0).unwrap();
        d.close().unwrap();
        let mut v = st.to_vec();
        v.pop(); // drop the last reserved byte
        let d = Vhd::open_storage(
            Box::new(MemStorage::from_vec("old.vhd", v)),
            &OpenOptions::default(),
        )
        .unwrap();
        assert_eq!(d.info().footer_source, FooterSource::End511);
        let mut b = [0u8; 512];
        d.read_at(&mut b, 0).unwrap();
        assert_eq!(b, [3u8; 512]);
    }

    #[test]
    fn relative_paths_and_parent_candidates() {
        let rel = |d: &str, f: &str| relative_windows_path(Path::new(d), Path::new(f)).unwrap();
        assert_eq!(rel("/a/b", "/a/b/p.vhd"), ".\\p.vhd");
        assert_eq!(rel("/a/b", "/a/b/s/p.vhd"), ".\\s\\p.vhd");
        assert_eq!(rel("/a/b", "/a/c/p.vhd"), "..\\c\\p.vhd");
        assert_eq!(rel("/", "/p.vhd"), ".\\p.vhd");
        assert_eq!(
            relative_windows_path(Path::new("/a"), Path::new("/a/p\\q.vhd")),
            None
        );
        let mut h = DynamicHeader::new(1536, 1, 1 << 21);
        let name: Vec<u8> = "C:\\x\\p.vhd"
            .encode_utf16()
            .flat_map(u16::to_be_bytes)
            .collect();
        h.parent_unicode_name[..name.len()].copy_from_slice(&name);
        let locs = vec![
            ("Wi2k".to_string(), "/abs/old.vhd".to_string()),
            ("W2ku".to_string(), "C:\\x\\p.vhd".to_string()),
            ("W2ku".to_string(), "\\abs\\new.vhd".to_string()),
            ("W2ru".to_string(), "..\\up\\p.vhd".to_string()),
            ("W2ru".to_string(), "\\\\server\\p.vhd".to_string()),
        ];
        let c = parent_candidates(Path::new("/d/child.vhd"), &h, &locs);
        let got: Vec<Option<PathBuf>> = c.into_iter().map(|(_, p)| p).collect();
        assert_eq!(
            got,
            vec![
                Some(PathBuf::from("/up/p.vhd")),
                None,
                None,
                Some(PathBuf::from("/abs/new.vhd")),
                Some(PathBuf::from("/d/p.vhd")),
                Some(PathBuf::from("/abs/old.vhd")),
            ]
        );
    }

    #[test]
    fn garbage_never_panics() {
        // Every byte of a small dynamic image flipped in turn: open and read
        // either succeed or fail cleanly.
        let (st, d) = mem(MIB * 4, false);
        d.write_at(&[1u8; 4096], 0).unwrap();
        d.close().unwrap();
        let v = st.to_vec();
        for n in (0..v.len()).step_by(509) {
            let w = v[..n].to_vec();
            if let Ok(d) = Vhd::open_storage(
                Box::new(MemStorage::from_vec("t.vhd", w)),
                &OpenOptions::default(),
            ) {
                let mut b = vec![0u8; d.virtual_size() as usize];
                let _ = d.read_at(&mut b, 0);
            }
        }
        for i in (0..2048).chain(v.len() - 512..v.len()) {
            let mut w = v.clone();
            w[i] ^= 0x5a;
            if let Ok(d) = Vhd::open_storage(
                Box::new(MemStorage::from_vec("g.vhd", w)),
                &OpenOptions::default(),
            ) {
                let mut b = vec![0u8; d.virtual_size() as usize];
                let _ = d.read_at(&mut b, 0);
            }
        }
    }
}
