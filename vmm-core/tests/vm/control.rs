//! The controller: pause, resume, stop, info and QoS changes on a running
//! guest. The guest prints a dot to the UART about every millisecond, so
//! the console shows whether its vCPU runs.

use crate::common::*;
use image::{Format, Kind};
use std::sync::Arc;
use std::time::{Duration, Instant};
use vmm_core::control::State;
use vmm_core::qos::Limits;
use vmm_core::{Boot, Config, Controller, Disk, IoMode, Outcome};

/// mov dx, 0x3f8; L: mov ecx, 1000000; L2: dec ecx; jnz L2;
/// mov al, '.'; out dx, al; jmp L
const DOTS: &[u8] = &[
    0x66, 0xba, 0xf8, 0x03, 0xb9, 0x40, 0x42, 0x0f, 0x00, 0xff, 0xc9, 0x75, 0xfc, 0xb0, b'.', 0xee,
    0xeb, 0xf2,
];

/// Start DOTS on `vcpus` vCPUs (each prints) with `disks` in a thread.
fn start(
    ctl: &Arc<Controller>,
    vcpus: usize,
    disks: Vec<Disk>,
) -> (std::thread::JoinHandle<vmm_core::Report>, Capture) {
    let console = Capture::default();
    let cfg = Config {
        mem: 64 << 20,
        vcpus,
        disks,
        boot: Boot::Payload(DOTS.to_vec()),
        console: Box::new(console.clone()),
        timeout: Some(Duration::from_secs(60)),
        io: IoMode::Thread,
        stop: None,
        controller: Some(ctl.clone()),
        bundle: None,
    };
    (
        std::thread::spawn(move || vmm_core::run(cfg).unwrap()),
        console,
    )
}

fn wait_for(what: &str, mut cond: impl FnMut() -> bool) {
    let t0 = Instant::now();
    while !cond() {
        assert!(t0.elapsed() < Duration::from_secs(10), "never: {what}");
        std::thread::sleep(Duration::from_millis(5));
    }
}

#[test]
fn pause_resume_and_stop() {
    if !can_run(b"x") {
        return;
    }
    let vcpus = vmm_core::max_vcpus().unwrap().min(2);
    let ctl = Controller::new();
    let (run, console) = start(&ctl, vcpus, vec![]);
    wait_for("the guest prints", || console.text().len() > 20);
    for round in 0..5 {
        ctl.pause().unwrap();
        let info = ctl.info();
        assert_eq!(info.state, State::Paused, "round {round}");
        assert_eq!((info.vcpus, info.mem), (vcpus, 64 << 20));
        // Paused: not one more dot.
        let n = console.text().len();
        std::thread::sleep(Duration::from_millis(100));
        assert_eq!(
            console.text().len(),
            n,
            "round {round}: a paused guest printed"
        );
        ctl.resume().unwrap();
        assert_eq!(ctl.info().state, State::Running);
        wait_for("the guest prints again", || console.text().len() > n + 20);
    }
    // Pausing twice is fine; stop ends a paused run.
    ctl.pause().unwrap();
    ctl.pause().unwrap();
    ctl.stop().unwrap();
    let r = run.join().unwrap();
    assert_eq!(r.outcome, Outcome::Stopped);
    assert_eq!(r.outcome.status(), vmm_core::STOPPED_STATUS);
    assert_eq!(ctl.info().state, State::Ended);
    assert!(ctl.pause().unwrap_err().contains("over"));
    assert!(ctl.resume().is_err());
    assert!(ctl.stop().is_err());
}

#[test]
fn a_machine_started_paused_runs_nothing_until_resumed() {
    if !can_run(b"x") {
        return;
    }
    let ctl = Controller::paused();
    assert_eq!(ctl.info().state, State::Starting);
    assert!(ctl.stop().unwrap_err().contains("not started"));
    let (run, console) = start(&ctl, 1, vec![]);
    wait_for("paused", || ctl.info().state == State::Paused);
    std::thread::sleep(Duration::from_millis(100));
    assert_eq!(console.text(), "", "a guest started paused ran");
    ctl.resume().unwrap();
    wait_for("the guest prints", || !console.text().is_empty());
    ctl.stop().unwrap();
    assert_eq!(run.join().unwrap().outcome, Outcome::Stopped);
}

#[test]
fn info_and_qos_of_the_disks() {
    if !can_run(b"x") {
        return;
    }
    let dir = tmp();
    let p = file(&dir, "c.vhdx");
    make(&p, vhdx(SIZE), None);
    let q = file(&dir, "c.img");
    make(&q, Kind::Raw { size: SIZE }, None);
    let a = vmm_core::disks::open(&spec(&p, Some(Format::Vhdx), false), None).unwrap();
    let b = vmm_core::disks::open(&spec(&q, Some(Format::Raw), true), None).unwrap();
    let disks = [&a, &b]
        .iter()
        .map(|d| Disk {
            disk: d.disk(),
            writable: !d.spec.read_only,
            name: d.name(),
            qos: None,
        })
        .collect();
    let ctl = Controller::new();
    let (run, console) = start(&ctl, 1, disks);
    wait_for("the guest prints", || !console.text().is_empty());
    let info = ctl.info();
    assert_eq!(info.disks.len(), 2);
    assert!(info.disks[0].name.ends_with("c.vhdx"), "{info:?}");
    assert!(info.disks[0].writable && !info.disks[1].writable);
    assert_eq!(info.disks[0].qos, Limits::default());
    let l = Limits {
        iops: Some(500),
        bps: Some(1 << 20),
    };
    ctl.set_qos(1, l).unwrap();
    assert_eq!(ctl.info().disks[1].qos, l);
    assert!(ctl.set_qos(2, l).unwrap_err().contains("no disk 2"));
    ctl.stop().unwrap();
    assert_eq!(run.join().unwrap().outcome, Outcome::Stopped);
    drop((a, b));
}
