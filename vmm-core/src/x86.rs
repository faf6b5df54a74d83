//! The x86-64 state a vCPU starts in: descriptor tables, identity-mapped
//! page tables, and its registers. In payload mode it starts in 64-bit
//! mode at CPL3 (the ABI in the crate docs); a Linux kernel is entered
//! through the 64-bit boot protocol (boot.rst, "64-bit Boot Protocol"):
//! 64-bit mode at CPL0 on the same identity-mapped page tables, a GDT
//! with `__BOOT_CS` (0x10) and `__BOOT_DS` (0x18), 4 GiB flat, interrupts
//! off, RSI the zero page's address ([`Mode::Linux`]).
//!
//! This is the one mode whose guest code runs natively on kvm_pvm (no
//! VMX/SVM: guest kernel-mode code is emulated, and exceptions through a
//! guest IDT do not work): the vCPU is put straight into long mode with
//! KVM_SET_SREGS, its code and data segments at privilege level 3. With
//! IOPL 3 its `in`/`out` reach the VMM (KVM_EXIT_IO) and its loads and
//! stores outside RAM exit as MMIO.

use crate::layout::{
    BOOT_GDT_ADDR, GDT_ADDR, IDENTITY_MAPPED, PDPT_ADDR, PD_ADDR, PML4_ADDR, TSS_ADDR,
};
use crate::{Error, Result};
use kvm_bindings::{kvm_fpu, kvm_regs, kvm_segment, CpuId};
use kvm_ioctls::VcpuFd;
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

/// GDT selectors (index · 8); user selectors carry RPL 3. Entries 1 and 2
/// are kernel code and data, for completeness: nothing runs at CPL0.
const USER_DS: u16 = 0x18 | 3;
const USER_CS: u16 = 0x20 | 3;
const TSS_SEL: u16 = 0x28;

/// The GDT: null, kernel code and data (for completeness: nothing runs at
/// CPL0), user data, user 64-bit code, then the 16-byte TSS descriptor.
fn gdt() -> [u64; 7] {
    let tss_limit = u64::from(TSS_LIMIT);
    // A 64-bit available TSS (type 9), present, base TSS_ADDR (below 16 MiB:
    // fits base[23:0]).
    let tss_low = (tss_limit & 0xffff) | ((TSS_ADDR & 0xff_ffff) << 16) | (0x89 << 40);
    [
        0,
        0x0020_9a00_0000_0000, // kernel code: present, DPL0, 64-bit (L)
        0x00cf_9200_0000_ffff, // kernel data: present, DPL0, writable
        0x00cf_f200_0000_ffff, // user data: present, DPL3, writable
        0x0020_fa00_0000_0000, // user code: present, DPL3, 64-bit (L)
        tss_low,
        0, // TSS base[63:32]
    ]
}

/// The Linux boot protocol's selectors (boot.rst: `__BOOT_CS`,
/// `__BOOT_DS`), and the TSS's in the boot GDT.
pub const BOOT_CS: u16 = 0x10;
/// See [`BOOT_CS`].
pub const BOOT_DS: u16 = 0x18;
const BOOT_TSS_SEL: u16 = 0x20;

/// The boot GDT of a Linux kernel: two null entries, `__BOOT_CS` (64-bit
/// code, DPL0, 4 GiB flat with the granularity bit), `__BOOT_DS`
/// (writable data, DPL0, 4 GiB flat), then the TSS descriptor.
fn boot_gdt() -> [u64; 6] {
    let g = gdt();
    [
        0,
        0,
        0x00af_9a00_0000_ffff, // code: present, DPL0, execute/read, L, G
        0x00cf_9200_0000_ffff, // data: present, DPL0, read/write, D/B, G
        g[5],
        g[6],
    ]
}

/// Write the boot GDT of a Linux kernel at [`BOOT_GDT_ADDR`] (the page
/// tables and the TSS are [`write_tables`]').
///
/// # Errors
/// Guest memory too small.
pub fn write_boot_gdt(mem: &GuestMemoryMmap) -> Result<()> {
    for (i, d) in boot_gdt().iter().enumerate() {
        let at = BOOT_GDT_ADDR + 8 * i as u64;
        mem.write_obj(d.to_le(), GuestAddress(at))
            .map_err(|e| Error::Memory(format!("writing the boot GDT at {at:#x}: {e}")))?;
    }
    Ok(())
}

/// Where the TSS's I/O permission bitmap starts (right after the 104-byte
/// TSS), and the TSS limit: the bitmap (a bit per port, 0 = allowed) and
/// its terminating 0xff byte. On kvm_pvm the guest's RFLAGS.IOPL is not
/// what decides whether CPL3 may use `in`/`out`: the bitmap is, so it
/// allows every port.
const TSS_IOMAP: u16 = 0x68;
const TSS_LIMIT: u16 = TSS_IOMAP + 8192; // a bit for each of 65536 ports

/// Page-table entry bits: present, writable, user, and (in a directory)
/// a 2 MiB page.
const PTE_P: u64 = 1;
const PTE_RW: u64 = 1 << 1;
const PTE_US: u64 = 1 << 2;
const PTE_PS: u64 = 1 << 7;
const TABLE: u64 = PTE_P | PTE_RW | PTE_US;

/// CR0: protection, monitor coprocessor (SSE usable, no x87 emulation),
/// extension type, native FPU errors, write protect, paging.
const CR0: u64 = 1 | (1 << 1) | (1 << 4) | (1 << 5) | (1 << 16) | (1 << 31);
/// CR4: PAE, OSFXSR, OSXMMEXCPT.
const CR4: u64 = (1 << 5) | (1 << 9) | (1 << 10);
/// EFER: long mode enabled and active.
const EFER: u64 = (1 << 8) | (1 << 10);
/// RFLAGS: IOPL 3, the always-one bit 1, interrupts off.
pub const RFLAGS: u64 = 0x3002;

/// Write the GDT, the TSS and the page tables into guest memory.
///
/// # Errors
/// Guest memory too small to hold them (cannot happen above the minimum
/// RAM size).
pub fn write_tables(mem: &GuestMemoryMmap) -> Result<()> {
    let put = |what: &str, val: u64, at: u64| {
        mem.write_obj(val.to_le(), GuestAddress(at))
            .map_err(|e| Error::Memory(format!("writing the {what} at {at:#x}: {e}")))
    };
    for (i, d) in gdt().iter().enumerate() {
        put("GDT", *d, GDT_ADDR + 8 * i as u64)?;
    }
    // The TSS: all zero but the I/O map base, then a bitmap allowing
    // every port and its terminating all-ones byte.
    let mut tss = vec![0u8; usize::from(TSS_LIMIT) + 1];
    tss[0x66..0x68].copy_from_slice(&TSS_IOMAP.to_le_bytes());
    tss[usize::from(TSS_LIMIT)] = 0xff;
    mem.write_slice(&tss, GuestAddress(TSS_ADDR))
        .map_err(|e| Error::Memory(format!("writing the TSS: {e}")))?;
    put("PML4", PDPT_ADDR | TABLE, PML4_ADDR)?;
    let gib = IDENTITY_MAPPED >> 30;
    for g in 0..gib {
        let pd = PD_ADDR + g * 4096;
        put("page-directory pointer", pd | TABLE, PDPT_ADDR + 8 * g)?;
        for e in 0..512u64 {
            let phys = (g << 30) | (e << 21);
            put("page directory", phys | TABLE | PTE_PS, pd + 8 * e)?;
        }
    }
    Ok(())
}

fn segment(selector: u16, code: bool) -> kvm_segment {
    kvm_segment {
        base: 0,
        limit: 0xffff_ffff,
        selector,
        // Code: execute/read, accessed; data: read/write, accessed.
        type_: if code { 0xb } else { 0x3 },
        present: 1,
        dpl: (selector & 3) as u8,
        db: u8::from(!code),
        s: 1,
        l: u8::from(code),
        g: 1,
        avl: 0,
        unusable: 0,
        padding: 0,
    }
}

/// How a vCPU is entered.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Mode {
    /// Payload mode: CPL3 on the payload GDT, IOPL 3 (the crate docs).
    #[default]
    Payload,
    /// A Linux kernel: CPL0 on the boot GDT, RFLAGS 0x2 (interrupts off).
    Linux,
}

/// Where a vCPU starts: the payload ABI's registers, or a kernel's.
#[derive(Debug, Clone, Copy, Default)]
pub struct Entry {
    /// How it is entered.
    pub mode: Mode,
    /// RIP.
    pub rip: u64,
    /// RSP.
    pub rsp: u64,
    /// RDI: guest RAM size in bytes (payload mode).
    pub rdi: u64,
    /// RSI: number of virtio-blk devices (payload mode), the zero page's
    /// address (Linux).
    pub rsi: u64,
    /// RDX: this vCPU's index.
    pub rdx: u64,
    /// RCX: the number of vCPUs.
    pub rcx: u64,
}

/// Give the vCPU the host's CPUID as KVM supports it (with its own APIC
/// id), then, if it has an `entry`, 64-bit mode on the VMM's tables (CPL3
/// for a payload, CPL0 for a kernel), a clean FPU/SSE state and the entry
/// registers. A vCPU without one (a Linux guest's application processor)
/// stays in KVM's reset state, waiting for the INIT and start-up IPIs its
/// kernel sends.
///
/// # Errors
/// A KVM ioctl fails.
pub fn setup_vcpu(vcpu: &VcpuFd, cpuid: &CpuId, index: u8, entry: Option<&Entry>) -> Result<()> {
    let kvm = |what: &'static str| move |e| Error::Kvm { what, source: e };
    let mut cpuid = cpuid.clone();
    for e in cpuid.as_mut_slice() {
        match e.function {
            // Initial APIC id in EBX[31:24].
            1 => e.ebx = (e.ebx & 0x00ff_ffff) | (u32::from(index) << 24),
            // x2APIC id of the extended topology leaves.
            0xb | 0x1f => e.edx = u32::from(index),
            _ => {}
        }
    }
    vcpu.set_cpuid2(&cpuid).map_err(kvm("KVM_SET_CPUID2"))?;
    let Some(entry) = entry else {
        return Ok(());
    };
    let linux = entry.mode == Mode::Linux;

    let mut sregs = vcpu.get_sregs().map_err(kvm("KVM_GET_SREGS"))?;
    let (cs, ds, tss) = if linux {
        (BOOT_CS, BOOT_DS, BOOT_TSS_SEL)
    } else {
        (USER_CS, USER_DS, TSS_SEL)
    };
    sregs.cs = segment(cs, true);
    let data = segment(ds, false);
    sregs.ds = data;
    sregs.es = data;
    sregs.fs = data;
    sregs.gs = data;
    sregs.ss = data;
    sregs.tr = kvm_segment {
        base: TSS_ADDR,
        limit: u32::from(TSS_LIMIT),
        selector: tss,
        type_: 0xb, // 64-bit TSS, busy
        present: 1,
        dpl: 0,
        db: 0,
        s: 0,
        l: 0,
        g: 0,
        avl: 0,
        unusable: 0,
        padding: 0,
    };
    sregs.ldt = kvm_segment {
        type_: 2,
        unusable: 1,
        ..Default::default()
    };
    let (base, entries) = if linux {
        (BOOT_GDT_ADDR, boot_gdt().len())
    } else {
        (GDT_ADDR, gdt().len())
    };
    sregs.gdt.base = base;
    sregs.gdt.limit = u16::try_from(entries * 8 - 1).expect("a GDT of a few entries");
    // No IDT: in payload mode an exception ends the run (triple fault or
    // KVM internal error), reported as a guest fault; a kernel loads its
    // own before it enables interrupts.
    sregs.idt.base = 0;
    sregs.idt.limit = 0;
    sregs.cr0 = CR0;
    sregs.cr3 = PML4_ADDR;
    sregs.cr4 = CR4;
    sregs.efer = EFER;
    vcpu.set_sregs(&sregs).map_err(kvm("KVM_SET_SREGS"))?;

    let fpu = kvm_fpu {
        fcw: 0x37f,
        mxcsr: 0x1f80,
        ..Default::default()
    };
    vcpu.set_fpu(&fpu).map_err(kvm("KVM_SET_FPU"))?;

    let regs = kvm_regs {
        rip: entry.rip,
        rsp: entry.rsp,
        rbp: entry.rsp,
        rflags: if linux { 0x2 } else { RFLAGS },
        rdi: entry.rdi,
        rsi: entry.rsi,
        rdx: entry.rdx,
        rcx: entry.rcx,
        ..Default::default()
    };
    vcpu.set_regs(&regs).map_err(kvm("KVM_SET_REGS"))?;
    Ok(())
}

/// Set up a local APIC as a PC's firmware leaves it (Intel SDM vol. 3
/// §10.5.1, the MP specification's virtual wire mode, §3.6.2.2): the
/// boot processor's LINT0 takes the 8259's interrupts (ExtINT), an
/// application processor's is masked; LINT1 is NMI on every one. Only
/// with an in-kernel irqchip.
///
/// # Errors
/// A KVM ioctl fails.
pub fn setup_lapic(vcpu: &VcpuFd, boot_processor: bool) -> Result<()> {
    const LVT_LINT0: usize = 0x350;
    const LVT_LINT1: usize = 0x360;
    const EXTINT: u32 = 0b111 << 8;
    const NMI: u32 = 0b100 << 8;
    const MASKED: u32 = 1 << 16;
    let lint0 = if boot_processor { EXTINT } else { MASKED };
    let kvm = |what: &'static str| move |e| Error::Kvm { what, source: e };
    let mut lapic = vcpu.get_lapic().map_err(kvm("KVM_GET_LAPIC"))?;
    for (reg, mode) in [(LVT_LINT0, lint0), (LVT_LINT1, NMI)] {
        let r = &mut lapic.regs[reg..reg + 4];
        let mut b = [0u8; 4];
        for (d, s) in b.iter_mut().zip(r.iter()) {
            *d = s.to_ne_bytes()[0];
        }
        // Delivery mode in bits 8-10, the mask in bit 16.
        let v = (u32::from_le_bytes(b) & !0x1_0700) | mode;
        for (d, s) in r.iter_mut().zip(v.to_le_bytes()) {
            *d = std::ffi::c_char::from_ne_bytes([s]);
        }
    }
    vcpu.set_lapic(&lapic).map_err(kvm("KVM_SET_LAPIC"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn descriptors_encode_what_the_abi_says() {
        let g = gdt();
        // User code: DPL 3 (bits 45-46), present (47), L (53), not D (54).
        assert_eq!((g[4] >> 45) & 3, 3);
        assert_eq!((g[4] >> 47) & 1, 1);
        assert_eq!((g[4] >> 53) & 3, 1);
        // User data: DPL 3, writable data (type 2 in bits 40-43), present.
        assert_eq!((g[3] >> 45) & 3, 3);
        assert_eq!((g[3] >> 40) & 0xf, 2);
        assert_eq!(usize::from(USER_CS) >> 3, 4);
        assert_eq!(usize::from(USER_DS) >> 3, 3);
        // TSS base and type.
        assert_eq!((g[5] >> 16) & 0xff_ffff, TSS_ADDR);
        assert_eq!((g[5] >> 40) & 0xf, 9);
        // The boot GDT: __BOOT_CS is 64-bit code at DPL0, __BOOT_DS
        // writable data at DPL0, both present and 4 GiB flat (G, limit
        // 0xfffff).
        let b = boot_gdt();
        let cs = b[usize::from(BOOT_CS) >> 3];
        let ds = b[usize::from(BOOT_DS) >> 3];
        assert_eq!((cs >> 45) & 3, 0);
        assert_eq!((cs >> 47) & 1, 1);
        assert_eq!((cs >> 53) & 1, 1, "L");
        assert_eq!((cs >> 43) & 1, 1, "code");
        assert_eq!((ds >> 45) & 3, 0);
        assert_eq!((ds >> 40) & 0xf, 2, "read/write data");
        for d in [cs, ds] {
            assert_eq!((d & 0xffff) | ((d >> 32) & 0xf_0000), 0xf_ffff);
            assert_eq!((d >> 55) & 1, 1, "G");
        }
        assert_eq!(b[4], g[5], "the TSS");
    }

    #[test]
    fn page_tables_identity_map_4_gib_for_user_mode() {
        let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 4 << 20)]).unwrap();
        write_tables(&mem).unwrap();
        let rd = |a: u64| u64::from_le(mem.read_obj::<u64>(GuestAddress(a)).unwrap());
        // Walk a few addresses, checking P, RW, US at every level.
        for va in [0u64, 0x20_0000, 0xd000_0000, 0xffff_f000, 0x1234_5678] {
            let e4 = rd(PML4_ADDR + 8 * ((va >> 39) & 511));
            assert_eq!(e4 & 7, 7);
            let e3 = rd((e4 & !0xfff) + 8 * ((va >> 30) & 511));
            assert_eq!(e3 & 7, 7);
            let e2 = rd((e3 & !0xfff) + 8 * ((va >> 21) & 511));
            assert_eq!(e2 & 0x87, 0x87);
            assert_eq!((e2 & !0x1f_ffff & ((1 << 52) - 1)) | (va & 0x1f_ffff), va);
        }
    }
}
