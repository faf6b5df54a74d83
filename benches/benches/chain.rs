//! 4 KiB random reads (aligned, fixed seed) through differencing VHD chains
//! of depth 1, 16 and 64 over a 256 MiB disk, through `disk::ChainView`
//! (`view`) and, for comparison, through the bare leaf (`leaf`, a lookup
//! per layer), in two groups:
//!
//! - `chain_4k_read_base`: all data in the base layer, under empty
//!   differencing layers;
//! - `chain_4k_read_spread`: each layer holds a different 1/depth share of
//!   the (2 MiB) blocks.
//!
//! Depth 1 is a single dynamic VHD (no parent). The fixtures are
//! [`benches::chain`]'s, as the `chainbench` example's, built once in a
//! tempdir under Cargo's target tmp dir; reads come from the page cache, and
//! the view's cache is warm (criterion's warm-up reads first).

// criterion_group! defines an undocumented public function.
#![allow(missing_docs)]

use benches::chain::{open_leaf, read_offsets, verify, Fixtures, Layout, DEPTHS, READ};
use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use disk::{ChainView, VirtualDisk};
use std::time::Duration;

fn chain_reads(c: &mut Criterion) {
    let dir = tempfile::Builder::new()
        .prefix("chain-bench")
        .tempdir_in(env!("CARGO_TARGET_TMPDIR"))
        .expect("create bench tempdir");
    let fx = Fixtures::build(dir.path());
    let offs = read_offsets(1 << 16);
    let mut buf = vec![0u8; READ];
    for layout in Layout::ALL {
        let mut g = c.benchmark_group(format!("chain_4k_read_{}", layout.name()));
        g.throughput(Throughput::Bytes(READ as u64));
        g.measurement_time(Duration::from_secs(3));
        g.warm_up_time(Duration::from_secs(1));
        for depth in DEPTHS {
            let leaf = open_leaf(fx.leaf(layout, depth));
            let view = ChainView::new(leaf.clone());
            verify(&view, &offs, 1000);
            for (path, d) in [("view", &view as &dyn VirtualDisk), ("leaf", &*leaf)] {
                let mut i = 0;
                g.bench_function(BenchmarkId::new(path, depth), |b| {
                    b.iter(|| {
                        let off = offs[i % offs.len()];
                        i += 1;
                        d.read_at(&mut buf, off).expect("read");
                    })
                });
            }
        }
        g.finish();
    }
}

criterion_group!(benches, chain_reads);
criterion_main!(benches);
