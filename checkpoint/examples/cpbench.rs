//! Time `Bundle::create` (take a checkpoint) on disks of several sizes:
//! the target is O(1), at most 10 ms whatever the disk size.
//!
//! `cargo run --release -p checkpoint --example cpbench [DIR]` (DIR: where
//! to make the bundles; default a temporary directory).
//!
//! Two cadences: checkpoints 200 ms apart (a VM runs between them; a VHD
//! bundle's spare child is ready by then) and back to back (each create
//! first waits for the spare the previous one started).

use checkpoint::{Bundle, Format};
use std::time::Instant;

fn main() {
    let base = std::env::args()
        .nth(1)
        .map(std::path::PathBuf::from)
        .unwrap_or_else(std::env::temp_dir)
        .join(format!("cpbench-{}", std::process::id()));
    for (format, size) in [
        (Format::Vhdx, 1u64 << 30),
        (Format::Vhdx, 1 << 40),
        (Format::Vhdx, 64 << 40),
        (Format::Vhd, 1 << 30),
        (Format::Vhd, 2040 << 30),
    ] {
        for (cadence, pause) in [("200 ms apart", 200u64), ("back to back", 0)] {
            let dir = base.join(format!("{format:?}-{size}-{pause}"));
            let mut b = Bundle::init(&dir, format, size).expect("init");
            let mut times = Vec::new();
            for i in 0..20 {
                std::thread::sleep(std::time::Duration::from_millis(pause));
                let t = Instant::now();
                b.create(&format!("cp{i}")).expect("create");
                times.push(t.elapsed().as_secs_f64() * 1000.0);
            }
            times.sort_by(|a, b| a.total_cmp(b));
            println!(
                "{format:?} {:>6} GiB, {cadence}: create median {:.2} ms, max {:.2} ms (20 checkpoints)",
                size >> 30,
                times[times.len() / 2],
                times[times.len() - 1]
            );
            drop(b);
            std::fs::remove_dir_all(&dir).ok();
        }
    }
    std::fs::remove_dir_all(&base).ok();
}
