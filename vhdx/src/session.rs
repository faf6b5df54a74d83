//! The write session and flush through the log (MS-VHDX 2.2.2, 2.3;
//! `shared/design/vhdx-log.md`).
//!
//! - Before the first change after open, both headers are rewritten with a
//!   new FileWriteGuid, DataWriteGuid and the LogGuid of this session.
//! - An allocating write reserves a block at the 1 MiB-aligned end of the
//!   file, writes the payload, and updates the in-memory BAT (page dirty).
//! - `flush` syncs the file (payload durable), writes one log entry carrying
//!   every dirty BAT page, syncs, writes the pages in place, syncs. Only then
//!   may the next entry overwrite that log space.
//! - A clean close leaves the log empty (LogGuid zero in the headers).

use crate::bat_cache::PAGE_BYTES;
use crate::header::Header;
use crate::image::lock;
use crate::log::{LogEntry, LogOp, LOG_SECTOR};
use crate::replay;
use crate::{Error, Result, Vhdx};
use disk::Storage;
use std::sync::atomic::Ordering;
use uuid::Uuid;

impl Vhdx {
    /// Rewrite both headers for a write session (new FileWriteGuid and
    /// LogGuid) before the first change after open; before the first change
    /// of the disk's data (`data`), also a new DataWriteGuid (MS-VHDX 2.2.2),
    /// unless the caller asked to keep it.
    pub(crate) fn start_session(&self, data: bool) -> Result<()> {
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

    /// Flush and write a clean header (empty log). Also done on drop, where
    /// errors can only be ignored; call this to see them.
    ///
    /// # Errors
    /// I/O errors.
    pub fn close(self) -> Result<()> {
        self.close_inner()
    }

    pub(crate) fn close_inner(&self) -> Result<()> {
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
    pub(crate) fn end_session(&self) -> Result<()> {
        let _f = lock(&self.flush_lock);
        if lock(&self.unapplied).is_some() {
            return Err(Error::invalid(
                "a logged change could not be applied in place: the log is kept, and the next \
                 open replays it",
            )
            .in_file(self.name(), 0));
        }
        let mut hs = lock(&self.header);
        let mut h = hs.current.clone();
        h.log_guid = Uuid::nil();
        hs.slot = write_header_pair(&*self.storage, &mut h, hs.slot)?;
        hs.current = h;
        hs.session_log_guid = Uuid::nil();
        self.session_started.store(false, Ordering::Release);
        Ok(())
    }

    pub(crate) fn flush_inner(&self) -> Result<()> {
        self.flush_with(Vec::new())
    }

    /// Flush, logging `extra` pages (file offset, bytes) in the same log
    /// entries as the dirty BAT and sector bitmap pages.
    pub(crate) fn flush_with(&self, extra: Vec<(u64, Box<[u8; PAGE_BYTES]>)>) -> Result<()> {
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
    pub(crate) fn log_and_apply(
        &self,
        pages: Vec<(u64, Box<[u8; PAGE_BYTES]>)>,
        last_file_offset: u64,
    ) -> Result<()> {
        self.storage.flush()?;
        // An entry the log holds but that did not reach its place: apply
        // it first (replaying is idempotent).
        let mut unapplied = lock(&self.unapplied);
        if let Some(ops) = unapplied.as_ref() {
            replay::apply(&*self.storage, ops)?;
            self.storage.flush()?;
            *unapplied = None;
        }
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
        let log_sectors = usize::try_from(log_length / LOG_SECTOR as u64)
            .map_err(|_| Error::invalid("the log is too large").in_file(self.name(), 0))?;
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
            // The entry is durable: should applying it fail, it is applied
            // again at the next flush, and the log is not emptied until it
            // is (a crash meanwhile replays it on open).
            let applied =
                replay::apply(&*self.storage, &entry.ops).and_then(|()| self.storage.flush());
            if let Err(e) = applied {
                *unapplied = Some(entry.ops);
                return Err(e);
            }
            seq += 1;
            lock(&self.header).next_sequence = seq;
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
    // Both bumps are checked before either copy is written.
    if h.sequence_number > u64::MAX - 2 {
        return Err(Error::corrupt(
            "VHDX header",
            Header::OFFSETS[current_slot] + 8,
            format!(
                "SequenceNumber {:#x} cannot be increased: the headers cannot be updated, so \
                 the image cannot be written",
                h.sequence_number
            ),
        )
        .in_file(storage.name(), 0));
    }
    for _ in 0..2 {
        slot = 1 - slot;
        h.sequence_number += 1;
        h.write_to(&mut buf);
        storage.write_at(&buf, Header::OFFSETS[slot])?;
        storage.flush()?;
    }
    Ok(slot)
}
