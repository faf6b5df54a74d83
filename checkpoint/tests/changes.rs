//! Changed-block tracking on bundles under random workloads: the changes
//! between any two disks of the tree (a checkpoint and the active disk, two
//! checkpoints on different branches) cover every sector where they
//! differ, equal those sectors when every write covers whole blocks with
//! fresh data, pass `verify`, and written as a delta over FROM read back as
//! TO, without changing the bundle.
// Test data: sizes and offsets of small test disks (they fit in memory).
#![allow(clippy::cast_possible_truncation)]

mod common;

use checkpoint::{Bundle, Change, Format};
use disk::testing::pattern;
use disk::{ParentPolicy, VirtualDisk};
use image::OpenOptions;
use proptest::prelude::*;
use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;

const MIB: u64 = 1 << 20;
/// The bundle's disk: six 2 MiB blocks of its differencing disks.
const DISK: u64 = 12 * MIB;
/// The block size of a bundle's differencing disks (VHDX and VHD).
const BLOCK: u64 = 2 * MIB;
const SECTOR: u64 = 512;

#[derive(Debug, Clone)]
enum Op {
    /// Random bytes at a random place, any length (partial sectors too).
    Write {
        off: u64,
        len: u64,
    },
    /// Whole blocks of fresh data.
    Blocks {
        block: u64,
        count: u64,
    },
    /// `write_zeroes` (whole blocks become ZERO blocks in a VHDX).
    Zero {
        off: u64,
        len: u64,
        unmap: bool,
    },
    /// `discard`.
    Discard {
        off: u64,
        len: u64,
    },
    Create,
    /// Revert to a checkpoint: the active disk becomes a new branch.
    Revert(usize),
    /// Delete a checkpoint (merged into its children).
    Delete(usize),
}

fn mixed_op() -> impl Strategy<Value = Op> {
    prop_oneof![
        4 => (0..DISK, 1..1_500_000u64).prop_map(|(off, len)| Op::Write { off, len }),
        2 => (0..DISK / BLOCK, 1..3u64).prop_map(|(block, count)| Op::Blocks { block, count }),
        1 => (0..DISK, 1..5_000_000u64, any::<bool>())
            .prop_map(|(off, len, unmap)| Op::Zero { off, len, unmap }),
        1 => (0..DISK, 1..5_000_000u64).prop_map(|(off, len)| Op::Discard { off, len }),
        3 => Just(Op::Create),
        2 => any::<usize>().prop_map(Op::Revert),
        1 => any::<usize>().prop_map(Op::Delete),
    ]
}

fn block_op() -> impl Strategy<Value = Op> {
    prop_oneof![
        4 => (0..DISK / BLOCK, 1..3u64).prop_map(|(block, count)| Op::Blocks { block, count }),
        2 => Just(Op::Create),
        2 => any::<usize>().prop_map(Op::Revert),
    ]
}

fn names(b: &Bundle) -> Vec<String> {
    b.manifest()
        .nodes
        .iter()
        .filter_map(|n| n.name.clone())
        .collect()
}

/// Run `ops` on the bundle (writes to its active disk); returns the size.
fn apply(b: &mut Bundle, ops: &[Op]) -> u64 {
    let mut next = 0;
    let size = {
        let img = image::open(b.active_path(), &OpenOptions::probing()).unwrap();
        img.disk().virtual_size()
    };
    for (i, op) in ops.iter().enumerate() {
        let seed = 1000 + i as u64;
        let names = names(b);
        let with_active = |f: &dyn Fn(&dyn VirtualDisk)| {
            let img = image::open(b.active_path(), &OpenOptions::probing().writable()).unwrap();
            f(&**img.disk());
            img.close().unwrap();
        };
        match *op {
            Op::Write { off, len } => {
                let off = off.min(size - 1);
                let len = len.min(size - off);
                with_active(&|d| d.write_at(&pattern(len as usize, seed), off).unwrap());
            }
            Op::Blocks { block, count } => {
                let off = block * BLOCK;
                let len = (count * BLOCK).min(DISK - off);
                with_active(&|d| d.write_at(&pattern(len as usize, seed), off).unwrap());
            }
            Op::Zero { off, len, unmap } => {
                let off = off.min(size - 1);
                let len = len.min(size - off);
                with_active(&|d| d.write_zeroes(off, len, unmap).unwrap());
            }
            Op::Discard { off, len } => {
                let off = off.min(size - 1);
                let len = len.min(size - off);
                with_active(&|d| d.discard(off, len).unwrap());
            }
            Op::Create => {
                b.create(&format!("cp{next}")).unwrap();
                next += 1;
            }
            Op::Revert(_) | Op::Delete(_) if names.is_empty() => {}
            Op::Revert(k) => b.revert(&names[k % names.len()]).unwrap(),
            Op::Delete(k) => {
                let n = &names[k % names.len()];
                if n != "base" {
                    b.delete(n).unwrap();
                }
            }
        }
    }
    size
}

/// The bundle closed and opened again: a VHD bundle's spare child, made
/// in the background after a checkpoint, is then complete (the snapshots
/// of the bundle's files must not see it appear).
fn settled(b: Bundle) -> Bundle {
    let dir = b.dir().to_path_buf();
    drop(b);
    Bundle::open(&dir).unwrap()
}

fn read_all(d: &dyn VirtualDisk) -> Vec<u8> {
    let mut v = vec![0u8; d.virtual_size() as usize];
    d.read_at(&mut v, 0).unwrap();
    v
}

/// The sectors where `a` and `b` differ, as merged ranges.
fn differing(a: &[u8], b: &[u8]) -> Vec<(u64, u64)> {
    let mut out: Vec<(u64, u64)> = Vec::new();
    for (k, (x, y)) in a
        .chunks(SECTOR as usize)
        .zip(b.chunks(SECTOR as usize))
        .enumerate()
    {
        if x != y {
            let at = k as u64 * SECTOR;
            match out.last_mut() {
                Some(r) if r.1 == at => r.1 = at + x.len() as u64,
                _ => out.push((at, at + x.len() as u64)),
            }
        }
    }
    out
}

/// The changes as merged ranges (adjacent changes of different kinds
/// joined).
fn ranges(changes: &[Change]) -> Vec<(u64, u64)> {
    let mut out: Vec<(u64, u64)> = Vec::new();
    for c in changes {
        match out.last_mut() {
            Some(r) if r.1 == c.start => r.1 = c.end(),
            _ => out.push((c.start, c.end())),
        }
    }
    out
}

/// Whether every range of `inner` lies inside a range of `outer` (both
/// sorted and merged).
fn covered(inner: &[(u64, u64)], outer: &[(u64, u64)]) -> Result<(), (u64, u64)> {
    for &(a, b) in inner {
        if !outer.iter().any(|&(s, e)| s <= a && b <= e) {
            return Err((a, b));
        }
    }
    Ok(())
}

/// Every file of the bundle directory and its bytes.
fn snapshot(dir: &Path) -> BTreeMap<String, Vec<u8>> {
    std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap())
        .filter(|e| e.file_type().unwrap().is_file())
        .map(|e| {
            (
                e.file_name().to_string_lossy().into_owned(),
                std::fs::read(e.path()).unwrap(),
            )
        })
        .collect()
}

/// Check the changes from `from` to `to` (None: the active disk) against
/// the data; `exact`: they must equal the differing sectors. With
/// `delta`, also write the delta and read it back over FROM.
fn check_pair(b: &Bundle, from: &str, to: Option<&str>, exact: bool, delta: Option<&Path>) {
    let what = format!("{from} -> {}", to.unwrap_or("(active)"));
    let mut c = b.changes(from, to).unwrap();
    let changes: Vec<Change> = c.by_ref().collect::<Result<_, _>>().unwrap();
    for w in changes.windows(2) {
        assert!(w[0].end() <= w[1].start, "{what}: out of order {changes:?}");
        assert!(
            w[0].end() < w[1].start || w[0].zero != w[1].zero,
            "{what}: not merged {changes:?}"
        );
    }
    let old = read_all(&**c.from_disk());
    let new = read_all(&**c.to_disk());
    let diff = differing(&old, &new);
    let reported = ranges(&changes);
    if let Err(r) = covered(&diff, &reported) {
        panic!("{what}: differing sectors {r:?} outside the changes {reported:?}");
    }
    if exact {
        assert_eq!(reported, diff, "{what}: whole-block workload");
    }
    // A change TO maps as zeros reads as zeros.
    for ch in changes.iter().filter(|ch| ch.zero) {
        let r = ch.start as usize..ch.end() as usize;
        assert!(new[r].iter().all(|&x| x == 0), "{what}: {ch:?} not zero");
    }
    let r = c.verify(&mut |_| {}).unwrap();
    assert!(r.ok(), "{what}: {r:?}");
    assert_eq!(r.bytes_compared, old.len() as u64);
    assert_eq!(r.changes, changes.len() as u64);
    assert_eq!(
        r.differing_bytes,
        diff.iter().map(|(a, b)| b - a).sum::<u64>()
    );
    let Some(out) = delta else { return };
    let before = snapshot(b.dir());
    let stats = c.write_delta(out, true, &mut |_| {}).unwrap();
    assert_eq!(stats.changes, changes.len() as u64);
    assert_eq!(
        stats.bytes_copied + stats.bytes_zeroed,
        changes.iter().map(|c| c.length).sum::<u64>()
    );
    drop(c);
    assert!(snapshot(b.dir()) == before, "{what}: the bundle changed");
    let tmp = format!("{}.tmp", out.display());
    assert!(!Path::new(&tmp).exists(), "{what}: {tmp} left behind");
    let opts = OpenOptions {
        parent_policy: ParentPolicy {
            allowed_dirs: vec![b.dir().to_path_buf()],
            ..ParentPolicy::default()
        },
        ..OpenOptions::probing()
    };
    let img = image::open(out, &opts).unwrap();
    let got = read_all(&**img.disk());
    assert!(
        got == new,
        "{what}: the delta over FROM does not read as TO"
    );
}

fn run(format: Format, ops: &[Op], exact: bool) {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("vm");
    let mut b = Bundle::init(&dir, format, DISK).unwrap();
    apply(&mut b, ops);
    let b = settled(b);
    let names = names(&b);
    let delta = tmp
        .path()
        .join(format!("delta.{}", format.child_extension()));
    for (i, from) in names.iter().enumerate() {
        check_pair(&b, from, None, exact, (i % 2 == 0).then_some(&*delta));
        // Another checkpoint, maybe on another branch.
        let other = &names[(i * 7 + 3) % names.len()];
        check_pair(
            &b,
            from,
            Some(other),
            exact,
            (i % 2 == 1).then_some(&*delta),
        );
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 12, ..ProptestConfig::default() })]
    #[test]
    fn vhdx_changes_cover_every_difference(ops in proptest::collection::vec(mixed_op(), 1..14)) {
        run(Format::Vhdx, &ops, false);
    }

    #[test]
    fn vhd_changes_cover_every_difference(ops in proptest::collection::vec(mixed_op(), 1..14)) {
        run(Format::Vhd, &ops, false);
    }

    #[test]
    fn vhdx_whole_block_changes_are_exact(ops in proptest::collection::vec(block_op(), 1..12)) {
        run(Format::Vhdx, &ops, true);
    }

    #[test]
    fn vhd_whole_block_changes_are_exact(ops in proptest::collection::vec(block_op(), 1..12)) {
        run(Format::Vhd, &ops, true);
    }
}

/// A fixed tree: base <- one <- two, reverted to one (a new branch), with
/// data on each branch: the changes from two to the active disk are both
/// branches' blocks; the delta lands outside the bundle only.
#[test]
fn changes_across_branches_and_a_delta_kept_out_of_the_bundle() {
    for format in [Format::Vhdx, Format::Vhd] {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("vm");
        let mut b = Bundle::init(&dir, format, DISK).unwrap();
        let ops = [
            Op::Blocks { block: 0, count: 1 },
            Op::Create, // cp0
            Op::Blocks { block: 2, count: 1 },
            Op::Create, // cp1
            Op::Revert(1),
            Op::Blocks { block: 4, count: 1 },
        ];
        apply(&mut b, &ops);
        let b = settled(b);
        assert_eq!(names(&b), ["base", "cp0", "cp1"]);
        let c = b.changes("cp1", None).unwrap();
        assert_eq!(c.from_side().len(), 1, "cp1's own layer");
        assert_eq!(c.to_side().len(), 1, "the new branch's active disk");
        let got: Vec<(u64, u64, bool)> = c
            .map(|c| c.unwrap())
            .map(|c| (c.start, c.length, c.zero))
            .collect();
        assert_eq!(
            got,
            vec![(4 * MIB, BLOCK, true), (8 * MIB, BLOCK, false)],
            "{format:?}"
        );
        // Unknown checkpoints are named, with the ones there are.
        let e = b.changes("nope", None).unwrap_err().to_string();
        assert!(
            e.contains("no checkpoint named \"nope\"") && e.contains("cp1"),
            "{e}"
        );
        // A delta into the bundle is refused, and nothing is written.
        let before = snapshot(&dir);
        let mut c = b.changes("cp0", None).unwrap();
        let e = c
            .write_delta(&dir.join("delta.avhdx"), true, &mut |_| {})
            .unwrap_err()
            .to_string();
        assert!(e.contains("may not be written into the bundle"), "{e}");
        // Nor below it (the bundle deletes unknown files of its `vm` dir).
        let sub = dir.join(checkpoint::VM_STATE_DIR);
        std::fs::create_dir_all(&sub).unwrap();
        let e = c
            .write_delta(&sub.join("delta.avhdx"), true, &mut |_| {})
            .unwrap_err()
            .to_string();
        assert!(e.contains("may not be written into the bundle"), "{e}");
        std::fs::remove_dir(&sub).unwrap();
        drop(c);
        // Nor, for the same disks opened as files (no bundle to guard),
        // over a disk of the chains compared.
        let from = b.disk_path(b.checkpoint("cp0").unwrap());
        let mut c =
            checkpoint::Changes::open(&from, &b.active_path(), &OpenOptions::probing()).unwrap();
        for target in [from.clone(), b.active_path()] {
            let e = c.write_delta(&target, true, &mut |_| {}).unwrap_err();
            assert!(
                e.to_string()
                    .contains("the delta would replace a disk of the chains compared"),
                "{e}"
            );
        }
        drop(c);
        assert!(snapshot(&dir) == before);
    }
}

/// A delta written into failing storage (EIO or ENOSPC at the n-th write,
/// flush or length change, n = 0, 1, 2... until the write no longer meets
/// the fault): each failure is an error, leaves no temporary file and the
/// delta written before untouched; the run that completes reads as TO.
#[test]
fn a_failed_delta_leaves_the_previous_one() {
    use disk::fault::{Fault, FaultOpener};
    for format in [Format::Vhdx, Format::Vhd] {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("vm");
        let mut b = Bundle::init(&dir, format, DISK).unwrap();
        apply(
            &mut b,
            &[
                Op::Write {
                    off: MIB + 5,
                    len: 300_000,
                },
                Op::Create,
                Op::Blocks { block: 3, count: 1 },
                Op::Zero {
                    off: 8 * MIB,
                    len: 2 * MIB,
                    unmap: true,
                },
            ],
        );
        let delta = tmp
            .path()
            .join(format!("delta.{}", format.child_extension()));
        let tmp_file = tmp
            .path()
            .join(format!("delta.{}.tmp", format.child_extension()));
        b.changes("base", None)
            .unwrap()
            .write_delta(&delta, false, &mut |_| {})
            .unwrap();
        let previous = std::fs::read(&delta).unwrap();
        let from = b.disk_path(b.checkpoint("cp0").unwrap());
        let want = {
            let img = image::open(b.active_path(), &OpenOptions::probing()).unwrap();
            read_all(&**img.disk())
        };
        let mut n = 0;
        loop {
            let fault = if n % 2 == 0 {
                Fault::Eio
            } else {
                Fault::Enospc
            };
            let opener = Arc::new(FaultOpener::new(n, fault));
            let opts = OpenOptions {
                opener: opener.clone(),
                ..OpenOptions::probing()
            };
            let mut c = checkpoint::Changes::open(&from, &b.active_path(), &opts).unwrap();
            let r = c.write_delta(&delta, true, &mut |_| {});
            drop(c);
            assert!(!tmp_file.exists(), "{format:?} n={n}: temporary file left");
            if !opener.pending() {
                let e = r.expect_err("the fault fired");
                assert!(!e.to_string().is_empty());
                assert!(
                    std::fs::read(&delta).unwrap() == previous,
                    "{format:?} n={n}: the previous delta changed"
                );
                n += 1;
                continue;
            }
            r.unwrap();
            break;
        }
        assert!(n > 3, "{format:?}: the faults met only {n} mutations");
        let opts = OpenOptions {
            parent_policy: ParentPolicy {
                allowed_dirs: vec![dir.clone()],
                ..ParentPolicy::default()
            },
            ..OpenOptions::probing()
        };
        let img = image::open(&delta, &opts).unwrap();
        assert!(read_all(&**img.disk()) == want, "{format:?}");
    }
}
