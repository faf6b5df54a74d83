//! Log replay into failing storage. A VHDX is left as a power cut can
//! leave it: a log entry (new BAT entries) written and synced, not yet
//! applied in place; the blocks it allocates hold data that a completed
//! flush acknowledged. It is then opened writable (which replays the log
//! into the file and records an empty log) with the file failing its n-th
//! mutation, n = 0, 1, 2... until the open no longer meets the fault,
//! alternately EIO and ENOSPC. Each time:
//! - the open returns an error naming the file and the fault (no panic);
//! - the file, as left, opens read-only (replaying in memory whatever the
//!   log still holds) and reads the flushed data;
//! - opening it writable again replays it and empties the log: a
//!   read-only open after that replays nothing and reads the same.
// Test data: small disks whose sizes and offsets fit any integer type.
#![allow(clippy::cast_possible_truncation)]

use disk::fault::{Fault, Op, RecordingStorage};
use disk::testing::pattern;
use disk::{MemStorage, VirtualDisk};
use std::sync::Arc;
use vhdx::{CreateOptions, OpenOptions, Vhdx};

const MIB: u64 = 1 << 20;
const SIZE: u64 = 16 * MIB;

fn open(bytes: Vec<u8>, writable: bool) -> disk::Result<Vhdx> {
    Vhdx::open_storage(
        Box::new(MemStorage::from_vec("img.vhdx", bytes)),
        &OpenOptions {
            writable,
            ..Default::default()
        },
    )
}

fn read_all(d: &Vhdx) -> Vec<u8> {
    let mut v = vec![0u8; d.virtual_size() as usize];
    d.read_at(&mut v, 0).unwrap();
    v
}

/// An image whose log holds an entry not applied in place (a power cut
/// just after the entry was synced), and what it reads.
fn unapplied_log() -> (Vec<u8>, Vec<u8>) {
    let base = Arc::new(MemStorage::new("img.vhdx"));
    let mut o = CreateOptions::new(SIZE);
    o.block_size = MIB as u32;
    Vhdx::create_on(Box::new(base.clone()), &o)
        .unwrap()
        .close()
        .unwrap();
    let rec = Arc::new(RecordingStorage::new("img.vhdx", base.to_vec()));
    let d = Vhdx::open_storage(
        Box::new(rec.clone()),
        &OpenOptions {
            writable: true,
            ..Default::default()
        },
    )
    .unwrap();
    let (log_at, log_len) = (
        d.info().header.log_offset,
        u64::from(d.info().header.log_length),
    );
    let mut model = vec![0u8; SIZE as usize];
    for (off, len, seed) in [(0, 3 * MIB, 1), (5 * MIB + 512, 2 * MIB + 100, 2)] {
        let p = pattern(len as usize, seed);
        d.write_at(&p, off).unwrap();
        d.flush().unwrap();
        model[off as usize..(off + len) as usize].copy_from_slice(&p);
    }
    std::mem::forget(d); // a crash: no clean close
                         // The last flush that followed a write into the log: the entry is
                         // durable there, its pages not yet written in place.
    let ops = rec.ops();
    let cut = (1..ops.len())
        .rev()
        .find(|&i| {
            ops[i] == Op::Flush
                && matches!(&ops[i - 1], Op::Write { offset, .. }
                    if (log_at..log_at + log_len).contains(offset))
        })
        .expect("a log entry was written")
        + 1;
    let img = rec.crash_image(cut, |_| true);
    (img, model)
}

#[test]
fn log_replay_under_faults() {
    let (img, model) = unapplied_log();
    // Read-only, the log is replayed in memory: the data is there.
    let ro = open(img.clone(), false).unwrap();
    assert!(ro.info().log_replayed, "the log holds no entry");
    assert!(read_all(&ro) == model, "the replayed image misses data");
    drop(ro);
    let mut faults = 0;
    for n in 0.. {
        assert!(n < 1000, "the open never completes");
        let fault = if n % 2 == 0 {
            Fault::Eio
        } else {
            Fault::Enospc
        };
        let s = Arc::new(RecordingStorage::new("img.vhdx", img.clone()));
        s.fail_mutation_after(Some(n), fault);
        let r = Vhdx::open_storage(
            Box::new(s.clone()),
            &OpenOptions {
                writable: true,
                ..Default::default()
            },
        );
        if s.fault_pending() {
            let d = r.unwrap();
            assert!(read_all(&d) == model, "replayed without faults");
            break;
        }
        let what = format!("{fault:?} at mutation {n}");
        let e = r.expect_err(&format!(
            "{what}: the open succeeded, though a write failed"
        ));
        let msg = format!("{e:#}");
        assert!(
            msg.contains("img.vhdx") && msg.contains("injected fault"),
            "{what}: {msg}"
        );
        faults += 1;
        let left = s.contents();
        let ro = open(left.clone(), false)
            .unwrap_or_else(|e| panic!("{what}: the image does not open: {e:#}"));
        assert!(read_all(&ro) == model, "{what}: reads differently");
        drop(ro);
        // Retrying the writable open replays the log and empties it.
        let st = Arc::new(MemStorage::from_vec("img.vhdx", left));
        let rw = Vhdx::open_storage(
            Box::new(st.clone()),
            &OpenOptions {
                writable: true,
                ..Default::default()
            },
        )
        .unwrap_or_else(|e| panic!("{what}: the retry failed: {e:#}"));
        assert!(read_all(&rw) == model, "{what}: after the retry");
        drop(rw);
        let again = open(st.to_vec(), false).unwrap();
        assert!(
            !again.info().log_replayed,
            "{what}: the log is not empty after the retry"
        );
        assert!(
            read_all(&again) == model,
            "{what}: after the retry, reopened"
        );
    }
    eprintln!("log replay: {faults} faults injected, every one survived");
    assert!(faults > 0, "no fault was injected");
}
