//! Failing storage: each operation on a VHDX and a VHD (write + flush of
//! an allocating, unaligned write; discard + flush; resize up; resize down)
//! is run again and again with the storage failing its n-th mutation
//! (write, flush or set_len), n = 0, 1, 2... until the operation no longer
//! meets the fault, alternately with EIO and ENOSPC. Each time:
//! - the operation returns an error naming the file and the fault (no
//!   panic);
//! - the file, as left, opens, and every sector reads as before the
//!   operation or as after it (its size one or the other);
//! - retrying the operation on it completes, and reads as after.

// Test data: small disks whose sizes and offsets fit any integer type.
#![allow(clippy::cast_possible_truncation)]

use disk::fault::{Fault, RecordingStorage};
use disk::{Storage, VirtualDisk};
use std::sync::Arc;

const MIB: u64 = 1 << 20;
const SIZE: u64 = 16 * MIB;

/// A driver under test, opened on a storage.
trait Driver: VirtualDisk + Sized {
    fn create(s: Box<dyn Storage>) -> Self;
    fn open(s: Box<dyn Storage>, writable: bool) -> disk::Result<Self>;
    fn resize(&mut self, size: u64) -> disk::Result<()>;
    fn shut(self) -> disk::Result<()>;
}

impl Driver for vhdx::Vhdx {
    fn create(s: Box<dyn Storage>) -> Self {
        let mut o = vhdx::CreateOptions::new(SIZE);
        o.block_size = MIB as u32;
        vhdx::Vhdx::create_on(s, &o).unwrap()
    }
    fn open(s: Box<dyn Storage>, writable: bool) -> disk::Result<Self> {
        vhdx::Vhdx::open_storage(
            s,
            &vhdx::OpenOptions {
                writable,
                ..Default::default()
            },
        )
    }
    fn resize(&mut self, size: u64) -> disk::Result<()> {
        vhdx::Vhdx::resize(self, size, true).map(|_| ())
    }
    fn shut(self) -> disk::Result<()> {
        self.close()
    }
}

impl Driver for vhd::Vhd {
    fn create(s: Box<dyn Storage>) -> Self {
        let mut o = vhd::CreateOptions::new(SIZE);
        o.block_size = MIB as u32;
        vhd::Vhd::create_on(s, &o).unwrap()
    }
    fn open(s: Box<dyn Storage>, writable: bool) -> disk::Result<Self> {
        vhd::Vhd::open_storage(
            s,
            &vhd::OpenOptions {
                writable,
                ..Default::default()
            },
        )
    }
    fn resize(&mut self, size: u64) -> disk::Result<()> {
        vhd::Vhd::resize(self, size, true).map(|_| ())
    }
    fn shut(self) -> disk::Result<()> {
        self.close()
    }
}

type Op<D> = fn(&mut D) -> disk::Result<()>;

fn write_flush<D: Driver>(d: &mut D) -> disk::Result<()> {
    let p: Vec<u8> = (0..3 * MIB + 1000).map(|i| (i % 241) as u8 + 1).collect();
    d.write_at(&p, MIB + 100)?;
    d.flush()
}

fn discard_flush<D: Driver>(d: &mut D) -> disk::Result<()> {
    d.discard(2 * MIB, 4 * MIB)?;
    d.flush()
}

fn grow<D: Driver>(d: &mut D) -> disk::Result<()> {
    d.resize(24 * MIB)
}

fn shrink<D: Driver>(d: &mut D) -> disk::Result<()> {
    d.resize(8 * MIB)
}

fn read_all(d: &dyn VirtualDisk) -> Vec<u8> {
    let mut v = vec![0u8; d.virtual_size() as usize];
    d.read_at(&mut v, 0).unwrap();
    v
}

/// The image every run starts from: data in some blocks, closed.
fn initial<D: Driver>() -> Vec<u8> {
    let s = Arc::new(RecordingStorage::new("img", Vec::new()));
    let d = D::create(Box::new(s.clone()));
    let data: Vec<u8> = (0..6 * MIB).map(|i| (i % 239) as u8 + 7).collect();
    d.write_at(&data, 512 * 3).unwrap();
    d.shut().unwrap();
    s.contents()
}

/// Every sector of `got` is `before`'s or `after`'s (by size).
fn either(got: &[u8], before: &[u8], after: &[u8], what: &str) {
    let want_sizes = [before.len(), after.len()];
    assert!(
        want_sizes.contains(&got.len()),
        "{what}: virtual size {} is neither {want_sizes:?}",
        got.len()
    );
    for (i, s) in got.chunks(512).enumerate() {
        let r = i * 512..i * 512 + s.len();
        let b = before.get(r.clone());
        let a = after.get(r.clone());
        assert!(
            b == Some(s) || a == Some(s),
            "{what}: sector {i} reads neither as before nor as after"
        );
    }
}

fn run<D: Driver>(name: &str, op: Op<D>) {
    let start = initial::<D>();
    // Before and after, without faults.
    let before =
        read_all(&D::open(Box::new(RecordingStorage::new("img", start.clone())), false).unwrap());
    let s = Arc::new(RecordingStorage::new("img", start.clone()));
    let mut d = D::open(Box::new(s.clone()), true).unwrap();
    op(&mut d).unwrap();
    d.shut().unwrap();
    let after =
        read_all(&D::open(Box::new(RecordingStorage::new("img", s.contents())), false).unwrap());
    let mut faults = 0;
    for n in 0.. {
        assert!(n < 10_000, "{name}: the operation never completes");
        let fault = if n % 2 == 0 {
            Fault::Eio
        } else {
            Fault::Enospc
        };
        let s = Arc::new(RecordingStorage::new("img", start.clone()));
        let mut d = D::open(Box::new(s.clone()), true).unwrap();
        s.fail_mutation_after(Some(n), fault);
        let r = op(&mut d);
        if s.fault_pending() {
            // It did fewer than n mutations: every point was covered.
            r.unwrap();
            break;
        }
        let what = format!("{name}, fault {fault:?} at mutation {n}");
        match r {
            // The fault hit a write the operation needs no more (e.g. one
            // it retries or cleans up); it must then have succeeded fully.
            Ok(()) => {}
            Err(e) => {
                faults += 1;
                let msg = format!("{e:#}");
                assert!(
                    msg.contains("img") && msg.contains("injected fault"),
                    "{what}: {msg}"
                );
            }
        }
        // The process goes on (the handle dropped, as a caller would).
        drop(d);
        let left = s.contents();
        let reopened = D::open(Box::new(RecordingStorage::new("img", left.clone())), false)
            .unwrap_or_else(|e| panic!("{what}: the image does not open: {e:#}"));
        either(&read_all(&reopened), &before, &after, &what);
        // Retrying completes.
        let s2 = Arc::new(RecordingStorage::new("img", left));
        let mut d2 = D::open(Box::new(s2.clone()), true)
            .unwrap_or_else(|e| panic!("{what}: reopen writable: {e:#}"));
        op(&mut d2).unwrap_or_else(|e| panic!("{what}: the retry failed: {e:#}"));
        d2.shut().unwrap();
        let done = read_all(
            &D::open(Box::new(RecordingStorage::new("img", s2.contents())), false).unwrap(),
        );
        assert!(done == after, "{what}: the retry does not read as after");
    }
    eprintln!("{name}: {faults} faults injected, every one survived");
    assert!(faults > 0, "{name}: no fault was ever injected");
}

#[test]
fn vhdx_operations_under_faults() {
    run::<vhdx::Vhdx>("vhdx write+flush", write_flush);
    run::<vhdx::Vhdx>("vhdx discard+flush", discard_flush);
    run::<vhdx::Vhdx>("vhdx resize up", grow);
    run::<vhdx::Vhdx>("vhdx resize down", shrink);
}

#[test]
fn vhd_operations_under_faults() {
    run::<vhd::Vhd>("vhd write+flush", write_flush);
    run::<vhd::Vhd>("vhd discard+flush", discard_flush);
    run::<vhd::Vhd>("vhd resize up", grow);
    run::<vhd::Vhd>("vhd resize down", shrink);
}
