//! Live storage migration under a guest that keeps writing: migrate.c
//! rewrites its whole disk every round and reads it back, so a write lost
//! across the switch fails the guest. The source must be left as it was at
//! the switch (a prefix of the disk in one round's pattern, the rest in the
//! round before), and a failed migration leaves the guest on the source.

use crate::common::*;
use disk::fault::RecordingStorage;
use disk::{LockMode, Storage, VirtualDisk};
use image::{Format, Kind, OpenOptions};
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};
use vmm_core::migrate::MigrateOptions;
use vmm_core::test_payloads::MIGRATE;
use vmm_core::{Boot, Config, Controller, Disk, IoMode, Outcome};

fn rounds(console: &Capture) -> usize {
    console.text().matches(" ok\n").count()
}

fn wait_rounds(console: &Capture, n: usize) {
    let t0 = Instant::now();
    while rounds(console) < n {
        let out = console.text();
        assert!(!out.contains("other bytes"), "{out}");
        assert!(t0.elapsed() < Duration::from_secs(60), "{out}");
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// Start migrate.c on the image at `p` (format `f`) with a controller.
fn start(
    p: &Path,
    f: Format,
) -> (
    Arc<Controller>,
    std::thread::JoinHandle<vmm_core::Report>,
    Capture,
    vmm_core::OpenDisk,
) {
    let img = vmm_core::disks::open(&spec(p, Some(f), false), None).unwrap();
    let ctl = Controller::new();
    let console = Capture::default();
    let cfg = Config {
        mem: 64 << 20,
        vcpus: 1,
        disks: vec![Disk {
            disk: img.disk(),
            writable: true,
            name: img.name(),
            qos: None,
        }],
        boot: Boot::Payload(MIGRATE.to_vec()),
        console: Box::new(console.clone()),
        timeout: Some(Duration::from_secs(120)),
        io: IoMode::Thread,
        stop: None,
        controller: Some(ctl.clone()),
        bundle: None,
    };
    let run = std::thread::spawn(move || vmm_core::run(cfg).unwrap());
    (ctl, run, console, img)
}

/// The round whose pattern a 64 KiB piece at `off` holds, or None if its
/// bytes are of no single round.
fn seed_of(piece: &[u8], off: u64) -> Option<u8> {
    let s = piece[0].wrapping_sub(pattern(0, off));
    piece
        .iter()
        .enumerate()
        .all(|(i, b)| *b == pattern(u32::from(s), off + i as u64))
        .then_some(s)
}

/// The source after the switch: pieces [0, k) in round r's pattern, the
/// rest in round r - 1's (or all in one round's).
fn check_snapshot(p: &Path, f: Format) {
    let img = image::open(p, &OpenOptions::new(f)).unwrap();
    let d = img.disk();
    let n = d.virtual_size() / 65536;
    let mut seeds = Vec::new();
    let mut b = vec![0u8; 65536];
    for i in 0..n {
        d.read_at(&mut b, i * 65536).unwrap();
        seeds.push(seed_of(&b, i * 65536).unwrap_or_else(|| panic!("piece {i} is torn")));
    }
    let first = seeds[0];
    let k = seeds.iter().take_while(|s| **s == first).count();
    assert!(
        seeds[k..].iter().all(|s| *s == first.wrapping_sub(1)),
        "not a snapshot: {seeds:?}"
    );
}

fn migrate(src_name: &str, kind: Kind, from: Format, dest_name: &str, to: Format) {
    if !can_run(MIGRATE) {
        return;
    }
    let dir = tmp();
    let src = file(&dir, src_name);
    let dest = file(&dir, dest_name);
    make(&src, kind, None);
    let (ctl, run, console, img) = start(&src, from);
    wait_rounds(&console, 1);
    let r = ctl
        .migrate_storage(0, &MigrateOptions::new(&dest, to))
        .unwrap();
    let at = rounds(&console);
    eprintln!(
        "{src_name} -> {dest_name}: {} passes, {} bytes, pause {:?}, {:?} in all, during round {}",
        r.passes,
        r.bytes_copied,
        r.pause,
        r.elapsed,
        at + 1
    );
    assert!(r.passes >= 1 && r.bytes_copied >= SIZE / 2, "{r:?}");
    assert_eq!(ctl.info().disks[0].name, dest.display().to_string());
    // Two whole rounds on the new image, each read back and compared.
    wait_rounds(&console, at + 2);
    ctl.stop().unwrap();
    let report = run.join().unwrap();
    assert_eq!(report.outcome, Outcome::Stopped, "{}", console.text());
    drop(img);
    check_snapshot(&src, from);
    // The new image opens and reads whole 64 KiB pieces of one round.
    let d = image::open(&dest, &OpenOptions::new(to)).unwrap();
    let mut b = vec![0u8; 65536];
    d.disk().read_at(&mut b, 0).unwrap();
    assert!(seed_of(&b, 0).is_some());
}

#[test]
fn vhd_to_vhdx_while_the_guest_writes() {
    migrate("s.vhd", vhd(SIZE), Format::Vhd, "d.vhdx", Format::Vhdx);
}

#[test]
fn vhdx_to_raw_while_the_guest_writes() {
    migrate("s.vhdx", vhdx(SIZE), Format::Vhdx, "d.img", Format::Raw);
}

/// A destination whose writes start failing (as on a full disk).
#[derive(Debug)]
struct Failing;

impl disk::Opener for Failing {
    fn open(&self, _: &Path, _: bool, _: LockMode) -> disk::Result<Box<dyn Storage>> {
        unreachable!("a migration only creates")
    }
    fn create(&self, _: &Path, _: bool) -> disk::Result<Box<dyn Storage>> {
        let s = RecordingStorage::new("full.vhdx", Vec::new());
        s.fail_writes_after(Some(16));
        Ok(Box::new(s))
    }
}

#[test]
fn a_failed_migration_leaves_the_guest_on_its_disk() {
    if !can_run(MIGRATE) {
        return;
    }
    let dir = tmp();
    let src = file(&dir, "s.vhdx");
    make(&src, vhdx(SIZE), None);
    let (ctl, run, console, img) = start(&src, Format::Vhdx);
    wait_rounds(&console, 1);
    let mut o = MigrateOptions::new(file(&dir, "full.vhdx"), Format::Vhdx);
    o.opener = Arc::new(Failing);
    let e = ctl.migrate_storage(0, &o).unwrap_err();
    assert!(e.contains("destination") && e.contains("goes on"), "{e}");
    // A destination that cannot be created at all.
    let e = ctl
        .migrate_storage(
            0,
            &MigrateOptions::new(dir.path().join("no/such/dir.vhdx"), Format::Vhdx),
        )
        .unwrap_err();
    assert!(e.contains("no/such/dir.vhdx"), "{e}");
    assert!(ctl
        .migrate_storage(3, &MigrateOptions::new(file(&dir, "x.vhdx"), Format::Vhdx))
        .unwrap_err()
        .contains("no disk 3"));
    assert!(ctl.info().disks[0].name.ends_with("s.vhdx"));
    let at = rounds(&console);
    wait_rounds(&console, at + 2);
    ctl.stop().unwrap();
    assert_eq!(run.join().unwrap().outcome, Outcome::Stopped);
    drop(img);
    // The source has the guest's last writes and is cleanly closed.
    let d = image::open(&src, &OpenOptions::new(Format::Vhdx)).unwrap();
    let mut b = vec![0u8; 65536];
    d.disk().read_at(&mut b, 0).unwrap();
    assert!(seed_of(&b, 0).is_some());
}
