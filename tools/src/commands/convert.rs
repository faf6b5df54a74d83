//! `vdisk convert`: copy the virtual contents of one image into a new one.
//!
//! A reader thread walks the source's block map, skips ranges that are
//! unallocated or explicitly zero, and reads the rest in [`CHUNK`]-aligned
//! windows; the calling thread writes the nonzero parts of each window to the
//! target. A bounded channel between them keeps both busy without letting
//! the reader run far ahead; buffers flow back for reuse.

use super::{extent_at, is_zero, min_len, reads_as_zero, CHUNK};
use crate::cli::ConvertArgs;
use crate::commands::create;
use crate::open;
use crate::options::{self, Target};
use crate::progress::Progress;
use anyhow::{bail, Result};
use disk::VirtualDisk;
use image::Image;
use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::sync::mpsc::{self, Receiver, SyncSender};
use std::sync::Mutex;
use std::thread;

/// Windows queued between the reader and the writer.
const QUEUE_DEPTH: usize = 4;
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

/// Exit status of a salvage that replaced unreadable ranges by zeros.
pub const EXIT_SALVAGED: u8 = 2;

/// Convert: the exit status (0, or [`EXIT_SALVAGED`] when `--salvage`
/// replaced unreadable ranges by zeros; the ranges are listed on stderr).
pub fn run(args: &ConvertArgs) -> Result<u8> {
    let src_img = open::open(&args.source, args.format, false)?;
    let src = src_img.disk();
    let size = src.virtual_size();
    if same_file(&args.source, &args.target) {
        bail!(
            "{}: the source and the target are the same file",
            args.target.display()
        );
    }
    let format = open::new_image_format(&args.target, args.output_format, "-O");
    let target = options::target(format, size, &args.options)?;
    let granule = match target {
        Target::Raw => RAW_GRANULE,
        Target::Vhdx(_) => VHDX_GRANULE,
        Target::Vhd(_) => VHD_GRANULE,
    };
    let dst_img = create::create(&args.target, &target, size)?;
    create::note_rounding(&target, size, dst_img.disk().virtual_size());
    // The rate: bytes written into the target (zero ranges are skipped).
    let progress = Progress::bytes(args.progress, size, "converting", "written");
    let lost = Mutex::new(Vec::new());
    let salvage = args.salvage.then_some(&lost);
    let result = copy(src, dst_img.disk(), granule, &progress, salvage).and_then(|()| {
        progress.set_message("flushing");
        finish(dst_img, &args.target)
    });
    match result {
        Ok(()) => {
            progress.set_message("converted");
            progress.finish();
            let lost = lost.into_inner().unwrap_or_else(|e| e.into_inner());
            if lost.is_empty() {
                return Ok(0);
            }
            eprint!("{}", lost_report(&args.source, &args.target, &lost));
            Ok(EXIT_SALVAGED)
        }
        Err(e) => {
            progress.abandon();
            // Do not leave a half-written image that looks valid.
            let _ = std::fs::remove_file(&args.target);
            Err(e)
        }
    }
}

/// Make the target durable: flush, close (clean VHDX header), sync the directory.
fn finish(dst: Image, path: &Path) -> Result<()> {
    dst.disk().flush()?;
    dst.close()?;
    open::sync_parent_dir(path)
}

fn same_file(a: &Path, b: &Path) -> bool {
    match (std::fs::metadata(a), std::fs::metadata(b)) {
        (Ok(x), Ok(y)) => x.dev() == y.dev() && x.ino() == y.ino(),
        _ => false,
    }
}

/// A window of the source, read into `buf[..len]`.
struct Window {
    offset: u64,
    buf: Vec<u8>,
    len: usize,
}

/// Copy every nonzero byte of `src` into `dst` (which reads as zeros).
/// With `salvage`, ranges of `src` that fail to read are left as zeros in
/// `dst` and recorded there (see [`salvage_read`]) instead of failing.
pub fn copy(
    src: &dyn VirtualDisk,
    dst: &dyn VirtualDisk,
    granule: u64,
    progress: &Progress,
    salvage: Option<&Mutex<Vec<Lost>>>,
) -> Result<()> {
    let (tx, rx) = mpsc::sync_channel::<disk::Result<Window>>(QUEUE_DEPTH);
    let (free_tx, free_rx) = mpsc::channel::<Vec<u8>>();
    // Write-back runs beside the copy: a syncer thread makes the target's
    // data durable every SYNC_EVERY bytes, so the final flush (which the
    // convert waits for) finds little left to write. It syncs file data
    // only; metadata still goes through the format's own flush at the end.
    let (sync_tx, sync_rx) = mpsc::sync_channel::<()>(1);
    thread::scope(|s| {
        s.spawn(move || read_windows(src, &tx, &free_rx, progress, salvage));
        let syncer = s.spawn(move || -> disk::Result<()> {
            for () in sync_rx {
                dst.storage().flush()?;
            }
            Ok(())
        });
        let mut since_sync = 0u64;
        // On an early return `rx` is dropped, which stops the reader.
        for w in rx {
            let w = w?;
            let written = write_nonzero(dst, &w.buf[..w.len], w.offset, granule)?;
            progress.add_copied(written);
            since_sync += written;
            if since_sync >= SYNC_EVERY {
                // Skip when a sync is still queued: never wait for it here.
                if sync_tx.try_send(()).is_ok() {
                    since_sync = 0;
                }
            }
            progress.inc(w.len as u64);
            let _ = free_tx.send(w.buf);
        }
        drop(sync_tx);
        syncer.join().expect("syncer thread")?;
        Ok(())
    })
}

/// Bytes written between background data syncs during a convert.
const SYNC_EVERY: u64 = 16 << 20;

/// The reader thread: send every window that may hold data, in order.
fn read_windows(
    src: &dyn VirtualDisk,
    tx: &SyncSender<disk::Result<Window>>,
    free: &Receiver<Vec<u8>>,
    progress: &Progress,
    salvage: Option<&Mutex<Vec<Lost>>>,
) {
    let size = src.virtual_size();
    let mut pos = 0u64;
    while pos < size {
        match next_window(src, &mut pos, free, progress, salvage) {
            Ok(None) => {}
            Ok(Some(w)) => {
                if tx.send(Ok(w)).is_err() {
                    return; // the writer stopped
                }
            }
            Err(e) => {
                let _ = tx.send(Err(e));
                return;
            }
        }
    }
}

/// Skip the zero extent at `*pos`, or read the window starting there.
fn next_window(
    src: &dyn VirtualDisk,
    pos: &mut u64,
    free: &Receiver<Vec<u8>>,
    progress: &Progress,
    salvage: Option<&Mutex<Vec<Lost>>>,
) -> disk::Result<Option<Window>> {
    let size = src.virtual_size();
    match extent_at(src, *pos) {
        Ok(ext) if reads_as_zero(&ext) => {
            progress.inc(ext.len);
            *pos += ext.len;
            return Ok(None);
        }
        Ok(_) => {}
        // Salvaging, a range that cannot even be mapped is read (and fails)
        // piece by piece below.
        Err(_) if salvage.is_some() => {}
        Err(e) => return Err(e),
    }
    let chunk = CHUNK as u64;
    let end = ((*pos / chunk + 1) * chunk).min(size);
    let len = min_len(end - *pos, CHUNK);
    let mut buf = free.try_recv().unwrap_or_else(|_| vec![0u8; CHUNK]);
    match salvage {
        Some(lost) => {
            let mut found = Vec::new();
            salvage_read(src, &mut buf[..len], *pos, &mut found);
            if !found.is_empty() {
                let mut l = lost.lock().unwrap_or_else(|e| e.into_inner());
                for r in found {
                    push_lost(&mut l, r);
                }
            }
        }
        None => src.read_at(&mut buf[..len], *pos)?,
    }
    let w = Window {
        offset: *pos,
        buf,
        len,
    };
    *pos = end;
    Ok(Some(w))
}

/// A range of the source that could not be read and was written as zeros.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Lost {
    /// Virtual offset.
    pub offset: u64,
    /// Length in bytes.
    pub len: u64,
    /// Why (the read error).
    pub reason: String,
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

/// The read pieces a failed salvage read is retried in, after the whole
/// window: 64 KiB, then one sector.
const SALVAGE_PIECE: usize = 64 << 10;

/// Read `buf.len()` bytes of `src` at `offset`, zeros for what cannot be
/// read: a failed read is retried in 64 KiB pieces, a failed piece sector
/// by sector, so that only the sectors that really fail are zeros. Each
/// zeroed range is added to `lost`.
pub fn salvage_read(src: &dyn VirtualDisk, buf: &mut [u8], offset: u64, lost: &mut Vec<Lost>) {
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

/// What a salvage lost, for stderr: the total, then each range.
fn lost_report(source: &Path, target: &Path, lost: &[Lost]) -> String {
    let total: u64 = lost.iter().map(|l| l.len).sum();
    let mut s = format!(
        "vdisk: salvage: {} ranges ({total} bytes) of {} could not be read; they are zeros in \
         {}:\n",
        lost.len(),
        source.display(),
        target.display()
    );
    for l in lost {
        s.push_str(&format!(
            "  virtual {:#x}..{:#x} ({} bytes): {}\n",
            l.offset,
            l.offset + l.len,
            l.len,
            l.reason
        ));
    }
    s
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
    use disk::{Extent, Geometry, MemStorage, RawDisk, Storage};

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
        fn map(&self, offset: u64, len: u64) -> disk::Result<Extent> {
            self.inner.map(offset, len)
        }
        fn flush(&self) -> disk::Result<()> {
            Ok(())
        }
        fn read_at(&self, buf: &mut [u8], offset: u64) -> disk::Result<()> {
            let end = offset + buf.len() as u64;
            if offset < self.bad.1 && end > self.bad.0 {
                return Err(disk::Error::io(
                    "read",
                    std::io::Error::other("medium error"),
                ));
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
        let lost = Mutex::new(Vec::new());
        copy(&src, &dst, 4096, &Progress::hidden(), Some(&lost)).unwrap();
        let lost = lost.into_inner().unwrap();
        let (s, e) = (bad.0, bad.1.div_ceil(512) * 512);
        assert_eq!(lost.len(), 1, "{lost:?}");
        assert_eq!((lost[0].offset, lost[0].len), (s, e - s));
        assert!(lost[0].reason.contains("medium error"), "{lost:?}");
        let mut back = vec![0u8; data.len()];
        dst.read_at(&mut back, 0).unwrap();
        let mut want = data.clone();
        want[s as usize..e as usize].fill(0);
        assert!(back == want);
        // Without salvage, the copy fails.
        let dst = RawDisk::create(MemStorage::new("dst"), data.len() as u64).unwrap();
        assert!(copy(&src, &dst, 4096, &Progress::hidden(), None).is_err());
        let one = Lost {
            offset: 0x200,
            len: 0x400,
            reason: "why".into(),
        };
        let report = lost_report(Path::new("a.vhdx"), Path::new("b.raw"), &[one]);
        assert_eq!(
            report,
            "vdisk: salvage: 1 ranges (1024 bytes) of a.vhdx could not be read; they are zeros \
             in b.raw:\n  virtual 0x200..0x600 (1024 bytes): why\n"
        );
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
    fn copies_only_nonzero_granules() {
        let mut data = vec![0u8; 3 * CHUNK + 5000];
        data[100] = 1;
        data[CHUNK + 4095] = 2;
        data[CHUNK + 4096] = 3;
        data[3 * CHUNK + 4999] = 4;
        let src = RawDisk::new(MemStorage::from_vec("src", data.clone())).unwrap();
        let dst = RawDisk::create(MemStorage::new("dst"), data.len() as u64).unwrap();
        copy(&src, &dst, 4096, &Progress::hidden(), None).unwrap();
        let mut back = vec![0u8; data.len()];
        dst.read_at(&mut back, 0).unwrap();
        assert_eq!(back, data);
    }
}
