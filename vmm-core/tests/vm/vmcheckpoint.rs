//! VM checkpoints: migrate.c (which rewrites and verifies its whole disk
//! every round) checkpointed into a bundle while it runs, then continued
//! from the checkpoint in a new machine: it goes on from the round it was
//! in (its registers and memory came back) and its reads verify (the disk
//! came back as of the same instant). Refusals leave the guest running.

use crate::common::*;
use image::{Format, OpenOptions};
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};
use vmm_core::snapshot::Checkpoint;
use vmm_core::test_payloads::MIGRATE;
use vmm_core::{Boot, Config, Controller, Disk, IoMode, Outcome};

/// The numbers of the "round N ok" lines printed so far.
fn rounds(c: &Capture) -> Vec<u64> {
    c.text()
        .lines()
        .filter_map(|l| l.strip_prefix("round ")?.strip_suffix(" ok")?.parse().ok())
        .collect()
}

fn wait(what: &str, c: &Capture, mut cond: impl FnMut(&[u64]) -> bool) {
    let t0 = Instant::now();
    loop {
        let r = rounds(c);
        if cond(&r) {
            return;
        }
        let out = c.text();
        assert!(!out.contains("other bytes"), "{out}");
        assert!(
            t0.elapsed() < Duration::from_secs(60),
            "never {what}: {out}"
        );
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// The bundle's active disk, opened as `vmm run --bundle` opens it.
fn active(b: &checkpoint::Bundle) -> Disk {
    let o = OpenOptions {
        format: Some(Format::Vhdx),
        writable: true,
        ..OpenOptions::probing()
    };
    let img = image::open(b.active_path(), &o).unwrap();
    Disk {
        disk: img.disk().clone(),
        writable: true,
        name: img.storage().name().to_string(),
        qos: None,
    }
}

fn start(
    bundle: checkpoint::Bundle,
    boot: Boot,
    vcpus: usize,
) -> (
    Arc<Controller>,
    std::thread::JoinHandle<vmm_core::Report>,
    Capture,
) {
    let ctl = Controller::new();
    let console = Capture::default();
    let cfg = Config {
        mem: 64 << 20,
        vcpus,
        disks: vec![active(&bundle)],
        boot,
        console: Box::new(console.clone()),
        timeout: Some(Duration::from_secs(120)),
        io: IoMode::Thread,
        stop: None,
        controller: Some(ctl.clone()),
        bundle: Some(bundle),
    };
    let run = std::thread::spawn(move || vmm_core::run(cfg).unwrap());
    (ctl, run, console)
}

fn new_bundle(dir: &Path) -> std::path::PathBuf {
    let b = dir.join("vm.bundle");
    checkpoint::Bundle::init(&b, checkpoint::Format::Vhdx, SIZE).unwrap();
    b
}

#[test]
fn a_vm_checkpoint_continues_where_it_stopped() {
    if !can_run(MIGRATE) {
        return;
    }
    // Two vCPUs where the host has them: vCPU 1 parks at once, and must
    // come back parked.
    let vcpus = vmm_core::max_vcpus().unwrap().min(2);
    let dir = tmp();
    let path = new_bundle(dir.path());
    let (ctl, run, console) = start(
        checkpoint::Bundle::open(&path).unwrap(),
        Boot::Payload(MIGRATE.to_vec()),
        vcpus,
    );
    wait("round 2", &console, |r| r.len() >= 2);
    let report = ctl.checkpoint("c1").unwrap();
    let at = *rounds(&console).last().unwrap();
    eprintln!(
        "checkpoint after round {at}: {} bytes of memory, pause {:?}",
        report.memory_bytes, report.pause
    );
    assert!(report.memory_bytes > 0 && report.memory_bytes < 64 << 20);
    // The guest goes on after the checkpoint, on the new active disk.
    wait("two more rounds", &console, |r| {
        r.last().is_some_and(|l| *l >= at + 2)
    });
    // A second checkpoint of the same name is refused; the guest goes on.
    assert!(ctl.checkpoint("c1").unwrap_err().contains("exists"));
    ctl.stop().unwrap();
    assert_eq!(run.join().unwrap().outcome, Outcome::Stopped);

    // The bundle lists the checkpoint with its VM state.
    let mut b = checkpoint::Bundle::open(&path).unwrap();
    let list = b.list().unwrap();
    let c1 = list
        .iter()
        .find(|n| n.node.name.as_deref() == Some("c1"))
        .unwrap();
    assert!(c1.vm_state);
    assert_eq!(c1.node.id, report.node);
    let (state, mem) = b.vm_state_paths(&report.node);
    let ckpt = Checkpoint::load(&state, &mem).unwrap();
    assert_eq!(ckpt.vcpus.len(), vcpus);
    if vcpus == 2 {
        assert!(!ckpt.vcpus[0].1 && ckpt.vcpus[1].1, "vCPU 1 was parked");
    }
    // Continue from c1: the disk as of c1 (revert), memory and vCPUs too.
    b.revert("c1").unwrap();
    let (ctl, run, console) = start(b, Boot::Restore(Arc::new(ckpt)), vcpus);
    wait("rounds after the restore", &console, |r| r.len() >= 3);
    let r = rounds(&console);
    // It goes on from the round it was in at the checkpoint (at or after
    // `at`, which ended before the checkpoint; never from round 1).
    assert!(
        r[0] >= at && r[0] <= at + 2,
        "restored at round {at}: {r:?}"
    );
    assert!(r.windows(2).all(|w| w[1] == w[0] + 1), "{r:?}");
    ctl.stop().unwrap();
    assert_eq!(run.join().unwrap().outcome, Outcome::Stopped);
    // Deleting the checkpoint removes its VM state.
    let mut b = checkpoint::Bundle::open(&path).unwrap();
    b.delete("c1").unwrap();
    assert!(!state.exists() && !mem.exists());
}

#[test]
fn checkpoint_refusals_leave_the_guest_running() {
    if !can_run(MIGRATE) {
        return;
    }
    let dir = tmp();
    // No bundle.
    let p = file(&dir, "plain.vhdx");
    make(&p, vhdx(SIZE), None);
    let img = vmm_core::disks::open(&spec(&p, Some(Format::Vhdx), false), None).unwrap();
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
        timeout: Some(Duration::from_secs(60)),
        io: IoMode::Thread,
        stop: None,
        controller: Some(ctl.clone()),
        bundle: None,
    };
    let run = std::thread::spawn(move || vmm_core::run(cfg).unwrap());
    wait("round 1", &console, |r| !r.is_empty());
    let e = ctl.checkpoint("x").unwrap_err();
    assert!(e.contains("no checkpoint bundle"), "{e}");
    let n = rounds(&console).len();
    wait("more rounds", &console, |r| r.len() > n);
    ctl.stop().unwrap();
    assert_eq!(run.join().unwrap().outcome, Outcome::Stopped);
    drop(img);
    // A damaged state file is refused when loaded, saying so.
    let path = new_bundle(dir.path());
    let (ctl, run, console) = start(
        checkpoint::Bundle::open(&path).unwrap(),
        Boot::Payload(MIGRATE.to_vec()),
        1,
    );
    wait("round 1", &console, |r| !r.is_empty());
    let report = ctl.checkpoint("c").unwrap();
    ctl.stop().unwrap();
    run.join().unwrap();
    let b = checkpoint::Bundle::open(&path).unwrap();
    let (state, mem) = b.vm_state_paths(&report.node);
    let mut bytes = std::fs::read(&state).unwrap();
    let mid = bytes.len() / 2;
    bytes[mid] ^= 1;
    std::fs::write(&state, &bytes).unwrap();
    let e = Checkpoint::load(&state, &mem).unwrap_err();
    assert!(e.contains("damaged or truncated"), "{e}");
    std::fs::File::options()
        .write(true)
        .open(&mem)
        .unwrap()
        .set_len(1 << 20)
        .unwrap();
    bytes[mid] ^= 1;
    std::fs::write(&state, &bytes).unwrap();
    let ckpt = Checkpoint::load(&state, &mem).unwrap();
    let cfg = Config {
        mem: 64 << 20,
        vcpus: 1,
        disks: vec![active(&b)],
        boot: Boot::Restore(Arc::new(ckpt)),
        console: Box::new(std::io::sink()),
        timeout: Some(Duration::from_secs(5)),
        io: IoMode::Thread,
        stop: None,
        controller: None,
        bundle: None,
    };
    let e = vmm_core::run(cfg).unwrap_err().to_string();
    assert!(e.contains("does not belong"), "{e}");
}
