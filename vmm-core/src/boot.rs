//! What the vCPUs start: a payload (the ABI in the crate docs), or a Linux
//! kernel ([`crate::linux`]).

use crate::layout::{stack_top, PAYLOAD_ADDR};
use crate::memory::{ram_size, Ram};
use crate::x86::{Entry, Mode};
use crate::{Error, Result};
use std::path::PathBuf;
use vm_memory::{Bytes, GuestAddress};

/// What to boot.
#[derive(Debug, Clone)]
pub enum Boot {
    /// A flat binary loaded at 0x200000 and entered at CPL3 (payload mode).
    Payload(Vec<u8>),
    /// A Linux kernel (bzImage or ELF vmlinux), an initrd and a command
    /// line ([`crate::linux`]; on a host whose KVM is kvm_pvm, without
    /// VMX or SVM, a stock kernel is too slow to boot).
    Linux {
        /// The kernel file.
        kernel: PathBuf,
        /// The initrd file.
        initrd: Option<PathBuf>,
        /// The kernel command line.
        cmdline: String,
    },
    /// Continue a VM checkpoint ([`crate::snapshot`]): memory, vCPUs,
    /// devices and (Linux) interrupt controllers as they were; nothing is
    /// loaded.
    Restore(std::sync::Arc<crate::snapshot::Checkpoint>),
}

/// Load what `boot` names into guest memory and say where the vCPUs
/// start: an entry for each of the `vcpus` vCPUs in payload mode, for
/// vCPU 0 only for a Linux kernel (the others wait for its start-up
/// IPIs); `disks` is the number of virtio-blk devices.
///
/// # Errors
/// A payload too large for RAM; a kernel, an initrd or a command line
/// that cannot be loaded (the message names the file).
pub fn boot(boot: &Boot, ram: &Ram, vcpus: usize, disks: usize) -> Result<Vec<Entry>> {
    match boot {
        Boot::Payload(bytes) => {
            let size = ram_size(ram);
            let room = size - PAYLOAD_ADDR;
            if bytes.len() as u64 > room {
                return Err(Error::Config(format!(
                    "the payload is {} bytes, too big for guest memory: it is loaded at {PAYLOAD_ADDR:#x} \
                     and {} MiB of RAM leave room for {room} bytes (give more with --mem)",
                    bytes.len(),
                    size >> 20
                )));
            }
            ram.write_slice(bytes, GuestAddress(PAYLOAD_ADDR))
                .map_err(|e| Error::Memory(format!("loading the payload: {e}")))?;
            Ok((0..vcpus)
                .map(|i| Entry {
                    mode: Mode::Payload,
                    rip: PAYLOAD_ADDR,
                    rsp: stack_top(i, vcpus),
                    rdi: size,
                    rsi: disks as u64,
                    rdx: i as u64,
                    rcx: vcpus as u64,
                })
                .collect())
        }
        Boot::Linux {
            kernel,
            initrd,
            cmdline,
        } => {
            let loaded = crate::linux::load(
                ram,
                kernel,
                initrd.as_deref(),
                cmdline,
                crate::acpi::Machine { vcpus, disks },
            )?;
            // Only the boot vCPU has an entry: the others wait for the
            // kernel's start-up IPIs.
            Ok(vec![loaded.entry])
        }
        // The vCPUs' state comes from the checkpoint.
        Boot::Restore(_) => Ok(Vec::new()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::memory;

    #[test]
    fn payload_placement_and_registers() {
        let ram = memory::create(64 << 20).unwrap();
        let e = boot(&Boot::Payload(vec![0xf4; 100]), &ram, 2, 3).unwrap();
        assert_eq!(e.len(), 2);
        assert_eq!(
            (e[0].rip, e[0].rsp, e[0].rdi, e[0].rsi, e[0].rdx),
            (0x200000, 0x1ffff0, 64 << 20, 3, 0)
        );
        assert_eq!((e[1].rsp, e[1].rdx, e[1].rcx), (0x17fff0, 1, 2));
        assert_eq!(ram.read_obj::<u8>(GuestAddress(0x200063)).unwrap(), 0xf4);
        // Exactly fills RAM; one byte more does not.
        assert!(boot(&Boot::Payload(vec![0; (62 << 20) as usize]), &ram, 1, 0).is_ok());
        let e = boot(&Boot::Payload(vec![0; (62 << 20) + 1]), &ram, 1, 0)
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("too big for guest memory") && e.contains("--mem"),
            "{e}"
        );
    }

    #[test]
    fn kernel_errors_name_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let ram = memory::create(64 << 20).unwrap();
        let linux = |p: &std::path::Path| Boot::Linux {
            kernel: p.to_path_buf(),
            initrd: None,
            cmdline: String::new(),
        };
        let missing = dir.path().join("nope");
        let e = boot(&linux(&missing), &ram, 1, 0).unwrap_err().to_string();
        assert!(
            e.contains("cannot open the kernel") && e.contains("nope"),
            "{e}"
        );
        let junk = dir.path().join("junk");
        std::fs::write(&junk, b"hello").unwrap();
        let e = boot(&linux(&junk), &ram, 1, 0).unwrap_err().to_string();
        assert!(
            e.contains("not a Linux kernel") && e.contains("junk"),
            "{e}"
        );
        // "HdrS" but an old protocol: no 64-bit entry point.
        let mut bz = vec![0u8; 0x1000];
        bz[0x1f1] = 4;
        bz[0x202..0x206].copy_from_slice(b"HdrS");
        bz[0x206..0x208].copy_from_slice(&0x0204u16.to_le_bytes());
        bz[0x211] = 1;
        let k = dir.path().join("oldImage");
        std::fs::write(&k, &bz).unwrap();
        let e = boot(&linux(&k), &ram, 1, 0).unwrap_err().to_string();
        assert!(
            e.contains("oldImage") && e.contains("no 64-bit entry point"),
            "{e}"
        );
        // A 32-bit ELF file.
        let mut elf = vec![0u8; 64];
        elf[..4].copy_from_slice(b"\x7fELF");
        elf[4] = 1;
        elf[18] = 3;
        let k = dir.path().join("elf32");
        std::fs::write(&k, &elf).unwrap();
        let e = boot(&linux(&k), &ram, 1, 0).unwrap_err().to_string();
        assert!(e.contains("elf32") && e.contains("not a 64-bit x86"), "{e}");
    }
}
