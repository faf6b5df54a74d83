//! Relinking a differencing VHD to a moved or adopted parent
//! ([`Vhd::set_parent`], like Hyper-V's `Set-VHD -ParentPath`): the
//! dynamic disk header's parent fields and locators are rewritten in place,
//! the new locator data going into the existing locator data spaces, so
//! that no block moves. The crash-safe order of the writes is in the docs
//! of [`Vhd::set_parent`].

use crate::bat::{SECTOR, UNALLOCATED};
use crate::block_map::Dyn;
use crate::dynamic_header::{DynamicHeader, HEADER_SIZE, LOCATORS};
use crate::footer::{fourcc, DiskType, FOOTER_SIZE};
use crate::image::{buf_len, lock, overlaps, FooterSource, Info, OpenOptions, Vhd};
use crate::open::{check_parent_size, Loaded, ParentSource};
use crate::parent_locator::{encode_path, ParentLocator, MAX_DATA, W2KU, W2RU};
use crate::parent_search::{parent_link_for, ParentLink};
use crate::{Error, Result};
use disk::{LockMode, ResultExt, Storage, VirtualDisk};
use std::path::Path;

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
fn protected_ranges(info: &Info, d: &Dyn, header: &DynamicHeader) -> Vec<(u64, u64)> {
    let mut out = vec![
        (0, FOOTER_SIZE as u64),
        (info.footer.data_offset, HEADER_SIZE as u64),
        (header.table_offset, u64::from(header.max_table_entries) * 4),
        (info.footer_offset, u64::MAX - info.footer_offset),
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

/// Refuse to rewrite a header that a power cut could tear: it must lie in
/// one 4 KiB page (it does in every layout seen: Virtual PC, Windows, QEMU
/// and this library put it at offset 512).
pub(crate) fn check_header_page(name: &str, hdr_off: u64) -> Result<()> {
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
pub(crate) fn inspect_for_rewrite(storage: &dyn Storage, what: &str) -> Result<Loaded> {
    let name = storage.name().to_string();
    let v = Vhd::load(storage, &OpenOptions::default(), ParentSource::Inspect)?;
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
        let storage = parent_opts.opener.open(child, true, LockMode::Auto)?;
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
        storage: Box<dyn Storage>,
        new_parent: &Vhd,
        link: &ParentLink,
        adopt: bool,
    ) -> Result<()> {
        let name = storage.name().to_string();
        let child = inspect_for_rewrite(&*storage, "change the parent")?;
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
        let protected = protected_ranges(&child.info, d, header);
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
        let datas = [
            (W2KU, encode_path(&link.absolute), &link.absolute),
            (W2RU, encode_path(&link.relative), &link.relative),
        ];
        let mut lens = [0u32; 2];
        for (len, (code, data, path)) in lens.iter_mut().zip(&datas) {
            *len = u32::try_from(data.len())
                .ok()
                .filter(|&l| l > 0 && l <= MAX_DATA)
                .ok_or_else(|| {
                    Error::invalid(format!(
                        "the {} parent path \"{path}\" is empty or too long",
                        fourcc(code)
                    ))
                    .in_file(&name, 0)
                })?;
        }
        // Larger first, each into its own code's space if it fits, else the
        // smallest free one that does (with two paths this finds a fit
        // whenever one exists).
        let mut order = [0usize, 1];
        order.sort_by_key(|&i| std::cmp::Reverse(datas[i].1.len()));
        let mut chosen: [Option<usize>; 2] = [None, None];
        for i in order {
            let len = u64::from(lens[i]);
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
        h.parent_locators = [ParentLocator::default(); LOCATORS];
        let mut writes = Vec::new();
        for (i, (code, data, _)) in datas.iter().enumerate() {
            let s = spaces[chosen[i].unwrap_or_default()];
            h.parent_locators[i] = ParentLocator {
                platform_code: *code,
                data_space: s.data_space,
                data_length: lens[i],
                reserved: 0,
                data_offset: s.offset,
            };
            // Zero what is left of the old data, so that an old header
            // reading this space after a crash sees the new path (or a
            // truncated one), never a mix with the old.
            let mut buf = data.clone();
            buf.resize(data.len().max(buf_len(s.old_len)?), 0);
            writes.push((s.offset, buf));
        }
        let mut hbuf = [0u8; HEADER_SIZE];
        h.write_to(&mut hbuf);

        for (off, buf) in &writes {
            storage.write_at(buf, *off)?;
        }
        storage.flush()?;
        storage.write_at(&hbuf, hdr_off)?;
        storage.flush()
    }
}
