//! A `qemu-img bench`-shaped I/O benchmark through this library.
//!
//! ```text
//! cargo run --release -p benches --example iobench -- read|write IMAGE COUNT
//!     [-s BUFFER_SIZE] [-S STEP_SIZE] [-o OFFSET] [--pattern BYTE] [-f raw|vhdx]
//!     [--pread-mapped]
//! ```
//!
//! Issues COUNT requests of BUFFER_SIZE bytes (default 4K), one at a time,
//! the first at OFFSET (default 0), each next one STEP_SIZE (default
//! BUFFER_SIZE) further, modulo the virtual size: the same pattern as
//! `qemu-img bench -d 1`. I/O goes through the page cache (like qemu-img's
//! default `-t writeback`). A write run flushes once, at the end, and the
//! flush is part of the timed run. The format is detected from the content
//! unless `-f` is given.
//!
//! `--pread-mapped` (reads only) is the bare-`pread` baseline on the very same
//! page-cache pages: it first asks the library where each request lives in
//! the image file (untimed), then times a plain `pread` loop at those file
//! offsets. The difference to a normal run is the library's own overhead.
//!
//! Prints a human line and a machine line:
//! `RESULT ops=N seconds=S ops_per_sec=R flush_seconds=F`.

use benches::Strided;
use disk::{FileOffset, Mapping, VirtualDisk};
use std::os::unix::fs::FileExt;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Instant;

struct Args {
    write: bool,
    image: String,
    count: u64,
    buf_size: u64,
    step: Option<u64>,
    offset: u64,
    pattern: u8,
    format: Option<String>,
    pread_mapped: bool,
}

const USAGE: &str = "usage: iobench read|write IMAGE COUNT [-s BUFFER_SIZE] [-S STEP_SIZE] \
                     [-o OFFSET] [--pattern BYTE] [-f raw|vhdx] [--pread-mapped]";

fn parse_size(s: &str) -> Result<u64, String> {
    let (num, mult) = match s.chars().last() {
        Some('K' | 'k') => (&s[..s.len() - 1], 1u64 << 10),
        Some('M' | 'm') => (&s[..s.len() - 1], 1 << 20),
        Some('G' | 'g') => (&s[..s.len() - 1], 1 << 30),
        Some('T' | 't') => (&s[..s.len() - 1], 1 << 40),
        _ => (s, 1),
    };
    num.parse::<u64>()
        .ok()
        .and_then(|n| n.checked_mul(mult))
        .ok_or_else(|| format!("bad size {s:?}"))
}

fn parse_args() -> Result<Args, String> {
    let mut it = std::env::args().skip(1);
    let mut positional = Vec::new();
    let mut a = Args {
        write: false,
        image: String::new(),
        count: 0,
        buf_size: 4096,
        step: None,
        offset: 0,
        pattern: 0,
        format: None,
        pread_mapped: false,
    };
    while let Some(arg) = it.next() {
        let mut value = |name: &str| it.next().ok_or_else(|| format!("{name} needs a value"));
        match arg.as_str() {
            "-s" => a.buf_size = parse_size(&value("-s")?)?,
            "-S" => a.step = Some(parse_size(&value("-S")?)?),
            "-o" => a.offset = parse_size(&value("-o")?)?,
            "--pattern" => {
                let v = value("--pattern")?;
                a.pattern = v.parse().map_err(|_| format!("bad pattern byte {v:?}"))?;
            }
            "-f" => a.format = Some(value("-f")?),
            "--pread-mapped" => a.pread_mapped = true,
            "-h" | "--help" => return Err(USAGE.to_string()),
            _ if arg.starts_with('-') => return Err(format!("unknown option {arg}\n{USAGE}")),
            _ => positional.push(arg),
        }
    }
    let [mode, image, count] =
        <[String; 3]>::try_from(positional).map_err(|_| USAGE.to_string())?;
    a.write = match mode.as_str() {
        "read" => false,
        "write" => true,
        _ => return Err(format!("mode must be read or write, not {mode:?}\n{USAGE}")),
    };
    a.image = image;
    a.count = parse_size(&count)?;
    if a.pread_mapped && a.write {
        return Err("--pread-mapped is for reads only".into());
    }
    if a.buf_size == 0 {
        return Err("buffer size must be positive".into());
    }
    Ok(a)
}

fn open(a: &Args) -> Result<Arc<dyn VirtualDisk>, String> {
    let format = match &a.format {
        Some(f) => Some(image::Format::parse(f)?),
        None => None,
    };
    let opts = image::OpenOptions {
        format,
        writable: a.write,
        ..image::OpenOptions::probing()
    };
    let img = image::open(&a.image, &opts).map_err(|e| e.to_string())?;
    Ok(img.disk().clone())
}

fn run(a: &Args) -> Result<(), String> {
    let disk = open(a)?;
    let size = disk.virtual_size();
    if a.buf_size > size {
        return Err(format!(
            "buffer size {} exceeds the disk ({size})",
            a.buf_size
        ));
    }
    let step = a.step.unwrap_or(a.buf_size);
    let len = usize::try_from(a.buf_size)
        .map_err(|_| format!("buffer size {} is too large", a.buf_size))?;
    let mut buf = vec![a.pattern; len];
    let mut offs = Strided::new(a.offset, step, size).map(|off| {
        // Like qemu-img bench, a request never runs past the end.
        off.min(size - a.buf_size)
    });
    let start;
    if a.pread_mapped {
        let file_offsets = map_requests(&*disk, &mut offs, a.count, a.buf_size)?;
        let file = std::fs::File::open(&a.image).map_err(|e| e.to_string())?;
        start = Instant::now();
        for fo in file_offsets {
            file.read_exact_at(&mut buf, fo)
                .map_err(|e| format!("pread at {fo:#x}: {e}"))?;
        }
    } else {
        start = Instant::now();
        for off in offs.take(usize::try_from(a.count).unwrap_or(usize::MAX)) {
            let r = if a.write {
                disk.write_at(&buf, off)
            } else {
                disk.read_at(&mut buf, off)
            };
            r.map_err(|e| e.to_string())?;
        }
    }
    let io = start.elapsed();
    if a.write {
        disk.flush().map_err(|e| e.to_string())?;
    }
    let total = start.elapsed();
    std::hint::black_box(&buf);
    drop(disk);
    let secs = total.as_secs_f64();
    let ops = a.count as f64 / secs.max(1e-9);
    println!(
        "{} {} requests of {} bytes, step {step}, from offset {}: {secs:.3} s \
         ({:.3} s I/O + {:.3} s flush), {ops:.0} ops/s, {:.1} MiB/s",
        if a.write {
            "wrote"
        } else if a.pread_mapped {
            "pread (offsets mapped by the library)"
        } else {
            "read"
        },
        a.count,
        a.buf_size,
        a.offset,
        io.as_secs_f64(),
        (total - io).as_secs_f64(),
        ops * a.buf_size as f64 / f64::from(1u32 << 20),
    );
    println!(
        "RESULT ops={} seconds={secs:.6} ops_per_sec={ops:.1} flush_seconds={:.6}",
        a.count,
        (total - io).as_secs_f64()
    );
    Ok(())
}

/// The image-file offsets of the next `count` requests, each of which must
/// lie in one allocated extent.
fn map_requests(
    disk: &dyn VirtualDisk,
    offs: &mut impl Iterator<Item = u64>,
    count: u64,
    len: u64,
) -> Result<Vec<u64>, String> {
    let mut v = Vec::with_capacity(usize::try_from(count).unwrap_or(0));
    for off in offs.take(usize::try_from(count).unwrap_or(usize::MAX)) {
        let ext = disk.map(off, len).map_err(|e| e.to_string())?;
        match ext.mapping {
            Mapping::Data(FileOffset(fo)) if ext.len >= len => v.push(fo),
            m => {
                return Err(format!(
                "--pread-mapped: request at {off:#x} is not one allocated run ({m:?}, {} bytes)",
                ext.len
            ))
            }
        }
    }
    Ok(v)
}

fn main() -> ExitCode {
    let args = match parse_args() {
        Ok(a) => a,
        Err(e) => {
            eprintln!("iobench: {e}");
            return ExitCode::from(2);
        }
    };
    match run(&args) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("iobench: {}: {e}", args.image);
            ExitCode::FAILURE
        }
    }
}
