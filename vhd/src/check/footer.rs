//! The footer pass ("Hard Disk Footer Format"): the footer at the end of
//! the file (512 bytes, or 511 in images made before Virtual PC 2004) and,
//! for dynamic and differencing disks, its copy at offset 0, which must be
//! identical; either damaged is repaired from the other. For a fixed disk,
//! the data before the footer.

use super::{read, Findings, FooterFound};
use crate::bat::SECTOR;
use crate::footer::{DiskType, Footer, COOKIE, FOOTER_SIZE, OLD_FOOTER_SIZE};
use crate::{Error, Result};
use disk::check::{Problem, ProblemKind, RepairMode};
use disk::{ResultExt, Storage};

/// Find the footer in use and check both copies. `None` when no footer is
/// usable (reported); an error when the file is not a VHD at all (no
/// footer cookie anywhere) or cannot be read.
pub(super) fn check(
    storage: &dyn Storage,
    f: &mut Findings,
    file_len: u64,
) -> Result<Option<FooterFound>> {
    let name = storage.name().to_string();
    if file_len < OLD_FOOTER_SIZE as u64 {
        return Err(Error::corrupt(
            "VHD footer",
            0,
            format!("file is {file_len} bytes, too short to hold a VHD footer"),
        )
        .in_file(&name, 0));
    }
    // The footer at the end: 512 bytes, or 511 in images made before
    // Virtual PC 2004.
    let tail_len = file_len.min(FOOTER_SIZE as u64);
    let tail_off = file_len - tail_len;
    let tail = read(storage, tail_off, tail_len)?;
    let tail_parsed = match Footer::parse(&tail).in_file(&name, tail_off) {
        Ok(ft) if tail.len() == FOOTER_SIZE => Ok((ft, tail_off, FOOTER_SIZE)),
        first => {
            let old = &tail[tail.len() - OLD_FOOTER_SIZE..];
            match Footer::parse(old) {
                Ok(ft) => Ok((ft, file_len - OLD_FOOTER_SIZE as u64, OLD_FOOTER_SIZE)),
                Err(_) => Err(first.err().unwrap_or_else(|| {
                    Error::corrupt("VHD footer", 0, "no valid footer at the end of the file")
                        .in_file(&name, tail_off)
                })),
            }
        }
    };
    // The copy at offset 0 (dynamic and differencing disks).
    let head = if file_len >= 2 * FOOTER_SIZE as u64 {
        Some(read(storage, 0, FOOTER_SIZE as u64)?)
    } else {
        None
    };
    let head_parsed = head.as_ref().map(|h| Footer::parse(h).in_file(&name, 0));
    let padded = |b: &[u8]| {
        let mut out = [0u8; FOOTER_SIZE];
        out[..b.len()].copy_from_slice(b);
        out
    };
    // (footer, its offset and size when it is the one at the end)
    let (footer, at_end) = match (tail_parsed, &head_parsed) {
        (Ok((ft, off, size)), _) => {
            let bytes = padded(&tail[tail.len() - size..]);
            f.footer_bytes = Some(bytes);
            if ft.disk_type != DiskType::Fixed {
                let problem = match (&head_parsed, &head) {
                    (Some(Ok(_)), Some(h)) if h[..size] == bytes[..size] => None,
                    (Some(Ok(_)), _) => Some(Problem::new(
                        ProblemKind::Corruption,
                        "VHD footer",
                        0,
                        format!("the footer copy at offset 0 differs from the footer at {off:#x}"),
                    )),
                    (Some(Err(e)), _) => {
                        let mut p = Problem::from_error(e, "VHD footer", 0);
                        p.message =
                            format!("the footer copy at offset 0 is damaged: {}", p.message);
                        Some(p)
                    }
                    (None, _) => Some(Problem::new(
                        ProblemKind::Corruption,
                        "VHD footer",
                        0,
                        "the file is too short to hold the footer copy at offset 0",
                    )),
                };
                if let Some(p) = problem {
                    let fixable = head.is_some();
                    f.report.add(
                        if fixable {
                            p.repairable(RepairMode::All)
                        } else {
                            p
                        },
                        0,
                    );
                    f.restore_head = fixable;
                }
            }
            (ft, Some((off, size as u64)))
        }
        (Err(te), Some(Ok(hf))) if hf.disk_type != DiskType::Fixed => {
            let mut p = Problem::from_error(&te, "VHD footer", tail_off);
            p.message = format!(
                "the footer at the end of the file is damaged ({}); its copy at offset 0 is intact",
                p.message
            );
            f.report.add(p.repairable(RepairMode::All), 0);
            if let Some(h) = &head {
                f.footer_bytes = Some(padded(h));
            }
            // Where the footer goes back is decided once every structure
            // is known (below): never over a referenced byte.
            (hf.clone(), None)
        }
        (Err(te), _) if cookie_lost(&tail).is_some() => {
            // Only the cookie was lost (zeroed or overwritten), at the end
            // and at offset 0: with "conectix" back, the footer at the end
            // checks (its checksum covers the cookie), so -r all writes it
            // back there and, for a dynamic disk, over the copy at 0.
            let bytes = cookie_lost(&tail).unwrap_or([0; FOOTER_SIZE]);
            let ft = Footer::parse(&bytes).in_file(&name, tail_off)?;
            f.report.add(
                Problem::new(
                    ProblemKind::Corruption,
                    "VHD footer",
                    tail_off,
                    format!(
                        "{}; with the cookie \"conectix\" restored the footer is valid (its \
                         checksum matches), so only the cookie is lost",
                        te.message()
                    ),
                )
                .repairable(RepairMode::All),
                0,
            );
            f.footer_bytes = Some(bytes);
            f.restore_head = ft.disk_type != DiskType::Fixed && head.is_some();
            if f.restore_head {
                f.report.add(
                    Problem::new(
                        ProblemKind::Corruption,
                        "VHD footer",
                        0,
                        "the footer copy at offset 0 is damaged too",
                    )
                    .repairable(RepairMode::All),
                    0,
                );
            }
            (ft, None)
        }
        (Err(te), _) => {
            let cookie_at = |b: &[u8], at: usize| b.get(at..at + COOKIE.len()) == Some(&COOKIE[..]);
            let any_cookie = cookie_at(&tail, tail.len().saturating_sub(FOOTER_SIZE))
                || cookie_at(&tail, tail.len() - OLD_FOOTER_SIZE)
                || head.as_ref().is_some_and(|h| cookie_at(h, 0));
            if !any_cookie {
                return Err(te); // not a VHD at all
            }
            f.report
                .add(Problem::from_error(&te, "VHD footer", tail_off), 0);
            return Ok(None);
        }
    };
    Ok(Some(FooterFound {
        footer,
        at_end,
        tail_off,
        file_len,
    }))
}

/// A fixed disk: the data before the footer holds the disk size; bytes
/// between the data and the footer are leaked (a repair cuts them).
pub(super) fn check_fixed(f: &mut Findings, ff: &FooterFound) {
    let size = ff.footer.disk_size();
    let footer_size = ff.size();
    // A fixed disk always has its footer at the end (or it would not
    // have been taken for one).
    let (off, _) = ff.at_end.unwrap_or((ff.tail_off, footer_size));
    f.report.cluster_size = SECTOR;
    f.report.total_clusters = size.div_ceil(SECTOR);
    f.report.allocated_clusters = f.report.total_clusters;
    if size > off {
        f.report.corrupt(
            "VHD footer",
            off + 48,
            format!("the disk size {size} exceeds the {off} bytes of data before the footer"),
        );
    } else if size < off {
        let len = off - size;
        let clusters = len.div_ceil(SECTOR);
        f.report.leak(size, len, clusters, true);
        f.tail_leak = Some((size, clusters));
    }
    f.report.image_end_offset = size.min(off) + footer_size;
}

/// The last 512 bytes of a file, `tail`, with the footer cookie put back,
/// when that makes a valid footer (checksum included): a footer that lost
/// only its cookie.
fn cookie_lost(tail: &[u8]) -> Option<[u8; FOOTER_SIZE]> {
    let mut b: [u8; FOOTER_SIZE] = tail.try_into().ok()?;
    if b[..COOKIE.len()] == COOKIE[..] {
        return None;
    }
    b[..COOKIE.len()].copy_from_slice(&COOKIE[..]);
    Footer::parse(&b).ok().map(|_| b)
}

#[cfg(test)]
mod tests {
    use super::super::testutil::*;
    use crate::footer::Footer;

    #[test]
    fn damaged_footer_is_restored_from_its_copy() {
        let img = image(&[1]);
        let end = img.len();
        let st = Arc::new(MemStorage::from_vec("t.vhd", img.clone()));
        let want = contents(st.clone());
        let mut bad = img.clone();
        bad[end - 512 + 30] ^= 0xff;
        let r = run(bad.clone());
        assert_eq!(r.exit_code(), 2);
        let p = only(&r, ProblemKind::Corruption);
        assert_eq!(
            (p.offset, p.repair),
            (end as u64 - 512 + 64, Some(RepairMode::All))
        );
        assert!(p.message.contains("copy at offset 0 is intact"), "{p}");
        let st = Arc::new(MemStorage::from_vec("t.vhd", bad));
        assert_eq!(
            repair(&*st, RepairMode::Leaks, &CheckOptions::default())
                .unwrap()
                .corruptions_fixed,
            0
        );
        let fix = repair(&*st, RepairMode::All, &CheckOptions::default()).unwrap();
        assert_eq!(fix.corruptions_fixed, 1);
        assert_eq!(st.to_vec(), img);
        assert_eq!(contents(st), want);
        // A footer cut short: restored after the last block.
        let mut cut = img.clone();
        cut.truncate(end - 100);
        let st = Arc::new(MemStorage::from_vec("t.vhd", cut));
        assert_eq!(
            check(&*st, &CheckOptions::default()).unwrap().exit_code(),
            2
        );
        repair(&*st, RepairMode::All, &CheckOptions::default()).unwrap();
        assert_eq!(st.to_vec(), img);
    }

    #[test]
    fn damaged_or_different_footer_copy() {
        let img = image(&[0]);
        let mut bad = img.clone();
        bad[3] = b'x';
        let r = run(bad.clone());
        let p = only(&r, ProblemKind::Corruption);
        assert_eq!((p.offset, p.repair), (0, Some(RepairMode::All)));
        assert!(p.message.contains("copy at offset 0 is damaged"), "{p}");
        let st = MemStorage::from_vec("t.vhd", bad);
        repair(&st, RepairMode::All, &CheckOptions::default()).unwrap();
        assert_eq!(st.to_vec(), img);
        // A valid copy that says something else.
        let mut other = img.clone();
        let mut f = Footer::parse(&img[..512]).unwrap();
        f.timestamp ^= 1;
        f.write_to(&mut other[..512]);
        let p = run(other).problems.remove(0);
        assert!(p.message.contains("differs"), "{p}");
    }

    #[test]
    fn fixed_disk_with_bytes_before_the_footer() {
        let st = Arc::new(MemStorage::new("f.vhd"));
        let mut o = CreateOptions::new(4 * MIB);
        o.fixed = true;
        Vhd::create_on(Box::new(st.clone()), &o)
            .unwrap()
            .close()
            .unwrap();
        let img = st.to_vec();
        let size = img.len() as u64 - 512;
        let r = run(with_spare(&img, 1024));
        let p = only(&r, ProblemKind::Leak);
        assert_eq!((p.offset, p.length, r.leaks), (size, 1024, 2));
        let st = MemStorage::from_vec("f.vhd", with_spare(&img, 1024));
        repair(&st, RepairMode::Leaks, &CheckOptions::default()).unwrap();
        assert_eq!(st.to_vec(), img);
        // A disk larger than its data.
        let mut big = img.clone();
        let at = big.len() - 512;
        let mut f = Footer::parse(&big[at..]).unwrap();
        f.current_size += MIB;
        f.write_to(&mut big[at..]);
        let r = run(big);
        let p = only(&r, ProblemKind::Corruption);
        assert_eq!(p.offset, size + 48);
    }
}
