//! Converting: copying the virtual contents of a disk into a new image
//! ([`convert`]), as `vdisk convert` (and `qemu-img convert`) do.
//!
//! A reader thread walks the source's block map, skips ranges that are
//! unallocated or explicitly zero, and reads the rest in [`CHUNK`]-aligned
//! windows; the calling thread writes the nonzero parts of each window to
//! the target and reports progress. A bounded channel between them keeps
//! both busy without letting the reader run far ahead; buffers flow back
//! for reuse. A syncer thread makes the target's data durable as the copy
//! goes, so the final flush finds little left to write.
//!
//! # When it fails
//! A convert that fails once it has created the target file (a source that
//! cannot be read, a target that cannot be written: EIO, ENOSPC...) removes
//! the target. An incomplete image would open as a valid disk that reads
//! zeros wherever the copy did not reach: no check can tell those from
//! zeros of the source, and a caller that overlooked the error would use
//! it. (`qemu-img convert` leaves the partial target; an empty place is
//! the safer thing to find.) Creating the target emptied any file of that
//! name already, so removing it loses nothing more. A target that could not
//! be created (another open holds it; it exists and `overwrite` is off) is
//! left untouched.

use crate::create::{create, CreateOptions, Kind};
use disk::{
    Error, Extent, LockMode, Mapping, Opener, Progress, Result, Step, Storage, VirtualDisk,
};
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{self, Receiver, SyncSender};
use std::sync::Arc;
use std::thread;

/// Bytes read from the source at a time (windows are aligned to it):
/// large enough for streaming speed, small enough to stay in cache
/// (measured: 4 MiB chunks cost 2-3x the CPU of 256 KiB-1 MiB ones), and a
/// divisor of every VHDX block size.
pub const CHUNK: usize = 1 << 20;
/// Windows queued between the reader and the writer.
const QUEUE_DEPTH: usize = 4;
/// Bytes written between background data syncs.
const SYNC_EVERY: u64 = 16 << 20;
/// Zero-detection granule for raw targets: a file-system block, so the
/// target file stays as sparse as possible.
const RAW_GRANULE: u64 = 4096;
/// Zero-detection granule for VHDX targets (smaller than any block: zero
/// parts of an allocated block need no writing, a new block reads as zeros).
const VHDX_GRANULE: u64 = 64 << 10;
/// Zero-detection granule for VHD targets: VHD writes are sector-granular
/// and dynamic VHD blocks can be as small as 4 KiB, so test 4 KiB pieces
/// (a fixed VHD's file then stays sparse too).
const VHD_GRANULE: u64 = 4096;
/// The read pieces a failed salvage read is retried in, after the whole
/// window: 64 KiB, then one sector.
const SALVAGE_PIECE: usize = 64 << 10;

/// What a convert did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Converted {
    /// The new image's virtual size: the source's, or more where the format
    /// rounds it (a VHD to a whole CHS geometry).
    pub virtual_size: u64,
    /// Bytes written into the target (zero ranges are skipped).
    pub written: u64,
    /// With `salvage`: the ranges of the source that could not be read,
    /// zeros in the target, in order.
    pub lost: Vec<Lost>,
}

/// A range of the source that could not be read and is zeros in the target.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Lost {
    /// Virtual offset.
    pub offset: u64,
    /// Length in bytes.
    pub len: u64,
    /// Why (the read error).
    pub reason: String,
}

/// Copy the virtual contents of `src` into a new image at `target`, made as
/// `opts` says, with the source's virtual size (the size in `opts.kind` is
/// ignored; a parent is refused: the new image stands alone). Zero ranges
/// of the source are not written. The target is flushed, closed and its
/// directory synced before this returns.
///
/// `salvage`: a range of the source that fails to read is read again in
/// smaller pieces (64 KiB, then one sector) and only the sectors that still
/// fail are left as zeros, listed in [`Converted::lost`]; without it, the
/// first read error fails the convert.
///
/// `progress` is called on this thread with the virtual bytes done (of the
/// source's size) and the bytes written so far; it reaches the total
/// before the final flush.
///
/// # Errors
/// A parent in `opts`, the target cannot be created (see [`create`]), read
/// errors (without `salvage`), write errors. Once the target was created, a
/// failure removes it (see the module docs); should that removal fail too,
/// the error says so.
pub fn convert(
    src: &dyn VirtualDisk,
    target: &Path,
    opts: &CreateOptions,
    salvage: bool,
    progress: Progress<'_>,
) -> Result<Converted> {
    let name = target.display().to_string();
    if opts.parent.is_some() {
        return Err(Error::invalid(
            "a converted image stands alone: it cannot be made over a parent",
        )
        .in_file(&name, 0));
    }
    let size = src.virtual_size();
    let (kind, granule) = match &opts.kind {
        Kind::Raw { .. } => (Kind::Raw { size }, RAW_GRANULE),
        Kind::Vhdx(o) => (
            Kind::Vhdx(vhdx::CreateOptions {
                virtual_size: size,
                ..o.clone()
            }),
            VHDX_GRANULE,
        ),
        Kind::Vhd(o) => (
            Kind::Vhd(vhd::CreateOptions {
                virtual_size: size,
                ..o.clone()
            }),
            VHD_GRANULE,
        ),
    };
    let tracking = Arc::new(Tracking {
        inner: opts.opener.clone(),
        created: AtomicBool::new(false),
    });
    let opts = CreateOptions {
        kind,
        opener: tracking.clone(),
        ..opts.clone()
    };
    let result = create(target, &opts).and_then(|img| {
        let virtual_size = img.disk().virtual_size();
        let (written, lost) = copy(src, &**img.disk(), granule, salvage, progress)?;
        img.disk().flush()?;
        img.close()?;
        sync_dir(target)?;
        Ok(Converted {
            virtual_size,
            written,
            lost,
        })
    });
    match result {
        Err(e) if tracking.created.load(Ordering::Acquire) => Err(remove_incomplete(target, e)),
        r => r,
    }
}

/// Remove the incomplete image at `target` after `e` (see the module docs):
/// the regular file it names (through a symbolic link: the file it points
/// at). Anything else, such as a device, is left as it is. Returns `e`, or,
/// should the removal fail, an error that says so too.
fn remove_incomplete(target: &Path, e: Error) -> Error {
    let Ok(real) = std::fs::canonicalize(target) else {
        return e; // gone already
    };
    if !std::fs::metadata(&real).is_ok_and(|m| m.is_file()) {
        return e;
    }
    match std::fs::remove_file(&real) {
        Ok(()) => e,
        Err(re) if re.kind() == std::io::ErrorKind::NotFound => e,
        Err(re) => Error::io(
            format!(
                "{e}; removing the incomplete image failed too (delete it: it does not hold \
                 the source's data)"
            ),
            re,
        )
        .in_file(&real.display().to_string(), 0),
    }
}

/// An opener that records whether it created a file: what a failed
/// convert removes.
#[derive(Debug)]
struct Tracking {
    inner: Arc<dyn Opener>,
    created: AtomicBool,
}

impl Opener for Tracking {
    fn open(&self, path: &Path, writable: bool, lock: LockMode) -> Result<Box<dyn Storage>> {
        self.inner.open(path, writable, lock)
    }
    fn create(&self, path: &Path, overwrite: bool) -> Result<Box<dyn Storage>> {
        let s = self.inner.create(path, overwrite)?;
        self.created.store(true, Ordering::Release);
        Ok(s)
    }
}

/// Sync the directory holding `path`, so that the new file's name is
/// durable.
fn sync_dir(path: &Path) -> Result<()> {
    let dir = disk::parent::dir_of(path);
    std::fs::File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(|e| Error::io("cannot sync directory", e).in_file(&dir.display().to_string(), 0))
}

/// A window of the source, read into `buf[..len]`.
struct Window {
    offset: u64,
    buf: Vec<u8>,
    len: usize,
}

/// What the reader sends the writer.
enum Piece {
    /// Bytes of the source skipped as zeros (for progress).
    Skipped(u64),
    /// A window to write.
    Data(Window),
}

/// Copy every nonzero byte of `src` into `dst` (which reads as zeros),
/// testing `granule`-aligned pieces. With `salvage`, ranges of `src` that
/// fail to read are left as zeros and listed (see [`salvage_read`]).
/// Returns the bytes written and the ranges lost.
fn copy(
    src: &dyn VirtualDisk,
    dst: &dyn VirtualDisk,
    granule: u64,
    salvage: bool,
    progress: Progress<'_>,
) -> Result<(u64, Vec<Lost>)> {
    let total = src.virtual_size();
    let (tx, rx) = mpsc::sync_channel::<Result<Piece>>(QUEUE_DEPTH);
    let (free_tx, free_rx) = mpsc::channel::<Vec<u8>>();
    // The syncer makes the target's file data durable every SYNC_EVERY
    // bytes; metadata still goes through the format's own flush at the end.
    let (sync_tx, sync_rx) = mpsc::sync_channel::<()>(1);
    thread::scope(|s| {
        let reader = s.spawn(move || read_windows(src, &tx, &free_rx, salvage));
        let syncer = s.spawn(move || -> Result<()> {
            for () in sync_rx {
                dst.storage().flush()?;
            }
            Ok(())
        });
        let mut step = Step {
            done: 0,
            total,
            copied: 0,
        };
        let mut since_sync = 0u64;
        let written = (|| -> Result<u64> {
            // On an early return `rx` is dropped, which stops the reader.
            for p in rx {
                let w = match p? {
                    Piece::Skipped(n) => {
                        step.done += n;
                        progress(step);
                        continue;
                    }
                    Piece::Data(w) => w,
                };
                let written = write_nonzero(dst, &w.buf[..w.len], w.offset, granule)?;
                step.copied += written;
                step.done += w.len as u64;
                progress(step);
                since_sync += written;
                // Skip when a sync is still queued: never wait for it here.
                if since_sync >= SYNC_EVERY && sync_tx.try_send(()).is_ok() {
                    since_sync = 0;
                }
                let _ = free_tx.send(w.buf);
            }
            Ok(step.copied)
        })();
        drop(sync_tx);
        let synced = syncer.join().expect("syncer thread");
        let lost = reader.join().expect("reader thread");
        let written = written?;
        synced?;
        Ok((written, lost))
    })
}

/// The reader thread: send every window that may hold data, in order, and
/// the ranges skipped. Returns what a salvage lost.
fn read_windows(
    src: &dyn VirtualDisk,
    tx: &SyncSender<Result<Piece>>,
    free: &Receiver<Vec<u8>>,
    salvage: bool,
) -> Vec<Lost> {
    let size = src.virtual_size();
    let mut lost = Vec::new();
    let mut pos = 0u64;
    while pos < size {
        let lost = salvage.then_some(&mut lost);
        let p = next_window(src, &mut pos, free, lost);
        let failed = p.is_err();
        if tx.send(p).is_err() || failed {
            break; // the writer stopped, or told of the error
        }
    }
    lost
}

/// Skip the zero extent at `*pos`, or read the window starting there.
fn next_window(
    src: &dyn VirtualDisk,
    pos: &mut u64,
    free: &Receiver<Vec<u8>>,
    lost: Option<&mut Vec<Lost>>,
) -> Result<Piece> {
    let size = src.virtual_size();
    match extent_at(src, *pos) {
        Ok(ext) if reads_as_zero(&ext) => {
            *pos += ext.len;
            return Ok(Piece::Skipped(ext.len));
        }
        Ok(_) => {}
        // Salvaging, a range that cannot even be mapped is read (and fails)
        // piece by piece below.
        Err(_) if lost.is_some() => {}
        Err(e) => return Err(e),
    }
    let chunk = CHUNK as u64;
    let end = ((*pos / chunk + 1) * chunk).min(size);
    let len = min_len(end - *pos, CHUNK);
    let mut buf = free.try_recv().unwrap_or_else(|_| vec![0u8; CHUNK]);
    match lost {
        Some(lost) => salvage_read(src, &mut buf[..len], *pos, lost),
        None => src.read_at(&mut buf[..len], *pos)?,
    }
    let w = Window {
        offset: *pos,
        buf,
        len,
    };
    *pos = end;
    Ok(Piece::Data(w))
}

/// `n`, at most `limit`, as a length in memory.
fn min_len(n: u64, limit: usize) -> usize {
    usize::try_from(n).map_or(limit, |n| n.min(limit))
}

/// The extent of `d` at `pos` (up to the end of the disk, holes in the
/// backing file found: [`VirtualDisk::map_allocation`]), checked to start
/// at `pos` and not to be empty.
///
/// # Errors
/// As [`VirtualDisk::map_allocation`]; a driver answering with an empty or
/// misplaced extent.
pub fn extent_at(d: &dyn VirtualDisk, pos: u64) -> Result<Extent> {
    let size = d.virtual_size();
    let ext = d.map_allocation(pos, size - pos)?;
    if ext.offset != pos || ext.len == 0 {
        return Err(Error::corrupt(
            "block mapping",
            pos,
            "driver returned an empty or misplaced extent",
        )
        .in_file(d.storage().name(), 0));
    }
    Ok(Extent {
        len: ext.len.min(size - pos),
        ..ext
    })
}

/// Whether an extent reads as zeros without being read.
pub fn reads_as_zero(ext: &Extent) -> bool {
    matches!(ext.mapping, Mapping::Zero | Mapping::Unallocated)
}

/// Whether `buf` is all zeros, 64 bytes at a time (the inner loop
/// vectorises).
pub fn is_zero(buf: &[u8]) -> bool {
    let mut blocks = buf.chunks_exact(64);
    for b in &mut blocks {
        let acc = b.chunks_exact(8).fold(0u64, |a, w| {
            a | u64::from_ne_bytes(w.try_into().expect("8 bytes"))
        });
        if acc != 0 {
            return false;
        }
    }
    blocks.remainder().iter().all(|&b| b == 0)
}

/// Record `r`, merged with the previous range when they touch and fail for
/// the same reason (the sectors of one lost block).
fn push_lost(list: &mut Vec<Lost>, r: Lost) {
    if let Some(last) = list.last_mut() {
        if last.offset + last.len == r.offset && last.reason == r.reason {
            last.len += r.len;
            return;
        }
    }
    list.push(r);
}

/// Read `buf.len()` bytes of `src` at `offset`, zeros for what cannot be
/// read: a failed read is retried in 64 KiB pieces, a failed piece sector
/// by sector, so that only the sectors that really fail are zeros. Each
/// zeroed range is added to `lost`.
fn salvage_read(src: &dyn VirtualDisk, buf: &mut [u8], offset: u64, lost: &mut Vec<Lost>) {
    if src.read_at(buf, offset).is_ok() {
        return;
    }
    let sector = (src.geometry().logical_sector_size.max(512) as usize).min(SALVAGE_PIECE);
    let mut at = 0usize;
    while at < buf.len() {
        let end = piece_end(offset, at, SALVAGE_PIECE, buf.len());
        let abs = offset + at as u64;
        if src.read_at(&mut buf[at..end], abs).is_err() {
            salvage_sectors(src, &mut buf[at..end], abs, sector, lost);
        }
        at = end;
    }
}

/// Where the piece of `size` bytes (aligned on the virtual disk) that holds
/// byte `at` of a buffer at virtual `offset` ends in the buffer.
fn piece_end(offset: u64, at: usize, size: usize, len: usize) -> usize {
    let abs = offset + at as u64;
    let next = (abs / size as u64 + 1) * size as u64;
    min_len(next - offset, len)
}

/// Read `buf` at `offset` sector by sector, zeros (recorded in `lost`) for
/// each sector that fails.
fn salvage_sectors(
    src: &dyn VirtualDisk,
    buf: &mut [u8],
    offset: u64,
    sector: usize,
    lost: &mut Vec<Lost>,
) {
    let mut at = 0usize;
    while at < buf.len() {
        let abs = offset + at as u64;
        let end = piece_end(offset, at, sector, buf.len());
        if let Err(e) = src.read_at(&mut buf[at..end], abs) {
            buf[at..end].fill(0);
            push_lost(
                lost,
                Lost {
                    offset: abs,
                    len: (end - at) as u64,
                    reason: e.to_string(),
                },
            );
        }
        at = end;
    }
}

/// Write the runs of `data` (virtual offset `offset`) that are not all zero,
/// testing granule-aligned pieces. Returns the number of bytes written.
fn write_nonzero(dst: &dyn VirtualDisk, data: &[u8], offset: u64, granule: u64) -> Result<u64> {
    let mut written = 0u64;
    let piece_end = |i: usize| {
        let abs = offset + i as u64;
        let next = (abs / granule + 1) * granule;
        min_len(next - offset, data.len())
    };
    let mut i = 0;
    while i < data.len() {
        let e = piece_end(i);
        if is_zero(&data[i..e]) {
            i = e;
            continue;
        }
        let start = i;
        i = e;
        while i < data.len() {
            let e = piece_end(i);
            if is_zero(&data[i..e]) {
                break;
            }
            i = e;
        }
        dst.write_at(&data[start..i], offset + start as u64)?;
        written += (i - start) as u64;
    }
    Ok(written)
}

#[cfg(test)]
// Test images are a few MiB: their offsets and sizes fit any integer type.
#[allow(clippy::cast_possible_truncation)]
mod tests {
    use super::*;
    use disk::{Geometry, MemStorage, RawDisk};

    /// A raw disk whose reads fail when they touch `[bad.0, bad.1)`.
    struct Flaky {
        inner: RawDisk<MemStorage>,
        bad: (u64, u64),
    }

    impl VirtualDisk for Flaky {
        fn geometry(&self) -> Geometry {
            self.inner.geometry()
        }
        fn storage(&self) -> &dyn Storage {
            self.inner.storage()
        }
        fn map(&self, offset: u64, len: u64) -> Result<Extent> {
            self.inner.map(offset, len)
        }
        fn flush(&self) -> Result<()> {
            Ok(())
        }
        fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<()> {
            let end = offset + buf.len() as u64;
            if offset < self.bad.1 && end > self.bad.0 {
                return Err(Error::io("read", std::io::Error::other("medium error")));
            }
            self.inner.read_at(buf, offset)
        }
    }

    #[test]
    fn salvage_zeros_only_the_unreadable_sectors() {
        let data: Vec<u8> = (0..3 * CHUNK).map(|i| (i % 251) as u8 | 1).collect();
        // Two unreadable sectors inside the second window.
        let bad = (
            CHUNK as u64 + 70_000 - 70_000 % 512,
            CHUNK as u64 + 70_000 + 600,
        );
        let src = Flaky {
            inner: RawDisk::new(MemStorage::from_vec("src", data.clone())).unwrap(),
            bad,
        };
        let dst = RawDisk::create(MemStorage::new("dst"), data.len() as u64).unwrap();
        let mut steps = Vec::new();
        let (written, lost) = copy(&src, &dst, 4096, true, &mut |s| steps.push(s)).unwrap();
        let (s, e) = (bad.0, bad.1.div_ceil(512) * 512);
        assert_eq!(lost.len(), 1, "{lost:?}");
        assert_eq!((lost[0].offset, lost[0].len), (s, e - s));
        assert!(lost[0].reason.contains("medium error"), "{lost:?}");
        // Every granule holds data (the lost sectors share theirs).
        assert_eq!(written, data.len() as u64);
        let last = *steps.last().unwrap();
        assert_eq!(
            (last.done, last.total, last.copied),
            (3 * CHUNK as u64, 3 * CHUNK as u64, written)
        );
        let mut back = vec![0u8; data.len()];
        dst.read_at(&mut back, 0).unwrap();
        let mut want = data.clone();
        want[s as usize..e as usize].fill(0);
        assert!(back == want);
        // Without salvage, the copy fails.
        let dst = RawDisk::create(MemStorage::new("dst"), data.len() as u64).unwrap();
        let e = copy(&src, &dst, 4096, false, &mut |_| {}).unwrap_err();
        assert!(format!("{e}").contains("medium error"), "{e}");
    }

    #[test]
    fn lost_ranges_merge_when_they_touch_for_the_same_reason() {
        let r = |offset, len, reason: &str| Lost {
            offset,
            len,
            reason: reason.into(),
        };
        let mut l = Vec::new();
        push_lost(&mut l, r(0, 512, "a"));
        push_lost(&mut l, r(512, 512, "a"));
        push_lost(&mut l, r(1024, 512, "b"));
        push_lost(&mut l, r(4096, 512, "b"));
        assert_eq!(
            l,
            vec![r(0, 1024, "a"), r(1024, 512, "b"), r(4096, 512, "b")]
        );
    }

    #[test]
    fn copies_only_nonzero_granules_and_reports_progress() {
        let mut data = vec![0u8; 3 * CHUNK + 5000];
        data[100] = 1;
        data[CHUNK + 4095] = 2;
        data[CHUNK + 4096] = 3;
        data[3 * CHUNK + 4999] = 4;
        let src = RawDisk::new(MemStorage::from_vec("src", data.clone())).unwrap();
        let dst = RawDisk::create(MemStorage::new("dst"), data.len() as u64).unwrap();
        let mut steps: Vec<Step> = Vec::new();
        let (written, lost) = copy(&src, &dst, 4096, false, &mut |s| steps.push(s)).unwrap();
        assert!(lost.is_empty());
        // Four granules hold data; the last piece is a short granule.
        assert_eq!(written, 3 * 4096 + (5000 - 4096));
        assert!(steps.windows(2).all(|w| w[0].done <= w[1].done));
        assert_eq!(steps.last().unwrap().done, data.len() as u64);
        let mut back = vec![0u8; data.len()];
        dst.read_at(&mut back, 0).unwrap();
        assert_eq!(back, data);
    }

    #[test]
    fn zero_tests() {
        let mut v = vec![0u8; 10_000];
        assert!(is_zero(&v));
        for at in [0, 7, 63, 64, 4095, 4096, 9999] {
            v[at] = 1;
            assert!(!is_zero(&v));
            v[at] = 0;
        }
        assert!(is_zero(&[]));
    }
}
