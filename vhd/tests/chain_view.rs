//! `disk::ChainView` over real differencing VHD chains: chains of depth 1,
//! 5 and 20 with random, sector-unaligned writes in every layer (each
//! written while it was the leaf), read through the view and through the
//! bare leaf, compared with an in-memory model; then written through the
//! view, re-read, and reopened.

// Test images and buffers are small: their offsets and sizes fit any integer type.
#![allow(clippy::cast_possible_truncation)]

mod common;
use common::{assert_same, MIB};
use disk::{ChainView, Mapping, VirtualDisk};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use vhd::{CreateOptions, OpenOptions, Vhd};

fn rw() -> OpenOptions {
    OpenOptions {
        writable: true,
        ..OpenOptions::default()
    }
}

/// A small xorshift generator (seeded; no dependencies).
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
    fn bytes(&mut self, n: usize) -> Vec<u8> {
        (0..n).map(|_| self.next() as u8).collect()
    }
}

/// `count` writes at random offsets that are never sector-aligned, of
/// 1 byte to 150 KiB, mirrored into `model`.
fn random_writes(d: &dyn VirtualDisk, model: &mut [u8], rng: &mut Rng, count: usize) {
    let size = model.len() as u64;
    for _ in 0..count {
        let len = if rng.below(4) == 0 {
            1 + rng.below(600)
        } else {
            1 + rng.below(150 * 1024)
        };
        let mut off = rng.below(size - len);
        if off.is_multiple_of(512) {
            off += 1 + rng.below(511);
        }
        let len = len.min(size - off) as usize;
        let data = rng.bytes(len);
        d.write_at(&data, off).unwrap();
        model[off as usize..off as usize + len].copy_from_slice(&data);
    }
}

fn read(d: &dyn VirtualDisk, offset: u64, len: usize) -> Vec<u8> {
    let mut v = vec![0u8; len];
    d.read_at(&mut v, offset).unwrap();
    v
}

/// A chain of `depth` VHDs (a dynamic base and `depth - 1` differencing
/// layers, all with `block` bytes per block) in `dir`, each written at
/// random while it was the leaf. Returns the leaf's path and the model.
fn build_chain(dir: &Path, depth: usize, block: u32, seed: u64) -> (PathBuf, Vec<u8>) {
    let mut rng = Rng(seed);
    let mut opts = CreateOptions::new(8 * MIB + 3 * 512);
    opts.block_size = block;
    let mut path = dir.join("layer0.vhd");
    let base = Vhd::create(&path, &opts, false).unwrap();
    let mut model = vec![0u8; base.virtual_size() as usize];
    random_writes(&base, &mut model, &mut rng, 40);
    base.close().unwrap();
    opts.virtual_size = 0; // the parent's
    for i in 1..depth {
        let child = dir.join(format!("layer{i}.vhd"));
        let d = Vhd::create_differencing(&child, &path, &opts, false).unwrap();
        random_writes(&d, &mut model, &mut rng, 12);
        d.close().unwrap();
        path = child;
    }
    (path, model)
}

/// The whole disk and random unaligned pieces of it, through the view and
/// through the bare leaf, against the model.
fn check(view: &ChainView, model: &[u8], rng: &mut Rng, what: &str) {
    assert_same(&read(view, 0, model.len()), model, &format!("{what}: view"));
    assert_same(
        &read(view.top(), 0, model.len()),
        model,
        &format!("{what}: bare leaf"),
    );
    for _ in 0..200 {
        let len = 1 + rng.below(70_000) as usize;
        let off = rng.below((model.len() - len) as u64);
        let want = &model[off as usize..off as usize + len];
        assert_same(
            &read(view, off, len),
            want,
            &format!("{what}: {off:#x}+{len:#x}"),
        );
    }
}

fn chain_view_matches_model(depth: usize) {
    for (i, block) in [64 * 1024u32, 2 * MIB as u32].into_iter().enumerate() {
        let tmp = tempfile::tempdir().unwrap();
        let seed = 0x9e37_79b9 + (depth * 10 + i) as u64;
        let (leaf, mut model) = build_chain(tmp.path(), depth, block, seed);
        let mut rng = Rng(seed ^ 0xdead_beef);
        let what = format!("depth {depth}, {block}-byte blocks");

        let view = ChainView::new(Arc::new(Vhd::open(&leaf, &rw()).unwrap()));
        assert_eq!(view.depth(), depth);
        assert_eq!(view.virtual_size(), model.len() as u64);
        assert!(view.is_writable());
        check(&view, &model, &mut rng, &what);
        // What the leaf leaves to its parents, the view finds in their files.
        if depth > 1 {
            let mut pos = 0;
            let mut ancestors = 0;
            while pos < view.virtual_size() {
                let e = view.map(pos, view.virtual_size() - pos).unwrap();
                assert_ne!(e.mapping, Mapping::Parent, "{what}: at {pos:#x}");
                if let Mapping::Ancestor { depth: d, .. } = e.mapping {
                    assert!((1..depth as u32).contains(&d), "{what}: {e:?}");
                    ancestors += 1;
                }
                pos += e.len;
            }
            assert!(ancestors > 0, "{what}: nothing read from an ancestor");
        }

        // Writes through the view, after its cache has been filled.
        random_writes(&view, &mut model, &mut rng, 30);
        check(
            &view,
            &model,
            &mut rng,
            &format!("{what}, written through the view"),
        );
        view.flush().unwrap();
        drop(view);

        // The writes reached the leaf's file.
        let view = ChainView::new(Arc::new(Vhd::open(&leaf, &OpenOptions::default()).unwrap()));
        assert!(!view.is_writable());
        check(&view, &model, &mut rng, &format!("{what}, reopened"));
    }
}

#[test]
fn chain_view_depth_1() {
    chain_view_matches_model(1);
}

#[test]
fn chain_view_depth_5() {
    chain_view_matches_model(5);
}

#[test]
fn chain_view_depth_20() {
    chain_view_matches_model(20);
}
