//! Crash test: record the backing file's writes and flushes during a
//! workload on a dynamic VHD, cut the stream at every point (dropping,
//! keeping or tearing the writes not yet covered by a flush), reopen, and
//! check that the image still opens read-write from its trailing footer and
//! that every write acknowledged by a completed flush reads back.

// Test images and buffers are small: their offsets and sizes fit any integer type.
#![allow(clippy::cast_possible_truncation)]

use disk::fault::RecordingStorage;
use disk::testing::crash::{for_each_crash, Workload, PAGE};
use disk::{MemStorage, Storage, VirtualDisk};
use std::sync::Arc;
use vhd::{CreateOptions, FooterSource, OpenOptions, Vhd};

const MIB: u64 = 1 << 20;

fn base_image(size: u64, block: u32) -> Vec<u8> {
    let st = Arc::new(MemStorage::new("base"));
    let mut o = CreateOptions::new(size);
    o.block_size = block;
    Vhd::create_on(Box::new(st.clone()), &o)
        .unwrap()
        .close()
        .unwrap();
    st.to_vec()
}

fn check(img: Vec<u8>, w: &Workload, what: &str, cut: usize) {
    // Unacknowledged writes may be torn at sector granularity (the payload
    // is only 512-byte aligned in a VHD).
    let tear = 512;
    let ro = Vhd::open_storage(
        Box::new(MemStorage::from_vec("crash-ro", img.clone())),
        &OpenOptions::default(),
    )
    .unwrap_or_else(|e| panic!("{what}: read-only open failed: {e}"));
    assert_eq!(
        ro.info().footer_source,
        FooterSource::End,
        "{what}: no valid footer at the end of the file"
    );
    w.verify(&ro, cut, tear, &format!("{what} read-only"));
    drop(ro);
    // A writable open can keep writing: allocate a new block after whatever
    // the crash left at the end, then reopen and check everything.
    let st = Arc::new(MemStorage::from_vec("crash-rw", img));
    let rw = Vhd::open_storage(
        Box::new(st.clone()),
        &OpenOptions {
            writable: true,
            ..OpenOptions::default()
        },
    )
    .unwrap_or_else(|e| panic!("{what}: writable open failed: {e}"));
    w.verify(&rw, cut, tear, &format!("{what} writable"));
    // A block allocated before the crash and never referenced is
    // reclaimed by the writable open: nothing leaks.
    let report = vhd::check::check(
        &MemStorage::from_vec("crash-check", st.to_vec()),
        &vhd::check::CheckOptions::default(),
    )
    .unwrap();
    assert_eq!(
        (report.leaks, report.corruptions),
        (0, 0),
        "{what}: the image once opened writable is not clean: {:?}",
        report.problems
    );
    let last = rw.virtual_size() - PAGE;
    let marker = vec![0xeeu8; PAGE as usize];
    rw.write_at(&marker, last).unwrap();
    rw.close().unwrap();
    let again = Vhd::open_storage(
        Box::new(MemStorage::from_vec("crash-again", st.to_vec())),
        &OpenOptions::default(),
    )
    .unwrap_or_else(|e| panic!("{what}: reopen after writing failed: {e}"));
    let mut got = vec![0u8; PAGE as usize];
    again.read_at(&mut got, last).unwrap();
    assert_eq!(got, marker, "{what}: write after recovery lost");
    w.verify(&again, cut, tear, &format!("{what} reopened"));
}

fn run_workload(block: u32, size: u64, seed: u64) {
    let rec = Arc::new(RecordingStorage::new("rec", base_image(size, block)));
    let d = Vhd::open_storage(
        Box::new(rec.clone()),
        &OpenOptions {
            writable: true,
            ..OpenOptions::default()
        },
    )
    .unwrap();
    // Leave the last page alone: check() writes a marker there.
    let w = Workload::run(&rec, &d, d.virtual_size() / PAGE - 1, seed);
    std::mem::forget(d); // a crash: no close
    for_each_crash(&rec, seed, |img, cut, strategy| {
        check(img, &w, &format!("{strategy} cut {cut}"), cut)
    });
}

#[test]
fn crash_at_every_point_keeps_flushed_writes_64k_blocks() {
    run_workload(64 * 1024, 8 * MIB, 0x1234_5678);
}

#[test]
fn crash_at_every_point_keeps_flushed_writes_2m_blocks() {
    run_workload(2 * MIB as u32, 24 * MIB, 0xdead_beef);
}

/// The leak a crash leaves (a block's space before the footer that no BAT
/// entry references) is given back by a writable open, and only when the
/// image has nothing else wrong: next to a damaged structure it is kept.
#[test]
fn writable_open_gives_back_a_leak_only_in_an_otherwise_sound_image() {
    let block: u32 = 64 << 10;
    let slot = u64::from(block) + 512;
    let st = Arc::new(MemStorage::from_vec("leak.vhd", base_image(4 * MIB, block)));
    let d = Vhd::open_storage(Box::new(st.clone()), &rw()).unwrap();
    d.write_at(&[7u8; 4096], 0).unwrap();
    d.write_at(&[9u8; 4096], 3 * u64::from(block)).unwrap();
    d.close().unwrap();
    let mut leaked = st.to_vec();
    // Block 3 is the last in the file: unreference it, as a crash before
    // the flush of its BAT entry would have left it.
    let table = 1536;
    leaked[table + 12..table + 16].copy_from_slice(&[0xff; 4]);
    let report = |img: &[u8]| {
        vhd::check::check(
            &MemStorage::from_vec("leak.vhd", img.to_vec()),
            &vhd::check::CheckOptions::default(),
        )
        .unwrap()
    };
    assert_eq!(report(&leaked).leaks, 1);

    let st = Arc::new(MemStorage::from_vec("leak.vhd", leaked.clone()));
    let d = Vhd::open_storage(Box::new(st.clone()), &rw()).unwrap();
    assert_eq!(st.len().unwrap(), leaked.len() as u64 - slot);
    let mut got = [0u8; 4096];
    d.read_at(&mut got, 0).unwrap();
    assert_eq!(got, [7u8; 4096]);
    d.close().unwrap();
    let r = report(&st.to_vec());
    assert_eq!((r.leaks, r.corruptions), (0, 0), "{:?}", r.problems);

    // The same leak beside a damaged footer copy at offset 0: the writable
    // open changes nothing it was not asked to.
    let mut damaged = leaked;
    damaged[3] = b'x';
    let r = report(&damaged);
    assert_eq!((r.leaks, r.corruptions), (1, 1), "{:?}", r.problems);
    let st = Arc::new(MemStorage::from_vec("leak.vhd", damaged.clone()));
    let d = Vhd::open_storage(Box::new(st.clone()), &rw()).unwrap();
    d.close().unwrap();
    assert!(st.to_vec() == damaged, "the writable open changed the file");
}

fn rw() -> OpenOptions {
    OpenOptions {
        writable: true,
        ..OpenOptions::default()
    }
}
