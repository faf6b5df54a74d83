//! The fixtures of the chain benchmarks (the `chainbench` example and the
//! criterion bench `chain`): differencing VHD chains of depth 1, 16 and 64
//! over a 256 MiB disk of 2 MiB blocks, every byte written, in two layouts
//! ([`Layout`]); see the `chainbench` example's docs.

use crate::{buffer, fill_random};
use disk::VirtualDisk;
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// Bytes per MiB.
pub const MIB: u64 = 1 << 20;
/// Bytes per MiB, as a length.
const MIB_BYTES: usize = 1 << 20;
/// Virtual size of every fixture (before the VHD's CHS rounding), all
/// written.
pub const DISK: u64 = 256 * MIB;
/// VHD block size of every layer (the default).
pub const BLOCK: u64 = 2 * MIB;
/// Request size.
pub const READ: usize = 4096;
/// The chain depths measured (layers, the base included).
pub const DEPTHS: [usize; 3] = [1, 16, 64];

/// Where the data of a fixture lives.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Layout {
    /// All in the base layer.
    Base,
    /// A different 1/depth share of the blocks in each layer.
    Spread,
}

impl Layout {
    /// Both layouts.
    pub const ALL: [Layout; 2] = [Layout::Base, Layout::Spread];
    /// Its name in reports.
    pub fn name(self) -> &'static str {
        match self {
            Layout::Base => "base",
            Layout::Spread => "spread",
        }
    }
}

/// The fixture files.
pub struct Fixtures {
    /// The `base` chain, base first (64 layers).
    base_chain: Vec<PathBuf>,
    /// The leaves of the `spread` chains of depth 16 and 64.
    spread: Vec<(usize, PathBuf)>,
}

impl Fixtures {
    /// Build every fixture in `dir`.
    pub fn build(dir: &Path) -> Fixtures {
        let max = *DEPTHS.iter().max().expect("depths");
        let base_chain = build_chain(&dir.join("base"), max, |_| 0);
        let spread = DEPTHS
            .iter()
            .filter(|&&d| d > 1)
            .map(|&d| {
                let chain = build_chain(&dir.join(format!("spread{d}")), d, |b| owner(b, d));
                (d, chain.last().expect("layers").clone())
            })
            .collect();
        Fixtures { base_chain, spread }
    }

    /// The leaf of the chain of `depth` layers in `layout`.
    pub fn leaf(&self, layout: Layout, depth: usize) -> &Path {
        match layout {
            Layout::Spread if depth > 1 => {
                &self
                    .spread
                    .iter()
                    .find(|(d, _)| *d == depth)
                    .expect("a spread chain of that depth")
                    .1
            }
            _ => &self.base_chain[depth - 1],
        }
    }
}

/// The layer that holds block `b` in a `spread` chain of `depth` layers: a
/// fixed permutation of the blocks, dealt out round-robin.
fn owner(b: u64, depth: usize) -> usize {
    let blocks = DISK / BLOCK;
    usize::try_from((b * 53 + 7) % blocks).expect("below the block count") % depth
}

/// The contents of MiB `m` of every fixture.
pub fn expected_mib(m: u64, buf: &mut [u8]) {
    fill_random(buf, m + 1);
}

/// A chain of `depth` VHDs in `dir` (created), where block `b` is written
/// (whole) in layer `owner(b)`. Returns the paths, base first.
fn build_chain(dir: &Path, depth: usize, owner: impl Fn(u64) -> usize) -> Vec<PathBuf> {
    std::fs::create_dir_all(dir).expect("create fixture dir");
    let mut buf = buffer(BLOCK);
    let mut paths: Vec<PathBuf> = Vec::with_capacity(depth);
    for layer in 0..depth {
        let path = dir.join(format!("layer{layer:02}.vhd"));
        let size = if paths.is_empty() { DISK } else { 0 };
        let opts = image::CreateOptions {
            parent: paths.last().cloned(),
            ..image::CreateOptions::new(image::Kind::Vhd(vhd::CreateOptions::new(size)))
        };
        let img = image::create(&path, &opts).expect("create layer");
        let d = img.disk();
        // CHS rounding adds a few hundred KiB, never read by the benchmark.
        assert!(d.virtual_size() >= DISK);
        for b in (0..DISK / BLOCK).filter(|&b| owner(b) == layer) {
            for (i, mib) in buf.chunks_mut(MIB_BYTES).enumerate() {
                expected_mib(b * (BLOCK / MIB) + i as u64, mib);
            }
            d.write_at(&buf, b * BLOCK).expect("write block");
        }
        img.close().expect("close layer");
        paths.push(path);
    }
    paths
}

/// The leaf layer `leaf` of a chain, opened read-only with its parents
/// (reads go down the layers one lookup each; see [`ChainView`] for one).
pub fn open_leaf(leaf: &Path) -> Arc<dyn VirtualDisk> {
    let opts = image::OpenOptions::new(image::Format::Vhd);
    image::open(leaf, &opts).expect("open leaf").driver().disk()
}

/// `count` aligned 4 KiB request offsets over the disk (xorshift, fixed seed).
pub fn read_offsets(count: usize) -> Vec<u64> {
    let mut x = 0x2545_f491_4f6c_dd1d_u64;
    (0..count)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x % (DISK / READ as u64)) * READ as u64
        })
        .collect()
}

/// Check that `d` reads the expected bytes at the first `n` offsets.
pub fn verify(d: &dyn VirtualDisk, offs: &[u64], n: usize) {
    let mut mib = buffer(MIB);
    let mut buf = vec![0u8; READ];
    for &off in offs.iter().take(n) {
        expected_mib(off / MIB, &mut mib);
        d.read_at(&mut buf, off).expect("read");
        let within = usize::try_from(off % MIB).expect("below 1 MiB");
        assert!(
            buf == mib[within..within + READ],
            "wrong data at {off:#x} through {}",
            d.storage().name()
        );
    }
}
