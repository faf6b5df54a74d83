//! Creating a VHDX ([`Vhdx::create`] and its variants): dynamic, fixed
//! (every block allocated, FULLY_PRESENT) and differencing (a parent
//! locator naming the parent, which may be opened or only inspected).

use crate::bat::{BatEntry, BatGeometry, PayloadState};
use crate::bat_cache::{ENTRIES_PER_PAGE, PAGE_BYTES};
use crate::file_identifier::FileIdentifier;
use crate::header::Header;
use crate::image::MIB;
use crate::metadata::{FileParameters, Metadata, MAX_BLOCK_SIZE, MIN_BLOCK_SIZE};
use crate::parent_locator::ParentLocator;
use crate::parent_search::{parent_locator_for, parse_linkage};
use crate::region_table::{RegionEntry, RegionTable, BAT_REGION, METADATA_REGION};
use crate::{CreateOptions, Error, OpenOptions, Result, Vhdx};
use disk::{Geometry, ResultExt, Storage, VirtualDisk};
use std::path::Path;
use std::sync::Arc;
use uuid::Uuid;

impl Vhdx {
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

    pub(crate) fn create_inner(
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
    pub(crate) fn write_new(
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
        let meta_len: u32 = 1 << 20;
        let bat_offset = meta_offset + u64::from(meta_len);
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
                    length: meta_len,
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
        let mbuf = metadata.build_region(meta_len)?;
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
                // n ≤ ENTRIES_PER_PAGE: one 8-byte slot of the page each.
                for (i, slot) in (0..n).zip(page.chunks_exact_mut(8)) {
                    let e = if bat_geo.is_bitmap_index(idx + i) {
                        BatEntry(0)
                    } else {
                        let fo = payload_start + block * u64::from(opts.block_size);
                        block += 1;
                        BatEntry::new(PayloadState::FullyPresent as u8, fo)
                    };
                    slot.copy_from_slice(&e.0.to_le_bytes());
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
}

pub(crate) fn validate_create(o: &CreateOptions) -> Result<()> {
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
    if !o.block_size.is_power_of_two() || !(MIN_BLOCK_SIZE..=MAX_BLOCK_SIZE).contains(&o.block_size)
    {
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
