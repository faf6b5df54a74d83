//! Power cuts in the middle of multi-file operations: merge into the child,
//! merge into the parent, rebase, and bundle delete / merge.
//!
//! Each operation runs once with [`disk::testing::journal`] recording every
//! write (in 4 KiB pieces), length change and flush of every file of the
//! chain. Then, for cut points spread over the whole operation (every flush
//! boundary among them; every write with `POWER_CUT_ALL=1`), the files a power cut could leave are rebuilt in a
//! fresh directory, with the writes not yet flushed (per file) all kept, all
//! lost, or torn (every other piece kept). Each rebuilt state must read as
//! before in every layer, and finishing the operation (running it again, or
//! opening the bundle, which finishes its pending operation) must give the
//! right result.

mod common;

use checkpoint::merge::{merge_into_ancestor, merge_into_child, rebase};
use checkpoint::{Bundle, Format, Manifest, Pending, MANIFEST};
use common::*;
use disk::testing::journal::{self, Journal};
use disk::testing::pattern;
use disk::Opener;
use image::chain::chain_files;
use image::OpenOptions;
use std::path::Path;
use std::sync::Arc;

/// Cut points per operation (spread evenly, plus every flush boundary);
/// with the environment variable `POWER_CUT_ALL` set, every operation
/// boundary is a cut point (several minutes).
const MAX_CUTS: usize = 40;

type Keep = fn(usize) -> bool;
const VARIANTS: [(&str, Keep); 3] = [
    ("unflushed writes kept", |_| true),
    ("unflushed writes lost", |_| false),
    ("unflushed writes torn", |i| i % 2 == 0),
];

/// Rebuild every crash state of `j` in `dir` and call `check` on it.
fn for_each_power_cut(j: &Journal, dir: &Path, mut check: impl FnMut(&str)) {
    assert!(j.len() > 10, "the operation wrote little: {} ops", j.len());
    let max = match std::env::var("POWER_CUT_ALL") {
        Ok(_) => usize::MAX,
        Err(_) => MAX_CUTS,
    };
    let cuts = j.cut_points(max);
    eprintln!("{} operations recorded, {} cut points", j.len(), cuts.len());
    for &cut in &cuts {
        for (name, keep) in VARIANTS {
            std::fs::create_dir_all(dir).unwrap();
            journal::materialize(dir, &j.crash_files(cut, keep));
            check(&format!("cut {cut}/{} ({name})", j.len()));
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq)]
enum MergeKind {
    IntoChild,
    IntoParent,
    Rebase,
}

fn run_merge(kind: MergeKind, top: &Path, base: &Path, opener: Arc<dyn Opener>) {
    let p = OpenOptions {
        opener,
        ..OpenOptions::probing()
    };
    match kind {
        MergeKind::IntoChild => merge_into_child(top, &p, &mut |_| {}).map(|_| ()),
        MergeKind::IntoParent => merge_into_ancestor(top, 1, &p, &mut |_| {}).map(|_| ()),
        MergeKind::Rebase => rebase(top, base, &p, &mut |_| {}).map(|_| ()),
    }
    .unwrap();
}

fn merge_power_cuts(format: Format, kind: MergeKind) {
    let tmp = tempfile::tempdir().unwrap();
    let master = tmp.path().join("master");
    std::fs::create_dir(&master).unwrap();
    let (want_mid, want_top) = make_chain(&master, format);
    let ext = if format == Format::Vhdx {
        "vhdx"
    } else {
        "vhd"
    };
    let name = |d: &Path, n: &str| d.join(format!("{n}.{ext}"));
    let want_base = read_all(&name(&master, "base"));
    let rec = journal::start(&master);
    run_merge(
        kind,
        &name(&master, "top"),
        &name(&master, "base"),
        rec.opener(),
    );
    let j = rec.finish();
    let dir = tmp.path().join("crash");
    for_each_power_cut(&j, &dir, |what| {
        let what = format!("{format:?} {kind:?} {what}");
        let (base, mid, top) = (name(&dir, "base"), name(&dir, "mid"), name(&dir, "top"));
        // Every layer reads what it read before; the ancestor being merged
        // into is the one disk whose reads may change (that is the merge).
        assert_eq!(read_all(&top), want_top, "{what}: top");
        if kind != MergeKind::IntoParent {
            assert_eq!(read_all(&mid), want_mid, "{what}: mid");
        }
        assert_eq!(read_all(&base), want_base, "{what}: base");
        // Finish the operation, as the bundle does: a merge into the child
        // is done once the child links past its old parent.
        let files = chain_files(&top, &OpenOptions::probing()).unwrap();
        let linked_to_mid = files.len() == 3;
        if kind == MergeKind::IntoParent || linked_to_mid {
            run_merge(kind, &top, &base, disk::file_opener());
        }
        assert_eq!(read_all(&top), want_top, "{what}: top after finishing");
        let files = chain_files(&top, &OpenOptions::probing()).unwrap();
        match kind {
            MergeKind::IntoParent => {
                assert_eq!(read_all(&mid), want_top, "{what}: mid holds top's view");
                assert_eq!(files.len(), 3, "{what}");
            }
            MergeKind::IntoChild | MergeKind::Rebase => {
                assert_eq!(files.len(), 2, "{what}: top links to base");
                assert_eq!(read_all(&mid), want_mid, "{what}: mid unchanged");
            }
        }
        assert_eq!(read_all(&base), want_base, "{what}: base unchanged");
    });
}

#[test]
fn merge_into_child_survives_a_power_cut_anywhere() {
    merge_power_cuts(Format::Vhdx, MergeKind::IntoChild);
    merge_power_cuts(Format::Vhd, MergeKind::IntoChild);
}

#[test]
fn merge_into_parent_survives_a_power_cut_anywhere() {
    merge_power_cuts(Format::Vhdx, MergeKind::IntoParent);
    merge_power_cuts(Format::Vhd, MergeKind::IntoParent);
}

#[test]
fn rebase_survives_a_power_cut_anywhere() {
    merge_power_cuts(Format::Vhdx, MergeKind::Rebase);
    merge_power_cuts(Format::Vhd, MergeKind::Rebase);
}

/// A bundle with checkpoints a and b, data written before each and after;
/// the contents of a, b and the active disk.
fn bundle_with_two_checkpoints(dir: &Path, format: Format) -> [Vec<u8>; 3] {
    let mut b = Bundle::init(dir, format, SIZE).unwrap();
    write(&b.active_path(), 1000, &pattern(300_000, 1));
    b.create("a").unwrap();
    write(&b.active_path(), 2 << 20, &pattern(700_000, 2));
    write(&b.active_path(), 900, &pattern(3000, 3));
    b.create("b").unwrap();
    write(&b.active_path(), 5000, &pattern(200_000, 4));
    write(&b.active_path(), (4 << 20) + 17, &pattern(50_000, 5));
    [
        read_all(&b.disk_path(b.checkpoint("a").unwrap())),
        read_all(&b.disk_path(b.checkpoint("b").unwrap())),
        read_all(&b.active_path()),
    ]
}

/// The bundle operations that move data: delete a checkpoint with a child
/// (merged into it), delete the active disk's parent, and merge the active
/// disk into its parent. The manifest with the operation pending is
/// durable before the first disk write (it is saved, fsynced and renamed
/// into place first), so the recording starts from it and `Bundle::open`
/// runs the operation; each crash state must open (finishing the
/// operation) with every remaining checkpoint and the active disk reading
/// what they held, and no disk file but the manifest's.
fn bundle_power_cuts(format: Format, op_kind: usize) {
    let tmp = tempfile::tempdir().unwrap();
    let master = tmp.path().join("vm");
    let [want_a, want_b, want_active] = bundle_with_two_checkpoints(&master, format);
    let b = Bundle::open(&master).unwrap();
    let mut m: Manifest = b.manifest().clone();
    let node = |n: &str| b.checkpoint(n).unwrap().id.clone();
    let (pending, gone) = match op_kind {
        0 => (Pending::Delete { node: node("a") }, "a"),
        1 => (Pending::Delete { node: node("b") }, "b"),
        _ => (
            Pending::MergeUp {
                child: m.active.clone(),
                parent: node("b"),
            },
            "b",
        ),
    };
    m.pending = Some(pending);
    drop(b);
    std::fs::write(master.join(MANIFEST), serde_json::to_string(&m).unwrap()).unwrap();
    let rec = journal::start(&master);
    drop(Bundle::open_with(&master, rec.opener()).unwrap());
    let j = rec.finish();
    let dir = tmp.path().join("crash");
    for_each_power_cut(&j, &dir, |what| {
        let what = format!("{format:?} op {op_kind} {what}");
        let b = Bundle::open(&dir).unwrap_or_else(|e| panic!("{what}: open: {e}"));
        assert!(b.manifest().pending.is_none(), "{what}");
        assert!(b.checkpoint(gone).is_err(), "{what}: {gone} is gone");
        assert_eq!(read_all(&b.active_path()), want_active, "{what}: active");
        if gone != "a" {
            assert_eq!(
                read_all(&b.disk_path(b.checkpoint("a").unwrap())),
                want_a,
                "{what}: a"
            );
        }
        if gone != "b" {
            assert_eq!(
                read_all(&b.disk_path(b.checkpoint("b").unwrap())),
                want_b,
                "{what}: b"
            );
        }
        let mut disks: Vec<String> = b.manifest().nodes.iter().map(|n| n.disk.clone()).collect();
        disks.push(MANIFEST.to_string());
        disks.sort();
        // The VHD bundle's spare child is no disk of the tree.
        let mut files: Vec<String> = std::fs::read_dir(&dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .filter(|f| f != checkpoint::SPARE)
            .collect();
        files.sort();
        assert_eq!(files, disks, "{what}: files left");
        // The chain of the active disk is what the manifest says.
        let chain = chain_files(&b.active_path(), &OpenOptions::probing()).unwrap();
        assert_eq!(chain.len(), b.manifest().nodes.len(), "{what}: chain");
    });
}

#[test]
fn bundle_delete_survives_a_power_cut_anywhere() {
    for format in [Format::Vhdx, Format::Vhd] {
        bundle_power_cuts(format, 0);
        bundle_power_cuts(format, 1);
    }
}

#[test]
fn bundle_merge_survives_a_power_cut_anywhere() {
    bundle_power_cuts(Format::Vhdx, 2);
    bundle_power_cuts(Format::Vhd, 2);
}
