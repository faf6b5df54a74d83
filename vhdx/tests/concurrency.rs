//! Several threads reading and writing one disk must not corrupt it.
// Test data: sizes and offsets of small test disks (they fit in memory),
// block sizes and byte patterns.
#![allow(clippy::cast_possible_truncation)]

use disk::VirtualDisk;
use std::sync::Arc;
use vhdx::{CreateOptions, OpenOptions, Vhdx};

const MIB: u64 = 1 << 20;

#[test]
fn threads_writing_and_reading_one_disk() {
    let tmp = tempfile::tempdir().unwrap();
    let path = tmp.path().join("mt.vhdx");
    let mut o = CreateOptions::new(64 * MIB);
    o.block_size = MIB as u32;
    let d = Arc::new(Vhdx::create(&path, &o, true).unwrap());
    let threads = 8u64;
    let handles: Vec<_> = (0..threads)
        .map(|t| {
            let d = d.clone();
            std::thread::spawn(move || {
                // Interleaved 4 KiB pieces: every thread touches every block,
                // so allocations of the same block race.
                for i in 0..(64 * MIB / 4096 / threads) {
                    let page = i * threads + t;
                    let buf = vec![(page % 251) as u8 + 1; 4096];
                    d.write_at(&buf, page * 4096).unwrap();
                    let mut back = vec![0u8; 4096];
                    d.read_at(&mut back, page * 4096).unwrap();
                    assert_eq!(back, buf);
                    if i % 97 == 0 {
                        d.flush().unwrap();
                    }
                }
            })
        })
        .collect();
    for h in handles {
        h.join().unwrap();
    }
    Arc::try_unwrap(d).unwrap().close().unwrap();
    let d = Vhdx::open(&path, &OpenOptions::default()).unwrap();
    let mut all = vec![0u8; 64 * MIB as usize];
    d.read_at(&mut all, 0).unwrap();
    for (page, chunk) in all.chunks(4096).enumerate() {
        assert!(
            chunk.iter().all(|&b| b == (page as u64 % 251) as u8 + 1),
            "page {page} corrupted"
        );
    }
    // Exactly one block per MiB: no block allocated twice.
    assert_eq!(d.allocation_stats().unwrap().present_blocks, 64);
    let len = std::fs::metadata(&path).unwrap().len();
    assert!(
        len <= 4 * MIB + 64 * MIB + MIB,
        "file grew to {len}: blocks leaked"
    );
}

#[test]
fn huge_disk_opens_without_reading_whole_bat() {
    let tmp = tempfile::tempdir().unwrap();
    let path = tmp.path().join("huge.vhdx");
    let mut o = CreateOptions::new(64 << 40);
    o.block_size = MIB as u32;
    let d = Vhdx::create(&path, &o, true).unwrap();
    d.write_at(b"far away", (64 << 40) - 4096).unwrap();
    d.write_at(b"near", 0).unwrap();
    d.close().unwrap();
    let d = Vhdx::open(
        &path,
        &OpenOptions {
            bat_cache_pages: 4,
            ..Default::default()
        },
    )
    .unwrap();
    let mut buf = [0u8; 8];
    d.read_at(&mut buf, (64 << 40) - 4096).unwrap();
    assert_eq!(&buf, b"far away");
    for i in 0..64u64 {
        d.read_at(&mut buf, i * (1 << 40) + 12345).unwrap();
        assert_eq!(buf, [0; 8]);
    }
    d.read_at(&mut buf[..4], 0).unwrap();
    assert_eq!(&buf[..4], b"near");
}

/// Two threads writing different bytes of one sector of a differencing
/// disk that is still the parent's: both writes must survive. Each merges
/// its bytes with the sector's current contents (the copy-up); without a
/// lock both read the parent's bytes and the later write undoes the other.
#[test]
fn two_writers_copy_up_one_sector_and_neither_is_lost() {
    let tmp = tempfile::tempdir().unwrap();
    let base = tmp.path().join("base.vhdx");
    let mut o = CreateOptions::new(8 * MIB);
    o.block_size = MIB as u32;
    let p = Vhdx::create(&base, &o, false).unwrap();
    let parent_byte = 0x5a;
    p.write_at(&vec![parent_byte; 8 * MIB as usize], 0).unwrap();
    p.close().unwrap();
    let child = tmp.path().join("child.avhdx");
    let mut co = CreateOptions::new(0);
    co.block_size = MIB as u32;
    let d = Arc::new(
        Vhdx::create_differencing(&child, &base, &co, &OpenOptions::default(), false).unwrap(),
    );
    disk::testing::copy_up_race(d.clone(), 2000, parent_byte);
    Arc::try_unwrap(d).unwrap().close().unwrap();
}
