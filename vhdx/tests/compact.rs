//! `Vhdx::compact`: zero blocks freed and the file packed and cut short
//! with every byte reading the same, `vhdx::check` clean, the image still
//! writable; qemu-img agreeing; differencing disks (PAYLOAD_BLOCK_ZERO over
//! a non-zero parent, freed blocks and sector bitmaps, the parent left
//! alone); a power cut at every write of a compact that frees and moves
//! payload and sector bitmap blocks; refusals; hostile BATs; the corpus.
// Test data: sizes and offsets of small test disks (they fit in memory),
// block sizes and byte patterns.
#![allow(clippy::cast_possible_truncation)]

mod common;
use common::*;
use disk::check::CheckOptions;
use disk::fault::RecordingStorage;
use disk::testing::crash::for_each_crash;
use disk::{CompactReport, Mapping, MemStorage, Storage, VirtualDisk};
use std::path::Path;
use std::process::Command;
use std::sync::Arc;
use vhdx::bat::{BatEntry, PayloadState};
use vhdx::region_table::BAT_REGION;
use vhdx::{parent_locator_for, CreateOptions, ErrorKind, OpenOptions, Vhdx};

const MIB: u64 = 1 << 20;

fn rw() -> OpenOptions {
    OpenOptions {
        writable: true,
        ..Default::default()
    }
}

/// Compact, checking the progress calls: a fixed total, a count that only
/// grows and ends at the total, and bytes copied that only grow and end at
/// the blocks moved (payload blocks, in a disk without sector bitmaps).
fn compact(d: &mut Vhdx) -> CompactReport {
    let mut calls: Vec<disk::Step> = Vec::new();
    let r = d.compact(&mut |s| calls.push(s)).unwrap();
    let total = calls.first().expect("progress was reported").total;
    assert!(
        calls.iter().all(|c| c.total == total),
        "total changed: {calls:?}"
    );
    assert!(
        calls.windows(2).all(|w| w[0].done <= w[1].done),
        "went back"
    );
    assert!(
        calls.windows(2).all(|w| w[0].copied <= w[1].copied),
        "went back"
    );
    assert_eq!(calls.last().unwrap().done, total, "did not finish");
    let copied = calls.last().unwrap().copied;
    let fp = d.info().metadata.file_parameters;
    if !fp.has_parent {
        assert_eq!(copied, r.blocks_moved * u64::from(fp.block_size), "{r:?}");
    }
    assert_eq!(copied == 0, r.blocks_moved == 0, "{r:?}");
    r
}

/// The file offset of BAT entry `idx` of `d`.
fn bat_entry_offset(d: &Vhdx, idx: u64) -> u64 {
    let bat = d
        .info()
        .regions
        .iter()
        .find(|r| r.guid == BAT_REGION)
        .unwrap();
    bat.file_offset + idx * 8
}

/// `assert_same`, with a fast path (it compares byte by byte).
fn same(got: &[u8], want: &[u8], what: &str) {
    if got != want {
        assert_same(got, want, what);
    }
}

fn check_clean(st: &dyn Storage, what: &str) {
    let r = vhdx::check::check(st, &CheckOptions::default()).unwrap();
    assert!(r.is_clean(), "{what}: check found {:#?}", r.problems);
}

/// A dynamic 32 MiB image with 1 MiB blocks, allocated in this order from
/// 4 MiB on: block 3 data, 0 zeros, 7 data, 8 zeros, 20 data, 1 zeros, 31
/// data (the last), 12 data then made ZERO keeping its space (as a trim
/// with LeaveBlocksAllocated leaves it), 5 data: 13 MiB.
fn mixed_image(st: &Arc<MemStorage>) {
    let mut o = CreateOptions::new(32 * MIB);
    o.block_size = MIB as u32;
    let d = Vhdx::create_on(Box::new(st.clone()), &o).unwrap();
    for (block, data) in [
        (3u64, true),
        (0, false),
        (7, true),
        (8, false),
        (20, true),
        (1, false),
        (31, true),
        (12, true),
        (5, true),
    ] {
        let buf = if data {
            pattern(MIB as usize, block)
        } else {
            vec![0u8; 4096]
        };
        d.write_at(&buf, block * MIB + if data { 0 } else { 8192 })
            .unwrap();
    }
    let Mapping::Data(fo) = d.map(12 * MIB, 1).unwrap().mapping else {
        panic!("block 12 is not allocated");
    };
    let at = bat_entry_offset(&d, 12);
    d.close().unwrap();
    let zero_keeping_space = BatEntry::new(PayloadState::Zero as u8, fo.0);
    st.write_at(&zero_keeping_space.0.to_le_bytes(), at)
        .unwrap();
    assert_eq!(st.len().unwrap(), 13 * MIB);
}

#[test]
fn dynamic_frees_zero_blocks_packs_and_stays_writable() {
    let st = Arc::new(MemStorage::new("mixed.vhdx"));
    mixed_image(&st);
    check_clean(&*st, "before");
    let mut d = Vhdx::open_storage(Box::new(st.clone()), &rw()).unwrap();
    let before = read_all(&d);
    let r = compact(&mut d);
    // Blocks 0, 1 and 8 (zeros) and the space kept for block 12; blocks 5
    // (at 12 MiB) and 31 (at 10 MiB) move into the holes at 5 and 7 MiB.
    assert_eq!(
        r,
        CompactReport {
            blocks_freed: 4,
            blocks_moved: 2,
            old_file_size: 13 * MIB,
            new_file_size: 9 * MIB,
        }
    );
    assert_eq!(r.reclaimed(), 4 * MIB);
    assert_eq!(st.len().unwrap(), 9 * MIB);
    same(&read_all(&d), &before, "after compact");
    let stats = d.allocation_stats().unwrap();
    assert_eq!((stats.present_blocks, stats.zero_blocks), (5, 1));
    // Still writable: a new block goes at the new end of the file.
    let p = pattern(70_000, 99);
    d.write_at(&p, 10 * MIB + 4000).unwrap();
    let mut model = before.clone();
    model[10 * MIB as usize + 4000..][..p.len()].copy_from_slice(&p);
    same(&read_all(&d), &model, "written after compact");
    d.close().unwrap();
    assert_eq!(st.len().unwrap(), 10 * MIB);
    check_clean(&*st, "after compact and a write");
    let again = Vhdx::open_storage(
        Box::new(MemStorage::from_vec("again.vhdx", st.to_vec())),
        &OpenOptions::default(),
    )
    .unwrap();
    assert!(!again.info().log_replayed);
    same(&read_all(&again), &model, "reopened");
    // A second compact finds nothing to do and writes nothing.
    let st2 = Arc::new(RecordingStorage::new("again.vhdx", st.to_vec()));
    let mut d2 = Vhdx::open_storage(Box::new(st2.clone()), &rw()).unwrap();
    let r2 = compact(&mut d2);
    assert_eq!(
        (r2.blocks_freed, r2.blocks_moved, r2.reclaimed()),
        (0, 0, 0)
    );
    assert!(st2.ops().iter().all(|op| *op == disk::fault::Op::Flush));
}

#[test]
fn compact_file_then_reopen_by_path() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("m.vhdx");
    let st = Arc::new(MemStorage::new("m"));
    mixed_image(&st);
    std::fs::write(&path, st.to_vec()).unwrap();
    let mut d = Vhdx::open(&path, &rw()).unwrap();
    let before = read_all(&d);
    let r = compact(&mut d);
    assert_eq!(r.new_file_size, 9 * MIB);
    d.close().unwrap();
    assert_eq!(std::fs::metadata(&path).unwrap().len(), 9 * MIB);
    let r = vhdx::check::check_file(&path, &CheckOptions::default()).unwrap();
    assert!(r.is_clean(), "{:#?}", r.problems);
    let d = Vhdx::open(&path, &OpenOptions::default()).unwrap();
    same(&read_all(&d), &before, "reopened by path");
}

#[test]
fn qemu_image_compacts_and_qemu_agrees() {
    if !have_qemu() {
        return;
    }
    let have_qemu_io = Command::new("qemu-io")
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success());
    let tmp = tempfile::tempdir().unwrap();
    let img = tmp.path().join("q.vhdx");
    let raw = tmp.path().join("q.raw");
    run(Command::new("qemu-img")
        .args([
            "create",
            "-f",
            "vhdx",
            "-o",
            "subformat=dynamic,block_size=1M",
        ])
        .arg(&img)
        .arg("64M"));
    // (offset, length, byte): byte 0 writes zeros, which allocate blocks.
    let writes = [
        (0u64, 65536u64, 0u8),
        (MIB, MIB, 0x5a),
        (5 * MIB + 512, 4096, 0),
        (9 * MIB, 3 * MIB, 0),
        (20 * MIB + 4096, 100_000 / 512 * 512, 0xa5),
        (40 * MIB, 2 * MIB, 0),
        (63 * MIB, MIB, 0x3c),
    ];
    if have_qemu_io {
        for (off, len, byte) in writes {
            run(Command::new("qemu-io")
                .args(["-f", "vhdx", "-c"])
                .arg(format!("write -P {byte} {off} {len}"))
                .arg(&img));
        }
    } else {
        eprintln!("SKIP part: qemu-io absent, writing with this library");
        let d = Vhdx::open(&img, &rw()).unwrap();
        for (off, len, byte) in writes {
            d.write_at(&vec![byte; len as usize], off).unwrap();
        }
        d.close().unwrap();
    }
    run(Command::new("qemu-img")
        .args(["convert", "-f", "vhdx", "-O", "raw"])
        .arg(&img)
        .arg(&raw));
    let before_len = std::fs::metadata(&img).unwrap().len();
    let mut d = Vhdx::open(&img, &rw()).unwrap();
    // QEMU puts the log, BAT and metadata region in [1 MiB, 4 MiB) but its
    // first block at 8 MiB: compacting also packs blocks into that gap.
    let h = d.current_header();
    let fixed_end = d
        .info()
        .regions
        .iter()
        .map(|r| r.file_offset + u64::from(r.length))
        .chain([h.log_offset + u64::from(h.log_length)])
        .max()
        .unwrap();
    let r = compact(&mut d);
    d.close().unwrap();
    let after_len = std::fs::metadata(&img).unwrap().len();
    assert_eq!(r.old_file_size, before_len);
    assert_eq!(r.new_file_size, after_len);
    // Zero blocks: 0, 5, 9, 10, 11, 40, 41.
    assert_eq!(r.blocks_freed, 7, "{r:?}");
    // Data blocks: 1, 20, 63.
    assert_eq!(after_len, fixed_end + 3 * MIB, "{r:?}");
    assert!(after_len <= before_len - 7 * MIB, "{r:?}");
    run(Command::new("qemu-img")
        .args(["check", "-f", "vhdx"])
        .arg(&img));
    if let Err(e) = qemu_compare(&raw, "raw", &img, "vhdx") {
        panic!("qemu-img compare after compact: {e}");
    }
    let c = vhdx::check::check_file(&img, &CheckOptions::default()).unwrap();
    assert!(c.is_clean(), "{:#?}", c.problems);
}

// ---- Differencing disks. ----

fn diff_pair(dir: &Path, size: u64) -> (std::path::PathBuf, std::path::PathBuf, Vec<u8>) {
    let base = dir.join("base.vhdx");
    let child = dir.join("child.avhdx");
    let mut o = CreateOptions::new(size);
    o.block_size = MIB as u32;
    let d = Vhdx::create(&base, &o, false).unwrap();
    let pmodel = fill_parent(&d, 7);
    d.close().unwrap();
    let mut co = CreateOptions::new(0);
    co.block_size = MIB as u32;
    Vhdx::create_differencing_file(&child, &base, &co, false).unwrap();
    (base, child, pmodel)
}

#[test]
fn differencing_zero_state_freed_blocks_and_partial_blocks() {
    let dir = tempfile::tempdir().unwrap();
    // The parent reads non-zero in [0, 6 MiB), 70 000 bytes from 8 MiB +
    // 1000 and [15.2 MiB, 16 MiB).
    let (base, child, pmodel) = diff_pair(dir.path(), 16 * MIB);
    let parent_hash = file_hash(&base);
    let d = Vhdx::open(&child, &rw()).unwrap();
    let zeros = vec![0u8; MIB as usize];
    d.write_at(&zeros, 0).unwrap(); // over data: becomes ZERO
    d.write_at(&zeros, 10 * MIB).unwrap(); // over zeros: freed
    d.write_at(&zeros[..4096], 11 * MIB + 8192).unwrap(); // partial over zeros: freed
    d.write_at(&zeros[..4096], 2 * MIB + 512).unwrap(); // partial over data: kept
    d.write_at(&pattern(3000, 1), 12 * MIB + 100).unwrap(); // partial data: kept
    d.write_at(&pattern(MIB as usize, 2), 13 * MIB).unwrap(); // full data: kept
                                                              // The parent's own bytes, whole block and partial: freed.
    d.write_at(&pmodel[5 * MIB as usize..6 * MIB as usize], 5 * MIB)
        .unwrap();
    let at = 8 * MIB as usize + 1000;
    d.write_at(&pmodel[at..at + 5000], at as u64).unwrap();
    d.close().unwrap();
    let mut d = Vhdx::open(&child, &rw()).unwrap();
    let before = read_all(&d);
    assert_ne!(&before[..MIB as usize], &pmodel[..MIB as usize]);
    let old_len = std::fs::metadata(&child).unwrap().len();
    let r = compact(&mut d);
    assert_eq!(r.blocks_freed, 5, "{r:?}");
    assert_eq!(r.new_file_size, old_len - 5 * MIB, "{r:?}");
    same(&read_all(&d), &before, "after compact");
    assert_eq!(d.map(0, 512).unwrap().mapping, Mapping::Zero);
    assert_eq!(d.map(10 * MIB, 512).unwrap().mapping, Mapping::Parent);
    assert_eq!(d.map(5 * MIB, 512).unwrap().mapping, Mapping::Parent);
    assert_eq!(d.map(8 * MIB + 1024, 512).unwrap().mapping, Mapping::Parent);
    assert_eq!(
        d.map(11 * MIB + 8192, 512).unwrap().mapping,
        Mapping::Parent
    );
    assert!(matches!(
        d.map(2 * MIB + 512, 512).unwrap().mapping,
        Mapping::Data(_)
    ));
    let s = d.allocation_stats().unwrap();
    assert_eq!((s.present_blocks, s.zero_blocks), (3, 1));
    d.close().unwrap();
    assert_eq!(file_hash(&base), parent_hash, "the parent changed");
    let c = vhdx::check::check_file(&child, &CheckOptions::default()).unwrap();
    assert!(c.is_clean(), "{:#?}", c.problems);
    // The ZERO block reads zeros after a reopen, not the parent's bytes.
    let d = Vhdx::open(&child, &OpenOptions::default()).unwrap();
    same(&read_all(&d), &before, "reopened");
    let mut b = vec![1u8; 4096];
    d.read_at(&mut b, 4096).unwrap();
    assert!(b.iter().all(|&x| x == 0));
    assert!(pmodel[4096..8192].iter().any(|&x| x != 0));
}

#[test]
fn differencing_of_zeros_over_zeros_compacts_to_an_empty_child() {
    let dir = tempfile::tempdir().unwrap();
    let (base, child, _) = diff_pair(dir.path(), 16 * MIB);
    let empty_len = std::fs::metadata(&child).unwrap().len();
    let parent_hash = file_hash(&base);
    let d = Vhdx::open(&child, &rw()).unwrap();
    d.write_at(&[0u8; 5000], 10 * MIB + 3).unwrap();
    d.write_at(&vec![0u8; MIB as usize], 11 * MIB).unwrap();
    d.close().unwrap();
    // One sector bitmap block and two payload blocks.
    assert_eq!(
        std::fs::metadata(&child).unwrap().len(),
        empty_len + 3 * MIB
    );
    let mut d = Vhdx::open(&child, &rw()).unwrap();
    let before = read_all(&d);
    let r = compact(&mut d);
    assert_eq!((r.blocks_freed, r.blocks_moved), (3, 0), "{r:?}");
    assert_eq!(r.new_file_size, empty_len);
    same(&read_all(&d), &before, "after compact");
    // Writable: a new partial block gets a new sector bitmap block.
    d.write_at(b"again", 10 * MIB + 7).unwrap();
    d.close().unwrap();
    let d = Vhdx::open(&child, &OpenOptions::default()).unwrap();
    let mut b = [0u8; 5];
    d.read_at(&mut b, 10 * MIB + 7).unwrap();
    assert_eq!(&b, b"again");
    assert_eq!(file_hash(&base), parent_hash, "the parent changed");
    let c = vhdx::check::check_file(&child, &CheckOptions::default()).unwrap();
    assert!(c.is_clean(), "{:#?}", c.problems);
}

// ---- Crash safety. ----

fn open_mem(bytes: Vec<u8>, opts: &OpenOptions) -> Vhdx {
    Vhdx::open_storage(Box::new(MemStorage::from_vec("img", bytes)), opts).unwrap()
}

/// Compact on a recording storage, then check every crash image: it opens
/// (read-only and writable) reading `want`, and compacting it again ends
/// in a `final_len` file still reading `want`.
fn crash_compact(
    image: Vec<u8>,
    open: &dyn Fn(Box<dyn Storage>, &OpenOptions) -> Vhdx,
    expect: (u64, u64),
) {
    let want = read_all(&open(
        Box::new(MemStorage::from_vec("orig", image.clone())),
        &OpenOptions::default(),
    ));
    let rec = Arc::new(RecordingStorage::new("rec", image));
    let final_len;
    {
        let mut d = open(Box::new(rec.clone()), &rw());
        let r = compact(&mut d);
        assert_eq!((r.blocks_freed, r.blocks_moved), expect, "{r:?}");
        same(&read_all(&d), &want, "after compact");
        final_len = r.new_file_size;
        std::mem::forget(d); // a crash: no clean close
    }
    assert!(rec.op_count() > 0);
    // One buffer for all the reads (allocating 8 MiB per read dominates).
    let mut buf = vec![0u8; want.len()];
    let mut reads_want = |d: &Vhdx, what: &str| {
        d.read_at(&mut buf, 0).unwrap();
        same(&buf, &want, what);
    };
    for_each_crash(&rec, 11, |img, cut, strategy| {
        let what = format!("{strategy} cut {cut}");
        let ro = open(
            Box::new(MemStorage::from_vec("crash-ro", img.clone())),
            &OpenOptions::default(),
        );
        reads_want(&ro, &what);
        drop(ro);
        let st = Arc::new(MemStorage::from_vec("crash-rw", img));
        let mut d = open(Box::new(st.clone()), &rw());
        reads_want(&d, &format!("{what} writable"));
        d.compact(&mut |_| {})
            .unwrap_or_else(|e| panic!("{what}: compact again failed: {e}"));
        reads_want(&d, &format!("{what} compacted again"));
        d.close().unwrap();
        assert_eq!(st.len().unwrap(), final_len, "{what}");
        let again = open(
            Box::new(MemStorage::from_vec("again", st.to_vec())),
            &OpenOptions::default(),
        );
        reads_want(&again, &format!("{what} reopened"));
    });
}

#[test]
fn dynamic_crash_at_every_write() {
    // Allocated from 4 MiB on: block 0 zeros, 1 data, 2 zeros, 5 data, 7
    // data. Compact frees 0 and 2, moves 7 to 4 MiB and 5 to 6 MiB.
    let st = Arc::new(MemStorage::new("base"));
    let mut o = CreateOptions::new(8 * MIB);
    o.block_size = MIB as u32;
    let d = Vhdx::create_on(Box::new(st.clone()), &o).unwrap();
    d.write_at(&[0u8; 512], 0).unwrap();
    d.write_at(&pattern(5000, 1), MIB + 3).unwrap();
    d.write_at(&[0u8; 512], 2 * MIB).unwrap();
    d.write_at(&pattern(5000, 2), 5 * MIB).unwrap();
    d.write_at(&pattern(5000, 3), 8 * MIB - 5000).unwrap();
    d.close().unwrap();
    let open = |s: Box<dyn Storage>, o: &OpenOptions| Vhdx::open_storage(s, o).unwrap();
    crash_compact(st.to_vec(), &open, (2, 2));
}

#[test]
fn differencing_crash_at_every_write_moves_a_sector_bitmap() {
    // The parent (8 MiB) reads non-zero in [0, 3 MiB), 70 000 bytes from
    // 4 MiB + 1000, and [7.6 MiB, 8 MiB).
    let pst = Arc::new(MemStorage::new("parent.vhdx"));
    let mut o = CreateOptions::new(8 * MIB);
    o.block_size = MIB as u32;
    let p = Vhdx::create_on(Box::new(pst.clone()), &o).unwrap();
    fill_parent(&p, 3);
    p.close().unwrap();
    let pbytes = pst.to_vec();
    // One read-only parent shared by every child opened.
    let parent: Arc<dyn VirtualDisk> = Arc::new(open_mem(pbytes.clone(), &OpenOptions::default()));
    let p = open_mem(pbytes.clone(), &OpenOptions::default());
    let loc = parent_locator_for(
        Path::new("/nonexistent/child.avhdx"),
        Path::new("/"),
        p.info().header.data_write_guid,
    )
    .unwrap();
    let cst = Arc::new(MemStorage::new("child.avhdx"));
    let mut co = CreateOptions::new(0);
    co.block_size = MIB as u32;
    let c = Vhdx::create_differencing_on(Box::new(cst.clone()), &co, loc, Arc::new(p)).unwrap();
    // Blocks 0, 1, 2: zeros over data, FULLY_PRESENT without a sector
    // bitmap (a write to an UNMAPPED block allocates it whole), at 4, 5 and
    // 6 MiB. Then the sector bitmap at 7 MiB, block 3 (partial data) at 8,
    // block 4 (partial zeros over data) at 9, block 6 (partial zeros over
    // zeros) at 10.
    for b in 0..3 {
        c.discard(b * MIB, MIB).unwrap();
        c.write_at(&vec![0u8; MIB as usize], b * MIB).unwrap();
    }
    c.write_at(&pattern(3000, 9), 3 * MIB + 100).unwrap();
    c.write_at(&[0u8; 2048], 4 * MIB + 1024).unwrap();
    c.write_at(&[0u8; 2048], 6 * MIB + 1024).unwrap();
    c.close().unwrap();
    assert_eq!(cst.len().unwrap(), 11 * MIB);
    let open = move |s: Box<dyn Storage>, o: &OpenOptions| {
        Vhdx::open_storage_with_parent(s, o, parent.clone()).unwrap()
    };
    // Freed: blocks 0, 1, 2 (now ZERO) and 6. Moved: block 4 to 4 MiB,
    // block 3 to 5 MiB, the sector bitmap to 6 MiB.
    let img = cst.to_vec();
    {
        let mut d = open(Box::new(MemStorage::from_vec("probe", img.clone())), &rw());
        let r = compact(&mut d);
        assert_eq!(r.new_file_size, 7 * MIB);
        assert_eq!(d.map(0, 512).unwrap().mapping, Mapping::Zero);
        assert_eq!(d.map(6 * MIB, 512).unwrap().mapping, Mapping::Parent);
    }
    crash_compact(img, &open, (4, 3));
}

// ---- Refusals and hostile input. ----

fn small_image(fixed: bool) -> Arc<MemStorage> {
    let st = Arc::new(MemStorage::new("small.vhdx"));
    let mut o = CreateOptions::new(8 * MIB);
    o.block_size = MIB as u32;
    o.fixed = fixed;
    let d = Vhdx::create_on(Box::new(st.clone()), &o).unwrap();
    d.write_at(b"data", 3 * MIB).unwrap();
    d.write_at(&[0u8; 512], 5 * MIB).unwrap();
    d.close().unwrap();
    st
}

#[test]
fn read_only_and_fixed_are_refused() {
    let st = small_image(false);
    let mut ro = open_mem(st.to_vec(), &OpenOptions::default());
    let e = ro.compact(&mut |_| {}).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::InvalidInput);
    let msg = e.to_string();
    assert!(msg.contains("img") && msg.contains("read-only"), "{msg}");

    let st = small_image(true);
    let bytes = st.to_vec();
    let f = Arc::new(MemStorage::from_vec("fixed.vhdx", bytes.clone()));
    let mut d = Vhdx::open_storage(Box::new(f.clone()), &rw()).unwrap();
    let e = d.compact(&mut |_| {}).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::InvalidInput);
    let msg = e.to_string();
    assert!(
        msg.contains("fixed.vhdx") && msg.contains("fixed") && msg.contains("dynamic"),
        "{msg}"
    );
    drop(d);
    assert!(f.to_vec() == bytes, "a refused compact wrote");
}

#[test]
fn hostile_bat_is_corrupt_and_nothing_is_written() {
    let st = small_image(false);
    let d = open_mem(st.to_vec(), &OpenOptions::default());
    let (e3, e5) = (bat_entry_offset(&d, 3), bat_entry_offset(&d, 5));
    let file_len = st.len().unwrap();
    drop(d);
    let present = |fo: u64| BatEntry::new(PayloadState::FullyPresent as u8, fo).0;
    for (what, at, entry) in [
        ("past the end", e5, present(file_len)),
        ("overlapping", e5, {
            let mut b = [0u8; 8];
            st.read_at(&mut b, e3).unwrap();
            u64::from_le_bytes(b)
        }),
        ("over the BAT", e5, present(3 * MIB)),
        ("beyond 2^64", e5, present(!(MIB - 1))),
    ] {
        let mut bytes = st.to_vec();
        bytes[at as usize..at as usize + 8].copy_from_slice(&entry.to_le_bytes());
        let rec = Arc::new(RecordingStorage::new("hostile.vhdx", bytes.clone()));
        // A block past the end of the file (a truncated image), or on
        // another block or the BAT, is refused by the writable open
        // already (the compact would refuse it too).
        let e = match Vhdx::open_storage(Box::new(rec.clone()), &rw()) {
            Ok(mut d) => d.compact(&mut |_| {}).unwrap_err(),
            Err(e) => e,
        };
        if what.contains("overlapping") || what.contains("BAT") {
            assert!(e.to_string().contains("overlaps"), "{what}: {e}");
        }
        assert_eq!(e.kind(), ErrorKind::Corrupt, "{what}: {e}");
        assert!(e.to_string().contains("hostile.vhdx"), "{what}: {e}");
        assert!(rec.contents() == bytes, "{what}: the file changed");
    }
}

/// A digest of what a disk reads: the non-zero 4 KiB pieces and where.
fn digest(d: &dyn VirtualDisk) -> u64 {
    use std::hash::{Hash, Hasher};
    let mut h = std::collections::hash_map::DefaultHasher::new();
    let size = d.virtual_size();
    let mut pos = 0;
    let mut buf = vec![0u8; MIB as usize];
    while pos < size {
        let ext = d.map(pos, size - pos).unwrap();
        let len = ext.len.min(size - pos);
        if !matches!(ext.mapping, Mapping::Zero | Mapping::Unallocated) {
            let mut p = pos;
            while p < pos + len {
                let n = (pos + len - p).min(MIB) as usize;
                d.read_at(&mut buf[..n], p).unwrap();
                for (i, piece) in buf[..n].chunks(4096).enumerate() {
                    if piece.iter().any(|&b| b != 0) {
                        (p + i as u64 * 4096).hash(&mut h);
                        piece.hash(&mut h);
                    }
                }
                p += n as u64;
            }
        }
        pos += len;
    }
    h.finish()
}

#[test]
fn corpus_images_compact_and_read_the_same() {
    let Some(images) = corpus_images("vhdx") else {
        return;
    };
    let tmp = tempfile::tempdir().unwrap();
    for src in images {
        let path = decompress(&src, tmp.path());
        let name = path.display().to_string();
        let Ok(mut d) = Vhdx::open(&path, &rw()) else {
            eprintln!("SKIP {name}: does not open writable");
            continue;
        };
        let before = digest(&d);
        let fixed = d.info().subformat() == "fixed";
        match d.compact(&mut |_| {}) {
            Err(e) if fixed => assert_eq!(e.kind(), ErrorKind::InvalidInput, "{name}: {e}"),
            Err(e) => panic!("{name}: {e}"),
            Ok(r) => {
                assert!(!fixed, "{name}: a fixed disk was compacted");
                eprintln!("{name}: {r:?}");
                assert_eq!(digest(&d), before, "{name}: reads changed");
                d.close().unwrap();
                let d = Vhdx::open(&path, &OpenOptions::default()).unwrap();
                assert_eq!(digest(&d), before, "{name}: reads changed after reopen");
                let c = vhdx::check::check_file(&path, &CheckOptions::default()).unwrap();
                assert_eq!(c.corruptions, 0, "{name}: {:#?}", c.problems);
            }
        }
        std::fs::remove_file(&path).unwrap();
    }
}
