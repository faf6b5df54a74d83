//! Library-level raw → VHDX conversion of a 256 MiB half-allocated image
//! (alternating 8 MiB of data and 8 MiB holes), skipping all-zero chunks,
//! ending durable (`close`), with 256 KiB and 4 MiB copy chunks (on the
//! 2-vCPU VM this was written on, 4 MiB chunks cost 2-4x the CPU time of
//! 256 KiB ones). Baseline in the same group: the same copy loop into a
//! sparse raw file, ending with `fdatasync`.

// criterion_group! defines an undocumented public function.
#![allow(missing_docs)]

use benches::{buffer, copy_nonzero, fill_random};
use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use image::{CreateOptions, Format, Kind, OpenOptions};
use std::fs::File;
use std::hint::black_box;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::time::Duration;

const MIB: u64 = 1 << 20;
const SIZE: u64 = 256 * MIB;
const REGION: u64 = 8 * MIB;
const KIB: usize = 1 << 10;
/// Copy chunk of the raw baseline.
const RAW_CHUNK: usize = 256 * KIB;

fn make_source(path: &Path) {
    let f = File::create(path).expect("create source");
    f.set_len(SIZE).expect("size source");
    let mut buf = buffer(REGION);
    for (i, off) in (0..SIZE).step_by(buf.len() * 2).enumerate() {
        fill_random(&mut buf, i as u64 + 1);
        f.write_all_at(&buf, off).expect("fill source");
    }
    f.sync_all().expect("sync source");
}

fn convert(c: &mut Criterion) {
    let dir = tempfile::Builder::new()
        .prefix("convert-bench")
        .tempdir_in(env!("CARGO_TARGET_TMPDIR"))
        .expect("create bench tempdir");
    let src_path = dir.path().join("src.raw");
    make_source(&src_path);
    let src_img = image::open(&src_path, &OpenOptions::new(Format::Raw)).expect("open source");
    let src = src_img.disk();
    let vhdx_path = dir.path().join("dst.vhdx");
    let raw_path = dir.path().join("dst.raw");

    let mut g = c.benchmark_group("convert_256m_half_allocated");
    g.throughput(Throughput::Bytes(SIZE));
    g.sample_size(10);
    g.warm_up_time(Duration::from_secs(1));
    g.measurement_time(Duration::from_secs(5));
    for chunk in [256 * KIB, 4096 * KIB] {
        g.bench_function(
            BenchmarkId::new("raw_to_vhdx", format!("{}K", chunk / KIB)),
            |b| {
                b.iter(|| {
                    let dst = create(&vhdx_path, Kind::Vhdx(vhdx::CreateOptions::new(SIZE)));
                    let n = copy_nonzero(&**src, &**dst.disk(), chunk).expect("copy");
                    dst.close().expect("close target");
                    black_box(n)
                })
            },
        );
    }
    let raw_id = BenchmarkId::new("raw_to_raw", format!("{}K", RAW_CHUNK / KIB));
    g.bench_function(raw_id, |b| {
        b.iter(|| {
            let dst = create(&raw_path, Kind::Raw { size: SIZE });
            let n = copy_nonzero(&**src, &**dst.disk(), RAW_CHUNK).expect("copy");
            dst.close().expect("flush target");
            black_box(n)
        })
    });
    g.finish();
}

/// Create (overwriting) `path` as `kind` through the front door.
fn create(path: &std::path::Path, kind: Kind) -> image::Image {
    let opts = CreateOptions {
        overwrite: true,
        ..CreateOptions::new(kind)
    };
    image::create(path, &opts).expect("create target")
}

criterion_group!(benches, convert);
criterion_main!(benches);
