//! The guest-physical layout: the fixed numbers of payload mode's ABI (see
//! the crate docs), and where the Linux boot path puts what a kernel reads
//! (all inside the VMM's area [0, 0x100000), which payload mode leaves to
//! the VMM too).

/// The Global Descriptor Table the VMM builds.
pub const GDT_ADDR: u64 = 0x1000;
/// The 64-bit Task State Segment the task register points to, with its
/// I/O permission bitmap (to 0x4069).
pub const TSS_ADDR: u64 = 0x2000;
/// The page-map level-4 table (CR3).
pub const PML4_ADDR: u64 = 0x9000;
/// The page-directory-pointer table: 4 entries, one per GiB.
pub const PDPT_ADDR: u64 = 0xa000;
/// Four page directories of 2 MiB pages, one per GiB, from here.
pub const PD_ADDR: u64 = 0xb000;
/// End of the VMM's own structures; the payload's stacks start here.
pub const VMM_AREA_END: u64 = 0x10_0000;
/// End of the stack area ([`VMM_AREA_END`], this): where the payload starts.
pub const PAYLOAD_ADDR: u64 = 0x20_0000;
/// The boot vCPU's initial stack pointer.
pub const BOOT_STACK: u64 = PAYLOAD_ADDR - 16;
/// How much of the first 4 GiB the page tables identity-map (all of it).
pub const IDENTITY_MAPPED: u64 = 4 << 30;

/// The first virtio-mmio device's registers; device `i` is at
/// `VIRTIO_MMIO_BASE + i * VIRTIO_MMIO_SIZE`.
pub const VIRTIO_MMIO_BASE: u64 = 0xd000_0000;
/// The size of one virtio-mmio device's register window.
pub const VIRTIO_MMIO_SIZE: u64 = 0x1000;
/// At most this many virtio-blk devices (their windows end below 0xd0100000).
pub const MAX_DISKS: usize = 256;

/// Guest RAM: at least this much.
pub const MIN_RAM: u64 = 64 << 20;
/// Guest RAM: at most this much, so that it stays below the virtio-mmio
/// windows at [`VIRTIO_MMIO_BASE`].
pub const MAX_RAM: u64 = 3 << 30;
/// Guest RAM by default.
pub const DEFAULT_RAM: u64 = 256 << 20;

/// An `out` of a 32-bit value V to this port ends the run with status V.
pub const EXIT_PORT: u16 = 0xf4;
/// An `out` of any value to this port parks the vCPU that does it: it runs
/// no more guest code until the run ends.
pub const PARK_PORT: u16 = 0xf5;
/// The 8250 UART's first port (COM1); it has 8.
pub const SERIAL_PORT: u16 = 0x3f8;

/// At most this many vCPUs (each gets a stack slice of at least 64 KiB).
pub const MAX_VCPUS: usize = 16;

/// The initial stack pointer of vCPU `index` of `count`: the stack area
/// [0x100000, 0x200000) is cut into `count` equal slices, vCPU 0 gets the
/// top one.
pub fn stack_top(index: usize, count: usize) -> u64 {
    let slice = (PAYLOAD_ADDR - VMM_AREA_END) / count.max(1) as u64;
    PAYLOAD_ADDR - index as u64 * slice - 16
}

/// Linux boot: the boot GDT (null, null, `__BOOT_CS` 0x10, `__BOOT_DS`
/// 0x18, the TSS at 0x20), between the TSS and the page tables.
pub const BOOT_GDT_ADDR: u64 = 0x5000;
/// Linux boot: the zero page (`struct boot_params`, 4 KiB).
pub const BOOT_PARAMS_ADDR: u64 = 0x7000;
/// Linux boot: the boot vCPU's stack pointer at entry (the 4 KiB below
/// the page tables; the kernel switches to its own stack at once).
pub const BOOT_STACK_LINUX: u64 = PML4_ADDR - 16;
/// Linux boot: what the e820 map reserves at the bottom of RAM: the
/// VMM's GDTs, TSS, zero page, boot stack and page tables.
pub const BOOT_RESERVED_END: u64 = 0x1_0000;
/// Linux boot: the kernel command line (NUL-terminated).
pub const CMDLINE_ADDR: u64 = 0x2_0000;
/// Linux boot: the command line's room, NUL included (the kernel's own
/// `cmdline_size` may be smaller).
pub const CMDLINE_MAX: u64 = 0x1_0000;
/// Linux boot: the ACPI tables, RSDP first, up to [`VMM_AREA_END`]
/// (reserved in the e820 map, and where the kernel's legacy RSDP scan of
/// 0xe0000-0xfffff looks).
pub const ACPI_ADDR: u64 = 0xe_0000;
/// Linux boot: where a bzImage's protected-mode kernel is loaded (its
/// usual `code32_start`); an ELF kernel goes where its headers say, at
/// or above this.
pub const KERNEL_ADDR: u64 = 0x10_0000;

/// The IO-APIC's registers (KVM's in-kernel IO-APIC).
pub const IOAPIC_ADDR: u64 = 0xfec0_0000;
/// The local APICs' registers.
pub const LAPIC_ADDR: u64 = 0xfee0_0000;
/// The IO-APIC's inputs (KVM's has 24).
pub const IOAPIC_PINS: u32 = 24;
/// The UART's interrupt: ISA IRQ 4, GSI 4.
pub const SERIAL_GSI: u32 = 4;
/// The first virtio-mmio device's GSI; device `i` has `VIRTIO_GSI_BASE +
/// i` (the IO-APIC inputs above the 16 ISA ones), so a Linux boot has at
/// most [`MAX_LINUX_DISKS`] disks.
pub const VIRTIO_GSI_BASE: u32 = 16;
/// The most virtio-blk devices a Linux boot can have: one IO-APIC input
/// each.
pub const MAX_LINUX_DISKS: usize = 8;
/// Linux boot: the ACPI sleep control register (an I/O port; the FADT's
/// SLEEP_CONTROL_REG of a hardware-reduced platform, ACPI 6.4 §4.8.3.7).
pub const ACPI_SLEEP_CONTROL: u16 = 0x600;
/// Linux boot: the ACPI sleep status register (reads 0).
pub const ACPI_SLEEP_STATUS: u16 = 0x601;

/// The GSI of virtio-mmio device `i` in a Linux boot.
pub fn virtio_gsi(i: usize) -> u32 {
    VIRTIO_GSI_BASE + u32::try_from(i).unwrap_or(u32::MAX - VIRTIO_GSI_BASE)
}

// The layout's invariants, checked at compile time.
const _: () = assert!(PD_ADDR + 4 * 4096 <= VMM_AREA_END);
const _: () = assert!(MAX_RAM <= VIRTIO_MMIO_BASE);
const _: () = assert!(TSS_ADDR + 0x2069 <= BOOT_GDT_ADDR && BOOT_GDT_ADDR + 40 <= BOOT_PARAMS_ADDR);
const _: () = assert!(BOOT_PARAMS_ADDR + 4096 <= BOOT_STACK_LINUX - 4096 + 16);
const _: () = assert!(PD_ADDR + 4 * 4096 <= BOOT_RESERVED_END && BOOT_RESERVED_END <= CMDLINE_ADDR);
const _: () = assert!(CMDLINE_ADDR + CMDLINE_MAX <= 0x9_f000);
const _: () = assert!(MAX_LINUX_DISKS <= (IOAPIC_PINS - VIRTIO_GSI_BASE) as usize);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layout_is_consistent() {
        assert_eq!(stack_top(0, 1), BOOT_STACK);
        assert_eq!(stack_top(0, 2), 0x1f_fff0);
        assert_eq!(stack_top(1, 2), 0x17_fff0);
        assert_eq!(stack_top(15, 16), 0x10_fff0);
        assert!(VIRTIO_MMIO_BASE + MAX_DISKS as u64 * VIRTIO_MMIO_SIZE <= IDENTITY_MAPPED);
    }
}
