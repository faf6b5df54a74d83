//! Several threads writing one differencing VHD: two writes to different
//! bytes of one sector still the parent's must both survive (the copy-up
//! is serialized per block; see `disk::copy_up`), as must writes through a
//! chain view of the same disk.
// Test data: small disks whose sizes and offsets fit any integer type.
#![allow(clippy::cast_possible_truncation)]

use disk::testing::copy_up_race;
use disk::{ChainView, VirtualDisk};
use std::sync::Arc;
use vhd::{CreateOptions, Vhd};

const MIB: u64 = 1 << 20;
const PARENT: u8 = 0x5a;

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
    copy_up_race(d.clone(), 2000, PARENT);
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
    copy_up_race(view, 2000, PARENT);
    d.close().unwrap();
}
