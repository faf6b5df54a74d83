//! Storage QoS: qos.c's 2300 I/Os (8 KiB units) and 12,697,600 bytes,
//! timed against a disk's IOPS and bytes-per-second limits. The limit must
//! hold: the rate seen never more than 5% over it (the small burst
//! included), and not far under it either.

use crate::common::*;
use image::Kind;
use std::sync::Arc;
use vmm_core::qos::{Limits, Qos};
use vmm_core::test_payloads::QOS;
use vmm_core::{Disk, IoMode, Outcome};

const UNITS: f64 = 2300.0;
const BYTES: f64 = 12_697_600.0;

/// Run qos.c on a raw disk with `limits`: the seconds the guest took.
fn timed(limits: Limits, io: IoMode) -> f64 {
    let dir = tmp();
    let p = file(&dir, "q.img");
    make(&p, Kind::Raw { size: SIZE }, None);
    let img = vmm_core::disks::open(&spec(&p, Some(image::Format::Raw), false), None).unwrap();
    let qos = Arc::new(Qos::new(limits));
    let disks = vec![Disk {
        disk: img.disk(),
        writable: true,
        name: img.name(),
        qos: Some(qos.clone()),
    }];
    let (r, out) = run_disks(QOS, disks, 1, io);
    drop(img);
    assert_eq!(r.outcome, Outcome::Exited(0), "{out}");
    assert_eq!(r.devices[0].requests, 1600);
    assert_eq!(qos.limits(), limits);
    // From the guest's first instruction to the disks closed: the
    // requests and a few milliseconds of setup and teardown.
    (r.elapsed - r.first_exit.unwrap()).as_secs_f64()
}

fn holds(what: &str, amount: f64, limit: f64, secs: f64) {
    let rate = amount / secs;
    eprintln!("{what}: limit {limit}, measured {rate:.1} ({secs:.3} s)");
    assert!(
        rate <= limit * 1.05,
        "{what}: {rate:.1} over the limit {limit}"
    );
    assert!(
        rate >= limit * 0.75,
        "{what}: {rate:.1}, far under the limit {limit}"
    );
}

#[test]
fn an_iops_limit_holds() {
    if !can_run(QOS) {
        return;
    }
    let secs = timed(
        Limits {
            iops: Some(1150),
            bps: None,
        },
        IoMode::Thread,
    );
    holds("iops", UNITS, 1150.0, secs);
}

#[test]
fn a_bytes_per_second_limit_holds() {
    if !can_run(QOS) {
        return;
    }
    let bps = 6_348_800;
    let secs = timed(
        Limits {
            iops: None,
            bps: Some(bps),
        },
        IoMode::Thread,
    );
    #[allow(clippy::cast_precision_loss)]
    holds("bytes/s", BYTES, bps as f64, secs);
}

#[test]
fn limits_hold_on_the_vcpu_thread_too() {
    if !can_run(QOS) {
        return;
    }
    let secs = timed(
        Limits {
            iops: Some(2300),
            bps: Some(12_697_600),
        },
        IoMode::Vcpu,
    );
    holds("iops (vCPU thread)", UNITS, 2300.0, secs);
}

/// Unlimited, the same I/O takes a fraction of the limited time (so the
/// tests above measure the limit, not the disk).
#[test]
fn without_limits_it_is_much_faster() {
    if !can_run(QOS) {
        return;
    }
    let secs = timed(Limits::default(), IoMode::Thread);
    eprintln!("unlimited: {secs:.3} s");
    assert!(secs < 1.0, "{secs}");
}
