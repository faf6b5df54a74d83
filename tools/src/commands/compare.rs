//! `vdisk compare`: do two images have the same virtual contents?

use super::{extent_at, first_difference, first_nonzero, reads_as_zero, CHUNK};
use crate::open;
use crate::progress::Progress;
use crate::CompareArgs;
use anyhow::Result;
use disk::VirtualDisk;
use std::thread;

/// Compare; `Ok(true)` when identical. Prints the verdict like qemu-img.
pub fn run(args: &CompareArgs) -> Result<bool> {
    let a_img = open::open(&args.image_a, args.format_a, false)?;
    let b_img = open::open(&args.image_b, args.format_b, false)?;
    let (a, b) = (a_img.disk(), b_img.disk());
    if a.virtual_size() != b.virtual_size() {
        crate::outln!("Image size mismatch!")?;
        return Ok(false);
    }
    let progress = Progress::new(args.progress, a.virtual_size(), "comparing");
    let result = first_mismatch(a, b, &progress);
    match &result {
        Ok(_) => progress.finish(),
        Err(_) => progress.abandon(),
    }
    Ok(match result? {
        None => {
            crate::outln!("Images are identical.")?;
            true
        }
        Some(off) => {
            crate::outln!("Content mismatch at offset {off}!")?;
            false
        }
    })
}

/// The first virtual offset where `a` and `b` (of equal size) differ.
pub fn first_mismatch(
    a: &dyn VirtualDisk,
    b: &dyn VirtualDisk,
    progress: &Progress,
) -> Result<Option<u64>> {
    let size = a.virtual_size();
    let mut buf_a = vec![0u8; CHUNK];
    let mut buf_b = vec![0u8; CHUNK];
    let mut pos = 0u64;
    while pos < size {
        let ea = extent_at(a, pos)?;
        let eb = extent_at(b, pos)?;
        let run = ea.len.min(eb.len);
        let (za, zb) = (reads_as_zero(&ea), reads_as_zero(&eb));
        if za && zb {
            progress.inc(run);
            pos += run;
            continue;
        }
        let chunk = CHUNK as u64;
        let end = ((pos / chunk + 1) * chunk).min(pos + run);
        let len = (end - pos) as usize;
        let (wa, wb) = (&mut buf_a[..len], &mut buf_b[..len]);
        let found = match (za, zb) {
            (true, _) => {
                b.read_at(wb, pos)?;
                first_nonzero(wb)
            }
            (_, true) => {
                a.read_at(wa, pos)?;
                first_nonzero(wa)
            }
            _ => {
                // Read both images at once.
                let (ra, rb) = thread::scope(|s| {
                    let h = s.spawn(|| a.read_at(wa, pos));
                    let rb = b.read_at(wb, pos);
                    let ra = h.join().unwrap_or_else(|p| std::panic::resume_unwind(p));
                    (ra, rb)
                });
                ra?;
                rb?;
                first_difference(wa, wb)
            }
        };
        if let Some(i) = found {
            return Ok(Some(pos + i as u64));
        }
        progress.inc(len as u64);
        pos = end;
    }
    Ok(None)
}

#[cfg(test)]
mod tests {
    use super::*;
    use disk::{MemStorage, RawDisk};

    fn raw(data: Vec<u8>) -> RawDisk<MemStorage> {
        RawDisk::new(MemStorage::from_vec("m", data)).unwrap()
    }

    #[test]
    fn finds_first_difference() {
        let p = Progress::new(false, 0, "");
        let a = vec![0u8; CHUNK * 2 + 10];
        let mut b = a.clone();
        assert_eq!(
            first_mismatch(&raw(a.clone()), &raw(b.clone()), &p).unwrap(),
            None
        );
        b[CHUNK + 3] = 9;
        b[CHUNK * 2 + 9] = 9;
        assert_eq!(
            first_mismatch(&raw(a), &raw(b), &p).unwrap(),
            Some(CHUNK as u64 + 3)
        );
    }
}
