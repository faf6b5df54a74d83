//! The Linux boot path: the ACPI tables disassembled by `iasl -d` (Debian
//! acpica-tools); a machine built for a Linux boot from small fake kernels
//! (the load errors, and the in-kernel irqchip, PIT and irqfds set up on
//! this host); and a real boot of the host's Debian kernel with a busybox
//! initramfs that writes a pattern to /dev/vda, reads it back and powers
//! off, where the host can run a kernel (VMX or SVM).

mod debian;
mod irq;

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
    // The AML evaluated by ACPICA's interpreter (acpiexec, also in
    // acpica-tools), as the kernel's ACPICA will: the objects the kernel
    // asks for, and their values.
    let out = Command::new("acpiexec")
        .arg("-b")
        .arg(
            "evaluate \\_SB.VR01._HID; evaluate \\_SB.VR01._UID; evaluate \\_SB.VR01._CRS; \
             evaluate \\_SB.COM1._HID; evaluate \\_SB.COM1._CRS; evaluate \\_S5",
        )
        .arg(dir.path().join("dsdt.dat"))
        .output();
    match out {
        Err(_) => eprintln!("acpiexec is not installed: the AML is not evaluated"),
        Ok(out) => {
            let text = String::from_utf8_lossy(&out.stdout).to_string();
            assert!(out.status.success(), "{text}");
            assert!(!text.contains("AE_"), "an ACPICA exception: {text}");
            assert!(text.contains("[String] Length 08 = \"LNRO0005\""), "{text}");
            assert!(text.contains("[Integer] = 0000000000000001"), "{text}");
            // Memory32Fixed(ReadWrite, 0xd0001000, 0x1000), Interrupt
            // (consumer, edge, active high, exclusive) {17}, end tag.
            assert!(
                text.contains("0000: 86 09 00 01 00 10 00 D0 00 10 00 00 89 06 00 03")
                    && text.contains("0010: 01 11 00 00 00 79 00"),
                "{text}"
            );
            // EISAID("PNP0501"), compressed as ACPI 6.4 §19.6.35 says.
            assert!(text.contains("[Integer] = 000000000105D041"), "{text}");
            // IO(Decode16, 0x3f8, 0x3f8, 1, 8), Interrupt {4}.
            assert!(
                text.contains("47 01 F8 03 F8 03 01 08 89 06 00 03 01 04 00 00"),
                "{text}"
            );
            assert!(
                text.contains(
                    "[Package] Contains 2 Elements:\n    [Integer] = 0000000000000005\n    [Integer] = 0000000000000000"
                ),
                "{text}"
            );
        }
    }
    // The RSDP is no table with a header: iasl 20200925 refuses it alone
    // ("does not contain a valid ACPI table"); its checksums and links
    // are checked by the unit tests of vmm_core::acpi.
}

/// The fake kernels' 64-bit code: print CS + '0' ('@' for `__BOOT_CS`),
/// the zero page's e820 entry count + '0', then the command line the zero
/// page points at, to COM1; then power off through the ACPI sleep control
/// register (SLP_TYP 5, SLP_EN: 0x34 to port 0x600). RSI is the zero
/// page; a push and a pop check the stack.
pub(crate) const FAKE_KERNEL_CODE: &[u8] = &[
    0x8c, 0xc8, // mov eax, cs
    0x04, 0x30, // add al, '0'
    0x66, 0xba, 0xf8, 0x03, // mov dx, 0x3f8
    0xee, // out dx, al
    0x8a, 0x86, 0xe8, 0x01, 0x00, 0x00, // mov al, [rsi + 0x1e8] (e820_entries)
    0x04, 0x30, // add al, '0'
    0xee, // out dx, al
    0x50, 0x58, // push rax; pop rax
    0x8b, 0xbe, 0x28, 0x02, 0x00, 0x00, // mov edi, [rsi + 0x228] (cmd_line_ptr)
    // loop:
    0x8a, 0x07, // mov al, [rdi]
    0x84, 0xc0, // test al, al
    0x74, 0x0a, // jz done
    0x66, 0xba, 0xf8, 0x03, // mov dx, 0x3f8
    0xee, // out dx, al
    0x48, 0xff, 0xc7, // inc rdi
    0xeb, 0xf0, // jmp loop
    // done:
    0x66, 0xba, 0x00, 0x06, // mov dx, 0x600
    0xb0, 0x34, // mov al, 0x34
    0xee, // out dx, al
    0xeb, 0xfe, // jmp $
];

/// A minimal bzImage (boot.rst, "The Real-Mode Kernel Header"): 4 setup
/// sectors after the boot sector, protocol 2.15 with XLF_KERNEL_64, the
/// given `cmdline_size` and `init_size` from a preferred address of 16
/// MiB; the protected-mode code has `code` at its 64-bit entry (0x200).
fn fake_bzimage(cmdline_size: u32, init_size: u32, code: &[u8]) -> Vec<u8> {
    let setup = 5 * 512;
    let mut k = vec![0u8; setup + 0x200];
    k[0x1f1] = 4; // setup_sects
    k[0x1fe..0x200].copy_from_slice(&0xaa55u16.to_le_bytes());
    k[0x202..0x206].copy_from_slice(b"HdrS");
    k[0x206..0x208].copy_from_slice(&0x020fu16.to_le_bytes()); // version
    k[0x211] = 1; // loadflags: LOADED_HIGH
    k[0x214..0x218].copy_from_slice(&0x10_0000u32.to_le_bytes()); // code32_start
    k[0x22c..0x230].copy_from_slice(&0x7fff_ffffu32.to_le_bytes()); // initrd_addr_max
    k[0x230..0x234].copy_from_slice(&0x20_0000u32.to_le_bytes()); // kernel_alignment
    k[0x234] = 1; // relocatable_kernel
    k[0x236..0x238].copy_from_slice(&1u16.to_le_bytes()); // xloadflags: XLF_KERNEL_64
    k[0x238..0x23c].copy_from_slice(&cmdline_size.to_le_bytes());
    k[0x258..0x260].copy_from_slice(&0x100_0000u64.to_le_bytes()); // pref_address
    k[0x260..0x264].copy_from_slice(&init_size.to_le_bytes());
    k.extend_from_slice(code);
    k
}

/// A minimal 64-bit x86 ELF executable (System V ABI): one PT_LOAD
/// segment of `code` at physical and virtual `at`, entered there.
pub(crate) fn fake_elf(at: u64, code: &[u8]) -> Vec<u8> {
    let mut e = vec![0u8; 0x1000];
    e[..4].copy_from_slice(b"\x7fELF");
    e[4] = 2; // ELFCLASS64
    e[5] = 1; // little endian
    e[6] = 1; // EV_CURRENT
    e[16..18].copy_from_slice(&2u16.to_le_bytes()); // ET_EXEC
    e[18..20].copy_from_slice(&62u16.to_le_bytes()); // EM_X86_64
    e[20..24].copy_from_slice(&1u32.to_le_bytes());
    e[24..32].copy_from_slice(&at.to_le_bytes()); // e_entry
    e[32..40].copy_from_slice(&64u64.to_le_bytes()); // e_phoff
    e[52..54].copy_from_slice(&64u16.to_le_bytes()); // e_ehsize
    e[54..56].copy_from_slice(&56u16.to_le_bytes()); // e_phentsize
    e[56..58].copy_from_slice(&1u16.to_le_bytes()); // e_phnum
    let ph = 64;
    e[ph..ph + 4].copy_from_slice(&1u32.to_le_bytes()); // PT_LOAD
    e[ph + 4..ph + 8].copy_from_slice(&5u32.to_le_bytes()); // R X
    e[ph + 8..ph + 16].copy_from_slice(&0x1000u64.to_le_bytes()); // p_offset
    e[ph + 16..ph + 24].copy_from_slice(&at.to_le_bytes()); // p_vaddr
    e[ph + 24..ph + 32].copy_from_slice(&at.to_le_bytes()); // p_paddr
    let len = code.len() as u64;
    e[ph + 32..ph + 40].copy_from_slice(&len.to_le_bytes()); // p_filesz
    e[ph + 40..ph + 48].copy_from_slice(&len.to_le_bytes()); // p_memsz
    e[ph + 48..ph + 56].copy_from_slice(&0x1000u64.to_le_bytes()); // p_align
    e.extend_from_slice(code);
    e
}

fn load(
    kernel: &Path,
    initrd: Option<&Path>,
    cmdline: &str,
) -> Result<(vmm_core::memory::Ram, vmm_core::linux::Loaded), String> {
    let ram = vmm_core::memory::create(64 << 20).unwrap();
    let l = vmm_core::linux::load(
        &ram,
        kernel,
        initrd,
        cmdline,
        Machine { vcpus: 1, disks: 1 },
    )
    .map_err(|e| e.to_string())?;
    Ok((ram, l))
}

#[test]
fn kernel_initrd_and_cmdline_placement() {
    use vm_memory::{Bytes, GuestAddress};
    let dir = tempfile::tempdir().unwrap();
    let k = dir.path().join("bzImage");
    std::fs::write(&k, fake_bzimage(255, 0x10_0000, FAKE_KERNEL_CODE)).unwrap();
    let rd = dir.path().join("initrd.img");
    let initrd: Vec<u8> = (0..300_001u32).map(|i| (i % 251) as u8).collect();
    std::fs::write(&rd, &initrd).unwrap();
    let (ram, l) = load(&k, Some(&rd), "root=/dev/vda").unwrap();
    assert_eq!(l.kind, vmm_core::linux::Kind::BzImage);
    assert_eq!((l.entry.rip, l.entry.rsi), (0x100200, 0x7000));
    // The code is where the entry point is.
    let mut code = vec![0u8; FAKE_KERNEL_CODE.len()];
    ram.read_slice(&mut code, GuestAddress(0x100200)).unwrap();
    assert_eq!(code, FAKE_KERNEL_CODE);
    // The kernel needs up to pref_address + init_size.
    assert_eq!(l.kernel, (0x100000, 0x110_0000));
    // The initrd: at the top of RAM, page aligned, intact.
    let (start, end) = l.initrd.unwrap();
    assert_eq!(start % 4096, 0);
    assert_eq!(end - start, initrd.len() as u64);
    assert!(
        end <= 64 << 20 && (64 << 20) - end < 4096,
        "{start:#x}-{end:#x}"
    );
    let mut back = vec![0u8; initrd.len()];
    ram.read_slice(&mut back, GuestAddress(start)).unwrap();
    assert_eq!(back, initrd);
    // The zero page says the same.
    let zp = |off: u64| ram.read_obj::<u32>(GuestAddress(0x7000 + off)).unwrap();
    assert_eq!(zp(0x218), u32::try_from(start).unwrap(), "ramdisk_image");
    assert_eq!(
        zp(0x21c),
        u32::try_from(initrd.len()).unwrap(),
        "ramdisk_size"
    );
    assert_eq!(zp(0x228), 0x20000, "cmd_line_ptr");
    assert_eq!(zp(0x202), u32::from_le_bytes(*b"HdrS"));
    assert_eq!(
        ram.read_obj::<u8>(GuestAddress(0x7210)).unwrap(),
        0xff,
        "type_of_loader"
    );
    let mut line = vec![0u8; l.cmdline.len()];
    ram.read_slice(&mut line, GuestAddress(0x20000)).unwrap();
    assert_eq!(line, b"root=/dev/vda console=ttyS0 panic=-1\0");
    // The RSDP where the zero page says.
    let rsdp = ram.read_obj::<u64>(GuestAddress(0x7070)).unwrap();
    let mut sig = [0u8; 8];
    ram.read_slice(&mut sig, GuestAddress(rsdp)).unwrap();
    assert_eq!(&sig, b"RSD PTR ");

    // A kernel that takes an initrd only below 48 MiB (initrd_addr_max is
    // the highest byte it may use) gets it just under that.
    let mut low = fake_bzimage(255, 0x10_0000, FAKE_KERNEL_CODE);
    low[0x22c..0x230].copy_from_slice(&0x2ff_ffffu32.to_le_bytes());
    let lk = dir.path().join("lowinitrd");
    std::fs::write(&lk, &low).unwrap();
    let (_, l) = load(&lk, Some(&rd), "").unwrap();
    let (start, end) = l.initrd.unwrap();
    assert!(
        end <= 0x300_0000 && 0x300_0000 - end < 4096,
        "{start:#x}-{end:#x}"
    );
    assert_eq!(start % 4096, 0);

    // An ELF kernel: entered at its entry point; its zero page made up.
    let e = dir.path().join("vmlinux");
    std::fs::write(&e, fake_elf(0x100_0000, FAKE_KERNEL_CODE)).unwrap();
    let (ram, l) = load(&e, None, "").unwrap();
    assert_eq!(l.kind, vmm_core::linux::Kind::Elf);
    assert_eq!(l.entry.rip, 0x100_0000);
    assert_eq!(l.initrd, None);
    assert_eq!(ram.read_obj::<u16>(GuestAddress(0x71fe)).unwrap(), 0xaa55);
    assert_eq!(
        ram.read_obj::<u32>(GuestAddress(0x7218)).unwrap(),
        0,
        "no initrd"
    );
}

#[test]
fn load_errors_name_the_file() {
    let dir = tempfile::tempdir().unwrap();
    let k = dir.path().join("bzImage");
    std::fs::write(&k, fake_bzimage(255, 0x10_0000, FAKE_KERNEL_CODE)).unwrap();
    let err =
        |kernel: &Path, initrd: Option<&Path>, line: &str| load(kernel, initrd, line).unwrap_err();
    // A command line too long for the kernel's cmdline_size (255).
    let e = err(&k, None, &"x".repeat(240));
    assert!(e.contains("bzImage") && e.contains("at most 255"), "{e}");
    // An initrd missing, or too big for what is left above the kernel
    // (it needs up to 17 MiB of the 64).
    let e = err(&k, Some(&dir.path().join("no-initrd")), "");
    assert!(
        e.contains("cannot open the initrd") && e.contains("no-initrd"),
        "{e}"
    );
    let big = dir.path().join("big.img");
    std::fs::File::create(&big)
        .unwrap()
        .set_len(48 << 20)
        .unwrap();
    let e = err(&k, Some(&big), "");
    assert!(
        e.contains("the initrd") && e.contains("big.img") && e.contains("too big"),
        "{e}"
    );
    // A kernel bigger than guest memory.
    let huge = dir.path().join("huge");
    let mut h = fake_bzimage(255, 0x10_0000, FAKE_KERNEL_CODE);
    h.resize(65 << 20, 0);
    std::fs::write(&huge, &h).unwrap();
    let e = err(&huge, None, "");
    assert!(
        e.contains("huge") && e.contains("too big for 64 MiB"),
        "{e}"
    );
    // A kernel whose init_size does not fit.
    let fat = dir.path().join("fat");
    std::fs::write(&fat, fake_bzimage(255, 60 << 20, FAKE_KERNEL_CODE)).unwrap();
    let e = err(&fat, None, "");
    assert!(e.contains("fat") && e.contains("init_size"), "{e}");
    // An ELF kernel below 1 MiB, and one past the end of RAM.
    let low = dir.path().join("low.elf");
    std::fs::write(&low, fake_elf(0x8000, FAKE_KERNEL_CODE)).unwrap();
    let e = err(&low, None, "");
    assert!(
        e.contains("low.elf") && e.contains("cannot load the ELF kernel"),
        "{e}"
    );
    // An ELF kernel whose zero-filled memory (p_memsz) passes the end of
    // RAM.
    let mut bss = fake_elf(0x100_0000, FAKE_KERNEL_CODE);
    bss[64 + 40..64 + 48].copy_from_slice(&(60u64 << 20).to_le_bytes());
    let bss_path = dir.path().join("bss.elf");
    std::fs::write(&bss_path, &bss).unwrap();
    let e = err(&bss_path, None, "");
    assert!(
        e.contains("bss.elf") && e.contains("end of its last segment"),
        "{e}"
    );
    let high = dir.path().join("high.elf");
    std::fs::write(&high, fake_elf(0x1000_0000, FAKE_KERNEL_CODE)).unwrap();
    let e = err(&high, None, "");
    assert!(
        e.contains("high.elf") && e.contains("cannot load the ELF kernel"),
        "{e}"
    );
    // Not a kernel; missing.
    let e = err(&dir.path().join("nothing"), None, "");
    assert!(
        e.contains("cannot open the kernel") && e.contains("nothing"),
        "{e}"
    );
}

/// Run `kernel` as a Linux boot with `disks` raw disks and `vcpus` vCPUs,
/// for at most `timeout`.
fn run_linux(
    kernel: &Path,
    cmdline: &str,
    disks: &[std::path::PathBuf],
    vcpus: usize,
    timeout: std::time::Duration,
) -> vmm_core::Result<(vmm_core::Report, String)> {
    use crate::common::{spec, Capture};
    let open: Vec<_> = disks
        .iter()
        .map(|p| vmm_core::disks::open(&spec(p, Some(image::Format::Raw), false), None).unwrap())
        .collect();
    let console = Capture::default();
    let r = vmm_core::run(vmm_core::Config {
        mem: 64 << 20,
        vcpus,
        disks: open
            .iter()
            .map(|d| vmm_core::Disk {
                disk: d.disk(),
                writable: true,
                name: d.name(),
                qos: None,
            })
            .collect(),
        boot: vmm_core::Boot::Linux {
            kernel: kernel.to_path_buf(),
            initrd: None,
            cmdline: cmdline.into(),
        },
        console: Box::new(console.clone()),
        timeout: Some(timeout),
        io: vmm_core::IoMode::Thread,
        stop: None,
        controller: None,
        bundle: None,
    });
    drop(open);
    r.map(|r| (r, console.text()))
}

/// The machine of a Linux boot, built on this host's KVM (the in-kernel
/// irqchip, the PIT, an irqfd per device and for the UART, APs waiting
/// for SIPI), running fake bzImage and ELF kernels whose few CPL0
/// instructions check the boot protocol's entry state (CS = __BOOT_CS,
/// RSI = the zero page, a stack), print the zero page's e820 count and
/// command line, and power off through the ACPI sleep register. On
/// kvm_pvm, CPL0 code is emulated: slow, but a few instructions run.
#[test]
fn fake_kernels_boot_on_this_host() {
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
    let disks: Vec<_> = (0..2)
        .map(|i| {
            let p = dir.path().join(format!("d{i}.raw"));
            std::fs::File::create(&p).unwrap().set_len(1 << 20).unwrap();
            p
        })
        .collect();
    let bz = dir.path().join("bzImage");
    std::fs::write(&bz, fake_bzimage(2047, 0x10_0000, FAKE_KERNEL_CODE)).unwrap();
    let elf = dir.path().join("vmlinux");
    std::fs::write(&elf, fake_elf(0x100_0000, FAKE_KERNEL_CODE)).unwrap();
    for (kernel, vcpus) in [(&bz, 2), (&elf, 1)] {
        let (r, out) = run_linux(
            kernel,
            "hello -- from the zero page",
            &disks,
            vcpus,
            std::time::Duration::from_secs(120),
        )
        .unwrap();
        assert_eq!(
            r.outcome,
            vmm_core::Outcome::Exited(0),
            "{kernel:?}: {out:?}"
        );
        assert_eq!(
            out, "@4hello console=ttyS0 panic=-1 -- from the zero page",
            "{kernel:?}"
        );
        assert_eq!(r.devices.len(), 2);
    }
    // A Linux guest has at most 8 disks (one IO-APIC input each).
    let specs: Vec<_> = (0..9)
        .map(|i| {
            let p = dir.path().join(format!("n{i}.raw"));
            std::fs::File::create(&p).unwrap().set_len(1 << 20).unwrap();
            p
        })
        .collect();
    let e = run_linux(&bz, "", &specs, 1, std::time::Duration::from_secs(1)).unwrap_err();
    assert!(e.to_string().contains("at most 8"), "{e}");
}
