//! The payload ABI: how a run ends (port 0xf4, faults, timeouts), the
//! registers and stacks of several vCPUs, a payload too big, and request
//! latency measured.

use crate::common::*;
use image::{Format, Kind};
use std::time::Duration;
use vmm_core::test_payloads::{BENCH, SMP};
use vmm_core::{Boot, Config, Disk, IoMode, Outcome};

fn run_code(code: &[u8], vcpus: usize, timeout: Option<Duration>) -> (vmm_core::Report, String) {
    let console = Capture::default();
    let r = vmm_core::run(Config {
        mem: 64 << 20,
        vcpus,
        disks: vec![],
        boot: Boot::Payload(code.to_vec()),
        console: Box::new(console.clone()),
        timeout,
        io: IoMode::Thread,
        stop: None,
        controller: None,
        bundle: None,
    })
    .unwrap();
    (r, console.text())
}

fn fault(code: &[u8]) -> String {
    let (r, _) = run_code(code, 1, Some(Duration::from_secs(10)));
    assert_eq!(
        r.outcome.status(),
        vmm_core::FAULT_STATUS,
        "{:?}",
        r.outcome
    );
    match r.outcome {
        Outcome::Fault { vcpu: 0, what } => what,
        other => panic!("{other:?}"),
    }
}

#[test]
fn exits_and_faults() {
    if !can_run(b"x") {
        return;
    }
    // mov eax, V; out 0xf4, eax
    let exit = |v: u32| {
        let mut c = vec![0xb8];
        c.extend_from_slice(&v.to_le_bytes());
        c.extend_from_slice(&[0xe7, 0xf4]);
        c
    };
    let (r, _) = run_code(&exit(42), 1, None);
    assert_eq!(
        (r.outcome.clone(), r.outcome.status()),
        (Outcome::Exited(42), 42)
    );
    let (r, _) = run_code(&exit(300), 1, None);
    assert_eq!(
        (r.outcome.clone(), r.outcome.status()),
        (Outcome::Exited(300), 255)
    );
    // The registers of the ABI: mov eax, edi; shr eax, 20; add eax, esi;
    // out 0xf4, eax (RAM in MiB plus the disk count).
    let (r, _) = run_code(
        &[0x89, 0xf8, 0xc1, 0xe8, 20, 0x01, 0xf0, 0xe7, 0xf4],
        1,
        None,
    );
    assert_eq!(r.outcome, Outcome::Exited(64));
    // The UART: mov dx, 0x3f8; mov al, 'h'; out dx, al; mov al, 'i';
    // out dx, al; xor eax, eax; out 0xf4, eax
    let (r, out) = run_code(
        &[
            0x66, 0xba, 0xf8, 0x03, 0xb0, b'h', 0xee, 0xb0, b'i', 0xee, 0x31, 0xc0, 0xe7, 0xf4,
        ],
        1,
        None,
    );
    assert_eq!((r.outcome, out.as_str()), (Outcome::Exited(0), "hi"));
    // An unknown port reads all ones: in al, 0x80; movzx eax, al; out 0xf4, eax
    let (r, _) = run_code(&[0xe4, 0x80, 0x0f, 0xb6, 0xc0, 0xe7, 0xf4], 1, None);
    assert_eq!(r.outcome, Outcome::Exited(0xff));
    // Faults: ud2, int3, hlt, a load where there is nothing.
    for code in [&[0x0f, 0x0b][..], &[0xcc], &[0xf4]] {
        let what = fault(code);
        assert!(
            what.contains("RIP=0x200000") || what.contains("RIP=0x200001"),
            "{what}"
        );
    }
    // mov rax, 0xe0000000; mov eax, [rax]
    let what = fault(&[0x48, 0xb8, 0, 0, 0, 0xe0, 0, 0, 0, 0, 0x8b, 0x00]);
    assert!(
        what.contains("load from guest-physical 0xe0000000"),
        "{what}"
    );
    // A write to port 0xf5 on the only vCPU: every vCPU parked.
    let what = fault(&[0xe6, 0xf5]);
    assert!(what.contains("parked"), "{what}");
    // jmp $: stopped by the timeout.
    let (r, _) = run_code(&[0xeb, 0xfe], 1, Some(Duration::from_millis(300)));
    assert_eq!(r.outcome.status(), vmm_core::TIMEOUT_STATUS);
    assert!(matches!(r.outcome, Outcome::TimedOut(_)));
}

#[test]
fn a_payload_too_big_or_a_bad_machine_is_refused() {
    if !can_run(b"x") {
        return;
    }
    let cfg = |mem: u64, vcpus: usize, len: usize| Config {
        mem,
        vcpus,
        disks: vec![],
        boot: Boot::Payload(vec![0x90; len]),
        console: Box::new(Capture::default()),
        timeout: Some(Duration::from_secs(5)),
        io: IoMode::Thread,
        stop: None,
        controller: None,
        bundle: None,
    };
    let e = vmm_core::run(cfg(64 << 20, 1, (62 << 20) + 1))
        .unwrap_err()
        .to_string();
    assert!(e.contains("too big for guest memory"), "{e}");
    let e = vmm_core::run(cfg(32 << 20, 1, 10)).unwrap_err().to_string();
    assert!(e.contains("between 64 MiB"), "{e}");
    let e = vmm_core::run(cfg(64 << 20, 0, 10)).unwrap_err().to_string();
    assert!(e.contains("0 vCPUs"), "{e}");
    let e = vmm_core::run(cfg(64 << 20, 99, 10))
        .unwrap_err()
        .to_string();
    assert!(e.contains("99 vCPUs"), "{e}");
}

#[test]
fn two_vcpus_each_on_its_own_stack() {
    if !can_run(SMP) {
        return;
    }
    if vmm_core::max_vcpus().unwrap() < 2 {
        eprintln!("skipped: this host's KVM runs one vCPU");
        return;
    }
    let (r, out) = run_code(SMP, 2, Some(Duration::from_secs(5)));
    assert_eq!(r.outcome, Outcome::Exited(0), "{out}");
    assert!(out.contains("vCPU 1 ran on its own stack"), "{out}");
}

/// Request latency, on the I/O thread and on the vCPU thread (printed;
/// run with --nocapture to see it).
#[test]
fn request_latency() {
    if !can_run(BENCH) {
        return;
    }
    let dir = tmp();
    let p = file(&dir, "bench.vhdx");
    make(&p, Kind::Vhdx(vhdx::CreateOptions::new(SIZE)), None);
    for io in [IoMode::Thread, IoMode::Vcpu] {
        let img = vmm_core::disks::open(&spec(&p, Some(Format::Vhdx), false), None).unwrap();
        let disks = vec![Disk {
            disk: img.disk(),
            writable: true,
            name: img.name(),
            qos: None,
        }];
        let (r, out) = run_disks(BENCH, disks, 1, io);
        drop(img);
        assert_eq!(r.outcome, Outcome::Exited(0), "{out}");
        assert_eq!(r.devices[0].requests, 2000);
        eprintln!(
            "{io:?}: {} first exit after {:?}, run {:?}",
            out.trim(),
            r.first_exit.unwrap(),
            r.elapsed
        );
    }
}
