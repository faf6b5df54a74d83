// Test disks are a few MiB: offsets and lengths fit any integer type.
#![allow(clippy::cast_possible_truncation)]

use super::verify::Covering;
use super::*;
use crate::disks::{create_child, Format};
use disk::testing::pattern;

const MIB: u64 = 1 << 20;
const SIZE: u64 = 8 * MIB;

fn base(dir: &Path, format: Format) -> PathBuf {
    let path = dir.join(format!("base.{}", format.base_extension()));
    let kind = match format {
        Format::Vhdx => {
            let mut o = vhdx::CreateOptions::new(SIZE);
            o.block_size = MIB as u32;
            image::Kind::Vhdx(o)
        }
        Format::Vhd => image::Kind::Vhd(vhd::CreateOptions::new(SIZE)),
    };
    image::create(&path, &image::CreateOptions::new(kind))
        .unwrap()
        .close()
        .unwrap();
    path
}

fn child(dir: &Path, format: Format, name: &str, parent: &Path) -> PathBuf {
    let path = dir.join(format!("{name}.{}", format.child_extension()));
    create_child(format, &path, parent, &disk::file_opener()).unwrap();
    path
}

fn with_disk(path: &Path, f: impl FnOnce(&dyn VirtualDisk)) {
    let img = image::open(path, &OpenOptions::probing().writable()).unwrap();
    f(&**img.disk());
    img.close().unwrap();
}

fn all(from: &Path, to: &Path) -> Vec<Change> {
    Changes::open(from, to, &OpenOptions::probing())
        .unwrap()
        .collect::<Result<Vec<_>>>()
        .unwrap()
}

fn ch(start: u64, length: u64, zero: bool) -> Change {
    Change {
        start,
        length,
        zero,
    }
}

/// Over an ancestor, the changes are exactly the sectors the child's layer
/// holds: a sector-aligned partial write, a whole-block write, a zeroed
/// block (marked zero); the other direction reports the same ranges, split
/// by what the base maps.
fn ancestor_changes(format: Format) {
    let tmp = tempfile::tempdir().unwrap();
    let b = base(tmp.path(), format);
    with_disk(&b, |d| {
        d.write_at(&pattern(3 * MIB as usize, 1), 0).unwrap()
    });
    let c = child(tmp.path(), format, "c", &b);
    with_disk(&c, |d| {
        d.write_at(&pattern(4096, 2), 3 * MIB + 512).unwrap();
        d.write_at(&pattern(2 * MIB as usize, 3), 4 * MIB).unwrap();
        d.write_zeroes(6 * MIB, 2 * MIB, false).unwrap();
    });
    let got = all(&b, &c);
    let zero_block = format == Format::Vhdx; // a VHD child stores zeros as data
    let want = if zero_block {
        vec![
            ch(3 * MIB + 512, 4096, false),
            ch(4 * MIB, 2 * MIB, false),
            ch(6 * MIB, 2 * MIB, true),
        ]
    } else {
        vec![ch(3 * MIB + 512, 4096, false), ch(4 * MIB, 4 * MIB, false)]
    };
    assert_eq!(got, want, "{format:?}");
    // Backwards: the same ranges, zero where the base allocates nothing
    // (its data ends at 3 MiB: the VHDX's 1 MiB blocks end there, the
    // VHD's 2 MiB block runs on to 4 MiB).
    let back = all(&c, &b);
    assert_eq!(
        back,
        vec![
            ch(3 * MIB + 512, 4096, format == Format::Vhdx),
            ch(4 * MIB, 4 * MIB, true)
        ],
        "{format:?}"
    );
    let mut changes = Changes::open(&b, &c, &OpenOptions::probing()).unwrap();
    assert_eq!(
        std::fs::canonicalize(changes.common_ancestor()).unwrap(),
        std::fs::canonicalize(&b).unwrap()
    );
    assert!(changes.from_side().is_empty());
    assert_eq!(changes.to_side().len(), 1);
    let r = changes.verify(&mut |_| {}).unwrap();
    assert!(r.ok(), "{r:?}");
    // (A VHD's size is rounded up to a CHS geometry.)
    assert!(changes.virtual_size() >= SIZE);
    assert_eq!(r.bytes_compared, changes.virtual_size());
    assert_eq!(r.changes, want.len() as u64);
    assert_eq!(r.reported_bytes, 4096 + 4 * MIB);
    // The partial write and the whole block differ; the zeroed block read
    // zeros in the base too.
    assert_eq!(r.differing_bytes, 4096 + 2 * MIB, "{r:?}");
    // Rewound, the walk gives the same list again.
    changes.rewind();
    assert_eq!(changes.collect::<Result<Vec<_>>>().unwrap(), want);
}

#[test]
fn vhdx_changes_over_an_ancestor() {
    ancestor_changes(Format::Vhdx);
}

#[test]
fn vhd_changes_over_an_ancestor() {
    ancestor_changes(Format::Vhd);
}

/// Two children of one base: the changes are the union of what each holds,
/// merged where they touch, in order.
#[test]
fn siblings_change_where_either_side_holds_data() {
    for format in [Format::Vhdx, Format::Vhd] {
        let tmp = tempfile::tempdir().unwrap();
        let b = base(tmp.path(), format);
        let x = child(tmp.path(), format, "x", &b);
        let y = child(tmp.path(), format, "y", &b);
        with_disk(&x, |d| {
            d.write_at(&pattern(1024, 4), 5 * MIB).unwrap();
            d.write_at(&pattern(512, 5), 7 * MIB).unwrap();
        });
        with_disk(&y, |d| {
            d.write_at(&pattern(1024, 6), 5 * MIB + 1024).unwrap();
            d.write_at(&pattern(512, 7), MIB).unwrap();
        });
        let mut c = Changes::open(&x, &y, &OpenOptions::probing()).unwrap();
        assert_eq!(c.from_side().len(), 1);
        assert_eq!(c.to_side().len(), 1);
        let got: Vec<Change> = c.by_ref().collect::<Result<_>>().unwrap();
        assert_eq!(
            got,
            vec![
                ch(MIB, 512, false),
                // x's part reads zeros in y (the base holds nothing).
                ch(5 * MIB, 1024, true),
                ch(5 * MIB + 1024, 1024, false),
                ch(7 * MIB, 512, true),
            ],
            "{format:?}"
        );
        let r = c.verify(&mut |_| {}).unwrap();
        assert!(r.ok() && r.differing_bytes == r.reported_bytes, "{r:?}");
    }
}

#[test]
fn images_of_different_chains_are_refused_and_a_disk_has_no_changes_from_itself() {
    let tmp = tempfile::tempdir().unwrap();
    let a = base(tmp.path(), Format::Vhdx);
    let other = tmp.path().join("other");
    std::fs::create_dir(&other).unwrap();
    let b = base(&other, Format::Vhdx);
    let e = Changes::open(&a, &b, &OpenOptions::probing()).unwrap_err();
    assert!(e.to_string().contains("are not of one chain"), "{e}");
    let c = child(tmp.path(), Format::Vhdx, "c", &a);
    with_disk(&c, |d| d.write_at(b"data", 0).unwrap());
    assert_eq!(all(&c, &c), vec![]);
}

/// The coverage check: differing ranges inside the changes are fine, the
/// parts outside are counted and listed (adjacent parts merged, at most
/// [`MAX_MISSED`]).
#[test]
fn coverage_counts_what_no_change_covers() {
    let changes = [ch(100, 100, false), ch(200, 50, true), ch(400, 10, false)];
    let mut it = changes.iter().copied();
    let mut next = || Ok(it.next());
    let mut report = VerifyReport::default();
    let mut cov = Covering {
        next: &mut next,
        cur: None,
        done: false,
        report: &mut report,
    };
    cov.differ(120, 240).unwrap(); // inside two adjacent changes
    cov.differ(240, 260).unwrap(); // 250..260 outside
    cov.differ(260, 270).unwrap(); // outside, adjacent: merged
    cov.differ(390, 420).unwrap(); // 390..400 and 410..420 outside
    cov.differ(500, 510).unwrap(); // past every change
    cov.seek(u64::MAX).unwrap();
    assert_eq!(report.differing_bytes, 120 + 20 + 10 + 30 + 10);
    assert_eq!(report.missed_bytes, 10 + 10 + 20 + 10);
    assert_eq!(
        report.missed,
        vec![(250, 20), (390, 10), (410, 10), (500, 10)]
    );
    assert_eq!((report.changes, report.reported_bytes), (3, 160));
    assert!(!report.ok());

    let mut none = || Ok(None);
    let mut report = VerifyReport::default();
    let mut cov = Covering {
        next: &mut none,
        cur: None,
        done: false,
        report: &mut report,
    };
    for k in 0..(MAX_MISSED as u64 + 5) {
        cov.differ(k * 10, k * 10 + 5).unwrap();
    }
    assert_eq!(report.missed.len(), MAX_MISSED);
    assert_eq!(report.missed_bytes, (MAX_MISSED as u64 + 5) * 5);
}
