//! The front door end to end: every format opened and created in one call,
//! chains, probing, and what a block device needs (identity, write_zeroes,
//! discard granularity, vectored I/O, close through `&self`).
// Test data: sizes and offsets of small test disks (they fit in memory),
// block sizes and byte patterns.
#![allow(clippy::cast_possible_truncation)]

use disk::{ErrorKind, Mapping, VirtualDisk};
use image::{CreateOptions, Format, Kind, OpenOptions};
use std::path::{Path, PathBuf};

const MIB: u64 = 1 << 20;

fn kind(format: Format, size: u64) -> Kind {
    match format {
        Format::Raw => Kind::Raw { size },
        Format::Vhdx => {
            let mut o = vhdx::CreateOptions::new(size);
            o.block_size = MIB as u32;
            Kind::Vhdx(o)
        }
        Format::Vhd => {
            let mut o = vhd::CreateOptions::new(size);
            o.block_size = MIB as u32;
            Kind::Vhd(o)
        }
    }
}

fn ext(format: Format) -> &'static str {
    match format {
        Format::Raw => "raw",
        Format::Vhdx => "vhdx",
        Format::Vhd => "vhd",
    }
}

/// A new image of `format` in `dir` (8 MiB; VHD rounds up to CHS).
fn make(dir: &Path, name: &str, format: Format) -> PathBuf {
    let p = dir.join(format!("{name}.{}", ext(format)));
    image::create(&p, &CreateOptions::new(kind(format, 8 * MIB)))
        .unwrap()
        .close()
        .unwrap();
    p
}

fn rw(format: Format) -> OpenOptions {
    OpenOptions::new(format).writable()
}

fn read(d: &dyn VirtualDisk, off: u64, len: usize) -> Vec<u8> {
    let mut v = vec![0u8; len];
    d.read_at(&mut v, off).unwrap();
    v
}

#[test]
fn every_format_opens_probed_or_given() {
    let dir = tempfile::tempdir().unwrap();
    for f in [Format::Raw, Format::Vhdx, Format::Vhd] {
        let p = make(dir.path(), "a", f);
        let img = image::open(&p, &rw(f)).unwrap();
        assert_eq!((img.format(), img.probed()), (f, false));
        img.disk().write_at(b"front door", 3 * MIB + 5).unwrap();
        img.close().unwrap();
        let img = image::open(&p, &OpenOptions::probing()).unwrap();
        assert_eq!((img.format(), img.probed()), (f, true), "{p:?}");
        assert_eq!(read(&**img.disk(), 3 * MIB + 5, 10), b"front door");
        assert!(img.disk().virtual_size() >= 8 * MIB);
        assert_eq!(img.vhdx().is_some(), f == Format::Vhdx);
        assert_eq!(img.vhd().is_some(), f == Format::Vhd);
    }
}

#[test]
fn a_chain_opens_as_one_disk_and_relinks() {
    let dir = tempfile::tempdir().unwrap();
    for f in [Format::Vhdx, Format::Vhd] {
        let base = make(dir.path(), "base", f);
        let img = image::open(&base, &rw(f)).unwrap();
        img.disk().write_at(&[1; 4096], 0).unwrap();
        img.close().unwrap();
        let mid = dir.path().join(format!("mid.{}", ext(f)));
        let top = dir.path().join(format!("top.{}", ext(f)));
        for (child, parent) in [(&mid, &base), (&top, &mid)] {
            let o = CreateOptions {
                parent: Some(parent.clone()),
                ..CreateOptions::new(kind(f, 0))
            };
            if child == &mid {
                image::create(child, &o).unwrap().close().unwrap();
            } else {
                // In O(1): from the parent's headers alone, closed.
                image::create_closed(child, &o).unwrap();
            }
        }
        let img = image::open(&top, &rw(f)).unwrap();
        img.disk().write_at(&[3; 512], 8192).unwrap();
        // The disk is the whole chain; the driver is the top layer alone.
        assert_eq!(read(&**img.disk(), 0, 2), [1, 1]);
        let top_layer = img.driver().disk();
        assert!(matches!(
            top_layer.map(8192, 512).unwrap().mapping,
            Mapping::Data(_)
        ));
        assert_eq!(top_layer.map(0, 512).unwrap().mapping, Mapping::Parent);
        assert!(top_layer.parent().is_some());
        drop(top_layer);
        img.close().unwrap();
        let files = image::chain::chain_files(&top, &OpenOptions::probing()).unwrap();
        assert_eq!(files, vec![top.clone(), mid.clone(), base.clone()]);
        // Relink top straight onto base (it reads the same: mid is empty).
        image::chain::set_parent(&top, &base, true, &OpenOptions::new(f)).unwrap();
        let files = image::chain::chain_files(&top, &OpenOptions::new(f)).unwrap();
        assert_eq!(files, vec![top.clone(), base.clone()]);
        let img = image::open(&top, &OpenOptions::new(f)).unwrap();
        assert_eq!(read(&**img.disk(), 0, 2), [1, 1]);
        assert_eq!(read(&**img.disk(), 8192, 2), [3, 3]);
    }
}

#[test]
fn raw_cannot_be_a_child_and_formats_must_match() {
    let dir = tempfile::tempdir().unwrap();
    let base = make(dir.path(), "b", Format::Vhdx);
    let o = CreateOptions {
        parent: Some(base.clone()),
        ..CreateOptions::new(Kind::Raw { size: 0 })
    };
    let e = image::create(dir.path().join("c.raw"), &o).err().unwrap();
    assert_eq!(e.kind(), ErrorKind::InvalidInput);
    assert!(e
        .to_string()
        .contains("c.raw: a raw image cannot be a differencing disk"));
    let o = CreateOptions {
        parent: Some(base),
        ..CreateOptions::new(kind(Format::Vhd, 0))
    };
    assert!(image::create(dir.path().join("c.vhd"), &o).is_err());
    // No overwrite unless asked; asked, a file in use is refused untouched.
    let p = make(dir.path(), "x", Format::Raw);
    let again = CreateOptions::new(Kind::Raw { size: MIB });
    assert!(image::create(&p, &again).is_err());
    let held = image::open(&p, &rw(Format::Raw)).unwrap();
    let o = CreateOptions {
        overwrite: true,
        ..again
    };
    let e = image::create(&p, &o).err().unwrap();
    assert_eq!(e.kind(), ErrorKind::Locked);
    assert_eq!(std::fs::metadata(&p).unwrap().len(), 8 * MIB);
    drop(held);
    image::create(&p, &o).unwrap();
    assert_eq!(std::fs::metadata(&p).unwrap().len(), MIB);
}

#[test]
fn identity_is_stable_and_per_image() {
    let dir = tempfile::tempdir().unwrap();
    for f in [Format::Raw, Format::Vhdx, Format::Vhd] {
        let a = make(dir.path(), "id-a", f);
        let b = make(dir.path(), "id-b", f);
        let id = |p: &Path| {
            image::open(p, &OpenOptions::new(f))
                .unwrap()
                .disk()
                .disk_id()
                .unwrap()
        };
        assert_eq!(id(&a), id(&a), "{f}: the same image, the same id");
        assert_ne!(id(&a), id(&b), "{f}: two images, two ids");
        let img = image::open(&a, &OpenOptions::new(f)).unwrap();
        match f {
            Format::Vhdx => assert_eq!(id(&a), img.vhdx().unwrap().info().metadata.virtual_disk_id),
            Format::Vhd => assert_eq!(id(&a), img.vhd().unwrap().info().footer.unique_id),
            Format::Raw => assert_eq!(id(&a).get_version_num(), 8),
        }
    }
    // A chain's identity is its top layer's.
    let base = make(dir.path(), "cb", Format::Vhdx);
    let child = dir.path().join("cc.avhdx");
    let o = CreateOptions {
        parent: Some(base.clone()),
        ..CreateOptions::new(kind(Format::Vhdx, 0))
    };
    image::create(&child, &o).unwrap().close().unwrap();
    let img = image::open(&child, &OpenOptions::new(Format::Vhdx)).unwrap();
    assert_eq!(
        img.disk().disk_id(),
        Some(img.vhdx().unwrap().info().metadata.virtual_disk_id)
    );
}

#[test]
fn write_zeroes_reads_zeros_and_unmaps_whole_blocks() {
    let dir = tempfile::tempdir().unwrap();
    for f in [Format::Raw, Format::Vhdx, Format::Vhd] {
        for unmap in [false, true] {
            let p = make(dir.path(), &format!("z{unmap}"), f);
            let img = image::open(&p, &rw(f)).unwrap();
            let d = img.disk();
            d.write_at(&vec![0xAA; 6 * MIB as usize], 0).unwrap();
            // From the middle of block 1 to the middle of block 4.
            let (off, len) = (MIB + 4096, 3 * MIB);
            d.write_zeroes(off, len, unmap).unwrap();
            d.flush().unwrap();
            let all = read(&**d, 0, 6 * MIB as usize);
            assert!(
                all[..off as usize].iter().all(|&b| b == 0xAA),
                "{f} {unmap}"
            );
            assert!(
                all[off as usize..(off + len) as usize]
                    .iter()
                    .all(|&b| b == 0),
                "{f} {unmap}"
            );
            assert!(all[(off + len) as usize..].iter().all(|&b| b == 0xAA));
            // Whole blocks 2 and 3 are stated as zeros where the format can.
            let m = img.driver().disk().map(2 * MIB, MIB).unwrap().mapping;
            match (f, unmap) {
                (Format::Vhdx, _) => assert_eq!(m, Mapping::Zero, "{unmap}"),
                (Format::Vhd, true) => assert_eq!(m, Mapping::Unallocated),
                _ => assert!(matches!(m, Mapping::Data(_)), "{f} {unmap}: {m:?}"),
            }
            let g = img.disk().discard_granularity();
            assert_eq!(g, if f == Format::Raw { 0 } else { MIB }, "{f}");
            img.close().unwrap();
            // Durable, and the image is consistent.
            let img = image::open(&p, &OpenOptions::new(f)).unwrap();
            assert!(read(&**img.disk(), 2 * MIB, MIB as usize)
                .iter()
                .all(|&b| b == 0));
            drop(img);
            let report = match f {
                Format::Vhdx => Some(vhdx::check::check_file(&p, &Default::default()).unwrap()),
                Format::Vhd => Some(vhd::check::check_file(&p, &Default::default()).unwrap()),
                Format::Raw => None,
            };
            if let Some(r) = report {
                assert!(r.corruptions == 0, "{f} {unmap}: {:?}", r.problems);
            }
        }
    }
}

#[test]
fn write_zeroes_in_a_differencing_disk_hides_the_parent() {
    let dir = tempfile::tempdir().unwrap();
    for f in [Format::Vhdx, Format::Vhd] {
        let base = make(dir.path(), "zb", f);
        let img = image::open(&base, &rw(f)).unwrap();
        img.disk().write_at(&vec![7; 4 * MIB as usize], 0).unwrap();
        img.close().unwrap();
        let child = dir.path().join(format!("zc.{}", ext(f)));
        let o = CreateOptions {
            parent: Some(base.clone()),
            ..CreateOptions::new(kind(f, 0))
        };
        image::create(&child, &o).unwrap().close().unwrap();
        let img = image::open(&child, &rw(f)).unwrap();
        img.disk().write_zeroes(512, 3 * MIB, true).unwrap();
        img.close().unwrap();
        let img = image::open(&child, &OpenOptions::new(f)).unwrap();
        let all = read(&**img.disk(), 0, 4 * MIB as usize);
        assert!(all[..512].iter().all(|&b| b == 7), "{f}");
        assert!(
            all[512..3 * MIB as usize + 512].iter().all(|&b| b == 0),
            "{f}"
        );
        assert!(all[3 * MIB as usize + 512..].iter().all(|&b| b == 7), "{f}");
    }
}

#[test]
fn vectored_io_is_the_same_as_contiguous() {
    let dir = tempfile::tempdir().unwrap();
    for f in [Format::Raw, Format::Vhdx, Format::Vhd] {
        let p = make(dir.path(), "v", f);
        let img = image::open(&p, &rw(f)).unwrap();
        let d = img.disk();
        let data: Vec<u8> = (0..3 * MIB as usize + 700)
            .map(|i| (i % 253) as u8)
            .collect();
        let (a, rest) = data.split_at(1000);
        let (b, c) = rest.split_at(2 * MIB as usize);
        d.write_vectored_at(&[a, b, c], MIB - 300).unwrap();
        assert_eq!(read(&**d, MIB - 300, data.len()), data, "{f}");
        let mut x = vec![0u8; 17];
        let mut y = vec![0u8; MIB as usize];
        let mut z = vec![0u8; data.len() - 17 - MIB as usize];
        d.read_vectored_at(&mut [&mut x, &mut y, &mut z], MIB - 300)
            .unwrap();
        assert_eq!([x, y, z].concat(), data, "{f}");
        // The range of all buffers is checked before any I/O.
        let size = d.virtual_size();
        let e = d.write_vectored_at(&[b"ok", b"past the end"], size - 4);
        assert_eq!(e.unwrap_err().kind(), ErrorKind::InvalidInput);
        assert_eq!(read(&**d, size - 4, 2), [0, 0], "{f}: nothing written");
    }
}

#[test]
fn close_through_a_shared_disk_is_idempotent() {
    let dir = tempfile::tempdir().unwrap();
    for f in [Format::Vhdx, Format::Vhd] {
        let p = make(dir.path(), "c", f);
        let img = image::open(&p, &rw(f)).unwrap();
        let shared = img.disk().clone();
        shared.write_at(b"x", 0).unwrap();
        shared.close().unwrap();
        shared.close().unwrap();
        assert!(shared.write_at(b"y", 0).is_err(), "{f}: closed");
        drop((img, shared));
        let img = image::open(&p, &OpenOptions::new(f)).unwrap();
        assert_eq!(read(&**img.disk(), 0, 1), b"x");
        if let Some(v) = img.vhdx() {
            assert!(
                v.info().header.log_guid.is_nil(),
                "closed cleanly: empty log"
            );
        }
    }
}

#[test]
fn probing_refuses_a_damaged_image_by_its_name() {
    let dir = tempfile::tempdir().unwrap();
    let p = make(dir.path(), "d", Format::Vhdx);
    let f = std::fs::OpenOptions::new().write(true).open(&p).unwrap();
    std::os::unix::fs::FileExt::write_all_at(&f, &[0; 8], 0).unwrap();
    let e = image::open(&p, &OpenOptions::probing()).err().unwrap();
    assert_eq!(e.kind(), ErrorKind::Corrupt);
    assert!(e.to_string().contains("the name says VHDX"), "{e}");
    // Given as raw, it opens (the caller's decision).
    image::open(&p, &OpenOptions::new(Format::Raw)).unwrap();
}
