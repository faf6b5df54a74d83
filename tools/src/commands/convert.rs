//! `vdisk convert`: copy the virtual contents of one image into a new one.
//!
//! A reader thread walks the source's block map, skips ranges that are
//! unallocated or explicitly zero, and reads the rest in [`CHUNK`]-aligned
//! windows; the calling thread writes the nonzero parts of each window to the
//! target. A bounded channel between them keeps both busy without letting
//! the reader run far ahead; buffers flow back for reuse.

use super::{extent_at, is_zero, reads_as_zero, CHUNK};
use crate::commands::create;
use crate::open::{self, Image};
use crate::options::{self, Target};
use crate::progress::Progress;
use crate::ConvertArgs;
use anyhow::{bail, Result};
use disk::VirtualDisk;
use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::sync::mpsc::{self, Receiver, SyncSender};
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

pub fn run(args: &ConvertArgs) -> Result<()> {
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
    let progress = Progress::new(args.progress, size, "converting");
    let result = copy(src, dst_img.disk(), granule, &progress).and_then(|()| {
        progress.set_message("flushing");
        finish(dst_img, &args.target)
    });
    match result {
        Ok(()) => {
            progress.set_message("converted");
            progress.finish();
            Ok(())
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
pub fn copy(
    src: &dyn VirtualDisk,
    dst: &dyn VirtualDisk,
    granule: u64,
    progress: &Progress,
) -> Result<()> {
    let (tx, rx) = mpsc::sync_channel::<disk::Result<Window>>(QUEUE_DEPTH);
    let (free_tx, free_rx) = mpsc::channel::<Vec<u8>>();
    // Write-back runs beside the copy: a syncer thread makes the target's
    // data durable every SYNC_EVERY bytes, so the final flush (which the
    // convert waits for) finds little left to write. It syncs file data
    // only; metadata still goes through the format's own flush at the end.
    let (sync_tx, sync_rx) = mpsc::sync_channel::<()>(1);
    thread::scope(|s| {
        s.spawn(move || read_windows(src, &tx, &free_rx, progress));
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
            since_sync += write_nonzero(dst, &w.buf[..w.len], w.offset, granule)?;
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
) {
    let size = src.virtual_size();
    let mut pos = 0u64;
    while pos < size {
        match next_window(src, &mut pos, free, progress) {
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
) -> disk::Result<Option<Window>> {
    let size = src.virtual_size();
    let ext = extent_at(src, *pos)?;
    if reads_as_zero(&ext) {
        progress.inc(ext.len);
        *pos += ext.len;
        return Ok(None);
    }
    let chunk = CHUNK as u64;
    let end = ((*pos / chunk + 1) * chunk).min(size);
    let len = (end - *pos) as usize;
    let mut buf = free.try_recv().unwrap_or_else(|_| vec![0u8; CHUNK]);
    src.read_at(&mut buf[..len], *pos)?;
    let w = Window {
        offset: *pos,
        buf,
        len,
    };
    *pos = end;
    Ok(Some(w))
}

/// Write the runs of `data` (virtual offset `offset`) that are not all zero,
/// testing granule-aligned pieces. Returns the number of bytes written.
fn write_nonzero(dst: &dyn VirtualDisk, data: &[u8], offset: u64, granule: u64) -> Result<u64> {
    let mut written = 0u64;
    let piece_end = |i: usize| {
        let abs = offset + i as u64;
        let next = (abs / granule + 1) * granule;
        ((next - offset) as usize).min(data.len())
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
mod tests {
    use super::*;
    use disk::{MemStorage, RawDisk};

    #[test]
    fn copies_only_nonzero_granules() {
        let mut data = vec![0u8; 3 * CHUNK + 5000];
        data[100] = 1;
        data[CHUNK + 4095] = 2;
        data[CHUNK + 4096] = 3;
        data[3 * CHUNK + 4999] = 4;
        let src = RawDisk::new(MemStorage::from_vec("src", data.clone())).unwrap();
        let dst = RawDisk::create(MemStorage::new("dst"), data.len() as u64).unwrap();
        copy(&src, &dst, 4096, &Progress::new(false, 0, "")).unwrap();
        let mut back = vec![0u8; data.len()];
        dst.read_at(&mut back, 0).unwrap();
        assert_eq!(back, data);
    }
}
