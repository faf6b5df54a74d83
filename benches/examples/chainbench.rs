//! 4 KiB random reads through differencing VHD chains of depth 1, 16 and 64,
//! through `disk::ChainView` and through the bare leaf, as a plain program.
//!
//! ```text
//! cargo run --release -p benches --example chainbench -- [--reads N] [--rounds R] [--dir DIR]
//! ```
//!
//! Fixtures (built once in a tempdir under DIR, default the system temp
//! dir; about 768 MiB): a 256 MiB disk of 2 MiB blocks, every byte written,
//! in two layouts:
//! - `base`: all the data in the base layer (a dynamic VHD), under 63 empty
//!   differencing layers; depth d reads from layer d-1 as the leaf.
//! - `spread`: each of the d layers holds a different 1/d share of the
//!   blocks (whole blocks, so every layer's blocks are fully present).
//!
//! Depth 1 is the base alone (one dynamic VHD, no parent) in both layouts.
//! Every configuration first reads its N request offsets once (page cache,
//! view cache and the layers' bitmaps warm); then, in each of R rounds, the
//! configurations take turns (so that drift of the machine hits them all
//! alike) timing N aligned 4 KiB reads (fixed seed) through the view and
//! through the bare leaf, N lookups (`map`) of the view alone, and N bare
//! storage reads of the very pages the view maps the requests to (the
//! floor: two files can sit in unequally fast memory, the same pages
//! cannot); the best round counts. Prints ops/s per configuration and, per
//! layout, the time-per-read ratios depth16/depth1 and depth64/depth1
//! through the view, through the bare leaf (no view) and for the view's
//! lookup alone; then a machine line per configuration:
//! `RESULT layout=L path=view|leaf depth=D ops_per_sec=R`.
//!
//! The fixtures are [`benches::chain`]'s, which the criterion bench
//! `benches/chain.rs` uses too, so both measure the same disks.

use benches::chain::{open_leaf, read_offsets, verify, Fixtures, Layout, DEPTHS, READ};
use disk::{ChainView, Extent, FileOffset, Mapping, VirtualDisk};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Instant;

/// Seconds per read of one timed pass over `offs`.
fn time_reads(d: &dyn VirtualDisk, offs: &[u64], buf: &mut [u8]) -> f64 {
    let start = Instant::now();
    for &off in offs {
        d.read_at(buf, off).expect("read");
    }
    std::hint::black_box(&buf);
    start.elapsed().as_secs_f64() / offs.len() as f64
}

/// Seconds per lookup of one timed pass of `map` calls over `offs`.
fn time_maps(d: &dyn VirtualDisk, offs: &[u64]) -> f64 {
    let start = Instant::now();
    for &off in offs {
        std::hint::black_box(d.map(off, READ as u64).expect("map"));
    }
    start.elapsed().as_secs_f64() / offs.len() as f64
}

/// Where the view maps each of `offs` (storage depth, file offset), for the
/// bare-`pread` baseline on the very same pages.
fn mapped(view: &ChainView, offs: &[u64]) -> Vec<(u32, u64)> {
    offs.iter()
        .map(|&off| match view.map(off, READ as u64).expect("map") {
            Extent {
                mapping: Mapping::Data(FileOffset(fo)),
                len,
                ..
            } if len == READ as u64 => (0, fo),
            Extent {
                mapping:
                    Mapping::Ancestor {
                        depth,
                        offset: FileOffset(fo),
                    },
                len,
                ..
            } if len == READ as u64 => (depth, fo),
            e => panic!("read at {off:#x} is not one stored run: {e:?}"),
        })
        .collect()
}

/// Seconds per read of one timed pass of bare storage reads at `at`.
fn time_preads(view: &ChainView, at: &[(u32, u64)], buf: &mut [u8]) -> f64 {
    let start = Instant::now();
    for &(depth, fo) in at {
        let s = view.layer_storage(depth).expect("layer");
        s.read_at(buf, fo).expect("pread");
    }
    std::hint::black_box(&buf);
    start.elapsed().as_secs_f64() / at.len() as f64
}

/// One measured configuration.
struct Config {
    layout: Layout,
    depth: usize,
    leaf: Arc<dyn VirtualDisk>,
    view: ChainView,
    /// Where the view maps the requests.
    at: Vec<(u32, u64)>,
    /// Best seconds per read: through the view, through the bare leaf.
    view_read: f64,
    leaf_read: f64,
    /// Best seconds per `map` of the view.
    view_map: f64,
    /// Best seconds per bare storage read of the same pages.
    pread: f64,
}

fn main() {
    let mut reads = 200_000usize;
    let mut rounds = 5usize;
    let mut dir = std::env::temp_dir();
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        let mut value = || args.next().unwrap_or_else(|| panic!("{a} needs a value"));
        match a.as_str() {
            "--reads" => reads = value().parse().expect("--reads N"),
            "--rounds" => rounds = value().parse().expect("--rounds R"),
            "--dir" => dir = PathBuf::from(value()),
            _ => {
                eprintln!(
                    "usage: chainbench [--reads N] [--rounds R] [--dir DIR]\nunknown argument {a}"
                );
                std::process::exit(2);
            }
        }
    }
    let tmp = tempfile::Builder::new()
        .prefix("chainbench")
        .tempdir_in(&dir)
        .expect("create tempdir");
    let t = Instant::now();
    let fx = Fixtures::build(tmp.path());
    println!(
        "fixtures: 256 MiB, 2 MiB blocks, depths {DEPTHS:?}, built in {:.1} s in {}",
        t.elapsed().as_secs_f64(),
        tmp.path().display()
    );
    println!(
        "{reads} aligned 4 KiB random reads per pass; {rounds} rounds, configurations \
         interleaved in each; best pass counts\n"
    );
    let offs = read_offsets(reads);
    let mut configs: Vec<Config> = Layout::ALL
        .iter()
        .flat_map(|&layout| DEPTHS.iter().map(move |&depth| (layout, depth)))
        .map(|(layout, depth)| {
            let leaf = open_leaf(fx.leaf(layout, depth));
            let view = ChainView::new(leaf.clone());
            assert_eq!(view.depth(), depth);
            verify(&view, &offs, 2000);
            verify(&*leaf, &offs, 2000);
            let at = mapped(&view, &offs);
            Config {
                at,
                layout,
                depth,
                leaf,
                view,
                view_read: f64::INFINITY,
                leaf_read: f64::INFINITY,
                view_map: f64::INFINITY,
                pread: f64::INFINITY,
            }
        })
        .collect();
    let mut buf = vec![0u8; READ];
    // Warm-up: page cache, view cache, the layers' bitmaps.
    for c in &configs {
        time_reads(&c.view, &offs, &mut buf);
        time_reads(&*c.leaf, &offs, &mut buf);
    }
    for _ in 0..rounds {
        for c in &mut configs {
            c.view_read = c.view_read.min(time_reads(&c.view, &offs, &mut buf));
            c.leaf_read = c.leaf_read.min(time_reads(&*c.leaf, &offs, &mut buf));
            c.view_map = c.view_map.min(time_maps(&c.view, &offs));
            c.pread = c.pread.min(time_preads(&c.view, &c.at, &mut buf));
        }
    }
    for layout in Layout::ALL {
        let mine = || configs.iter().filter(move |c| c.layout == layout);
        for c in mine() {
            for (path, s) in [("view", c.view_read), ("leaf", c.leaf_read)] {
                println!(
                    "{:6} depth {:2} {path}: {:9.0} ops/s ({:.3} us/read)",
                    layout.name(),
                    c.depth,
                    1.0 / s,
                    s * 1e6
                );
            }
            println!(
                "{:6} depth {:2} view lookup only (map): {:.0} ns; bare pread of the same pages: {:.3} us",
                layout.name(),
                c.depth,
                c.view_map * 1e9,
                c.pread * 1e6
            );
        }
        let at = |depth, f: fn(&Config) -> f64| {
            mine().find(|c| c.depth == depth).map(f).expect("measured")
        };
        for (what, f) in [
            ("through ChainView", (|c| c.view_read) as fn(&Config) -> f64),
            ("bare leaf (no view)", |c| c.leaf_read),
            ("view lookup (map) only", |c| c.view_map),
        ] {
            println!(
                "{:6} {what:22}: time per read depth16/depth1 = {:.2}x, depth64/depth1 = {:.2}x",
                layout.name(),
                at(16, f) / at(1, f),
                at(64, f) / at(1, f)
            );
        }
        println!();
    }
    for c in &configs {
        for (path, s) in [("view", c.view_read), ("leaf", c.leaf_read)] {
            println!(
                "RESULT layout={} path={path} depth={} ops_per_sec={:.0}",
                c.layout.name(),
                c.depth,
                1.0 / s
            );
        }
    }
}
