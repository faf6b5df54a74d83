//! Helpers shared by the checkpoint crate's integration tests.
#![allow(dead_code)]
// Test helpers: sizes of small test disks, in memory by construction.
#![allow(clippy::cast_possible_truncation)]

use checkpoint::disks::create_child;
use checkpoint::Format;
use disk::testing::pattern;
use disk::VirtualDisk;
use image::OpenOptions;
use std::path::Path;

pub const SIZE: u64 = 6 << 20;

pub fn read_all(path: &Path) -> Vec<u8> {
    let img = image::open(path, &OpenOptions::probing()).unwrap();
    let d = img.disk();
    let mut v = vec![0u8; d.virtual_size() as usize];
    d.read_at(&mut v, 0).unwrap();
    v
}

pub fn write(path: &Path, off: u64, data: &[u8]) {
    let img = image::open(path, &OpenOptions::probing().writable()).unwrap();
    img.disk().write_at(data, off).unwrap();
    img.disk().flush().unwrap();
}

/// Copy `src`'s files (the bundle's chain) to a fresh dir, truncating
/// nothing: used to restart from the same state per cut.
pub fn copy_dir(src: &Path, dst: &Path) {
    std::fs::create_dir_all(dst).unwrap();
    for e in std::fs::read_dir(src).unwrap() {
        let e = e.unwrap();
        std::fs::copy(e.path(), dst.join(e.file_name())).unwrap();
    }
}

/// A chain base ← mid ← top with data in every layer; returns the contents
/// of mid and top as read through the chain.
pub fn make_chain(dir: &Path, format: Format) -> (Vec<u8>, Vec<u8>) {
    let ext = |n: &str| {
        format!(
            "{n}.{}",
            if format == Format::Vhdx {
                "vhdx"
            } else {
                "vhd"
            }
        )
    };
    let base = dir.join(ext("base"));
    match format {
        Format::Vhdx => {
            let mut o = vhdx::CreateOptions::new(SIZE);
            o.block_size = 1 << 20;
            vhdx::Vhdx::create(&base, &o, false)
                .unwrap()
                .close()
                .unwrap()
        }
        Format::Vhd => vhd::Vhd::create(&base, &vhd::CreateOptions::new(SIZE), false)
            .unwrap()
            .close()
            .unwrap(),
    }
    write(&base, 0, &pattern(3 << 20, 1));
    let mid = dir.join(ext("mid"));
    create_child(format, &mid, &base, &disk::file_opener()).unwrap();
    write(&mid, 1 << 20, &pattern(1_500_000, 2));
    write(&mid, 4 << 20, &pattern(5000, 3));
    let top = dir.join(ext("top"));
    create_child(format, &top, &mid, &disk::file_opener()).unwrap();
    write(&top, 777, &pattern(70_000, 4));
    write(&top, (2 << 20) + 3, &pattern(1 << 20, 5));
    (read_all(&mid), read_all(&top))
}
