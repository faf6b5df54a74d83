//! Live storage migration: copy a running guest's disk to a new image (any
//! format the front door creates: VHD to VHDX, raw to VHD...) while the
//! guest keeps writing, then switch the device to the copy.
//!
//! 1. The destination is created, as large as the source (a VHD's CHS
//!    rounding may make it a little larger; never smaller).
//! 2. A dirty map (a bit per 1 MiB of the disk) starts all set and is armed
//!    on the device's write path: every OUT, DISCARD and WRITE_ZEROES marks
//!    its range *after* the disk has done it, so a range the copier clears
//!    and then reads is either read with the write in it or marked again.
//! 3. Copy passes: take each set bit (clearing it), read the source range,
//!    write it to the destination (a range of zeros is skipped the first
//!    time, the destination being new, and written as zeros after). Passes
//!    repeat until at most [`FINAL_CHUNKS`] ranges are dirty, or
//!    [`MAX_PASSES`] passes were made (a guest that writes faster than the
//!    copy then gets a longer pause).
//! 4. The switch: the vCPUs are paused ([`crate::Controller::pause`]) and
//!    the device's lock taken (so no request is in flight); the ranges
//!    still dirty are copied, the destination flushed, the device given the
//!    destination and the map disarmed; the lock is let go and the vCPUs
//!    resumed. The source is flushed and closed: it stays as it was at the
//!    switch.
//!
//! Any failure before the switch (the destination cannot be created, a
//! write fails with ENOSPC, the run stops) disarms the map, removes the
//! destination and leaves the guest on the source, which it never stopped
//! using. The device keeps its GET_ID identity across the switch.

use crate::virtio::blk::Blk;
use crate::virtio::mmio::Transport;
use disk::VirtualDisk;
use image::{CreateOptions, Format, Kind};
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// The size a dirty bit stands for.
pub const CHUNK: u64 = 1 << 20;
/// The switch happens once at most this many chunks are dirty.
pub const FINAL_CHUNKS: u64 = 8;
/// The most copy passes before the switch.
pub const MAX_PASSES: u32 = 8;

/// Which 1 MiB ranges of a disk were written since their bit was cleared.
#[derive(Debug)]
pub struct DirtyMap {
    size: u64,
    bits: Vec<AtomicU64>,
}

impl DirtyMap {
    /// A map of a disk of `size` bytes, every range dirty.
    pub fn all_dirty(size: u64) -> DirtyMap {
        let chunks = size.div_ceil(CHUNK);
        let words = usize::try_from(chunks.div_ceil(64)).unwrap_or(usize::MAX);
        let bits: Vec<AtomicU64> = (0..words).map(|_| AtomicU64::new(u64::MAX)).collect();
        // No bits past the last chunk.
        if let Some(last) = bits.last() {
            let used = chunks % 64;
            if used != 0 {
                last.store((1u64 << used) - 1, Ordering::Relaxed);
            }
        }
        DirtyMap { size, bits }
    }

    /// Mark [offset, offset + len) dirty.
    pub fn mark(&self, offset: u64, len: u64) {
        if len == 0 || offset >= self.size {
            return;
        }
        let end = offset.saturating_add(len).min(self.size);
        for c in offset / CHUNK..end.div_ceil(CHUNK) {
            if let Some(w) = usize::try_from(c / 64).ok().and_then(|i| self.bits.get(i)) {
                w.fetch_or(1 << (c % 64), Ordering::AcqRel);
            }
        }
    }

    /// The first dirty chunk at or after `from`, its bit cleared.
    pub fn take_next(&self, from: u64) -> Option<u64> {
        let mut w = usize::try_from(from / 64).ok()?;
        let mut mask = u64::MAX << (from % 64);
        while let Some(word) = self.bits.get(w) {
            let v = word.load(Ordering::Acquire) & mask;
            if v != 0 {
                let bit = v.trailing_zeros();
                let old = word.fetch_and(!(1u64 << bit), Ordering::AcqRel);
                if old & (1 << bit) != 0 {
                    return Some(w as u64 * 64 + u64::from(bit));
                }
                // Taken by someone else: look again from the same word.
                continue;
            }
            w += 1;
            mask = u64::MAX;
        }
        None
    }

    /// How many chunks are dirty.
    pub fn count(&self) -> u64 {
        self.bits
            .iter()
            .map(|w| u64::from(w.load(Ordering::Acquire).count_ones()))
            .sum()
    }
}

/// Where to migrate a disk to.
#[derive(Debug, Clone)]
pub struct MigrateOptions {
    /// The new image's path (must not exist).
    pub dest: PathBuf,
    /// Its format.
    pub format: Format,
    /// How its file is created (real files by default).
    pub opener: Arc<dyn disk::Opener>,
}

impl MigrateOptions {
    /// A new image of `format` at `dest`, a real file.
    pub fn new(dest: impl Into<PathBuf>, format: Format) -> MigrateOptions {
        MigrateOptions {
            dest: dest.into(),
            format,
            opener: disk::file_opener(),
        }
    }
}

/// What a finished migration did.
#[derive(Debug, Clone)]
pub struct MigrateReport {
    /// Copy passes before the switch.
    pub passes: u32,
    /// Bytes copied in all (a range written again is copied again).
    pub bytes_copied: u64,
    /// How long the vCPUs were paused for the switch.
    pub pause: Duration,
    /// The whole migration.
    pub elapsed: Duration,
}

/// The pieces of the machine a migration works on (see
/// [`crate::Controller::migrate_storage`]).
pub(crate) struct Ends<'a> {
    pub transport: &'a Transport<Blk>,
    pub pause: &'a dyn Fn() -> Result<(), String>,
    pub resume: &'a dyn Fn() -> Result<(), String>,
    pub stopping: &'a dyn Fn() -> bool,
}

/// Create the destination for a source disk like `src`.
fn create_dest(src: &dyn VirtualDisk, o: &MigrateOptions) -> Result<Arc<dyn VirtualDisk>, String> {
    let g = src.geometry();
    let kind = match o.format {
        Format::Raw => Kind::Raw {
            size: g.virtual_size,
        },
        Format::Vhdx => {
            let mut v = vhdx::CreateOptions::new(g.virtual_size);
            v.logical_sector_size = g.logical_sector_size;
            v.physical_sector_size = g.physical_sector_size.max(g.logical_sector_size);
            Kind::Vhdx(v)
        }
        Format::Vhd if g.logical_sector_size != 512 => {
            return Err(format!(
                "the disk has {}-byte sectors, and a VHD has 512-byte sectors only",
                g.logical_sector_size
            ))
        }
        Format::Vhd => Kind::Vhd(vhd::CreateOptions::new(g.virtual_size)),
    };
    let mut c = CreateOptions::new(kind);
    c.opener = o.opener.clone();
    let img = image::create(&o.dest, &c).map_err(|e| e.to_string())?;
    let d = img.disk().clone();
    if d.virtual_size() < g.virtual_size {
        let _ = d.close();
        return Err(format!(
            "{}: {} bytes, smaller than the disk's {}",
            o.dest.display(),
            d.virtual_size(),
            g.virtual_size
        ));
    }
    Ok(d)
}

/// Copy chunk `c` from `src` to `dst`; the bytes copied.
fn copy_chunk(
    src: &dyn VirtualDisk,
    dst: &dyn VirtualDisk,
    buf: &mut [u8],
    c: u64,
    first: bool,
) -> Result<u64, String> {
    let size = src.virtual_size();
    let off = c * CHUNK;
    let len = CHUNK.min(size - off);
    let b = &mut buf[..usize::try_from(len).unwrap_or(0)];
    src.read_at(b, off)
        .map_err(|e| format!("reading the source at {off:#x}: {e}"))?;
    let done = if b.iter().all(|&x| x == 0) {
        if first {
            Ok(())
        } else {
            dst.write_zeroes(off, len, true)
        }
    } else {
        dst.write_at(b, off)
    };
    done.map_err(|e| format!("writing the destination at {off:#x}: {e}"))?;
    Ok(len)
}

/// Migrate the disk behind `ends.transport` (see the module docs).
pub(crate) fn migrate(ends: &Ends<'_>, o: &MigrateOptions) -> Result<MigrateReport, String> {
    let started = Instant::now();
    let src = ends.transport.lock().device().disk().clone();
    let dst = create_dest(src.as_ref(), o)?;
    let map = Arc::new(DirtyMap::all_dirty(src.virtual_size()));
    ends.transport
        .lock()
        .device_mut()
        .set_dirty(Some(map.clone()));
    let abort = |why: String| {
        ends.transport.lock().device_mut().set_dirty(None);
        let _ = dst.close();
        let _ = std::fs::remove_file(&o.dest);
        Err(format!("{why}; the guest goes on on its disk as it was"))
    };
    let chunks = src.virtual_size().div_ceil(CHUNK);
    let mut copied_once = vec![false; usize::try_from(chunks).unwrap_or(0)];
    let mut buf = vec![0u8; usize::try_from(CHUNK).unwrap_or(0)];
    let mut bytes = 0u64;
    let mut passes = 0u32;
    let mut copy_dirty = |bytes: &mut u64| -> Result<(), String> {
        let mut from = 0;
        while let Some(c) = map.take_next(from) {
            if (ends.stopping)() {
                return Err("the run is ending".into());
            }
            let seen = usize::try_from(c)
                .ok()
                .and_then(|i| copied_once.get_mut(i))
                .map(|s| std::mem::replace(s, true))
                .unwrap_or(true);
            *bytes += copy_chunk(src.as_ref(), dst.as_ref(), &mut buf, c, !seen)?;
            from = c + 1;
        }
        Ok(())
    };
    loop {
        passes += 1;
        if let Err(e) = copy_dirty(&mut bytes) {
            return abort(e);
        }
        if map.count() <= FINAL_CHUNKS || passes >= MAX_PASSES {
            break;
        }
    }
    // The switch.
    let paused_at = Instant::now();
    if let Err(e) = (ends.pause)() {
        return abort(format!("pausing the guest for the switch: {e}"));
    }
    let switched = {
        let mut st = ends.transport.lock();
        let r = copy_dirty(&mut bytes).and_then(|()| {
            dst.flush()
                .map_err(|e| format!("flushing the destination: {e}"))
        });
        if r.is_ok() {
            st.device_mut().set_disk(dst.clone());
            st.device_mut().set_dirty(None);
        }
        r
    };
    let resumed = (ends.resume)();
    let pause = paused_at.elapsed();
    if let Err(e) = switched {
        return abort(e);
    }
    resumed?;
    // The source is left as it was at the switch.
    let _ = src.flush();
    let _ = src.close();
    Ok(MigrateReport {
        passes,
        bytes_copied: bytes,
        pause,
        elapsed: started.elapsed(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dirty_map() {
        let m = DirtyMap::all_dirty(130 * CHUNK + 5);
        assert_eq!(m.count(), 131);
        let mut seen = Vec::new();
        let mut from = 0;
        while let Some(c) = m.take_next(from) {
            seen.push(c);
            from = c + 1;
        }
        assert_eq!(seen, (0..131).collect::<Vec<_>>());
        assert_eq!(m.count(), 0);
        m.mark(CHUNK - 1, 2); // chunks 0 and 1
        m.mark(130 * CHUNK, 100); // the last, partial chunk
        m.mark(200 * CHUNK, 1); // past the end: nothing
        m.mark(5 * CHUNK, 0); // empty: nothing
        assert_eq!(m.count(), 3);
        assert_eq!(m.take_next(1), Some(1));
        assert_eq!(m.take_next(2), Some(130));
        assert_eq!(m.take_next(0), Some(0));
        assert_eq!(m.take_next(0), None);
    }

    #[test]
    fn dirty_map_of_an_empty_disk() {
        let m = DirtyMap::all_dirty(0);
        assert_eq!((m.count(), m.take_next(0)), (0, None));
    }
}
