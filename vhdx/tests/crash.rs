//! Crash test: record the backing file's writes and flushes during a
//! workload, cut the stream at every point (dropping, keeping or tearing the
//! writes not yet covered by a flush), reopen, and check that every write
//! acknowledged by a completed flush reads back (`disk::testing::crash`).
// Test data: sizes and offsets of small test disks (they fit in memory),
// block sizes and byte patterns.
#![allow(clippy::cast_possible_truncation)]

use disk::fault::RecordingStorage;
use disk::testing::crash::{for_each_crash, Workload, PAGE};
use disk::MemStorage;
use std::sync::Arc;
use vhdx::{CreateOptions, OpenOptions, Vhdx};

const MIB: u64 = 1 << 20;

fn base_image(size: u64, block: u32) -> Vec<u8> {
    let st = Arc::new(MemStorage::new("base"));
    let mut o = CreateOptions::new(size);
    o.block_size = block;
    Vhdx::create_on(Box::new(st.clone()), &o)
        .unwrap()
        .close()
        .unwrap();
    st.to_vec()
}

fn check(img: Vec<u8>, w: &Workload, what: &str, cut: usize) {
    // The log entry and the payload are 4 KiB-aligned: writes tear per page.
    let tear = PAGE as usize;
    // Read-only open: replays in memory.
    let ro = Vhdx::open_storage(
        Box::new(MemStorage::from_vec("crash-ro", img.clone())),
        &OpenOptions::default(),
    )
    .unwrap_or_else(|e| panic!("{what}: read-only open failed: {e}"));
    w.verify(&ro, cut, tear, &format!("{what} read-only"));
    drop(ro);
    // Writable open: replays into the file; then a clean reopen.
    let st = Arc::new(MemStorage::from_vec("crash-rw", img));
    let rw = Vhdx::open_storage(
        Box::new(st.clone()),
        &OpenOptions {
            writable: true,
            ..Default::default()
        },
    )
    .unwrap_or_else(|e| panic!("{what}: writable open failed: {e}"));
    w.verify(&rw, cut, tear, &format!("{what} writable"));
    // Space a block took before the crash, never referenced, was reclaimed
    // by the writable open: nothing leaks.
    let report = vhdx::check::check(
        &MemStorage::from_vec("crash-check", st.to_vec()),
        &vhdx::check::CheckOptions::default(),
    )
    .unwrap();
    assert_eq!(
        (report.leaks, report.corruptions),
        (0, 0),
        "{what}: the image once opened writable is not clean: {:?}",
        report.problems
    );
    rw.close().unwrap();
    let again = Vhdx::open_storage(
        Box::new(MemStorage::from_vec("crash-again", st.to_vec())),
        &OpenOptions::default(),
    )
    .unwrap();
    assert!(
        !again.info().log_replayed,
        "{what}: log left dirty after close"
    );
    w.verify(&again, cut, tear, &format!("{what} reopened"));
}

fn run_workload(block: u32, size: u64, seed: u64) {
    let rec = Arc::new(RecordingStorage::new("rec", base_image(size, block)));
    let d = Vhdx::open_storage(
        Box::new(rec.clone()),
        &OpenOptions {
            writable: true,
            ..Default::default()
        },
    )
    .unwrap();
    let w = Workload::run(&rec, &d, size / PAGE, seed);
    std::mem::forget(d); // a crash: no clean close
    for_each_crash(&rec, seed, |img, cut, strategy| {
        check(img, &w, &format!("{strategy} cut {cut}"), cut)
    });
}

#[test]
fn crash_at_every_point_keeps_flushed_writes_1m_blocks() {
    run_workload(MIB as u32, 24 * MIB, 0x1234_5678);
}

#[test]
fn crash_at_every_point_keeps_flushed_writes_2m_blocks() {
    run_workload(2 * MIB as u32, 40 * MIB, 0xdead_beef);
}
