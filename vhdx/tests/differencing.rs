//! Differencing VHDX: reads through to the parent per block and per sector,
//! sector-granular writes through the sector bitmap, FULLY_PRESENT
//! promotion, chains, the parent linkage and policy, relinking, crash
//! safety of the write path, and a property test against a `Vec` model.
// Test data: sizes and offsets of small test disks (they fit in memory),
// block sizes and byte patterns.
#![allow(clippy::cast_possible_truncation)]

mod common;
use common::*;
use disk::fault::RecordingStorage;
use disk::testing::crash::{for_each_crash, DiffWorkload, DIFF_SPARE};
use disk::{Mapping, MemStorage, ParentPolicy, VirtualDisk};
use proptest::prelude::*;
use std::path::Path;
use std::sync::Arc;
use vhdx::{parent_locator_for, CreateOptions, ErrorKind, OpenOptions, Vhdx};

const MIB: u64 = 1 << 20;

fn rw() -> OpenOptions {
    OpenOptions {
        writable: true,
        ..OpenOptions::default()
    }
}

fn child_opts(block: u32) -> CreateOptions {
    let mut o = CreateOptions::new(0);
    o.block_size = block;
    o
}

fn base_file(path: &Path, size: u64, block: u32, lss: u32, seed: u64) -> Vec<u8> {
    let mut o = CreateOptions::new(size);
    o.block_size = block;
    o.logical_sector_size = lss;
    let d = Vhdx::create(path, &o, false).unwrap();
    let model = fill_parent(&d, seed);
    d.close().unwrap();
    model
}

fn apply_writes(d: &dyn VirtualDisk, model: &mut [u8], writes: &[(u64, usize)], seed: u64) {
    for (i, &(off, len)) in writes.iter().enumerate() {
        let p = pattern(len, seed + i as u64);
        d.write_at(&p, off).unwrap();
        model[off as usize..off as usize + len].copy_from_slice(&p);
    }
}

fn unaligned_writes(size: u64) -> Vec<(u64, usize)> {
    vec![
        (100, 10),
        (511, 2),
        (MIB - 300, 1000),
        (2 * MIB - 7, 5000),
        (3 * MIB, 4096),
        (5 * MIB + 3, 300_000),
        (size - 13, 13),
        (105, 3),
    ]
}

#[test]
fn child_reads_parent_overlaid_with_writes() {
    for lss in [512u32, 4096] {
        let tmp = tempfile::tempdir().unwrap();
        let base = tmp.path().join("base.vhdx");
        let size = 12 * MIB;
        let mut model = base_file(&base, size, MIB as u32, lss, 1);
        let child = tmp.path().join("child.avhdx");
        let d = Vhdx::create_differencing(
            &child,
            &base,
            &child_opts(2 * MIB as u32),
            &OpenOptions::default(),
            false,
        )
        .unwrap();
        assert_eq!(d.info().subformat(), "differencing");
        assert_eq!(d.geometry().logical_sector_size, lss);
        assert_same(&read_all(&d), &model, "fresh child reads the parent");
        assert_eq!(d.map(0, 512).unwrap().mapping, Mapping::Parent);
        apply_writes(&d, &mut model, &unaligned_writes(size), 10);
        assert_same(&read_all(&d), &model, "after writes");
        // Sector granularity: the written sector is here, the next from the parent.
        let e = d.map(3 * MIB, 8192).unwrap();
        assert!(matches!(e.mapping, Mapping::Data(_)), "{e:?}");
        assert_eq!(e.len, 4096);
        assert_eq!(d.map(3 * MIB + 4096, 512).unwrap().mapping, Mapping::Parent);
        d.close().unwrap();
        let d = Vhdx::open(&child, &OpenOptions::default()).unwrap();
        assert_same(&read_all(&d), &model, "reopened");
        assert_eq!(
            Path::new(d.info().parent_file.as_deref().unwrap()),
            base.as_path()
        );
        let pl = d.info().metadata.parent_locator.clone().unwrap();
        assert_eq!(pl.get("relative_path"), Some(".\\base.vhdx"));
        assert!(pl.get("parent_linkage").unwrap().starts_with('{'));
        // The parent is untouched.
        let p = Vhdx::open(&base, &OpenOptions::default()).unwrap();
        let mut pm = vec![0u8; size as usize];
        p.read_at(&mut pm, 0).unwrap();
        assert_ne!(pm, model);
    }
}

#[test]
fn whole_block_writes_become_fully_present() {
    let tmp = tempfile::tempdir().unwrap();
    let base = tmp.path().join("base.vhdx");
    let mut model = base_file(&base, 8 * MIB, MIB as u32, 512, 2);
    let child = tmp.path().join("child.avhdx");
    let d = Vhdx::create_differencing(
        &child,
        &base,
        &child_opts(MIB as u32),
        &OpenOptions::default(),
        false,
    )
    .unwrap();
    // Block 2 written in two halves (two partial writes, then all present);
    // block 4 in one write.
    apply_writes(
        &d,
        &mut model,
        &[
            (2 * MIB, MIB as usize / 2),
            (2 * MIB + MIB / 2, MIB as usize / 2),
            (4 * MIB, MIB as usize),
        ],
        3,
    );
    for b in [2, 4] {
        let e = d.map(b * MIB, MIB).unwrap();
        assert_eq!(e.len, MIB, "block {b} maps as one run");
        assert!(matches!(e.mapping, Mapping::Data(_)));
    }
    d.close().unwrap();
    let d = Vhdx::open(&child, &OpenOptions::default()).unwrap();
    let s = d.allocation_stats().unwrap();
    assert_eq!(s.present_blocks, 2);
    assert_same(&read_all(&d), &model, "reopened");
}

#[test]
fn chain_of_three_and_info_of_each_layer() {
    let tmp = tempfile::tempdir().unwrap();
    let base = tmp.path().join("base.vhdx");
    let mut model = base_file(&base, 6 * MIB, MIB as u32, 512, 7);
    std::fs::create_dir(tmp.path().join("sub")).unwrap();
    let mid = tmp.path().join("sub").join("mid.avhdx");
    let d = Vhdx::create_differencing(
        &mid,
        &base,
        &child_opts(MIB as u32),
        &OpenOptions::default(),
        false,
    );
    // The parent lies outside the new child's directory, but it was named
    // by the caller, so creating works; opening the child later follows it
    // only if the policy allows its directory.
    let d = d.unwrap();
    apply_writes(&d, &mut model, &[(1000, 5000), (2 * MIB + 17, 100_000)], 20);
    d.close().unwrap();
    let top = tmp.path().join("top.avhdx");
    let d = Vhdx::create_differencing(
        &top,
        &mid,
        &child_opts(2 * MIB as u32),
        &OpenOptions::default(),
        false,
    );
    // mid's parent (base) is outside mid's directory: refused by default.
    let e = d.unwrap_err();
    assert!(
        e.to_string().contains("not allowed by the parent policy"),
        "{e}"
    );
    let allow = OpenOptions {
        parent_policy: ParentPolicy {
            allowed_dirs: vec![tmp.path().to_path_buf()],
            ..ParentPolicy::default()
        },
        ..OpenOptions::default()
    };
    let d =
        Vhdx::create_differencing(&top, &mid, &child_opts(2 * MIB as u32), &allow, false).unwrap();
    apply_writes(&d, &mut model, &[(3000, 5000), (2 * MIB + 1, 10)], 40);
    assert_same(&read_all(&d), &model, "chain, fresh");
    d.close().unwrap();
    // top is in tmp, so the whole chain lies under its directory.
    let d = Vhdx::open(&top, &OpenOptions::default()).unwrap();
    assert_same(&read_all(&d), &model, "chain, reopened");
    let p = d.parent().unwrap();
    let g = p.parent().unwrap();
    assert!(g.parent().is_none());
    assert!(matches!(p.map(1000, 1).unwrap().mapping, Mapping::Data(_)));
    assert_eq!(p.map(MIB, 1).unwrap().mapping, Mapping::Parent);
}

#[test]
fn linkage_is_checked_and_relink_follows_a_moved_parent() {
    let tmp = tempfile::tempdir().unwrap();
    let base = tmp.path().join("base.vhdx");
    let model = base_file(&base, 4 * MIB, MIB as u32, 512, 5);
    let child = tmp.path().join("child.avhdx");
    Vhdx::create_differencing(
        &child,
        &base,
        &child_opts(MIB as u32),
        &OpenOptions::default(),
        false,
    )
    .unwrap()
    .close()
    .unwrap();
    // Move the parent away and to a new name: not found.
    std::fs::create_dir(tmp.path().join("store")).unwrap();
    let moved = tmp.path().join("store").join("renamed.vhdx");
    std::fs::rename(&base, &moved).unwrap();
    let e = Vhdx::open(&child, &OpenOptions::default()).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::InvalidInput);
    let msg = e.to_string();
    assert!(msg.contains("parent is missing"), "{msg}");
    assert!(msg.contains("relative_path=.\\base.vhdx"), "{msg}");
    assert!(msg.contains(&child.display().to_string()), "{msg}");
    // Relink (verified: same DataWriteGuid), then it opens.
    Vhdx::set_parent(&child, &moved, false, &OpenOptions::default()).unwrap();
    let d = Vhdx::open(&child, &OpenOptions::default()).unwrap();
    assert_same(&read_all(&d), &model, "after relink");
    assert_eq!(
        d.info()
            .metadata
            .parent_locator
            .as_ref()
            .unwrap()
            .get("relative_path"),
        Some(".\\store\\renamed.vhdx")
    );
    drop(d);
    // A disk that is not its parent: refused by linkage, on open and relink.
    let other = tmp.path().join("other.vhdx");
    base_file(&other, 4 * MIB, MIB as u32, 512, 6);
    let e = Vhdx::set_parent(&child, &other, false, &OpenOptions::default()).unwrap_err();
    assert!(e.to_string().contains("not this disk's parent"), "{e}");
    // Writing to the parent changes its DataWriteGuid: the child refuses it.
    let p = Vhdx::open(&moved, &rw()).unwrap();
    p.write_at(&[1], 0).unwrap();
    p.close().unwrap();
    let e = Vhdx::open(&child, &OpenOptions::default()).unwrap_err();
    assert!(e.to_string().contains("DataWriteGuid"), "{e}");
    let forced = OpenOptions {
        ignore_parent_linkage: true,
        ..OpenOptions::default()
    };
    Vhdx::open(&child, &forced).unwrap();
}

#[test]
fn relink_keeps_the_childs_own_identity() {
    // A grandchild stays linked when its parent (the child) is relinked.
    let tmp = tempfile::tempdir().unwrap();
    let base = tmp.path().join("base.vhdx");
    let model = base_file(&base, 4 * MIB, MIB as u32, 512, 8);
    let child = tmp.path().join("child.avhdx");
    let gc = tmp.path().join("gc.avhdx");
    Vhdx::create_differencing(
        &child,
        &base,
        &child_opts(MIB as u32),
        &OpenOptions::default(),
        false,
    )
    .unwrap()
    .close()
    .unwrap();
    Vhdx::create_differencing(
        &gc,
        &child,
        &child_opts(MIB as u32),
        &OpenOptions::default(),
        false,
    )
    .unwrap()
    .close()
    .unwrap();
    let copy = tmp.path().join("base-copy.vhdx");
    std::fs::copy(&base, &copy).unwrap();
    Vhdx::set_parent(&child, &copy, false, &OpenOptions::default()).unwrap();
    std::fs::remove_file(&base).unwrap();
    let d = Vhdx::open(&gc, &OpenOptions::default()).unwrap();
    assert_same(
        &read_all(&d),
        &model,
        "grandchild after its parent was relinked",
    );
}

#[test]
fn stale_parent_paths_are_updated_on_a_writable_open() {
    // MS-VHDX 2.6.2.6.3: after a chain opens, stale path entries are made
    // to point at the parent found (only when the child is open writable).
    let tmp = tempfile::tempdir().unwrap();
    let dir1 = tmp.path().join("one");
    std::fs::create_dir(&dir1).unwrap();
    let base = dir1.join("base.vhdx");
    let model = base_file(&base, 4 * MIB, MIB as u32, 512, 21);
    let child = dir1.join("child.avhdx");
    let gc = dir1.join("gc.avhdx");
    for (c, p) in [(&child, &base), (&gc, &child)] {
        Vhdx::create_differencing(
            c,
            p,
            &child_opts(MIB as u32),
            &OpenOptions::default(),
            false,
        )
        .unwrap()
        .close()
        .unwrap();
    }
    // Move the directory: relative_path (.\base.vhdx) still leads to the
    // parent, absolute_win32_path (.../one/base.vhdx) is stale.
    let dir2 = tmp.path().join("two");
    std::fs::rename(&dir1, &dir2).unwrap();
    let (base, child, gc) = (
        dir2.join("base.vhdx"),
        dir2.join("child.avhdx"),
        dir2.join("gc.avhdx"),
    );
    let loc_of = |p: &Path| Vhdx::inspect(p).unwrap().metadata.parent_locator.unwrap();
    let old = loc_of(&child);
    let abs_key = "absolute_win32_path";
    assert!(old.get(abs_key).unwrap().contains("one"), "{old:?}");
    // A read-only open changes nothing.
    Vhdx::open(&child, &OpenOptions::default()).unwrap();
    assert_eq!(loc_of(&child).entries, old.entries);
    let before = std::fs::read(&base).unwrap();
    // A writable open rewrites the stale entry only.
    Vhdx::open(&child, &rw()).unwrap().close().unwrap();
    let new = loc_of(&child);
    let want = std::fs::canonicalize(&base)
        .unwrap()
        .display()
        .to_string()
        .replace('/', "\\");
    assert_eq!(new.get(abs_key), Some(want.as_str()), "Win32 syntax");
    assert_eq!(new.get("relative_path"), old.get("relative_path"));
    assert_eq!(new.get("parent_linkage"), old.get("parent_linkage"));
    assert_eq!(std::fs::read(&base).unwrap(), before, "parent untouched");
    // The reverse: the relative path stale, the absolute one good (as an
    // older relink or another tool may leave it).
    let sub = dir2.join("sub");
    std::fs::create_dir(&sub).unwrap();
    let moved = sub.join("base.vhdx");
    std::fs::rename(&base, &moved).unwrap();
    {
        let mut loc = loc_of(&child);
        for (k, v) in loc.entries.iter_mut() {
            if k == abs_key {
                *v = std::fs::canonicalize(&moved).unwrap().display().to_string();
            }
        }
        let d = Vhdx::open_with_parent(
            &child,
            &OpenOptions {
                writable: true,
                keep_data_write_guid: true,
                ..OpenOptions::default()
            },
            Arc::new(Vhdx::open(&moved, &OpenOptions::default()).unwrap()),
        )
        .unwrap();
        d.set_parent_locator(&loc).unwrap();
        d.close().unwrap();
    }
    let d = Vhdx::open(&child, &rw()).unwrap();
    assert_same(&read_all(&d), &model, "child after the parent moved");
    d.close().unwrap();
    assert_eq!(
        loc_of(&child).get("relative_path"),
        Some(".\\sub\\base.vhdx")
    );
    // The grandchild is still linked to the child (DataWriteGuid kept).
    let g = Vhdx::open(&gc, &OpenOptions::default()).unwrap();
    assert_same(&read_all(&g), &model, "grandchild after the update");
}

#[test]
fn a_windows_drive_path_is_not_rewritten_on_a_writable_open() {
    // An absolute_win32_path written by Windows (C:\...) names a file on
    // another system: a writable open here leaves it alone, while a stale
    // relative_path is still updated to the parent found.
    let tmp = tempfile::tempdir().unwrap();
    let base = tmp.path().join("base.vhdx");
    let model = base_file(&base, 4 * MIB, MIB as u32, 512, 5);
    let child = tmp.path().join("child.avhdx");
    Vhdx::create_differencing(
        &child,
        &base,
        &child_opts(MIB as u32),
        &OpenOptions::default(),
        false,
    )
    .unwrap()
    .close()
    .unwrap();
    let loc_of = |p: &Path| Vhdx::inspect(p).unwrap().metadata.parent_locator.unwrap();
    let mut loc = loc_of(&child);
    for (k, v) in loc.entries.iter_mut() {
        match k.as_str() {
            "absolute_win32_path" => *v = "C:\\VMs\\base.vhdx".into(),
            "relative_path" => *v = ".\\old\\base.vhdx".into(),
            _ => {}
        }
    }
    {
        let d = Vhdx::open_with_parent(
            &child,
            &OpenOptions {
                writable: true,
                keep_data_write_guid: true,
                ..OpenOptions::default()
            },
            Arc::new(Vhdx::open(&base, &OpenOptions::default()).unwrap()),
        )
        .unwrap();
        d.set_parent_locator(&loc).unwrap();
        d.close().unwrap();
    }
    // Found by its file name beside the child.
    let d = Vhdx::open(&child, &rw()).unwrap();
    assert_same(&read_all(&d), &model, "child");
    d.close().unwrap();
    let new = loc_of(&child);
    assert_eq!(new.get("absolute_win32_path"), Some("C:\\VMs\\base.vhdx"));
    assert_eq!(new.get("relative_path"), Some(".\\base.vhdx"));
}

#[test]
fn corpus_orphan_shows_its_locator() {
    let Some(dir) = corpus("vhdx") else { return };
    let tmp = tempfile::tempdir().unwrap();
    let img = decompress(
        &dir.join("dissect-differencing-orphan.avhdx.gz"),
        tmp.path(),
    );
    let info = Vhdx::inspect(&img).unwrap();
    let pl = info.metadata.parent_locator.as_ref().unwrap();
    assert!(pl.get("parent_linkage").is_some());
    assert_eq!(
        info.parent_linkages().len(),
        pl.entries
            .iter()
            .filter(|(k, _)| k.starts_with("parent_linkage"))
            .count()
    );
    let e = Vhdx::open(&img, &OpenOptions::default()).unwrap_err();
    assert!(e.to_string().contains("parent is missing"), "{e}");
}

// ---- In memory: crash test and model test. ----

fn mem_parent(size: u64, block: u32, seed: u64) -> (Vec<u8>, Vec<u8>) {
    let st = Arc::new(MemStorage::new("parent.vhdx"));
    let mut o = CreateOptions::new(size);
    o.block_size = block;
    let d = Vhdx::create_on(Box::new(st.clone()), &o).unwrap();
    let model = fill_parent(&d, seed);
    d.close().unwrap();
    (st.to_vec(), model)
}

fn open_parent(bytes: &[u8]) -> Arc<dyn VirtualDisk> {
    Arc::new(
        Vhdx::open_storage(
            Box::new(MemStorage::from_vec("parent.vhdx", bytes.to_vec())),
            &OpenOptions::default(),
        )
        .unwrap(),
    )
}

fn mem_child(parent: &[u8], block: u32) -> Vec<u8> {
    let p = Vhdx::open_storage(
        Box::new(MemStorage::from_vec("parent.vhdx", parent.to_vec())),
        &OpenOptions::default(),
    )
    .unwrap();
    let loc = parent_locator_for(
        Path::new("/nonexistent/child.avhdx"),
        Path::new("/"),
        p.info().header.data_write_guid,
    )
    .unwrap();
    let st = Arc::new(MemStorage::new("child.avhdx"));
    Vhdx::create_differencing_on(Box::new(st.clone()), &child_opts(block), loc, Arc::new(p))
        .unwrap()
        .close()
        .unwrap();
    st.to_vec()
}

fn open_child(st: Box<dyn disk::Storage>, opts: &OpenOptions, pbytes: &[u8]) -> Vhdx {
    Vhdx::open_storage_with_parent(st, opts, open_parent(pbytes)).unwrap()
}

fn crash_run(block: u32, seed: u64) {
    let (pbytes, pmodel) = mem_parent(4 * MIB, MIB as u32, seed);
    let rec = Arc::new(RecordingStorage::new("rec", mem_child(&pbytes, block)));
    let d = open_child(Box::new(rec.clone()), &rw(), &pbytes);
    let size = d.virtual_size();
    let h = DiffWorkload::run(&rec, &d, pmodel, seed);
    std::mem::forget(d); // a crash: no close
    for_each_crash(&rec, seed, |img, cut, strategy| {
        let what = format!("{strategy} cut {cut}");
        let ro = Vhdx::open_storage_with_parent(
            Box::new(MemStorage::from_vec("crash", img.clone())),
            &OpenOptions::default(),
            open_parent(&pbytes),
        )
        .unwrap_or_else(|e| panic!("{what}: open failed: {e}"));
        h.verify(&ro, cut, &what);
        drop(ro);
        if strategy != "torn" {
            return;
        }
        // Writable after the crash (the log is replayed): still works.
        let st = Arc::new(MemStorage::from_vec("crash-rw", img));
        let rw_d = open_child(Box::new(st.clone()), &rw(), &pbytes);
        let off = size - DIFF_SPARE + 300;
        rw_d.write_at(&[0xee; 700], off).unwrap();
        rw_d.close().unwrap();
        let again = open_child(
            Box::new(MemStorage::from_vec("again", st.to_vec())),
            &OpenOptions::default(),
            &pbytes,
        );
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
fn crash_at_every_point_keeps_flushed_writes_1m_blocks() {
    crash_run(MIB as u32, 0x5eed_0101);
}

#[test]
fn crash_at_every_point_keeps_flushed_writes_2m_blocks() {
    crash_run(2 * MIB as u32, 0x5eed_0102);
}

#[derive(Debug, Clone)]
enum Op {
    Write { off: u64, len: usize, seed: u8 },
    Read { off: u64, len: usize },
    Discard { off: u64, len: u64 },
    Flush,
    Reopen,
}

const PSIZE: u64 = 6 * MIB;

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        6 => (0..PSIZE, 1usize..300_000, any::<u8>()).prop_map(|(off, len, seed)| Op::Write { off, len, seed }),
        3 => (0..PSIZE, 1usize..2_000_000).prop_map(|(off, len)| Op::Read { off, len }),
        1 => (0..PSIZE, 1u64..3 * MIB).prop_map(|(off, len)| Op::Discard { off, len }),
        1 => Just(Op::Flush),
        1 => Just(Op::Reopen),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 48, ..ProptestConfig::default() })]
    #[test]
    fn child_matches_vec_model(
        cblock_shift in 0u32..2,
        pseed in any::<u64>(),
        ops in proptest::collection::vec(op(), 1..30),
    ) {
        let cblock = (MIB as u32) << cblock_shift;
        let (pbytes, mut model) = mem_parent(PSIZE, MIB as u32, pseed);
        let size = model.len() as u64;
        let mut st = Arc::new(MemStorage::from_vec("child.avhdx", mem_child(&pbytes, cblock)));
        let mut d = open_child(Box::new(st.clone()), &rw(), &pbytes);
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
                Op::Discard { off, len } => {
                    d.discard(off, len).unwrap();
                    // Whole blocks inside the range read as zeros after a discard.
                    for b in disk::whole_blocks(off, len, u64::from(cblock), size) {
                        let s = (b * u64::from(cblock)) as usize;
                        let e = (s + cblock as usize).min(size as usize);
                        model[s..e].fill(0);
                    }
                }
                Op::Flush => d.flush().unwrap(),
                Op::Reopen => {
                    d.close().unwrap();
                    st = Arc::new(MemStorage::from_vec("child.avhdx", st.to_vec()));
                    d = open_child(Box::new(st.clone()), &rw(), &pbytes);
                }
            }
        }
        prop_assert!(read_all(&d) == model);
        d.close().unwrap();
        let again = open_child(Box::new(MemStorage::from_vec("c2", st.to_vec())), &OpenOptions::default(), &pbytes);
        prop_assert!(read_all(&again) == model);
    }
}

#[test]
fn make_standalone_keeps_present_data_and_drops_the_parent() {
    let tmp = tempfile::tempdir().unwrap();
    let base = tmp.path().join("base.vhdx");
    let pmodel = base_file(&base, 6 * MIB, MIB as u32, 512, 9);
    let child = tmp.path().join("child.avhdx");
    let d = Vhdx::create_differencing(
        &child,
        &base,
        &child_opts(MIB as u32),
        &OpenOptions::default(),
        false,
    )
    .unwrap();
    // Copy the parent's first 2 MiB + 100 bytes in (block 2 partial), and a
    // sector-unaligned write elsewhere.
    let mut model = vec![0u8; pmodel.len()];
    d.write_at(&pmodel[..2 * MIB as usize + 100], 0).unwrap();
    model[..2 * MIB as usize + 100].copy_from_slice(&pmodel[..2 * MIB as usize + 100]);
    // The rest of the sector holding byte 2 MiB + 99 came from the parent.
    let end = (2 * MIB as usize + 100).div_ceil(512) * 512;
    model[2 * MIB as usize + 100..end].copy_from_slice(&pmodel[2 * MIB as usize + 100..end]);
    let p = pattern(3000, 4);
    d.write_at(&p, 4 * MIB + 7).unwrap();
    let s0 = (4 * MIB as usize + 7) / 512 * 512;
    let s1 = (4 * MIB as usize + 3007).div_ceil(512) * 512;
    model[s0..s1].copy_from_slice(&pmodel[s0..s1]);
    model[4 * MIB as usize + 7..4 * MIB as usize + 3007].copy_from_slice(&p);
    d.close().unwrap();
    let d = Vhdx::open(&child, &rw()).unwrap();
    d.make_standalone().unwrap();
    std::fs::remove_file(&base).unwrap();
    let d = Vhdx::open(&child, &OpenOptions::default()).unwrap();
    assert_eq!(d.info().subformat(), "dynamic");
    assert!(d.info().metadata.parent_locator.is_none());
    assert_same(&read_all(&d), &model, "standalone");
    if have("qemu-img") {
        let raw = tmp.path().join("c.raw");
        dump_raw(&d, &raw, d.virtual_size());
        run(std::process::Command::new("qemu-img")
            .args(["check", "-f", "vhdx"])
            .arg(&child));
        run(std::process::Command::new("qemu-img")
            .args(["compare", "-f", "vhdx", "-F", "raw"])
            .arg(&child)
            .arg(&raw));
    }
}
