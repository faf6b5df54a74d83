//! `Vhd::resize`: fixed and dynamic grow and shrink, CHS rounding, Azure
//! sizes, differencing refused, and a power cut at every write of a dynamic
//! grow that moves blocks out of the BAT's way: every crash image opens,
//! reads the data written before the resize, and has the old or new size.
//! Every finished resize leaves a file `vhd::check` finds clean (a shrink
//! gives back the tail it frees: no leak), and every crash image is clean after `check -r all`.

// Test images and buffers are small: their offsets and sizes fit any integer type.
#![allow(clippy::cast_possible_truncation)]

use disk::check::{ProblemKind, RepairMode};
use disk::fault::RecordingStorage;
use disk::testing::crash::for_each_crash;
use disk::testing::{check_marks, check_marks_gone, mark};
use disk::{MemStorage, VirtualDisk};
use std::sync::Arc;
use vhd::footer::ChsGeometry;
use vhd::{CreateOptions, OpenOptions, Vhd};

const MIB: u64 = 1 << 20;

fn image(size: u64, fixed: bool, azure: bool, marks: &[u64]) -> Vec<u8> {
    let st = Arc::new(MemStorage::new("base"));
    let mut o = CreateOptions::new(size);
    o.fixed = fixed;
    o.azure = azure;
    o.block_size = 64 * 1024;
    let d = Vhd::create_on(Box::new(st.clone()), &o).unwrap();
    for &m in marks {
        d.write_at(&mark(m), m).unwrap();
    }
    d.close().unwrap();
    st.to_vec()
}

fn open(bytes: Vec<u8>) -> Vhd {
    Vhd::open_storage(
        Box::new(MemStorage::from_vec("img", bytes)),
        &OpenOptions::default(),
    )
    .unwrap()
}

/// `bytes` is a VHD that `vhd::check` finds clean: no corruption, no leak
/// (exit status 0).
fn assert_clean(bytes: Vec<u8>, what: &str) {
    let r = vhd::check::check(&MemStorage::from_vec("img", bytes), &Default::default()).unwrap();
    assert_eq!(
        (r.corruptions, r.leaks, r.exit_code()),
        (0, 0, 0),
        "{what}: {:?}",
        r.problems
    );
}

/// `bytes` (a crash image) has nothing `check -r all` cannot repair, and
/// is clean after it: a leak (a tail not yet cut) and a footer copy at 0
/// that disagrees with the trailing footer (a crash between the two
/// footer writes: the trailing one is used) are allowed.
fn assert_repairable(bytes: Vec<u8>, what: &str) {
    let st = MemStorage::from_vec("img", bytes);
    let r = vhd::check::check(&st, &Default::default()).unwrap();
    for p in r
        .problems
        .iter()
        .filter(|p| p.kind == ProblemKind::Corruption)
    {
        assert_eq!(p.repair, Some(RepairMode::All), "{what}: {p:?}");
    }
    vhd::check::repair(&st, RepairMode::All, &Default::default()).unwrap();
    assert_clean(st.to_vec(), &format!("{what}, repaired"));
}

fn rw() -> OpenOptions {
    OpenOptions {
        writable: true,
        ..Default::default()
    }
}

/// Open the VHD on `st` writable and resize it (then close it).
fn resize_on(st: Box<dyn disk::Storage>, size: u64, force: bool) -> disk::Result<u64> {
    let mut d = Vhd::open_storage(st, &rw())?;
    let s = d.resize(size, force)?;
    d.close()?;
    Ok(s)
}

fn resize(bytes: Vec<u8>, size: u64, force: bool) -> disk::Result<(u64, Vec<u8>)> {
    let st = Arc::new(MemStorage::from_vec("img", bytes));
    let s = resize_on(Box::new(st.clone()), size, force)?;
    Ok((s, st.to_vec()))
}

#[test]
fn dynamic_grow_relocating_crash_at_every_write() {
    // 64 KiB blocks: 8 MiB is 128 entries, exactly one BAT sector, and
    // block 0 follows it (CHS rounding makes it two sectors); 20 MiB needs three.
    let marks = [0, 100, 64 * 1024 + 3, 5 * MIB];
    let size0 = ChsGeometry::round_up(8 * MIB).0;
    let base = image(8 * MIB, false, false, &marks);
    let before = open(base.clone()).map(0, 512).unwrap().mapping;
    let rec = Arc::new(RecordingStorage::new("rec", base));
    let new = resize_on(Box::new(rec.clone()), 20 * MIB, false).unwrap();
    assert_eq!(new, ChsGeometry::round_up(20 * MIB).0);
    let d = open(rec.contents());
    assert_eq!(d.virtual_size(), new);
    check_marks(&d, &marks, "after resize");
    assert_ne!(
        d.map(0, 512).unwrap().mapping,
        before,
        "block 0 was not moved"
    );
    assert!(d.info().header.as_ref().unwrap().max_table_entries >= 320);
    assert_clean(rec.contents(), "grown");
    for_each_crash(&rec, 3, |img, cut, strategy| {
        let what = format!("{strategy} cut {cut}");
        assert_repairable(img.clone(), &what);
        let st = Arc::new(MemStorage::from_vec("crash", img));
        let d = Vhd::open_storage(
            Box::new(st.clone()),
            &OpenOptions {
                writable: true,
                ..Default::default()
            },
        )
        .unwrap_or_else(|e| panic!("{what}: open failed: {e}"));
        let s = d.virtual_size();
        assert!(s == size0 || s == new, "{what}: size {s}");
        check_marks(&d, &marks, &what);
        // Still writable: a new block at the end reads back after reopening.
        let end = s - 512;
        d.write_at(b"tail", end).unwrap();
        d.close().unwrap();
        let again = open(st.to_vec());
        check_marks(&again, &marks, &what);
        let mut t = [0u8; 4];
        again.read_at(&mut t, end).unwrap();
        assert_eq!(&t, b"tail", "{what}");
    });
}

#[test]
fn fixed_grow_crash_at_every_write() {
    let marks = [0, 3 * MIB];
    let size0 = ChsGeometry::round_up(4 * MIB).0;
    let rec = Arc::new(RecordingStorage::new(
        "rec",
        image(4 * MIB, true, false, &marks),
    ));
    let new = resize_on(Box::new(rec.clone()), 6 * MIB, false).unwrap();
    assert_clean(rec.contents(), "fixed grown");
    for_each_crash(&rec, 5, |img, cut, strategy| {
        let what = format!("{strategy} cut {cut}");
        assert_repairable(img.clone(), &what);
        let d = Vhd::open_storage(
            Box::new(MemStorage::from_vec("crash", img)),
            &OpenOptions::default(),
        )
        .unwrap_or_else(|e| panic!("{what}: open failed: {e}"));
        let s = d.virtual_size();
        assert!(s == size0 || s == new, "{what}: size {s}");
        check_marks(&d, &marks, &what);
    });
    // Once done, the grown part reads as zeros (the old footer was cleared).
    let d = open(rec.contents());
    let mut b = vec![0xffu8; (new - size0) as usize];
    d.read_at(&mut b, size0).unwrap();
    assert!(b.iter().all(|&x| x == 0));
}

#[test]
fn dynamic_shrink_rules_and_tail() {
    let marks = [0, MIB];
    let img = image(8 * MIB, false, false, &marks);
    let d = open(img.clone());
    d.close().unwrap();
    let st = Arc::new(MemStorage::from_vec("img", img));
    let w = Vhd::open_storage(
        Box::new(st.clone()),
        &OpenOptions {
            writable: true,
            ..Default::default()
        },
    )
    .unwrap();
    w.write_at(b"cut", 6 * MIB).unwrap();
    w.close().unwrap();
    let e = resize(st.to_vec(), 4 * MIB, false).unwrap_err().to_string();
    assert!(e.contains("img:") && e.contains("block 96"), "{e}");
    let (s, shrunk) = resize(st.to_vec(), 4 * MIB, true).unwrap();
    assert_eq!(s, ChsGeometry::round_up(4 * MIB).0);
    // The block at 6 MiB, last in the file, is cut off with the footer
    // moved before it.
    let slot = 64 * 1024 + 512;
    assert_eq!(shrunk.len(), st.to_vec().len() - slot);
    assert_clean(shrunk.clone(), "shrunk");
    let d = open(shrunk.clone());
    assert_eq!(d.virtual_size(), s);
    check_marks(&d, &marks, "shrunk");
    // Growing back: the discarded block reads as zeros.
    let (_, grown) = resize(shrunk, 8 * MIB, false).unwrap();
    assert_clean(grown.clone(), "grown back");
    let d = open(grown);
    check_marks(&d, &marks, "grown back");
    let mut b = [9u8; 3];
    d.read_at(&mut b, 6 * MIB).unwrap();
    assert_eq!(b, [0, 0, 0]);
}

#[test]
fn fixed_shrink_refused_over_data_then_forced() {
    let marks = [0];
    let img = image(8 * MIB, true, false, &marks);
    let st = Arc::new(MemStorage::from_vec("img", img));
    let w = Vhd::open_storage(
        Box::new(st.clone()),
        &OpenOptions {
            writable: true,
            ..Default::default()
        },
    )
    .unwrap();
    w.write_at(b"cut", 6 * MIB).unwrap();
    w.close().unwrap();
    assert!(resize(st.to_vec(), 4 * MIB, false).is_err());
    let (s, out) = resize(st.to_vec(), 4 * MIB, true).unwrap();
    assert_eq!(out.len() as u64, s + 512);
    assert_clean(out.clone(), "fixed shrunk");
    let d = open(out);
    assert_eq!(d.virtual_size(), s);
    check_marks(&d, &marks, "fixed shrunk");
}

#[test]
fn azure_sizes_stay_exact() {
    let img = image(8 * MIB, true, true, &[0]);
    assert!(resize(img.clone(), 10 * MIB + 512, false).is_err());
    let (s, out) = resize(img, 10 * MIB, false).unwrap();
    assert_eq!(s, 10 * MIB);
    assert_eq!(open(out).virtual_size(), 10 * MIB);
}

#[test]
fn differencing_and_bad_sizes_refused() {
    let dir = tempfile::tempdir().unwrap();
    let base = dir.path().join("base.vhd");
    let child = dir.path().join("child.vhd");
    Vhd::create(&base, &CreateOptions::new(8 * MIB), false)
        .unwrap()
        .close()
        .unwrap();
    Vhd::create_differencing_file(&child, &base, &CreateOptions::new(0), false).unwrap();
    let e = Vhd::open(&child, &rw())
        .unwrap()
        .resize(16 * MIB, false)
        .unwrap_err()
        .to_string();
    assert!(e.contains("differencing") && e.contains("child.vhd"), "{e}");
    let mut d = Vhd::open(&base, &rw()).unwrap();
    assert!(d.resize(0, false).is_err());
    assert!(d.resize(3 << 40, false).is_err());
    drop(d);
    // Open read-only: refused, the file untouched.
    let before = std::fs::read(&base).unwrap();
    let e = Vhd::open(&base, &OpenOptions::default())
        .unwrap()
        .resize(16 * MIB, false)
        .unwrap_err();
    assert!(e.to_string().contains("read-only"), "{e}");
    assert_eq!(std::fs::read(&base).unwrap(), before);
}

/// The method works on an open image: writes not yet flushed are kept
/// (the image flushes first), and the image stays usable at the new size:
/// a write past the old end reads back, after reopening too.
#[test]
fn open_image_keeps_unflushed_writes_and_stays_usable() {
    for fixed in [false, true] {
        let st = Arc::new(MemStorage::from_vec(
            "img",
            image(8 * MIB, fixed, false, &[0]),
        ));
        let mut d = Vhd::open_storage(Box::new(st.clone()), &rw()).unwrap();
        d.write_at(&mark(3 * MIB), 3 * MIB).unwrap();
        let new = d.resize(20 * MIB, false).unwrap();
        assert_eq!(d.virtual_size(), new, "fixed {fixed}");
        assert_eq!(d.info().virtual_size, new, "fixed {fixed}");
        let end = new - 4096;
        d.write_at(&mark(end), end).unwrap();
        check_marks(&d, &[0, 3 * MIB, end], "open");
        d.close().unwrap();
        assert_clean(st.to_vec(), "resized open");
        let again = open(st.to_vec());
        assert_eq!(again.virtual_size(), new);
        check_marks(&again, &[0, 3 * MIB, end], "reopened");
        // Shrunk back while open: the mark past the new end is gone.
        let mut d = Vhd::open_storage(Box::new(st.clone()), &rw()).unwrap();
        let small = d.resize(8 * MIB, true).unwrap();
        assert!(small < end);
        check_marks(&d, &[0, 3 * MIB], "shrunk open");
        d.write_at(b"x", small - 1).unwrap();
        d.close().unwrap();
        assert_clean(st.to_vec(), "shrunk open");
    }
}

/// A forced shrink of a dynamic disk over data, cut at every write: each
/// crash image has the old size with all its data, or the new size with
/// the data before the cut; grown back, the cut part reads as zeros.
#[test]
fn dynamic_forced_shrink_crash_at_every_write() {
    let kept = [0, 100, 3 * MIB];
    let cut = [9 * MIB, 15 * MIB];
    let all: Vec<u64> = kept.iter().chain(&cut).copied().collect();
    let size0 = ChsGeometry::round_up(16 * MIB).0;
    let rec = Arc::new(RecordingStorage::new(
        "rec",
        image(16 * MIB, false, false, &all),
    ));
    assert!(resize_on(Box::new(rec.clone()), 8 * MIB, false).is_err());
    let new = resize_on(Box::new(rec.clone()), 8 * MIB, true).unwrap();
    assert!(new < 9 * MIB, "{new}");
    // The blocks at 9 and 15 MiB were allocated last: cut off.
    let done = rec.contents();
    let slot = 64 * 1024 + 512;
    assert_eq!(
        done.len(),
        image(16 * MIB, false, false, &all).len() - 2 * slot
    );
    assert_clean(done, "shrunk");
    let mut sizes = std::collections::BTreeSet::new();
    for_each_crash(&rec, 5, |img, at, strategy| {
        let what = format!("{strategy} cut {at}");
        assert_repairable(img.clone(), &what);
        let d = open(img.clone());
        let s = d.virtual_size();
        sizes.insert(s);
        assert!(s == size0 || s == new, "{what}: size {s}");
        check_marks(&d, if s == size0 { &all } else { &kept }, &what);
        drop(d);
        if s == new {
            let (_, grown) = resize(img, size0, false).unwrap();
            let d = open(grown);
            check_marks(&d, &kept, &what);
            check_marks_gone(&d, &cut, &what);
        }
    });
    assert_eq!(sizes.len(), 2, "crash states of both sizes: {sizes:?}");
}

/// A shrink, forced or not, leaves no leak: a block freed below one that
/// is kept stays as unused space, one freed at the end is cut off.
#[test]
fn dynamic_shrink_gives_back_the_tail() {
    let slot = 64 * 1024 + 512;
    // Blocks allocated in write order: 0, 6 MiB (cut), 1 MiB (kept), 7 MiB (cut).
    let marks = [0, 6 * MIB, MIB, 7 * MIB];
    let base = image(8 * MIB, false, false, &marks);
    // Not forced, over unallocated blocks only: the file keeps its length.
    let (_, same) = resize(base.clone(), 7 * MIB - 4096, false).unwrap();
    assert_eq!(same.len(), base.len());
    assert_clean(same, "shrunk over nothing");
    let (_, shrunk) = resize(base.clone(), 4 * MIB, true).unwrap();
    assert_eq!(shrunk.len(), base.len() - slot);
    let r = vhd::check::check(
        &MemStorage::from_vec("s", shrunk.clone()),
        &Default::default(),
    )
    .unwrap();
    assert_eq!((r.corruptions, r.leaks, r.exit_code()), (0, 0, 0), "{r:?}");
    assert_eq!(r.unused_bytes, slot as u64, "{:?}", r.problems);
    let d = open(shrunk.clone());
    check_marks(&d, &[0, MIB], "shrunk");
    drop(d);
    // Written and grown again: still clean, the cut data gone.
    let st = Arc::new(MemStorage::from_vec("img", shrunk));
    let w = Vhd::open_storage(
        Box::new(st.clone()),
        &OpenOptions {
            writable: true,
            ..Default::default()
        },
    )
    .unwrap();
    w.write_at(b"new", 3 * MIB).unwrap();
    w.close().unwrap();
    let (_, grown) = resize(st.to_vec(), 8 * MIB, false).unwrap();
    assert_clean(grown.clone(), "written and grown");
    let d = open(grown);
    check_marks(&d, &[0, MIB], "grown");
    check_marks_gone(&d, &[6 * MIB, 7 * MIB], "grown");
    let mut b = [0u8; 3];
    d.read_at(&mut b, 3 * MIB).unwrap();
    assert_eq!(&b, b"new");
}
