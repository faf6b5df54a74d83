//! The VMM's resident memory beyond guest RAM, from a process's
//! /proc/PID/smaps: the Rss of every mapping but the guest RAM mapping,
//! sampled every 2 ms while the VMM runs; and the
//! child-process mode of this bench that runs one VMM run to be measured
//! that way in a process of its own.

use crate::guest::{self, ImageFile, MEM};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};
use vmm_core::IoMode;

/// One reading of smaps, in KiB.
#[derive(Debug, Clone, Copy, Default)]
pub struct Smaps {
    /// Rss of file-backed mappings other than guest RAM (the program's
    /// and its libraries' pages).
    pub file: u64,
    /// Rss of the other mappings but guest RAM (heap, stacks, anonymous
    /// mappings, vdso...).
    pub anon: u64,
    /// Rss of the guest RAM mapping, if there is one.
    pub guest: Option<u64>,
}

impl Smaps {
    /// Everything but guest RAM.
    pub fn beyond_guest(&self) -> u64 {
        self.file + self.anon
    }
}

/// Read /proc/`pid`/smaps (`pid` may be "self"). Guest RAM is the
/// anonymous mapping (no path, inode 0) of at least `guest_len` bytes:
/// vm-memory maps it as one anonymous mapping of exactly that size, and
/// nothing else the VMM maps comes near (malloc's arenas reserve 64 MiB);
/// at least, because the kernel may merge it with an adjacent anonymous
/// mapping of the same flags (seen once in a few runs), whose pages then
/// count as guest RAM.
pub fn read(pid: &str, guest_len: u64) -> std::io::Result<Smaps> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/smaps"))?;
    let mut out = Smaps::default();
    // What the mapping being read is: guest RAM, file-backed, or other.
    let mut kind = 0u8;
    for line in text.lines() {
        let mut w = line.split_whitespace();
        let first = w.next().unwrap_or_default();
        if let Some((a, b)) = first.split_once('-') {
            if let (Ok(a), Ok(b)) = (u64::from_str_radix(a, 16), u64::from_str_radix(b, 16)) {
                let (_perms, _off, _dev) = (w.next(), w.next(), w.next());
                let inode = w.next().unwrap_or("0");
                let path = w.next();
                kind = if b - a >= guest_len && inode == "0" && path.is_none() {
                    b'g'
                } else if path.is_some_and(|p| p.starts_with('/')) {
                    b'f'
                } else {
                    b'a'
                };
                continue;
            }
        }
        if first == "Rss:" {
            let kib: u64 = w.next().and_then(|v| v.parse().ok()).unwrap_or(0);
            match kind {
                b'g' => *out.guest.get_or_insert(0) += kib,
                b'f' => out.file += kib,
                _ => out.anon += kib,
            }
        }
    }
    Ok(out)
}

/// The peak of a sampling.
#[derive(Debug, Clone, Copy, Default)]
pub struct Peak {
    /// Samples taken.
    pub samples: u64,
    /// Samples that saw the guest RAM mapping.
    pub with_guest: u64,
    /// The sample with the most resident beyond guest RAM, among those
    /// that saw guest RAM (the VMM running).
    pub beyond: Smaps,
    /// The most guest RAM resident.
    pub guest: u64,
}

/// A thread sampling a process's smaps every 2 ms.
pub struct Sampler {
    stop: Arc<AtomicBool>,
    handle: JoinHandle<Peak>,
}

impl Sampler {
    /// Start sampling `pid`.
    pub fn start(pid: String, guest_len: u64) -> Sampler {
        let stop = Arc::new(AtomicBool::new(false));
        let s = stop.clone();
        let handle = std::thread::spawn(move || {
            let mut peak = Peak::default();
            while !s.load(Ordering::Acquire) {
                let Ok(m) = read(&pid, guest_len) else { break };
                peak.samples += 1;
                if let Some(g) = m.guest {
                    peak.with_guest += 1;
                    peak.guest = peak.guest.max(g);
                    if m.beyond_guest() > peak.beyond.beyond_guest() {
                        peak.beyond = m;
                    }
                }
                std::thread::sleep(Duration::from_millis(2));
            }
            peak
        });
        Sampler { stop, handle }
    }

    /// Stop and return the peak.
    pub fn finish(self) -> Peak {
        self.stop.store(true, Ordering::Release);
        self.handle.join().unwrap_or_default()
    }
}

/// VmHWM of this process, KiB.
pub fn vm_hwm() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("VmHWM:"))
                .and_then(|v| v.split_whitespace().next()?.parse().ok())
        })
        .unwrap_or(0)
}

/// The environment variable that makes this bench a measured child.
pub const CHILD_ENV: &str = "VMMBENCH_RSS_CHILD";

/// The child: run the payload file named in the environment on the image
/// named there (IoMode::Thread, as `vmm run`), sampling its own smaps; print
/// one `RSS key=value...` line.
pub fn child() -> Result<(), String> {
    let var = |k: &str| std::env::var(k).map_err(|_| format!("{k} is not set"));
    let bin = std::fs::read(var("VMMBENCH_RSS_PAYLOAD")?).map_err(|e| e.to_string())?;
    let tsc_khz: u64 = var("VMMBENCH_RSS_TSC_KHZ")?
        .parse()
        .map_err(|e| format!("{e}"))?;
    let img = ImageFile {
        label: "vhdx-dyn",
        path: var("VMMBENCH_RSS_IMAGE")?.into(),
        format: image::Format::Vhdx,
    };
    let before = read("self", MEM).map_err(|e| e.to_string())?;
    let sampler = Sampler::start("self".into(), MEM);
    let t = Instant::now();
    let r = guest::run(&bin, &[&img], IoMode::Thread, tsc_khz);
    let wall = t.elapsed();
    let peak = sampler.finish();
    r?;
    println!(
        "RSS before={} peak_file={} peak_anon={} guest={} samples={} with_guest={} hwm={} wall_ms={}",
        before.beyond_guest(),
        peak.beyond.file,
        peak.beyond.anon,
        peak.guest,
        peak.samples,
        peak.with_guest,
        vm_hwm(),
        wall.as_millis()
    );
    Ok(())
}

/// What a measured child printed.
#[derive(Debug, Clone, Copy)]
pub struct ChildRss {
    /// Resident beyond guest RAM before the run (image open), KiB.
    pub before: u64,
    /// The peak during the run, KiB: file-backed and other.
    pub peak: Smaps,
    /// The most guest RAM resident, KiB.
    pub guest: u64,
    /// Samples taken, and those during the run.
    pub samples: (u64, u64),
    /// VmHWM at the end, KiB.
    pub hwm: u64,
}

/// Run the child (this same executable) on `image` with `payload_file`.
pub fn measure(
    payload_file: &std::path::Path,
    image: &std::path::Path,
    tsc_khz: u64,
) -> Result<ChildRss, String> {
    let exe = std::env::current_exe().map_err(|e| e.to_string())?;
    let out = std::process::Command::new(exe)
        .env(CHILD_ENV, "1")
        .env("VMMBENCH_RSS_PAYLOAD", payload_file)
        .env("VMMBENCH_RSS_IMAGE", image)
        .env("VMMBENCH_RSS_TSC_KHZ", tsc_khz.to_string())
        .output()
        .map_err(|e| format!("running the RSS child: {e}"))?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    let line = stdout
        .lines()
        .find_map(|l| l.strip_prefix("RSS "))
        .ok_or_else(|| {
            format!(
                "the RSS child printed no result ({}): {}",
                out.status,
                String::from_utf8_lossy(&out.stderr)
            )
        })?;
    let kv: std::collections::BTreeMap<&str, u64> = line
        .split_whitespace()
        .filter_map(|w| w.split_once('='))
        .filter_map(|(k, v)| Some((k, v.parse().ok()?)))
        .collect();
    let g = |k: &str| kv.get(k).copied().unwrap_or(0);
    Ok(ChildRss {
        before: g("before"),
        peak: Smaps {
            file: g("peak_file"),
            anon: g("peak_anon"),
            guest: Some(g("guest")),
        },
        guest: g("guest"),
        samples: (g("samples"), g("with_guest")),
        hwm: g("hwm"),
    })
}
