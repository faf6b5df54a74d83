//! `Vhdx::resize`: grow (in place and relocating the blocks after the BAT),
//! shrink (refused over data, forced), fixed and differencing disks, and a
//! power cut at every write of a grow: every crash image opens, reads the
//! data written before the resize, and has the old size or the new one.
//! Every finished resize leaves a file `vhdx::check` finds clean (a shrink
//! gives back the tail it frees: no leak), and every crash image is clean
//! after `check -r all`.
// Test data: sizes and offsets of small test disks (they fit in memory),
// block sizes and byte patterns.
#![allow(clippy::cast_possible_truncation)]

use disk::check::{ProblemKind, RepairMode};
use disk::fault::RecordingStorage;
use disk::testing::crash::for_each_crash;
use disk::testing::{check_marks, check_marks_gone, mark};
use disk::{MemStorage, VirtualDisk};
use std::sync::Arc;
use vhdx::{CreateOptions, OpenOptions, Vhdx};

mod common;

const MIB: u64 = 1 << 20;
const GIB: u64 = 1 << 30;

fn rw() -> OpenOptions {
    OpenOptions {
        writable: true,
        ..Default::default()
    }
}

/// A closed image of `size` bytes with 1 MiB blocks and `marks` written.
fn image(size: u64, fixed: bool, marks: &[u64]) -> Vec<u8> {
    let st = Arc::new(MemStorage::new("base"));
    let mut o = CreateOptions::new(size);
    o.block_size = MIB as u32;
    o.fixed = fixed;
    let d = Vhdx::create_on(Box::new(st.clone()), &o).unwrap();
    for &m in marks {
        d.write_at(&mark(m), m).unwrap();
    }
    d.close().unwrap();
    st.to_vec()
}

fn open_mem(bytes: Vec<u8>, opts: &OpenOptions) -> Vhdx {
    Vhdx::open_storage(Box::new(MemStorage::from_vec("img", bytes)), opts).unwrap()
}

/// The check report of the VHDX `bytes`.
fn check(bytes: Vec<u8>) -> disk::check::CheckReport {
    vhdx::check::check(&MemStorage::from_vec("img", bytes), &Default::default()).unwrap()
}

/// `bytes` is a VHDX that `vhdx::check` finds clean: no corruption, no
/// leak (exit status 0).
fn assert_clean(bytes: Vec<u8>, what: &str) {
    let r = check(bytes);
    assert_eq!(
        (r.corruptions, r.leaks, r.exit_code()),
        (0, 0, 0),
        "{what}: {:?}",
        r.problems
    );
}

/// A crash image, after opening it writable and closing it (`bytes`):
/// whatever a check finds is repairable, and after `check -r all` nothing
/// is left. (A crash while a grow rewrites the two region table copies,
/// which the log does not cover, can leave them different: opening uses
/// the valid one, the check reports the difference for `-r all`.)
fn assert_repairable(bytes: Vec<u8>, what: &str) {
    let st = MemStorage::from_vec("img", bytes);
    let r = vhdx::check::check(&st, &Default::default()).unwrap();
    for p in r
        .problems
        .iter()
        .filter(|p| p.kind == ProblemKind::Corruption)
    {
        assert_eq!(p.repair, Some(RepairMode::All), "{what}: {p:?}");
    }
    vhdx::check::repair(&st, RepairMode::All, &Default::default()).unwrap();
    assert_clean(st.to_vec(), &format!("{what}, repaired"));
}

/// `bytes`, opened writable and closed (which replays a log left by a
/// crash or an unclosed image).
fn closed(bytes: Vec<u8>) -> Vec<u8> {
    let st = Arc::new(MemStorage::from_vec("img", bytes));
    Vhdx::open_storage(Box::new(st.clone()), &rw())
        .unwrap()
        .close()
        .unwrap();
    st.to_vec()
}

/// Resize on a recording storage, then check every crash image.
fn crash_resize(size: u64, new_size: u64, fixed: bool, marks: &[u64], moves_block0: bool) {
    crash_resize_from(
        image(size, fixed, marks),
        size,
        new_size,
        marks,
        moves_block0,
    );
}

/// [`crash_resize`] of the image `base` (of `size` bytes).
fn crash_resize_from(base: Vec<u8>, size: u64, new_size: u64, marks: &[u64], moves_block0: bool) {
    let before = open_mem(base.clone(), &OpenOptions::default())
        .map(0, 512)
        .unwrap()
        .mapping;
    let rec = Arc::new(RecordingStorage::new("rec", base));
    {
        let mut d = Vhdx::open_storage(Box::new(rec.clone()), &rw()).unwrap();
        d.resize(new_size, false).unwrap();
        assert_eq!(d.virtual_size(), new_size);
        let after = d.map(0, 512).unwrap().mapping;
        assert_eq!(
            after != before,
            moves_block0,
            "block 0 moved: {before:?} -> {after:?}"
        );
        check_marks(&d, marks, "after resize");
        std::mem::forget(d); // a crash: no clean close
    }
    assert!(rec.op_count() > 0);
    // The finished resize, closed, is clean.
    assert_clean(closed(rec.contents()), "resized and closed");
    for_each_crash(&rec, 7, |img, cut, strategy| {
        let what = format!("{strategy} cut {cut}");
        let ro = Vhdx::open_storage(
            Box::new(MemStorage::from_vec("crash-ro", img.clone())),
            &OpenOptions::default(),
        )
        .unwrap_or_else(|e| panic!("{what}: read-only open failed: {e}"));
        let s = ro.virtual_size();
        assert!(s == size || s == new_size, "{what}: size {s}");
        check_marks(&ro, marks, &what);
        drop(ro);
        let st = Arc::new(MemStorage::from_vec("crash-rw", img));
        let d = Vhdx::open_storage(Box::new(st.clone()), &rw())
            .unwrap_or_else(|e| panic!("{what}: writable open failed: {e}"));
        check_marks(&d, marks, &what);
        // The disk stays usable: a write at its end reads back.
        let end = d.virtual_size() - 512;
        d.write_at(b"tail", end).unwrap();
        d.close().unwrap();
        assert_repairable(st.to_vec(), &what);
        let again = open_mem(st.to_vec(), &OpenOptions::default());
        check_marks(&again, marks, &what);
        let mut t = [0u8; 4];
        again.read_at(&mut t, end).unwrap();
        assert_eq!(&t, b"tail", "{what}");
    });
}

#[test]
fn grow_in_place_crash_at_every_write() {
    crash_resize(
        64 * MIB,
        3 * GIB + 512,
        false,
        &[0, 5 * MIB, 64 * MIB - 100],
        false,
    );
}

#[test]
fn grow_relocating_blocks_after_the_bat_crash_at_every_write() {
    // 1 MiB blocks: past 128 GiB the BAT needs more than its 1 MiB region,
    // and blocks 0 and 1 sit right after it.
    crash_resize(8 * MIB, 130 * GIB, false, &[0, MIB + 7, 7 * MIB], true);
}

/// `bytes` (an image from [`image`], whose log, metadata and BAT regions
/// are 1 MiB each at 1, 2 and 3 MiB) with those three at `log`, `meta` and
/// `bat` instead (a permutation of 1, 2 and 3 MiB): the headers and both
/// region table copies are rewritten to match. Payload blocks (at 4 MiB
/// and beyond) do not move.
fn relayout(bytes: &[u8], log: u64, meta: u64, bat: u64) -> Vec<u8> {
    use vhdx::header::Header;
    use vhdx::region_table::{RegionTable, BAT_REGION, METADATA_REGION};
    let mut out = bytes.to_vec();
    let at = |o: u64| o as usize..(o + MIB) as usize;
    let rt_at = RegionTable::OFFSETS[0] as usize;
    let mut table = RegionTable::parse(&bytes[rt_at..rt_at + RegionTable::SIZE]).unwrap();
    for e in &mut table.entries {
        let to = if e.guid == BAT_REGION {
            bat
        } else if e.guid == METADATA_REGION {
            meta
        } else {
            continue;
        };
        assert_eq!(u64::from(e.length), MIB, "a 1 MiB region");
        out[at(to)].copy_from_slice(&bytes[at(e.file_offset)]);
        e.file_offset = to;
    }
    let t = table.to_bytes();
    for off in RegionTable::OFFSETS {
        out[off as usize..off as usize + t.len()].copy_from_slice(&t);
    }
    for off in Header::OFFSETS {
        let r = off as usize..off as usize + Header::SIZE;
        let mut h = Header::parse(&bytes[r.clone()]).unwrap();
        assert_eq!((h.log_offset, u64::from(h.log_length)), (MIB, MIB));
        out[at(log)].copy_from_slice(&bytes[at(MIB)]);
        h.log_offset = log;
        h.write_to(&mut out[r]);
    }
    out
}

/// The BAT region must grow past 128 GiB (1 MiB blocks), but what follows
/// it cannot move (the metadata region, or the log): the BAT moves to the
/// end of the file, crash-safe at every write; the grown image passes our
/// check (the old BAT's space is listed as unused) and qemu-img's, and
/// reads the same through qemu.
#[test]
fn grow_moves_the_bat_when_a_region_or_the_log_follows_it() {
    let marks = [0, MIB + 7, 7 * MIB];
    // (log, metadata, BAT): the metadata region after the BAT, then the log.
    for (log, meta, bat) in [(MIB, 3 * MIB, 2 * MIB), (2 * MIB, 3 * MIB, MIB)] {
        let base = relayout(&image(8 * MIB, false, &marks), log, meta, bat);
        let d = open_mem(base.clone(), &OpenOptions::default());
        check_marks(&d, &marks, "relaid out");
        drop(d);
        crash_resize_from(base.clone(), 8 * MIB, 130 * GIB, &marks, false);

        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("moved.vhdx");
        std::fs::write(&path, &base).unwrap();
        let mut d = Vhdx::open(&path, &rw()).unwrap();
        d.resize(130 * GIB, false).unwrap();
        d.write_at(b"far", 129 * GIB).unwrap();
        d.close().unwrap();
        let report = vhdx::check::check_file(&path, &Default::default()).unwrap();
        assert_eq!(report.corruptions, 0, "{:?}", report.problems);
        // The old BAT's 1 MiB is unused space (no leak) until a compaction.
        assert_eq!(report.leaks, 0, "{:?}", report.problems);
        assert_eq!(report.unused_bytes, MIB, "{:?}", report.problems);
        assert_eq!(report.exit_code(), 0);
        let again = Vhdx::open(&path, &OpenOptions::default()).unwrap();
        assert_eq!(again.virtual_size(), 130 * GIB);
        check_marks(&again, &marks, "moved BAT, reopened");
        let mut far = [0u8; 3];
        again.read_at(&mut far, 129 * GIB).unwrap();
        assert_eq!(&far, b"far");
        drop(again);
        if common::have_qemu() {
            let out = std::process::Command::new("qemu-img")
                .args(["check", "-f", "vhdx"])
                .arg(&path)
                .output()
                .unwrap();
            assert!(
                out.status.success(),
                "qemu-img check: {}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
            let out = std::process::Command::new("qemu-io")
                .args(["-f", "vhdx", "-r", "-c"])
                .arg(format!("read -P 0x66 {} 1", 129 * GIB))
                .arg(&path)
                .output();
            if let Ok(out) = out {
                let text = String::from_utf8_lossy(&out.stdout);
                assert!(!text.contains("Pattern verification failed"), "{text}");
            }
        }
    }
}

#[test]
fn grow_fixed_crash_at_every_write() {
    crash_resize(4 * MIB, 8 * MIB, true, &[0, 3 * MIB + 1], false);
}

#[test]
fn grow_fixed_relocating() {
    // A sparse file: the grown fixed disk is 129 GiB.
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("f.vhdx");
    let marks = [0, MIB, 5 * MIB];
    std::fs::write(&path, image(8 * MIB, true, &marks)).unwrap();
    let mut d = Vhdx::open(&path, &rw()).unwrap();
    d.resize(129 * GIB, false).unwrap();
    check_marks(&d, &marks, "fixed grown");
    let stats = d.allocation_stats().unwrap();
    assert_eq!(stats.present_blocks, 129 * 1024);
    d.close().unwrap();
    let again = Vhdx::open(&path, &OpenOptions::default()).unwrap();
    assert_eq!(again.virtual_size(), 129 * GIB);
    check_marks(&again, &marks, "fixed reopened");
}

#[test]
fn grow_zeroes_the_old_tail_and_shrink_rules() {
    let marks = [0, 10 * MIB];
    let st = Arc::new(MemStorage::from_vec("d", image(64 * MIB, false, &marks)));
    let mut d = Vhdx::open_storage(Box::new(st.clone()), &rw()).unwrap();
    d.write_at(b"cut", 40 * MIB).unwrap();
    // Shrinking over the allocated block at 40 MiB is refused, naming it.
    let e = d.resize(32 * MIB + 512, false).unwrap_err();
    let msg = e.to_string();
    assert!(msg.contains("d:") && msg.contains("block 40"), "{msg}");
    assert_eq!(d.virtual_size(), 64 * MIB);
    // Shrinking within the blocks written: the bytes past the end of the
    // partial last block must not come back when growing again.
    d.write_at(&[0xaa; 1024], 20 * MIB).unwrap();
    d.resize(32 * MIB + 512, true).unwrap();
    assert_eq!(d.virtual_size(), 32 * MIB + 512);
    d.resize(20 * MIB + 512, false).unwrap();
    d.resize(64 * MIB, false).unwrap();
    let mut b = vec![0u8; 1024];
    d.read_at(&mut b, 20 * MIB).unwrap();
    assert!(b[..512].iter().all(|&x| x == 0xaa));
    assert!(b[512..].iter().all(|&x| x == 0), "stale bytes came back");
    d.read_at(&mut b[..3], 40 * MIB).unwrap();
    assert_eq!(&b[..3], &[0, 0, 0], "forced shrink discarded the block");
    check_marks(&d, &marks, "after shrink and grow");
    d.close().unwrap();
    let again = open_mem(st.to_vec(), &OpenOptions::default());
    assert_eq!(again.virtual_size(), 64 * MIB);
    check_marks(&again, &marks, "reopened");
}

#[test]
fn invalid_sizes_and_read_only() {
    let st = Arc::new(MemStorage::from_vec("d", image(64 * MIB, false, &[])));
    let mut d = Vhdx::open_storage(Box::new(st.clone()), &rw()).unwrap();
    assert!(d.resize(64 * MIB + 100, false).is_err());
    assert!(d.resize(0, false).is_err());
    assert!(d.resize((64 << 40) + 512, false).is_err());
    d.close().unwrap();
    let mut ro = open_mem(st.to_vec(), &OpenOptions::default());
    assert!(ro.resize(128 * MIB, false).is_err());
}

#[test]
fn fixed_shrink_needs_force_only_over_data() {
    let st = Arc::new(MemStorage::from_vec("f", image(16 * MIB, true, &[0])));
    let len0 = st.to_vec().len() as u64;
    let mut d = Vhdx::open_storage(Box::new(st.clone()), &rw()).unwrap();
    d.resize(8 * MIB, false).unwrap(); // the cut blocks are all zeros
                                       // The file gives back the blocks cut (1 MiB each, in order at the end).
    assert_eq!(st.to_vec().len() as u64, len0 - 8 * MIB);
    d.write_at(b"x", 7 * MIB).unwrap();
    assert!(d.resize(4 * MIB, false).is_err());
    d.resize(4 * MIB, true).unwrap();
    d.close().unwrap();
    assert_eq!(st.to_vec().len() as u64, len0 - 12 * MIB);
    assert_clean(st.to_vec(), "fixed shrunk");
    let again = open_mem(st.to_vec(), &OpenOptions::default());
    assert_eq!(again.virtual_size(), 4 * MIB);
    check_marks(&again, &[0], "fixed shrunk");
}

#[test]
fn differencing_refused() {
    let dir = tempfile::tempdir().unwrap();
    let base = dir.path().join("base.vhdx");
    let child = dir.path().join("child.avhdx");
    Vhdx::create(&base, &CreateOptions::new(64 * MIB), false)
        .unwrap()
        .close()
        .unwrap();
    let o = CreateOptions::new(64 * MIB);
    Vhdx::create_differencing_file(&child, &base, &o, false).unwrap();
    let mut d = Vhdx::open(&child, &rw()).unwrap();
    let e = d.resize(128 * MIB, false).unwrap_err().to_string();
    assert!(
        e.contains("differencing") && e.contains("child.avhdx"),
        "{e}"
    );
}

/// A forced shrink over data, cut at every write: each crash image has the
/// old size with all its data, or the new size with the data before the
/// cut; reopened writable and grown back, the cut part reads as zeros
/// (bytes cut by a shrink never reappear).
#[test]
fn forced_shrink_crash_at_every_write() {
    let (size, new_size) = (64 * MIB, 16 * MIB);
    let kept = [0, 5 * MIB, 16 * MIB - 100];
    let cut = [20 * MIB, 63 * MIB];
    let all: Vec<u64> = kept.iter().chain(&cut).copied().collect();
    let rec = Arc::new(RecordingStorage::new("rec", image(size, false, &all)));
    {
        let mut d = Vhdx::open_storage(Box::new(rec.clone()), &rw()).unwrap();
        assert!(
            d.resize(new_size, false).is_err(),
            "shrink over data without force"
        );
        d.resize(new_size, true).unwrap();
        check_marks(&d, &kept, "after resize");
        std::mem::forget(d);
    }
    // The shrink itself (no close) leaves a clean, shorter file: it ended
    // the log session before cutting the tail of freed blocks.
    let len_before = image(size, false, &all).len();
    let done = rec.contents();
    assert!(done.len() < len_before, "{} >= {len_before}", done.len());
    assert_clean(done, "forced shrink, not closed");
    let mut sizes = std::collections::BTreeSet::new();
    for_each_crash(&rec, 7, |img, at, strategy| {
        let what = format!("{strategy} cut {at}");
        let st = Arc::new(MemStorage::from_vec("crash", img));
        let mut d = Vhdx::open_storage(Box::new(st.clone()), &rw())
            .unwrap_or_else(|e| panic!("{what}: writable open failed: {e}"));
        let s = d.virtual_size();
        sizes.insert(s);
        assert!(s == size || s == new_size, "{what}: size {s}");
        check_marks(&d, if s == size { &all } else { &kept }, &what);
        if s == new_size {
            d.resize(size, false).unwrap();
            check_marks_gone(&d, &cut, &what);
        }
        check_marks(&d, &kept, &what);
        d.close().unwrap();
        // A crash may leave the tail uncut (a leak), never a corruption.
        let r = check(st.to_vec());
        assert_eq!(r.corruptions, 0, "{what}: {:?}", r.problems);
        assert_repairable(st.to_vec(), &what);
    });
    assert_eq!(sizes.len(), 2, "crash states of both sizes: {sizes:?}");
}

/// Shrinking, with or without force, leaves no leak: blocks freed at the
/// end of the file are cut off, blocks freed below one that is kept stay
/// as unused space (not a leak), and a grow after that is clean too.
#[test]
fn shrink_gives_back_the_tail() {
    // Blocks allocated in write order: 0, 40 (cut), 5 (kept, after 40), 50 (cut).
    let marks = [0, 40 * MIB, 5 * MIB, 50 * MIB];
    let base = image(64 * MIB, false, &marks);
    let len0 = base.len() as u64;
    // Not forced, over unallocated blocks only: nothing is freed, the file
    // keeps its length.
    let st = Arc::new(MemStorage::from_vec("d", base));
    let mut d = Vhdx::open_storage(Box::new(st.clone()), &rw()).unwrap();
    d.resize(60 * MIB, false).unwrap();
    d.close().unwrap();
    assert_eq!(st.to_vec().len() as u64, len0, "nothing allocated was cut");
    assert_clean(st.to_vec(), "shrunk over nothing");
    let mut d = Vhdx::open_storage(Box::new(st.clone()), &rw()).unwrap();
    d.resize(32 * MIB, true).unwrap();
    // Block 50 was last in the file: cut off; block 40 lies below block 5.
    assert_eq!(st.to_vec().len() as u64, len0 - MIB);
    let r = check(st.to_vec());
    assert_eq!((r.corruptions, r.leaks, r.exit_code()), (0, 0, 0), "{r:?}");
    assert_eq!(r.unused_bytes, MIB, "block 40's space: {:?}", r.problems);
    check_marks(&d, &[0, 5 * MIB], "shrunk");
    // Still usable: a new block goes at the new end, and the file is clean.
    d.write_at(b"new", 20 * MIB).unwrap();
    d.resize(100 * MIB, false).unwrap();
    d.close().unwrap();
    assert_clean(st.to_vec(), "written and grown after the shrink");
    let again = open_mem(st.to_vec(), &OpenOptions::default());
    check_marks(&again, &[0, 5 * MIB], "reopened");
    check_marks_gone(&again, &[40 * MIB, 50 * MIB], "reopened");
    let mut b = [0u8; 3];
    again.read_at(&mut b, 20 * MIB).unwrap();
    assert_eq!(&b, b"new");
}
