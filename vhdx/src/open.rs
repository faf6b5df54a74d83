//! Opening a VHDX ([`Vhdx::open`] and its variants, [`Vhdx::inspect`]):
//! the file type identifier, the current header, the log replayed
//! (MS-VHDX 2.3.3: into the file when writable, in memory otherwise) before
//! anything it may change is read, the region table, the metadata, a
//! differencing disk's parent, and, when writable, a scan of the BAT that
//! refuses a truncated file and, in an image with nothing else wrong, gives
//! back the unreferenced tail a crash leaves between a block's allocation
//! and the flush that would have referenced it.

use crate::bat::BatGeometry;
use crate::bat_cache::BatCache;
use crate::file_identifier::FileIdentifier;
use crate::header::{self, Header};
use crate::image::{
    check_in_file, read_vec, HeaderState, BITMAP_CACHE_PAGES, MAX_LOG, MAX_METADATA_REGION, MIB,
};
use crate::log::{self, LogOp};
use crate::metadata::{FileParameters, Metadata, MetadataTable, TABLE_SIZE};
use crate::parent_locator::VHDX_PARENT_LOCATOR_TYPE;
use crate::parent_search::find_parent;
use crate::region_table::{self, region_name, RegionEntry, RegionTable, BAT_REGION};
use crate::replay::{self, ReplayOverlay};
use crate::scan;
use crate::sector_bitmap::BitmapCache;
use crate::session::write_header_pair;
use crate::{Error, Info, OpenOptions, Result, Vhdx};
use disk::parent::ChainSearch;
use disk::{Geometry, ResultExt, Storage, VirtualDisk};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64};
use std::sync::{Arc, Mutex, RwLock};
use uuid::Uuid;

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

    pub(crate) fn open_path(
        path: &Path,
        opts: &OpenOptions,
        chain: &mut ChainSearch,
    ) -> Result<Self> {
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

    pub(crate) fn open_inner(
        storage: Box<dyn Storage>,
        opts: &OpenOptions,
        parent_source: ParentSource<'_>,
    ) -> Result<(Self, Info)> {
        let name = storage.name().to_string();
        let writable = opts.writable && storage.is_writable();
        let file_size = storage.len()?;
        if file_size < 5 * 64 * 1024 {
            return Err(Error::corrupt(
                "VHDX file identifier",
                0,
                format!("file is {file_size} bytes, too short to be a VHDX"),
            )
            .in_file(&name, 0));
        }
        // 2.2.1 file type identifier.
        let ident_buf = read_vec(&*storage, 0, 520, "VHDX file identifier")?;
        let ident = FileIdentifier::parse(&ident_buf).in_file(&name, 0)?;

        // 2.2.2 headers: the valid one with the larger sequence number.
        let mut hdrs = Vec::with_capacity(2);
        for off in Header::OFFSETS {
            let buf = read_vec(&*storage, off, Header::SIZE as u64, "VHDX header")?;
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
            let log_buf = read_vec(
                &*storage,
                hdr.log_offset,
                u64::from(hdr.log_length),
                "VHDX log",
            )?;
            let seq = log::find_active_sequence(&log_buf, hdr.log_guid);
            log_entries = seq.len();
            if let Some((_, head)) = seq.last() {
                let flushed = head.flushed_file_offset;
                let last = head.last_file_offset;
                if flushed > file_size {
                    return Err(Error::corrupt(
                        "VHDX log entry",
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
        let mut rt_errs = Vec::new();
        let mut regions = None;
        for off in RegionTable::OFFSETS {
            let buf = read_vec(
                &*storage,
                off,
                RegionTable::SIZE as u64,
                "VHDX region table",
            )?;
            match RegionTable::parse(&buf).in_file(&name, off) {
                Ok(t) => {
                    regions = Some((off, t));
                    break;
                }
                Err(e) if e.kind() == disk::ErrorKind::Unsupported => return Err(e),
                Err(e) => rt_errs.push(e),
            }
        }
        let Some((rt_off, regions)) = regions else {
            return Err(no_region_table(&name, &rt_errs));
        };
        let bat_region = *regions.bat();
        let meta_region = *regions.metadata();

        // 2.2.4 / 2.6 metadata.
        if u64::from(meta_region.length) > MAX_METADATA_REGION {
            return Err(Error::unsupported(format!(
                "metadata region of {} bytes is larger than {MAX_METADATA_REGION}",
                meta_region.length
            ))
            .in_file(&name, 0));
        }
        // The table (64 KiB) first, then up to the end of its last item:
        // the rest of the region is unused.
        let meta_len = u64::from(meta_region.length);
        check_in_file(
            &*storage,
            meta_region.file_offset,
            meta_len,
            "VHDX metadata region",
        )?;
        let head = read_vec(
            &*storage,
            meta_region.file_offset,
            meta_len.min(TABLE_SIZE as u64),
            "VHDX metadata region",
        )?;
        let items_end = MetadataTable::parse(&head, meta_len)
            .in_file(&name, meta_region.file_offset)?
            .items_end()
            .min(meta_len);
        let meta_buf = if items_end > head.len() as u64 {
            read_vec(
                &*storage,
                meta_region.file_offset,
                items_end,
                "VHDX metadata region",
            )?
        } else {
            head
        };
        let (metadata_table, metadata) =
            Metadata::parse_start(&meta_buf, meta_len).in_file(&name, meta_region.file_offset)?;
        // Not held while the parent's chain opens below (a chain of 64
        // held 64 metadata regions at once).
        drop(meta_buf);

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
            // The BAT entry's Length field in the copy in use.
            let i = regions
                .entries
                .iter()
                .position(|e| e.guid == BAT_REGION)
                .unwrap_or(0);
            return Err(Error::corrupt(
                "VHDX region table",
                rt_off + (region_table::HEADER_SIZE + region_table::ENTRY_SIZE * i) as u64 + 24,
                format!(
                    "BAT region is {} bytes but the disk needs {} bytes of BAT",
                    bat_region.length,
                    bat_geo.bat_bytes()
                ),
            )
            .in_file(&name, 0));
        }
        let mut cur_len = storage.len()?;
        // New blocks go past every byte the BAT references, inside the file
        // or not (space kept for an unmapped block past the end; a block
        // of a file truncated since it was opened), at a 1 MiB boundary.
        // Only a writable open needs this scan, which also refuses a
        // truncated file.
        let mut alloc_end = cur_len;
        if writable {
            // What the driver writes besides blocks: the headers, the
            // log, the regions (BAT and metadata included).
            let mut structures = vec![(0, MIB), (hdr.log_offset, u64::from(hdr.log_length))];
            structures.extend(
                regions
                    .entries
                    .iter()
                    .map(|r| (r.file_offset, u64::from(r.length))),
            );
            let s = scan::scan(
                &*storage,
                bat_region.file_offset,
                &bat_geo,
                Some(&structures),
            )?;
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
                    "VHDX BAT",
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
            if let Some(o) = s.overlap {
                // Writing the block would overwrite the structure or block
                // it overlaps, or be overwritten by it: a flushed write
                // lost. (The check reports such entries as corruption.)
                let what = if o.kept {
                    format!("the space kept for {}", scan::describe(&bat_geo, o.index))
                } else {
                    scan::describe(&bat_geo, o.index)
                };
                let log_end = hdr.log_offset.saturating_add(u64::from(hdr.log_length));
                let with = if o.file_offset < MIB {
                    format!("the headers (0x0+{MIB:#x})")
                } else if let Some(r) = regions.overlapping(o.file_offset, o.length) {
                    format!(
                        "the {} ({:#x}+{:#x})",
                        region_name(r.guid),
                        r.file_offset,
                        r.length
                    )
                } else if o.file_offset < log_end
                    && hdr.log_offset < o.file_offset.saturating_add(o.length)
                {
                    format!("the log ({:#x}+{:#x})", hdr.log_offset, hdr.log_length)
                } else {
                    "the file space of an earlier BAT entry (`vdisk check` names it)".to_string()
                };
                return Err(Error::corrupt(
                    "BAT",
                    bat_region.file_offset + o.index * 8,
                    format!(
                        "{what} (BAT entry {}) at file offset {:#x}+{:#x} overlaps {with}: it \
                         opens read-only only, as writing would overwrite one with the other",
                        o.index, o.file_offset, o.length
                    ),
                )
                .in_file(&name, 0));
            }
            // A power cut between allocating blocks (the file grew) and
            // the flush that would have referenced them leaves space past
            // every structure that nothing references. The log is empty
            // now (replayed above), so the BAT in the file is the whole
            // truth: reclaim that tail as `check -r leaks` does (the same
            // code, which cuts only unreferenced space past the last
            // referenced byte). Only when the cheap bound says a tail may
            // be there: the check reads the whole BAT again.
            let structures_end = regions
                .entries
                .iter()
                .filter_map(RegionEntry::end)
                .chain([
                    MIB,
                    hdr.log_offset.saturating_add(u64::from(hdr.log_length)),
                    s.referenced_end,
                ])
                .max()
                .unwrap_or(MIB);
            if cur_len > structures_end.div_ceil(MIB).saturating_mul(MIB) {
                let check_opts = crate::check::CheckOptions {
                    check_parent: false,
                    ..Default::default()
                };
                // Only in an image with nothing else wrong: next to a
                // corrupt structure, the tail may hold the only copy of
                // data a bad BAT entry no longer points at.
                let report = crate::check::check(&*storage, &check_opts)?;
                if report.corruptions == 0 && report.leaks > 0 {
                    crate::check::repair(&*storage, disk::check::RepairMode::Leaks, &check_opts)?;
                    cur_len = storage.len()?;
                }
            }
            alloc_end = cur_len.max(s.referenced_end);
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
            kept_limit: scan::kept_limit(cur_len, &bat_geo),
            known_len: AtomicU64::new(cur_len),
            bitmaps: Mutex::new(BitmapCache::new(BITMAP_CACHE_PAGES)),
            parent,
            copy_up: disk::CopyUpLocks::default(),
            unapplied: Mutex::new(None),
            closed: AtomicBool::new(false),
            storage,
            info: info.clone(),
        };
        Ok((vhdx, info))
    }
}

/// The error for a file whose two region table copies both fail to parse
/// (`errs`, the first copy's first): names each copy and what is wrong
/// with it, at the first copy's offset.
fn no_region_table(name: &str, errs: &[Error]) -> Error {
    let at = match errs.first() {
        Some(Error::Corrupt { offset, .. }) => *offset,
        _ => RegionTable::OFFSETS[0],
    };
    let copies: Vec<String> = RegionTable::OFFSETS
        .iter()
        .zip(errs)
        .zip(["first", "second"])
        .map(|((off, e), which)| format!("{which} copy (at {off:#x}): {e}"))
        .collect();
    Error::corrupt(
        "VHDX region table",
        at,
        format!("no valid region table: {}", copies.join("; ")),
    )
    .in_file(name, 0)
}

/// How `open_inner` gets a differencing disk's parent.
pub(crate) enum ParentSource<'a> {
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
