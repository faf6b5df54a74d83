//! The Linux boot path: the ACPI tables disassembled by `iasl -d` (Debian
//! acpica-tools); a machine built for a Linux boot from small fake kernels
//! (the load errors, and the in-kernel irqchip, PIT and irqfds set up on
//! this host); and a real boot of the host's Debian kernel with a busybox
//! initramfs that writes a pattern to /dev/vda, reads it back and powers
//! off, where the host can run a kernel (VMX or SVM).

use std::path::Path;
use std::process::Command;
use vmm_core::acpi::{self, Machine};

/// Disassemble `bytes` (a table called `name`) with `iasl -d` in `dir`;
/// the listing, after checking the disassembly was clean.
fn iasl(dir: &Path, name: &str, bytes: &[u8]) -> String {
    let bin = dir.join(format!("{name}.dat"));
    std::fs::write(&bin, bytes).unwrap();
    let out = Command::new("iasl")
        .arg("-d")
        .arg(&bin)
        .current_dir(dir)
        .output()
        .unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "iasl -d {name}: {text}");
    for bad in ["Error", "Warning", "Incorrect", "Invalid"] {
        assert!(!text.contains(bad), "iasl -d {name} says {bad}: {text}");
    }
    let dsl = std::fs::read_to_string(dir.join(format!("{name}.dsl")))
        .unwrap_or_else(|e| panic!("iasl -d {name} wrote no listing ({e}): {text}"));
    for bad in ["**** ", "Unknown", "Invalid"] {
        assert!(!dsl.contains(bad), "{name}.dsl has {bad:?}:\n{dsl}");
    }
    dsl
}

#[test]
fn acpi_tables_disassemble_cleanly() {
    if Command::new("iasl").arg("-v").output().is_err() {
        eprintln!("skipped: iasl is not installed (Debian package acpica-tools)");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let t = acpi::build(Machine { vcpus: 2, disks: 3 }).unwrap();
    let dsdt = iasl(dir.path(), "dsdt", t.get("DSDT").unwrap());
    assert!(dsdt.contains("EisaId (\"PNP0501\")"), "{dsdt}");
    assert_eq!(dsdt.matches("\"LNRO0005\"").count(), 3, "{dsdt}");
    for (i, base) in ["0xD0000000", "0xD0001000", "0xD0002000"]
        .iter()
        .enumerate()
    {
        assert!(dsdt.contains(&format!("Device (VR0{i})")), "{dsdt}");
        assert!(dsdt.contains(base), "{base}: {dsdt}");
    }
    assert!(dsdt.contains("0x00001000"), "{dsdt}");
    assert!(dsdt.contains("IO (Decode16,"), "{dsdt}");
    assert!(dsdt.contains("0x03F8"), "{dsdt}");
    for gsi in ["0x00000004", "0x00000010", "0x00000011", "0x00000012"] {
        assert!(dsdt.contains(gsi), "{gsi}: {dsdt}");
    }
    assert!(dsdt.contains("_S5_"), "{dsdt}");
    let madt = iasl(dir.path(), "apic", t.get("APIC").unwrap());
    assert_eq!(madt.matches("Processor Local APIC").count(), 2, "{madt}");
    assert!(madt.contains("FEC00000"), "{madt}");
    let fadt = iasl(dir.path(), "facp", t.get("FACP").unwrap());
    assert!(fadt.contains("Hardware Reduced (V5) : 1"), "{fadt}");
    assert!(fadt.contains("0000000000000600"), "{fadt}");
    let xsdt = iasl(dir.path(), "xsdt", t.get("XSDT").unwrap());
    assert_eq!(xsdt.matches("ACPI Table Address").count(), 2, "{xsdt}");
    // The RSDP is no table with a header: iasl 20200925 refuses it alone
    // ("does not contain a valid ACPI table"); its checksums and links
    // are checked by the unit tests of vmm_core::acpi.
}
