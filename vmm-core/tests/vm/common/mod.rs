//! Helpers: running a payload against disks, making images with the host's
//! pattern, checking what the guest wrote.

pub mod initramfs;

use disk::VirtualDisk;
use image::{CreateOptions, Format, Kind, OpenOptions};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use vmm_core::{Boot, Config, Disk, DiskSpec, IoMode, Report};

/// The host's pattern: written at sectors 64-71 before a run.
pub const HOST_SEED: u32 = 0x5a;
pub const HOST_SECTOR: u64 = 64;
pub const HOST_COUNT: u64 = 8;
/// The size of the test disks.
pub const SIZE: u64 = 16 << 20;

/// The byte the payloads and the host write at disk offset `off`
/// (payloads/payload.h `pattern`).
pub fn pattern(seed: u32, off: u64) -> u8 {
    (((off >> 9) * 131 + (off & 511) * 7 + u64::from(seed)) & 0xff) as u8
}

pub fn pattern_buf(seed: u32, sector: u64, count: u64) -> Vec<u8> {
    (0..count * 512)
        .map(|i| pattern(seed, sector * 512 + i))
        .collect()
}

/// Whether the tests can run here; says why not.
pub fn can_run(payload: &[u8]) -> bool {
    if std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
        .is_err()
    {
        eprintln!("skipped: /dev/kvm cannot be opened here");
        return false;
    }
    if payload.is_empty() {
        eprintln!("skipped: the test payloads were not built (no gcc)");
        return false;
    }
    true
}

/// A console that keeps what the guest printed.
#[derive(Clone, Default)]
pub struct Capture(Arc<Mutex<Vec<u8>>>);

impl std::io::Write for Capture {
    fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(b);
        Ok(b.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl Capture {
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.0.lock().unwrap()).into_owned()
    }
}

/// Run `payload` with `disks` (already open), on 1 vCPU and 64 MiB.
pub fn run_disks(payload: &[u8], disks: Vec<Disk>, vcpus: usize, io: IoMode) -> (Report, String) {
    let console = Capture::default();
    let report = vmm_core::run(Config {
        mem: 64 << 20,
        vcpus,
        disks,
        boot: Boot::Payload(payload.to_vec()),
        console: Box::new(console.clone()),
        timeout: Some(Duration::from_secs(60)),
        io,
        stop: None,
        controller: None,
        bundle: None,
    })
    .expect("the VMM runs");
    (report, console.text())
}

/// Open each spec as `vmm run --disk` does and run `payload` on them;
/// the images are closed (and unlocked) when this returns.
pub fn run_specs(payload: &[u8], specs: &[DiskSpec]) -> (Report, String) {
    let open: Vec<_> = specs
        .iter()
        .map(|s| vmm_core::disks::open(s, None).expect("the disk opens"))
        .collect();
    let disks = open
        .iter()
        .map(|d| Disk {
            disk: d.disk(),
            writable: !d.spec.read_only,
            name: d.name(),
            qos: d.qos(),
        })
        .collect();
    let r = run_disks(payload, disks, 1, IoMode::Thread);
    drop(open);
    r
}

pub fn spec(path: &Path, format: Option<Format>, read_only: bool) -> DiskSpec {
    DiskSpec {
        path: path.to_path_buf(),
        read_only,
        format,
        qos: Default::default(),
    }
}

/// Create an image of `kind` at `path` (a child of `parent` if given),
/// with the host pattern unless it is a child.
pub fn make(path: &Path, kind: Kind, parent: Option<&Path>) {
    let mut o = CreateOptions::new(kind);
    o.parent = parent.map(Path::to_path_buf);
    let img = image::create(path, &o).unwrap();
    if parent.is_none() {
        img.disk()
            .write_at(
                &pattern_buf(HOST_SEED, HOST_SECTOR, HOST_COUNT),
                HOST_SECTOR * 512,
            )
            .unwrap();
    }
    img.close().unwrap();
}

pub fn vhdx(size: u64) -> Kind {
    Kind::Vhdx(vhdx::CreateOptions::new(size))
}

pub fn vhd(size: u64) -> Kind {
    Kind::Vhd(vhd::CreateOptions::new(size))
}

/// Read `len` bytes at `off` through the library (read-only open).
pub fn read(path: &Path, format: Format, off: u64, len: u64) -> Vec<u8> {
    let img = image::open(path, &OpenOptions::new(format)).unwrap();
    let mut b = vec![0u8; usize::try_from(len).unwrap()];
    img.disk().read_at(&mut b, off).unwrap();
    b
}

/// What blk_io.c leaves on disk `index` of a writable disk of `SIZE`:
/// its patterns, the host's, zeros where it wrote zeroes; checked through
/// the library.
pub fn check_blk_io(path: &Path, format: Format, index: u32) {
    let seed = 0xa5 + index;
    let img = image::open(path, &OpenOptions::new(format)).unwrap();
    let d = img.disk();
    // A VHD's size is what its CHS geometry gives, not exactly SIZE.
    let last = d.virtual_size() / 512 - 1;
    let sector = |s: u64, n: u64| {
        let mut b = vec![0u8; usize::try_from(n * 512).unwrap()];
        d.read_at(&mut b, s * 512).unwrap();
        b
    };
    assert_eq!(sector(1, 1), pattern_buf(seed, 1, 1), "{path:?} sector 1");
    assert_eq!(
        sector(2, 2),
        vec![0u8; 1024],
        "{path:?} sectors 2-3 (write zeroes)"
    );
    assert_eq!(
        sector(4, 4),
        pattern_buf(seed, 4, 4),
        "{path:?} sectors 4-7"
    );
    assert_eq!(
        sector(4095, 3),
        pattern_buf(seed, 4095, 3),
        "{path:?} across 2 MiB"
    );
    assert_eq!(
        sector(10000, 64),
        pattern_buf(seed, 10000, 64),
        "{path:?} three descriptors"
    );
    assert_eq!(
        sector(10064, 128),
        vec![0u8; 128 * 512],
        "{path:?} write zeroes with unmap"
    );
    assert_eq!(
        sector(10192, 64),
        pattern_buf(seed, 10192, 64),
        "{path:?} after the zeroes"
    );
    assert_eq!(
        sector(last, 1),
        pattern_buf(seed, last, 1),
        "{path:?} last sector"
    );
    assert_eq!(
        sector(HOST_SECTOR, HOST_COUNT),
        pattern_buf(HOST_SEED, HOST_SECTOR, HOST_COUNT)
    );
    assert_eq!(sector(0, 1), vec![0u8; 512], "{path:?} sector 0 untouched");
    assert_eq!(
        sector(8, 8),
        vec![0u8; 4096],
        "{path:?} sectors 8-15 untouched"
    );
}

/// The GET_ID line blk_io.c prints for disk `index` of the image at
/// `path`.
pub fn id_line(path: &Path, format: Format, index: usize) -> String {
    let img = image::open(path, &OpenOptions::new(format)).unwrap();
    let id = img.disk().disk_id().expect("the image has an id");
    let s = vmm_core::virtio::blk::id_string(id);
    format!("disk {index} id {}\n", String::from_utf8_lossy(&s))
}

pub fn tmp() -> tempfile::TempDir {
    tempfile::tempdir().unwrap()
}

pub fn file(dir: &tempfile::TempDir, name: &str) -> PathBuf {
    dir.path().join(name)
}
