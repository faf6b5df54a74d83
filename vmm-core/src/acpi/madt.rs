//! The Multiple APIC Description Table (ACPI 6.4 §5.2.12): the local APIC
//! of each vCPU (§5.2.12.2), KVM's in-kernel IO-APIC at 0xfec00000 with
//! GSI base 0 (§5.2.12.3), and LINT1 of every local APIC as NMI
//! (§5.2.12.7), as a PC's firmware sets it up.
//!
//! No interrupt source override (§5.2.12.5): KVM's default routing sends
//! each of the 16 ISA IRQs to the IO-APIC input of the same number, edge
//! triggered and active high, which is what ACPI assumes of an ISA IRQ
//! without an override; the UART is ISA IRQ 4 = GSI 4. The virtio-mmio
//! devices' GSIs (16 and up) are described, with their trigger mode, by
//! their `_CRS` in the DSDT.

use super::table;
use crate::layout::{IOAPIC_ADDR, LAPIC_ADDR, MAX_VCPUS};
use crate::{Error, Result};
use acpi_tables::sdt::Sdt;

/// Flags (table 5.20): PCAT_COMPAT, the machine also has dual 8259s (the
/// in-kernel irqchip emulates them); the kernel masks them.
const PCAT_COMPAT: u32 = 1;

/// Structure types (table 5.21).
const LOCAL_APIC: u8 = 0;
const IO_APIC: u8 = 1;
const LOCAL_APIC_NMI: u8 = 4;

/// The MADT for `vcpus` vCPUs, whose local APIC ids are 0..vcpus.
///
/// # Errors
/// More vCPUs than the machine allows.
pub fn build(vcpus: usize) -> Result<Sdt> {
    if vcpus == 0 || vcpus > MAX_VCPUS {
        return Err(Error::Config(format!(
            "{vcpus} vCPUs: the MADT describes 1 to {MAX_VCPUS}"
        )));
    }
    let mut t = table(*b"APIC", 44, 5);
    t.write_u32(36, u32::try_from(LAPIC_ADDR).unwrap_or(0));
    t.write_u32(40, PCAT_COMPAT);
    for i in 0..vcpus {
        // At most MAX_VCPUS (16): fits a byte.
        let id = u8::try_from(i).unwrap_or(u8::MAX);
        // Type, length, ACPI processor UID, APIC id, flags (enabled).
        let mut s = [LOCAL_APIC, 8, id, id, 0, 0, 0, 0];
        s[4..8].copy_from_slice(&1u32.to_le_bytes());
        t.append_slice(&s);
    }
    // Type, length, IO-APIC id, reserved, address, GSI base.
    // Id 0: what KVM's IO-APIC has in its ID register after reset (on
    // x86-64, IO-APIC and local APIC ids are separate name spaces).
    let mut s = [IO_APIC, 12, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0];
    s[4..8].copy_from_slice(&u32::try_from(IOAPIC_ADDR).unwrap_or(0).to_le_bytes());
    t.append_slice(&s);
    // Type, length, ACPI processor UID 0xff (all), flags (conforming to
    // the bus: 0), LINT# 1.
    t.append_slice(&[LOCAL_APIC_NMI, 6, 0xff, 0, 0, 1]);
    Ok(t)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The structures after the header, as (type, bytes).
    fn structures(b: &[u8]) -> Vec<(u8, &[u8])> {
        let mut v = Vec::new();
        let mut at = 44;
        while at < b.len() {
            let len = usize::from(b[at + 1]);
            assert!(len >= 2 && at + len <= b.len());
            v.push((b[at], &b[at..at + len]));
            at += len;
        }
        v
    }

    #[test]
    fn apics() {
        let t = build(3).unwrap();
        let b = t.as_slice();
        assert_eq!(&b[..4], b"APIC");
        assert_eq!(
            u32::from_le_bytes(b[36..40].try_into().unwrap()),
            0xfee0_0000
        );
        let s = structures(b);
        assert_eq!(s.len(), 5);
        for (i, (ty, st)) in s[..3].iter().enumerate() {
            assert_eq!(*ty, 0);
            assert_eq!(usize::from(st[3]), i, "APIC id");
            assert_eq!(st[4] & 1, 1, "enabled");
        }
        assert_eq!(s[3].0, 1);
        assert_eq!(s[3].1[2], 0, "IO-APIC id, as KVM's register says");
        assert_eq!(
            u32::from_le_bytes(s[3].1[4..8].try_into().unwrap()),
            0xfec0_0000
        );
        assert_eq!(u32::from_le_bytes(s[3].1[8..12].try_into().unwrap()), 0);
        assert_eq!(s[4].0, 4);
        assert!(build(0).is_err());
        assert!(build(17).is_err());
    }
}
