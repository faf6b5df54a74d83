//! The ACPI tables a Linux guest reads to find its CPUs, interrupt
//! controllers and devices (ACPI 6.4, chapter 5): the RSDP (§5.2.5), the
//! XSDT (§5.2.8), a hardware-reduced FADT ([`fadt`], §5.2.9), the MADT
//! ([`madt`], §5.2.12) and the DSDT ([`dsdt`], §5.2.11.1) whose AML names
//! the UART and the virtio-mmio devices.
//!
//! They are laid out from [`ACPI_ADDR`] (0xe0000): the RSDP first, where
//! the kernel's legacy scan of 0xe0000-0xfffff finds it (its address is
//! also given in `boot_params.acpi_rsdp_addr`), then each table on a
//! 16-byte boundary; the e820 map reserves the area.

pub mod dsdt;
pub mod fadt;
pub mod madt;

use crate::layout::{ACPI_ADDR, MAX_LINUX_DISKS, VMM_AREA_END};
use crate::memory::Ram;
use crate::{Error, Result};
use acpi_tables::rsdp::Rsdp;
use acpi_tables::sdt::Sdt;
use acpi_tables::Aml;
use vm_memory::{Bytes, GuestAddress};

/// The OEM ID every table carries (6 bytes).
pub const OEM_ID: [u8; 6] = *b"VDISK ";
/// The OEM table ID every table carries (8 bytes).
pub const OEM_TABLE_ID: [u8; 8] = *b"VMMCORE ";
/// The OEM revision.
pub const OEM_REVISION: u32 = 1;

/// A new table: its 36-byte header (ACPI 6.4 §5.2.6) and `length - 36`
/// zero bytes, the checksum kept right by every later write.
pub(crate) fn table(signature: [u8; 4], length: u32, revision: u8) -> Sdt {
    Sdt::new(
        signature,
        length,
        revision,
        OEM_ID,
        OEM_TABLE_ID,
        OEM_REVISION,
    )
}

/// The machine the tables describe.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Machine {
    /// How many vCPUs (local APIC ids 0..vcpus).
    pub vcpus: usize,
    /// How many virtio-mmio devices.
    pub disks: usize,
}

/// The tables, each as the bytes written to guest memory, and where.
#[derive(Debug, Clone)]
pub struct Tables {
    /// (signature, guest-physical address, bytes), the RSDP first.
    pub tables: Vec<(String, u64, Vec<u8>)>,
}

impl Tables {
    /// The table with this signature ("RSD PTR " for the RSDP).
    pub fn get(&self, signature: &str) -> Option<&[u8]> {
        self.tables
            .iter()
            .find(|(s, _, _)| s == signature)
            .map(|(_, _, b)| b.as_slice())
    }

    /// Where the RSDP is.
    pub fn rsdp_addr(&self) -> u64 {
        ACPI_ADDR
    }
}

fn align16(v: u64) -> u64 {
    (v + 15) & !15
}

fn bytes(aml: &dyn Aml) -> Vec<u8> {
    let mut v = Vec::new();
    aml.to_aml_bytes(&mut v);
    v
}

/// Build the tables for `machine`, laid out from [`ACPI_ADDR`].
///
/// # Errors
/// More devices than IO-APIC inputs for them ([`MAX_LINUX_DISKS`]), a
/// vCPU count out of bounds, tables that would not fit below
/// [`VMM_AREA_END`] (cannot happen within those limits).
pub fn build(machine: Machine) -> Result<Tables> {
    if machine.disks > MAX_LINUX_DISKS {
        return Err(Error::Config(format!(
            "{} disks: a Linux guest can have at most {MAX_LINUX_DISKS} (one IO-APIC input each)",
            machine.disks
        )));
    }
    let dsdt = dsdt::build(machine.disks);
    let madt = madt::build(machine.vcpus)?;
    let rsdp_len = u64::try_from(Rsdp::len()).unwrap_or(u64::MAX);
    let xsdt_addr = align16(ACPI_ADDR + rsdp_len);
    // The XSDT: its header and one 64-bit pointer per table (FADT, MADT).
    let xsdt_len = 36 + 2 * 8;
    let fadt_addr = align16(xsdt_addr + xsdt_len);
    let madt_addr = align16(fadt_addr + u64::from(fadt::LENGTH));
    let dsdt_addr = align16(madt_addr + len(&madt));
    let end = dsdt_addr + len(&dsdt);
    if end > VMM_AREA_END {
        return Err(Error::Config(format!(
            "the ACPI tables would end at {end:#x}, past {VMM_AREA_END:#x}"
        )));
    }
    let fadt = fadt::build(dsdt_addr);
    let mut xsdt = table(*b"XSDT", 36, 1);
    for a in [fadt_addr, madt_addr] {
        xsdt.append_slice(&a.to_le_bytes());
    }
    let rsdp = Rsdp::new(OEM_ID, xsdt_addr);
    Ok(Tables {
        tables: vec![
            ("RSD PTR ".into(), ACPI_ADDR, bytes(&rsdp)),
            ("XSDT".into(), xsdt_addr, xsdt.as_slice().to_vec()),
            ("FACP".into(), fadt_addr, fadt.as_slice().to_vec()),
            ("APIC".into(), madt_addr, madt.as_slice().to_vec()),
            ("DSDT".into(), dsdt_addr, dsdt.as_slice().to_vec()),
        ],
    })
}

fn len(t: &Sdt) -> u64 {
    u64::try_from(t.len()).unwrap_or(u64::MAX)
}

/// Build the tables and write them into guest memory; the RSDP's address.
///
/// # Errors
/// They do not fit, or guest memory cannot be written.
pub fn write(ram: &Ram, machine: Machine) -> Result<u64> {
    let t = build(machine)?;
    for (sig, at, b) in &t.tables {
        ram.write_slice(b, GuestAddress(*at))
            .map_err(|e| Error::Memory(format!("writing the ACPI {sig} table at {at:#x}: {e}")))?;
    }
    Ok(t.rsdp_addr())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sum(b: &[u8]) -> u8 {
        b.iter().fold(0u8, |a, x| a.wrapping_add(*x))
    }

    fn u32_at(b: &[u8], at: usize) -> u32 {
        u32::from_le_bytes(b[at..at + 4].try_into().unwrap())
    }

    fn u64_at(b: &[u8], at: usize) -> u64 {
        u64::from_le_bytes(b[at..at + 8].try_into().unwrap())
    }

    #[test]
    fn checksums_lengths_and_links() {
        for (vcpus, disks) in [(1, 0), (2, 1), (16, 8)] {
            let t = build(Machine { vcpus, disks }).unwrap();
            let rsdp = t.get("RSD PTR ").unwrap();
            assert_eq!(&rsdp[..8], b"RSD PTR ");
            assert_eq!(rsdp.len(), 36);
            // ACPI 6.4 §5.2.5.3: the first 20 bytes sum to 0, and all 36.
            assert_eq!(sum(&rsdp[..20]), 0);
            assert_eq!(sum(rsdp), 0);
            assert_eq!(rsdp[15], 2, "revision 2: an XSDT");
            assert_eq!(u32_at(rsdp, 20), 36);
            for (sig, at, b) in &t.tables[1..] {
                assert_eq!(&b[..4], sig.as_bytes());
                assert_eq!(u32_at(b, 4) as usize, b.len(), "{sig} length");
                assert_eq!(sum(b), 0, "{sig} checksum");
                assert_eq!(&b[10..16], &OEM_ID);
                assert_eq!(at % 16, 0);
            }
            // The RSDP points at the XSDT, which points at the FADT and
            // the MADT; the FADT points at the DSDT.
            let addr = |s: &str| t.tables.iter().find(|x| x.0 == s).unwrap().1;
            assert_eq!(u64_at(rsdp, 24), addr("XSDT"));
            let xsdt = t.get("XSDT").unwrap();
            assert_eq!(xsdt.len(), 36 + 16);
            assert_eq!(u64_at(xsdt, 36), addr("FACP"));
            assert_eq!(u64_at(xsdt, 44), addr("APIC"));
            let fadt = t.get("FACP").unwrap();
            assert_eq!(u64_at(fadt, 140), addr("DSDT"));
            assert_eq!(u64::from(u32_at(fadt, 40)), addr("DSDT"));
            // No overlaps, all below the end of the VMM's area.
            for w in t.tables.windows(2) {
                assert!(w[0].1 + w[0].2.len() as u64 <= w[1].1);
            }
            let last = t.tables.last().unwrap();
            assert!(last.1 + last.2.len() as u64 <= VMM_AREA_END);
        }
        let e = build(Machine { vcpus: 1, disks: 9 })
            .unwrap_err()
            .to_string();
        assert!(e.contains("at most 8"), "{e}");
        assert!(build(Machine { vcpus: 0, disks: 1 }).is_err());
    }

    #[test]
    fn written_where_the_rsdp_says() {
        let ram = crate::memory::create(64 << 20).unwrap();
        let at = write(&ram, Machine { vcpus: 2, disks: 3 }).unwrap();
        assert_eq!(at, ACPI_ADDR);
        let mut sig = [0u8; 8];
        ram.read_slice(&mut sig, GuestAddress(at)).unwrap();
        assert_eq!(&sig, b"RSD PTR ");
        let xsdt = ram.read_obj::<u64>(GuestAddress(at + 24)).unwrap();
        let mut h = [0u8; 4];
        ram.read_slice(&mut h, GuestAddress(xsdt)).unwrap();
        assert_eq!(&h, b"XSDT");
    }
}
