//! blk_io.c on every kind of image the front door opens, the bytes checked
//! through the library afterwards.

use crate::common::*;
use image::{Format, Kind};
use vmm_core::test_payloads::{BLK_IO, SECTOR0};
use vmm_core::Outcome;

/// Run blk_io on one fresh image of `kind` and check it.
fn one(name: &str, kind: Kind, format: Format, given: Option<Format>) {
    if !can_run(BLK_IO) {
        return;
    }
    let dir = tmp();
    let p = file(&dir, name);
    make(&p, kind, None);
    let (r, out) = run_specs(BLK_IO, &[spec(&p, given, false)]);
    assert_eq!(r.outcome, Outcome::Exited(0), "{out}");
    assert!(out.contains("blk_io: ok"), "{out}");
    assert!(out.contains(&id_line(&p, format, 0)), "{out}");
    assert_eq!(r.devices[0].io_errors, 0, "{:?}", r.devices[0]);
    check_blk_io(&p, format, 0);
}

#[test]
fn dynamic_vhdx() {
    one("d.vhdx", vhdx(SIZE), Format::Vhdx, None);
}

#[test]
fn vhdx_with_4k_sectors() {
    let mut o = vhdx::CreateOptions::new(SIZE);
    o.logical_sector_size = 4096;
    o.physical_sector_size = 4096;
    one("4k.vhdx", Kind::Vhdx(o), Format::Vhdx, Some(Format::Vhdx));
}

#[test]
fn dynamic_vhd() {
    one("d.vhd", vhd(SIZE), Format::Vhd, None);
}

#[test]
fn raw_given_as_raw() {
    one(
        "d.img",
        Kind::Raw { size: SIZE },
        Format::Raw,
        Some(Format::Raw),
    );
}

#[test]
fn differencing_chain_writes_only_its_leaf() {
    if !can_run(BLK_IO) {
        return;
    }
    let dir = tmp();
    let base = file(&dir, "base.vhdx");
    let child = file(&dir, "child.avhdx");
    make(&base, vhdx(SIZE), None);
    make(&child, vhdx(0), Some(&base));
    let before = std::fs::read(&base).unwrap();
    let (r, out) = run_specs(BLK_IO, &[spec(&child, None, false)]);
    assert_eq!(r.outcome, Outcome::Exited(0), "{out}");
    // The host pattern came from the parent; the guest's writes went to
    // the child; the parent is byte for byte what it was.
    check_blk_io(&child, Format::Vhdx, 0);
    assert!(
        std::fs::read(&base).unwrap() == before,
        "the parent changed"
    );
    assert_eq!(read(&base, Format::Vhdx, 512, 512), vec![0u8; 512]);
}

#[test]
fn two_disks_at_once() {
    if !can_run(BLK_IO) {
        return;
    }
    let dir = tmp();
    let a = file(&dir, "a.vhdx");
    let b = file(&dir, "b.raw");
    make(&a, vhdx(SIZE), None);
    make(&b, Kind::Raw { size: SIZE }, None);
    let (r, out) = run_specs(
        BLK_IO,
        &[spec(&a, None, false), spec(&b, Some(Format::Raw), false)],
    );
    assert_eq!(r.outcome, Outcome::Exited(0), "{out}");
    assert!(out.contains("2 disks"), "{out}");
    assert!(out.contains(&id_line(&a, Format::Vhdx, 0)), "{out}");
    assert!(out.contains(&id_line(&b, Format::Raw, 1)), "{out}");
    check_blk_io(&a, Format::Vhdx, 0);
    check_blk_io(&b, Format::Raw, 1);
}

#[test]
fn read_only_disk_refuses_writes() {
    if !can_run(BLK_IO) {
        return;
    }
    let dir = tmp();
    let p = file(&dir, "ro.vhd");
    make(&p, vhd(SIZE), None);
    let before = std::fs::read(&p).unwrap();
    let (r, out) = run_specs(BLK_IO, &[spec(&p, None, true)]);
    assert_eq!(r.outcome, Outcome::Exited(0), "{out}");
    assert!(out.contains("(read-only)"), "{out}");
    assert!(
        std::fs::read(&p).unwrap() == before,
        "a read-only disk changed"
    );
}

#[test]
fn checkpoint_bundle_active_disk() {
    if !can_run(BLK_IO) {
        return;
    }
    let dir = tmp();
    let bdir = file(&dir, "vm");
    let b = checkpoint::Bundle::init(&bdir, checkpoint::Format::Vhdx, SIZE).unwrap();
    let active = b.active_path();
    drop(b);
    {
        let img = image::open(&active, &image::OpenOptions::new(Format::Vhdx).writable()).unwrap();
        img.disk()
            .write_at(
                &pattern_buf(HOST_SEED, HOST_SECTOR, HOST_COUNT),
                HOST_SECTOR * 512,
            )
            .unwrap();
        img.close().unwrap();
    }
    let (r, out) = run_specs(BLK_IO, &[spec(&bdir, None, false)]);
    assert_eq!(r.outcome, Outcome::Exited(0), "{out}");
    assert_eq!(r.devices[0].name, active.display().to_string());
    check_blk_io(&active, Format::Vhdx, 0);
}

#[test]
fn probed_raw_guards_its_first_sector() {
    if !can_run(SECTOR0) {
        return;
    }
    let dir = tmp();
    let p = file(&dir, "g.img");
    make(&p, Kind::Raw { size: SIZE }, None);
    // Probed: the write of sector 0 is refused (IOERR), the file unchanged.
    let (r, out) = run_specs(SECTOR0, &[spec(&p, None, false)]);
    assert_eq!(r.outcome, Outcome::Exited(1), "{out}");
    assert_eq!(r.devices[0].io_errors, 1);
    assert!(r.devices[0]
        .last_problem
        .as_deref()
        .unwrap()
        .contains("first sector"));
    assert_eq!(read(&p, Format::Raw, 0, 512), vec![0u8; 512]);
    // Given as raw: written.
    let (r, out) = run_specs(SECTOR0, &[spec(&p, Some(Format::Raw), false)]);
    assert_eq!(r.outcome, Outcome::Exited(0), "{out}");
    assert_eq!(read(&p, Format::Raw, 0, 512), pattern_buf(0x33, 0, 1));
}

#[test]
fn a_locked_image_is_refused_naming_the_holder() {
    let dir = tmp();
    let p = file(&dir, "l.vhdx");
    make(&p, vhdx(SIZE), None);
    let held = image::open(&p, &image::OpenOptions::new(Format::Vhdx).writable()).unwrap();
    let e = vmm_core::disks::open(&spec(&p, None, false), None)
        .err()
        .expect("refused");
    assert_eq!(
        e.kind(),
        vmm_core::ErrorKind::Disk(disk::ErrorKind::Locked),
        "{e}"
    );
    assert!(e.to_string().contains("l.vhdx"), "{e}");
    drop(held);
    let missing = vmm_core::disks::open(&spec(&file(&dir, "none.vhdx"), None, false), None);
    assert!(missing.err().unwrap().to_string().contains("none.vhdx"));
}
