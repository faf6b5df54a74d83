//! Differencing VHDs: creating a child, reads that fall through to the
//! parent, sector-granular writes, finding the parent (relative locator,
//! absolute locator, parent name), parent checks, chains, crash safety of
//! the write path, a property test against a `Vec` model, and interop.

// Test images and buffers are small: their offsets and sizes fit any integer type.
#![allow(clippy::cast_possible_truncation)]

mod common;
use common::*;
use disk::fault::RecordingStorage;
use disk::testing::crash::{for_each_crash, DiffWorkload};
use disk::{Mapping, MemStorage, VirtualDisk};
use proptest::prelude::*;
use std::path::Path;
use std::process::Command;
use std::sync::Arc;
use vhd::{CreateOptions, ErrorKind, OpenOptions, ParentLink, Vhd};

fn rw() -> OpenOptions {
    OpenOptions {
        writable: true,
        ..OpenOptions::default()
    }
}

/// Child options: the parent's size, `block` bytes per block.
fn child_opts(block: u32) -> CreateOptions {
    let mut o = CreateOptions::new(0);
    o.block_size = block;
    o
}

/// A dynamic parent VHD file with a pattern; returns its contents.
fn base_file(path: &Path, size: u64, seed: u64) -> Vec<u8> {
    let d = Vhd::create(path, &CreateOptions::new(size), false).unwrap();
    let model = fill_parent(&d, seed);
    d.close().unwrap();
    model
}

/// Unaligned writes: inside one sector, across sector, block (64 KiB and
/// 2 MiB) boundaries, aligned, and at the very end.
fn unaligned_writes(size: u64) -> Vec<(u64, usize)> {
    vec![
        (100, 10),
        (511, 2),
        (64 * 1024 - 300, 1000),
        (2 * MIB - 7, 5000),
        (MIB, 4096),
        (3 * MIB + 3, 200_000),
        (size - 13, 13),
        (105, 3), // again, inside the first partial write's sector
    ]
}

fn apply_writes(d: &dyn VirtualDisk, model: &mut [u8], writes: &[(u64, usize)], seed: u64) {
    for (i, &(off, len)) in writes.iter().enumerate() {
        let p = pattern(len, seed + i as u64);
        d.write_at(&p, off).unwrap();
        model[off as usize..off as usize + len].copy_from_slice(&p);
    }
}

#[test]
fn child_reads_parent_overlaid_with_writes() {
    let tmp = tempfile::tempdir().unwrap();
    let base = tmp.path().join("base.vhd");
    let parent_model = base_file(&base, 8 * MIB, 1);
    let base_hash = file_hash(&base);
    for block in [64 * 1024u32, 2 * MIB as u32] {
        let child = tmp.path().join(format!("child-{block}.vhd"));
        let d = Vhd::create_differencing(&child, &base, &child_opts(block), false).unwrap();
        assert_eq!(d.info().subformat(), "differencing");
        assert_eq!(d.virtual_size() as usize, parent_model.len());
        assert_eq!(d.block_size(), u64::from(block));
        assert!(d.parent().is_some());
        // Nothing present yet: everything maps to the parent.
        let e = d.map(0, d.virtual_size()).unwrap();
        assert_eq!(e.mapping, Mapping::Parent);
        assert_same(&read_all(&d), &parent_model, "fresh child");

        let mut model = parent_model.clone();
        let writes = unaligned_writes(d.virtual_size());
        apply_writes(&d, &mut model, &writes, 100);
        assert_same(&read_all(&d), &model, "child after writes");
        // The partly written sector 0 is present; sector 1 still the parent's.
        assert!(matches!(d.map(0, 512).unwrap().mapping, Mapping::Data(_)));
        let e = d.map(1024, MIB).unwrap();
        assert_eq!(
            (e.mapping, e.len),
            (Mapping::Parent, 64 * 1024 - 300 - 1024 - 212)
        );
        // Unaligned reads across present and absent sectors.
        for (off, len) in [
            (90u64, 1000usize),
            (64 * 1024 - 301, 3000),
            (2 * MIB - 600, 9000),
        ] {
            let mut b = vec![0u8; len];
            d.read_at(&mut b, off).unwrap();
            assert_same(
                &b,
                &model[off as usize..off as usize + len],
                "unaligned read",
            );
        }
        d.close().unwrap();
        assert_eq!(file_hash(&base), base_hash, "the parent was modified");

        // Reopen (the parent is found by its locators).
        let d = Vhd::open(&child, &OpenOptions::default()).unwrap();
        assert_eq!(
            Path::new(d.info().parent_file.as_deref().unwrap()),
            base.canonicalize().unwrap()
        );
        let h = d.info().header.clone().unwrap();
        assert_eq!(h.parent_name(), "base.vhd");
        let codes: Vec<&str> = d
            .info()
            .parent_locators
            .iter()
            .map(|(c, _)| c.as_str())
            .collect();
        assert_eq!(codes, ["W2ku", "W2ru"]);
        assert_eq!(d.info().parent_locators[1].1, ".\\base.vhd");
        // W2ku: the absolute path in Win32 syntax (backslashes, no drive).
        assert_eq!(
            d.info().parent_locators[0].1,
            base.canonicalize()
                .unwrap()
                .display()
                .to_string()
                .replace('/', "\\")
        );
        for (_, l) in h.locators() {
            assert_eq!(l.data_offset % 512, 0);
            assert!(u64::from(l.data_space) >= u64::from(l.data_length));
            assert_eq!(l.data_space % 512, 0);
        }
        assert_same(&read_all(&d), &model, "reopened child");
        drop(d);

        // Reopen writable, write more, and again.
        let d = Vhd::open(&child, &rw()).unwrap();
        apply_writes(&d, &mut model, &[(7, 700), (5 * MIB + 1, 1)], 300);
        d.close().unwrap();
        let d = Vhd::open(&child, &OpenOptions::default()).unwrap();
        assert_same(&read_all(&d), &model, "child after a second session");
        assert_eq!(file_hash(&base), base_hash, "the parent was modified");
    }
}

#[test]
fn chain_of_three() {
    let tmp = tempfile::tempdir().unwrap();
    // Every layer under the child's directory (the default parent policy).
    std::fs::create_dir(tmp.path().join("sub")).unwrap();
    let gp = tmp.path().join("sub").join("gp.vhd");
    let mut model = base_file(&gp, 6 * MIB, 7);
    let parent = tmp.path().join("sub").join("parent.vhd");
    let d = Vhd::create_differencing(&parent, &gp, &child_opts(512 * 1024), false).unwrap();
    apply_writes(&d, &mut model, &[(1000, 5000), (2 * MIB + 17, 100_000)], 20);
    d.close().unwrap();
    let child = tmp.path().join("child.vhd");
    let d = Vhd::create_differencing(&child, &parent, &child_opts(2 * MIB as u32), false).unwrap();
    apply_writes(&d, &mut model, &[(3000, 5000), (2 * MIB + 1, 10)], 40);
    assert_same(&read_all(&d), &model, "chain, fresh");
    d.close().unwrap();
    let d = Vhd::open(&child, &OpenOptions::default()).unwrap();
    assert_eq!(
        d.info().parent_locators[1].1,
        ".\\sub\\parent.vhd",
        "relative locator into a subdirectory"
    );
    let p = d.parent().unwrap();
    let g = p.parent().unwrap();
    assert!(g.parent().is_none());
    assert_same(&read_all(&d), &model, "chain, reopened");
    // The middle layer maps its own writes as data, the rest to its parent.
    assert!(matches!(p.map(1000, 1).unwrap().mapping, Mapping::Data(_)));
    assert_eq!(p.map(MIB, 1).unwrap().mapping, Mapping::Parent);
}

/// A spare (a blank child made over one parent) becomes a child of another
/// parent of the same size in place: the result is what
/// `create_differencing_file` writes for that parent, apart from the
/// fields that differ between any two creations (timestamp, unique id and
/// the footer checksum), and it reads the new parent. A spare that does
/// not fit (another size, a used block) is refused and left untouched.
#[test]
fn spare_child_is_reused_for_another_parent() {
    let tmp = tempfile::tempdir().unwrap();
    let a = tmp.path().join("a-parent-with-a-much-longer-name.vhd");
    base_file(&a, 6 * MIB, 3);
    let b = tmp.path().join("b.vhd");
    let model_b = base_file(&b, 6 * MIB, 4);
    let opts = child_opts(2 * MIB as u32);
    let spare = tmp.path().join("spare.avhd");
    Vhd::create_differencing_file(&spare, &a, &opts, false).unwrap();
    assert!(Vhd::create_differencing_from_spare(&spare, &b, &opts).unwrap());
    let fresh = tmp.path().join("fresh.avhd");
    Vhd::create_differencing_file(&fresh, &b, &opts, false).unwrap();
    let (got, want) = (
        std::fs::read(&spare).unwrap(),
        std::fs::read(&fresh).unwrap(),
    );
    assert_eq!(got.len(), want.len(), "file length");
    // Footer fields that differ between two creations: timestamp (24..28),
    // checksum (64..68), unique id (68..84); at the start and at the end.
    let varies = |i: usize| {
        let f = if i < 512 { i } else { i + 512 - got.len() };
        (i < 512 || i >= got.len() - 512) && ((24..28).contains(&f) || (64..84).contains(&f))
    };
    let differing: Vec<usize> = (0..got.len())
        .filter(|&i| got[i] != want[i] && !varies(i))
        .collect();
    assert!(
        differing.is_empty(),
        "bytes differ at {:?}",
        &differing[..differing.len().min(8)]
    );
    let d = Vhd::open(&spare, &rw()).unwrap();
    assert_same(&read_all(&d), &model_b, "reused spare reads its new parent");
    let mut model = model_b.clone();
    apply_writes(&d, &mut model, &[(5000, 70_000)], 9);
    d.close().unwrap();
    let d = Vhd::open(&spare, &OpenOptions::default()).unwrap();
    assert_same(&read_all(&d), &model, "reused spare after a write");
    drop(d);

    // Now a block is in use: no longer a spare.
    let before = std::fs::read(&spare).unwrap();
    assert!(!Vhd::create_differencing_from_spare(&spare, &b, &opts).unwrap());
    assert_eq!(std::fs::read(&spare).unwrap(), before, "untouched");
    // Another size or block size: not a spare for this parent.
    let c = tmp.path().join("c.vhd");
    base_file(&c, 8 * MIB, 5);
    let spare2 = tmp.path().join("spare2.avhd");
    Vhd::create_differencing_file(&spare2, &a, &opts, false).unwrap();
    let before = std::fs::read(&spare2).unwrap();
    assert!(!Vhd::create_differencing_from_spare(&spare2, &c, &opts).unwrap());
    assert!(!Vhd::create_differencing_from_spare(&spare2, &b, &child_opts(512 * 1024)).unwrap());
    assert_eq!(std::fs::read(&spare2).unwrap(), before, "untouched");
    // Not a VHD at all.
    let junk = tmp.path().join("junk.avhd");
    std::fs::write(&junk, vec![0xffu8; 8192]).unwrap();
    assert!(!Vhd::create_differencing_from_spare(&junk, &b, &opts).unwrap());
}

#[test]
fn moved_parent_is_found_by_relative_locator_and_by_name() {
    let tmp = tempfile::tempdir().unwrap();
    let a = tmp.path().join("a");
    std::fs::create_dir_all(a.join("p")).unwrap();
    let base = a.join("p").join("base.vhd");
    let model = base_file(&base, 4 * MIB, 3);
    let child = a.join("child.vhd");
    Vhd::create_differencing(&child, &base, &child_opts(2 * MIB as u32), false)
        .unwrap()
        .close()
        .unwrap();
    // Move the whole tree: the absolute locator is stale, the relative one
    // (.\p\base.vhd) still works.
    let b = tmp.path().join("b");
    std::fs::rename(&a, &b).unwrap();
    let d = Vhd::open(b.join("child.vhd"), &OpenOptions::default()).unwrap();
    assert_same(&read_all(&d), &model, "moved tree");
    drop(d);
    // Move the parent beside the child: only the parent name finds it.
    std::fs::rename(b.join("p").join("base.vhd"), b.join("base.vhd")).unwrap();
    let d = Vhd::open(b.join("child.vhd"), &OpenOptions::default()).unwrap();
    assert_same(&read_all(&d), &model, "parent found by name");
    assert_eq!(
        Path::new(d.info().parent_file.as_deref().unwrap()),
        b.join("base.vhd")
    );
    drop(d);
    // Missing: the error names the child, each path tried, and the parent.
    std::fs::remove_file(b.join("base.vhd")).unwrap();
    let e = Vhd::open(b.join("child.vhd"), &OpenOptions::default()).unwrap_err();
    let msg = e.to_string();
    eprintln!("{msg}");
    assert_eq!(e.kind(), ErrorKind::InvalidInput);
    assert!(msg.contains("parent is missing"), "{msg}");
    assert!(
        msg.contains(&b.join("child.vhd").display().to_string()),
        "{msg}"
    );
    assert!(msg.contains("\"base.vhd\""), "{msg}");
    assert!(msg.contains("W2ru=.\\p\\base.vhd"), "{msg}");
    assert!(
        msg.contains(&b.join("p/base.vhd").display().to_string()),
        "{msg}"
    );
    assert!(msg.contains(&base.display().to_string()), "{msg}");
    assert!(
        msg.contains(&b.join("base.vhd").display().to_string()),
        "{msg}"
    );
    // Inspecting still works.
    let info = Vhd::inspect(b.join("child.vhd")).unwrap();
    assert_eq!(info.subformat(), "differencing");
    assert!(info.parent_file.is_none());
}

#[test]
fn wrong_parent_id_is_refused_unless_overridden() {
    let tmp = tempfile::tempdir().unwrap();
    let base = tmp.path().join("base.vhd");
    base_file(&base, 4 * MIB, 5);
    let child = tmp.path().join("child.vhd");
    Vhd::create_differencing(&child, &base, &child_opts(2 * MIB as u32), false)
        .unwrap()
        .close()
        .unwrap();
    let want_id = Vhd::inspect(&base).unwrap().footer.unique_id;
    // Replace the parent by another disk of the same size.
    let other_model = base_file(&tmp.path().join("other.vhd"), 4 * MIB, 99);
    std::fs::rename(tmp.path().join("other.vhd"), &base).unwrap();
    let other_id = Vhd::inspect(&base).unwrap().footer.unique_id;
    let e = Vhd::open(&child, &OpenOptions::default()).unwrap_err();
    let msg = e.to_string();
    eprintln!("{msg}");
    assert!(msg.contains(&want_id.to_string()), "{msg}");
    assert!(msg.contains(&other_id.to_string()), "{msg}");
    assert!(msg.contains(&child.display().to_string()), "{msg}");
    assert!(msg.contains("base.vhd"), "{msg}");
    assert!(msg.contains("ignore_parent_id"), "{msg}");
    let d = Vhd::open(
        &child,
        &OpenOptions {
            ignore_parent_id: true,
            ..OpenOptions::default()
        },
    )
    .unwrap();
    assert_same(&read_all(&d), &other_model, "overridden parent");
}

#[test]
fn parent_checks_and_create_errors() {
    let tmp = tempfile::tempdir().unwrap();
    let base = tmp.path().join("base.vhd");
    base_file(&base, 4 * MIB, 5);
    let child = tmp.path().join("child.vhd");
    // The child cannot be its parent, nor fixed, nor of another size.
    let e = Vhd::create_differencing(&base, &base, &child_opts(2 * MIB as u32), true).unwrap_err();
    assert!(e.to_string().contains("its own parent"), "{e}");
    let mut o = child_opts(2 * MIB as u32);
    o.fixed = true;
    assert!(Vhd::create_differencing(&child, &base, &o, false).is_err());
    let mut o = child_opts(2 * MIB as u32);
    o.virtual_size = 5 * MIB;
    let e = Vhd::create_differencing(&child, &base, &o, false).unwrap_err();
    assert!(e.to_string().contains("virtual size"), "{e}");
    // The size the parent was asked with is accepted.
    o.virtual_size = 4 * MIB;
    Vhd::create_differencing(&child, &base, &o, false)
        .unwrap()
        .close()
        .unwrap();
    // A parent that is not a VHD.
    let raw = tmp.path().join("raw.img");
    std::fs::write(&raw, vec![0u8; 4 << 20]).unwrap();
    assert!(Vhd::create_differencing(tmp.path().join("c2.vhd"), &raw, &o, false).is_err());
    // open_with_parent: the size must match; a non-differencing disk has no parent.
    let small = Vhd::create_on(
        Box::new(MemStorage::new("small.vhd")),
        &CreateOptions::new(MIB),
    )
    .unwrap();
    let e = Vhd::open_with_parent(&child, &OpenOptions::default(), Arc::new(small)).unwrap_err();
    assert!(e.to_string().contains("virtual size"), "{e}");
    let p = Vhd::open(&base, &OpenOptions::default()).unwrap();
    let e = Vhd::open_with_parent(&base, &OpenOptions::default(), Arc::new(p)).unwrap_err();
    assert!(e.to_string().contains("not a differencing disk"), "{e}");
    // A parent file that is not a VHD where the locator points.
    std::fs::rename(&raw, &base).unwrap();
    let e = Vhd::open(&child, &OpenOptions::default()).unwrap_err();
    let msg = e.to_string();
    assert!(msg.contains("base.vhd") && msg.contains("parent"), "{msg}");
}

#[test]
fn parent_loop_is_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let base = tmp.path().join("base.vhd");
    base_file(&base, 4 * MIB, 5);
    let c = tmp.path().join("c.vhd");
    let d = tmp.path().join("d.vhd");
    let o = child_opts(2 * MIB as u32);
    Vhd::create_differencing(&c, &base, &o, false)
        .unwrap()
        .close()
        .unwrap();
    Vhd::create_differencing(&d, &c, &o, false)
        .unwrap()
        .close()
        .unwrap();
    // base.vhd becomes d, whose parent is c, whose parent is base.vhd.
    std::fs::rename(&d, &base).unwrap();
    // Its id is not the one c expects: passed over before its chain opens.
    let e = Vhd::open(&c, &OpenOptions::default()).unwrap_err();
    let msg = e.to_string();
    assert!(msg.contains("not this disk's parent"), "{msg}");
    // Taken whatever its id, it leads back to c.
    let opts = OpenOptions {
        ignore_parent_id: true,
        ..OpenOptions::default()
    };
    let e = Vhd::open(&c, &opts).unwrap_err();
    let msg = e.to_string();
    assert!(msg.contains("loops"), "{msg}");
}

#[test]
fn chain_depth_is_capped() {
    let tmp = tempfile::tempdir().unwrap();
    let mut prev = tmp.path().join("l0.vhd");
    base_file(&prev, MIB, 1);
    let o = child_opts(64 * 1024);
    for i in 1..=vhd::MAX_CHAIN {
        let next = tmp.path().join(format!("l{i}.vhd"));
        // Creating opens the parent chain, so the last step fails.
        match Vhd::create_differencing(&next, &prev, &o, false) {
            Ok(d) => d.close().unwrap(),
            Err(e) => panic!("level {i}: {e}"),
        }
        prev = next;
    }
    let e = Vhd::open(&prev, &OpenOptions::default()).unwrap_err();
    assert!(e.to_string().contains("deeper than 64"), "{e}");
    let ok = tmp.path().join(format!("l{}.vhd", vhd::MAX_CHAIN - 1));
    Vhd::open(ok, &OpenOptions::default()).unwrap();
}

// ---- In-memory helpers: the parent from bytes, the child given it. ----

fn mem_parent(size: u64, block: u32, seed: u64) -> (Vec<u8>, Vec<u8>) {
    let st = Arc::new(MemStorage::new("parent.vhd"));
    let mut o = CreateOptions::new(size);
    o.block_size = block;
    let d = Vhd::create_on(Box::new(st.clone()), &o).unwrap();
    let model = fill_parent(&d, seed);
    d.close().unwrap();
    (st.to_vec(), model)
}

fn open_parent(bytes: &[u8]) -> Vhd {
    Vhd::open_storage(
        Box::new(MemStorage::from_vec("parent.vhd", bytes.to_vec())),
        &OpenOptions::default(),
    )
    .unwrap()
}

fn link() -> ParentLink {
    ParentLink {
        name: "parent.vhd".into(),
        relative: ".\\parent.vhd".into(),
        absolute: "/nonexistent/parent.vhd".into(),
        timestamp: 0,
    }
}

fn mem_child(parent: &[u8], block: u32) -> Vec<u8> {
    let st = Arc::new(MemStorage::new("child.vhd"));
    Vhd::create_differencing_on(
        Box::new(st.clone()),
        open_parent(parent),
        &link(),
        &child_opts(block),
    )
    .unwrap()
    .close()
    .unwrap();
    st.to_vec()
}

#[test]
fn a_block_over_a_parent_locator_is_refused_writable_and_read_read_only() {
    let (parent, _) = mem_parent(4 * MIB, 64 << 10, 3);
    let pdisk = || -> Arc<dyn VirtualDisk> { Arc::new(open_parent(&parent)) };
    let st = Arc::new(MemStorage::from_vec(
        "child.vhd",
        mem_child(&parent, 64 << 10),
    ));
    let d = Vhd::open_storage_with_parent(Box::new(st.clone()), &rw(), pdisk()).unwrap();
    for k in 0..4 {
        d.write_at(&[7u8; 4096], k * (64 << 10)).unwrap();
    }
    d.close().unwrap();
    let mut bytes = st.to_vec();
    let footer = vhd::footer::Footer::parse(&bytes[bytes.len() - 512..]).unwrap();
    let at = footer.data_offset as usize;
    let h = vhd::dynamic_header::DynamicHeader::parse(&bytes[at..at + 1024]).unwrap();
    let (k, l) = h.locators().next().expect("a locator");
    let (loc, entry) = (l.data_offset, h.table_offset + 10 * 4);
    // Block 10 (not allocated) pointed at the locator's data.
    let sector = u32::try_from(loc / 512).unwrap();
    bytes[entry as usize..entry as usize + 4].copy_from_slice(&sector.to_be_bytes());
    let opened = |writable: bool| {
        let o = OpenOptions {
            writable,
            ..OpenOptions::default()
        };
        let st = MemStorage::from_vec("child.vhd", bytes.clone());
        Vhd::open_storage_with_parent(Box::new(st), &o, pdisk())
    };
    let e = opened(true).map(drop).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Corrupt, "{e}");
    let msg = e.to_string();
    assert!(
        msg.contains("child.vhd")
            && msg.contains(&format!("VHD BAT at offset {entry:#x}"))
            && msg.contains(&format!(
                "block 10 at sector {sector:#x} (offset {loc:#x}) overlaps the data of parent locator {k}"
            )),
        "{msg}"
    );
    let ro = opened(false).unwrap();
    let mut b = vec![0u8; 4096];
    ro.read_at(&mut b, 0).unwrap();
    assert_eq!(b, vec![7u8; 4096]);
}

// ---- Crash test of the differencing write path. ----

fn crash_run(block: u32, seed: u64) {
    let (pbytes, pmodel) = mem_parent(4 * MIB, 2 * MIB as u32, seed);
    let rec = Arc::new(RecordingStorage::new("rec", mem_child(&pbytes, block)));
    let d =
        Vhd::open_storage_with_parent(Box::new(rec.clone()), &rw(), Arc::new(open_parent(&pbytes)))
            .unwrap();
    let size = d.virtual_size();
    let h = DiffWorkload::run(&rec, &d, pmodel, seed);
    std::mem::forget(d); // a crash: no close
    let reopen = |img: Vec<u8>, opts: &OpenOptions| {
        Vhd::open_storage_with_parent(
            Box::new(MemStorage::from_vec("crash", img)),
            opts,
            Arc::new(open_parent(&pbytes)),
        )
    };
    for_each_crash(&rec, seed, |img, cut, strategy| {
        let what = format!("{strategy} cut {cut}");
        let ro = reopen(img.clone(), &OpenOptions::default())
            .unwrap_or_else(|e| panic!("{what}: open failed: {e}"));
        assert_eq!(ro.info().footer_source, vhd::FooterSource::End, "{what}");
        h.verify(&ro, cut, &what);
        drop(ro);
        if strategy != "torn" {
            return;
        }
        // Writable after the crash: new blocks and partial sectors still work.
        let st = Arc::new(MemStorage::from_vec("crash-rw", img));
        let rw_d = Vhd::open_storage_with_parent(
            Box::new(st.clone()),
            &rw(),
            Arc::new(open_parent(&pbytes)),
        )
        .unwrap_or_else(|e| panic!("{what}: writable open failed: {e}"));
        let off = size - 64 * 1024 + 300;
        rw_d.write_at(&[0xee; 700], off).unwrap();
        rw_d.close().unwrap();
        let again = reopen(st.to_vec(), &OpenOptions::default()).unwrap();
        let mut b = vec![0u8; 1300];
        again.read_at(&mut b, off - 300).unwrap();
        let o = (off - 300) as usize;
        assert_eq!(&b[..300], &h.parent()[o..o + 300], "{what}");
        assert_eq!(&b[300..1000], &[0xee; 700][..], "{what}");
        assert_eq!(&b[1000..], &h.parent()[o + 1000..o + 1300], "{what}");
        h.verify(&again, cut, &format!("{what} after writing"));
    });
}

#[test]
fn crash_at_every_point_keeps_flushed_writes_64k_blocks() {
    crash_run(64 * 1024, 0x5eed_0001);
}

#[test]
fn crash_at_every_point_keeps_flushed_writes_2m_blocks() {
    crash_run(2 * MIB as u32, 0x5eed_0002);
}

// ---- Property test against a Vec model. ----

#[derive(Debug, Clone)]
enum Op {
    Write { off: u64, len: usize, seed: u8 },
    Read { off: u64, len: usize },
    Flush,
    Reopen,
}

const PSIZE: u64 = 5 * MIB;

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        5 => (0..PSIZE, 1usize..200_000, any::<u8>()).prop_map(|(off, len, seed)| Op::Write { off, len, seed }),
        3 => (0..PSIZE, 1usize..2_000_000).prop_map(|(off, len)| Op::Read { off, len }),
        1 => Just(Op::Flush),
        1 => Just(Op::Reopen),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 64, ..ProptestConfig::default() })]
    #[test]
    fn child_matches_vec_model(
        pblock_shift in 0u32..3,
        cblock_shift in 0u32..3,
        pseed in any::<u64>(),
        ops in proptest::collection::vec(op(), 1..30),
    ) {
        let pblock = (64 * 1024u32) << (pblock_shift * 2);
        let cblock = (16 * 1024u32) << (cblock_shift * 3);
        let (pbytes, mut model) = mem_parent(PSIZE, pblock, pseed);
        let size = model.len() as u64;
        let mut st = Arc::new(MemStorage::from_vec("child.vhd", mem_child(&pbytes, cblock)));
        let open = |st: &Arc<MemStorage>| {
            Vhd::open_storage_with_parent(Box::new(st.clone()), &rw(), Arc::new(open_parent(&pbytes))).unwrap()
        };
        let mut d = open(&st);
        for op in ops {
            match op {
                Op::Write { off, len, seed } => {
                    let off = off.min(size - 1);
                    let len = len.min((size - off) as usize);
                    let data: Vec<u8> = (0..len).map(|i| (i as u8).wrapping_mul(seed) ^ seed).collect();
                    d.write_at(&data, off).unwrap();
                    model[off as usize..off as usize + len].copy_from_slice(&data);
                }
                Op::Read { off, len } => {
                    let off = off.min(size - 1);
                    let len = len.min((size - off) as usize);
                    let mut got = vec![0u8; len];
                    d.read_at(&mut got, off).unwrap();
                    prop_assert!(got[..] == model[off as usize..off as usize + len], "read {off}+{len}");
                }
                Op::Flush => d.flush().unwrap(),
                Op::Reopen => {
                    d.close().unwrap();
                    st = Arc::new(MemStorage::from_vec("child.vhd", st.to_vec()));
                    d = open(&st);
                }
            }
        }
        prop_assert!(read_all(&d) == model);
        d.close().unwrap();
        let again = open(&Arc::new(MemStorage::from_vec("c2.vhd", st.to_vec())));
        prop_assert!(read_all(&again) == model);
        // The parent's bytes never change.
        prop_assert!(read_all(&open_parent(&pbytes)) == read_all(again.parent().unwrap()));
    }
}

// ---- Interop. ----

/// QEMU cannot create a differencing vpc image ("Backing file not supported
/// for file format 'vpc'") and its vpc driver opens one as if it were
/// dynamic, ignoring the parent and the sector bitmaps: an allocated
/// block's bytes are read as they are, an unallocated block as zeros. So
/// what QEMU reads of our child is meaningful only as "the sectors this
/// layer holds": each sector a write touched must hold the merged view
/// (the parent's bytes around partial-sector writes), every other sector
/// zeros (file holes in allocated blocks, or unallocated blocks).
#[test]
fn qemu_reads_the_sectors_our_child_holds() {
    if !have("qemu-img") {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let base = tmp.path().join("base.vhd");
    let parent_model = base_file(&base, 8 * MIB, 11);
    let child = tmp.path().join("child.vhd");
    let d = Vhd::create_differencing(&child, &base, &child_opts(2 * MIB as u32), false).unwrap();
    let size = d.virtual_size();
    let mut model = parent_model.clone();
    let writes = unaligned_writes(size);
    apply_writes(&d, &mut model, &writes, 500);
    d.close().unwrap();
    let mut expect = vec![0u8; size as usize];
    for &(off, len) in &writes {
        let a = (off / 512 * 512) as usize;
        let b = ((off + len as u64).div_ceil(512) * 512) as usize;
        expect[a..b].copy_from_slice(&model[a..b]);
    }
    assert_eq!(qemu_virtual_size(&child, "vpc"), size);
    let raw = tmp.path().join("child.raw");
    run(Command::new("qemu-img")
        .args(["convert", "-f", "vpc", "-O", "raw"])
        .arg(&child)
        .arg(&raw));
    assert_same(
        &std::fs::read(&raw).unwrap(),
        &expect,
        "qemu's view of our child",
    );
}

/// The Windows-made orphan differencing image from the corpus, given a
/// stand-in parent with the id and size it expects: sectors its bitmaps
/// mark present read as QEMU reads them (QEMU ignores bitmaps, so it reads
/// those bytes from the file too), the others from the parent.
#[test]
fn windows_child_reads_through_a_stand_in_parent() {
    let Some(dir) = corpus("vhd") else { return };
    if !have("qemu-img") {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let img = decompress(
        &dir.join("dfvfs-fat-differential-orphan.vhd.gz"),
        tmp.path(),
    );
    let info = Vhd::inspect(&img).unwrap();
    let h = info.header.clone().unwrap();
    // Windows writes the locators' data space in bytes.
    let spaces: Vec<u32> = h.locators().map(|(_, l)| l.data_space).collect();
    assert_eq!(spaces, [0x1000, 0x10000]);
    // A fixed parent of exactly the child's size, with the expected id.
    let parent = tmp.path().join("fat-parent.vhd");
    let mut o = CreateOptions::new(info.virtual_size);
    o.fixed = true;
    o.azure = true;
    let p = Vhd::create(&parent, &o, false).unwrap();
    let pmodel = pattern(info.virtual_size as usize, 77);
    p.write_at(&pmodel, 0).unwrap();
    p.close().unwrap();
    let mut bytes = std::fs::read(&parent).unwrap();
    let n = bytes.len();
    let mut f = vhd::footer::Footer::parse(&bytes[n - 512..]).unwrap();
    f.unique_id = h.parent_unique_id;
    f.write_to(&mut bytes[n - 512..]);
    std::fs::write(&parent, bytes).unwrap();

    let d = Vhd::open(&img, &OpenOptions::default()).unwrap();
    let ours = read_all(&d);
    let raw = tmp.path().join("orphan.raw");
    run(Command::new("qemu-img")
        .args(["convert", "-f", "vpc", "-O", "raw"])
        .arg(&img)
        .arg(&raw));
    let theirs = std::fs::read(&raw).unwrap();
    let (mut present, mut absent) = (0, 0);
    for s in 0..info.virtual_size / 512 {
        let r = (s * 512) as usize..(s * 512 + 512) as usize;
        match d.map(s * 512, 512).unwrap().mapping {
            Mapping::Data(_) => {
                present += 1;
                assert!(ours[r.clone()] == theirs[r], "sector {s}");
            }
            Mapping::Parent => {
                absent += 1;
                assert!(ours[r.clone()] == pmodel[r], "sector {s}");
            }
            m => panic!("sector {s}: {m:?}"),
        }
    }
    assert!(
        present > 0 && absent > 0,
        "{present} present, {absent} absent"
    );
}

/// Damaged differencing images (every byte of the metadata and locators
/// flipped in turn, truncations) open and read cleanly or fail cleanly.
#[test]
fn damaged_children_never_panic() {
    let (pbytes, _) = mem_parent(2 * MIB, 64 * 1024, 9);
    let v = mem_child(&pbytes, 64 * 1024);
    let st = Arc::new(MemStorage::from_vec("child.vhd", v));
    let d =
        Vhd::open_storage_with_parent(Box::new(st.clone()), &rw(), Arc::new(open_parent(&pbytes)))
            .unwrap();
    d.write_at(&[3u8; 3000], 1000).unwrap();
    d.close().unwrap();
    let v = st.to_vec();
    let try_open = |w: Vec<u8>| {
        let s = || Box::new(MemStorage::from_vec("g.vhd", w.clone()));
        if let Ok(d) = Vhd::open_storage_with_parent(
            s(),
            &OpenOptions::default(),
            Arc::new(open_parent(&pbytes)),
        ) {
            let mut b = vec![0u8; d.virtual_size() as usize];
            let _ = d.read_at(&mut b, 0);
        }
        let _ = Vhd::open_storage(s(), &OpenOptions::default());
    };
    let meta_end = 4096.min(v.len() - 512);
    for i in (0..meta_end).chain(v.len() - 512..v.len()) {
        let mut w = v.clone();
        w[i] ^= 0x5a;
        try_open(w);
    }
    for n in (0..v.len()).step_by(4093) {
        try_open(v[..n].to_vec());
    }
}
