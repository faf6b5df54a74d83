//! The real boot: the host's Debian kernel with a busybox initramfs built
//! here, where a kernel can run (VMX or SVM); and the helpers it needs,
//! checked here.

use super::{fake_elf, FAKE_KERNEL_CODE};
use std::path::Path;
use std::process::Command;

/// Why a real kernel cannot boot here, if it cannot.
fn no_hardware_virtualization() -> Option<String> {
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let hw = cpuinfo
        .lines()
        .filter(|l| l.starts_with("flags"))
        .any(|l| l.split_whitespace().any(|f| f == "vmx" || f == "svm"));
    if !hw {
        return Some(
            "this host's CPU shows neither vmx nor svm in /proc/cpuinfo (its KVM, kvm_pvm here, \
             emulates guest kernel code, far too slowly to boot a kernel)"
                .into(),
        );
    }
    if std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
        .is_err()
    {
        return Some("/dev/kvm cannot be opened here".into());
    }
    None
}

/// The kernel to boot: $VMM_TEST_KERNEL, else the last /boot/vmlinuz-*.
fn host_kernel() -> Option<std::path::PathBuf> {
    if let Some(k) = std::env::var_os("VMM_TEST_KERNEL") {
        return Some(k.into());
    }
    let mut k: Vec<_> = std::fs::read_dir("/boot")
        .ok()?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with("vmlinuz-"))
        })
        .collect();
    k.sort();
    k.pop()
}

/// A statically linked busybox: $VMM_TEST_BUSYBOX, else `busybox` on
/// PATH (Debian's busybox-static installs /bin/busybox).
fn host_busybox() -> Option<Vec<u8>> {
    let mut candidates: Vec<std::path::PathBuf> = Vec::new();
    if let Some(b) = std::env::var_os("VMM_TEST_BUSYBOX") {
        candidates.push(b.into());
    }
    if let Some(path) = std::env::var_os("PATH") {
        candidates.extend(std::env::split_paths(&path).map(|d| d.join("busybox")));
    }
    candidates.push("/bin/busybox".into());
    candidates
        .iter()
        .filter_map(|p| std::fs::read(p).ok())
        .find(|b| crate::common::initramfs::is_static_elf(b))
}

/// The modules virtio_mmio and virtio_blk need, in load order, each
/// decompressed, from `dir` (/lib/modules/VERSION): none when
/// modules.dep is absent or does not list them (built in). `Err` when one
/// is compressed in a way no host tool here undoes.
fn virtio_modules(dir: &Path) -> Result<Vec<(String, Vec<u8>)>, String> {
    let Ok(dep) = std::fs::read_to_string(dir.join("modules.dep")) else {
        return Ok(Vec::new());
    };
    let mut order: Vec<String> = Vec::new();
    for want in ["/virtio_mmio.ko", "/virtio_blk.ko"] {
        let Some(line) = dep
            .lines()
            .find(|l| l.split(':').next().is_some_and(|m| m.contains(want)))
        else {
            continue;
        };
        let (module, deps) = line.split_once(':').unwrap_or((line, ""));
        // modules.dep lists a module's dependencies so that the last one
        // is loaded first.
        for m in deps.split_whitespace().rev().chain([module]) {
            if !order.iter().any(|o| o == m) {
                order.push(m.to_string());
            }
        }
    }
    order
        .iter()
        .map(|m| {
            let path = dir.join(m);
            let tool = match path.extension().and_then(|e| e.to_str()) {
                Some("xz") => Some("xz"),
                Some("zst") => Some("zstd"),
                Some("gz") => Some("gzip"),
                _ => None,
            };
            let bytes = match tool {
                None => std::fs::read(&path).map_err(|e| format!("{}: {e}", path.display()))?,
                Some(t) => {
                    let out = Command::new(t)
                        .arg("-dc")
                        .arg(&path)
                        .output()
                        .map_err(|e| format!("{t} -dc {}: {e}", path.display()))?;
                    if !out.status.success() {
                        return Err(format!("{t} -dc {} failed", path.display()));
                    }
                    out.stdout
                }
            };
            let name = m.rsplit('/').next().unwrap_or(m);
            let name = name.split(".ko").next().unwrap_or(name).to_string();
            Ok((name, bytes))
        })
        .collect()
}

/// What the guest writes at 1 MiB of /dev/vda, and reads back.
fn guest_pattern() -> Vec<u8> {
    (0..8192u32)
        .map(|i| ((i * 7 + i / 512) % 253) as u8)
        .collect()
}

/// The initramfs's /init (busybox sh): load the virtio modules, wait for
/// /dev/vda, write the pattern at 1 MiB, drop the page cache, read it
/// back, say whether it matched, power off.
const INIT: &str = r#"#!/bin/busybox sh
bb=/bin/busybox
$bb mount -t proc proc /proc
$bb mount -t sysfs sysfs /sys
$bb mount -t devtmpfs devtmpfs /dev
for m in /modules/*.ko; do
  [ -e "$m" ] && { $bb insmod "$m" || echo "insmod $m failed"; }
done
i=0
while [ ! -b /dev/vda ] && [ $i -lt 30 ]; do $bb sleep 1; i=$((i+1)); done
if [ -b /dev/vda ]; then
  $bb dd if=/pattern of=/dev/vda bs=4096 seek=256 conv=fsync
  echo 3 > /proc/sys/vm/drop_caches
  $bb dd if=/dev/vda of=/tmp/readback bs=4096 skip=256 count=2
  if $bb cmp /pattern /tmp/readback; then echo VMM-PATTERN-OK; else echo VMM-PATTERN-BAD; fi
else
  echo VMM-NO-VDA
fi
$bb poweroff -f
"#;

/// The initramfs: directories, /dev/console, /init, busybox, the pattern
/// and the modules (numbered in load order).
fn initramfs(busybox: &[u8], modules: &[(String, Vec<u8>)]) -> Vec<u8> {
    use crate::common::initramfs::{Cpio, CHAR_DEV, DIR, EXEC, FILE};
    let mut cpio = Cpio::default();
    for d in ["bin", "dev", "proc", "sys", "tmp", "modules"] {
        cpio.add(d, DIR, (0, 0), &[]);
    }
    cpio.add("dev/console", CHAR_DEV, (5, 1), &[]);
    cpio.add("init", EXEC, (0, 0), INIT.as_bytes());
    cpio.add("bin/busybox", EXEC, (0, 0), busybox);
    cpio.add("pattern", FILE, (0, 0), &guest_pattern());
    for (i, (name, bytes)) in modules.iter().enumerate() {
        cpio.add(&format!("modules/{i:02}-{name}.ko"), FILE, (0, 0), bytes);
    }
    cpio.finish()
}

/// The initramfs is a newc archive GNU cpio reads back: every member,
/// its type, size and contents (skipped without cpio).
#[test]
fn initramfs_is_what_cpio_reads() {
    if Command::new("cpio").arg("--version").output().is_err() {
        eprintln!("skipped: cpio is not installed");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let modules = vec![
        ("virtio".to_string(), vec![1u8; 1001]),
        ("virtio_blk".to_string(), vec![2u8; 3]),
    ];
    let archive = dir.path().join("a.cpio");
    std::fs::write(&archive, initramfs(b"not really busybox", &modules)).unwrap();
    let list = Command::new("cpio")
        .args(["-itv", "-F"])
        .arg(&archive)
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&list.stdout);
    assert!(
        list.status.success(),
        "{}",
        String::from_utf8_lossy(&list.stderr)
    );
    let lines: Vec<&str> = text.lines().collect();
    let names: Vec<&str> = lines
        .iter()
        .map(|l| l.split_whitespace().last().unwrap())
        .collect();
    assert_eq!(
        names,
        [
            "bin",
            "dev",
            "proc",
            "sys",
            "tmp",
            "modules",
            "dev/console",
            "init",
            "bin/busybox",
            "pattern",
            "modules/00-virtio.ko",
            "modules/01-virtio_blk.ko"
        ]
    );
    assert!(lines[0].starts_with("drwxr-xr-x"), "{text}");
    assert!(
        lines[6].starts_with("crw-------") && lines[6].contains("5,"),
        "{text}"
    );
    assert!(lines[7].starts_with("-rwxr-xr-x"), "{text}");
    assert!(lines[10].contains(" 1001 "), "{text}");
    for (member, want) in [
        ("init", INIT.as_bytes().to_vec()),
        ("pattern", guest_pattern()),
        ("bin/busybox", b"not really busybox".to_vec()),
    ] {
        let out = Command::new("cpio")
            .args(["-i", "--to-stdout", "-F"])
            .arg(&archive)
            .arg(member)
            .output()
            .unwrap();
        assert_eq!(out.stdout, want, "{member}");
    }
}

/// The boot test's helpers: the static-busybox check, and the virtio
/// modules found through a modules.dep like Debian's (dependencies
/// first, compressed ones unpacked with the host's xz).
#[test]
fn boot_test_helpers() {
    use crate::common::initramfs::is_static_elf;
    assert!(is_static_elf(&fake_elf(0x100_0000, FAKE_KERNEL_CODE)));
    if let Ok(sh) = std::fs::read("/bin/sh") {
        assert!(
            !is_static_elf(&sh),
            "/bin/sh is dynamically linked on Debian"
        );
    }
    assert!(!is_static_elf(b"#!/bin/sh"));
    let dir = tempfile::tempdir().unwrap();
    assert!(
        virtio_modules(dir.path()).unwrap().is_empty(),
        "no modules.dep: built in"
    );
    let k = dir.path().join("kernel/drivers");
    std::fs::create_dir_all(k.join("virtio")).unwrap();
    std::fs::create_dir_all(k.join("block")).unwrap();
    std::fs::write(
        dir.path().join("modules.dep"),
        "kernel/drivers/virtio/virtio.ko:\n\
         kernel/drivers/virtio/virtio_ring.ko:\n\
         kernel/drivers/virtio/virtio_mmio.ko: kernel/drivers/virtio/virtio_ring.ko kernel/drivers/virtio/virtio.ko\n\
         kernel/drivers/block/virtio_blk.ko.xz: kernel/drivers/virtio/virtio_ring.ko kernel/drivers/virtio/virtio.ko\n\
         kernel/drivers/block/loop.ko:\n",
    )
    .unwrap();
    for m in ["virtio", "virtio_ring", "virtio_mmio"] {
        std::fs::write(k.join(format!("virtio/{m}.ko")), m).unwrap();
    }
    std::fs::write(k.join("block/virtio_blk.ko"), b"blk").unwrap();
    if Command::new("xz")
        .arg("-z")
        .arg(k.join("block/virtio_blk.ko"))
        .status()
        .is_err()
    {
        eprintln!("skipped in part: xz is not installed");
        return;
    }
    let m = virtio_modules(dir.path()).unwrap();
    let names: Vec<&str> = m.iter().map(|(n, _)| n.as_str()).collect();
    assert_eq!(
        names,
        ["virtio", "virtio_ring", "virtio_mmio", "virtio_blk"]
    );
    assert_eq!(m[0].1, b"virtio");
    assert_eq!(m[3].1, b"blk", "unpacked");
}

/// Boot the host's Debian kernel (linux-image-amd64) with a busybox
/// initramfs built here; the guest writes a pattern to /dev/vda (the
/// virtio-mmio disk its kernel found through the DSDT), reads it back and
/// powers off (ACPI S5). Asserts the power-off, the guest's verdict on
/// the console, and the pattern in the image file. Only where a kernel
/// can run (VMX or SVM); skipped, saying why, otherwise or without a
/// kernel or a static busybox.
#[test]
fn debian_kernel_writes_vda_and_powers_off() {
    if let Some(why) = no_hardware_virtualization() {
        eprintln!("skipped: {why}");
        return;
    }
    let Some(kernel) = host_kernel() else {
        eprintln!("skipped: no kernel (install linux-image-amd64, or set VMM_TEST_KERNEL)");
        return;
    };
    let Some(busybox) = host_busybox() else {
        eprintln!("skipped: no static busybox (install busybox-static, or set VMM_TEST_BUSYBOX)");
        return;
    };
    let version = kernel
        .file_name()
        .and_then(|n| n.to_str())
        .and_then(|n| n.strip_prefix("vmlinuz-"))
        .unwrap_or("")
        .to_string();
    let modules_dir = std::env::var_os("VMM_TEST_MODULES")
        .map(std::path::PathBuf::from)
        .unwrap_or_else(|| Path::new("/lib/modules").join(&version));
    let modules = match virtio_modules(&modules_dir) {
        Ok(m) => m,
        Err(e) => {
            eprintln!("skipped: the kernel's virtio modules cannot be unpacked here: {e}");
            return;
        }
    };
    let dir = tempfile::tempdir().unwrap();
    let initrd = dir.path().join("initramfs.cpio");
    std::fs::write(&initrd, initramfs(&busybox, &modules)).unwrap();
    let disk = dir.path().join("vda.raw");
    std::fs::File::create(&disk)
        .unwrap()
        .set_len(16 << 20)
        .unwrap();

    let open = vmm_core::disks::open(
        &crate::common::spec(&disk, Some(image::Format::Raw), false),
        None,
    )
    .unwrap();
    let console = crate::common::Capture::default();
    let r = vmm_core::run(vmm_core::Config {
        mem: 512 << 20,
        vcpus: 2,
        disks: vec![vmm_core::Disk {
            disk: open.disk(),
            writable: true,
            name: open.name(),
            qos: None,
        }],
        boot: vmm_core::Boot::Linux {
            kernel: kernel.clone(),
            initrd: Some(initrd),
            cmdline: "rdinit=/init".into(),
        },
        console: Box::new(console.clone()),
        timeout: Some(std::time::Duration::from_secs(180)),
        io: vmm_core::IoMode::Thread,
        stop: None,
        controller: None,
        bundle: None,
    })
    .unwrap();
    drop(open);
    let out = console.text();
    assert_eq!(
        r.outcome,
        vmm_core::Outcome::Exited(0),
        "{kernel:?} did not power off; console:\n{out}"
    );
    assert!(out.contains("VMM-PATTERN-OK"), "console:\n{out}");
    let raw = std::fs::read(&disk).unwrap();
    assert_eq!(&raw[1 << 20..(1 << 20) + 8192], &guest_pattern()[..]);
}
