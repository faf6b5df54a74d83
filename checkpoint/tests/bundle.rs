//! Checkpoint bundles against a model: after random create / write /
//! revert / delete / merge sequences, every checkpoint still reads exactly
//! what it held when taken, and the active disk reads what was written.
//! Also: interrupted operations are finished at the next open, merges cut at
//! every write keep every layer reading what it read, and the manifest is
//! validated.
// Test data: sizes and offsets of small test disks (they fit in memory),
// block sizes and byte patterns.
#![allow(clippy::cast_possible_truncation)]

mod common;

use checkpoint::merge::{merge_into_ancestor, merge_into_child};
use checkpoint::{Bundle, Format, Manifest, Pending, MANIFEST};
use common::*;
use disk::testing::pattern;
use image::chain::chain_files;
use image::OpenOptions;
use proptest::prelude::*;
use std::collections::HashMap;

#[derive(Debug, Clone)]
enum Op {
    Write { off: u64, len: usize, seed: u8 },
    Create,
    Revert(usize),
    Delete(usize),
    Merge,
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        5 => (0..SIZE, 1usize..1_500_000, any::<u8>()).prop_map(|(off, len, seed)| Op::Write { off, len, seed }),
        3 => Just(Op::Create),
        2 => any::<usize>().prop_map(Op::Revert),
        2 => any::<usize>().prop_map(Op::Delete),
        1 => Just(Op::Merge),
    ]
}

/// Check every checkpoint and the active disk against the model.
fn check(b: &Bundle, model: &HashMap<String, Vec<u8>>, active: &[u8], what: &str) {
    for n in &b.manifest().nodes {
        let got = read_all(&b.disk_path(n));
        if n.id == b.manifest().active {
            assert!(got == active, "{what}: the active disk reads wrong data");
        } else {
            let name = n.name.as_ref().unwrap();
            assert!(
                got == model[name],
                "{what}: checkpoint {name} no longer reads what it held"
            );
        }
    }
}

fn run_model(format: Format, ops: Vec<Op>) {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("vm");
    let mut b = Bundle::init(&dir, format, SIZE).unwrap();
    let size = read_all(&b.active_path()).len() as u64;
    let mut model: HashMap<String, Vec<u8>> = HashMap::new();
    model.insert("base".into(), vec![0u8; size as usize]);
    let mut active = vec![0u8; size as usize];
    let mut next = 0;
    for (i, op) in ops.into_iter().enumerate() {
        let what = format!("step {i} {op:?}");
        let names: Vec<String> = b
            .manifest()
            .nodes
            .iter()
            .filter_map(|n| n.name.clone())
            .collect();
        match op {
            Op::Write { off, len, seed } => {
                let off = off.min(size - 1);
                let len = len.min((size - off) as usize);
                let data = pattern(len, u64::from(seed) + i as u64);
                write(&b.active_path(), off, &data);
                active[off as usize..off as usize + len].copy_from_slice(&data);
            }
            Op::Create => {
                let name = format!("cp{next}");
                next += 1;
                b.create(&name).unwrap();
                model.insert(name, active.clone());
            }
            Op::Revert(_) | Op::Delete(_) if names.is_empty() => continue,
            Op::Revert(k) => {
                let name = &names[k % names.len()];
                b.revert(name).unwrap();
                active = model[name].clone();
            }
            Op::Delete(k) => {
                let name = names[k % names.len()].clone();
                b.delete(&name).unwrap();
                model.remove(&name);
            }
            Op::Merge => {
                b.merge().unwrap();
                let left: Vec<String> = b
                    .manifest()
                    .nodes
                    .iter()
                    .filter_map(|n| n.name.clone())
                    .collect();
                model.retain(|k, _| left.contains(k));
                assert!(b.active().parent.is_none(), "{what}: merge leaves one disk");
            }
        }
        check(&b, &model, &active, &what);
        // The manifest reopens to the same tree (once this handle lets go
        // of the bundle); no stray files.
        let before = b.manifest().clone();
        drop(b);
        b = Bundle::open(&dir).unwrap();
        assert_eq!(b.manifest(), &before, "{what}");
        let mut files: Vec<String> = std::fs::read_dir(&dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .filter(|f| f != MANIFEST)
            // The VHD spare child (maybe still being made: `.tmp`).
            .filter(|f| !f.starts_with(checkpoint::SPARE))
            .collect();
        files.sort();
        let mut disks: Vec<String> = b.manifest().nodes.iter().map(|n| n.disk.clone()).collect();
        disks.sort();
        assert_eq!(files, disks, "{what}: disk files");
    }
}

#[test]
fn an_open_bundle_is_held() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("vm");
    let b = Bundle::init(&dir, Format::Vhdx, SIZE).unwrap();
    let e = Bundle::open(&dir).unwrap_err();
    assert_eq!(e.kind(), checkpoint::ErrorKind::Locked, "{e}");
    assert!(
        e.to_string()
            .contains("the bundle is in use by this process (pid "),
        "{e}"
    );
    drop(b);
    let mut b = Bundle::open(&dir).unwrap();
    let e = Bundle::open(&dir).unwrap_err();
    assert_eq!(e.kind(), checkpoint::ErrorKind::Locked, "{e}");
    b.create("c").unwrap();
    // A writer of the active disk holds it: a checkpoint (which must freeze
    // that disk) is refused, naming the writer, and nothing changes.
    let active = vhdx::Vhdx::open(
        b.active_path(),
        &vhdx::OpenOptions {
            writable: true,
            ..Default::default()
        },
    )
    .unwrap();
    let before = b.manifest().clone();
    let e = b.create("while-written").unwrap_err();
    assert_eq!(e.kind(), checkpoint::ErrorKind::Locked, "{e}");
    drop(b);
    drop(active);
    let b = Bundle::open(&dir).unwrap();
    assert_eq!(b.manifest().nodes, before.nodes, "the tree is unchanged");
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 24, ..ProptestConfig::default() })]
    #[test]
    fn vhdx_checkpoints_keep_their_content(ops in proptest::collection::vec(op(), 1..14)) {
        run_model(Format::Vhdx, ops);
    }

    #[test]
    fn vhd_checkpoints_keep_their_content(ops in proptest::collection::vec(op(), 1..14)) {
        run_model(Format::Vhd, ops);
    }
}

#[test]
fn list_shows_the_tree_with_the_active_position() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("vm");
    let mut b = Bundle::init(&dir, Format::Vhdx, SIZE).unwrap();
    write(&b.active_path(), 0, b"one");
    b.create("one").unwrap();
    b.create("two").unwrap();
    b.revert("one").unwrap();
    let l = b.list().unwrap();
    let names: Vec<(Option<&str>, usize, bool)> = l
        .iter()
        .map(|n| (n.node.name.as_deref(), n.depth, n.active))
        .collect();
    assert_eq!(names[0], (Some("base"), 0, false));
    assert_eq!(names[1], (Some("one"), 1, false));
    assert!(names.contains(&(Some("two"), 2, false)));
    assert!(names.contains(&(None, 2, true)));
    assert!(l
        .iter()
        .all(|n| n.file_size > 0 && n.created_utc.ends_with('Z')));
    let json = serde_json::to_value(&l).unwrap();
    assert_eq!(json[0]["name"], "base");
    // Errors name the bundle and the known checkpoints.
    let e = b.revert("nope").unwrap_err();
    assert!(
        e.to_string().contains("no checkpoint named \"nope\""),
        "{e}"
    );
    assert!(e.to_string().contains("one"), "{e}");
    let e = b.create("one").unwrap_err();
    assert!(e.to_string().contains("already exists"), "{e}");
}

#[test]
fn create_is_constant_time() {
    // A 1 TiB disk: creating a checkpoint costs the same as for a tiny one
    // (measured by the benches; here: it creates one small file).
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("vm");
    let mut b = Bundle::init(&dir, Format::Vhdx, 1 << 40).unwrap();
    b.create("big").unwrap();
    let len = std::fs::metadata(b.active_path()).unwrap().len();
    assert!(len < 16 << 20, "new active disk is {len} bytes");
}

/// A VHD bundle keeps a spare child (`spare.avhd`) made in the background,
/// which a checkpoint renames into place and rewrites the header of: the
/// new active disk is that very file (same inode), reads its checkpoint and
/// takes writes; a new spare follows. A create interrupted after the
/// rename, a leftover half-made spare, a spare that is junk or made for
/// another disk size: each ends with the right disks.
#[test]
fn vhd_checkpoints_use_the_spare_child() {
    use checkpoint::SPARE;
    use std::os::unix::fs::MetadataExt;
    let ino = |p: &std::path::Path| std::fs::metadata(p).unwrap().ino();
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("vm");
    let b = Bundle::init(&dir, Format::Vhd, SIZE).unwrap();
    write(&b.active_path(), 1000, &pattern(300_000, 1));
    drop(b);
    assert!(dir.join(SPARE).exists(), "init makes a spare");
    let spare_ino = ino(&dir.join(SPARE));
    let mut b = Bundle::open(&dir).unwrap();
    let want_a = read_all(&b.active_path());
    b.create("a").unwrap();
    assert_eq!(
        ino(&b.active_path()),
        spare_ino,
        "the spare became the active disk"
    );
    assert_eq!(read_all(&b.active_path()), want_a);
    write(&b.active_path(), 5000, &pattern(70_000, 2));
    let want_active = read_all(&b.active_path());
    assert_eq!(read_all(&b.disk_path(b.checkpoint("a").unwrap())), want_a);
    drop(b);
    assert!(dir.join(SPARE).exists(), "a new spare after the create");

    let pending_create = |dir: &std::path::Path| {
        let b = Bundle::open(dir).unwrap();
        let mut m: Manifest = b.manifest().clone();
        m.pending = Some(Pending::Create {
            name: "c".into(),
            new_id: "new-id".into(),
            created: 1,
        });
        drop(b);
        std::fs::write(dir.join(MANIFEST), serde_json::to_string(&m).unwrap()).unwrap();
    };
    let check = |dir: &std::path::Path, what: &str| {
        let b = Bundle::open(dir).unwrap();
        assert!(b.manifest().pending.is_none(), "{what}");
        assert_eq!(
            read_all(&b.disk_path(b.checkpoint("c").unwrap())),
            want_active,
            "{what}"
        );
        assert_eq!(
            read_all(&b.disk_path(b.checkpoint("a").unwrap())),
            want_a,
            "{what}"
        );
        assert_eq!(read_all(&b.active_path()), want_active, "{what}");
        let chain = chain_files(&b.active_path(), &OpenOptions::probing()).unwrap();
        assert_eq!(chain.len(), 4, "{what}: base, a, c, active");
        assert!(!dir.join(format!("{SPARE}.tmp")).exists(), "{what}");
    };
    type Damage = fn(&std::path::Path);
    let cases: [(&str, Damage); 4] = [
        ("spare renamed, header not yet rewritten", |d| {
            std::fs::rename(d.join(SPARE), d.join("new-id.avhd")).unwrap()
        }),
        ("half-made spare left behind", |d| {
            std::fs::write(d.join(format!("{SPARE}.tmp")), b"conectix").unwrap()
        }),
        ("junk spare", |d| {
            std::fs::write(d.join(SPARE), vec![0xffu8; 9000]).unwrap()
        }),
        ("spare for another disk size", |d| {
            let other = d.with_file_name("other");
            drop(Bundle::init(&other, Format::Vhd, 2 * SIZE).unwrap());
            std::fs::copy(other.join(SPARE), d.join(SPARE)).unwrap();
        }),
    ];
    for (what, damage) in cases {
        let case = tmp.path().join(what.replace(' ', "-"));
        copy_dir(&dir, &case);
        pending_create(&case);
        damage(&case);
        check(&case, what);
    }
}

/// Every pending operation left in the manifest (a crash after recording
/// it, at any later step) is finished at the next open, with the same
/// result as an uninterrupted run.
#[test]
fn interrupted_operations_finish_at_open() {
    for op_kind in 0..5 {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("vm");
        let mut b = Bundle::init(&dir, Format::Vhdx, SIZE).unwrap();
        write(&b.active_path(), 1000, &pattern(300_000, 1));
        b.create("a").unwrap();
        write(&b.active_path(), 2 << 20, &pattern(100_000, 2));
        b.create("b").unwrap();
        write(&b.active_path(), 5000, &pattern(10_000, 3));
        let want_a = read_all(&b.disk_path(b.checkpoint("a").unwrap()));
        let want_b = read_all(&b.disk_path(b.checkpoint("b").unwrap()));
        let want_active = read_all(&b.active_path());
        let mut m: Manifest = b.manifest().clone();
        let node = |n: &str| b.checkpoint(n).unwrap().id.clone();
        m.pending = Some(match op_kind {
            0 => Pending::Create {
                name: "c".into(),
                new_id: "new-id".into(),
                created: 1,
            },
            1 => Pending::Revert {
                target: node("a"),
                new_id: "new-id".into(),
                created: 1,
            },
            2 => Pending::Delete { node: node("a") },
            3 => Pending::MergeUp {
                child: m.active.clone(),
                parent: node("b"),
            },
            _ => Pending::Delete { node: node("b") },
        });
        drop(b);
        std::fs::write(dir.join(MANIFEST), serde_json::to_string(&m).unwrap()).unwrap();
        // A stray half-made file of the interrupted create/revert.
        std::fs::write(dir.join("new-id.avhdx"), b"junk").unwrap();
        let b = Bundle::open(&dir).unwrap();
        assert!(b.manifest().pending.is_none());
        let what = format!("op {op_kind}");
        match op_kind {
            0 => {
                assert_eq!(
                    read_all(&b.disk_path(b.checkpoint("c").unwrap())),
                    want_active,
                    "{what}"
                );
                assert_eq!(read_all(&b.active_path()), want_active, "{what}");
            }
            1 => assert_eq!(read_all(&b.active_path()), want_a, "{what}"),
            2 => {
                assert!(b.checkpoint("a").is_err());
                assert_eq!(
                    read_all(&b.disk_path(b.checkpoint("b").unwrap())),
                    want_b,
                    "{what}"
                );
                assert_eq!(read_all(&b.active_path()), want_active, "{what}");
            }
            3 => {
                assert!(b.checkpoint("b").is_err());
                assert_eq!(read_all(&b.active_path()), want_active, "{what}");
                assert_eq!(
                    read_all(&b.disk_path(b.checkpoint("a").unwrap())),
                    want_a,
                    "{what}"
                );
            }
            _ => {
                assert_eq!(read_all(&b.active_path()), want_active, "{what}");
                assert_eq!(
                    read_all(&b.disk_path(b.checkpoint("a").unwrap())),
                    want_a,
                    "{what}"
                );
            }
        }
    }
}

#[test]
fn bad_manifests_are_named_errors() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("vm");
    let b = Bundle::init(&dir, Format::Vhd, SIZE).unwrap();
    let good = serde_json::to_value(b.manifest()).unwrap();
    drop(b);
    let cases: Vec<(serde_json::Value, &str)> = vec![
        (serde_json::json!({"version": 1}), "missing field"),
        (
            {
                let mut v = good.clone();
                v["version"] = 9.into();
                v
            },
            "version 9",
        ),
        (
            {
                let mut v = good.clone();
                v["active"] = "x".into();
                v
            },
            "active node x",
        ),
        (
            {
                let mut v = good.clone();
                v["nodes"][1]["disk"] = "../../etc/passwd".into();
                v
            },
            "inside the bundle",
        ),
        (
            {
                let mut v = good.clone();
                v["nodes"][0]["parent"] = v["nodes"][1]["id"].clone();
                v
            },
            "loops",
        ),
    ];
    for (v, want) in cases {
        std::fs::write(dir.join(MANIFEST), v.to_string()).unwrap();
        let e = Bundle::open(&dir).unwrap_err();
        let msg = e.to_string();
        assert!(
            msg.contains(MANIFEST) && msg.contains(want),
            "{want}: {msg}"
        );
    }
    std::fs::write(dir.join(MANIFEST), "{ not json").unwrap();
    let e = Bundle::open(&dir).unwrap_err();
    assert!(e.to_string().contains("line 1"), "{e}");
}

// ---- Crash tests: cut the merges at every write. ----

/// Interrupt a merge after each of its copy steps (a panic from the
/// progress callback, which runs after each block's writes returned), on a
/// fresh copy of the chain per interruption point: every layer must still
/// read what it read, and running the merge again must finish it. This is
/// an interruption (the process stops), not a power cut: the page-level
/// crash behaviour of the writes themselves is covered by the format
/// crates' crash tests of the differencing write path and the log.
fn interrupt_runs(format: Format, into_child: bool) {
    let tmp = tempfile::tempdir().unwrap();
    let master = tmp.path().join("master");
    std::fs::create_dir(&master).unwrap();
    let (want_mid, want_top) = make_chain(&master, format);
    let ext = if format == Format::Vhdx {
        "vhdx"
    } else {
        "vhd"
    };
    let mut cut = 1u64;
    loop {
        let dir = tmp.path().join(format!("cut{cut}"));
        copy_dir(&master, &dir);
        let top = dir.join(format!("top.{ext}"));
        let mid = dir.join(format!("mid.{ext}"));
        let mut calls = 0u64;
        let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            let mut stop = |_: disk::Step| {
                calls += 1;
                if calls == cut {
                    panic!("interrupted");
                }
            };
            if into_child {
                merge_into_child(&top, &OpenOptions::probing(), &mut stop).unwrap();
            } else {
                merge_into_ancestor(&top, 1, &OpenOptions::probing(), &mut stop).unwrap();
            }
        }));
        let finished = r.is_ok();
        // Whatever was interrupted: every layer still reads what it read.
        assert_eq!(read_all(&top), want_top, "cut {cut}: top");
        if into_child {
            assert_eq!(read_all(&mid), want_mid, "cut {cut}: mid");
        }
        // Run again to the end: the result is right.
        if !finished {
            if into_child {
                merge_into_child(&top, &OpenOptions::probing(), &mut |_| {}).unwrap();
            } else {
                merge_into_ancestor(&top, 1, &OpenOptions::probing(), &mut |_| {}).unwrap();
            }
        }
        assert_eq!(read_all(&top), want_top, "cut {cut}: top after resuming");
        if into_child {
            // top now links to base.
            let files = chain_files(&top, &OpenOptions::probing()).unwrap();
            assert_eq!(files.len(), 2, "cut {cut}");
            assert_eq!(read_all(&mid), want_mid, "cut {cut}: mid unchanged");
        } else {
            assert_eq!(read_all(&mid), want_top, "cut {cut}: mid holds top's view");
        }
        std::fs::remove_dir_all(&dir).unwrap();
        if finished {
            break;
        }
        cut += 1;
    }
    assert!(cut > 3, "the merge was interrupted at several points");
}

#[test]
fn merge_into_child_interrupted_anywhere_keeps_reads_and_resumes() {
    interrupt_runs(Format::Vhdx, true);
    interrupt_runs(Format::Vhd, true);
}

#[test]
fn merge_into_parent_interrupted_anywhere_keeps_reads_and_resumes() {
    interrupt_runs(Format::Vhdx, false);
    interrupt_runs(Format::Vhd, false);
}

#[test]
fn rebase_keeps_what_the_child_reads() {
    for format in [Format::Vhdx, Format::Vhd] {
        let tmp = tempfile::tempdir().unwrap();
        let (_, want_top) = make_chain(tmp.path(), format);
        let ext = if format == Format::Vhdx {
            "vhdx"
        } else {
            "vhd"
        };
        let top = tmp.path().join(format!("top.{ext}"));
        let base = tmp.path().join(format!("base.{ext}"));
        // Rebase top from mid onto base: mid's data is copied into top.
        let s =
            checkpoint::merge::rebase(&top, &base, &OpenOptions::probing(), &mut |_| {}).unwrap();
        assert!(s.bytes_copied > 0);
        std::fs::remove_file(tmp.path().join(format!("mid.{ext}"))).unwrap();
        assert_eq!(read_all(&top), want_top, "{format:?}");
        assert_eq!(chain_files(&top, &OpenOptions::probing()).unwrap().len(), 2);
        // A verified relink to a copy of the same parent copies nothing.
        let copy = tmp.path().join(format!("copy.{ext}"));
        std::fs::copy(&base, &copy).unwrap();
        let s =
            checkpoint::merge::rebase(&top, &copy, &OpenOptions::probing(), &mut |_| {}).unwrap();
        assert_eq!(s.bytes_copied, 0);
        std::fs::remove_file(&base).unwrap();
        assert_eq!(read_all(&top), want_top, "{format:?} after relink");
    }
}
