//! What the vCPUs start: a payload (the ABI in the crate docs), or — not
//! yet — a Linux kernel.

use crate::layout::{stack_top, PAYLOAD_ADDR};
use crate::memory::{ram_size, Ram};
use crate::x86::Entry;
use crate::{Error, Result};
use std::path::PathBuf;
use vm_memory::{Bytes, GuestAddress};

/// What to boot.
#[derive(Debug, Clone)]
pub enum Boot {
    /// A flat binary loaded at 0x200000 and entered at CPL3 (payload mode).
    Payload(Vec<u8>),
    /// A Linux kernel (bzImage or ELF vmlinux), an initrd and a command
    /// line: the boot path of issue 14 item 3, not implemented yet (and a
    /// stock kernel cannot run on a host whose KVM is kvm_pvm).
    Linux {
        /// The kernel file.
        kernel: PathBuf,
        /// The initrd file.
        initrd: Option<PathBuf>,
        /// The kernel command line.
        cmdline: String,
    },
}

/// Load what `boot` names into guest memory and say where each of the
/// `vcpus` vCPUs starts; `disks` is the number of virtio-blk devices.
///
/// # Errors
/// A payload too large for RAM; a kernel that cannot be read or loaded.
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
                    rip: PAYLOAD_ADDR,
                    rsp: stack_top(i, vcpus),
                    rdi: size,
                    rsi: disks as u64,
                    rdx: i as u64,
                    rcx: vcpus as u64,
                })
                .collect())
        }
        Boot::Linux { kernel, .. } => {
            let what = kernel_kind(kernel)?;
            Err(Error::Unsupported(format!(
                "{}: {what}, but booting a Linux kernel is not implemented yet; on a host whose \
                 KVM is kvm_pvm (no VMX/SVM) a stock kernel cannot run at all. Use --payload",
                kernel.display()
            )))
        }
    }
}

/// What kind of kernel file `path` is.
fn kernel_kind(path: &std::path::Path) -> Result<&'static str> {
    use std::io::Read;
    let mut head = [0u8; 0x206];
    let mut f = std::fs::File::open(path)
        .map_err(|e| Error::io(format!("cannot open the kernel {}", path.display()), e))?;
    let mut n = 0;
    while n < head.len() {
        match f.read(&mut head[n..]) {
            Ok(0) => break,
            Ok(k) => n += k,
            Err(e) => {
                return Err(Error::io(
                    format!("cannot read the kernel {}", path.display()),
                    e,
                ))
            }
        }
    }
    if n >= 4 && &head[..4] == b"\x7fELF" {
        return Ok("an ELF kernel");
    }
    // The bzImage setup header's "HdrS" at 0x202 (Linux boot protocol).
    if n >= 0x206 && &head[0x202..0x206] == b"HdrS" {
        return Ok("a bzImage kernel");
    }
    Err(Error::Config(format!(
        "{}: not a Linux kernel that can be loaded (neither an ELF file nor a bzImage with the \
         \"HdrS\" setup header at 0x202)",
        path.display()
    )))
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
    fn kernels_are_recognised_then_refused() {
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
        assert!(e.contains("not a Linux kernel"), "{e}");
        let mut bz = vec![0u8; 0x300];
        bz[0x202..0x206].copy_from_slice(b"HdrS");
        let k = dir.path().join("bzImage");
        std::fs::write(&k, &bz).unwrap();
        let e = boot(&linux(&k), &ram, 1, 0).unwrap_err();
        assert!(matches!(e, Error::Unsupported(_)));
        assert!(e.to_string().contains("a bzImage kernel"), "{e}");
    }
}
