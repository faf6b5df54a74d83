//! Failing storage: each operation on a VHDX and a VHD (write + flush of
//! an allocating, unaligned write; discard + flush; resize up; resize down)
//! is run again and again with the storage failing its n-th mutation
//! (write, flush or set_len), n = 0, 1, 2... until the operation no longer
//! meets the fault, alternately with EIO and ENOSPC. Each time:
//! - the operation returns an error naming the file and the fault (no
//!   panic);
//! - the file, as left, opens, and every sector reads as before the
//!   operation or as after it (its size one or the other);
//! - retrying the operation on it completes, and reads as after.
//!
//! Then, on files, every file an operation opens reached through a
//! `FaultOpener` failing its n-th mutation (any file), same rounds:
//! - compact (dynamic and differencing, VHDX and VHD, opened, compacted and
//!   closed as `vdisk compact` does): the image reads exactly as before
//!   (a compact never changes contents) and a check finds no corruption
//!   (a leak or unused space may stay); a retry compacts it to the very
//!   file size a compact without faults gives, and a check finds nothing;
//! - relink (`image::chain::set_parent` to a copy of the parent, and to
//!   another image of the same contents with `adopt`): the child opens over
//!   the old parent or the new one and reads as before; a retry links it
//!   to the new one;
//! - convert (`image::convert`, a chain into a new VHDX, VHD and raw image
//!   replacing an existing file): the source is untouched, no target is
//!   left (see `image::convert` for why), a retry makes an image that
//!   reads as the source. A target another open holds is left alone.

// Test data: small disks whose sizes and offsets fit any integer type.
#![allow(clippy::cast_possible_truncation)]

use disk::fault::{Fault, RecordingStorage};
use disk::{Storage, VirtualDisk};
use std::sync::Arc;

const MIB: u64 = 1 << 20;
const SIZE: u64 = 16 * MIB;

/// A driver under test, opened on a storage.
trait Driver: VirtualDisk + Sized {
    fn create(s: Box<dyn Storage>) -> Self;
    fn open(s: Box<dyn Storage>, writable: bool) -> disk::Result<Self>;
    fn resize(&mut self, size: u64) -> disk::Result<()>;
    fn shut(self) -> disk::Result<()>;
}

impl Driver for vhdx::Vhdx {
    fn create(s: Box<dyn Storage>) -> Self {
        let mut o = vhdx::CreateOptions::new(SIZE);
        o.block_size = MIB as u32;
        vhdx::Vhdx::create_on(s, &o).unwrap()
    }
    fn open(s: Box<dyn Storage>, writable: bool) -> disk::Result<Self> {
        vhdx::Vhdx::open_storage(
            s,
            &vhdx::OpenOptions {
                writable,
                ..Default::default()
            },
        )
    }
    fn resize(&mut self, size: u64) -> disk::Result<()> {
        vhdx::Vhdx::resize(self, size, true).map(|_| ())
    }
    fn shut(self) -> disk::Result<()> {
        self.close()
    }
}

impl Driver for vhd::Vhd {
    fn create(s: Box<dyn Storage>) -> Self {
        let mut o = vhd::CreateOptions::new(SIZE);
        o.block_size = MIB as u32;
        vhd::Vhd::create_on(s, &o).unwrap()
    }
    fn open(s: Box<dyn Storage>, writable: bool) -> disk::Result<Self> {
        vhd::Vhd::open_storage(
            s,
            &vhd::OpenOptions {
                writable,
                ..Default::default()
            },
        )
    }
    fn resize(&mut self, size: u64) -> disk::Result<()> {
        vhd::Vhd::resize(self, size, true).map(|_| ())
    }
    fn shut(self) -> disk::Result<()> {
        self.close()
    }
}

type Op<D> = fn(&mut D) -> disk::Result<()>;

fn write_flush<D: Driver>(d: &mut D) -> disk::Result<()> {
    let p: Vec<u8> = (0..3 * MIB + 1000).map(|i| (i % 241) as u8 + 1).collect();
    d.write_at(&p, MIB + 100)?;
    d.flush()
}

fn discard_flush<D: Driver>(d: &mut D) -> disk::Result<()> {
    d.discard(2 * MIB, 4 * MIB)?;
    d.flush()
}

fn grow<D: Driver>(d: &mut D) -> disk::Result<()> {
    d.resize(24 * MIB)
}

fn shrink<D: Driver>(d: &mut D) -> disk::Result<()> {
    d.resize(8 * MIB)
}

fn read_all(d: &dyn VirtualDisk) -> Vec<u8> {
    let mut v = vec![0u8; d.virtual_size() as usize];
    d.read_at(&mut v, 0).unwrap();
    v
}

/// The image every run starts from: data in some blocks, closed.
fn initial<D: Driver>() -> Vec<u8> {
    let s = Arc::new(RecordingStorage::new("img", Vec::new()));
    let d = D::create(Box::new(s.clone()));
    let data: Vec<u8> = (0..6 * MIB).map(|i| (i % 239) as u8 + 7).collect();
    d.write_at(&data, 512 * 3).unwrap();
    d.shut().unwrap();
    s.contents()
}

/// Every sector of `got` is `before`'s or `after`'s (by size).
fn either(got: &[u8], before: &[u8], after: &[u8], what: &str) {
    let want_sizes = [before.len(), after.len()];
    assert!(
        want_sizes.contains(&got.len()),
        "{what}: virtual size {} is neither {want_sizes:?}",
        got.len()
    );
    for (i, s) in got.chunks(512).enumerate() {
        let r = i * 512..i * 512 + s.len();
        let b = before.get(r.clone());
        let a = after.get(r.clone());
        assert!(
            b == Some(s) || a == Some(s),
            "{what}: sector {i} reads neither as before nor as after"
        );
    }
}

fn run<D: Driver>(name: &str, op: Op<D>) {
    let start = initial::<D>();
    // Before and after, without faults.
    let before =
        read_all(&D::open(Box::new(RecordingStorage::new("img", start.clone())), false).unwrap());
    let s = Arc::new(RecordingStorage::new("img", start.clone()));
    let mut d = D::open(Box::new(s.clone()), true).unwrap();
    op(&mut d).unwrap();
    d.shut().unwrap();
    let after =
        read_all(&D::open(Box::new(RecordingStorage::new("img", s.contents())), false).unwrap());
    let mut faults = 0;
    for n in 0.. {
        assert!(n < 10_000, "{name}: the operation never completes");
        let fault = if n % 2 == 0 {
            Fault::Eio
        } else {
            Fault::Enospc
        };
        let s = Arc::new(RecordingStorage::new("img", start.clone()));
        let mut d = D::open(Box::new(s.clone()), true).unwrap();
        s.fail_mutation_after(Some(n), fault);
        let r = op(&mut d);
        if s.fault_pending() {
            // It did fewer than n mutations: every point was covered.
            r.unwrap();
            break;
        }
        let what = format!("{name}, fault {fault:?} at mutation {n}");
        match r {
            // The fault hit a write the operation needs no more (e.g. one
            // it retries or cleans up); it must then have succeeded fully.
            Ok(()) => {}
            Err(e) => {
                faults += 1;
                let msg = format!("{e:#}");
                assert!(
                    msg.contains("img") && msg.contains("injected fault"),
                    "{what}: {msg}"
                );
            }
        }
        // The process goes on (the handle dropped, as a caller would).
        drop(d);
        let left = s.contents();
        let reopened = D::open(Box::new(RecordingStorage::new("img", left.clone())), false)
            .unwrap_or_else(|e| panic!("{what}: the image does not open: {e:#}"));
        either(&read_all(&reopened), &before, &after, &what);
        // Retrying completes.
        let s2 = Arc::new(RecordingStorage::new("img", left));
        let mut d2 = D::open(Box::new(s2.clone()), true)
            .unwrap_or_else(|e| panic!("{what}: reopen writable: {e:#}"));
        op(&mut d2).unwrap_or_else(|e| panic!("{what}: the retry failed: {e:#}"));
        d2.shut().unwrap();
        let done = read_all(
            &D::open(Box::new(RecordingStorage::new("img", s2.contents())), false).unwrap(),
        );
        assert!(done == after, "{what}: the retry does not read as after");
    }
    eprintln!("{name}: {faults} faults injected, every one survived");
    assert!(faults > 0, "{name}: no fault was ever injected");
}

#[test]
fn vhdx_operations_under_faults() {
    run::<vhdx::Vhdx>("vhdx write+flush", write_flush);
    run::<vhdx::Vhdx>("vhdx discard+flush", discard_flush);
    run::<vhdx::Vhdx>("vhdx resize up", grow);
    run::<vhdx::Vhdx>("vhdx resize down", shrink);
}

#[test]
fn vhd_operations_under_faults() {
    run::<vhd::Vhd>("vhd write+flush", write_flush);
    run::<vhd::Vhd>("vhd discard+flush", discard_flush);
    run::<vhd::Vhd>("vhd resize up", grow);
    run::<vhd::Vhd>("vhd resize down", shrink);
}

// Compact and relink, on files through the front door: every file the
// operation opens is reached through a `FaultOpener`.

use disk::fault::FaultOpener;
use image::chain::{chain_files, set_parent};
use image::{CreateOptions, Format, Kind, OpenOptions};
use std::path::{Path, PathBuf};

fn ext(format: Format) -> &'static str {
    if format == Format::Vhdx {
        "vhdx"
    } else {
        "vhd"
    }
}

/// A new dynamic image (1 MiB blocks) at `path`, or a differencing one
/// over `parent`.
fn make(path: &Path, format: Format, parent: Option<&Path>) {
    let kind = if format == Format::Vhdx {
        let mut o = vhdx::CreateOptions::new(SIZE);
        o.block_size = MIB as u32;
        Kind::Vhdx(o)
    } else {
        let mut o = vhd::CreateOptions::new(SIZE);
        o.block_size = MIB as u32;
        Kind::Vhd(o)
    };
    let mut o = CreateOptions::new(kind);
    o.parent = parent.map(Path::to_path_buf);
    image::create(path, &o).unwrap().close().unwrap();
}

fn write_file(path: &Path, off: u64, data: &[u8]) {
    let img = image::open(path, &OpenOptions::probing().writable()).unwrap();
    img.disk().write_at(data, off).unwrap();
    img.close().unwrap();
}

fn read_file(path: &Path) -> Vec<u8> {
    read_all(&**image::open(path, &OpenOptions::probing()).unwrap().disk())
}

fn pattern(len: u64, seed: u64) -> Vec<u8> {
    disk::testing::pattern(len as usize, seed)
}

/// The problems a check finds; with `leaks_too`, leaks and unused space
/// (which a compact cut short may leave, and which lose nothing) count.
fn problems(path: &Path, format: Format, leaks_too: bool) -> Vec<String> {
    let o = disk::check::CheckOptions::default();
    let r = if format == Format::Vhdx {
        vhdx::check::check_file(path, &o)
    } else {
        vhd::check::check_file(path, &o)
    }
    .unwrap();
    r.problems
        .iter()
        .filter(|p| {
            leaks_too
                || !matches!(
                    p.kind,
                    disk::check::ProblemKind::Leak | disk::check::ProblemKind::Unused
                )
        })
        .map(|p| format!("{p:?}"))
        .collect()
}

/// Open `path` writable through `opener`, compact it and close it (as
/// `vdisk compact` does).
fn compact(path: &Path, opener: Arc<dyn disk::Opener>) -> disk::Result<disk::CompactReport> {
    let o = OpenOptions {
        opener,
        ..OpenOptions::probing().writable()
    };
    match image::open(path, &o)?.into_driver() {
        d @ image::Driver::Vhdx(_) => {
            let mut d = d.into_vhdx()?;
            let r = d.compact(&mut |_| {})?;
            d.close().map(|()| r)
        }
        d => {
            let mut d = d.into_vhd()?;
            let r = d.compact(&mut |_| {})?;
            d.close().map(|()| r)
        }
    }
}

/// A dynamic image with blocks of zeros to free and data blocks above them
/// to move down, or a differencing one over a base with data whose blocks
/// hold the parent's bytes (freed), zeros over data (VHDX: a ZERO block),
/// sectors of their own (VHDX: PARTIALLY_PRESENT, with a sector bitmap)
/// and data above the holes. Returns the image to compact.
fn compact_template(dir: &Path, format: Format, differencing: bool) -> PathBuf {
    let base = dir.join(format!("base.{}", ext(format)));
    make(&base, format, None);
    if !differencing {
        write_file(&base, 0, &pattern(10 * MIB, 1));
        for b in [1, 3, 5] {
            write_file(&base, b * MIB, &vec![0; MIB as usize]);
        }
        return base;
    }
    let parent = pattern(12 * MIB, 2);
    write_file(&base, 0, &parent);
    let child = dir.join(format!("child.{}", ext(format)));
    make(&child, format, Some(&base));
    // Block 0: the parent's bytes; 1: zeros; 2: a few sectors of its own;
    // 3: some of the parent's sectors only; 4..9: data.
    write_file(&child, 0, &parent[..MIB as usize]);
    write_file(&child, MIB, &vec![0; MIB as usize]);
    write_file(&child, 2 * MIB + 4096, &pattern(3000, 3));
    let at = (3 * MIB + 8192) as usize;
    write_file(&child, at as u64, &parent[at..at + 5000]);
    write_file(&child, 4 * MIB, &pattern(6 * MIB, 4));
    // Block 5 then reads as the parent again: freed, a hole to fill.
    write_file(&child, 5 * MIB, &parent[5 * MIB as usize..6 * MIB as usize]);
    child
}

fn run_compact(format: Format, differencing: bool) {
    let name = format!(
        "{format:?} {} compact",
        if differencing {
            "differencing"
        } else {
            "dynamic"
        }
    );
    let tmp = tempfile::tempdir().unwrap();
    let tpl = tmp.path().join("tpl");
    std::fs::create_dir(&tpl).unwrap();
    let target = compact_template(&tpl, format, differencing);
    let file = target.file_name().unwrap().to_owned();
    let before = read_file(&target);
    let len = |p: &Path| std::fs::metadata(p).unwrap().len();
    let old_len = len(&target);
    // Without faults: what compacting gives.
    let clean = tmp.path().join("clean");
    copy_dir(&tpl, &clean);
    let report = compact(&clean.join(&file), disk::file_opener()).unwrap();
    let clean_len = len(&clean.join(&file));
    assert!(clean_len < old_len, "{name}: nothing to compact");
    assert!(
        report.blocks_freed > 0 && report.blocks_moved > 0,
        "{name}: {report:?}"
    );
    assert!(read_file(&clean.join(&file)) == before, "{name}: clean");
    let mut faults = 0;
    for n in 0.. {
        assert!(n < 2000, "{name}: never completes");
        let fault = if n % 2 == 0 {
            Fault::Eio
        } else {
            Fault::Enospc
        };
        let dir = tmp.path().join(format!("run{n}"));
        copy_dir(&tpl, &dir);
        let path = dir.join(&file);
        let opener = Arc::new(FaultOpener::new(n, fault));
        let r = compact(&path, opener.clone());
        if opener.pending() {
            r.unwrap_or_else(|e| panic!("{name}: without a fault: {e:#}"));
            break;
        }
        let what = format!("{name}, {fault:?} at mutation {n}");
        let msg = format!(
            "{:#}",
            r.expect_err(&format!("{what}: Ok, though a write failed"))
        );
        assert!(
            msg.contains("injected fault") && msg.contains(path.to_str().unwrap()),
            "{what}: {msg}"
        );
        faults += 1;
        // A compact never changes what the disk reads.
        assert!(read_file(&path) == before, "{what}: reads differently");
        let bad = problems(&path, format, false);
        assert!(bad.is_empty(), "{what}: check finds {bad:#?}");
        compact(&path, disk::file_opener())
            .unwrap_or_else(|e| panic!("{what}: the retry failed: {e:#}"));
        assert!(read_file(&path) == before, "{what}: after the retry");
        assert!(
            len(&path) == clean_len,
            "{what}: the retry leaves {} bytes, a clean compact {clean_len}",
            len(&path)
        );
        let left = problems(&path, format, true);
        assert!(
            left.is_empty(),
            "{what}: after the retry, check finds {left:#?}"
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }
    eprintln!("{name}: {faults} faults injected, every one survived");
    assert!(faults > 0, "{name}: no fault was injected");
}

fn copy_dir(src: &Path, dst: &Path) {
    std::fs::create_dir_all(dst).unwrap();
    for e in std::fs::read_dir(src).unwrap() {
        let e = e.unwrap();
        std::fs::copy(e.path(), dst.join(e.file_name())).unwrap();
    }
}

#[test]
fn compact_under_faults() {
    for format in [Format::Vhdx, Format::Vhd] {
        run_compact(format, false);
        run_compact(format, true);
    }
}

/// Relink a child from `base` to `new` (a copy of base, the same identity;
/// or, with `adopt`, an image of the same contents and another identity)
/// with the files failing.
fn run_relink(format: Format, adopt: bool) {
    let name = format!(
        "{format:?} set_parent{}",
        if adopt { " (adopt)" } else { "" }
    );
    let tmp = tempfile::tempdir().unwrap();
    let tpl = tmp.path().join("tpl");
    std::fs::create_dir(&tpl).unwrap();
    let f = |dir: &Path, n: &str| dir.join(format!("{n}.{}", ext(format)));
    let base = f(&tpl, "base");
    make(&base, format, None);
    let data = pattern(5 * MIB, 5);
    write_file(&base, 0, &data);
    let child = f(&tpl, "child");
    make(&child, format, Some(&base));
    write_file(&child, 3 * MIB + 512, &pattern(2 * MIB, 6));
    let new = f(&tpl, "new");
    if adopt {
        make(&new, format, None);
        write_file(&new, 0, &data);
    } else {
        std::fs::copy(&base, &new).unwrap();
    }
    let before = read_file(&child);
    let relink = |dir: &Path, opener: Arc<dyn disk::Opener>| {
        let o = OpenOptions {
            opener,
            ..OpenOptions::probing()
        };
        set_parent(&f(dir, "child"), &f(dir, "new"), adopt, &o)
    };
    let mut faults = 0;
    for n in 0.. {
        assert!(n < 200, "{name}: never completes");
        let fault = if n % 2 == 0 {
            Fault::Eio
        } else {
            Fault::Enospc
        };
        let dir = tmp.path().join(format!("run{n}"));
        copy_dir(&tpl, &dir);
        let opener = Arc::new(FaultOpener::new(n, fault));
        let r = relink(&dir, opener.clone());
        if opener.pending() {
            r.unwrap_or_else(|e| panic!("{name}: without a fault: {e:#}"));
            break;
        }
        let what = format!("{name}, {fault:?} at mutation {n}");
        let msg = format!(
            "{:#}",
            r.expect_err(&format!("{what}: Ok, though a write failed"))
        );
        assert!(
            msg.contains("injected fault") && msg.contains(f(&dir, "child").to_str().unwrap()),
            "{what}: {msg}"
        );
        faults += 1;
        // The child opens over the old parent or the new one.
        assert!(read_file(&f(&dir, "child")) == before, "{what}: reads");
        let parent = chain_files(&f(&dir, "child"), &OpenOptions::probing()).unwrap()[1].clone();
        assert!(
            parent == f(&dir, "base") || parent == f(&dir, "new"),
            "{what}: linked to {}",
            parent.display()
        );
        relink(&dir, disk::file_opener())
            .unwrap_or_else(|e| panic!("{what}: the retry failed: {e:#}"));
        // Done: the old parent is no longer needed.
        std::fs::remove_file(f(&dir, "base")).unwrap();
        assert!(read_file(&f(&dir, "child")) == before, "{what}: after");
        let chain = chain_files(&f(&dir, "child"), &OpenOptions::probing()).unwrap();
        assert_eq!(chain[1], f(&dir, "new"), "{what}");
        std::fs::remove_dir_all(&dir).unwrap();
    }
    eprintln!("{name}: {faults} faults injected, every one survived");
    assert!(faults > 0, "{name}: no fault was injected");
}

#[test]
fn relink_under_faults() {
    for format in [Format::Vhdx, Format::Vhd] {
        run_relink(format, false);
        run_relink(format, true);
    }
}

/// Convert a chain (a differencing VHDX over a base) into a new VHDX, VHD
/// and raw image with the target failing: the error names the target and
/// the fault, the source files are untouched, the target (which existed
/// before, and was replaced) is gone, and a retry makes an image that
/// reads as the source.
fn run_convert(kind: Kind) {
    let name = format!("convert to {:?}", kind.format());
    let tmp = tempfile::tempdir().unwrap();
    let base = tmp.path().join("base.vhdx");
    make(&base, Format::Vhdx, None);
    write_file(&base, 0, &pattern(6 * MIB, 7));
    let child = tmp.path().join("child.vhdx");
    make(&child, Format::Vhdx, Some(&base));
    write_file(&child, 2 * MIB + 999, &pattern(3 * MIB, 8));
    write_file(&child, 12 * MIB, &pattern(MIB, 9));
    let want = read_file(&child);
    let files_before = [
        std::fs::read(&base).unwrap(),
        std::fs::read(&child).unwrap(),
    ];
    let target = tmp.path().join("target");
    let convert = |opener: Arc<dyn disk::Opener>| {
        let src = image::open(&child, &OpenOptions::probing()).unwrap();
        let o = CreateOptions {
            overwrite: true,
            opener,
            ..CreateOptions::new(kind.clone())
        };
        let mut last = None;
        let r = image::convert(&**src.disk(), &target, &o, false, &mut |s| last = Some(s));
        if r.is_ok() {
            let s = last.expect("progress was reported");
            assert_eq!((s.done, s.total), (SIZE, SIZE), "{name}: progress");
        }
        r
    };
    let mut faults = 0;
    for n in 0.. {
        assert!(n < 2000, "{name}: never completes");
        let fault = if n % 2 == 0 {
            Fault::Eio
        } else {
            Fault::Enospc
        };
        // A file by the target's name, which the convert replaces.
        std::fs::write(&target, b"an older file").unwrap();
        let opener = Arc::new(FaultOpener::new(n, fault));
        let r = convert(opener.clone());
        if opener.pending() {
            r.unwrap_or_else(|e| panic!("{name}: without a fault: {e:#}"));
            break;
        }
        let what = format!("{name}, {fault:?} at mutation {n}");
        let msg = format!(
            "{:#}",
            r.expect_err(&format!("{what}: Ok, though a write failed"))
        );
        assert!(
            msg.contains("injected fault") && msg.contains(target.to_str().unwrap()),
            "{what}: {msg}"
        );
        faults += 1;
        assert!(!target.exists(), "{what}: an incomplete target is left");
        assert!(
            [
                std::fs::read(&base).unwrap(),
                std::fs::read(&child).unwrap()
            ] == files_before,
            "{what}: the source changed"
        );
        let done = convert(disk::file_opener())
            .unwrap_or_else(|e| panic!("{what}: the retry failed: {e:#}"));
        let got = read_file(&target);
        assert_eq!(got.len() as u64, done.virtual_size, "{what}");
        assert!(got[..want.len()] == want[..], "{what}: reads differently");
        assert!(got[want.len()..].iter().all(|&b| b == 0), "{what}: tail");
        std::fs::remove_file(&target).unwrap();
    }
    eprintln!("{name}: {faults} faults injected, every one survived");
    assert!(faults > 0, "{name}: no fault was injected");
}

#[test]
fn convert_under_faults() {
    let mut x = vhdx::CreateOptions::new(0);
    x.block_size = MIB as u32;
    run_convert(Kind::Vhdx(x));
    let mut v = vhd::CreateOptions::new(0);
    v.block_size = MIB as u32;
    run_convert(Kind::Vhd(v));
    run_convert(Kind::Raw { size: 0 });
}

/// A convert whose target another open holds is refused, and the target
/// is left as it was (it is not the convert's to remove).
#[test]
fn convert_onto_a_held_target_leaves_it() {
    let tmp = tempfile::tempdir().unwrap();
    let src = tmp.path().join("src.vhdx");
    make(&src, Format::Vhdx, None);
    write_file(&src, 0, &pattern(MIB, 10));
    let target = tmp.path().join("held.vhdx");
    make(&target, Format::Vhdx, None);
    write_file(&target, 0, &pattern(MIB, 11));
    let bytes = std::fs::read(&target).unwrap();
    let held = image::open(&target, &OpenOptions::probing().writable()).unwrap();
    let s = image::open(&src, &OpenOptions::probing()).unwrap();
    let o = CreateOptions {
        overwrite: true,
        ..CreateOptions::new(Kind::Vhdx(vhdx::CreateOptions::new(0)))
    };
    let e = image::convert(&**s.disk(), &target, &o, false, &mut |_| {}).unwrap_err();
    assert_eq!(e.kind(), disk::ErrorKind::Locked, "{e:#}");
    drop(held);
    assert!(
        std::fs::read(&target).unwrap() == bytes,
        "the held target changed"
    );
}

/// A failed convert onto a symbolic link removes the incomplete file the
/// link names (where the image was written).
#[test]
fn failed_convert_through_a_symlink_removes_the_file_it_names() {
    let tmp = tempfile::tempdir().unwrap();
    let src = tmp.path().join("src.vhdx");
    make(&src, Format::Vhdx, None);
    write_file(&src, 0, &pattern(MIB, 12));
    let real = tmp.path().join("real.vhdx");
    std::fs::write(&real, b"old").unwrap();
    let link = tmp.path().join("link.vhdx");
    std::os::unix::fs::symlink(&real, &link).unwrap();
    let s = image::open(&src, &OpenOptions::probing()).unwrap();
    let o = CreateOptions {
        overwrite: true,
        opener: Arc::new(FaultOpener::new(3, Fault::Enospc)),
        ..CreateOptions::new(Kind::Vhdx(vhdx::CreateOptions::new(0)))
    };
    let e = image::convert(&**s.disk(), &link, &o, false, &mut |_| {}).unwrap_err();
    assert!(format!("{e:#}").contains("injected fault"), "{e:#}");
    assert!(!real.exists(), "the incomplete image is left");
    assert!(link.symlink_metadata().is_ok(), "the link itself stays");
}
