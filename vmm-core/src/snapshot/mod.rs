//! VM checkpoints: a running machine's state — every vCPU's registers
//! ([`vcpu`]), the interrupt controllers and clock of a Linux guest, the
//! virtio-mmio transports and the UART — in a versioned, checksummed state
//! file ([`file`]), and its memory in a sparse file restored lazily
//! ([`memory`]).
//!
//! In a checkpoint bundle the two files of checkpoint *N* are
//! `vm/ID.state` and `vm/ID.mem`, ID being the bundle node that holds the
//! disk as of *N* ([`checkpoint::Bundle::vm_state_paths`]; the bundle
//! removes them with the checkpoint);
//! [`Controller::checkpoint`](crate::Controller::checkpoint) writes them,
//! [`crate::run`] with [`crate::Boot::Restore`] continues from them.

pub mod file;
pub mod memory;
pub mod take;
pub mod vcpu;

use crate::serial::UartState;
use crate::virtio::mmio::TransportState;
use file::{Fields, StateFile};
use kvm_bindings::{kvm_clock_data, kvm_irqchip, kvm_pit_state2};
use kvm_ioctls::VmFd;
use std::path::{Path, PathBuf};
use zerocopy::{FromBytes, IntoBytes};

/// The machine a checkpoint was taken of.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct MachineConf {
    /// Guest RAM in bytes.
    pub mem: u64,
    /// vCPUs.
    pub vcpus: usize,
    /// A Linux guest (interrupt controllers and a local APIC per vCPU) or
    /// a payload.
    pub linux: bool,
    /// Its disks, in device order (disk 0 is the bundle's).
    pub disks: Vec<DiskConf>,
}

/// A disk of a checkpointed machine.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct DiskConf {
    /// The image it served.
    pub name: String,
    /// Whether the guest could write it.
    pub writable: bool,
}

/// A checkpoint's state, in memory.
#[derive(Debug, Clone)]
pub struct Checkpoint {
    /// The machine.
    pub conf: MachineConf,
    /// Each vCPU's state ([`vcpu::capture`]) and whether it was parked.
    pub vcpus: Vec<(Vec<u8>, bool)>,
    /// Each virtio-mmio transport.
    pub devices: Vec<TransportState>,
    /// The UART.
    pub uart: UartState,
    /// A Linux guest's interrupt controllers and clock ([`capture_vm`]).
    pub vm: Option<Vec<u8>>,
    /// The memory file.
    pub memory: PathBuf,
}

fn json<T: serde::Serialize>(v: &T) -> Vec<u8> {
    serde_json::to_vec(v).unwrap_or_default()
}

fn from_json<T: serde::de::DeserializeOwned>(b: &[u8], what: &str) -> Result<T, String> {
    serde_json::from_slice(b).map_err(|e| format!("the {what} section: {e}"))
}

impl Checkpoint {
    /// The state file's sections.
    pub fn to_file(&self) -> StateFile {
        let mut f = StateFile::default();
        f.push(*b"CONF", json(&self.conf));
        for (state, parked) in &self.vcpus {
            let mut v = Fields::default();
            v.put(*b"STAT", state);
            v.put(*b"PARK", &[u8::from(*parked)]);
            f.push(*b"VCPU", v.into_bytes());
        }
        f.push(*b"DEVS", json(&self.devices));
        f.push(*b"UART", json(&self.uart));
        if let Some(vm) = &self.vm {
            f.push(*b"VMST", vm.clone());
        }
        f
    }

    /// Read the checkpoint whose files are `state` and `memory`, checked
    /// for consistency (each part present, as many vCPUs and devices as
    /// the configuration says).
    ///
    /// # Errors
    /// A missing, damaged, truncated or incompatible file: the message
    /// says which and why.
    pub fn load(state: &Path, memory: &Path) -> Result<Checkpoint, String> {
        let f = StateFile::read(state)?;
        let name = state.display();
        let bad = |e: String| format!("{name}: {e}");
        let conf: MachineConf = from_json(
            f.get(*b"CONF")
                .ok_or("no CONF section")
                .map_err(|e| bad(e.into()))?,
            "CONF",
        )
        .map_err(bad)?;
        let mut vcpus = Vec::new();
        for v in f.all(*b"VCPU") {
            let fields = Fields::parse(v).map_err(bad)?;
            let get = |t: &[u8; 4]| fields.iter().find(|(x, _)| x == t).map(|(_, b)| b.to_vec());
            let state = get(b"STAT").ok_or_else(|| bad("a VCPU section without STAT".into()))?;
            let parked = get(b"PARK").is_some_and(|p| p.first() == Some(&1));
            vcpus.push((state, parked));
        }
        if vcpus.len() != conf.vcpus {
            return Err(bad(format!(
                "{} vCPU sections for a machine of {} vCPUs",
                vcpus.len(),
                conf.vcpus
            )));
        }
        let devices: Vec<TransportState> = from_json(
            f.get(*b"DEVS")
                .ok_or_else(|| bad("no DEVS section".into()))?,
            "DEVS",
        )
        .map_err(bad)?;
        if devices.len() != conf.disks.len() {
            return Err(bad(format!(
                "{} device states for {} disks",
                devices.len(),
                conf.disks.len()
            )));
        }
        let uart = from_json(
            f.get(*b"UART")
                .ok_or_else(|| bad("no UART section".into()))?,
            "UART",
        )
        .map_err(bad)?;
        let vm = f.get(*b"VMST").map(<[u8]>::to_vec);
        if vm.is_some() != conf.linux {
            return Err(bad(
                "the interrupt controller state (VMST) does not match the machine's mode".into(),
            ));
        }
        Ok(Checkpoint {
            conf,
            vcpus,
            devices,
            uart,
            vm,
            memory: memory.to_path_buf(),
        })
    }
}

fn kvm(what: &str) -> impl Fn(kvm_ioctls::Error) -> String + '_ {
    move |e| format!("{what}: {e}")
}

/// A Linux guest's VM-wide state: the two PICs and the IO-APIC, the PIT,
/// the KVM clock.
///
/// # Errors
/// KVM refuses a read.
pub fn capture_vm(vm: &VmFd) -> Result<Vec<u8>, String> {
    let mut f = Fields::default();
    for (chip, tag) in [(0u32, *b"PIC0"), (1, *b"PIC1"), (2, *b"IOAP")] {
        let mut c = kvm_irqchip {
            chip_id: chip,
            ..Default::default()
        };
        vm.get_irqchip(&mut c).map_err(kvm("KVM_GET_IRQCHIP"))?;
        f.put(tag, c.as_bytes());
    }
    f.put(
        *b"PIT2",
        vm.get_pit2().map_err(kvm("KVM_GET_PIT2"))?.as_bytes(),
    );
    f.put(
        *b"CLCK",
        vm.get_clock().map_err(kvm("KVM_GET_CLOCK"))?.as_bytes(),
    );
    Ok(f.into_bytes())
}

fn field<T: FromBytes>(fields: &[([u8; 4], &[u8])], tag: &[u8; 4]) -> Result<T, String> {
    let b = fields
        .iter()
        .find(|(t, _)| t == tag)
        .map(|(_, b)| *b)
        .ok_or_else(|| format!("no {} field", String::from_utf8_lossy(tag)))?;
    T::read_from_bytes(b).map_err(|_| {
        format!(
            "the {} field is {} bytes, not {}",
            String::from_utf8_lossy(tag),
            b.len(),
            std::mem::size_of::<T>()
        )
    })
}

/// Put [`capture_vm`]'s state back (the irqchip and PIT already created).
///
/// # Errors
/// The state is malformed or KVM refuses it.
pub fn restore_vm(vm: &VmFd, b: &[u8]) -> Result<(), String> {
    let fields = Fields::parse(b)?;
    for tag in [b"PIC0", b"PIC1", b"IOAP"] {
        let c: kvm_irqchip = field(&fields, tag)?;
        vm.set_irqchip(&c).map_err(kvm("KVM_SET_IRQCHIP"))?;
    }
    let pit: kvm_pit_state2 = field(&fields, b"PIT2")?;
    vm.set_pit2(&pit).map_err(kvm("KVM_SET_PIT2"))?;
    let mut clock: kvm_clock_data = field(&fields, b"CLCK")?;
    // KVM_SET_CLOCK takes only the clock value (flags it reported, such
    // as KVM_CLOCK_TSC_STABLE, are refused as input).
    clock.flags = 0;
    vm.set_clock(&clock).map_err(kvm("KVM_SET_CLOCK"))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::virtio::mmio::QueueState;

    fn sample(dir: &Path) -> Checkpoint {
        Checkpoint {
            conf: MachineConf {
                mem: 64 << 20,
                vcpus: 2,
                linux: false,
                disks: vec![DiskConf {
                    name: "a.vhdx".into(),
                    writable: true,
                }],
            },
            vcpus: vec![(vec![1, 2, 3], false), (vec![4], true)],
            devices: vec![TransportState {
                status: 15,
                device_features_sel: 1,
                driver_features_sel: 0,
                driver_features: 1 << 32,
                queue_sel: 0,
                queues: vec![QueueState {
                    size: 16,
                    ready: true,
                    desc: 0x1000,
                    avail: 0x2000,
                    used: 0x3000,
                    indices: Some((5, 5)),
                }],
                interrupt_status: 1,
            }],
            uart: UartState {
                regs: [0; 9],
                in_buffer: vec![],
            },
            vm: None,
            memory: dir.join("x.mem"),
        }
    }

    /// A Linux-mode machine's state (its PICs, IO-APIC, PIT, clock, and a
    /// vCPU with its local APIC) taken from one VM is accepted by a fresh
    /// one and reads back the same (a real kernel cannot run on this
    /// host's KVM, so the state is KVM's own after setup).
    #[test]
    fn linux_mode_state_moves_to_a_new_vm() {
        let Ok(kvm) = kvm_ioctls::Kvm::new() else {
            eprintln!("skipped: /dev/kvm cannot be opened here");
            return;
        };
        let cpuid = kvm
            .get_supported_cpuid(kvm_bindings::KVM_MAX_CPUID_ENTRIES)
            .unwrap();
        let msrs: Vec<u32> = kvm.get_msr_index_list().unwrap().as_slice().to_vec();
        let machine = || {
            let vm = kvm.create_vm().unwrap();
            crate::irq::create_irqchip(&vm).unwrap();
            let fd = vm.create_vcpu(0).unwrap();
            crate::x86::setup_vcpu(&fd, &cpuid, 0, None).unwrap();
            crate::x86::setup_lapic(&fd, true).unwrap();
            (vm, fd)
        };
        let (vm1, cpu1) = machine();
        // Something to carry: a register and an IO-APIC redirection entry
        // set on the first machine.
        let mut regs = cpu1.get_regs().unwrap();
        regs.rbx = 0x1234_5678;
        cpu1.set_regs(&regs).unwrap();
        let vm_state = capture_vm(&vm1).unwrap();
        let cpu_state = vcpu::capture(&cpu1, &msrs, true).unwrap();
        let (vm2, cpu2) = machine();
        restore_vm(&vm2, &vm_state).unwrap();
        vcpu::restore(&cpu2, &cpu_state, true).unwrap();
        assert_eq!(cpu2.get_regs().unwrap().rbx, 0x1234_5678);
        assert_eq!(capture_vm(&vm2).unwrap().len(), vm_state.len());
        let again = vcpu::capture(&cpu2, &msrs, true).unwrap();
        let regs_of = |b: &[u8]| {
            let f = Fields::parse(b).unwrap();
            f.iter().find(|(t, _)| t == b"REGS").unwrap().1.to_vec()
        };
        assert_eq!(regs_of(&again), regs_of(&cpu_state));
        // A state without the local APIC is refused for a vCPU that has one.
        let (_vm3, cpu3) = machine();
        let no_apic = vcpu::capture(&cpu1, &msrs, false).unwrap();
        let e = vcpu::restore(&cpu3, &no_apic, true).unwrap_err();
        assert!(e.contains("LAPC"), "{e}");
    }

    #[test]
    fn a_checkpoint_round_trips_and_inconsistencies_are_named() {
        let dir = tempfile::tempdir().unwrap();
        let c = sample(dir.path());
        let p = dir.path().join("x.state");
        c.to_file().write(&p).unwrap();
        let back = Checkpoint::load(&p, &c.memory).unwrap();
        assert_eq!(back.conf, c.conf);
        assert_eq!(back.vcpus, c.vcpus);
        assert_eq!(back.devices, c.devices);
        assert_eq!(back.uart, c.uart);
        // A vCPU missing.
        let mut f = c.to_file();
        let i = f.sections.iter().position(|(t, _)| t == b"VCPU").unwrap();
        f.sections.remove(i);
        f.write(&p).unwrap();
        let e = Checkpoint::load(&p, &c.memory).unwrap_err();
        assert!(e.contains("1 vCPU sections for a machine of 2"), "{e}");
        // A Linux flag without the controllers' state.
        let mut bad = c.clone();
        bad.conf.linux = true;
        bad.to_file().write(&p).unwrap();
        assert!(Checkpoint::load(&p, &c.memory)
            .unwrap_err()
            .contains("VMST"));
        // Damage and truncation are the container's to find.
        c.to_file().write(&p).unwrap();
        let mut b = std::fs::read(&p).unwrap();
        b.truncate(b.len() - 7);
        std::fs::write(&p, &b).unwrap();
        assert!(Checkpoint::load(&p, &c.memory)
            .unwrap_err()
            .contains("damaged or truncated"));
    }
}
