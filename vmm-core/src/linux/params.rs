//! The zero page: `struct boot_params` of the Linux x86 boot protocol
//! (Documentation/arch/x86/boot.rst, "The Real-Mode Kernel Header" and
//! "Details of Header Fields"; Documentation/arch/x86/zero-page.rst), with
//! its e820 memory map.
//!
//! For a bzImage the setup header is the kernel's own (offset 0x1f1 of the
//! file, read by linux-loader), with the fields a boot loader must fill
//! written over it; for an ELF kernel, which has none, the VMM writes the
//! fields the kernel reads (its "HdrS" magic, boot flag, loader type,
//! command line and initrd).

use crate::layout::{ACPI_ADDR, BOOT_RESERVED_END, KERNEL_ADDR, VMM_AREA_END};
use linux_loader::loader::bootparam::{boot_e820_entry, boot_params, setup_header};

/// "HdrS", the setup header's magic (boot.rst: `header`, offset 0x202).
pub const HDRS: u32 = 0x5372_6448;
/// The boot sector's signature (boot.rst: `boot_flag`, offset 0x1fe).
pub const BOOT_FLAG: u16 = 0xaa55;
/// `type_of_loader` of a boot loader without an assigned id (boot.rst).
pub const LOADER_UNDEFINED: u8 = 0xff;
/// e820 types (ACPI 6.4 §15, table 15.312): usable RAM and reserved.
pub const E820_RAM: u32 = 1;
/// Reserved: not to be used by the OS.
pub const E820_RESERVED: u32 = 2;
/// The zero page holds at most this many e820 entries (`e820_table`).
pub const E820_MAX: usize = 128;

/// One e820 range.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct E820 {
    /// Its first byte.
    pub addr: u64,
    /// Its size in bytes.
    pub size: u64,
    /// [`E820_RAM`] or [`E820_RESERVED`].
    pub kind: u32,
}

/// The e820 map of `ram` bytes of RAM at guest-physical 0:
///
/// - [0, 0x10000) reserved: the VMM's GDTs, TSS, zero page, boot stack
///   and page tables (the kernel reserves its first 64 KiB anyway);
/// - [0x10000, 0x9f000) RAM: low memory, for the kernel's real-mode
///   trampoline (the command line there is copied out early);
/// - [0xe0000, 0x100000) reserved: the ACPI tables;
/// - [0x100000, RAM) RAM: the kernel, its initrd and the rest.
///
/// [0x9f000, 0xe0000) is not listed (the legacy VGA and option-ROM hole),
/// nor is anything above RAM: the virtio-mmio windows at 0xd0000000, the
/// IO-APIC and the local APICs are devices, not memory.
pub fn e820(ram: u64) -> Vec<E820> {
    vec![
        E820 {
            addr: 0,
            size: BOOT_RESERVED_END,
            kind: E820_RESERVED,
        },
        E820 {
            addr: BOOT_RESERVED_END,
            size: LOW_RAM_END - BOOT_RESERVED_END,
            kind: E820_RAM,
        },
        E820 {
            addr: ACPI_ADDR,
            size: VMM_AREA_END - ACPI_ADDR,
            kind: E820_RESERVED,
        },
        E820 {
            addr: KERNEL_ADDR,
            size: ram - KERNEL_ADDR,
            kind: E820_RAM,
        },
    ]
}

/// The end of usable low memory (below the traditional EBDA).
pub const LOW_RAM_END: u64 = 0x9_f000;

/// What goes into the zero page.
#[derive(Debug, Clone, Copy)]
pub struct Params {
    /// The bzImage's setup header (with `code32_start` where it was
    /// loaded), or `None` for an ELF kernel.
    pub header: Option<setup_header>,
    /// RAM size in bytes.
    pub ram: u64,
    /// Where the command line is.
    pub cmdline_addr: u64,
    /// Its length, NUL excluded.
    pub cmdline_len: u32,
    /// The initrd: where, and its size.
    pub initrd: Option<(u64, u32)>,
    /// Where the ACPI RSDP is.
    pub rsdp: u64,
}

/// The zero page for `p`.
pub fn build(p: &Params) -> boot_params {
    let mut bp = boot_params::default();
    let mut hdr = p.header.unwrap_or_else(|| setup_header {
        // An ELF kernel has no header: the fields the kernel checks.
        boot_flag: BOOT_FLAG,
        header: HDRS,
        kernel_alignment: 0x20_0000,
        ..Default::default()
    });
    hdr.type_of_loader = LOADER_UNDEFINED;
    // All addresses are below 4 GiB (RAM is at most 3 GiB): the ext_*
    // high halves stay 0.
    hdr.cmd_line_ptr = u32::try_from(p.cmdline_addr).unwrap_or(0);
    if p.header.is_none() {
        hdr.cmdline_size = p.cmdline_len;
    }
    if let Some((addr, size)) = p.initrd {
        hdr.ramdisk_image = u32::try_from(addr).unwrap_or(0);
        hdr.ramdisk_size = size;
    }
    bp.hdr = hdr;
    bp.acpi_rsdp_addr = p.rsdp;
    let map = e820(p.ram);
    for (i, e) in map.iter().take(E820_MAX).enumerate() {
        bp.e820_table[i] = boot_e820_entry {
            addr: e.addr,
            size: e.size,
            r#type: e.kind,
        };
    }
    bp.e820_entries = u8::try_from(map.len().min(E820_MAX)).unwrap_or(0);
    bp
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn e820_map() {
        let m = e820(256 << 20);
        // Sorted, not overlapping, RAM where the kernel and the low
        // trampoline go, nothing at the devices.
        for w in m.windows(2) {
            assert!(w[0].addr + w[0].size <= w[1].addr, "{m:?}");
        }
        assert_eq!(
            m[0],
            E820 {
                addr: 0,
                size: 0x10000,
                kind: E820_RESERVED
            }
        );
        assert_eq!(m[1].kind, E820_RAM);
        assert!(m[1].addr >= 0xf000 && m[1].addr + m[1].size <= 0xa0000);
        assert_eq!(
            m[2],
            E820 {
                addr: 0xe0000,
                size: 0x20000,
                kind: E820_RESERVED
            }
        );
        assert_eq!(
            m[3],
            E820 {
                addr: 0x100000,
                size: (256 << 20) - 0x100000,
                kind: E820_RAM
            }
        );
        let last = m.last().unwrap();
        assert!(last.addr + last.size <= 0xd000_0000);
    }

    #[test]
    fn zero_page_fields() {
        let mut h = setup_header {
            header: HDRS,
            version: 0x020f,
            cmdline_size: 2047,
            code32_start: 0x100000,
            ..Default::default()
        };
        h.type_of_loader = 0;
        let bp = build(&Params {
            header: Some(h),
            ram: 128 << 20,
            cmdline_addr: 0x20000,
            cmdline_len: 20,
            initrd: Some((0x7000000, 0x12345)),
            rsdp: 0xe0000,
        });
        let hdr = bp.hdr;
        assert_eq!({ hdr.type_of_loader }, 0xff);
        assert_eq!({ hdr.cmd_line_ptr }, 0x20000);
        assert_eq!({ hdr.cmdline_size }, 2047, "the kernel's own, kept");
        assert_eq!({ hdr.ramdisk_image }, 0x7000000);
        assert_eq!({ hdr.ramdisk_size }, 0x12345);
        assert_eq!({ hdr.code32_start }, 0x100000);
        assert_eq!({ hdr.header }, HDRS);
        assert_eq!({ bp.acpi_rsdp_addr }, 0xe0000);
        assert_eq!(bp.e820_entries, 4);
        let t = bp.e820_table;
        assert_eq!(
            ({ t[3].addr }, { t[3].size }, { t[3].r#type }),
            (0x100000, (128 << 20) - 0x100000, 1)
        );
        assert_eq!(({ t[0].addr }, { t[0].r#type }), (0, 2));
        // The zero page's layout (zero-page.rst): e820_entries at 0x1e8,
        // the header at 0x1f1, its magic at 0x202, cmd_line_ptr at 0x228,
        // e820_table at 0x2d0, acpi_rsdp_addr at 0x070.
        let bytes = vm_memory::ByteValued::as_slice(&bp);
        assert_eq!(bytes.len(), 4096);
        assert_eq!(bytes[0x1e8], 4);
        assert_eq!(&bytes[0x202..0x206], b"HdrS");
        assert_eq!(&bytes[0x228..0x22c], &0x20000u32.to_le_bytes());
        assert_eq!(&bytes[0x218..0x21c], &0x7000000u32.to_le_bytes());
        assert_eq!(&bytes[0x21c..0x220], &0x12345u32.to_le_bytes());
        assert_eq!(bytes[0x210], 0xff);
        assert_eq!(&bytes[0x70..0x78], &0xe0000u64.to_le_bytes());
        assert_eq!(
            &bytes[0x2d0 + 3 * 20..0x2d0 + 3 * 20 + 8],
            &0x100000u64.to_le_bytes()
        );
        // An ELF kernel's zero page: the magic and boot flag made up.
        let bp = build(&Params {
            header: None,
            ram: 64 << 20,
            cmdline_addr: 0x20000,
            cmdline_len: 11,
            initrd: None,
            rsdp: 0xe0000,
        });
        let hdr = bp.hdr;
        assert_eq!(({ hdr.header }, { hdr.boot_flag }), (HDRS, 0xaa55));
        assert_eq!(
            ({ hdr.cmdline_size }, { hdr.ramdisk_image }, {
                hdr.ramdisk_size
            }),
            (11, 0, 0)
        );
    }
}
