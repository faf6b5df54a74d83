//! Consistency check and repair of a VHD file (`vdisk check`, shaped like
//! `qemu-img check`, which has no check for this format), see
//! [`disk::check`] for the report.
//!
//! [`check`] reads every structure itself, trusting none (references are to
//! the Virtual Hard Disk Image Format Specification, 2006):
//!
//! - the footer ("Hard Disk Footer Format"): cookie, checksum, version,
//!   disk type and data offset; for dynamic and differencing disks also the
//!   copy at offset 0, which must be identical. Either copy damaged, or the
//!   two different, is a corruption that `-r all` repairs from the other
//!   copy (the footer at the end wins when both are valid);
//! - fixed disks: the data before the footer holds the disk size; bytes
//!   between the data and the footer are leaked;
//! - the dynamic disk header ("Dynamic Disk Header Format"): cookie,
//!   checksum, version, block size, a table large enough for the disk and
//!   inside the file, parent locator data inside the file;
//! - the BAT ("Block Allocation Table and Data Blocks"): every allocated
//!   block (its sector bitmap and data, sector-aligned by the entry's unit)
//!   lies inside the file before the footer, and overlaps neither the
//!   footer copy, the header, the BAT, the locators' data nor another block;
//! - differencing disks: the parent is found through the locators (under the
//!   parent policy), and its footer's unique id is the Parent Unique Id the
//!   header records;
//! - truncation: a file cut short has lost its footer (the copy at offset 0
//!   remains); every block that runs past the end of such a file is a
//!   corruption naming the block, its virtual range and file offset, and
//!   what is left of it is used space. The footer is then not restored
//!   (over the surviving part of a block it would destroy data, after it
//!   the block would run over it): the file keeps its length;
//! - leaks: unreferenced space big enough for a whole block (sector bitmap
//!   and data) — smaller gaps are the alignment padding Windows leaves
//!   between blocks. A leak just before the footer, past the last byte any
//!   block references, is reclaimed by moving the footer down and
//!   truncating; with the BAT unread, nothing is a leak.
//!
//! One pass per on-disk structure, in this order: `footer` (both copies;
//! for a fixed disk also its data), `header` (the dynamic disk header and
//! the BAT's place), `parent` (the locators' data, and the parent itself),
//! `bat` (the blocks, then the sweep for overlaps and leaks); `repair`
//! writes what the passes found repairable.

mod bat;
mod footer;
mod header;
mod parent;
mod repair;

use crate::dynamic_header::DynamicHeader;
use crate::footer::{DiskType, Footer, FOOTER_SIZE};
use crate::{OpenOptions, Result};
use disk::check::{CheckReport, Used};
use disk::Storage;
use std::path::Path;

pub use disk::check::CheckOptions;
pub use repair::{repair, repair_file};

/// `Used::what` of a structure (not a BAT entry): this bit plus
/// 0 = footer copy, 1 = dynamic disk header, 2 = BAT, 3 + i = locator i.
const STRUCTURE: u64 = 1 << 63;
/// The structure name of the dynamic disk header in problems.
const HEADER: &str = "VHD dynamic disk header";

/// Check the VHD file at `path` (opened read-only; never written).
///
/// # Errors
/// The file cannot be read, or is not a VHD (no footer cookie at all).
pub fn check_file(path: impl AsRef<Path>, opts: &CheckOptions) -> Result<CheckReport> {
    let storage = opts.opener.open(path.as_ref(), false, opts.lock)?;
    check(&*storage, opts)
}

/// Check the VHD on `storage` (read only). A differencing disk's parent is
/// looked for relative to the storage's name, taken as a path.
///
/// # Errors
/// I/O errors, or the storage does not hold a VHD (no footer cookie at the
/// end nor at offset 0); every other problem is in the report.
pub fn check(storage: &dyn Storage, opts: &CheckOptions) -> Result<CheckReport> {
    Ok(examine(storage, opts)?.report)
}

/// What [`examine`] found: the report and what a repair would do.
struct Findings {
    report: CheckReport,
    /// The valid footer in use (an old 511-byte one padded to 512).
    footer_bytes: Option<[u8; FOOTER_SIZE]>,
    /// Write the footer here: the one at the end is damaged.
    restore_tail: Option<u64>,
    /// Write the footer at offset 0: the copy there is damaged or differs.
    restore_head: bool,
    /// Writing the footer at `.0` (and cutting the file after it) reclaims
    /// `.1` leaked clusters.
    tail_leak: Option<(u64, u64)>,
}

/// What the footer pass found.
struct FooterFound {
    /// The footer in use (the one at the end, or the copy at offset 0).
    footer: Footer,
    /// The footer at the end of the file, when valid: its offset and size
    /// (511 bytes in images made before Virtual PC 2004).
    at_end: Option<(u64, u64)>,
    /// Offset of the last 512 bytes of the file (0 if shorter).
    tail_off: u64,
    /// The file's length.
    file_len: u64,
}

impl FooterFound {
    /// The size of the footer in use at the end (512 when damaged).
    fn size(&self) -> u64 {
        self.at_end.map_or(FOOTER_SIZE as u64, |(_, s)| s)
    }

    /// Where the data area of a dynamic disk ends: at the footer, or at the
    /// end of the file when the footer there is damaged.
    fn data_limit(&self) -> u64 {
        self.at_end.map_or(self.file_len, |(off, _)| off)
    }
}

/// What the header pass found: a dynamic disk's layout.
struct Layout {
    /// Offset of the dynamic disk header.
    hdr_off: u64,
    /// The header.
    header: DynamicHeader,
    /// Bytes of data per block.
    bs: u64,
    /// Bytes of a block in the file: sector bitmap and data.
    slot: u64,
    /// Blocks the disk size needs.
    needed: u64,
    /// Offset of the BAT.
    table_off: u64,
    /// Bytes of the BAT (4 per entry).
    table_bytes: u64,
    /// BAT entries to read: the ones the disk needs that lie in the file.
    readable: u64,
    /// Some entries the disk needs could not be read: blocks may lie
    /// anywhere, so nothing is a leak.
    table_unread: bool,
    /// The file ranges in use: the structures, then (the BAT pass) blocks.
    used: Vec<Used>,
}

fn read(storage: &dyn Storage, offset: u64, len: u64) -> Result<Vec<u8>> {
    let n = crate::image::buf_len(len)?;
    let mut buf = vec![0u8; n];
    storage.read_at(&mut buf, offset)?;
    Ok(buf)
}

/// Run the passes over the VHD on `storage`.
fn examine(storage: &dyn Storage, opts: &CheckOptions) -> Result<Findings> {
    let name = storage.name().to_string();
    let file_len = storage.len()?;
    let mut f = Findings {
        report: CheckReport::new(&name, "vhd"),
        footer_bytes: None,
        restore_tail: None,
        restore_head: false,
        tail_leak: None,
    };
    f.report.file_size = file_len;
    let Some(ff) = footer::check(storage, &mut f, file_len)? else {
        return Ok(f);
    };
    if ff.footer.disk_type == DiskType::Fixed {
        footer::check_fixed(&mut f, &ff);
        return Ok(f);
    }
    // Dynamic and differencing disks.
    let Some(mut layout) = header::check(storage, &mut f, &ff)? else {
        return Ok(f);
    };
    parent::check_locators(&mut f.report, &mut layout, ff.data_limit());
    bat::check(storage, &mut f, &ff, &mut layout)?;
    if ff.footer.disk_type == DiskType::Differencing && opts.check_parent {
        parent::check_parent(
            &mut f.report,
            storage,
            &layout,
            ff.footer.disk_size(),
            &opts.parent_policy,
            &OpenOptions {
                lock: opts.lock,
                opener: opts.opener.clone(),
                ..OpenOptions::default()
            },
        );
    }
    Ok(f)
}

/// Images and helpers for the unit tests of the passes.
#[cfg(test)]
// Test images are a few MiB: their offsets and sizes fit any integer type.
#[allow(clippy::cast_possible_truncation)]
mod testutil {
    pub(super) use super::{check, check_file, repair, CheckOptions};
    pub(super) use crate::{CreateOptions, OpenOptions, Vhd};
    pub(super) use disk::check::{CheckReport, Problem, ProblemKind, RepairMode};
    pub(super) use disk::{MemStorage, VirtualDisk};
    pub(super) use std::sync::Arc;

    pub(super) const MIB: u64 = 1 << 20;
    /// Layout of [`image`]: footer copy, header at 512, BAT at 1536 (one
    /// sector), first block at 2048; 2 MiB blocks with a 512-byte bitmap.
    pub(super) const BAT: u64 = 1536;
    pub(super) const FIRST: u64 = 2048;
    pub(super) const SLOT: u64 = 2 * MIB + 512;

    /// A closed 8 MiB dynamic VHD with `blocks` written (block b holds the
    /// byte b + 1), in that order.
    pub(super) fn image(blocks: &[u64]) -> Vec<u8> {
        let st = Arc::new(MemStorage::new("t.vhd"));
        let d = Vhd::create_on(Box::new(st.clone()), &CreateOptions::new(8 * MIB)).unwrap();
        for &b in blocks {
            d.write_at(&vec![b as u8 + 1; 2 * MIB as usize], b * 2 * MIB)
                .unwrap();
        }
        d.close().unwrap();
        st.to_vec()
    }

    pub(super) fn run(bytes: Vec<u8>) -> CheckReport {
        check(
            &MemStorage::from_vec("t.vhd", bytes),
            &CheckOptions::default(),
        )
        .unwrap()
    }

    pub(super) fn set_entry(img: &mut [u8], i: u64, sector: u32) {
        let at = (BAT + i * 4) as usize;
        img[at..at + 4].copy_from_slice(&sector.to_be_bytes());
    }

    pub(super) fn only(r: &CheckReport, kind: ProblemKind) -> &Problem {
        let v: Vec<&Problem> = r.problems.iter().filter(|p| p.kind == kind).collect();
        assert_eq!(v.len(), 1, "{:#?}", r.problems);
        v[0]
    }

    pub(super) fn contents(st: Arc<MemStorage>) -> Vec<u8> {
        let d = Vhd::open_storage(Box::new(st), &OpenOptions::default()).unwrap();
        disk::testing::read_all(&d)
    }

    /// `img` with `n` unreferenced bytes inserted before its footer.
    pub(super) fn with_spare(img: &[u8], n: usize) -> Vec<u8> {
        let at = img.len() - 512;
        let mut v = img[..at].to_vec();
        v.extend(vec![0x5a; n]);
        v.extend_from_slice(&img[at..]);
        v
    }
}

#[cfg(test)]
// Test images are a few MiB: their offsets and sizes fit any integer type.
#[allow(clippy::cast_possible_truncation)]
mod tests {
    use super::testutil::*;

    #[test]
    fn clean_dynamic_and_fixed_images() {
        for blocks in [&[][..], &[0, 2], &[3, 1]] {
            let img = image(blocks);
            let len = img.len() as u64;
            let r = run(img);
            assert!(r.is_clean(), "{:#?}", r.problems);
            assert_eq!((r.total_clusters, r.cluster_size), (5, 2 * MIB));
            assert_eq!(r.allocated_clusters, blocks.len() as u64);
            assert_eq!(r.image_end_offset, len);
        }
        assert_eq!(run(image(&[3, 1, 2])).fragmented_clusters, 1);
        let st = Arc::new(MemStorage::new("f.vhd"));
        let mut o = CreateOptions::new(4 * MIB);
        o.fixed = true;
        Vhd::create_on(Box::new(st.clone()), &o)
            .unwrap()
            .close()
            .unwrap();
        let r = run(st.to_vec());
        assert!(r.is_clean(), "{:#?}", r.problems);
    }

    #[test]
    fn not_a_vhd_is_an_error() {
        assert!(check(
            &MemStorage::from_vec("x", vec![0u8; 4096]),
            &CheckOptions::default()
        )
        .is_err());
        assert!(check(
            &MemStorage::from_vec("x", vec![0u8; 10]),
            &CheckOptions::default()
        )
        .is_err());
    }

    #[test]
    fn garbage_never_panics() {
        let base = image(&[0, 2]);
        let mut x = 0x9876_5432u64;
        for round in 0..400 {
            let mut img = base.clone();
            for _ in 0..(1 + round % 6) {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                let n = img.len() as u64;
                // The structures: the copy, header and BAT, or the footer.
                let at = match x % 3 {
                    0 => x % 2048,
                    1 => n - 1 - (x >> 8) % 512,
                    _ => x % n,
                };
                img[at as usize] = (x >> 40) as u8;
            }
            // Keep the checksums right half of the time, to get past them.
            if round % 2 == 0 {
                let n = img.len();
                for (at, len, ck) in [(0, 512, 64), (n - 512, 512, 64), (512, 1024, 36)] {
                    let sum = crate::footer::checksum(&img[at..at + len], ck);
                    img[at + ck..at + ck + 4].copy_from_slice(&sum.to_be_bytes());
                }
            }
            if round % 37 == 0 {
                img.truncate((x % img.len() as u64) as usize);
            }
            let st = MemStorage::from_vec("g.vhd", img);
            if let Ok(r) = check(&st, &CheckOptions::default()) {
                let _ = r.exit_code();
                let _ = repair(&st, RepairMode::All, &CheckOptions::default());
            }
        }
    }

    #[test]
    fn corpus_images() {
        let tmp = tempfile::tempdir().unwrap();
        for sub in ["vhd", "bad"] {
            let Some(dir) = disk::testing::corpus(sub) else {
                return;
            };
            let mut files: Vec<_> = std::fs::read_dir(dir)
                .unwrap()
                .map(|e| e.unwrap().path())
                .filter(|p| sub == "vhd" || p.to_string_lossy().contains(".vhd"))
                .collect();
            files.sort();
            for src in files {
                let img = disk::testing::decompress(&src, tmp.path());
                let name = src.file_name().unwrap().to_string_lossy().into_owned();
                let r = check_file(&img, &CheckOptions::default());
                eprintln!(
                    "{name}: {:?}",
                    r.as_ref().map(|r| (r.exit_code(), &r.problems))
                );
                if sub == "bad" {
                    // Refused or reported, never a panic.
                    assert!(r.map_or(true, |r| r.exit_code() != 0), "{name}");
                } else if name.contains("orphan") {
                    assert_eq!(r.unwrap().exit_code(), 1, "{name}");
                    let opts = CheckOptions {
                        check_parent: false,
                        ..CheckOptions::default()
                    };
                    let r = check_file(&img, &opts).unwrap();
                    assert!(r.is_clean(), "{name}: {:#?}", r.problems);
                } else {
                    let r = r.unwrap();
                    assert!(r.is_clean(), "{name}: {:#?}", r.problems);
                }
                std::fs::remove_file(&img).unwrap();
            }
        }
    }
}
