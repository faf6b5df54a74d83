//! Chain merges into failing storage: merge into the child (top, which
//! then links to base; and mid, which then stands alone), merge into the
//! parent, rebase onto the grandparent (data copied) and rebase onto a copy
//! of the parent (a relink only), on a VHDX and a VHD chain base ← mid ←
//! top. Each runs again and again with the files failing their n-th
//! mutation (write, flush or length change, in any file the operation
//! reaches through its opener), n = 0, 1, 2... until the operation no
//! longer meets the fault, alternately EIO and ENOSPC. Each time:
//! - the operation returns an error naming a file and the fault (no panic,
//!   and never success: no write of these operations may fail unnoticed);
//! - every file of the chain opens, with its chain; top (the leaf) reads
//!   exactly as before, and so does every layer the operation does not
//!   merge into; mid, when it is merged into, reads per sector as before or
//!   as top (what the merge writes there is what top reads);
//! - the disk being relinked links to its old parent or its new one (or
//!   none: made standalone), as the crash protocol of `checkpoint::merge`
//!   promises: the relink is the last step, one logged (VHDX) or one-page
//!   (VHD) write, and a disk made standalone is a valid differencing disk
//!   until its last logged flush;
//! - running the operation again (a merge into the child only while top
//!   still links to mid: once relinked it is done) completes it, with the
//!   result a clean run gives.

mod common;

use checkpoint::merge::{merge_into_ancestor, merge_into_child, rebase};
use checkpoint::Format;
use common::{copy_dir, make_chain, read_all};
use disk::fault::{Fault, FaultOpener};
use disk::Opener;
use image::chain::chain_files;
use image::OpenOptions;
use std::path::{Path, PathBuf};
use std::sync::Arc;

#[derive(Clone, Copy, Debug, PartialEq)]
enum Kind {
    /// top takes mid's data and links to base.
    IntoChild,
    /// mid takes base's data and stands alone (top still links to it).
    IntoChildStandalone,
    IntoParent,
    /// Onto base: mid's data is copied into top.
    RebaseOntoBase,
    /// Onto a copy of mid (the same identity): a relink only.
    RebaseOntoCopy,
}

struct Files {
    base: PathBuf,
    mid: PathBuf,
    top: PathBuf,
    copy: PathBuf,
}

fn files(dir: &Path, format: Format) -> Files {
    let ext = if format == Format::Vhdx {
        "vhdx"
    } else {
        "vhd"
    };
    let f = |n: &str| dir.join(format!("{n}.{ext}"));
    Files {
        base: f("base"),
        mid: f("mid"),
        top: f("top"),
        copy: f("copy"),
    }
}

fn op(kind: Kind, f: &Files, opener: Arc<dyn Opener>) -> disk::Result<()> {
    let o = OpenOptions {
        opener,
        ..OpenOptions::probing()
    };
    match kind {
        Kind::IntoChild => merge_into_child(&f.top, &o, &mut |_| {}).map(|_| ()),
        Kind::IntoChildStandalone => merge_into_child(&f.mid, &o, &mut |_| {}).map(|_| ()),
        Kind::IntoParent => merge_into_ancestor(&f.top, 1, &o, &mut |_| {}).map(|_| ()),
        Kind::RebaseOntoBase => rebase(&f.top, &f.base, &o, &mut |_| {}).map(|_| ()),
        Kind::RebaseOntoCopy => rebase(&f.top, &f.copy, &o, &mut |_| {}).map(|_| ()),
    }
}

/// The parent `disk` links to (the second file of its chain).
fn parent_of(disk: &Path) -> Option<PathBuf> {
    chain_files(disk, &OpenOptions::probing())
        .unwrap()
        .get(1)
        .cloned()
}

/// Every 512-byte sector of `got` is `a`'s or `b`'s.
fn sectors_either(got: &[u8], a: &[u8], b: &[u8], what: &str) {
    assert_eq!(got.len(), a.len(), "{what}: size");
    for (i, s) in got.chunks(512).enumerate() {
        let r = i * 512..i * 512 + s.len();
        assert!(
            &a[r.clone()] == s || &b[r] == s,
            "{what}: sector {i} reads neither as before nor as top"
        );
    }
}

fn run(format: Format, kind: Kind) {
    let name = format!("{format:?} {kind:?}");
    let tmp = tempfile::tempdir().unwrap();
    let tpl = tmp.path().join("tpl");
    std::fs::create_dir(&tpl).unwrap();
    let (want_mid, want_top) = make_chain(&tpl, format);
    let t = files(&tpl, format);
    std::fs::copy(&t.mid, &t.copy).unwrap();
    let want_base = read_all(&t.base);
    // The disk whose link changes, its parent before and after.
    let relinked = |f: &Files| match kind {
        Kind::IntoChildStandalone => f.mid.clone(),
        _ => f.top.clone(),
    };
    let old_parent = |f: &Files| match kind {
        Kind::IntoChildStandalone => Some(f.base.clone()),
        _ => Some(f.mid.clone()),
    };
    let new_parent = |f: &Files| match kind {
        Kind::IntoChild | Kind::RebaseOntoBase => Some(f.base.clone()),
        Kind::IntoChildStandalone => None,
        Kind::IntoParent => Some(f.mid.clone()),
        Kind::RebaseOntoCopy => Some(f.copy.clone()),
    };
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
        let f = files(&dir, format);
        let opener = Arc::new(FaultOpener::new(n, fault));
        let r = op(kind, &f, opener.clone());
        if opener.pending() {
            r.unwrap_or_else(|e| panic!("{name}: without a fault: {e:#}"));
            break;
        }
        let what = format!("{name}, {fault:?} at mutation {n}");
        // A failed write is never passed over: none of these operations
        // has a write it can do without.
        let msg = format!(
            "{:#}",
            r.expect_err(&format!("{what}: Ok, though a write failed"))
        );
        assert!(
            msg.contains("injected fault") && msg.contains(dir.to_str().unwrap()),
            "{what}: {msg}"
        );
        faults += 1;
        // Every file opens, with its chain; the leaf reads as before.
        assert!(read_all(&f.top) == want_top, "{what}: top changed");
        assert!(read_all(&f.base) == want_base, "{what}: base changed");
        if kind == Kind::IntoParent {
            sectors_either(&read_all(&f.mid), &want_mid, &want_top, &what);
        } else {
            assert!(read_all(&f.mid) == want_mid, "{what}: mid changed");
        }
        assert!(read_all(&f.copy) == want_mid, "{what}: copy changed");
        let linked = parent_of(&relinked(&f));
        assert!(
            linked == old_parent(&f) || linked == new_parent(&f),
            "{what}: links to {linked:?}"
        );
        // Again, with real files, unless done (a merge into the child is
        // done once the child links past its parent; done again it would
        // merge the next one).
        let done =
            matches!(kind, Kind::IntoChild | Kind::IntoChildStandalone) && linked == new_parent(&f);
        if !done {
            op(kind, &f, disk::file_opener())
                .unwrap_or_else(|e| panic!("{what}: the retry failed: {e:#}"));
        }
        assert!(read_all(&f.top) == want_top, "{what}: top after the retry");
        assert_eq!(
            parent_of(&relinked(&f)),
            new_parent(&f),
            "{what}: after the retry"
        );
        let mid_after = if kind == Kind::IntoParent {
            &want_top
        } else {
            &want_mid
        };
        assert!(
            read_all(&f.mid) == *mid_after,
            "{what}: mid after the retry"
        );
        assert!(
            read_all(&f.base) == want_base,
            "{what}: base after the retry"
        );
        // The old parent is no longer needed.
        if kind == Kind::IntoChildStandalone {
            std::fs::remove_file(&f.base).unwrap();
            assert!(read_all(&f.mid) == want_mid, "{what}: mid without base");
            assert!(read_all(&f.top) == want_top, "{what}: top without base");
        } else if kind != Kind::IntoParent {
            std::fs::remove_file(&f.mid).unwrap();
            assert!(read_all(&f.top) == want_top, "{what}: top without mid");
        }
        std::fs::remove_dir_all(&dir).unwrap();
    }
    eprintln!("{name}: {faults} faults injected, every one survived");
    assert!(faults > 0, "{name}: no fault was injected");
}

#[test]
fn merge_into_child_under_faults() {
    for format in [Format::Vhdx, Format::Vhd] {
        run(format, Kind::IntoChild);
        run(format, Kind::IntoChildStandalone);
    }
}

#[test]
fn merge_into_parent_under_faults() {
    run(Format::Vhdx, Kind::IntoParent);
    run(Format::Vhd, Kind::IntoParent);
}

#[test]
fn rebase_under_faults() {
    for format in [Format::Vhdx, Format::Vhd] {
        run(format, Kind::RebaseOntoBase);
        run(format, Kind::RebaseOntoCopy);
    }
}
