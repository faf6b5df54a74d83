//! VHDX I/O against a raw-file baseline, in the same groups so that the
//! ratios are visible side by side:
//!
//! - `random_4k_read`: 4 KiB reads hopping across the fully allocated blocks
//!   of a 1 GiB dynamic VHDX, vs. `pread` on a raw file holding the same data,
//!   and vs. `pread` of the same pages of the VHDX file (offsets mapped by the
//!   library beforehand): two files may sit in unequally fast memory, the
//!   same pages may not.
//! - `first_touch_4k_write`: every 4 KiB write lands in a new 1 MiB block of
//!   a fresh dynamic VHDX (no flush per write, one flush at the end of the
//!   batch) vs. the same writes into a fresh sparse raw file plus `fdatasync`.
//! - `seq_1m_read`: sequential 1 MiB reads of the same images.
//!
//! Files live in a tempdir under Cargo's target tmp dir (the real file
//! system, not tmpfs); reads come from the page cache after setup.

// criterion_group! defines an undocumented public function.
#![allow(missing_docs)]

use benches::{buffer, fill_random, Strided};
use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use disk::{Extent, FileOffset, Mapping, VirtualDisk};
use image::{CreateOptions, Format, Image, Kind, OpenOptions};
use std::fs::File;
use std::hint::black_box;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::time::{Duration, Instant};
use vhdx::Vhdx;

const KIB: u64 = 1 << 10;
const MIB: u64 = 1 << 20;
const GIB: u64 = 1 << 30;
/// Size of the read fixtures.
const READ_DISK: u64 = GIB;
/// Block size of the read fixture (the `CreateOptions` default).
const READ_BLOCK: u32 = 32 << 20;
/// Block size of the first-touch write images.
const WRITE_BLOCK: u64 = MIB;
/// A stride of a prime number of 4 KiB pages (about 4 MiB): consecutive
/// reads land in different 1 MiB ranges and, modulo the disk size, visit
/// every page once before repeating.
const READ_STEP: u64 = 1009 * 4 * KIB;

fn bench_dir() -> tempfile::TempDir {
    tempfile::Builder::new()
        .prefix("vhdx-io-bench")
        .tempdir_in(env!("CARGO_TARGET_TMPDIR"))
        .expect("create bench tempdir")
}

/// A 1 GiB dynamic VHDX with every block written, and a raw file with the
/// same bytes.
fn read_fixtures(dir: &Path) -> (Image, File, std::path::PathBuf) {
    let vhdx_path = dir.join("read.vhdx");
    let raw_path = dir.join("read.raw");
    let mut opts = vhdx::CreateOptions::new(READ_DISK);
    opts.block_size = READ_BLOCK;
    let created = create(&vhdx_path, Kind::Vhdx(opts));
    let v = created.disk();
    let raw = File::create(&raw_path).expect("create read.raw");
    let mut buf = buffer(4 * MIB);
    let mut off = 0;
    while off < READ_DISK {
        fill_random(&mut buf, off / MIB + 1);
        v.write_at(&buf, off).expect("fill read.vhdx");
        raw.write_all_at(&buf, off).expect("fill read.raw");
        off += buf.len() as u64;
    }
    v.close().expect("close read.vhdx");
    drop((raw, created));
    let img = image::open(&vhdx_path, &OpenOptions::new(Format::Vhdx)).expect("open read.vhdx");
    let stats = img
        .vhdx()
        .expect("a VHDX")
        .allocation_stats()
        .expect("allocation stats");
    assert_eq!(
        stats.allocated_bytes, READ_DISK,
        "read.vhdx fully allocated"
    );
    let raw = File::open(&raw_path).expect("open read.raw");
    (img, raw, vhdx_path)
}

/// Create (overwriting) `path` as `kind` through the front door.
fn create(path: &Path, kind: Kind) -> Image {
    let opts = CreateOptions {
        overwrite: true,
        ..CreateOptions::new(kind)
    };
    image::create(path, &opts).expect("create fixture")
}

/// Where the 4 KiB reads of one full cycle of the read pattern live in the
/// VHDX file.
fn mapped_read_offsets(vhdx: &Vhdx) -> Vec<u64> {
    Strided::new(0, READ_STEP, READ_DISK)
        .take((READ_DISK / (4 * KIB)) as usize)
        .map(|off| match vhdx.map(off, 4 * KIB).expect("map") {
            Extent {
                mapping: Mapping::Data(FileOffset(fo)),
                len,
                ..
            } if len == 4 * KIB => fo,
            e => panic!("read at {off:#x} is not allocated: {e:?}"),
        })
        .collect()
}

fn random_reads(c: &mut Criterion, vhdx: &Vhdx, vhdx_path: &Path, raw: &File) {
    let mut g = c.benchmark_group("random_4k_read");
    g.throughput(Throughput::Bytes(4 * KIB));
    g.measurement_time(Duration::from_secs(3));
    g.warm_up_time(Duration::from_secs(1));
    let mut buf = buffer(4 * KIB);
    let mut offs = Strided::new(0, READ_STEP, READ_DISK);
    g.bench_function("vhdx", |b| {
        b.iter(|| {
            let off = offs.next().unwrap_or(0);
            vhdx.read_at(&mut buf, off).expect("vhdx read");
            black_box(&buf);
        })
    });
    let mut offs = Strided::new(0, READ_STEP, READ_DISK);
    g.bench_function("raw_pread", |b| {
        b.iter(|| {
            let off = offs.next().unwrap_or(0);
            raw.read_exact_at(&mut buf, off).expect("raw pread");
            black_box(&buf);
        })
    });
    let same = File::open(vhdx_path).expect("open read.vhdx");
    let mapped = mapped_read_offsets(vhdx);
    let mut i = 0;
    g.bench_function("vhdx_file_pread_same_pages", |b| {
        b.iter(|| {
            same.read_exact_at(&mut buf, mapped[i]).expect("pread");
            i = (i + 1) % mapped.len();
            black_box(&buf);
        })
    });
    g.finish();
}

fn sequential_reads(c: &mut Criterion, vhdx: &Vhdx, raw: &File) {
    let mut g = c.benchmark_group("seq_1m_read");
    g.throughput(Throughput::Bytes(MIB));
    g.measurement_time(Duration::from_secs(3));
    g.warm_up_time(Duration::from_secs(1));
    let mut buf = buffer(MIB);
    let mut offs = Strided::new(0, MIB, READ_DISK);
    g.bench_function("vhdx", |b| {
        b.iter(|| {
            let off = offs.next().unwrap_or(0);
            vhdx.read_at(&mut buf, off).expect("vhdx read");
            black_box(&buf);
        })
    });
    let mut offs = Strided::new(0, MIB, READ_DISK);
    g.bench_function("raw_pread", |b| {
        b.iter(|| {
            let off = offs.next().unwrap_or(0);
            raw.read_exact_at(&mut buf, off).expect("raw pread");
            black_box(&buf);
        })
    });
    g.finish();
}

/// Time `iters` first-touch 4 KiB writes (one per 1 MiB block) into a fresh
/// image made by `make` (not timed), plus the flush at the end.
fn first_touch<D: VirtualDisk>(iters: u64, make: impl FnOnce(u64) -> D) -> Duration {
    let disk = make(iters.max(1) * WRITE_BLOCK);
    let mut buf = buffer(4 * KIB);
    fill_random(&mut buf, iters);
    let start = Instant::now();
    for i in 0..iters {
        disk.write_at(&buf, i * WRITE_BLOCK)
            .expect("first-touch write");
    }
    disk.flush().expect("flush");
    let t = start.elapsed();
    drop(disk);
    t
}

fn first_touch_writes(c: &mut Criterion, dir: &Path) {
    let mut g = c.benchmark_group("first_touch_4k_write");
    g.throughput(Throughput::Bytes(4 * KIB));
    g.measurement_time(Duration::from_secs(4));
    g.warm_up_time(Duration::from_secs(1));
    g.sample_size(20);
    let vhdx_path = dir.join("write.vhdx");
    let raw_path = dir.join("write.raw");
    g.bench_function(BenchmarkId::new("vhdx", "1M-blocks"), |b| {
        b.iter_custom(|iters| {
            first_touch(iters, |size| {
                let mut o = vhdx::CreateOptions::new(size);
                o.block_size = u32::try_from(WRITE_BLOCK).expect("1 MiB");
                create(&vhdx_path, Kind::Vhdx(o)).disk().clone()
            })
        })
    });
    g.bench_function(BenchmarkId::new("raw", "1M-stride"), |b| {
        b.iter_custom(|iters| {
            first_touch(iters, |size| {
                create(&raw_path, Kind::Raw { size }).disk().clone()
            })
        })
    });
    g.finish();
    let _ = std::fs::remove_file(vhdx_path);
    let _ = std::fs::remove_file(raw_path);
}

fn vhdx_io(c: &mut Criterion) {
    let dir = bench_dir();
    {
        let (img, raw, vhdx_path) = read_fixtures(dir.path());
        let vhdx = img.vhdx().expect("a VHDX");
        random_reads(c, vhdx, &vhdx_path, &raw);
        sequential_reads(c, vhdx, &raw);
    }
    first_touch_writes(c, dir.path());
}

criterion_group! {
    name = benches;
    config = Criterion::default().sample_size(30);
    targets = vhdx_io
}
criterion_main!(benches);
