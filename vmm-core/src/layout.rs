//! The guest-physical layout of payload mode: the fixed numbers of the ABI
//! (see the crate docs).

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

// The layout's invariants, checked at compile time.
const _: () = assert!(PD_ADDR + 4 * 4096 <= VMM_AREA_END);
const _: () = assert!(MAX_RAM <= VIRTIO_MMIO_BASE);

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
