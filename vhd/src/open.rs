//! Opening a VHD ([`Vhd::open`] and its variants, [`Vhd::inspect`]): find
//! the footer (the last 512 bytes, the last 511 of images made before
//! Virtual PC 2004, or the copy at offset 0 of a dynamic disk whose
//! trailing footer is damaged, then read-only), validate the dynamic disk
//! header and the BAT against the file, and find a differencing disk's
//! parent (`parent_search`). A writable open of an image with nothing else
//! wrong gives back a leak before the footer: a block allocated before a
//! crash that no flushed BAT entry references.

use crate::bat::{Bat, SECTOR, UNALLOCATED};
use crate::block_map::{Dyn, DynState};
use crate::dynamic_header::{DynamicHeader, HEADER_SIZE};
use crate::footer::{DiskType, Footer, FOOTER_SIZE, OLD_FOOTER_SIZE};
use crate::image::{overlaps, read_vec, FooterSource, Info, OpenOptions, Vhd};
use crate::parent_locator::read_locators;
use crate::parent_search::find_parent;
use crate::{sector_bitmap, Error, Result};
use disk::parent::ChainSearch;
use disk::{ResultExt, Storage, VirtualDisk};
use std::collections::{BTreeSet, HashMap};
use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicBool;
use std::sync::{Arc, Mutex};

/// What [`Vhd::load`] reads from a VHD: all an open image holds but its
/// storage and locks.
pub(crate) struct Loaded {
    pub(crate) writable: bool,
    pub(crate) read_only_reason: Option<String>,
    pub(crate) footer_bytes: [u8; FOOTER_SIZE],
    pub(crate) virtual_size: u64,
    pub(crate) dynamic: Option<Dyn>,
    pub(crate) parent: Option<Arc<dyn VirtualDisk>>,
    pub(crate) differencing: bool,
    pub(crate) info: Info,
    /// Bytes of payload area past every block and the BAT, before the
    /// trailing footer (0 for a fixed disk): space a power cut left
    /// between allocating a block and the flush that would have referenced
    /// it, or locator data.
    pub(crate) unreferenced_tail: u64,
}

impl Vhd {
    /// Open the VHD file at `path`.
    ///
    /// A differencing disk's parent is found by its locators (see
    /// `parent_candidates`) and opened read-only, recursively (at
    /// most [`MAX_CHAIN`](crate::MAX_CHAIN) images deep; loops are refused). The parent must
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

    pub(crate) fn open_path(
        path: &Path,
        opts: &OpenOptions,
        chain: &mut ChainSearch,
    ) -> Result<Self> {
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
    /// `opts` (a shared claim by default; [`disk::LockMode::ForceShare`] to read
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
    pub(crate) fn find_footer(
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
        // Any file longer than one footer: its first 512 bytes are not the
        // tail just parsed (a dynamic disk cut inside its header still has
        // its footer copy, and the error then says where it is cut).
        if file_len > FOOTER_SIZE as u64 {
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

    /// Open the VHD on `storage`: [`Vhd::load`] its structures and keep
    /// the storage.
    pub(crate) fn open_inner(
        storage: Box<dyn Storage>,
        opts: &OpenOptions,
        parent_source: ParentSource<'_>,
    ) -> Result<Self> {
        let mut l = Self::load(&*storage, opts, parent_source)?;
        if l.writable
            && l.dynamic
                .as_ref()
                .is_some_and(|d| l.unreferenced_tail >= d.bitmap_size + d.block_size)
        {
            // A block's worth of space before the footer that no BAT entry
            // references: a block allocated before a power cut whose flush
            // never came (the footer moves first). Reclaim it as `check -r
            // leaks` does (the same code: the footer written again after the
            // last used structure, synced, then the file cut after it; it
            // knows locator data, which the bound above does not), then
            // load again with the parent already found.
            let check_opts = crate::check::CheckOptions {
                check_parent: false,
                ..Default::default()
            };
            // Only in an image with nothing else wrong: next to a corrupt
            // structure, the space may hold the only copy of data a bad
            // BAT entry no longer points at.
            let report = crate::check::check(&*storage, &check_opts)?;
            if report.corruptions == 0
                && report.leaks > 0
                && crate::check::repair(&*storage, disk::check::RepairMode::Leaks, &check_opts)?
                    .leaks_fixed
                    > 0
            {
                let again = match l.parent.clone() {
                    Some(p) => ParentSource::Given(p),
                    None => ParentSource::Inspect,
                };
                l = Self::load(&*storage, opts, again)?;
            }
        }
        Ok(Vhd {
            storage,
            writable: l.writable,
            read_only_reason: l.read_only_reason,
            footer_bytes: l.footer_bytes,
            virtual_size: l.virtual_size,
            dynamic: l.dynamic,
            parent: l.parent,
            differencing: l.differencing,
            flush_lock: Mutex::new(()),
            copy_up: disk::CopyUpLocks::default(),
            closed: AtomicBool::new(false),
            info: l.info,
        })
    }

    /// Read and validate the VHD on `storage`: its footer, and for a
    /// dynamic or differencing disk its header and BAT (every allocated
    /// block inside the data area, overlapping no structure), and get a
    /// differencing disk's parent from `parent_source`.
    ///
    /// # Errors
    /// Not a VHD, corrupt structures, a parent that cannot be found or is
    /// not this disk's parent.
    pub(crate) fn load(
        storage: &dyn Storage,
        opts: &OpenOptions,
        parent_source: ParentSource<'_>,
    ) -> Result<Loaded> {
        let name = storage.name().to_string();
        let file_len = storage.len()?;
        let (footer, footer_offset, source, mut warnings) = Self::find_footer(storage, file_len)?;
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
        let mut unreferenced_tail = 0;
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
                    if let Some(e) = truncated_header_error(storage, hdr_off, end, file_len)? {
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
                let hbuf = read_vec(storage, hdr_off, HEADER_SIZE as u64)?;
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
                let tbuf = read_vec(storage, table_off, needed * 4)?;
                let batv = Bat::parse(&tbuf).in_file(&name, table_off)?;
                // Not held while the parent's chain opens below.
                drop(tbuf);
                let bm = sector_bitmap::size(header.block_size);
                let mut allocated = 0u64;
                let mut truncated = 0u64;
                let mut max_end = table_off + table_bytes;
                // The data of a writable differencing disk's parent
                // locators: a write to a block over it would change the
                // parent link.
                let locators: Vec<(usize, u64, u64)> =
                    if writable && footer.disk_type == DiskType::Differencing {
                        header
                            .locators()
                            .map(|(k, l)| (k, l.data_offset, u64::from(l.data_length)))
                            .collect()
                    } else {
                        Vec::new()
                    };
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
                    } else if let Some((k, off, n)) = locators
                        .iter()
                        .find(|&&(_, off, n)| overlaps(start, len, off, n))
                    {
                        Some(format!(
                            "overlaps the data of parent locator {k} ({n} bytes at {off:#x}): a \
                             write to it would change the parent link (open it read-only)"
                        ))
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
                if writable {
                    if let Some((i, j)) = overlapping_blocks(&batv.entries, bm + bs) {
                        let (a, b) = (batv.entries[i], batv.entries[j]);
                        return Err(Error::corrupt(
                            "VHD BAT",
                            table_off + j as u64 * 4,
                            format!(
                                "block {j} at sector {b:#x} overlaps block {i} at sector {a:#x}: \
                                 a write to one would change the other (open it read-only; \
                                 `vdisk check` lists them)"
                            ),
                        )
                        .in_file(&name, 0));
                    }
                }
                info.allocated_blocks = allocated;
                info.truncated_blocks = truncated;
                if source != FooterSource::CopyAtStart && truncated == 0 {
                    unreferenced_tail = end.saturating_sub(max_end);
                }
                if footer.disk_type == DiskType::Differencing {
                    info.parent_locators = read_locators(storage, &header, file_len);
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
        Ok(Loaded {
            writable,
            read_only_reason,
            footer_bytes,
            virtual_size,
            dynamic,
            parent,
            differencing,
            info,
            unreferenced_tail,
        })
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

/// How [`Vhd::load`] gets a differencing disk's parent.
pub(crate) enum ParentSource<'a> {
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

/// Refuse a parent whose virtual size is not the child's `size`.
pub(crate) fn check_parent_size(name: &str, parent: &dyn VirtualDisk, size: u64) -> Result<()> {
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

/// The error for a parent given for a disk that is not differencing.
fn not_differencing(name: &str, parent: &dyn VirtualDisk) -> Error {
    Error::invalid(format!(
        "a parent ({}) was given, but this VHD is not a differencing disk",
        parent.storage().name()
    ))
    .in_file(name, 0)
}

/// Two allocated BAT entries whose blocks (`block_len` bytes each, bitmap
/// included) share file space: `(i, j)` with `i` the lower place. Only a
/// writable open asks (a write to one block would change the other's
/// data); the sort takes 4 bytes an allocated entry.
fn overlapping_blocks(entries: &[u32], block_len: u64) -> Option<(usize, usize)> {
    let mut starts: Vec<u32> = entries
        .iter()
        .copied()
        .filter(|&e| e != UNALLOCATED)
        .collect();
    starts.sort_unstable();
    let (a, b) = starts
        .windows(2)
        .map(|w| (w[0], w[1]))
        .find(|&(a, b)| u64::from(b - a) * SECTOR < block_len)?;
    let i = entries.iter().position(|&e| e == a)?;
    let j = entries
        .iter()
        .enumerate()
        .position(|(k, &e)| e == b && k != i)?;
    Some((i, j))
}

#[cfg(test)]
// Test images are a few MiB: their offsets and sizes fit any integer type.
#[allow(clippy::cast_possible_truncation)]
mod tests {
    use super::*;
    use crate::image::testutil::mem;
    use crate::image::MIB;
    use disk::MemStorage;

    #[test]
    fn overlapping_blocks_are_found_and_named() {
        let len = 512 + 4096; // a bitmap sector and 8 sectors of data
        let u = UNALLOCATED;
        assert_eq!(
            overlapping_blocks(&[u, 10, 19, 28, u], len),
            None,
            "adjacent"
        );
        assert_eq!(
            overlapping_blocks(&[u, 28, 10, u, 19], len),
            None,
            "any order"
        );
        assert_eq!(
            overlapping_blocks(&[10, u, 18], len),
            Some((0, 2)),
            "one sector shared"
        );
        assert_eq!(
            overlapping_blocks(&[40, 10, 28, 10], len),
            Some((1, 3)),
            "one place"
        );
        assert_eq!(overlapping_blocks(&[u, u], len), None);
        assert_eq!(overlapping_blocks(&[], len), None);
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
