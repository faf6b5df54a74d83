//! `Vhd::compact`: dynamic disks (zero blocks freed, the last blocks moved
//! into the holes, the file cut), interop with qemu-img, differencing disks
//! (freed only where reads do not change; the parent untouched), a power cut
//! at every write, and the refusals.

// Test images and buffers are small: their offsets and sizes fit any integer type.
#![allow(clippy::cast_possible_truncation)]

mod common;
use common::*;
use disk::check::CheckOptions;
use disk::fault::{Op, RecordingStorage};
use disk::testing::crash::for_each_crash;
use disk::{CompactReport, ErrorKind, Mapping, MemStorage, Storage, VirtualDisk};
use std::process::Command;
use std::sync::Arc;
use vhd::{CreateOptions, FooterSource, OpenOptions, ParentLink, Vhd};

const BLOCK: u64 = 64 * 1024;
/// A 64 KiB block in the file: its sector bitmap (one sector) and data.
const SLOT: u64 = 512 + BLOCK;

fn rw() -> OpenOptions {
    OpenOptions {
        writable: true,
        ..OpenOptions::default()
    }
}

fn opts(size: u64) -> CreateOptions {
    let mut o = CreateOptions::new(size);
    o.block_size = BLOCK as u32;
    o
}

/// Compact `d`, checking the progress calls: a fixed total, `done` never
/// going back, and ending at the total.
fn compact(d: &mut Vhd) -> CompactReport {
    let mut calls: Vec<disk::Step> = Vec::new();
    let r = d.compact(&mut |s| calls.push(s)).unwrap();
    let total = calls.first().expect("progress was called").total;
    assert!(calls.iter().all(|s| s.total == total), "{calls:?}");
    assert!(
        calls.windows(2).all(|w| w[0].done <= w[1].done),
        "{calls:?}"
    );
    assert!(
        calls.windows(2).all(|w| w[0].copied <= w[1].copied),
        "{calls:?}"
    );
    assert_eq!(calls.last().unwrap().done, total, "{calls:?}");
    // Bytes copied: each block moved, its sector bitmap (whole sectors)
    // and its data.
    let block = d.info().block_size().map_or(0, u64::from);
    let bitmap = (block / 512).div_ceil(8).next_multiple_of(512);
    assert_eq!(
        calls.last().unwrap().copied,
        r.blocks_moved * (bitmap + block),
        "{r:?}"
    );
    r
}

fn check_mem(bytes: Vec<u8>, check_parent: bool) -> disk::check::CheckReport {
    let st = MemStorage::from_vec("check.vhd", bytes);
    vhd::check::check(
        &st,
        &CheckOptions {
            check_parent,
            ..CheckOptions::default()
        },
    )
    .unwrap()
}

fn assert_clean(r: &disk::check::CheckReport, what: &str) {
    assert!(
        r.is_clean(),
        "{what}: check found {:?}",
        r.problems
            .iter()
            .map(ToString::to_string)
            .collect::<Vec<_>>()
    );
}

fn open_mem(bytes: Vec<u8>) -> Vhd {
    Vhd::open_storage(
        Box::new(MemStorage::from_vec("img.vhd", bytes)),
        &OpenOptions::default(),
    )
    .unwrap()
}

/// The writes of the dynamic tests, in allocation order (so in file
/// order): `(block, zeros, offset in the block, length)`. Blocks 10, 20 and
/// 30 are written with zeros only (freed); the others hold data, block 12
/// a single non-zero byte at its very end. Freeing leaves holes at file
/// slots 0, 2 and 5; block 50 (slot 6) moves to slot 0 and block 12 (slot
/// 4) to slot 2, then block 7 (slot 3) has no hole below it.
const MIX: [(u64, bool, u64, u64); 7] = [
    (10, true, 0, BLOCK),
    (3, false, 100, 1000),
    (20, true, 8192, 4096),
    (7, false, 0, BLOCK),
    (12, false, BLOCK - 1, 1),
    (30, true, 512, 40_000),
    (50, false, 333, 20_000),
];

fn write_mix(d: &dyn VirtualDisk) {
    for (i, &(b, zeros, at, len)) in MIX.iter().enumerate() {
        let data = if zeros {
            vec![0u8; len as usize]
        } else {
            pattern(len as usize, i as u64 + 1)
        };
        d.write_at(&data, b * BLOCK + at).unwrap();
    }
}

/// A 4 MiB dynamic image with 64 KiB blocks written with [`MIX`].
fn mix_image() -> Vec<u8> {
    let st = Arc::new(MemStorage::new("mix.vhd"));
    let d = Vhd::create_on(Box::new(st.clone()), &opts(4 * MIB)).unwrap();
    write_mix(&d);
    d.close().unwrap();
    st.to_vec()
}

#[test]
fn dynamic_frees_zero_blocks_moves_and_cuts() {
    let st = Arc::new(MemStorage::new("dyn.vhd"));
    let d = Vhd::create_on(Box::new(st.clone()), &opts(4 * MIB)).unwrap();
    write_mix(&d);
    // A discarded block at the end of the file: unallocated, its space a
    // leak that the next writable open reclaims.
    d.write_at(&pattern(BLOCK as usize, 77), 40 * BLOCK)
        .unwrap();
    d.discard(40 * BLOCK, BLOCK).unwrap();
    d.close().unwrap();
    let before = st.to_vec();
    let model = read_all(&open_mem(before.clone()));
    assert!(before.len() as u64 >= 8 * SLOT);

    let st = Arc::new(MemStorage::from_vec("dyn.vhd", before.clone()));
    let mut d = Vhd::open_storage(Box::new(st.clone()), &rw()).unwrap();
    // The writable open gave back the discarded block's space.
    assert_eq!(st.len().unwrap(), before.len() as u64 - SLOT);
    let r = compact(&mut d);
    assert_eq!(r.blocks_freed, 3, "{r:?}");
    assert_eq!(r.blocks_moved, 2, "{r:?}");
    assert_eq!(r.old_file_size, before.len() as u64 - SLOT);
    // Three freed blocks.
    assert_eq!(r.new_file_size, r.old_file_size - 3 * SLOT, "{r:?}");
    assert_eq!(st.len().unwrap(), r.new_file_size);
    assert_eq!(r.reclaimed(), 3 * SLOT);
    assert_eq!(d.info().allocated_blocks, 4);
    assert_eq!(d.info().file_size, r.new_file_size);
    assert_same(&read_all(&d), &model, "open image after compact");
    for b in [10, 20, 30] {
        assert_eq!(
            d.map(b * BLOCK, BLOCK).unwrap().mapping,
            Mapping::Unallocated,
            "block {b}"
        );
    }
    // Block 50 now lies right after the BAT (slot 0), block 12 at slot 2.
    let first = match d.map(50 * BLOCK, 512).unwrap().mapping {
        Mapping::Data(o) => o.0,
        m => panic!("block 50 maps to {m:?}"),
    };
    assert_eq!(first, 2048 + 512, "block 50's data");
    assert_eq!(
        d.map(12 * BLOCK, 512).unwrap().mapping,
        Mapping::Data(disk::FileOffset(2048 + 2 * SLOT + 512))
    );
    let after = st.to_vec();
    assert_clean(&check_mem(after.clone(), true), "after compact");
    assert_eq!(&after[..512], &after[after.len() - 512..], "footer copies");
    assert_eq!(&after[..512], &before[..512], "the footer changed");
    assert_same(&read_all(&open_mem(after.clone())), &model, "reopened");

    // Compacting again finds nothing to do.
    let r2 = compact(&mut d);
    assert_eq!(
        (r2.blocks_freed, r2.blocks_moved, r2.new_file_size),
        (0, 0, r.new_file_size)
    );

    // Still writable: new blocks go at the new end of the file.
    let mut model = model;
    let p = pattern(3 * BLOCK as usize + 100, 9);
    let at = 60 * BLOCK - 50;
    d.write_at(&p, at).unwrap();
    model[at as usize..at as usize + p.len()].copy_from_slice(&p);
    d.close().unwrap();
    let grown = st.to_vec();
    // Blocks 59 to 63, allocated from the new end.
    assert_eq!(grown.len() as u64, r.new_file_size + 5 * SLOT);
    assert_clean(&check_mem(grown.clone(), true), "after writing");
    assert_same(&read_all(&open_mem(grown)), &model, "reopened after write");
}

#[test]
fn nothing_to_do_and_empty_disk() {
    // No block allocated: nothing changes.
    let st = Arc::new(MemStorage::new("empty.vhd"));
    Vhd::create_on(Box::new(st.clone()), &opts(2 * MIB))
        .unwrap()
        .close()
        .unwrap();
    let before = st.to_vec();
    let mut d = Vhd::open_storage(Box::new(st.clone()), &rw()).unwrap();
    let r = compact(&mut d);
    assert_eq!(
        r,
        CompactReport {
            blocks_freed: 0,
            blocks_moved: 0,
            old_file_size: before.len() as u64,
            new_file_size: before.len() as u64,
        }
    );
    drop(d);
    assert_eq!(st.to_vec(), before);
    // Only zero blocks: all freed, the file back to its empty size.
    let st = Arc::new(MemStorage::from_vec("zeros.vhd", before.clone()));
    let mut d = Vhd::open_storage(Box::new(st.clone()), &rw()).unwrap();
    d.write_at(&vec![0u8; 3 * BLOCK as usize], BLOCK).unwrap();
    let r = compact(&mut d);
    assert_eq!((r.blocks_freed, r.blocks_moved), (3, 0));
    assert_eq!(r.new_file_size, before.len() as u64);
    assert!(read_all(&d).iter().all(|&b| b == 0));
    d.close().unwrap();
    assert_clean(&check_mem(st.to_vec(), true), "zeros");
}

/// A dynamic VHD made by qemu-img, written by qemu-io (data and zeros);
/// after compacting, qemu-img compare finds it identical to a raw copy made
/// before, and qemu-img info still reads it.
#[test]
fn qemu_made_image_compacts_and_qemu_agrees() {
    if !have("qemu-img") || !have("qemu-io") {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let img = tmp.path().join("q.vhd");
    run(Command::new("qemu-img")
        .args(["create", "-f", "vpc", "-o", "subformat=dynamic"])
        .arg(&img)
        .arg("64M"));
    let size = qemu_virtual_size(&img, "vpc");
    // qemu's blocks are 2 MiB: blocks 2, 10 and 11 get only zeros.
    for cmd in [
        "write -P 0 4M 2M",
        "write -P 0x5a 0 1M",
        "write -P 0 20M 4M",
        "write -P 0x11 10M 64k",
        "write -P 0x22 40M 3M",
        "write -P 0x33 62M 512",
    ] {
        run(Command::new("qemu-io")
            .args(["-f", "vpc", "-c", cmd])
            .arg(&img));
    }
    let raw = tmp.path().join("before.raw");
    run(Command::new("qemu-img")
        .args(["convert", "-f", "vpc", "-O", "raw"])
        .arg(&img)
        .arg(&raw));
    let old_len = std::fs::metadata(&img).unwrap().len();
    let mut d = Vhd::open(&img, &rw()).unwrap();
    assert_eq!(d.info().allocated_blocks, 8);
    let r = compact(&mut d);
    d.close().unwrap();
    assert_eq!(r.blocks_freed, 3, "{r:?}");
    assert!(r.blocks_moved >= 1, "{r:?}");
    let slot = 2 * MIB + 512;
    assert_eq!(r.old_file_size, old_len);
    assert_eq!(r.new_file_size, old_len - 3 * slot, "{r:?}");
    assert_eq!(std::fs::metadata(&img).unwrap().len(), r.new_file_size);
    assert_eq!(qemu_virtual_size(&img, "vpc"), size);
    if let Err(e) = qemu_compare(&img, "vpc", &raw, "raw") {
        panic!("qemu-img compare after compacting: {e}");
    }
    let report = vhd::check::check_file(&img, &CheckOptions::default()).unwrap();
    assert_clean(&report, "qemu image after compact");
    let want = std::fs::read(&raw).unwrap();
    assert_same(
        &read_all(&Vhd::open(&img, &OpenOptions::default()).unwrap()),
        &want,
        "our read after compacting",
    );
}

// ---- Differencing disks. ----

/// The child writes, in allocation order: `(block, what, offset in the
/// block, length)`, over a parent whose first MiB (blocks 0..16) holds
/// data and the rest zeros.
#[derive(Clone, Copy)]
enum Fill {
    /// Zeros.
    Zeros,
    /// The parent's own bytes at that place.
    Parent,
    /// New data.
    Data,
}

const DIFF: [(u64, Fill, u64, u64); 6] = [
    (40, Fill::Zeros, 0, BLOCK),  // over parent zeros: freed
    (2, Fill::Zeros, 0, 4096),    // over parent data: kept
    (5, Fill::Parent, 512, 8192), // the parent's bytes: freed
    (50, Fill::Data, 1000, 3000), // kept
    (45, Fill::Data, 0, 4096),    // its bitmap is cleared below: freed
    (60, Fill::Data, 0, BLOCK),   // kept, moved
];

fn parent_model(size: u64) -> Vec<u8> {
    let mut m = vec![0u8; size as usize];
    m[..MIB as usize].copy_from_slice(&pattern(MIB as usize, 4242));
    m
}

fn write_diff(d: &dyn VirtualDisk, parent: &[u8]) {
    for (i, &(b, fill, at, len)) in DIFF.iter().enumerate() {
        let off = (b * BLOCK + at) as usize;
        let data = match fill {
            Fill::Zeros => vec![0u8; len as usize],
            Fill::Parent => parent[off..off + len as usize].to_vec(),
            Fill::Data => pattern(len as usize, 100 + i as u64),
        };
        d.write_at(&data, off as u64).unwrap();
    }
}

/// Clear the sector bitmap of `block` in a VHD's bytes (a block with no
/// sector present, as a tool that allocates before writing could leave).
fn clear_bitmap(bytes: &mut [u8], block: u64) {
    let info = open_info(bytes);
    let h = info.header.unwrap();
    let at = (h.table_offset + block * 4) as usize;
    let e = u32::from_be_bytes(bytes[at..at + 4].try_into().unwrap()) as usize * 512;
    assert_ne!(e as u64, 0xffff_ffffu64 * 512);
    bytes[e..e + 512].fill(0);
}

fn open_info(bytes: &[u8]) -> vhd::Info {
    let tmp = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(tmp.path(), bytes).unwrap();
    Vhd::inspect(tmp.path()).unwrap()
}

#[test]
fn differencing_frees_only_blocks_that_read_the_same() {
    let tmp = tempfile::tempdir().unwrap();
    let base = tmp.path().join("base.vhd");
    let child = tmp.path().join("child.vhd");
    let p = Vhd::create(&base, &CreateOptions::new(4 * MIB), false).unwrap();
    let pmodel = parent_model(p.virtual_size());
    p.write_at(&pmodel[..MIB as usize], 0).unwrap();
    p.close().unwrap();
    let mut o = CreateOptions::new(0);
    o.block_size = BLOCK as u32;
    let c = Vhd::create_differencing(&child, &base, &o, false).unwrap();
    write_diff(&c, &pmodel);
    c.close().unwrap();
    let mut bytes = std::fs::read(&child).unwrap();
    clear_bitmap(&mut bytes, 45);
    std::fs::write(&child, &bytes).unwrap();
    let base_bytes = std::fs::read(&base).unwrap();

    let mut d = Vhd::open(&child, &rw()).unwrap();
    let model = read_all(&d);
    // Block 2 reads zeros where the parent has data.
    assert!(model[2 * BLOCK as usize..][..4096].iter().all(|&b| b == 0));
    assert_ne!(&model[..4096], &[0u8; 4096][..]);
    let r = compact(&mut d);
    assert_eq!(r.blocks_freed, 3, "{r:?}");
    assert_eq!(r.blocks_moved, 2, "{r:?}");
    assert_eq!(r.new_file_size, r.old_file_size - 3 * SLOT, "{r:?}");
    assert_same(&read_all(&d), &model, "after compact");
    for b in [40, 5, 45] {
        assert_eq!(
            d.map(b * BLOCK, BLOCK).unwrap().mapping,
            Mapping::Parent,
            "block {b}"
        );
    }
    for (b, at) in [(2, 0), (50, 1000), (60, 0)] {
        assert!(
            matches!(
                d.map(b * BLOCK + at, 512).unwrap().mapping,
                Mapping::Data(_)
            ),
            "block {b} was freed"
        );
    }
    // Still writable.
    let mut model = model;
    d.write_at(b"after", 33 * BLOCK + 7).unwrap();
    model[(33 * BLOCK + 7) as usize..][..5].copy_from_slice(b"after");
    d.close().unwrap();
    assert_eq!(std::fs::read(&base).unwrap(), base_bytes, "parent changed");
    let d = Vhd::open(&child, &OpenOptions::default()).unwrap();
    assert_same(&read_all(&d), &model, "reopened");
    drop(d);
    let report = vhd::check::check_file(&child, &CheckOptions::default()).unwrap();
    assert_clean(&report, "child after compact");
}

// ---- A power cut at every write. ----

/// Opens a VHD on storage, writable or not (with its parent, if any).
type Opener<'a> = &'a dyn Fn(Box<dyn Storage>, bool) -> Vhd;

/// A crash image of a compaction opens from its trailing footer and reads
/// `model`; opened writable, it compacts again to a clean image that still
/// reads `model`.
fn check_crash_image(img: Vec<u8>, model: &[u8], what: &str, open: Opener<'_>) {
    let ro = open(
        Box::new(MemStorage::from_vec("crash.vhd", img.clone())),
        false,
    );
    assert_eq!(ro.info().footer_source, FooterSource::End, "{what}");
    assert_same(&read_all(&ro), model, &format!("{what}: read-only"));
    drop(ro);
    let r = check_mem(img.clone(), false);
    assert_eq!(r.corruptions, 0, "{what}: {:?}", r.problems);
    let st = Arc::new(MemStorage::from_vec("again.vhd", img));
    let mut d = open(Box::new(st.clone()), true);
    let rep = d
        .compact(&mut |_| {})
        .unwrap_or_else(|e| panic!("{what}: compacting again failed: {e}"));
    assert_same(&read_all(&d), model, &format!("{what}: compacted again"));
    d.close().unwrap();
    let again = st.to_vec();
    assert_eq!(again.len() as u64, rep.new_file_size, "{what}");
    assert_clean(&check_mem(again.clone(), false), what);
    let d = open(Box::new(MemStorage::from_vec("final.vhd", again)), false);
    assert_same(&read_all(&d), model, &format!("{what}: reopened"));
}

/// Compact `base` on a recording storage, then check every crash image.
fn crash_every_write(base: Vec<u8>, open: Opener<'_>, freed: u64, moved: u64, seed: u64) {
    let model = read_all(&open(
        Box::new(MemStorage::from_vec("m.vhd", base.clone())),
        false,
    ));
    let rec = Arc::new(RecordingStorage::new("rec.vhd", base));
    let mut d = open(Box::new(rec.clone()), true);
    let r = compact(&mut d);
    assert_eq!((r.blocks_freed, r.blocks_moved), (freed, moved), "{r:?}");
    assert!(r.new_file_size < r.old_file_size);
    drop(d);
    let done = rec.contents();
    assert_eq!(done.len() as u64, r.new_file_size);
    assert_same(
        &read_all(&open(
            Box::new(MemStorage::from_vec("done.vhd", done)),
            false,
        )),
        &model,
        "after compact",
    );
    let ops = rec.op_count();
    assert!(ops > 10, "only {ops} operations recorded");
    for_each_crash(&rec, seed, |img, cut, strategy| {
        check_crash_image(img, &model, &format!("{strategy} cut {cut}"), open)
    });
    // And the worst case for the file's end: every unflushed length change
    // persisted, no unflushed write.
    let recorded = rec.ops();
    for cut in 0..=ops {
        let img = rec.crash_image(cut, |i| matches!(recorded[i], Op::SetLen(_)));
        check_crash_image(img, &model, &format!("lengths-only cut {cut}"), open);
    }
}

fn open_opts(writable: bool) -> OpenOptions {
    OpenOptions {
        writable,
        ..OpenOptions::default()
    }
}

#[test]
fn dynamic_crash_at_every_write() {
    let open = |st: Box<dyn Storage>, w: bool| Vhd::open_storage(st, &open_opts(w)).unwrap();
    crash_every_write(mix_image(), &open, 3, 2, 0x5eed);
}

#[test]
fn differencing_crash_at_every_write() {
    let pst = Arc::new(MemStorage::new("parent.vhd"));
    let p = Vhd::create_on(Box::new(pst.clone()), &CreateOptions::new(4 * MIB)).unwrap();
    let pmodel = parent_model(p.virtual_size());
    p.write_at(&pmodel[..MIB as usize], 0).unwrap();
    p.close().unwrap();
    let pbytes = pst.to_vec();
    let parent = || -> Arc<dyn VirtualDisk> {
        Arc::new(
            Vhd::open_storage(
                Box::new(MemStorage::from_vec("parent.vhd", pbytes.clone())),
                &OpenOptions::default(),
            )
            .unwrap(),
        )
    };
    let link = ParentLink {
        name: "parent.vhd".into(),
        relative: ".\\parent.vhd".into(),
        absolute: "/nonexistent/parent.vhd".into(),
        timestamp: 0,
    };
    let cst = Arc::new(MemStorage::new("child.vhd"));
    let mut o = CreateOptions::new(0);
    o.block_size = BLOCK as u32;
    let pv = Vhd::open_storage(
        Box::new(MemStorage::from_vec("parent.vhd", pbytes.clone())),
        &OpenOptions::default(),
    )
    .unwrap();
    let c = Vhd::create_differencing_on(Box::new(cst.clone()), pv, &link, &o).unwrap();
    write_diff(&c, &pmodel);
    c.close().unwrap();
    let mut child = cst.to_vec();
    clear_bitmap(&mut child, 45);
    let open = |st: Box<dyn Storage>, w: bool| {
        Vhd::open_storage_with_parent(st, &open_opts(w), parent()).unwrap()
    };
    crash_every_write(child, &open, 3, 2, 0xd1ff);
}

// ---- Refusals. ----

#[test]
fn read_only_and_fixed_are_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let dynamic = tmp.path().join("dyn.vhd");
    let d = Vhd::create(&dynamic, &opts(4 * MIB), false).unwrap();
    d.write_at(&[0u8; 512], 0).unwrap();
    d.close().unwrap();
    let hash = file_hash(&dynamic);
    let mut d = Vhd::open(&dynamic, &OpenOptions::default()).unwrap();
    let e = d.compact(&mut |_| {}).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::InvalidInput, "{e}");
    let msg = e.to_string();
    assert!(
        msg.contains("dyn.vhd") && msg.contains("read-only"),
        "{msg}"
    );
    drop(d);
    assert_eq!(file_hash(&dynamic), hash);

    let fixed = tmp.path().join("fixed.vhd");
    let mut o = opts(4 * MIB);
    o.fixed = true;
    Vhd::create(&fixed, &o, false).unwrap().close().unwrap();
    let hash = file_hash(&fixed);
    let mut d = Vhd::open(&fixed, &rw()).unwrap();
    let e = d.compact(&mut |_| {}).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::InvalidInput, "{e}");
    let msg = e.to_string();
    assert!(
        msg.contains("fixed.vhd") && msg.contains("fixed VHD"),
        "{msg}"
    );
    drop(d);
    assert_eq!(file_hash(&fixed), hash);
}

#[test]
fn overlapping_blocks_are_corrupt_and_nothing_is_written() {
    // Block 3 is zeros (would be freed), blocks 7 and 12 hold data; then
    // block 12's BAT entry is pointed into block 7's data.
    let st = Arc::new(MemStorage::new("bad.vhd"));
    let d = Vhd::create_on(Box::new(st.clone()), &opts(4 * MIB)).unwrap();
    d.write_at(&[0u8; 4096], 3 * BLOCK).unwrap();
    d.write_at(&[1u8; 4096], 7 * BLOCK).unwrap();
    d.write_at(&[2u8; 4096], 12 * BLOCK).unwrap();
    d.close().unwrap();
    let mut bytes = st.to_vec();
    let e7 = u32::from_be_bytes(bytes[1536 + 28..1536 + 32].try_into().unwrap());
    bytes[1536 + 48..1536 + 52].copy_from_slice(&(e7 + 8).to_be_bytes());
    let st = Arc::new(MemStorage::from_vec("bad.vhd", bytes.clone()));
    // The writable open that compaction needs already refuses them.
    let e = Vhd::open_storage(Box::new(st.clone()), &rw())
        .map(drop)
        .unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Corrupt, "{e}");
    let msg = e.to_string();
    assert!(
        msg.contains("bad.vhd") && msg.contains("VHD BAT at offset 0x") && msg.contains("overlaps"),
        "{msg}"
    );
    assert_eq!(st.to_vec(), bytes, "a refused open wrote");
}

/// Every BAT entry value a hostile image could hold in one slot: compact
/// either succeeds (reading the same) or fails cleanly, never panics.
#[test]
fn hostile_entries_never_panic() {
    let base = mix_image();
    let entry = 1536 + 12 * 4; // block 12
    for v in [0u32, 1, 2, 3, 4, 5, 0x7fff_ffff, 0xffff_fffe, 200, 1000] {
        let mut bytes = base.clone();
        bytes[entry..entry + 4].copy_from_slice(&v.to_be_bytes());
        let Ok(mut d) = Vhd::open_storage(Box::new(MemStorage::from_vec("h.vhd", bytes)), &rw())
        else {
            continue;
        };
        let model = read_all(&d);
        match d.compact(&mut |_| {}) {
            Ok(_) => assert_same(&read_all(&d), &model, &format!("entry {v:#x}")),
            Err(e) => assert!(e.to_string().contains("h.vhd"), "{e}"),
        }
    }
}
