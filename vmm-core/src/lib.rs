//! A small KVM virtual machine monitor whose virtio-blk disks are this
//! library's images (raw, VHD, VHDX, differencing chains, a checkpoint
//! bundle's active disk), opened through the front door ([`image`]) with
//! its image locks. Built on rust-vmm crates (kvm-ioctls, vm-memory,
//! vm-superio, virtio-bindings).
//!
//! The `vmm` binary (in the `tools` crate) runs it:
//! `vmm run --disk IMAGE[,ro] ... --payload BIN`.
//!
//! A guest of seven bytes on a VHDX disk (it skips where /dev/kvm is not
//! usable):
//!
//! ```
//! # fn main() -> Result<(), Box<dyn std::error::Error>> {
//! # let kvm = std::fs::OpenOptions::new().read(true).write(true).open("/dev/kvm");
//! # if kvm.is_err() { return Ok(()); }
//! use vmm_core::{Boot, Config, Disk, DiskSpec, IoMode, Outcome};
//! let dir = tempfile::tempdir()?;
//! let path = dir.path().join("data.vhdx");
//! let kind = image::Kind::Vhdx(vhdx::CreateOptions::new(64 << 20));
//! image::create(&path, &image::CreateOptions::new(kind))?.close()?;
//! // As `vmm run --disk data.vhdx` opens it: locked, its format probed.
//! let d = vmm_core::disks::open(&DiskSpec::parse(path.to_str().unwrap())?, None)?;
//! let report = vmm_core::run(Config {
//!     mem: 64 << 20,
//!     vcpus: 1,
//!     disks: vec![Disk { disk: d.disk(), writable: true, name: d.name(), qos: d.qos() }],
//!     // mov eax, 42; out 0xf4, eax
//!     boot: Boot::Payload(vec![0xb8, 42, 0, 0, 0, 0xe7, 0xf4]),
//!     console: Box::new(std::io::sink()),
//!     timeout: None,
//!     io: IoMode::Thread,
//!     stop: None,
//!     controller: None,
//!     bundle: None,
//! })?;
//! assert_eq!(report.outcome, Outcome::Exited(42));
//! assert_eq!(report.devices[0].requests, 0);
//! # Ok(())
//! # }
//! ```
//!
//! # Payload mode: the ABI
//!
//! A *payload* is any freestanding x86-64 program, a flat binary. The VMM
//! guarantees, exactly:
//!
//! - **Memory.** Guest RAM is guest-physical [0, RAM), RAM given by
//!   `--mem` (default 256 MiB, at least 64 MiB, at most 3 GiB, a whole
//!   number of 4 KiB pages). Page tables identity-map the first 4 GiB
//!   (2 MiB pages), every page present, writable and user. The VMM's own
//!   structures (GDT, TSS, page tables) lie in [0, 0x100000);
//!   [0x100000, 0x200000) is the payload's stack.
//! - **Entry.** The payload is loaded at 0x200000 and entered in 64-bit
//!   mode at CPL3 with RIP = 0x200000, RSP = 0x1ffff0, RFLAGS = 0x3002
//!   (IOPL 3: `in`/`out` allowed; interrupts off), RDI = the RAM size in
//!   bytes, RSI = the number of virtio-blk devices; other general
//!   registers are 0. SSE is usable (CR0.MP set, CR0.EM clear, CR4.OSFXSR
//!   and CR4.OSXMMEXCPT set; MXCSR 0x1f80), so ordinary compiled C runs
//!   (built with `-mno-red-zone` or not: nothing interrupts it). AVX is
//!   not enabled (no CR4.OSXSAVE).
//! - **vCPUs.** With `--vcpus N`, every vCPU enters the payload at once:
//!   vCPU *i* (0-based) with RDX = *i*, RCX = N, and its own stack, RSP =
//!   0x200000 − *i* · (0x100000 / N) − 16 (vCPU 0's is 0x1ffff0). An
//!   `out` of any value to port **0xf5** parks the vCPU that does it (it
//!   runs no more guest code); a payload that wants one vCPU parks the
//!   others. If every vCPU parks, the run ends as a fault.
//! - **Disks.** virtio-blk device *i* (in `--disk` order) is a
//!   virtio-mmio transport, version 2 (virtio 1.x, "modern": the driver
//!   must accept VIRTIO_F_VERSION_1), at guest-physical 0xd0000000 + *i* ·
//!   0x1000, one queue of up to 256 entries. No interrupt is needed: a
//!   payload polls the used ring. A device completes a request during the
//!   QueueNotify write or later, on its own I/O thread, so a payload must
//!   not assume completion when its notify returns.
//! - **Console.** An 8250 UART at I/O ports 0x3f8–0x3ff (COM1); what the
//!   payload writes to its data register goes to the VMM's stdout.
//! - **End.** An `out` of a 32-bit value V to port **0xf4** ends the run;
//!   `vmm run` exits with status V (255 when V > 255). Any other way the
//!   guest stops is reported with a message saying what and where (RIP,
//!   RSP, CR2) and ends with its own status: an exception (payload mode
//!   has no IDT: on this kind of host it shows as a KVM internal error or
//!   a triple fault), `hlt`, a load or store at a guest-physical address
//!   with neither RAM nor a device, every vCPU parked: status **253**; a
//!   run stopped by `--timeout`: status **252**; by SIGINT or SIGTERM
//!   to `vmm`: status **130** (the disks are flushed and closed first). Errors of the VMM itself
//!   (an image missing or locked, a payload too large) exit with 1 before
//!   the guest runs.
//!
//! Other I/O ports read all ones and ignore writes.
//!
//! # Linux mode
//!
//! [`Boot::Linux`] boots a Linux kernel instead ([`linux`]): a bzImage or
//! an ELF vmlinux, loaded with linux-loader, entered through the 64-bit
//! boot protocol (boot.rst) at CPL0 on vCPU 0 with RSI the zero page; the
//! other vCPUs wait for the kernel's start-up IPIs. Memory (see
//! [`layout`]): the VMM's tables, the zero page and the boot stack in
//! [0, 0x10000) (e820 reserved), the command line at 0x20000, the ACPI
//! tables at 0xe0000 (e820 reserved), the kernel from 0x100000, the initrd
//! at the top of RAM. The command line is the user's, with `console=ttyS0`
//! and `panic=-1` added unless it names those parameters
//! ([`linux::cmdline`]).
//!
//! The guest finds its hardware through ACPI ([`acpi`]): a
//! hardware-reduced FADT, a MADT with a local APIC per vCPU and the
//! IO-APIC at 0xfec00000, and a DSDT naming COM1 (PNP0501, ports
//! 0x3f8-0x3ff, IRQ 4) and each virtio-blk device *i* (LNRO0005, its
//! window at 0xd0000000 + *i* · 0x1000, GSI 16 + *i*, edge): at most 8
//! disks. Interrupts go through KVM's in-kernel irqchip (and its PIT):
//! each device and the UART signal an irqfd ([`virtio::mmio::Transport`]'s
//! interrupt event sets InterruptStatus, then the line is pulsed with no
//! exit). Payload mode has no irqchip.
//!
//! How a Linux run ends: an ACPI power-off (the kernel writes SLP_TYP 5
//! and SLP_EN to the sleep control register, port 0x600) is
//! [`Outcome::Exited`]`(0)`; a reboot is a triple fault, a fault (status
//! 253); `--timeout` as in payload mode. Ports 0xf4 and 0xf5 are not
//! special, and loads and stores where there is neither RAM nor a device
//! read all ones and are dropped, as on a PC. On a host whose KVM has no
//! VMX or SVM (kvm_pvm), guest kernel code is emulated: a real kernel is
//! far too slow to boot there.
//!
//! # The virtio-blk device
//!
//! Requests IN, OUT, FLUSH, GET_ID, DISCARD and WRITE_ZEROES; features
//! SEG_MAX (254), BLK_SIZE (the image's logical sector size), FLUSH,
//! TOPOLOGY (its physical sector size), DISCARD and WRITE_ZEROES on a
//! writable disk (up to 16 segments of up to 1 GiB; alignment the image's
//! discard granularity), RO on a read-only one (`--disk IMAGE,ro`), whose
//! writes fail. GET_ID answers the first 20 hexadecimal digits of the
//! image's identity ([`disk::VirtualDisk::disk_id`]: the VHDX virtual disk
//! id, the VHD unique id, for a raw file one derived from its device and
//! inode).
//!
//! Every request is validated whole before any I/O (see
//! [`virtio::queue`] and [`virtio::request`]): descriptor indices, chain
//! length (a chain longer than the queue is a loop), directions (readable
//! before writable), every address inside RAM, header and data lengths,
//! the sector range (checked arithmetic), discard and write-zeroes
//! segments, a device-writable status byte. A chain that is no request
//! goes back with used length 0; a malformed request is answered
//! VIRTIO_BLK_S_IOERR (or UNSUPP for an unknown type); a disk error is
//! IOERR; a corrupt available ring puts the device in NEEDS_RESET. Data
//! moves through a bounce buffer of at most 1 MiB per device; nothing a
//! guest does makes the VMM allocate more than that and one queue's worth
//! of descriptors.
//!
//! Disk I/O runs on one I/O thread per disk, woken by an ioeventfd on the
//! QueueNotify register, off the vCPU threads ([`IoMode`]). Measured on this
//! project's CI host (`cargo bench -p benches --bench vmm`: a nested,
//! loaded 2-CPU machine), serving requests on the vCPU thread during the
//! notify exit ([`IoMode::Vcpu`], `vmm run --io vcpu`) is 1.05-2.4× faster,
//! because waking the I/O thread costs more than the exit there. The I/O
//! thread stays the default all the same: a vCPU that does disk I/O runs no
//! guest code meanwhile (a QoS wait, a 1 MiB write or an allocating flush
//! stall it, and a pause waits for it), and a guest with more vCPUs than
//! disks keeps its other vCPUs busy while a disk works.
//!
//! # Disk formats
//!
//! See [`disks`]: a disk's format is given or probed once, and a probed
//! raw disk is guarded against the footer attack.
#![deny(unsafe_code)]
#![warn(missing_docs)]

pub mod acpi;
pub mod boot;
mod bus;
pub mod control;
pub mod disks;
mod error;
mod irq;
pub mod layout;
pub mod linux;
mod machine;
pub mod memory;
pub mod migrate;
pub mod qos;
pub mod serial;
pub mod snapshot;
mod vcpu;
pub mod virtio;
pub mod x86;

/// This project's test payloads (vmm-core/payloads/*.c), built by gcc;
/// empty where gcc was missing.
#[cfg(feature = "test-payloads")]
pub mod test_payloads {
    /// Real I/O on every disk (payloads/blk_io.c).
    pub const BLK_IO: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/blk_io.bin"));
    /// Malformed requests and register abuse (payloads/hostile.c).
    pub const HOSTILE: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/hostile.bin"));
    /// Two vCPUs (payloads/smp.c).
    pub const SMP: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/smp.bin"));
    /// Request latency (payloads/bench.c).
    pub const BENCH: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/bench.bin"));
    /// Storage QoS: 2300 I/Os as fast as it can (payloads/qos.c).
    pub const QOS: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/qos.bin"));
    /// Writes and verifies its disk round after round (payloads/migrate.c).
    pub const MIGRATE: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/migrate.bin"));
    /// The example of the README and scripts/demo.sh (payloads/hello.c).
    pub const HELLO: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/hello.bin"));
    /// A write of sector 0 (payloads/sector0.c).
    pub const SECTOR0: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/sector0.bin"));
    /// Disk benchmarks for benches/benches/vmm (payloads/vmmbench.c).
    pub const VMMBENCH: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/vmmbench.bin"));
}

pub use boot::Boot;
pub use control::Controller;
pub use disks::{DiskSpec, OpenDisk};
pub use error::{Error, ErrorKind, Result};
pub use machine::{max_vcpus, run, Config, DeviceReport, Disk, IoMode, Report};

use std::time::Duration;

/// The status a run ends with when the guest faults.
pub const FAULT_STATUS: u8 = 253;
/// The status a run ends with when it is stopped by its timeout.
pub const TIMEOUT_STATUS: u8 = 252;
/// The status a run ends with when it is stopped from outside
/// ([`Config::stop`]: `vmm run` on SIGINT or SIGTERM), as a shell reports
/// a command ended by SIGINT.
pub const STOPPED_STATUS: u8 = 130;

/// How a run ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// The guest wrote this value to port 0xf4 (payload mode), or powered
    /// the machine off through ACPI (a Linux guest: 0).
    Exited(u32),
    /// The guest stopped another way (see the crate docs).
    Fault {
        /// The vCPU it happened on.
        vcpu: usize,
        /// What happened, and where.
        what: String,
    },
    /// The run was stopped after this long.
    TimedOut(Duration),
    /// The run was stopped from outside ([`Config::stop`]).
    Stopped,
}

impl Outcome {
    /// The exit status `vmm run` ends with (see the crate docs).
    pub fn status(&self) -> u8 {
        match self {
            Outcome::Exited(v) => u8::try_from(*v).unwrap_or(u8::MAX),
            Outcome::Fault { .. } => FAULT_STATUS,
            Outcome::TimedOut(_) => TIMEOUT_STATUS,
            Outcome::Stopped => STOPPED_STATUS,
        }
    }
}

impl std::fmt::Display for Outcome {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Outcome::Exited(v) => write!(f, "the guest ended the run with {v}"),
            Outcome::Fault { vcpu, what } => write!(f, "guest fault on vCPU {vcpu}: {what}"),
            Outcome::TimedOut(t) => write!(
                f,
                "the run was stopped after {:.1} s (--timeout)",
                t.as_secs_f64()
            ),
            Outcome::Stopped => write!(f, "the run was stopped (a signal, or the control API)"),
        }
    }
}
