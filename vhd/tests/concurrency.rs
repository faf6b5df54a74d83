//! Several threads writing one differencing VHD: two writes to different
//! bytes of one sector still the parent's must both survive (the copy-up
//! is serialized per block; see `disk::copy_up`), as must writes through a
//! chain view of the same disk.
// Test data: small disks whose sizes and offsets fit any integer type.
#![allow(clippy::cast_possible_truncation)]

use disk::{ChainView, VirtualDisk};
use std::sync::{Arc, Barrier};
use vhd::{CreateOptions, Vhd};

const MIB: u64 = 1 << 20;
const PARENT: u8 = 0x5a;

/// Where the `s`-th test sector lies: spread over the blocks.
fn sector_at(s: u64) -> u64 {
    (s * 7 % 8) * MIB + (s / 8) * 512 * 3
}

/// Two threads write bytes [0, 100) and [300, 400) of each test sector at
/// the same moment; every sector must end with both writes and the
/// parent's bytes around them.
fn race(d: Arc<dyn VirtualDisk>, sectors: u64) {
    let barrier = Arc::new(Barrier::new(2));
    let writer = |range: std::ops::Range<u64>, byte: u8| {
        let d = d.clone();
        let barrier = barrier.clone();
        std::thread::spawn(move || {
            let buf = vec![byte; (range.end - range.start) as usize];
            for s in 0..sectors {
                barrier.wait();
                d.write_at(&buf, sector_at(s) + range.start).unwrap();
            }
        })
    };
    let a = writer(0..100, 0xa1);
    let b = writer(300..400, 0xb2);
    a.join().unwrap();
    b.join().unwrap();
    let mut lost = Vec::new();
    for s in 0..sectors {
        let mut sector = [0u8; 512];
        d.read_at(&mut sector, sector_at(s)).unwrap();
        let ok = sector[..100].iter().all(|&x| x == 0xa1)
            && sector[100..300].iter().all(|&x| x == PARENT)
            && sector[300..400].iter().all(|&x| x == 0xb2)
            && sector[400..].iter().all(|&x| x == PARENT);
        if !ok {
            lost.push(s);
        }
    }
    assert!(
        lost.is_empty(),
        "{} of {sectors} sectors lost a write: {:?}",
        lost.len(),
        &lost[..lost.len().min(10)]
    );
}

fn parent_and_child(dir: &std::path::Path) -> std::path::PathBuf {
    let base = dir.join("base.vhd");
    let mut o = CreateOptions::new(8 * MIB);
    o.block_size = MIB as u32;
    let p = Vhd::create(&base, &o, false).unwrap();
    p.write_at(&vec![PARENT; 8 * MIB as usize], 0).unwrap();
    p.close().unwrap();
    let child = dir.join("child.vhd");
    let mut co = CreateOptions::new(0);
    co.block_size = MIB as u32;
    Vhd::create_differencing(&child, &base, &co, false)
        .unwrap()
        .close()
        .unwrap();
    child
}

#[test]
fn two_writers_copy_up_one_sector_and_neither_is_lost() {
    let tmp = tempfile::tempdir().unwrap();
    let child = parent_and_child(tmp.path());
    let d = Arc::new(
        Vhd::open(
            &child,
            &vhd::OpenOptions {
                writable: true,
                ..Default::default()
            },
        )
        .unwrap(),
    );
    race(d.clone(), 2000);
    d.close().unwrap();
}

#[test]
fn through_a_chain_view_too() {
    let tmp = tempfile::tempdir().unwrap();
    let child = parent_and_child(tmp.path());
    let d: Arc<dyn VirtualDisk> = Arc::new(
        Vhd::open(
            &child,
            &vhd::OpenOptions {
                writable: true,
                ..Default::default()
            },
        )
        .unwrap(),
    );
    let view: Arc<dyn VirtualDisk> = Arc::new(ChainView::new(d.clone()));
    race(view, 2000);
    d.close().unwrap();
}
