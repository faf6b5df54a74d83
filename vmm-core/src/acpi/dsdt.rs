//! The Differentiated System Description Table (ACPI 6.4 §5.2.11.1): a
//! header and AML (chapter 19/20) describing, under `\_SB`:
//!
//! - `COM1`, the 8250 UART: `_HID` EISAID "PNP0501", `_UID` 1, `_CRS` the
//!   I/O ports 0x3f8-0x3ff and interrupt 4 (edge, active high: an ISA
//!   IRQ);
//! - `VRxx` for each virtio-mmio device *i* (xx its index in hexadecimal):
//!   `_HID` "LNRO0005" (the id Linux's virtio_mmio driver matches), `_UID`
//!   *i*, `_CRS` its register window (Memory32Fixed, read/write,
//!   0xd0000000 + *i* · 0x1000, 0x1000 bytes) and its interrupt: an
//!   Extended Interrupt descriptor (§6.4.3.6) on GSI 16 + *i*, edge
//!   triggered, active high, exclusive (the device's irqfd pulses it).
//!
//! and, at the root, `\_S5` (§7.4.2.5): the package {5, 0}, the SLP_TYP
//! values of the soft-off state, which the kernel writes, with SLP_EN, to
//! the FADT's sleep control register to power off.

use super::table;
use crate::layout::{virtio_gsi, SERIAL_GSI, SERIAL_PORT, VIRTIO_MMIO_BASE, VIRTIO_MMIO_SIZE};
use acpi_tables::aml::{
    Device, EISAName, Interrupt, Memory32Fixed, Name, Package, Path, ResourceTemplate, Scope, IO,
};
use acpi_tables::sdt::Sdt;
use acpi_tables::Aml;

/// The SLP_TYP value of S5 in `\_S5`, which the sleep control register
/// receives (bits 2-4) on power-off.
pub const S5_SLP_TYP: u8 = 5;

/// The name of virtio-mmio device `i`'s AML object.
pub fn virtio_name(i: usize) -> String {
    format!("VR{:02X}", i & 0xff)
}

/// The AML of the UART.
fn com1() -> Vec<u8> {
    let port = SERIAL_PORT;
    let mut v = Vec::new();
    Device::new(
        Path::new("COM1"),
        vec![
            &Name::new(Path::new("_HID"), &EISAName::new("PNP0501")),
            &Name::new(Path::new("_UID"), &1u8),
            &Name::new(
                Path::new("_CRS"),
                &ResourceTemplate::new(vec![
                    &IO::new(port, port, 1, 8),
                    &Interrupt::new(true, true, false, false, SERIAL_GSI),
                ]),
            ),
        ],
    )
    .to_aml_bytes(&mut v);
    v
}

/// The AML of virtio-mmio device `i`.
fn virtio(i: usize) -> Vec<u8> {
    let index = u64::try_from(i).unwrap_or(u64::MAX);
    let base = VIRTIO_MMIO_BASE + index * VIRTIO_MMIO_SIZE;
    let uid = u32::try_from(i).unwrap_or(u32::MAX);
    let mut v = Vec::new();
    Device::new(
        Path::new(&virtio_name(i)),
        vec![
            &Name::new(Path::new("_HID"), &"LNRO0005"),
            &Name::new(Path::new("_UID"), &uid),
            &Name::new(
                Path::new("_CRS"),
                &ResourceTemplate::new(vec![
                    &Memory32Fixed::new(
                        true,
                        u32::try_from(base).unwrap_or(u32::MAX),
                        u32::try_from(VIRTIO_MMIO_SIZE).unwrap_or(0),
                    ),
                    &Interrupt::new(true, true, false, false, virtio_gsi(i)),
                ]),
            ),
        ],
    )
    .to_aml_bytes(&mut v);
    v
}

/// The DSDT for `disks` virtio-mmio devices.
pub fn build(disks: usize) -> Sdt {
    let mut devices = com1();
    for i in 0..disks {
        devices.extend(virtio(i));
    }
    let mut aml = Scope::raw(Path::new("_SB_"), devices);
    Name::new(Path::new("_S5_"), &Package::new(vec![&S5_SLP_TYP, &0u8])).to_aml_bytes(&mut aml);
    // Revision 2: integers are 64 bits (§5.2.11.1).
    let mut t = table(*b"DSDT", 36, 2);
    t.append_slice(&aml);
    t
}

#[cfg(test)]
mod tests {
    use super::*;

    fn find(hay: &[u8], needle: &[u8]) -> usize {
        hay.windows(needle.len()).filter(|w| *w == needle).count()
    }

    #[test]
    fn names_the_devices() {
        let t = build(3);
        let b = t.as_slice();
        assert_eq!(&b[..4], b"DSDT");
        assert_eq!(find(b, b"LNRO0005\0"), 3);
        assert_eq!(find(b, b"COM1"), 1);
        for i in 0..3u32 {
            // Memory32Fixed: tag 0x86, length 9, read/write, base, length.
            let mut m = vec![0x86, 9, 0, 1];
            m.extend_from_slice(&(0xd000_0000 + i * 0x1000).to_le_bytes());
            m.extend_from_slice(&0x1000u32.to_le_bytes());
            assert_eq!(find(b, &m), 1, "device {i}'s window");
            // Extended interrupt: tag 0x89, length 6, consumer + edge,
            // one interrupt, its GSI.
            let mut irq = vec![0x89, 6, 0, 3, 1];
            irq.extend_from_slice(&(16 + i).to_le_bytes());
            assert_eq!(find(b, &irq), 1, "device {i}'s interrupt");
            assert_eq!(find(b, virtio_name(i as usize).as_bytes()), 1);
        }
        // The UART's ports: I/O descriptor 0x47, decode16, 0x3f8, 0x3f8,
        // alignment 1, 8 ports; and its IRQ 4.
        assert_eq!(find(b, &[0x47, 1, 0xf8, 3, 0xf8, 3, 1, 8]), 1);
        assert_eq!(find(b, &[0x89, 6, 0, 3, 1, 4, 0, 0, 0]), 1);
        assert_eq!(find(b, b"_S5_"), 1);
        assert_eq!(
            build(0)
                .as_slice()
                .windows(8)
                .filter(|w| w == b"LNRO0005")
                .count(),
            0
        );
        assert_eq!(virtio_name(10), "VR0A");
    }
}
