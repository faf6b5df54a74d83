//! Interrupts in a Linux guest's machine, end to end on this host's KVM:
//! a small kernel (C, built by gcc at test time as an ELF entered at
//! CPL0) programs the IO-APIC as Linux would, enables its local APIC, and
//! with interrupts off (so that what arrives stays pending) makes one
//! virtio-blk request and enables the UART's transmit interrupt; then it
//! reads its local APIC's IRR: the device's completion must have raised
//! GSI 16 through its irqfd, and the UART GSI 4 through its own.

use std::process::Command;

/// The guest. It prints one letter per check (upper case: as expected)
/// and powers off through the ACPI sleep register.
const GUEST: &str = r#"
typedef unsigned long u64; typedef unsigned int u32;
typedef unsigned short u16; typedef unsigned char u8;
#define MMIO(a) (*(volatile u32 *)(u64)(a))
#define VIRTIO(off) MMIO(0xd0000000UL + (off))
static void out8(u16 port, u8 v) { __asm__ volatile("outb %0, %1" :: "a"(v), "Nd"(port)); }
static void put(char c) { out8(0x3f8, c); }
/* 82093AA: IOREGSEL, IOWIN; redirection entry n at 0x10 + 2n: vector,
   fixed delivery, physical destination APIC 0, edge, active high. */
static void route(u32 pin, u32 vector) {
    MMIO(0xfec00000UL) = 0x10 + 2 * pin; MMIO(0xfec00010UL) = vector;
    MMIO(0xfec00000UL) = 0x11 + 2 * pin; MMIO(0xfec00010UL) = 0;
}
/* The local APIC's IRR: 8 registers of 32 vectors, 0x10 apart. */
static u32 pending(u32 vector) {
    return (MMIO(0xfee00200UL + 0x10 * (vector / 32)) >> (vector % 32)) & 1;
}
struct desc { u64 addr; u32 len; u16 flags; u16 next; };
void _start(void) {
    long n;
    route(16, 0x41);
    route(4, 0x42);
    MMIO(0xfee000f0UL) = 0x1ff; /* spurious vector register: APIC enabled */
    put(VIRTIO(0x00) == 0x74726976 ? 'M' : 'm');
    VIRTIO(0x70) = 0; VIRTIO(0x70) = 1; VIRTIO(0x70) = 3;
    VIRTIO(0x24) = 1; VIRTIO(0x20) = 1; /* VIRTIO_F_VERSION_1 */
    VIRTIO(0x24) = 0; VIRTIO(0x20) = 0;
    VIRTIO(0x70) = 11;
    volatile struct desc *d = (struct desc *)0x2000000UL;
    volatile u16 *avail = (u16 *)0x2001000UL;
    volatile u16 *used = (u16 *)0x2002000UL;
    VIRTIO(0x30) = 0; VIRTIO(0x38) = 8;
    VIRTIO(0x80) = 0x2000000; VIRTIO(0x84) = 0;
    VIRTIO(0x90) = 0x2001000; VIRTIO(0x94) = 0;
    VIRTIO(0xa0) = 0x2002000; VIRTIO(0xa4) = 0;
    VIRTIO(0x44) = 1;
    VIRTIO(0x70) = 15;
    put(VIRTIO(0x70) == 15 ? 'D' : 'd');
    /* GET_ID: header, 20 bytes of id, status. */
    volatile u32 *hdr = (u32 *)0x2003000UL;
    hdr[0] = 8; hdr[1] = 0; hdr[2] = 0; hdr[3] = 0;
    d[0].addr = 0x2003000; d[0].len = 16; d[0].flags = 1; d[0].next = 1;
    d[1].addr = 0x2003100; d[1].len = 20; d[1].flags = 3; d[1].next = 2;
    d[2].addr = 0x2003200; d[2].len = 1; d[2].flags = 2; d[2].next = 0;
    avail[0] = 0; avail[2] = 0;
    __asm__ volatile("" ::: "memory");
    avail[1] = 1;
    put(pending(0x41) ? 'c' : 'C');
    VIRTIO(0x50) = 0;
    for (n = 0; n < 1000000 && used[1] != 1; n++) ;
    put(used[1] == 1 ? 'U' : 'u');
    put(VIRTIO(0x60) & 1 ? 'S' : 's');
    for (n = 0; n < 100000 && !pending(0x41); n++) ;
    put(pending(0x41) ? 'V' : 'v');
    put(pending(0x42) ? 'e' : 'E');
    out8(0x3f9, 2); /* IER: transmitter empty interrupt */
    for (n = 0; n < 100000 && !pending(0x42); n++) ;
    put(pending(0x42) ? 'T' : 't');
    out8(0x600, 0x34); /* SLP_TYP 5, SLP_EN */
    for (;;) ;
}
"#;

#[test]
fn device_and_uart_interrupts_reach_the_local_apic() {
    if std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
        .is_err()
    {
        eprintln!("skipped: /dev/kvm cannot be opened here");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path().join("guest.c");
    std::fs::write(&src, GUEST).unwrap();
    let elf = dir.path().join("guest.elf");
    let built = Command::new("gcc")
        .args([
            "-O2",
            "-ffreestanding",
            "-fno-pic",
            "-no-pie",
            "-nostdlib",
            "-static",
            "-mno-red-zone",
            "-mgeneral-regs-only",
            "-fno-stack-protector",
            "-fcf-protection=none",
            "-fno-asynchronous-unwind-tables",
            "-Wl,-Ttext-segment=0x1000000",
            "-Wl,-e,_start",
            "-Wl,--build-id=none",
            "-Wl,-z,noexecstack",
            "-o",
        ])
        .arg(&elf)
        .arg(&src)
        .output();
    match built {
        Err(e) => {
            eprintln!("skipped: gcc cannot be run here ({e})");
            return;
        }
        Ok(o) => assert!(
            o.status.success(),
            "gcc: {}",
            String::from_utf8_lossy(&o.stderr)
        ),
    }
    let disk = dir.path().join("d.raw");
    std::fs::File::create(&disk)
        .unwrap()
        .set_len(1 << 20)
        .unwrap();
    let (r, out) =
        super::run_linux(&elf, "", &[disk], 1, std::time::Duration::from_secs(120)).unwrap();
    assert_eq!(r.outcome, vmm_core::Outcome::Exited(0), "{out:?}");
    // Magic, DRIVER_OK, nothing pending before the request, the request
    // used, InterruptStatus, vector 0x41 (GSI 16) pending, 0x42 not before
    // IER, then 0x42 (GSI 4) pending.
    assert_eq!(out, "MDCUSVET");
    assert_eq!(r.devices[0].requests, 1);
}
