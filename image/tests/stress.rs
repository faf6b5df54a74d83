//! Concurrency stress through the front door: threads doing random reads,
//! writes, write-zeroes, discards and flushes on one disk (dynamic VHDX,
//! dynamic VHD) and on differencing chains (VHDX, VHD: the leaf written,
//! read through the chain view), checked against a model.
//!
//! The model is exact because every byte has one owner: the first half of
//! the disk is cut into 64-byte chunks dealt round-robin to the threads,
//! so that every sector and block is written by every thread at once
//! (copy-ups, allocations and bitmap updates of one block race), and the
//! second half into whole 1 MiB blocks per thread, for large writes,
//! write-zeroes and discards. A discarded byte may read as zero or as what
//! it held (the driver may keep the block), and nothing else. Each thread
//! checks its own bytes after every write (read your writes) and reads
//! other threads' chunks to race with them; at the end every byte is
//! checked, after a close and a reopen. A watchdog fails the test if the
//! threads do not finish in time (a deadlock).

// Test data: small disks whose offsets and lengths fit any integer type.
#![allow(clippy::cast_possible_truncation)]

use disk::VirtualDisk;
use image::{CreateOptions, Format, Kind, OpenOptions};
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

const MIB: u64 = 1 << 20;
const SIZE: u64 = 8 * MIB;
const THREADS: u64 = 4;
const CHUNK: u64 = 64;
const OPS: u64 = 1500;

/// What a byte may read as.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Byte {
    Is(u8),
    /// Discarded: zero, or the value it held.
    ZeroOr(u8),
}

impl Byte {
    fn allows(self, v: u8) -> bool {
        match self {
            Byte::Is(x) => x == v,
            Byte::ZeroOr(x) => v == 0 || v == x,
        }
    }
}

/// A small deterministic random sequence (xorshift).
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

/// The bytes thread `t` owns, as (offset, len) runs.
fn owned(t: u64) -> Vec<(u64, u64)> {
    let half = SIZE / 2;
    let mut v: Vec<(u64, u64)> = (0..half / CHUNK)
        .filter(|k| k % THREADS == t)
        .map(|k| (k * CHUNK, CHUNK))
        .collect();
    let blocks = half / MIB;
    v.extend(
        (0..blocks)
            .filter(|b| b % THREADS == t)
            .map(|b| (half + b * MIB, MIB)),
    );
    v
}

/// One thread's work: its model of its own bytes, which it returns.
fn work(
    d: Arc<dyn VirtualDisk>,
    t: u64,
    discard: bool,
    start: Vec<u8>,
    barrier: Arc<std::sync::Barrier>,
) -> Vec<(u64, Byte)> {
    let mut rng = Rng(0x9e37_79b9_7f4a_7c15 ^ (t + 1));
    let runs = owned(t);
    let chunks: Vec<(u64, u64)> = runs.iter().copied().filter(|r| r.1 == CHUNK).collect();
    let blocks: Vec<(u64, u64)> = runs.iter().copied().filter(|r| r.1 == MIB).collect();
    // The model of every byte, of which this thread uses its own.
    let mut model: Vec<Byte> = start.iter().map(|&b| Byte::Is(b)).collect();
    let check = |d: &dyn VirtualDisk, model: &[Byte], off: u64, len: u64, what: &str| {
        let mut buf = vec![0u8; len as usize];
        d.read_at(&mut buf, off).unwrap();
        for (i, v) in buf.iter().enumerate() {
            let at = off + i as u64;
            let want = model[at as usize];
            assert!(
                want.allows(*v),
                "thread {t}, {what}: byte {at:#x} reads {v:#x}, the model says {want:?}"
            );
        }
    };
    for op in 0..OPS {
        let tag = ((t * 61 + op * 7) % 251) as u8 + 1;
        if op % 10 == 0 {
            // Every thread at once writes its first chunk of one sector,
            // still untouched by the random writes with high odds: the
            // copy-ups of that sector race.
            barrier.wait();
            let sector = (op / 10) * 13 % (SIZE / 2 / 512);
            let c = sector * 512 + t * CHUNK;
            let buf = vec![tag; CHUNK as usize];
            d.write_at(&buf, c).unwrap();
            for i in 0..CHUNK {
                model[(c + i) as usize] = Byte::Is(tag);
            }
            continue;
        }
        match rng.below(20) {
            // A write inside one of its chunks, at any alignment.
            0..=9 => {
                let (c, _) = chunks[rng.below(chunks.len() as u64) as usize];
                let a = rng.below(CHUNK);
                let len = 1 + rng.below(CHUNK - a);
                let buf: Vec<u8> = (0..len).map(|i| tag ^ (i as u8)).collect();
                d.write_at(&buf, c + a).unwrap();
                for (i, v) in buf.iter().enumerate() {
                    model[(c + a) as usize + i] = Byte::Is(*v);
                }
                check(&*d, &model, c, CHUNK, "read your write");
            }
            // A large write in one of its blocks.
            10..=13 => {
                let (b, _) = blocks[rng.below(blocks.len() as u64) as usize];
                let a = rng.below(MIB - 1);
                let len = 1 + rng.below((MIB - a).min(256 << 10));
                let buf = vec![tag; len as usize];
                d.write_at(&buf, b + a).unwrap();
                for i in 0..len {
                    model[(b + a + i) as usize] = Byte::Is(tag);
                }
                check(&*d, &model, b + a, len, "read your large write");
            }
            // Write zeroes (or discard) a sector-aligned range of a block.
            14 | 15 => {
                let (b, _) = blocks[rng.below(blocks.len() as u64) as usize];
                let a = rng.below(MIB / 512) * 512;
                let len = (1 + rng.below((MIB - a) / 512)) * 512;
                if discard && rng.below(2) == 0 {
                    d.discard(b + a, len).unwrap();
                    for i in 0..len {
                        let at = b + a + i;
                        let old = match model[at as usize] {
                            Byte::Is(x) | Byte::ZeroOr(x) => x,
                        };
                        model[at as usize] = Byte::ZeroOr(old);
                    }
                } else {
                    d.write_zeroes(b + a, len, rng.below(2) == 0).unwrap();
                    for i in 0..len {
                        model[(b + a + i) as usize] = Byte::Is(0);
                    }
                }
                check(&*d, &model, b + a, len, "zeroes");
            }
            // Read some other thread's chunk (racing with its writes).
            16..=18 => {
                let k = rng.below(SIZE / 2 / CHUNK);
                let mut buf = [0u8; CHUNK as usize];
                d.read_at(&mut buf, k * CHUNK).unwrap();
            }
            _ => d.flush().unwrap(),
        }
    }
    runs.iter()
        .flat_map(|&(o, l)| o..o + l)
        .map(|at| (at, model[at as usize]))
        .collect()
}

/// Run the threads on `d`, with a watchdog; the merged model.
fn stress(d: Arc<dyn VirtualDisk>, discard: bool, what: &str) -> Vec<(u64, Byte)> {
    let mut start = vec![0u8; SIZE as usize];
    d.read_at(&mut start, 0).unwrap();
    let t0 = Instant::now();
    let barrier = Arc::new(std::sync::Barrier::new(THREADS as usize));
    let handles: Vec<_> = (0..THREADS)
        .map(|t| {
            let d = d.clone();
            let start = start.clone();
            let barrier = barrier.clone();
            std::thread::spawn(move || work(d, t, discard, start, barrier))
        })
        .collect();
    while !handles.iter().all(|h| h.is_finished()) {
        assert!(
            t0.elapsed() < Duration::from_secs(180),
            "{what}: the threads did not finish in 180 s (a deadlock?)"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    let mut all = Vec::new();
    for h in handles {
        all.extend(h.join().unwrap());
    }
    eprintln!("{what}: {} ops in {:?}", THREADS * OPS, t0.elapsed());
    all
}

fn verify(d: &dyn VirtualDisk, model: &[(u64, Byte)], what: &str) {
    let mut all = vec![0u8; SIZE as usize];
    d.read_at(&mut all, 0).unwrap();
    assert_eq!(model.len() as u64, SIZE, "{what}: every byte has an owner");
    let bad: Vec<_> = model
        .iter()
        .filter(|(at, want)| !want.allows(all[*at as usize]))
        .take(5)
        .collect();
    assert!(bad.is_empty(), "{what}: lost updates at {bad:x?}");
}

fn one(path: &Path, kind: Kind, format: Format, parent: Option<&Path>, discard: bool) {
    let mut o = CreateOptions::new(kind);
    o.parent = parent.map(Path::to_path_buf);
    image::create(path, &o).unwrap().close().unwrap();
    let what = path.display().to_string();
    let img = image::open(path, &OpenOptions::new(format).writable()).unwrap();
    let model = stress(img.disk().clone(), discard, &what);
    verify(img.disk().as_ref(), &model, &what);
    img.close().unwrap();
    // After a close and a reopen, the same.
    let img = image::open(path, &OpenOptions::new(format)).unwrap();
    verify(img.disk().as_ref(), &model, &format!("{what} reopened"));
}

fn vhdx_kind() -> Kind {
    let mut v = vhdx::CreateOptions::new(SIZE);
    v.block_size = MIB as u32;
    Kind::Vhdx(v)
}

fn vhd_kind() -> Kind {
    let mut v = vhd::CreateOptions::new(SIZE);
    v.block_size = MIB as u32;
    Kind::Vhd(v)
}

/// A parent with a pattern, closed.
fn parent(path: &Path, kind: Kind, format: Format) {
    image::create(path, &CreateOptions::new(kind))
        .unwrap()
        .close()
        .unwrap();
    let img = image::open(path, &OpenOptions::new(format).writable()).unwrap();
    let p: Vec<u8> = (0..SIZE).map(|i| (i % 253) as u8 + 1).collect();
    img.disk().write_at(&p, 0).unwrap();
    img.close().unwrap();
}

#[test]
fn dynamic_vhdx() {
    let dir = tempfile::tempdir().unwrap();
    one(
        &dir.path().join("s.vhdx"),
        vhdx_kind(),
        Format::Vhdx,
        None,
        true,
    );
}

#[test]
fn dynamic_vhd() {
    let dir = tempfile::tempdir().unwrap();
    one(
        &dir.path().join("s.vhd"),
        vhd_kind(),
        Format::Vhd,
        None,
        true,
    );
}

#[test]
fn vhdx_chain() {
    let dir = tempfile::tempdir().unwrap();
    let base = dir.path().join("base.vhdx");
    parent(&base, vhdx_kind(), Format::Vhdx);
    let mut child = vhdx::CreateOptions::new(0);
    child.block_size = MIB as u32;
    one(
        &dir.path().join("child.avhdx"),
        Kind::Vhdx(child),
        Format::Vhdx,
        Some(&base),
        false,
    );
}

#[test]
fn vhd_chain() {
    let dir = tempfile::tempdir().unwrap();
    let base = dir.path().join("base.vhd");
    parent(&base, vhd_kind(), Format::Vhd);
    let mut child = vhd::CreateOptions::new(0);
    child.block_size = MIB as u32;
    one(
        &dir.path().join("child.avhd"),
        Kind::Vhd(child),
        Format::Vhd,
        Some(&base),
        false,
    );
}
