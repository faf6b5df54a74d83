//! The guest side: the benchmark payload (vmm-core/payloads/vmmbench.c)
//! with its parameters patched in, the images it runs on, one run through
//! [`vmm_core::run`] and what the guest reported.

use image::{CreateOptions, Format, Kind};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use vmm_core::{Boot, Config, Disk, DiskSpec, IoMode, OpenDisk, Outcome, Report};

/// Guest RAM: the ABI's default (`vmm run` without `--mem`).
pub const MEM: u64 = 256 << 20;
/// The seed of the host's prefill pattern (payload.h `pattern`).
pub const PREFILL_SEED: u32 = 0x3c;
/// First-touch stride, and the block size of the fresh dynamic images.
pub const STRIDE: u64 = 2 << 20;

/// The payload's test bits (1 << vmmbench.c's test numbers).
pub mod bits {
    pub const RANDREAD_QD1: u64 = 1 << 0;
    pub const RANDREAD_QDN: u64 = 1 << 1;
    pub const RANDWRITE_QD1: u64 = 1 << 2;
    pub const RANDWRITE_QDN: u64 = 1 << 3;
    pub const SEQREAD: u64 = 1 << 4;
    pub const SEQWRITE: u64 = 1 << 5;
    pub const FIRSTTOUCH: u64 = 1 << 6;
    pub const SEQWRITE_FRESH: u64 = 1 << 7;
    pub const FLUSH: u64 = 1 << 8;
    /// On prefilled images.
    pub const PREFILLED: u64 =
        RANDREAD_QD1 | RANDREAD_QDN | RANDWRITE_QD1 | RANDWRITE_QDN | SEQREAD | SEQWRITE | FLUSH;
    /// On fresh images.
    pub const FRESH: u64 = FIRSTTOUCH | SEQWRITE_FRESH | FLUSH;
}

/// What the payload is told (vmmbench.c `struct params`, after its magic).
#[derive(Debug, Clone, Copy)]
pub struct Params {
    /// The guest TSC frequency.
    pub tsc_khz: u64,
    /// Time budget of each test.
    pub ms: u64,
    /// [`bits`].
    pub tests: u64,
    /// Requests in flight in the `_qdN` tests.
    pub qd: u64,
    /// Check the prefill pattern before the tests.
    pub check_prefill: bool,
    /// The slices the disks take turns in.
    pub slice_ms: u64,
}

const MAGIC: &[u8; 16] = b"VMMBENCH-PARAMS\0";

/// The payload with `p` patched in.
pub fn payload(p: &Params) -> Result<Vec<u8>, String> {
    let mut bin = vmm_core::test_payloads::VMMBENCH.to_vec();
    if bin.is_empty() {
        return Err("the test payloads were not built (no gcc)".into());
    }
    let at = bin
        .windows(MAGIC.len())
        .position(|w| w == MAGIC)
        .ok_or("the payload has no parameter block")?
        + MAGIC.len();
    let check = if p.check_prefill {
        u64::from(PREFILL_SEED) + 1
    } else {
        0
    };
    for (i, v) in [p.tsc_khz, p.ms, p.tests, p.qd, STRIDE, check, p.slice_ms]
        .into_iter()
        .enumerate()
    {
        let b = bin
            .get_mut(at + 8 * i..at + 8 * i + 8)
            .ok_or("the payload's parameter block is cut short")?;
        b.copy_from_slice(&v.to_le_bytes());
    }
    Ok(bin)
}

/// The guest TSC frequency in kHz: KVM_GET_TSC_KHZ on a vCPU of a VM made
/// for the purpose. Every VM of this host's KVM gets that frequency (the
/// VMM sets none), so it is the one the payload's rdtsc counts at.
pub fn tsc_khz() -> Result<u64, String> {
    let kvm = kvm_ioctls::Kvm::new().map_err(|e| format!("opening /dev/kvm: {e}"))?;
    let vm = kvm.create_vm().map_err(|e| format!("KVM_CREATE_VM: {e}"))?;
    let vcpu = vm
        .create_vcpu(0)
        .map_err(|e| format!("KVM_CREATE_VCPU: {e}"))?;
    let khz = vcpu
        .get_tsc_khz()
        .map_err(|e| format!("KVM_GET_TSC_KHZ: {e}"))?;
    Ok(u64::from(khz))
}

/// A console that keeps what the guest printed.
#[derive(Clone, Default)]
pub struct Capture(Arc<Mutex<Vec<u8>>>);

impl std::io::Write for Capture {
    fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
        self.0
            .lock()
            .map_err(|_| std::io::Error::other("poisoned"))?
            .extend_from_slice(b);
        Ok(b.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl Capture {
    /// What was printed.
    pub fn text(&self) -> String {
        self.0
            .lock()
            .map(|v| String::from_utf8_lossy(&v).into_owned())
            .unwrap_or_default()
    }
}

/// One test's result, as the guest measured it.
#[derive(Debug, Clone, Copy)]
pub struct Sample {
    /// Requests completed.
    pub ops: u64,
    /// Bytes moved.
    pub bytes: u64,
    /// Guest time, seconds (TSC cycles / TSC frequency).
    pub secs: f64,
}

/// A run of the payload.
pub struct GuestRun {
    /// Each disk's tests by their names in the payload, in disk order.
    pub tests: Vec<BTreeMap<String, Sample>>,
    /// The guest's time from its first test to its end line, seconds.
    pub guest_secs: f64,
    /// The VMM's report.
    pub report: Report,
}

/// An image file to run on.
#[derive(Debug, Clone)]
pub struct ImageFile {
    /// Its name in the tables.
    pub label: &'static str,
    /// The file.
    pub path: PathBuf,
    /// Its format (given, never probed).
    pub format: Format,
}

/// Open `img` as `vmm run --disk PATH,format=FORMAT` does (writable, no
/// QoS limits).
pub fn open(img: &ImageFile) -> Result<OpenDisk, String> {
    let arg = format!("{},format={}", img.path.display(), img.format.name());
    let spec = DiskSpec::parse(&arg)?;
    vmm_core::disks::open(&spec, None).map_err(|e| format!("{}: {e}", img.label))
}

/// The device's disk for an open image, as `vmm run` makes it.
pub fn served(o: &OpenDisk) -> Disk {
    Disk {
        disk: o.disk(),
        writable: !o.spec.read_only,
        name: o.name(),
        qos: o.qos(),
    }
}

/// Run `bin` with the images as disks 0, 1... (opened as `vmm run --disk`
/// does, writable), and check that the run went as it should: the guest
/// ended with 0, no device saw an error or refused anything, and each
/// completed exactly the requests the guest counted for it.
pub fn run(bin: &[u8], imgs: &[&ImageFile], io: IoMode, tsc_khz: u64) -> Result<GuestRun, String> {
    let labels: Vec<&str> = imgs.iter().map(|i| i.label).collect();
    let open = imgs
        .iter()
        .map(|i| open(i))
        .collect::<Result<Vec<_>, _>>()?;
    let disks = open.iter().map(served).collect();
    let console = Capture::default();
    let report = vmm_core::run(Config {
        mem: MEM,
        vcpus: 1,
        disks,
        boot: Boot::Payload(bin.to_vec()),
        console: Box::new(console.clone()),
        timeout: Some(Duration::from_secs(600)),
        io,
        stop: None,
        controller: None,
        bundle: None,
    })
    .map_err(|e| format!("{labels:?}: the VMM failed: {e}"))?;
    drop(open);
    let text = console.text();
    let bad = |why: String| format!("{labels:?} ({io:?}): {why}; the guest printed:\n{text}");
    if report.outcome != Outcome::Exited(0) {
        return Err(bad(report.outcome.to_string()));
    }
    for dev in &report.devices {
        if dev.io_errors + dev.refused > 0 || dev.needs_reset {
            return Err(bad(format!("device problems: {dev:?}")));
        }
    }
    let hz = tsc_khz as f64 * 1e3;
    let mut tests = vec![BTreeMap::new(); imgs.len()];
    let mut requests = vec![None; imgs.len()];
    let mut guest_secs = None;
    for line in text.lines() {
        let Some(rest) = line.strip_prefix("VMMBENCH ") else {
            continue;
        };
        let kv: BTreeMap<&str, &str> = rest
            .split_whitespace()
            .filter_map(|w| w.split_once('='))
            .collect();
        let num = |k: &str| -> Result<u64, String> {
            kv.get(k)
                .and_then(|v| v.parse().ok())
                .ok_or_else(|| bad(format!("no {k}= in '{line}'")))
        };
        if let Some(name) = kv.get("test") {
            let d = usize::try_from(num("disk")?).unwrap_or(usize::MAX);
            let s = Sample {
                ops: num("ops")?,
                bytes: num("bytes")?,
                secs: num("cycles")? as f64 / hz,
            };
            tests
                .get_mut(d)
                .ok_or_else(|| bad(format!("disk {d}?")))?
                .insert((*name).to_string(), s);
        } else if kv.contains_key("disk") {
            let d = usize::try_from(num("disk")?).unwrap_or(usize::MAX);
            *requests
                .get_mut(d)
                .ok_or_else(|| bad(format!("disk {d}?")))? = Some(num("requests")?);
        } else if rest.starts_with("end ") {
            guest_secs = Some(num("cycles")? as f64 / hz);
        }
    }
    let guest_secs = guest_secs.ok_or_else(|| bad("no end line".into()))?;
    for (d, (dev, counted)) in report.devices.iter().zip(&requests).enumerate() {
        if *counted != Some(dev.requests) {
            return Err(bad(format!(
                "disk {d}: the guest counted {counted:?} requests, the device completed {}",
                dev.requests
            )));
        }
    }
    Ok(GuestRun {
        tests,
        guest_secs,
        report,
    })
}

/// The prefill pattern of sectors [first, first + buf.len() / 512).
fn fill_pattern(buf: &mut [u8], first_sector: u64) {
    // pattern(seed, off) = ((off >> 9) * 131 + (off & 511) * 7 + seed) & 0xff
    let step: Vec<u8> = (0..512u32).map(|i| (i * 7).to_le_bytes()[0]).collect();
    for (k, sector) in buf.chunks_mut(512).enumerate() {
        let s = first_sector + k as u64;
        let base = (s.wrapping_mul(131) + u64::from(PREFILL_SEED)).to_le_bytes()[0];
        for (b, d) in sector.iter_mut().zip(&step) {
            *b = base.wrapping_add(*d);
        }
    }
}

/// Create an image of `kind` (replacing any file there); with `prefill`,
/// write every byte of it with the prefill pattern (through the library).
/// Closed, so flushed, when this returns.
fn create(
    dir: &Path,
    label: &'static str,
    name: &str,
    kind: Kind,
    prefill: bool,
) -> Result<ImageFile, String> {
    let path = dir.join(name);
    let _ = std::fs::remove_file(&path);
    let format = kind.format();
    let t = Instant::now();
    let err = |what: &str, e: disk::Error| format!("{what} {}: {e}", path.display());
    let img = image::create(&path, &CreateOptions::new(kind)).map_err(|e| err("creating", e))?;
    if prefill {
        let d = img.disk();
        let size = d.virtual_size();
        let mut buf = vec![0u8; 4 << 20];
        let mut off = 0;
        while off < size {
            let n = usize::try_from((size - off).min(buf.len() as u64)).unwrap_or(buf.len());
            fill_pattern(&mut buf[..n], off / 512);
            d.write_at(&buf[..n], off)
                .map_err(|e| err("prefilling", e))?;
            off += n as u64;
        }
    }
    img.close().map_err(|e| err("closing", e))?;
    if prefill {
        eprintln!("  prefilled {label} in {:.2} s", t.elapsed().as_secs_f64());
    }
    Ok(ImageFile {
        label,
        path,
        format,
    })
}

/// The images of the prefilled tests, `size` bytes each (the VHD's
/// rounded up to a CHS geometry), every byte written with the prefill
/// pattern.
pub fn prefilled(dir: &Path, size: u64) -> Result<Vec<ImageFile>, String> {
    let mut fixed = vhdx::CreateOptions::new(size);
    fixed.fixed = true;
    Ok(vec![
        create(dir, "raw", "pre.raw", Kind::Raw { size }, true)?,
        create(
            dir,
            "vhdx-dyn",
            "pre-dyn.vhdx",
            Kind::Vhdx(vhdx::CreateOptions::new(size)),
            true,
        )?,
        create(dir, "vhdx-fixed", "pre-fixed.vhdx", Kind::Vhdx(fixed), true)?,
        create(
            dir,
            "vhd-dyn",
            "pre-dyn.vhd",
            Kind::Vhd(vhd::CreateOptions::new(size)),
            true,
        )?,
    ])
}

/// Fresh images of `size` bytes for the first-touch tests: a sparse raw
/// file, a dynamic VHDX and a dynamic VHD, both with blocks of [`STRIDE`]
/// (so that every first-touch write allocates a block).
pub fn fresh(dir: &Path, size: u64) -> Result<Vec<ImageFile>, String> {
    let mut x = vhdx::CreateOptions::new(size);
    x.block_size = u32::try_from(STRIDE).map_err(|e| e.to_string())?;
    let mut h = vhd::CreateOptions::new(size);
    h.block_size = x.block_size;
    Ok(vec![
        create(dir, "raw-sparse", "fresh.raw", Kind::Raw { size }, false)?,
        create(dir, "vhdx-dyn", "fresh.vhdx", Kind::Vhdx(x), false)?,
        create(dir, "vhd-dyn", "fresh.vhd", Kind::Vhd(h), false)?,
    ])
}

/// Check that the guest's writes reached `img`: its first 4 KiB page is
/// all 0xa5 (the payload's sequential writes, which start there) or all
/// 0x5a (its random and first-touch writes), no longer the prefill nor
/// zeros.
pub fn check_written(img: &ImageFile) -> Result<(), String> {
    let o = image::open(&img.path, &image::OpenOptions::new(img.format))
        .map_err(|e| format!("{}: {e}", img.label))?;
    let mut page = vec![0u8; 4096];
    o.disk()
        .read_at(&mut page, 0)
        .map_err(|e| format!("{}: {e}", img.label))?;
    if page.iter().all(|&b| b == 0xa5) || page.iter().all(|&b| b == 0x5a) {
        Ok(())
    } else {
        Err(format!(
            "{}: the guest's writes are not on the image (first bytes {:02x?})",
            img.label,
            &page[..8]
        ))
    }
}
