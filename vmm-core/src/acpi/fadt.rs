//! The Fixed ACPI Description Table (ACPI 6.4 §5.2.9, table 5.9), for a
//! *hardware-reduced* platform (§4.1): no PM1/GPE/PM-timer register
//! blocks, no SCI, no FACS. What a hardware-reduced guest needs instead is
//! here: the DSDT's address, and the sleep control and status registers
//! (§4.8.3.7) through which the kernel powers the machine off (it writes
//! SLP_TYP of `\_S5` and SLP_EN to [`ACPI_SLEEP_CONTROL`]).
//!
//! IAPC_BOOT_ARCH (§5.2.9.3) says there is no VGA, no CMOS RTC and no
//! 8042 keyboard controller, so that the kernel does not probe for them.

use super::table;
use crate::layout::{ACPI_SLEEP_CONTROL, ACPI_SLEEP_STATUS};
use acpi_tables::sdt::Sdt;

/// The length of a revision-6 FADT.
pub const LENGTH: u32 = 276;

/// Field offsets (table 5.9).
const DSDT: usize = 40;
const PREFERRED_PM_PROFILE: usize = 45;
const IAPC_BOOT_ARCH: usize = 109;
const FLAGS: usize = 112;
const MINOR_VERSION: usize = 131;
const X_DSDT: usize = 140;
const SLEEP_CONTROL_REG: usize = 244;
const SLEEP_STATUS_REG: usize = 256;
const HYPERVISOR_VENDOR: usize = 268;

/// Fixed feature flags (table 5.10): the power and sleep buttons are not
/// fixed features (bits 4, 5), and the platform is hardware-reduced
/// (bit 20).
pub const FLAGS_VALUE: u32 = (1 << 4) | (1 << 5) | (1 << 20);

/// IAPC_BOOT_ARCH (table 5.11): VGA not present (bit 2), MSI not
/// supported (bit 3: there is no PCI), CMOS RTC not present (bit 5); bits
/// 0 (legacy devices) and 1 (8042) clear.
pub const IAPC_BOOT_ARCH_VALUE: u16 = (1 << 2) | (1 << 3) | (1 << 5);

/// A Generic Address Structure (§5.2.3.2) for a byte-wide I/O port.
pub fn io_port_gas(port: u16) -> [u8; 12] {
    let mut g = [0u8; 12];
    g[0] = 1; // System I/O space
    g[1] = 8; // register bit width
    g[2] = 0; // bit offset
    g[3] = 1; // byte access
    g[4..12].copy_from_slice(&u64::from(port).to_le_bytes());
    g
}

/// The FADT pointing at the DSDT at `dsdt`.
pub fn build(dsdt: u64) -> Sdt {
    let mut t = table(*b"FACP", LENGTH, 6);
    // The 32-bit DSDT field too, as the tables are below 4 GiB (§5.2.9:
    // X_DSDT wins when both are set).
    t.write_u32(DSDT, u32::try_from(dsdt).unwrap_or(0));
    t.write_u8(PREFERRED_PM_PROFILE, 0); // unspecified
    t.write_u16(IAPC_BOOT_ARCH, IAPC_BOOT_ARCH_VALUE);
    t.write_u32(FLAGS, FLAGS_VALUE);
    t.write_u8(MINOR_VERSION, 4); // ACPI 6.4
    t.write_u64(X_DSDT, dsdt);
    t.write_bytes(SLEEP_CONTROL_REG, &io_port_gas(ACPI_SLEEP_CONTROL));
    t.write_bytes(SLEEP_STATUS_REG, &io_port_gas(ACPI_SLEEP_STATUS));
    t.write_bytes(HYPERVISOR_VENDOR, b"VDISKVMM");
    t
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fields() {
        let t = build(0xe1234);
        let b = t.as_slice();
        assert_eq!(b.len(), 276);
        assert_eq!(&b[..4], b"FACP");
        assert_eq!(b[8], 6, "revision");
        assert_eq!(b[131], 4, "minor version");
        assert_eq!(
            u32::from_le_bytes(b[112..116].try_into().unwrap()) >> 20 & 1,
            1
        );
        assert_eq!(u64::from_le_bytes(b[140..148].try_into().unwrap()), 0xe1234);
        // Sleep control: I/O space, 8 bits, at 0x600.
        assert_eq!(b[244], 1);
        assert_eq!(b[245], 8);
        assert_eq!(u64::from_le_bytes(b[248..256].try_into().unwrap()), 0x600);
        assert_eq!(u64::from_le_bytes(b[260..268].try_into().unwrap()), 0x601);
        // No SCI, no PM blocks, no FACS.
        assert!(b[36..40].iter().all(|x| *x == 0));
        assert!(b[46..56].iter().all(|x| *x == 0));
        assert!(b[56..92].iter().all(|x| *x == 0));
    }
}
