//! Interrupts for a Linux guest: KVM's in-kernel irqchip (two 8259s, the
//! IO-APIC at 0xfec00000 and a local APIC per vCPU), its PIT, and an
//! irqfd per interrupt line: the device writes its event fd, KVM pulses
//! the line's GSI (an edge, as the DSDT and the MADT describe them) with
//! no exit to the VMM. Payload mode has none of this (its guest polls).
//!
//! The order is KVM's: the TSS address and the irqchip before any vCPU
//! (KVM_CREATE_IRQCHIP, Documentation/virt/kvm/api.rst §4.24), then the
//! PIT (§4.70, it needs the irqchip), then the irqfds (§4.75).

use crate::{Error, Result};
use kvm_bindings::{kvm_pit_config, KVM_PIT_SPEAKER_DUMMY};
use kvm_ioctls::VmFd;
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

/// The three pages KVM needs for its real-mode TSS on Intel hosts
/// (KVM_SET_TSS_ADDR): below the IO-APIC, above RAM and the virtio-mmio
/// windows, where nothing else is.
pub const KVM_TSS_ADDR: usize = 0xfffb_d000;

fn kvm(what: &'static str) -> impl Fn(kvm_ioctls::Error) -> Error {
    move |source| Error::Kvm { what, source }
}

/// Give `vm` its TSS area, the in-kernel irqchip and the PIT (its speaker
/// port a dummy). Before any vCPU is created.
///
/// # Errors
/// KVM refuses one of them.
pub fn create_irqchip(vm: &VmFd) -> Result<()> {
    vm.set_tss_address(KVM_TSS_ADDR)
        .map_err(kvm("KVM_SET_TSS_ADDR"))?;
    vm.create_irq_chip().map_err(kvm("KVM_CREATE_IRQCHIP"))?;
    let pit = kvm_pit_config {
        flags: KVM_PIT_SPEAKER_DUMMY,
        ..Default::default()
    };
    vm.create_pit2(pit).map_err(kvm("KVM_CREATE_PIT2"))?;
    Ok(())
}

/// A new event fd wired to `gsi`: a write of it raises the line.
///
/// # Errors
/// The event fd cannot be made, or KVM refuses the irqfd.
pub fn irqfd(vm: &VmFd, gsi: u32) -> Result<EventFd> {
    let fd = EventFd::new(EFD_NONBLOCK).map_err(|e| Error::io("creating an irq event fd", e))?;
    vm.register_irqfd(&fd, gsi).map_err(kvm("KVM_IRQFD"))?;
    Ok(fd)
}

#[cfg(test)]
mod tests {
    use super::*;
    use kvm_bindings::{
        kvm_ioapic_state, kvm_irqchip, kvm_irqchip__bindgen_ty_1, KVM_IRQCHIP_IOAPIC,
    };
    use kvm_ioctls::Kvm;

    /// A local APIC register, from KVM's state.
    fn lapic_reg(regs: &[std::ffi::c_char; 1024], at: usize) -> u32 {
        u32::from_le_bytes(std::array::from_fn(|i| regs[at + i].to_ne_bytes()[0]))
    }

    /// An irqfd write reaches a vCPU: a device's event, on GSI 17, goes
    /// through the IO-APIC's input 17 (programmed as a kernel would: edge,
    /// active high, fixed delivery of vector 0x41 to APIC id 0) into vCPU
    /// 0's local APIC, whose IRR then has the vector; before the write it
    /// does not. The vCPU never runs: KVM delivers on its own.
    #[test]
    fn an_irqfd_write_reaches_the_local_apic() {
        let Ok(kvm) = Kvm::new() else {
            eprintln!("skipped: /dev/kvm cannot be opened here");
            return;
        };
        let vm = kvm.create_vm().unwrap();
        create_irqchip(&vm).unwrap();
        let vcpu = vm.create_vcpu(0).unwrap();
        let mut lapic = vcpu.get_lapic().unwrap();
        // Spurious-interrupt vector register: APIC software enabled.
        let svr = lapic_reg(&lapic.regs, 0xf0) | 0x1ff;
        for (i, b) in svr.to_le_bytes().iter().enumerate() {
            lapic.regs[0xf0 + i] = std::ffi::c_char::from_ne_bytes([*b]);
        }
        vcpu.set_lapic(&lapic).unwrap();
        let mut ioapic = kvm_ioapic_state {
            base_address: 0xfec0_0000,
            ..Default::default()
        };
        for (pin, e) in ioapic.redirtbl.iter_mut().enumerate() {
            // 82093AA datasheet §3.2.4: vector in bits 0-7, fixed
            // delivery, physical destination (bits 56-63), edge, active
            // high; bit 16 masks.
            e.bits = if pin == 17 { 0x41 } else { 1 << 16 };
        }
        let chip = kvm_irqchip {
            chip_id: KVM_IRQCHIP_IOAPIC,
            pad: 0,
            chip: kvm_irqchip__bindgen_ty_1 { ioapic },
        };
        vm.set_irqchip(&chip).unwrap();
        let fd = irqfd(&vm, 17).unwrap();
        let irr = |v: &kvm_ioctls::VcpuFd| {
            // IRR bits 64-95 are the register at 0x220.
            lapic_reg(&v.get_lapic().unwrap().regs, 0x220) & (1 << (0x41 - 64)) != 0
        };
        assert!(!irr(&vcpu), "nothing pending before the write");
        fd.write(1).unwrap();
        // KVM injects from a work queue: wait for it, boundedly.
        let t0 = std::time::Instant::now();
        while !irr(&vcpu) {
            assert!(
                t0.elapsed() < std::time::Duration::from_secs(5),
                "vector 0x41 never reached the local APIC"
            );
            std::thread::sleep(std::time::Duration::from_millis(1));
        }
    }

    /// The wiring on this host's KVM: an irqchip, a PIT, irqfds that KVM
    /// accepts on the UART's and the devices' GSIs; an irqfd without an
    /// irqchip is refused, and a second irqchip too.
    #[test]
    fn wiring() {
        let Ok(kvm) = Kvm::new() else {
            eprintln!("skipped: /dev/kvm cannot be opened here");
            return;
        };
        let vm = kvm.create_vm().unwrap();
        let e = EventFd::new(0).unwrap();
        assert!(vm.register_irqfd(&e, 4).is_err(), "no irqchip yet");
        create_irqchip(&vm).unwrap();
        let fds: Vec<EventFd> = [4, 16, 17, 23]
            .iter()
            .map(|g| irqfd(&vm, *g).unwrap())
            .collect();
        // Raising a line with no vCPU listening is accepted.
        for f in &fds {
            f.write(1).unwrap();
        }
        assert!(create_irqchip(&vm).is_err(), "a second irqchip");
        // The same fd twice on one GSI is refused (KVM_IRQFD: EBUSY).
        assert!(vm.register_irqfd(&fds[0], 4).is_err());
        // The local APICs as firmware leaves them: the boot processor's
        // LINT0 ExtINT, an AP's masked; LINT1 NMI.
        for (id, lint0) in [(0u64, 0x700), (1, 0x1_0000)] {
            let vcpu = vm.create_vcpu(id).unwrap();
            crate::x86::setup_lapic(&vcpu, id == 0).unwrap();
            let regs = vcpu.get_lapic().unwrap().regs;
            let reg = |at: usize| {
                u32::from_le_bytes(std::array::from_fn(|i| regs[at + i].to_ne_bytes()[0]))
            };
            assert_eq!(reg(0x350) & 0x1_0700, lint0, "vCPU {id} LINT0");
            assert_eq!(reg(0x360) & 0x1_0700, 0x400, "vCPU {id} LINT1");
        }
    }
}
