//! Changing a differencing disk's parent: a new parent locator through the
//! log ([`Vhdx::set_parent_locator`]), pointing a child at another parent
//! ([`Vhdx::set_parent`]) and turning it into a disk of its own
//! ([`Vhdx::make_standalone`]).

use crate::bat::{BatEntry, PayloadState};
use crate::bat_cache::{ENTRIES_PER_PAGE, PAGE_BYTES};
use crate::image::{read_vec, MIB, MIB_BYTES};
use crate::metadata::{FileParameters, Metadata, MetadataTable, PARENT_LOCATOR};
use crate::parent_locator::ParentLocator;
use crate::parent_search::{linkage_string, parent_locator_for};
use crate::region_table::METADATA_REGION;
use crate::{Error, OpenOptions, Result, Vhdx};
use disk::{Mapping, ResultExt};
use std::path::Path;
use std::sync::Arc;

impl Vhdx {
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
                match usize::try_from(at) {
                    Ok(at) if at as u64 + bytes.len() as u64 <= len => at,
                    _ => {
                        return Err(Error::invalid(format!(
                            "the new parent locator ({} bytes) does not fit in the metadata region of {name}",
                            bytes.len()
                        )))
                    }
                }
            };
            region[old_off..old_off + old_len].fill(0);
            region[new_off..new_off + bytes.len()].copy_from_slice(&bytes);
            // Inside the metadata region, whose length is a u32.
            let inside = |n: usize| {
                u32::try_from(n).map_err(|_| Error::invalid("metadata region larger than 4 GiB"))
            };
            e.offset = inside(new_off)?;
            e.length = inside(bytes.len())?;
            Ok(())
        })?;
        self.flush_with(pages)
    }

    /// Apply `edit` to a copy of the metadata region (its table and bytes),
    /// check that the result parses, and return the changed 4 KiB pages with
    /// their file offsets, for logging.
    pub(crate) fn edit_metadata(
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
        let old = read_vec(
            &*self.storage,
            meta.file_offset,
            len,
            "VHDX metadata region",
        )?;
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
        let zeros = vec![0u8; MIB_BYTES];
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
    /// The new parent's own chain is opened under `parent_opts`, whose
    /// opener also reaches the child.
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
        // The child through the caller's opener (as the parent), so that
        // the files are reached the same way (a journal, a fault injector).
        let rw = OpenOptions {
            writable: true,
            keep_data_write_guid: true,
            opener: parent_opts.opener.clone(),
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
}
