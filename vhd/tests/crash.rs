//! Crash test: record the backing file's writes and flushes during a
//! workload on a dynamic VHD, cut the stream at every point (dropping,
//! keeping or tearing the writes not yet covered by a flush), reopen, and
//! check that the image still opens read-write from its trailing footer and
//! that every write acknowledged by a completed flush reads back.

use disk::fault::RecordingStorage;
use disk::{MemStorage, VirtualDisk};
use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use vhd::{CreateOptions, FooterSource, OpenOptions, Vhd};

const PAGE: u64 = 4096;
const MIB: u64 = 1 << 20;

struct Write {
    start_op: usize,
    page: u64,
    data: Vec<u8>,
}

struct Flush {
    start_op: usize,
    done_op: usize,
}

fn fill(seed: u64) -> Vec<u8> {
    (0..PAGE)
        .map(|i| ((i * 31 + seed * 17) % 251) as u8 + 1)
        .collect()
}

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

fn check(img: Vec<u8>, writes: &[Write], flushes: &[Flush], cut: usize, what: &str) {
    let acked = flushes.iter().rev().find(|f| f.done_op <= cut);
    let ack_start = acked.map_or(0, |f| f.start_op);
    let mut required: BTreeMap<u64, &[u8]> = BTreeMap::new();
    let mut extras: BTreeMap<u64, Vec<&[u8]>> = BTreeMap::new();
    for w in writes {
        if acked.is_some() && w.start_op < ack_start {
            required.insert(w.page, &w.data);
        } else if w.start_op < cut {
            extras.entry(w.page).or_default().push(&w.data);
        }
    }
    let zero = vec![0u8; PAGE as usize];
    let verify = |d: &Vhd, stage: &str| {
        let pages: BTreeSet<u64> = required.keys().chain(extras.keys()).copied().collect();
        for p in pages {
            let mut got = vec![0u8; PAGE as usize];
            d.read_at(&mut got, p * PAGE).unwrap_or_else(|e| {
                panic!("{what} cut {cut} {stage}: read of page {p} failed: {e}")
            });
            let req: &[u8] = required.get(&p).copied().unwrap_or(&zero);
            // Unacknowledged writes may be torn at sector granularity (the
            // payload is only 512-byte aligned in a VHD): each sector holds
            // the acknowledged contents or one of the later writes'.
            for (i, sector) in got.chunks(512).enumerate() {
                let r = i * 512..(i + 1) * 512;
                let ok = sector == &req[r.clone()]
                    || extras
                        .get(&p)
                        .is_some_and(|v| v.iter().any(|x| sector == &x[r.clone()]));
                assert!(
                    ok,
                    "{what} cut {cut} {stage}: page {p} sector {i} lost an acknowledged write \
                     (or holds garbage)"
                );
            }
        }
    };
    let ro = Vhd::open_storage(
        Box::new(MemStorage::from_vec("crash-ro", img.clone())),
        &OpenOptions::default(),
    )
    .unwrap_or_else(|e| panic!("{what} cut {cut}: read-only open failed: {e}"));
    assert_eq!(
        ro.info().footer_source,
        FooterSource::End,
        "{what} cut {cut}: no valid footer at the end of the file"
    );
    verify(&ro, "read-only");
    drop(ro);
    // A writable open can keep writing: allocate a new block after whatever
    // the crash left at the end, then reopen and check everything.
    let st = Arc::new(MemStorage::from_vec("crash-rw", img));
    let rw = Vhd::open_storage(Box::new(st.clone()), &OpenOptions { writable: true })
        .unwrap_or_else(|e| panic!("{what} cut {cut}: writable open failed: {e}"));
    verify(&rw, "writable");
    let last = rw.virtual_size() - PAGE;
    let marker = vec![0xeeu8; PAGE as usize];
    rw.write_at(&marker, last).unwrap();
    rw.close().unwrap();
    let again = Vhd::open_storage(
        Box::new(MemStorage::from_vec("crash-again", st.to_vec())),
        &OpenOptions::default(),
    )
    .unwrap_or_else(|e| panic!("{what} cut {cut}: reopen after writing failed: {e}"));
    let mut got = vec![0u8; PAGE as usize];
    again.read_at(&mut got, last).unwrap();
    assert_eq!(got, marker, "{what} cut {cut}: write after recovery lost");
    verify(&again, "reopened");
}

fn run_workload(block: u32, size: u64, seed: u64) {
    let rec = Arc::new(RecordingStorage::new("rec", base_image(size, block)));
    let d = Vhd::open_storage(Box::new(rec.clone()), &OpenOptions { writable: true }).unwrap();
    let mut writes = Vec::new();
    let mut flushes = Vec::new();
    // Leave the last page alone: check() writes a marker there.
    let pages = d.virtual_size() / PAGE - 1;
    let mut x = seed | 1;
    for i in 0..48u64 {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        let page = if i % 5 == 4 && !writes.is_empty() {
            let w: &Write = &writes[(x as usize) % writes.len()];
            w.page
        } else {
            x % pages
        };
        let data = fill(i + seed);
        let start_op = rec.op_count();
        d.write_at(&data, page * PAGE).unwrap();
        writes.push(Write {
            start_op,
            page,
            data,
        });
        if i % 7 == 6 {
            let start_op = rec.op_count();
            d.flush().unwrap();
            flushes.push(Flush {
                start_op,
                done_op: rec.op_count(),
            });
        }
    }
    let start_op = rec.op_count();
    d.flush().unwrap();
    flushes.push(Flush {
        start_op,
        done_op: rec.op_count(),
    });
    std::mem::forget(d); // a crash: no close
    let total = rec.op_count();
    for cut in 0..=total {
        check(
            rec.crash_image(cut, |_| false),
            &writes,
            &flushes,
            cut,
            "drop-unflushed",
        );
        check(
            rec.crash_image(cut, |_| true),
            &writes,
            &flushes,
            cut,
            "keep-unflushed",
        );
        let mut h = seed ^ cut as u64;
        check(
            rec.crash_image(cut, |_| {
                h = h
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                h >> 63 == 1
            }),
            &writes,
            &flushes,
            cut,
            "torn",
        );
    }
}

#[test]
fn crash_at_every_point_keeps_flushed_writes_64k_blocks() {
    run_workload(64 * 1024, 8 * MIB, 0x1234_5678);
}

#[test]
fn crash_at_every_point_keeps_flushed_writes_2m_blocks() {
    run_workload(2 * MIB as u32, 24 * MIB, 0xdead_beef);
}
