//! Relinking a differencing VHD to a moved or adopted parent
//! (`Vhd::set_parent`, like Hyper-V's `Set-VHD -ParentPath`) and turning a
//! differencing VHD into a standalone dynamic one (`Vhd::make_standalone`):
//! the chain reads the same bytes, the locators and ids are right, refusals
//! leave the file untouched, every crash point opens, and qemu-img agrees.

// Test images and buffers are small: their offsets and sizes fit any integer type.
#![allow(clippy::cast_possible_truncation)]

mod common;
use common::*;
use disk::fault::RecordingStorage;
use disk::testing::crash::for_each_crash;
use disk::{Mapping, MemStorage, ParentPolicy, VirtualDisk};
use std::path::Path;
use std::sync::Arc;
use vhd::dynamic_header::DynamicHeader;
use vhd::footer::{DiskType, Footer};
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

/// A dynamic VHD file with a pattern.
fn base_file(path: &Path, size: u64, seed: u64) {
    let d = Vhd::create(path, &CreateOptions::new(size), false).unwrap();
    fill_parent(&d, seed);
    d.close().unwrap();
}

/// A differencing child of `parent` with a few unaligned writes of its own.
fn child_file(path: &Path, parent: &Path, block: u32, seed: u64) {
    let d = Vhd::create_differencing(path, parent, &child_opts(block), false).unwrap();
    let size = d.virtual_size();
    for (i, (off, len)) in [(100u64, 3000usize), (MIB + 7, 70_000), (size - 513, 513)]
        .into_iter()
        .enumerate()
    {
        d.write_at(&pattern(len, seed + i as u64), off).unwrap();
    }
    d.close().unwrap();
}

fn read_file(path: &Path, opts: &OpenOptions) -> Vec<u8> {
    read_all(&Vhd::open(path, opts).unwrap_or_else(|e| panic!("{}: {e}", path.display())))
}

fn header_of(path: &Path) -> DynamicHeader {
    Vhd::inspect(path).unwrap().header.unwrap()
}

/// Every byte that differs between `before` and `after` lies in the
/// dynamic disk header or in a locator data space of `old` (the header
/// `before` holds): the footers, BAT, bitmaps and data are untouched.
fn only_header_and_locators_changed(before: &[u8], after: &[u8], old: &DynamicHeader) {
    assert_eq!(before.len(), after.len(), "the file length changed");
    let allowed = |i: u64| {
        (512..1536).contains(&i)
            || old
                .locators()
                .any(|(_, l)| (l.data_offset..l.data_offset + l.data_space_bytes()).contains(&i))
    };
    for (i, (a, b)) in before.iter().zip(after).enumerate() {
        assert!(a == b || allowed(i as u64), "byte {i:#x} changed");
    }
}

/// A copy of the VHD at `from` with another unique id (both footers).
fn copy_with_new_id(from: &Path, to: &Path) -> uuid::Uuid {
    let mut bytes = std::fs::read(from).unwrap();
    let id = uuid::Uuid::new_v4();
    let n = bytes.len();
    for at in [0, n - 512] {
        let mut f = Footer::parse(&bytes[at..at + 512]).unwrap();
        f.unique_id = id;
        f.write_to(&mut bytes[at..at + 512]);
    }
    std::fs::write(to, bytes).unwrap();
    id
}

/// The VHD time stamp of a file's modification time.
fn mtime_stamp(p: &Path) -> u32 {
    let t = std::fs::metadata(p).unwrap().modified().unwrap();
    let unix = t.duration_since(std::time::UNIX_EPOCH).unwrap().as_secs();
    (unix - vhd::footer::VHD_EPOCH_UNIX) as u32
}

#[test]
fn relink_after_moving_the_parent() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path().canonicalize().unwrap();
    let vms = root.join("vms");
    std::fs::create_dir(&vms).unwrap();
    let base = vms.join("base.vhd");
    base_file(&base, 4 * MIB, 1);
    let child = vms.join("child.vhd");
    child_file(&child, &base, 64 * 1024, 10);
    let gc = vms.join("gc.vhd");
    child_file(&gc, &child, 2 * MIB as u32, 20);
    let want_child = read_file(&child, &OpenOptions::default());
    let want_gc = read_file(&gc, &OpenOptions::default());
    let child_id = Vhd::inspect(&child).unwrap().footer.unique_id;

    // Moved (and renamed) into a directory under the child's: lost.
    std::fs::create_dir_all(vms.join("sub").join("dir")).unwrap();
    let moved = vms.join("sub").join("dir").join("moved.vhd");
    std::fs::rename(&base, &moved).unwrap();
    let e = Vhd::open(&child, &OpenOptions::default()).unwrap_err();
    assert!(e.to_string().contains("parent is missing"), "{e}");

    let old = header_of(&child);
    let before = std::fs::read(&child).unwrap();
    Vhd::set_parent(&child, &moved, false, &OpenOptions::default()).unwrap();
    only_header_and_locators_changed(&before, &std::fs::read(&child).unwrap(), &old);

    let d = Vhd::open(&child, &OpenOptions::default()).unwrap();
    assert_same(&read_all(&d), &want_child, "relinked child");
    assert_eq!(Path::new(d.info().parent_file.as_deref().unwrap()), moved);
    assert_eq!(
        d.info().parent_locators,
        [
            (
                "W2ku".to_string(),
                moved.display().to_string().replace('/', "\\")
            ),
            ("W2ru".to_string(), ".\\sub\\dir\\moved.vhd".to_string()),
        ]
    );
    assert_eq!(
        d.info().footer.unique_id,
        child_id,
        "the child's id changed"
    );
    let h = d.info().header.clone().unwrap();
    assert_eq!(h.parent_name(), "moved.vhd");
    assert_eq!(h.parent_unique_id, old.parent_unique_id);
    assert_eq!(h.parent_timestamp, mtime_stamp(&moved));
    drop(d);
    // The grandchild still finds the child (same id) and reads the same.
    assert_same(
        &read_file(&gc, &OpenOptions::default()),
        &want_gc,
        "grandchild after relinking the child",
    );

    // Out of the child's directory: a `..` path, followed when the policy
    // allows that directory.
    let store = root.join("store");
    std::fs::create_dir(&store).unwrap();
    let far = store.join("base2.vhd");
    std::fs::rename(&moved, &far).unwrap();
    Vhd::set_parent(&child, &far, false, &OpenOptions::default()).unwrap();
    let h = header_of(&child);
    assert_eq!(h.parent_name(), "base2.vhd");
    let info = Vhd::inspect(&child).unwrap();
    assert_eq!(info.parent_locators[1].1, "..\\store\\base2.vhd");
    let allow = OpenOptions {
        parent_policy: ParentPolicy {
            allowed_dirs: vec![store.clone()],
            ..ParentPolicy::default()
        },
        ..OpenOptions::default()
    };
    assert_same(
        &read_file(&child, &allow),
        &want_child,
        "child, `..` parent",
    );
    assert_same(&read_file(&gc, &allow), &want_gc, "grandchild, `..` parent");
    // The default policy does not follow it.
    assert!(Vhd::open(&child, &OpenOptions::default()).is_err());
}

#[test]
fn another_id_needs_adopt() {
    let tmp = tempfile::tempdir().unwrap();
    let base = tmp.path().join("base.vhd");
    base_file(&base, 4 * MIB, 5);
    let child = tmp.path().join("child.vhd");
    child_file(&child, &base, 2 * MIB as u32, 50);
    let want = read_file(&child, &OpenOptions::default());
    let base_id = Vhd::inspect(&base).unwrap().footer.unique_id;
    let child_id = Vhd::inspect(&child).unwrap().footer.unique_id;
    let other = tmp.path().join("other.vhd");
    let other_id = copy_with_new_id(&base, &other);

    let hash = file_hash(&child);
    let e = Vhd::set_parent(&child, &other, false, &OpenOptions::default()).unwrap_err();
    let msg = e.to_string();
    eprintln!("{msg}");
    assert_eq!(e.kind(), ErrorKind::InvalidInput);
    assert!(msg.contains("not this disk's parent"), "{msg}");
    assert!(msg.contains(&base_id.to_string()), "{msg}");
    assert!(msg.contains(&other_id.to_string()), "{msg}");
    assert!(msg.contains("other.vhd"), "{msg}");
    assert!(msg.contains(&child.display().to_string()), "{msg}");
    assert_eq!(file_hash(&child), hash, "a refused relink wrote");

    std::fs::remove_file(&base).unwrap();
    Vhd::set_parent(&child, &other, true, &OpenOptions::default()).unwrap();
    let info = Vhd::inspect(&child).unwrap();
    let h = info.header.unwrap();
    assert_eq!(h.parent_unique_id, other_id);
    assert_eq!(h.parent_name(), "other.vhd");
    assert_eq!(info.footer.unique_id, child_id);
    let d = Vhd::open(&child, &OpenOptions::default()).unwrap();
    assert_same(&read_all(&d), &want, "adopted parent");
    drop(d);
    // Now the adopted id is the one checked: relinking to it again needs
    // no adopt.
    Vhd::set_parent(&child, &other, false, &OpenOptions::default()).unwrap();
}

#[test]
fn relink_refusals() {
    let tmp = tempfile::tempdir().unwrap();
    let base = tmp.path().join("base.vhd");
    base_file(&base, 4 * MIB, 5);
    let child = tmp.path().join("child.vhd");
    child_file(&child, &base, 2 * MIB as u32, 50);
    let gc = tmp.path().join("gc.vhd");
    child_file(&gc, &child, 2 * MIB as u32, 60);
    let hash = file_hash(&child);
    let no = |e: vhd::Error, what: &str| {
        let msg = e.to_string();
        eprintln!("{msg}");
        assert_eq!(e.kind(), ErrorKind::InvalidInput, "{msg}");
        assert!(msg.contains(what), "{msg}");
    };
    // Another size, even when adopting.
    let small = tmp.path().join("small.vhd");
    base_file(&small, 2 * MIB, 1);
    no(
        Vhd::set_parent(&child, &small, true, &OpenOptions::default()).unwrap_err(),
        "virtual size",
    );
    // Itself, or a disk whose chain holds it.
    no(
        Vhd::set_parent(&child, &child, true, &OpenOptions::default()).unwrap_err(),
        "own parent",
    );
    no(
        Vhd::set_parent(&child, &gc, true, &OpenOptions::default()).unwrap_err(),
        "loop",
    );
    // A disk that is not differencing has no parent to change.
    let e = Vhd::set_parent(&base, &small, true, &OpenOptions::default()).unwrap_err();
    no(e, "not a differencing disk");
    assert_eq!(file_hash(&child), hash, "a refused relink wrote");
}

#[test]
fn too_long_a_path_is_refused_and_nothing_written() {
    let tmp = tempfile::tempdir().unwrap();
    let base = tmp.path().join("base.vhd");
    base_file(&base, 4 * MIB, 3);
    let child = tmp.path().join("child.vhd");
    child_file(&child, &base, 64 * 1024, 30);
    // Our locator spaces are the paths' lengths rounded up to 512 bytes: a
    // 300-character path (600 bytes of UTF-16) does not fit.
    let deep = tmp.path().join("a".repeat(150)).join("b".repeat(150));
    std::fs::create_dir_all(&deep).unwrap();
    let far = deep.join("base.vhd");
    std::fs::copy(&base, &far).unwrap();
    let before = std::fs::read(&child).unwrap();
    let e = Vhd::set_parent(&child, &far, false, &OpenOptions::default()).unwrap_err();
    let msg = e.to_string();
    eprintln!("{msg}");
    assert_eq!(e.kind(), ErrorKind::InvalidInput);
    assert!(msg.contains("do not fit"), "{msg}");
    assert!(msg.contains("W2ru"), "{msg}");
    assert!(std::fs::read(&child).unwrap() == before, "the file changed");
    // Still the old parent's child.
    Vhd::open(&child, &OpenOptions::default()).unwrap();
}

#[test]
fn make_standalone_keeps_the_content() {
    let tmp = tempfile::tempdir().unwrap();
    let base = tmp.path().join("base.vhd");
    base_file(&base, 4 * MIB, 7);
    let child = tmp.path().join("child.vhd");
    let d = Vhd::create_differencing(&child, &base, &child_opts(64 * 1024), false).unwrap();
    let size = d.virtual_size();
    // Every sector written (as a merge would copy the parent's first).
    d.write_at(&pattern(size as usize, 70), 0).unwrap();
    d.close().unwrap();
    let want = read_file(&child, &OpenOptions::default());
    let id = Vhd::inspect(&child).unwrap().footer.unique_id;

    Vhd::open(&child, &rw()).unwrap().make_standalone().unwrap();
    std::fs::remove_file(&base).unwrap();
    let info = Vhd::inspect(&child).unwrap();
    assert_eq!(info.subformat(), "dynamic");
    assert_eq!(info.footer.unique_id, id);
    let h = info.header.clone().unwrap();
    assert!(h.parent_unique_id.is_nil());
    assert_eq!((h.parent_timestamp, h.parent_name().as_str()), (0, ""));
    assert_eq!(h.locators().count(), 0);
    // Both footers say dynamic.
    let bytes = std::fs::read(&child).unwrap();
    assert_eq!(
        Footer::parse(&bytes[..512]).unwrap().disk_type,
        DiskType::Dynamic
    );
    let d = Vhd::open(&child, &OpenOptions::default()).unwrap();
    assert!(d.parent().is_none());
    assert_same(&read_all(&d), &want, "standalone");
    if have("qemu-img") {
        let raw = tmp.path().join("want.raw");
        dump_raw(&d, &raw, size);
        qemu_compare(&child, "vpc", &raw, "raw").unwrap();
    }
    drop(d);
    // Writable as a dynamic disk.
    let d = Vhd::open(&child, &rw()).unwrap();
    d.write_at(&[9u8; 1000], 5000).unwrap();
    d.close().unwrap();
    let mut want = want;
    want[5000..6000].fill(9);
    assert_same(
        &read_file(&child, &OpenOptions::default()),
        &want,
        "written",
    );

    // A disk that is not differencing is refused.
    let e = Vhd::open(&child, &rw())
        .unwrap()
        .make_standalone()
        .unwrap_err();
    assert_eq!(e.kind(), ErrorKind::InvalidInput);
    assert!(e.to_string().contains("not a differencing disk"), "{e}");
}

/// The method on an image just written: its unflushed writes (data, BAT
/// entries and bitmap bits still in memory) are flushed before the disk
/// becomes standalone, and read back from it.
#[test]
fn make_standalone_flushes_the_open_image_first() {
    let tmp = tempfile::tempdir().unwrap();
    let base = tmp.path().join("base.vhd");
    base_file(&base, 4 * MIB, 9);
    let child = tmp.path().join("child.vhd");
    let d = Vhd::create_differencing(&child, &base, &child_opts(64 * 1024), false).unwrap();
    let size = d.virtual_size();
    let want = pattern(size as usize, 90);
    d.write_at(&want, 0).unwrap();
    d.make_standalone().unwrap();
    std::fs::remove_file(&base).unwrap();
    let d = Vhd::open(&child, &OpenOptions::default()).unwrap();
    assert_eq!(d.info().subformat(), "dynamic");
    assert_same(&read_all(&d), &want, "written, then standalone");
}

#[test]
fn make_standalone_reads_zeros_where_the_parent_was() {
    let tmp = tempfile::tempdir().unwrap();
    let base = tmp.path().join("base.vhd");
    base_file(&base, 4 * MIB, 8);
    let child = tmp.path().join("child.vhd");
    child_file(&child, &base, 64 * 1024, 80);
    let d = Vhd::open(&child, &OpenOptions::default()).unwrap();
    let mut want = read_all(&d);
    for s in 0..d.virtual_size() / 512 {
        if d.map(s * 512, 512).unwrap().mapping == Mapping::Parent {
            want[(s * 512) as usize..(s * 512 + 512) as usize].fill(0);
        }
    }
    assert!(want.iter().any(|&b| b != 0));
    drop(d);
    Vhd::open(&child, &rw()).unwrap().make_standalone().unwrap();
    std::fs::remove_file(&base).unwrap();
    let d = Vhd::open(&child, &OpenOptions::default()).unwrap();
    assert_same(&read_all(&d), &want, "present sectors, zeros elsewhere");
    if have("qemu-img") {
        // QEMU ignores the sector bitmaps, but the sectors our writes never
        // touched hold zeros in the file, so it reads the same.
        let raw = tmp.path().join("want.raw");
        dump_raw(&d, &raw, d.virtual_size());
        qemu_compare(&child, "vpc", &raw, "raw").unwrap();
    }
}

// ---- Crash tests, on a recording storage. ----

fn mem_disk(bytes: &[u8], name: &str) -> Vhd {
    Vhd::open_storage(
        Box::new(MemStorage::from_vec(name, bytes.to_vec())),
        &OpenOptions::default(),
    )
    .unwrap()
}

/// A parent (bytes) and a child over it (bytes) with writes of its own, or
/// with every sector written (`full`); the child's content.
fn mem_pair(full: bool, seed: u64) -> (Vec<u8>, Vec<u8>, Vec<u8>) {
    let pst = Arc::new(MemStorage::new("parent.vhd"));
    let mut o = CreateOptions::new(4 * MIB);
    o.block_size = 64 * 1024;
    let p = Vhd::create_on(Box::new(pst.clone()), &o).unwrap();
    fill_parent(&p, seed);
    p.close().unwrap();
    let pbytes = pst.to_vec();
    let cst = Arc::new(MemStorage::new("child.vhd"));
    let link = ParentLink {
        name: "parent.vhd".into(),
        relative: ".\\parent.vhd".into(),
        absolute: "/old/place/parent.vhd".into(),
        timestamp: 0,
    };
    let c = Vhd::create_differencing_on(
        Box::new(cst.clone()),
        mem_disk(&pbytes, "parent.vhd"),
        &link,
        &child_opts(64 * 1024),
    )
    .unwrap();
    if full {
        c.write_at(&pattern(c.virtual_size() as usize, seed + 1), 0)
            .unwrap();
    } else {
        fill_parent(&c, seed + 1);
        c.write_at(&[0u8; 3000], 2 * MIB + 100).unwrap();
    }
    let model = read_all(&c);
    c.close().unwrap();
    (pbytes, cst.to_vec(), model)
}

#[test]
fn crash_during_set_parent_keeps_the_child_readable() {
    let (pbytes, cbytes, model) = mem_pair(false, 0x5e7);
    let old = DynamicHeader::parse(&cbytes[512..1536]).unwrap();
    // The adopted parent: the same data under another id.
    let mut adopted = pbytes.clone();
    let n = adopted.len();
    let mut f = Footer::parse(&adopted[n - 512..]).unwrap();
    f.unique_id = uuid::Uuid::new_v4();
    f.write_to(&mut adopted[n - 512..]);
    let new_link = ParentLink {
        name: "moved.vhd".into(),
        relative: ".\\sub\\moved.vhd".into(),
        absolute: "/new/place/sub/moved.vhd".into(),
        timestamp: 1234,
    };
    for (adopt, pb) in [(false, &pbytes), (true, &adopted)] {
        let rec = Arc::new(RecordingStorage::new("child.vhd", cbytes.clone()));
        Vhd::set_parent_on(
            Box::new(rec.clone()),
            &mem_disk(pb, "moved.vhd"),
            &new_link,
            adopt,
        )
        .unwrap();
        assert_eq!(rec.flush_points().len(), 2, "adopt {adopt}: two syncs");
        let new = DynamicHeader::parse(&rec.contents()[512..1536]).unwrap();
        assert_ne!(new, old);
        assert_eq!(new.parent_name(), "moved.vhd");
        assert_eq!(new.parent_timestamp, 1234);
        let want_id = Footer::parse(&pb[pb.len() - 512..]).unwrap().unique_id;
        assert_eq!(new.parent_unique_id, want_id);
        let mut states = (0, 0);
        for_each_crash(&rec, 17, |img, cut, strategy| {
            let what = format!("adopt {adopt}, {strategy} cut {cut}");
            // The header is whole: the old one or the new one.
            let h = DynamicHeader::parse(&img[512..1536])
                .unwrap_or_else(|e| panic!("{what}: header: {e}"));
            assert!(h == old || h == new, "{what}: a third header");
            let d = Vhd::open_storage_with_parent(
                Box::new(MemStorage::from_vec("crash.vhd", img.clone())),
                &OpenOptions::default(),
                Arc::new(mem_disk(pb, "moved.vhd")),
            )
            .unwrap_or_else(|e| panic!("{what}: open failed: {e}"));
            assert_same(&read_all(&d), &model, &what);
            assert_eq!(&img[..512], &cbytes[..512], "{what}: footer copy");
            assert_eq!(&img[img.len() - 512..], &cbytes[cbytes.len() - 512..]);
            if h == new {
                states.1 += 1;
                assert_eq!(
                    d.info().parent_locators,
                    [
                        ("W2ku".to_string(), new_link.absolute.clone()),
                        ("W2ru".to_string(), new_link.relative.clone()),
                    ],
                    "{what}"
                );
            } else {
                states.0 += 1;
            }
        });
        assert!(states.0 > 0 && states.1 > 0, "{states:?}");
    }
}

#[test]
fn half_done_relink_still_finds_the_old_parent_by_name() {
    // A power cut between the two syncs of a relink leaves the old header
    // (old parent id and name) with locator data already naming the new
    // parent: the search skips the new parent (another id) and finds the
    // old one by its name beside the child.
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path().canonicalize().unwrap();
    let (base, child, other) = (
        root.join("base.vhd"),
        root.join("child.vhd"),
        root.join("other.vhd"),
    );
    base_file(&base, 4 * MIB, 0x77);
    child_file(&child, &base, MIB as u32, 0x78);
    let want = read_file(&child, &OpenOptions::default());
    copy_with_new_id(&base, &other);
    let bytes = std::fs::read(&child).unwrap();
    let rec = Arc::new(RecordingStorage::new("child.vhd", bytes));
    let link = ParentLink {
        name: "other.vhd".into(),
        relative: ".\\other.vhd".into(),
        absolute: other.display().to_string(),
        timestamp: 1,
    };
    let new_parent = Vhd::open(&other, &OpenOptions::default()).unwrap();
    Vhd::set_parent_on(Box::new(rec.clone()), &new_parent, &link, true).unwrap();
    let first_sync = rec.flush_points()[0];
    std::fs::write(&child, rec.crash_image(first_sync + 1, |_| false)).unwrap();
    let h = header_of(&child);
    assert_eq!(h.parent_name(), "base.vhd", "the old header");
    let d = Vhd::open(&child, &OpenOptions::default()).unwrap();
    assert_eq!(
        d.info().parent_file.as_deref(),
        Some(base.to_str().unwrap())
    );
    assert_same(&read_all(&d), &want, "half-relinked child");
    // The relink finished: the new parent.
    drop(d);
    std::fs::write(&child, rec.contents()).unwrap();
    let d = Vhd::open(&child, &OpenOptions::default()).unwrap();
    assert_eq!(
        d.info().parent_file.as_deref(),
        Some(other.to_str().unwrap())
    );
    assert_same(&read_all(&d), &want, "relinked child");
    // A candidate with another id is refused, and named, when nothing else
    // matches.
    drop(d);
    let other_id = copy_with_new_id(&base, &other);
    let e = Vhd::open(&child, &OpenOptions::default()).unwrap_err();
    assert!(
        e.to_string().contains(&format!("has unique id {other_id}")),
        "{e}"
    );
}

#[test]
fn crash_during_make_standalone_always_opens() {
    let (pbytes, cbytes, model) = mem_pair(true, 0x57a);
    let rec = Arc::new(RecordingStorage::new("child.vhd", cbytes.clone()));
    Vhd::open_storage_with_parent(
        Box::new(rec.clone()),
        &rw(),
        Arc::new(mem_disk(&pbytes, "parent.vhd")),
    )
    .unwrap()
    .make_standalone()
    .unwrap();
    // The image's own flush (nothing was written: no write before it),
    // then the three steps.
    assert_eq!(rec.flush_points().len(), 4);
    let mut seen = std::collections::BTreeSet::new();
    for_each_crash(&rec, 23, |img, cut, strategy| {
        let what = format!("{strategy} cut {cut}");
        let n = img.len();
        let tail = Footer::parse(&img[n - 512..]).unwrap().disk_type;
        let head = Footer::parse(&img[..512]).unwrap().disk_type;
        let named = !DynamicHeader::parse(&img[512..1536])
            .unwrap()
            .parent_unique_id
            .is_nil();
        seen.insert((tail.name(), head.name(), named));
        let st = Box::new(MemStorage::from_vec("crash.vhd", img));
        let d = if tail == DiskType::Dynamic {
            // No parent anywhere: the parent fields of the header (still
            // there before the last step) must be ignored.
            let d = Vhd::open_storage(st, &OpenOptions::default())
                .unwrap_or_else(|e| panic!("{what}: open failed: {e}"));
            assert!(d.parent().is_none(), "{what}");
            d
        } else {
            assert_eq!(head, DiskType::Differencing, "{what}");
            Vhd::open_storage_with_parent(
                st,
                &OpenOptions::default(),
                Arc::new(mem_disk(&pbytes, "parent.vhd")),
            )
            .unwrap_or_else(|e| panic!("{what}: open failed: {e}"))
        };
        assert_same(&read_all(&d), &model, &what);
    });
    // Differencing; dynamic at the end only; both footers dynamic with the
    // parent still named; done.
    assert_eq!(
        seen.into_iter().collect::<Vec<_>>(),
        [
            ("differencing", "differencing", true),
            ("dynamic", "differencing", true),
            ("dynamic", "dynamic", false),
            ("dynamic", "dynamic", true),
        ]
    );
}

/// The Windows-made orphan differencing image from the corpus (locator
/// data spaces in bytes, 4 KiB and 64 KiB) relinked to a stand-in parent
/// with the id it expects, in a subdirectory; then made standalone.
#[test]
fn windows_child_relinks_and_stands_alone() {
    let Some(dir) = corpus("vhd") else { return };
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path().canonicalize().unwrap();
    let img = decompress(&dir.join("dfvfs-fat-differential-orphan.vhd.gz"), &root);
    let info = Vhd::inspect(&img).unwrap();
    let old = info.header.clone().unwrap();
    std::fs::create_dir(root.join("parents")).unwrap();
    let parent = root.join("parents").join("fat-parent.vhd");
    let mut o = CreateOptions::new(info.virtual_size);
    o.fixed = true;
    o.azure = true;
    let p = Vhd::create(&parent, &o, false).unwrap();
    let pmodel = pattern(info.virtual_size as usize, 77);
    p.write_at(&pmodel, 0).unwrap();
    p.close().unwrap();
    let mut bytes = std::fs::read(&parent).unwrap();
    let n = bytes.len();
    let mut f = Footer::parse(&bytes[n - 512..]).unwrap();
    f.unique_id = old.parent_unique_id;
    f.write_to(&mut bytes[n - 512..]);
    std::fs::write(&parent, bytes).unwrap();

    let given = || Arc::new(Vhd::open(&parent, &OpenOptions::default()).unwrap());
    let d = Vhd::open_with_parent(&img, &OpenOptions::default(), given()).unwrap();
    let want = read_all(&d);
    let present: Vec<bool> = (0..info.virtual_size / 512)
        .map(|s| matches!(d.map(s * 512, 512).unwrap().mapping, Mapping::Data(_)))
        .collect();
    drop(d);
    assert!(Vhd::open(&img, &OpenOptions::default()).is_err());

    let before = std::fs::read(&img).unwrap();
    Vhd::set_parent(&img, &parent, false, &OpenOptions::default()).unwrap();
    only_header_and_locators_changed(&before, &std::fs::read(&img).unwrap(), &old);
    let d = Vhd::open(&img, &OpenOptions::default()).unwrap();
    assert_same(&read_all(&d), &want, "relinked Windows child");
    assert_eq!(d.info().parent_locators[1].1, ".\\parents\\fat-parent.vhd");
    // Each path went back into its own code's space, described as before.
    let h = d.info().header.clone().unwrap();
    for (_, l) in h.locators() {
        let was = old
            .locators()
            .find(|(_, o)| o.platform_code == l.platform_code)
            .unwrap()
            .1;
        assert_eq!(
            (l.data_offset, l.data_space),
            (was.data_offset, was.data_space)
        );
    }
    drop(d);

    Vhd::open(&img, &rw()).unwrap().make_standalone().unwrap();
    std::fs::remove_file(&parent).unwrap();
    let d = Vhd::open(&img, &OpenOptions::default()).unwrap();
    assert_eq!(d.info().subformat(), "dynamic");
    let got = read_all(&d);
    for (s, &p) in present.iter().enumerate() {
        let r = s * 512..s * 512 + 512;
        if p {
            assert!(got[r.clone()] == want[r], "sector {s}");
        } else {
            assert!(got[r].iter().all(|&b| b == 0), "sector {s}");
        }
    }
}
