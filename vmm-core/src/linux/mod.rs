//! The Linux boot path: a kernel (a bzImage, or an ELF vmlinux) loaded
//! with linux-loader, its command line ([`cmdline`]), an initrd, the ACPI
//! tables ([`crate::acpi`]) and the zero page ([`params`]), and the boot
//! vCPU entered through the 64-bit boot protocol (Documentation/arch/x86/
//! boot.rst, "64-bit Boot Protocol").
//!
//! Guest memory, for a Linux boot:
//!
//! | range                | what                                          |
//! |----------------------|-----------------------------------------------|
//! | 0x1000-0xffff        | GDTs, TSS, boot GDT, zero page, boot stack, page tables (e820 reserved) |
//! | 0x20000-0x2ffff      | the command line (e820 RAM: the kernel copies it early) |
//! | 0xe0000-0xfffff      | the ACPI tables (e820 reserved)               |
//! | 0x100000-            | a bzImage's protected-mode kernel (an ELF kernel where its program headers say) |
//! | top of RAM, downward | the initrd, page aligned, below the kernel's `initrd_addr_max` |
//!
//! A bzImage is entered at its 64-bit entry point, 0x200 past where its
//! protected-mode code is loaded (boot.rst: the kernel must have
//! XLF_KERNEL_64 in `xloadflags`, protocol 2.12); an ELF kernel at its
//! ELF entry point (a vmlinux's is the physical address of
//! `startup_64`). Either way in 64-bit mode at CPL0 with RSI the zero
//! page's address and interrupts off ([`crate::x86::Mode::Linux`]).
//!
//! Every error names the file: a kernel missing, not a kernel, too big for
//! guest memory or without a 64-bit entry point; an initrd missing or too
//! big; a command line too long for the kernel.

pub mod cmdline;
pub mod params;

use crate::acpi;
use crate::layout::{BOOT_PARAMS_ADDR, BOOT_STACK_LINUX, CMDLINE_ADDR, KERNEL_ADDR};
use crate::memory::{ram_size, Ram};
use crate::x86::{self, Entry, Mode};
use crate::{Error, Result};
use linux_loader::loader::{BzImage, Elf, KernelLoader};
use std::fs::File;
use std::io::Read;
use std::path::Path;
use vm_memory::{Bytes, GuestAddress};

/// The kinds of kernel file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// A bzImage (the "HdrS" setup header at 0x202).
    BzImage,
    /// A 64-bit x86 ELF file (a vmlinux).
    Elf,
}

/// `xloadflags` bit 0 (boot.rst): the kernel has the 64-bit entry point at
/// 0x200.
pub const XLF_KERNEL_64: u16 = 1;
/// Where the 64-bit entry point is, past the protected-mode code's start.
pub const ENTRY_64_OFFSET: u64 = 0x200;
/// An initrd is placed at a multiple of this (a page: boot.rst asks only
/// that it not cross the kernel's limit; the kernel frees it by pages).
pub const INITRD_ALIGN: u64 = 4096;

/// What kind of kernel `path` is.
///
/// # Errors
/// The file cannot be read, or is neither a bzImage nor a 64-bit x86 ELF
/// file.
pub fn kernel_kind(path: &Path) -> Result<Kind> {
    let mut head = [0u8; 0x206];
    let mut f = File::open(path)
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
    // ELF: the magic, ELFCLASS64 (EI_CLASS = 2), and e_machine 62
    // (EM_X86_64) at offset 18 (System V ABI, "ELF Header").
    if n >= 20 && &head[..4] == b"\x7fELF" {
        if head[4] == 2 && head[18..20] == [62, 0] {
            return Ok(Kind::Elf);
        }
        return Err(Error::Config(format!(
            "{}: an ELF file, but not a 64-bit x86 one (class {}, machine {}): not a kernel \
             this VMM can boot",
            path.display(),
            head[4],
            u16::from_le_bytes([head[18], head[19]])
        )));
    }
    // The bzImage setup header's "HdrS" at 0x202 (boot.rst).
    if n >= 0x206 && head[0x202..0x206] == params::HDRS.to_le_bytes() {
        return Ok(Kind::BzImage);
    }
    Err(Error::Config(format!(
        "{}: not a Linux kernel that can be loaded (neither an ELF file nor a bzImage with the \
         \"HdrS\" setup header at 0x202)",
        path.display()
    )))
}

/// What a Linux boot put where.
#[derive(Debug, Clone)]
pub struct Loaded {
    /// The kind of kernel.
    pub kind: Kind,
    /// The boot vCPU's entry.
    pub entry: Entry,
    /// The memory the kernel needs: [start, end).
    pub kernel: (u64, u64),
    /// The initrd: [start, end).
    pub initrd: Option<(u64, u64)>,
    /// The command line, NUL included.
    pub cmdline: Vec<u8>,
}

/// Load `kernel`, `initrd` and the command line `cmdline` into `ram`, with
/// ACPI tables describing `machine`, and the zero page; where vCPU 0
/// starts.
///
/// # Errors
/// See the module docs: each error names its file.
pub fn load(
    ram: &Ram,
    kernel: &Path,
    initrd: Option<&Path>,
    cmdline: &str,
    machine: acpi::Machine,
) -> Result<Loaded> {
    let kind = kernel_kind(kernel)?;
    let name = kernel.display();
    let size = ram_size(ram);
    let mut f =
        File::open(kernel).map_err(|e| Error::io(format!("cannot open the kernel {name}"), e))?;
    let len = f
        .metadata()
        .map_err(|e| Error::io(format!("cannot read the kernel {name}"), e))?
        .len();
    let room = size - KERNEL_ADDR;
    if len > room {
        return Err(Error::Config(format!(
            "the kernel {name} is {len} bytes, too big for {} MiB of guest memory (it is loaded \
             at {KERNEL_ADDR:#x}: room for {room} bytes; give more with --mem)",
            size >> 20
        )));
    }
    let (entry, kernel_range, cmdline_cap, initrd_max, header) = match kind {
        Kind::BzImage => {
            let r = BzImage::load(ram, Some(GuestAddress(KERNEL_ADDR)), &mut f, None)
                .map_err(|e| Error::Config(format!("{name}: cannot load the bzImage: {e}")))?;
            let hdr = r.setup_header.ok_or_else(|| {
                Error::Config(format!("{name}: cannot load the bzImage: no setup header"))
            })?;
            let version = hdr.version;
            let xloadflags = hdr.xloadflags;
            if version < 0x020c || xloadflags & XLF_KERNEL_64 == 0 {
                return Err(Error::Config(format!(
                    "{name}: boot protocol {}.{:02}, xloadflags {xloadflags:#x}: this kernel has no \
                     64-bit entry point (protocol 2.12 or later with XLF_KERNEL_64 is needed)",
                    version >> 8,
                    version & 0xff
                )));
            }
            // The kernel decompresses itself at its preferred address
            // (LOAD_PHYSICAL_ADDR) when loaded below it, and needs
            // init_size bytes from there (boot.rst: `init_size`).
            let pref = hdr.pref_address;
            let end = r.kernel_end.max(pref + u64::from(hdr.init_size));
            let cap = u64::from(hdr.cmdline_size) + 1;
            (
                KERNEL_ADDR + ENTRY_64_OFFSET,
                (KERNEL_ADDR, end),
                cap,
                u64::from(hdr.initrd_addr_max),
                Some(hdr),
            )
        }
        Kind::Elf => {
            let r = Elf::load(ram, None, &mut f, Some(GuestAddress(KERNEL_ADDR))).map_err(|e| {
                Error::Config(format!(
                    "{name}: cannot load the ELF kernel: {e} (its entry point must be at or \
                     above {KERNEL_ADDR:#x} and its segments inside the {} MiB of guest memory)",
                    size >> 20
                ))
            })?;
            let entry = r.kernel_load.0;
            (
                entry,
                (entry, r.kernel_end),
                cmdline::ELF_CMDLINE_SIZE,
                u64::from(u32::MAX),
                None,
            )
        }
    };
    if kernel_range.1 > size {
        return Err(Error::Config(format!(
            "the kernel {name} needs guest memory up to {:#x} ({}), but there are {} MiB; give \
             more with --mem",
            kernel_range.1,
            match kind {
                Kind::BzImage => "its init_size from its preferred address",
                Kind::Elf => "the end of its last segment in memory",
            },
            size >> 20
        )));
    }
    let line =
        cmdline::build(cmdline, cmdline_cap).map_err(|m| Error::Config(format!("{name}: {m}")))?;
    ram.write_slice(&line, GuestAddress(CMDLINE_ADDR))
        .map_err(|e| Error::Memory(format!("writing the command line: {e}")))?;
    let initrd_range = match initrd {
        Some(p) => Some(load_initrd(ram, p, kernel_range.1, initrd_max)?),
        None => None,
    };
    let rsdp = acpi::write(ram, machine)?;
    x86::write_boot_gdt(ram)?;
    let zero_page = params::build(&params::Params {
        header,
        ram: size,
        cmdline_addr: CMDLINE_ADDR,
        cmdline_len: u32::try_from(line.len() - 1).unwrap_or(0),
        initrd: initrd_range.map(|(a, e)| (a, u32::try_from(e - a).unwrap_or(0))),
        rsdp,
    });
    ram.write_obj(zero_page, GuestAddress(BOOT_PARAMS_ADDR))
        .map_err(|e| Error::Memory(format!("writing the zero page: {e}")))?;
    Ok(Loaded {
        kind,
        entry: Entry {
            mode: Mode::Linux,
            rip: entry,
            rsp: BOOT_STACK_LINUX,
            rsi: BOOT_PARAMS_ADDR,
            ..Entry::default()
        },
        kernel: kernel_range,
        initrd: initrd_range,
        cmdline: line,
    })
}

/// Read the initrd `path` into the top of RAM, below `max` (the kernel's
/// `initrd_addr_max`, the highest address it may occupy) and above
/// `kernel_end`; where it went.
fn load_initrd(ram: &Ram, path: &Path, kernel_end: u64, max: u64) -> Result<(u64, u64)> {
    let name = path.display();
    let mut f =
        File::open(path).map_err(|e| Error::io(format!("cannot open the initrd {name}"), e))?;
    let len = f
        .metadata()
        .map_err(|e| Error::io(format!("cannot read the initrd {name}"), e))?
        .len();
    let limit = ram_size(ram).min(max.saturating_add(1));
    let start = limit.checked_sub(len).map(|s| s & !(INITRD_ALIGN - 1));
    let start = match start {
        Some(s) if s >= kernel_end && u32::try_from(len).is_ok() => s,
        _ => {
            return Err(Error::Config(format!(
                "the initrd {name} is {len} bytes, too big: it must fit between the end of the \
                 kernel ({kernel_end:#x}) and {limit:#x}, {} bytes; give more with --mem",
                limit.saturating_sub(kernel_end)
            )))
        }
    };
    let n =
        usize::try_from(len).map_err(|_| Error::Config(format!("the initrd {name} is too big")))?;
    ram.read_exact_volatile_from(GuestAddress(start), &mut f, n)
        .map_err(|e| Error::Memory(format!("reading the initrd {name} into guest memory: {e}")))?;
    Ok((start, start + len))
}
