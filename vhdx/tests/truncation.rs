//! A VHDX file cut short (issue "repairs never destroy data"): at a block
//! boundary, in the middle of a block, inside the BAT, inside the log. The
//! check names every truncated block with its virtual range (exit 2), a
//! repair leaves the file's length alone, what is left reads the same,
//! reading lost data fails naming the block, and a writable open never
//! puts a new block on the surviving part of a truncated one. Then `check
//! -r all` cut at every write (a log replay, a leaked tail) leaves an image
//! that reads what it read before.
// Test data: sizes and offsets of small test disks (they fit in memory),
// block sizes and byte patterns.
#![allow(clippy::cast_possible_truncation)]

mod common;
use common::*;
use disk::check::{CheckOptions, CheckReport, ProblemKind, RepairMode};
use disk::fault::RecordingStorage;
use disk::testing::crash::for_each_crash;
use disk::{MemStorage, Storage, VirtualDisk};
use std::sync::Arc;
use vhdx::check::{check, repair};
use vhdx::{CreateOptions, OpenOptions, Vhdx};

const MIB: u64 = 1 << 20;
/// [`image`]'s layout: BAT at 3 MiB, blocks from 4 MiB in write order.
const BAT: u64 = 3 * MIB;
/// Blocks written, in this order: block `ORDER[k]` lies at 4 MiB + k MiB.
const ORDER: [u64; 6] = [2, 0, 5, 9, 3, 7];

fn rw() -> OpenOptions {
    OpenOptions {
        writable: true,
        ..OpenOptions::default()
    }
}

/// A closed 64 MiB dynamic VHDX with 1 MiB blocks: [`ORDER`]'s blocks hold
/// `pattern(1 MiB, block)`; 10 MiB of file.
fn image() -> Vec<u8> {
    let st = Arc::new(MemStorage::new("t.vhdx"));
    let mut o = CreateOptions::new(64 * MIB);
    o.block_size = MIB as u32;
    let d = Vhdx::create_on(Box::new(st.clone()), &o).unwrap();
    for b in ORDER {
        d.write_at(&pattern(MIB as usize, b), b * MIB).unwrap();
    }
    d.close().unwrap();
    let v = st.to_vec();
    assert_eq!(v.len() as u64, 10 * MIB);
    v
}

/// File offset of block `b` in [`image`].
fn block_at(b: u64) -> u64 {
    4 * MIB + ORDER.iter().position(|&x| x == b).unwrap() as u64 * MIB
}

fn cut(len: u64) -> Arc<MemStorage> {
    let mut v = image();
    v.truncate(len as usize);
    Arc::new(MemStorage::from_vec("t.vhdx", v))
}

fn run_check(st: &dyn Storage) -> CheckReport {
    check(st, &CheckOptions::default()).unwrap()
}

/// The truncated blocks the report names: (virtual range, BAT entry offset).
fn truncated(r: &CheckReport) -> Vec<((u64, u64), u64)> {
    r.problems
        .iter()
        .filter_map(|p| p.virtual_range.map(|v| (v, p.offset)))
        .collect()
}

/// `-r all` then `-r leaks` change nothing: same length, same bytes.
fn repairs_change_nothing(st: &Arc<MemStorage>) {
    let before = st.to_vec();
    for mode in [RepairMode::All, RepairMode::Leaks] {
        repair(&**st, mode, &CheckOptions::default()).unwrap();
        assert_eq!(st.len().unwrap(), before.len() as u64, "{mode:?}");
        assert!(st.to_vec() == before, "{mode:?} changed the file");
    }
}

fn open_ro(st: &Arc<MemStorage>) -> Vhdx {
    Vhdx::open_storage(Box::new(st.clone()), &OpenOptions::default()).unwrap()
}

fn read(d: &dyn VirtualDisk, at: u64, len: u64) -> disk::Result<Vec<u8>> {
    let mut b = vec![0u8; len as usize];
    d.read_at(&mut b, at).map(|()| b)
}

#[test]
fn cut_at_a_block_boundary() {
    // The file ends where block 3 starts: blocks 3 and 7 are lost whole.
    let st = cut(block_at(3));
    let r = run_check(&*st);
    assert_eq!(r.exit_code(), 2, "{:#?}", r.problems);
    assert_eq!(r.truncated_blocks, 2);
    assert_eq!(
        truncated(&r),
        vec![
            ((3 * MIB, 4 * MIB), BAT + 3 * 8),
            ((7 * MIB, 8 * MIB), BAT + 7 * 8)
        ]
    );
    assert_eq!((r.leaks, r.leaked_bytes), (0, 0));
    assert!(r.problems.iter().all(|p| p.kind == ProblemKind::Corruption));
    assert!(
        r.problems[0].message.contains("block 3"),
        "{}",
        r.problems[0]
    );
    repairs_change_nothing(&st);
    let d = open_ro(&st);
    for b in [2, 0, 5, 9] {
        assert!(read(&d, b * MIB, MIB).unwrap() == pattern(MIB as usize, b));
    }
    let e = read(&d, 3 * MIB + 10, 100).unwrap_err().to_string();
    assert!(
        e.contains("block 3 (BAT entry 3, virtual 0x300000..0x400000) at file offset 0x800000"),
        "{e}"
    );
    assert!(!e.contains("fill whole buffer"), "{e}");
    let t = d.truncation().unwrap();
    assert_eq!(t.truncated_blocks, 2);
    assert_eq!(
        t.truncated.iter().map(|b| b.index).collect::<Vec<_>>(),
        vec![3, 7]
    );
}

#[test]
fn cut_in_the_middle_of_a_block() {
    // The file ends 300 KiB into block 7, the last one.
    let end = block_at(7) + 300 * 1024;
    let st = cut(end);
    let r = run_check(&*st);
    assert_eq!(r.exit_code(), 2, "{:#?}", r.problems);
    assert_eq!(truncated(&r), vec![((7 * MIB, 8 * MIB), BAT + 7 * 8)]);
    // The part of block 7 inside the file is used, not leaked.
    assert_eq!((r.leaks, r.unused_bytes), (0, 0), "{:#?}", r.problems);
    assert_eq!(r.image_end_offset, block_at(7) + MIB);
    repairs_change_nothing(&st);
    let want = pattern(MIB as usize, 7);
    {
        let d = open_ro(&st);
        // What is left of block 7 reads; a read reaching past it fails.
        assert!(read(&d, 7 * MIB, 300 * 1024).unwrap() == want[..300 * 1024]);
        let e = read(&d, 7 * MIB, 300 * 1024 + 1).unwrap_err().to_string();
        assert!(
            e.contains("block 7 (BAT entry 7, virtual 0x700000..0x800000)")
                && e.contains("virtual 0x74b000..0x800000 is lost"),
            "{e}"
        );
        assert_eq!(d.truncation().unwrap().truncated_blocks, 1);
    }
    // A writable open is refused: a new block would extend the file over
    // block 7's lost part, which would then read as zeros.
    let before = st.to_vec();
    let e = Vhdx::open_storage(Box::new(st.clone()), &rw())
        .expect_err("a writable open of a truncated image is refused")
        .to_string();
    assert!(
        e.contains("the image is truncated: 1 blocks lie past the end of the file")
            && e.contains("block 7, virtual 0x700000..0x800000, file offset 0x900000+0x100000"),
        "{e}"
    );
    assert!(st.to_vec() == before, "the refused open wrote");
}

#[test]
fn new_blocks_go_past_space_referenced_beyond_the_end_of_the_file() {
    // Block 9's entry keeps its space (UNMAPPED, LeaveBlocksAllocated) at
    // 12 MiB, past the end of the 10 MiB file: a new block must not land
    // there, nor anywhere before its end.
    let mut img = image();
    let e = vhdx::bat::BatEntry::new(vhdx::bat::PayloadState::Unmapped as u8, 12 * MIB);
    let at = (BAT + 9 * 8) as usize;
    img[at..at + 8].copy_from_slice(&e.0.to_le_bytes());
    let st = Arc::new(MemStorage::from_vec("t.vhdx", img));
    let d = Vhdx::open_storage(Box::new(st.clone()), &rw()).unwrap();
    d.write_at(&pattern(4096, 30), 30 * MIB).unwrap();
    match d.map(30 * MIB, 4096).unwrap().mapping {
        disk::Mapping::Data(fo) => assert_eq!(fo.0, 13 * MIB),
        m => panic!("{m:?}"),
    }
    // Writing block 9 reuses its own space.
    d.write_at(&pattern(4096, 9), 9 * MIB).unwrap();
    match d.map(9 * MIB, 4096).unwrap().mapping {
        disk::Mapping::Data(fo) => assert_eq!(fo.0, 12 * MIB),
        m => panic!("{m:?}"),
    }
    d.close().unwrap();
    let r = run_check(&*st);
    assert_eq!(r.corruptions, 0, "{:#?}", r.problems);
    let d = open_ro(&st);
    assert!(read(&d, 30 * MIB, 4096).unwrap() == pattern(4096, 30));
    assert!(read(&d, 9 * MIB, 4096).unwrap() == pattern(4096, 9));
    assert!(read(&d, 7 * MIB, MIB).unwrap() == pattern(MIB as usize, 7));
}

#[test]
fn cut_inside_the_bat() {
    // Entries 0..5 are left: blocks 5.. cannot be found, and every block
    // (from 4 MiB) lies past the end.
    let st = cut(BAT + 5 * 8);
    let r = run_check(&*st);
    assert_eq!(r.exit_code(), 2);
    assert!(
        r.problems.iter().any(|p| p.offset == BAT + 40
            && p.message
                .contains("entries 5..64 lie past the end of the file")),
        "{:#?}",
        r.problems
    );
    // Of the entries left, blocks 0, 2 and 3 are present, past the end.
    assert_eq!(r.truncated_blocks, 3, "{:#?}", r.problems);
    repairs_change_nothing(&st);
    let d = open_ro(&st);
    let e = read(&d, 9 * MIB, 512).unwrap_err().to_string();
    assert!(
        e.contains("VHDX BAT") && e.contains("block 9 (BAT entry 9") && e.contains("truncated"),
        "{e}"
    );
    // An entry that is gone does not read as zeros (NOT_PRESENT).
    assert!(read(&d, 60 * MIB, 512).is_err());
    // Blocks before the cut whose entries say "not present" read zeros.
    assert_eq!(read(&d, MIB, 512).unwrap(), vec![0u8; 512]);
    let e = read(&d, 0, 512).unwrap_err().to_string();
    assert!(e.contains("block 0 (BAT entry 0"), "{e}");
    let t = d.truncation().unwrap();
    assert_eq!((t.entries_in_file, t.total_entries), (5, 64));
    drop(d);
    // A writable open is refused: a flush would write the lost entries
    // back as NOT_PRESENT.
    let e = Vhdx::open_storage(Box::new(st.clone()), &rw()).unwrap_err();
    assert!(e.to_string().contains("inside the BAT"), "{e}");
    assert_eq!(st.len().unwrap(), BAT + 40);
}

#[test]
fn cut_inside_the_log() {
    let st = cut(MIB + 4096);
    let r = run_check(&*st);
    assert_eq!(r.exit_code(), 2);
    assert!(
        r.problems
            .iter()
            .any(|p| p.message.contains("log region") && p.message.contains("past the end")),
        "{:#?}",
        r.problems
    );
    assert_eq!(r.leaks, 0);
    repairs_change_nothing(&st);
    let e = Vhdx::open_storage(Box::new(st.clone()), &OpenOptions::default())
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("metadata region") && e.contains("past the end"),
        "{e}"
    );
}

#[test]
fn a_sector_bitmap_block_cut_short_is_named() {
    // A differencing disk whose file ends inside its sector bitmap block:
    // its sectors must not read as "not present" (from the parent).
    let dir = tempfile::tempdir().unwrap();
    let base = dir.path().join("base.vhdx");
    let child = dir.path().join("child.avhdx");
    let mut o = CreateOptions::new(8 * MIB);
    o.block_size = MIB as u32;
    let p = Vhdx::create(&base, &o, false).unwrap();
    p.write_at(&[1; 4096], 0).unwrap();
    p.close().unwrap();
    let c = Vhdx::create_differencing(&child, &base, &o, &OpenOptions::default(), false).unwrap();
    c.write_at(&[2; 512], 512).unwrap();
    c.close().unwrap();
    // The child's bitmap block comes first after the structures, then the
    // block: cut in the middle of the bitmap block.
    let len = std::fs::metadata(&child).unwrap().len();
    let f = std::fs::OpenOptions::new()
        .write(true)
        .open(&child)
        .unwrap();
    f.set_len(len - MIB - MIB / 2).unwrap();
    drop(f);
    let r = vhdx::check::check_file(&child, &CheckOptions::default()).unwrap();
    assert_eq!(r.truncated_blocks, 2, "{:#?}", r.problems);
    assert!(r
        .problems
        .iter()
        .any(|p| p.message.contains("sector bitmap block of chunk 0")
            && p.virtual_range == Some((0, 8 * MIB))));
    let d = Vhdx::open(&child, &OpenOptions::default()).unwrap();
    let mut b = [0u8; 512];
    let e = d.read_at(&mut b, 0).unwrap_err().to_string();
    assert!(e.contains("the sector bitmap block of chunk 0"), "{e}");
}

// ---- check -r all cut at every write. ----

/// Repair `image` on a recording storage, then at every crash point of
/// the repair: the image opens reading `want`, and checking and repairing
/// it again leaves a clean image that still reads `want`.
fn crash_repair(image: Vec<u8>, what: &str) {
    let want = read_all(
        &Vhdx::open_storage(
            Box::new(MemStorage::from_vec("orig", image.clone())),
            &OpenOptions::default(),
        )
        .unwrap(),
    );
    let rec = Arc::new(RecordingStorage::new("rec.vhdx", image));
    let fix = repair(&*rec, RepairMode::All, &CheckOptions::default()).unwrap();
    assert!(
        fix.corruptions_fixed + fix.leaks_fixed > 0,
        "{what}: {fix:?}"
    );
    assert!(run_check(&*rec).is_clean(), "{what}");
    assert!(rec.op_count() > 0);
    let mut cuts = 0;
    for_each_crash(&rec, 7, |img, cut, strategy| {
        let w = format!("{what}: {strategy} cut {cut}");
        let st = Arc::new(MemStorage::from_vec("crash.vhdx", img));
        let got = read_all(&open_ro(&st));
        assert!(got == want, "{w}: reads differ");
        repair(&*st, RepairMode::All, &CheckOptions::default())
            .unwrap_or_else(|e| panic!("{w}: repair again: {e}"));
        let r = run_check(&*st);
        assert!(r.is_clean(), "{w}: {:#?}", r.problems);
        assert!(read_all(&open_ro(&st)) == want, "{w}: after repair again");
        cuts += 1;
    });
    assert!(cuts > 3);
}

#[test]
fn repair_cut_at_every_write_replaying_a_dirty_log() {
    // The last flush's log entry reached the file, its BAT page did not.
    let rec = Arc::new(RecordingStorage::new("dirty.vhdx", image()));
    let d = Vhdx::open_storage(Box::new(rec.clone()), &rw()).unwrap();
    d.write_at(&pattern(8192, 33), 33 * MIB).unwrap();
    d.flush().unwrap();
    std::mem::forget(d);
    let flushes = rec.flush_points();
    let dirty = rec.crash_image(flushes[flushes.len() - 2] + 1, |_| true);
    let r = run_check(&MemStorage::from_vec("d", dirty.clone()));
    assert_eq!(r.problems[0].structure, "VHDX log", "{:#?}", r.problems);
    crash_repair(dirty, "dirty log");
}

#[test]
fn repair_cut_at_every_write_cutting_a_leaked_tail() {
    let mut img = image();
    img.extend(pattern(3 * MIB as usize, 99));
    let r = run_check(&MemStorage::from_vec("l", img.clone()));
    assert_eq!((r.exit_code(), r.leaked_bytes), (3, 3 * MIB));
    crash_repair(img, "leaked tail");
}
