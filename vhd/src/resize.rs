//! Changing the virtual size of a VHD ([`Vhd::resize`]) open writable: the
//! image is flushed, the structures are read again from the file and
//! rewritten there in the order below, then read again into the open image.
//!
//! # Size rules
//! A disk whose current size is a size CHS describes exactly (what `create`
//! makes without Azure mode, what Virtual PC and `qemu-img` make) gets the
//! new size rounded up the same way, with the matching geometry (2006 VHD
//! specification, appendix "CHS calculation"). A disk whose current size is
//! not CHS-rounded (Azure) keeps that convention: the new size must be a
//! whole number of MiB and the footer records it exactly.
//!
//! # Crash safety
//! The trailing footer is the commit point: a reader uses it, and only
//! falls back to the copy at offset 0 (read-only) when it is damaged. Every
//! step before it leaves a valid image at the old size; every step after it
//! only tidies.
//!
//! Fixed disk, growing: the new footer at the new end, sync (commit; the
//! old footer's bytes are now inside the disk), zero the old footer and any
//! bytes between the old size and the new footer, sync. Shrinking: the new
//! footer at the new size, sync (until the file is cut the old footer at the
//! end is still the one read, at the old size), truncate, sync.
//!
//! Dynamic disk, growing: (1) BAT entries past the old block count are made
//! unallocated (they are ignored at the old size), and the old last block's
//! bytes past the old size zeroed, sync; (2) when the BAT needs more space
//! than there is before the first block, the blocks in the way are moved to
//! the end of the file one at a time, as an allocation does (the footer at
//! the new end, sync; the block's bitmap and data copied over the old
//! footer, sync; its BAT entry, sync), then the freed space is filled with
//! unallocated entries, sync; (3) the header's max table entries, sync
//! (harmless at the old size: the extra entries are unallocated and nothing
//! else lies there); (4) the footer copy at 0, sync; (5) the trailing
//! footer, sync: the new size. A crash between (4) and (5) leaves the copy
//! at 0 disagreeing with the trailing footer, which is the one used.
//! Shrinking: the footer copy at 0, then the trailing footer (commit), each
//! synced, then the BAT entries past the new end unallocated, sync. Until
//! then they are ignored (a reader only reads the entries the size needs),
//! and a later grow clears them first anyway. Then the file gives back its
//! tail that nothing uses any more, as `compact` cuts the file (step 3 of
//! its module docs): the footer (the same bytes) after the last structure
//! or block still in use, sync, the file truncated just after it, sync.
//! Nothing on disk refers to the space the new footer goes into (the
//! entries of the blocks that were there are unallocated and synced, or
//! ignored at the new size), and until the truncation persists the old
//! trailing footer, identical, is still the last 512 bytes: a crash leaves
//! the new size either way, at worst with a leaked tail. Blocks freed below
//! the last one kept stay as unused space (not a leak: `vdisk compact`
//! packs blocks into it).

use crate::bat::{Bat, SECTOR, UNALLOCATED};
use crate::dynamic_header::{DynamicHeader, HEADER_SIZE};
use crate::footer::{ChsGeometry, DiskType, Footer, FOOTER_SIZE};
use crate::image::{
    overlaps, read_vec, FooterSource, Info, OpenOptions, Vhd, MAX_VIRTUAL_SIZE, MIB,
};
use crate::open::ParentSource;
use crate::{sector_bitmap, Error, Result};
use disk::{ResultExt, Storage};
use std::sync::atomic::Ordering;

/// Bytes read at a time when looking for data in a cut part.
const COPY_CHUNK: usize = 1 << 20;

impl Vhd {
    /// Resize this VHD, open writable, to `new_size` bytes (rounded as the
    /// size rules of the module docs of `resize` say); returns the size now
    /// recorded. Shrinking refuses when the cut part holds data (a fixed
    /// disk: a non-zero byte; a dynamic disk: an allocated block wholly
    /// past the new end), unless `force`. The image is flushed first; it
    /// stays open and usable at the new size. See the module docs of
    /// `resize` for the order of the writes.
    ///
    /// # Errors
    /// A differencing disk (its size must match its parent's), a trailing
    /// footer that is not the last 512 bytes of the file, an image open
    /// read-only or closed, an invalid size, data in the cut part without
    /// `force`, corrupt structures, I/O errors.
    pub fn resize(&mut self, new_size: u64, force: bool) -> Result<u64> {
        let name = self.name().to_string();
        if self.info.footer.disk_type == DiskType::Differencing {
            return Err(Error::invalid(
                "cannot resize a differencing disk: its size must match its parent's",
            )
            .in_file(&name, 0));
        }
        if self.info.footer_source != FooterSource::End {
            return Err(Error::unsupported(
                "the footer is not the last 512 bytes of the file (convert the image first)",
            )
            .in_file(&name, 0));
        }
        self.check_writable()?;
        // The in-memory BAT and bitmaps reach the file: from here on the
        // file is the truth, read again and rewritten.
        self.flush_inner()?;
        let info = Self::load(
            &*self.storage,
            &OpenOptions::default(),
            ParentSource::Inspect,
        )?
        .info;
        let (size, geometry) = Self::resize_target(&info.footer, new_size).in_file(&name, 0)?;
        let mut footer = info.footer.clone();
        footer.current_size = size;
        footer.geometry = geometry;
        if size == info.virtual_size && footer == info.footer {
            return Ok(size);
        }
        let r = Resizer {
            st: &*self.storage,
            name: &name,
            footer_bytes: footer.to_bytes(),
        };
        let done = match info.header.clone() {
            None => r.fixed(&info, size, force),
            Some(h) => r.dynamic(&info, &h, size, force),
        };
        // The file changed under the in-memory state (even when the resize
        // failed part way): read it again, or close the image so that a
        // stale BAT is never written back.
        let reloaded = self.reload();
        if reloaded.is_err() {
            self.closed.store(true, Ordering::Release);
        }
        done?;
        reloaded?;
        Ok(size)
    }

    /// Read this image's structures again from its file, after a resize
    /// rewrote them (a fixed or dynamic disk: no parent).
    fn reload(&mut self) -> Result<()> {
        let opts = OpenOptions {
            writable: self.writable,
            ..OpenOptions::default()
        };
        let l = Self::load(&*self.storage, &opts, ParentSource::Inspect)?;
        self.writable = l.writable;
        self.read_only_reason = l.read_only_reason;
        self.footer_bytes = l.footer_bytes;
        self.virtual_size = l.virtual_size;
        self.dynamic = l.dynamic;
        self.info = l.info;
        Ok(())
    }

    /// The size a resize to `requested` bytes would give the disk whose
    /// footer is `footer` (see the size rules of `resize`).
    ///
    /// # Errors
    /// Zero or above [`MAX_VIRTUAL_SIZE`], or not a whole number of MiB for
    /// a disk that is not CHS-rounded.
    pub fn resize_target(footer: &Footer, requested: u64) -> Result<(u64, ChsGeometry)> {
        if requested == 0 || requested > MAX_VIRTUAL_SIZE {
            return Err(Error::invalid(format!(
                "new size {requested} must be from 1 byte to 2040 GiB ({MAX_VIRTUAL_SIZE} bytes), \
                 the VHD limit"
            )));
        }
        let cur = footer.disk_size();
        if ChsGeometry::round_up(cur).0 == cur {
            return Ok(ChsGeometry::round_up(requested));
        }
        if !requested.is_multiple_of(MIB) {
            return Err(Error::invalid(format!(
                "this disk's size is not CHS-rounded (Azure): the new size must be a whole \
                 number of MiB; {requested} bytes is not (use {} bytes)",
                requested.div_ceil(MIB) * MIB
            )));
        }
        Ok((requested, ChsGeometry::from_sectors(requested / SECTOR)))
    }
}

struct Resizer<'a> {
    st: &'a dyn Storage,
    name: &'a str,
    footer_bytes: [u8; FOOTER_SIZE],
}

impl Resizer<'_> {
    /// The first non-zero byte in `[off, end)`, if any.
    fn first_nonzero(&self, off: u64, end: u64) -> Result<Option<u64>> {
        let mut buf = vec![0u8; COPY_CHUNK];
        let mut at = off;
        while at < end {
            let n = usize::try_from(end - at).map_or(COPY_CHUNK, |r| r.min(COPY_CHUNK));
            self.st.read_at(&mut buf[..n], at)?;
            if let Some(i) = buf[..n].iter().position(|&b| b != 0) {
                return Ok(Some(at + i as u64));
            }
            at += n as u64;
        }
        Ok(None)
    }

    fn fixed(&self, info: &Info, size: u64, force: bool) -> Result<()> {
        let old = info.virtual_size;
        let f = info.footer_offset;
        if size > old {
            if size <= f {
                // Slack before the footer: zero it, then the footer in place.
                disk::fill_range(self.st, old, size - old, 0)?;
                self.st.flush()?;
                self.st.write_at(&self.footer_bytes, f)?;
                return self.st.flush();
            }
            let nf = size.max(f + FOOTER_SIZE as u64);
            self.st.write_at(&self.footer_bytes, nf)?;
            self.st.flush()?;
            disk::fill_range(self.st, old, nf - old, 0)?;
            return self.st.flush();
        }
        if !force {
            if let Some(at) = self.first_nonzero(size, old)? {
                return Err(Error::invalid(format!(
                    "the part past the new end ({size} bytes) holds data (first non-zero byte at \
                     virtual offset {at}): shrinking would lose it (use --force to discard it)"
                ))
                .in_file(self.name, 0));
            }
        }
        self.st.write_at(&self.footer_bytes, size)?;
        self.st.flush()?;
        self.st.set_len(size + FOOTER_SIZE as u64)?;
        self.st.flush()
    }

    fn write_entry(&self, table: u64, i: u64, e: u32) -> Result<()> {
        self.st.write_at(&e.to_be_bytes(), table + i * 4)
    }

    fn dynamic(&self, info: &Info, h: &DynamicHeader, size: u64, force: bool) -> Result<()> {
        let name = self.name;
        let old = info.virtual_size;
        let bs = u64::from(h.block_size);
        let bm = sector_bitmap::size(h.block_size);
        let t = h.table_offset;
        let m = u64::from(h.max_table_entries);
        let mut bat = Bat::parse(&read_vec(self.st, t, m * 4)?).in_file(name, t)?;
        let old_blocks = old.div_ceil(bs);
        let new_blocks = size.div_ceil(bs);
        let mut end = info.footer_offset;
        if size < old {
            if !force {
                if let Some(b) = (new_blocks..old_blocks).find(|&b| bat.block_offset(b).is_some()) {
                    return Err(Error::invalid(format!(
                        "block {b} (virtual offset {}) lies past the new end ({size} bytes) and \
                         is allocated: shrinking would lose its data (use --force to discard it)",
                        b * bs
                    ))
                    .in_file(name, 0));
                }
            }
            self.commit_footers(end)?;
            for b in new_blocks..old_blocks {
                if bat.block_offset(b).is_some() {
                    bat.set(b, UNALLOCATED);
                    self.write_entry(t, b, UNALLOCATED)?;
                }
            }
            self.st.flush()?;
            return self.cut_tail(info, h, &bat, new_blocks, end);
        }
        // (1) Stale entries past the old block count; the old last block's tail.
        for b in old_blocks..m {
            if bat.block_offset(b).is_some() {
                bat.set(b, UNALLOCATED);
                self.write_entry(t, b, UNALLOCATED)?;
            }
        }
        if !old.is_multiple_of(bs) {
            if let Some(off) = bat.block_offset(old_blocks - 1) {
                let from = old % bs;
                disk::fill_range(self.st, off + bm + from, bs - from, 0)?;
            }
        }
        self.st.flush()?;
        if new_blocks > m {
            let new_m = u32::try_from(new_blocks)
                .ok()
                .filter(|&n| n != u32::MAX)
                .ok_or_else(|| Error::invalid("too many blocks for a VHD BAT").in_file(name, 0))?;
            let old_table_end = t + m * 4;
            let table_end = t + (new_blocks * 4).div_ceil(SECTOR) * SECTOR;
            let hdr = info.footer.data_offset;
            if overlaps(
                old_table_end,
                table_end - old_table_end,
                hdr,
                HEADER_SIZE as u64,
            ) {
                return Err(Error::unsupported(
                    "the BAT cannot grow: the dynamic disk header follows it",
                )
                .in_file(name, 0));
            }
            // (2) Move the blocks in the way, lowest first.
            let mut in_way: Vec<(u64, u64)> = (0..old_blocks)
                .filter_map(|b| bat.block_offset(b).map(|o| (o, b)))
                .filter(|&(o, _)| overlaps(o, bm + bs, old_table_end, table_end - old_table_end))
                .collect();
            in_way.sort_unstable();
            if end < table_end {
                // The table reaches past the trailing footer: move it out.
                end = table_end;
                self.st.write_at(&self.old_footer(info)?, end)?;
                self.st.flush()?;
            }
            for (from, b) in in_way {
                let to = end;
                let new_end = to
                    .checked_add(bm + bs)
                    .filter(|e| e / SECTOR < u64::from(UNALLOCATED))
                    .ok_or_else(|| {
                        Error::invalid("the file would exceed the VHD maximum").in_file(name, 0)
                    })?;
                self.st.write_at(&self.old_footer(info)?, new_end)?;
                self.st.flush()?;
                disk::copy_range(self.st, from, to, bm + bs)?;
                self.st.flush()?;
                let sector = u32::try_from(to / SECTOR).map_err(|_| {
                    Error::invalid("the file would exceed the VHD maximum").in_file(name, 0)
                })?;
                bat.set(b, sector);
                self.write_entry(t, b, sector)?;
                self.st.flush()?;
                end = new_end;
            }
            disk::fill_range(self.st, old_table_end, table_end - old_table_end, 0xff)?;
            self.st.flush()?;
            // (3) The header.
            let mut hdr_v = h.clone();
            hdr_v.max_table_entries = new_m;
            let mut hbuf = [0u8; HEADER_SIZE];
            hdr_v.write_to(&mut hbuf);
            self.st.write_at(&hbuf, hdr)?;
            self.st.flush()?;
        }
        // (4), (5)
        self.commit_footers(end)
    }

    /// After a shrink: move the trailing footer at `footer_at` to just
    /// after the last structure or block (of the first `blocks`) still in
    /// use, and cut the file there (module docs).
    fn cut_tail(
        &self,
        info: &Info,
        h: &DynamicHeader,
        bat: &Bat,
        blocks: u64,
        footer_at: u64,
    ) -> Result<()> {
        let slot = sector_bitmap::size(h.block_size) + u64::from(h.block_size);
        let hdr = info.footer.data_offset;
        let table_end = h
            .table_offset
            .saturating_add((u64::from(h.max_table_entries) * 4).div_ceil(SECTOR) * SECTOR);
        let mut end = (FOOTER_SIZE as u64)
            .max(hdr.saturating_add(HEADER_SIZE as u64))
            .max(table_end);
        for (_, l) in h.locators() {
            if l.data_offset < footer_at {
                let len = l.data_space_bytes().max(u64::from(l.data_length));
                end = end.max(l.data_offset.saturating_add(len).min(footer_at));
            }
        }
        for b in 0..blocks {
            if let Some(off) = bat.block_offset(b) {
                end = end.max(off.saturating_add(slot));
            }
        }
        let end = end.div_ceil(SECTOR) * SECTOR;
        if end.saturating_add(FOOTER_SIZE as u64) > footer_at {
            return Ok(());
        }
        self.st.write_at(&self.footer_bytes, end)?;
        self.st.flush()?;
        self.st.set_len(end + FOOTER_SIZE as u64)?;
        self.st.flush()
    }

    /// The footer in use now, as bytes (for moving it at the old size).
    fn old_footer(&self, info: &Info) -> Result<[u8; FOOTER_SIZE]> {
        Ok(info.footer.to_bytes())
    }

    /// The footer copy at 0, sync, the trailing footer at `end`, sync.
    fn commit_footers(&self, end: u64) -> Result<()> {
        self.st.write_at(&self.footer_bytes, 0)?;
        self.st.flush()?;
        self.st.write_at(&self.footer_bytes, end)?;
        self.st.flush()
    }
}
