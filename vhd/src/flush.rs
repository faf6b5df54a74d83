//! Flushing and closing a VHD: the in-memory BAT sectors and sector
//! bitmaps reach the file, each after the data it describes is durable
//! (the write protocol in the module docs of `image`).

use crate::bat::SECTOR;
use crate::image::{lock, Vhd};
use crate::Result;
use std::sync::atomic::Ordering;

impl Vhd {
    /// Flush (when writable) and mark the image closed; a no-op once
    /// closed.
    pub(crate) fn close_inner(&self) -> Result<()> {
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

    /// The flush of the write protocol (module docs of `image`): snapshot
    /// the dirty BAT sectors and bitmaps, sync, write them, sync. On an
    /// error the snapshot is marked dirty again.
    pub(crate) fn flush_inner(&self) -> Result<()> {
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
                sectors.push((s, st.bat.sector_bytes(s)));
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

impl Drop for Vhd {
    fn drop(&mut self) {
        let _ = self.close_inner();
    }
}
