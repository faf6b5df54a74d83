//! `vdisk compare`: do two images have the same virtual contents?

use super::{extent_at, first_difference, first_nonzero, min_len, reads_as_zero, CHUNK};
use crate::cli::CompareArgs;
use crate::open;
use crate::progress::Progress;
use anyhow::Result;
use disk::VirtualDisk;
use std::thread;

/// Compare; `Ok(true)` when identical. Prints the verdict like qemu-img
/// compare: images of different sizes are identical when the common part
/// is and the longer image's extra part reads as zeros ("Warning: Image
/// size mismatch!" first); in strict mode (`-s`) they differ.
pub fn run(args: &CompareArgs) -> Result<bool> {
    let a_img = open::open(&args.image_a, args.format_a, false)?;
    let b_img = open::open(&args.image_b, args.format_b, false)?;
    let (a, b) = (a_img.disk(), b_img.disk());
    let (size_a, size_b) = (a.virtual_size(), b.virtual_size());
    if size_a != size_b && args.strict {
        crate::outln!("Strict mode: Image size mismatch!")?;
        return Ok(false);
    }
    // The rate: bytes read and compared (ranges both images map as zeros
    // are skipped unread).
    let progress = Progress::bytes(args.progress, size_a.max(size_b), "comparing", "compared");
    let result = compare(a, b, &progress);
    match &result {
        Ok(_) => progress.finish(),
        Err(_) => progress.abandon(),
    }
    let verdict = result?;
    if verdict.sizes_differ {
        crate::outln!("Warning: Image size mismatch!")?;
    }
    Ok(match verdict.mismatch {
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

/// What [`compare`] found.
#[derive(Debug, PartialEq, Eq)]
pub struct Verdict {
    /// The sizes differ, and the common part is identical (the extra part
    /// was then looked at).
    pub sizes_differ: bool,
    /// The first virtual offset where the images read differently (past
    /// the shorter one's end: where the longer one is not zero).
    pub mismatch: Option<u64>,
}

/// Compare `a` and `b` as qemu-img does: the common part byte for byte,
/// then, when it is identical and the sizes differ, the longer image's
/// extra part against zeros.
pub fn compare(a: &dyn VirtualDisk, b: &dyn VirtualDisk, progress: &Progress) -> Result<Verdict> {
    let common = a.virtual_size().min(b.virtual_size());
    if let Some(off) = first_mismatch(a, b, common, progress)? {
        return Ok(Verdict {
            sizes_differ: false,
            mismatch: Some(off),
        });
    }
    let longer = if a.virtual_size() > common { a } else { b };
    if longer.virtual_size() == common {
        return Ok(Verdict {
            sizes_differ: false,
            mismatch: None,
        });
    }
    Ok(Verdict {
        sizes_differ: true,
        mismatch: first_nonzero_from(longer, common, progress)?,
    })
}

/// The first virtual offset below `end` where `a` and `b` differ.
pub fn first_mismatch(
    a: &dyn VirtualDisk,
    b: &dyn VirtualDisk,
    end: u64,
    progress: &Progress,
) -> Result<Option<u64>> {
    let mut buf_a = vec![0u8; CHUNK];
    let mut buf_b = vec![0u8; CHUNK];
    let mut pos = 0u64;
    while pos < end {
        let ea = extent_at(a, pos)?;
        let eb = extent_at(b, pos)?;
        let run = ea.len.min(eb.len).min(end - pos);
        let (za, zb) = (reads_as_zero(&ea), reads_as_zero(&eb));
        if za && zb {
            progress.inc(run);
            pos += run;
            continue;
        }
        let chunk = CHUNK as u64;
        let stop = ((pos / chunk + 1) * chunk).min(pos + run);
        let len = min_len(stop - pos, CHUNK);
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
        progress.add_copied(len as u64);
        progress.inc(len as u64);
        pos = stop;
    }
    Ok(None)
}

/// The first virtual offset at or after `from` where `d` does not read
/// as zero.
fn first_nonzero_from(d: &dyn VirtualDisk, from: u64, progress: &Progress) -> Result<Option<u64>> {
    let size = d.virtual_size();
    let mut buf = vec![0u8; CHUNK];
    let mut pos = from;
    while pos < size {
        let ext = extent_at(d, pos)?;
        if reads_as_zero(&ext) {
            progress.inc(ext.len);
            pos += ext.len;
            continue;
        }
        let chunk = CHUNK as u64;
        let stop = ((pos / chunk + 1) * chunk).min(pos + ext.len);
        let w = &mut buf[..min_len(stop - pos, CHUNK)];
        d.read_at(w, pos)?;
        if let Some(i) = first_nonzero(w) {
            return Ok(Some(pos + i as u64));
        }
        progress.add_copied(stop - pos);
        progress.inc(stop - pos);
        pos = stop;
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
        let p = Progress::hidden();
        let a = vec![0u8; CHUNK * 2 + 10];
        let mut b = a.clone();
        let end = a.len() as u64;
        assert_eq!(
            first_mismatch(&raw(a.clone()), &raw(b.clone()), end, &p).unwrap(),
            None
        );
        b[CHUNK + 3] = 9;
        b[CHUNK * 2 + 9] = 9;
        assert_eq!(
            first_mismatch(&raw(a.clone()), &raw(b.clone()), end, &p).unwrap(),
            Some(CHUNK as u64 + 3)
        );
        // Only below `end`.
        assert_eq!(
            first_mismatch(&raw(a), &raw(b), CHUNK as u64 + 3, &p).unwrap(),
            None
        );
    }

    #[test]
    fn sizes_differ_like_qemu_img() {
        let p = Progress::hidden();
        let short = vec![5u8; 1000];
        let mut long = short.clone();
        long.resize(CHUNK * 2 + 7, 0);
        let zero_tail = Verdict {
            sizes_differ: true,
            mismatch: None,
        };
        // Identical when the extra part reads as zeros, either way round.
        assert_eq!(
            compare(&raw(short.clone()), &raw(long.clone()), &p).unwrap(),
            zero_tail
        );
        assert_eq!(
            compare(&raw(long.clone()), &raw(short.clone()), &p).unwrap(),
            zero_tail
        );
        // A non-zero byte in the extra part is where they differ.
        let at = CHUNK * 2 + 3;
        long[at] = 1;
        for (x, y) in [(&short, &long), (&long, &short)] {
            assert_eq!(
                compare(&raw(x.clone()), &raw(y.clone()), &p).unwrap(),
                Verdict {
                    sizes_differ: true,
                    mismatch: Some(at as u64),
                }
            );
        }
        // A difference in the common part is found first, without the
        // size warning (as qemu-img).
        long[10] = 0;
        assert_eq!(
            compare(&raw(short), &raw(long), &p).unwrap(),
            Verdict {
                sizes_differ: false,
                mismatch: Some(10),
            }
        );
    }
}
