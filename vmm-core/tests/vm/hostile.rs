//! A hostile guest: every malformed request kind, and registers poked out
//! of order; the VMM stays alive and answering, and nothing malformed
//! reaches the disk.

use crate::common::*;
use image::{Format, Kind};
use vmm_core::test_payloads::HOSTILE;
use vmm_core::{Disk, IoMode, Outcome};

/// The malformed requests hostile.c sends (steps 10-31).
const MALFORMED: u64 = 22;

fn hostile(io: IoMode) {
    if !can_run(HOSTILE) {
        return;
    }
    let dir = tmp();
    let p = file(&dir, "h.img");
    make(&p, Kind::Raw { size: SIZE }, None);
    let img = vmm_core::disks::open(&spec(&p, Some(Format::Raw), false), None).unwrap();
    let disks = vec![Disk {
        disk: img.disk(),
        writable: true,
        name: img.name(),
        qos: None,
    }];
    let (r, out) = run_disks(HOSTILE, disks, 1, io);
    drop(img);
    assert_eq!(r.outcome, Outcome::Exited(0), "{out}");
    assert!(
        out.contains(&format!("hostile: {MALFORMED} malformed requests refused")),
        "{out}"
    );
    let d = &r.devices[0];
    assert_eq!(d.refused, MALFORMED, "{d:?}");
    assert_eq!(d.io_errors, 0, "{d:?}");
    assert!(!d.needs_reset, "the last reset cleared NEEDS_RESET: {d:?}");
    assert!(
        d.transport_problem
            .as_deref()
            .unwrap_or("")
            .contains("needs reset"),
        "{d:?}"
    );
    // No malformed write reached the disk (sectors 100-199).
    assert_eq!(
        read(&p, Format::Raw, 100 * 512, 100 * 512),
        vec![0u8; 100 * 512]
    );
}

#[test]
fn hostile_guest_on_io_thread() {
    hostile(IoMode::Thread);
}

#[test]
fn hostile_guest_on_vcpu_thread() {
    hostile(IoMode::Vcpu);
}
