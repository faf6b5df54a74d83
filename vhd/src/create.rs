//! Creating a VHD: fixed and dynamic disks ([`Vhd::create`],
//! [`Vhd::create_on`]) and differencing disks over a parent
//! ([`Vhd::create_differencing`] and its variants, including the O(1) reuse
//! of a blank spare child).
//!
//! Layout of what this library creates (VHD specification, 2006): a fixed
//! disk is its data then the footer; a dynamic or differencing disk is the
//! footer copy at 0, the dynamic disk header at 512, the BAT at 1536 (all
//! entries unallocated, padded to whole sectors), for a differencing disk
//! the `W2ku` then `W2ru` locator data, then the footer. Blocks are
//! appended where the footer is (see `block_map`).

use crate::bat::SECTOR;
use crate::dynamic_header::{DynamicHeader, HEADER_SIZE};
use crate::footer::{
    ChsGeometry, DiskType, Footer, FEATURES_RESERVED, FIXED_DATA_OFFSET, FOOTER_SIZE, VERSION,
};
use crate::image::{CreateOptions, OpenOptions, Vhd, MAX_VIRTUAL_SIZE, MIB};
use crate::open::ParentSource;
use crate::parent_locator::{encode_path, ParentLocator, MAX_DATA, W2KU, W2RU};
use crate::parent_search::{parent_link_for, ParentLink};
use crate::{Error, Result};
use disk::{LockMode, ResultExt, Storage, VirtualDisk};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use uuid::Uuid;

impl Vhd {
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
        // Through the caller's opener, like the child (fault injection and
        // power-cut journals see both).
        let popts = OpenOptions {
            opener: opts.opener.clone(),
            ..OpenOptions::default()
        };
        let parent = Vhd::open(&parent_abs, &popts)?;
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
    pub(crate) fn differencing_parent(
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
}

/// The creator version this library records: its major and minor version.
fn creator_version() -> u32 {
    (env!("CARGO_PKG_VERSION_MAJOR").parse::<u32>().unwrap_or(0) << 16)
        | env!("CARGO_PKG_VERSION_MINOR").parse::<u32>().unwrap_or(0)
}

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

/// Write a new differencing VHD onto `storage`: footer (and its copy),
/// dynamic header naming the parent whose footer is `pf`, an all-"not
/// present" BAT (unless `bat` says it is already there), and the parent
/// locators of `link`; then flush. VHD specification (2006), "Dynamic Disk
/// Header Format" and "Hard Disk Footer Format".
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
    let mut at = table_offset + table_len;
    let mut datas = Vec::new();
    for (i, (code, path)) in [(W2KU, &link.absolute), (W2RU, &link.relative)]
        .into_iter()
        .enumerate()
    {
        let data = encode_path(path);
        let len = u32::try_from(data.len())
            .ok()
            .filter(|&l| l > 0 && l <= MAX_DATA)
            .ok_or_else(|| {
                Error::invalid(format!("parent path \"{path}\" is empty or too long"))
                    .in_file(&name, 0)
            })?;
        // At most MAX_DATA (64 KiB) rounded up to a sector: no overflow.
        let space32 = len.div_ceil(512) * 512;
        let space = u64::from(space32);
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
            data_space: space32,
            data_length: len,
            reserved: 0,
            data_offset: at,
        };
        // Zero-padded to the whole space (a reused spare may hold a
        // longer path there).
        let mut data = data;
        data.resize(data.len().next_multiple_of(512), 0);
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

/// Refuse options `create` cannot honour: the size, block size and Azure
/// rules of [`CreateOptions`].
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
    if !o.fixed && (!o.block_size.is_power_of_two() || !(4096..=256 << 20).contains(&o.block_size))
    {
        return Err(Error::invalid(format!(
            "block size {} is not a power of two from 4 KiB to 256 MiB",
            o.block_size
        )));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use disk::MemStorage;

    /// Files opened or created through it, in order.
    #[derive(Debug, Default)]
    struct Recording(std::sync::Mutex<Vec<(std::path::PathBuf, &'static str)>>);

    impl disk::Opener for Recording {
        fn open(
            &self,
            path: &Path,
            writable: bool,
            lock: disk::LockMode,
        ) -> Result<Box<dyn Storage>> {
            self.0.lock().unwrap().push((path.to_path_buf(), "open"));
            disk::FileOpener.open(path, writable, lock)
        }
        fn create(&self, path: &Path, overwrite: bool) -> Result<Box<dyn Storage>> {
            self.0.lock().unwrap().push((path.to_path_buf(), "create"));
            disk::FileOpener.create(path, overwrite)
        }
    }

    #[test]
    fn a_differencing_disk_opens_its_parent_through_the_callers_opener() {
        let dir = tempfile::tempdir().unwrap();
        let (parent, child) = (dir.path().join("p.vhd"), dir.path().join("c.vhd"));
        Vhd::create(&parent, &CreateOptions::new(4 * MIB), false)
            .unwrap()
            .close()
            .unwrap();
        let rec = Arc::new(Recording::default());
        let mut o = CreateOptions::new(4 * MIB);
        o.opener = rec.clone();
        Vhd::create_differencing(&child, &parent, &o, false)
            .unwrap()
            .close()
            .unwrap();
        let seen = rec.0.lock().unwrap().clone();
        assert!(seen.contains(&(parent.clone(), "open")), "{seen:?}");
        assert!(seen.contains(&(child.clone(), "create")), "{seen:?}");
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
}
