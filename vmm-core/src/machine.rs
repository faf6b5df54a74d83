//! The machine: a KVM VM with guest RAM, its vCPU threads, the UART and
//! the virtio-blk devices; [`run`] builds it, boots it, waits for the
//! outcome and takes it down cleanly.

use crate::boot::{boot, Boot};
use crate::bus::{Bus, Control};
use crate::control::{Attached, Controller};
use crate::layout::{
    virtio_gsi, MAX_DISKS, MAX_LINUX_DISKS, MAX_VCPUS, SERIAL_GSI, VIRTIO_MMIO_BASE,
    VIRTIO_MMIO_SIZE,
};
use crate::qos::{Limits, Qos};
use crate::serial::{Console, Uart};
use crate::vcpu::{install_kick_handler, kick_signal, Vcpu};
use crate::virtio::blk::{Blk, Stats};
use crate::virtio::mmio::Transport;
use crate::virtio::worker::Worker;
use crate::{irq, memory, x86, Error, Outcome, Result};
use disk::VirtualDisk;
use kvm_bindings::KVM_MAX_CPUID_ENTRIES;
use kvm_ioctls::{IoEventAddress, Kvm};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};
use virtio_bindings::virtio_mmio::VIRTIO_MMIO_QUEUE_NOTIFY;
use vmm_sys_util::eventfd::EventFd;
use vmm_sys_util::signal::Killable;

/// Where a device does its disk I/O.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum IoMode {
    /// On an I/O thread per disk, woken by the queue-notify ioeventfd
    /// (the default).
    #[default]
    Thread,
    /// On the vCPU thread, during the QueueNotify exit (for measurements).
    Vcpu,
}

/// A disk the machine serves.
pub struct Disk {
    /// The disk.
    pub disk: Arc<dyn VirtualDisk>,
    /// Whether the guest may write it.
    pub writable: bool,
    /// Its name, for the report.
    pub name: String,
    /// Its QoS limits, if any ([`crate::qos`]; shared, so that they can be
    /// changed while the guest runs).
    pub qos: Option<Arc<Qos>>,
}

/// The machine to build.
pub struct Config {
    /// Guest RAM in bytes.
    pub mem: u64,
    /// How many vCPUs.
    pub vcpus: usize,
    /// The virtio-blk devices' disks, in order.
    pub disks: Vec<Disk>,
    /// What to boot.
    pub boot: Boot,
    /// Where the UART's output goes.
    pub console: Console,
    /// Stop the run after this long.
    pub timeout: Option<Duration>,
    /// Where disk I/O is done.
    pub io: IoMode,
    /// Set from elsewhere (a signal handler) to stop the run: it ends as
    /// [`Outcome::Stopped`], the disks flushed and closed as after any end.
    pub stop: Option<Arc<std::sync::atomic::AtomicBool>>,
    /// A handle to pause, resume, stop and inspect the run from another
    /// thread, and to change disks' QoS limits ([`Controller`]; one run
    /// per controller).
    pub controller: Option<Arc<Controller>>,
    /// The checkpoint bundle whose active disk is disk 0: the controller
    /// takes VM checkpoints into it ([`Controller::checkpoint`]), and holds
    /// it (its directory lock) for the run.
    pub bundle: Option<checkpoint::Bundle>,
}

/// What one device did during a run.
#[derive(Debug, Clone)]
pub struct DeviceReport {
    /// The disk's name.
    pub name: String,
    /// Requests completed.
    pub requests: u64,
    /// Requests that failed in the disk (answered IOERR).
    pub io_errors: u64,
    /// Requests refused as malformed (IOERR, UNSUPP or unanswered).
    pub refused: u64,
    /// The last disk error or refusal.
    pub last_problem: Option<String>,
    /// What the transport last refused (a feature set, a queue layout) or
    /// why the device entered NEEDS_RESET.
    pub transport_problem: Option<String>,
    /// Whether the device was left in NEEDS_RESET.
    pub needs_reset: bool,
}

/// How a run went.
#[derive(Debug)]
pub struct Report {
    /// How it ended.
    pub outcome: Outcome,
    /// Each device, in order.
    pub devices: Vec<DeviceReport>,
    /// From the start of [`run`] to vCPU 0's first exit (its first
    /// instructions ran before).
    pub first_exit: Option<Duration>,
    /// The whole run, from the start of [`run`] to the disks closed.
    pub elapsed: Duration,
}

/// The most vCPUs this host and the ABI allow.
///
/// # Errors
/// KVM is not available.
pub fn max_vcpus() -> Result<usize> {
    let kvm = Kvm::new().map_err(Error::NoKvm)?;
    Ok(kvm.get_max_vcpus().min(MAX_VCPUS))
}

/// Build the machine, boot it, and run it to its end; then close the disks
/// (flushed, cleanly closed: [`VirtualDisk::close`]).
///
/// # Errors
/// KVM is missing or refuses something, the configuration is refused (the
/// message says why), the payload does not fit or a kernel cannot be
/// loaded, a disk cannot be closed. What the guest does wrong is no error:
/// it is the report's [`Outcome`].
pub fn run(mut cfg: Config) -> Result<Report> {
    let started = Instant::now();
    let kvm = Kvm::new().map_err(Error::NoKvm)?;
    let max = kvm.get_max_vcpus().min(MAX_VCPUS);
    if cfg.vcpus == 0 || cfg.vcpus > max {
        return Err(Error::Config(format!(
            "{} vCPUs: this host's KVM allows 1 to {max}",
            cfg.vcpus
        )));
    }
    if cfg.disks.len() > MAX_DISKS {
        return Err(Error::Config(format!(
            "{} disks: at most {MAX_DISKS}",
            cfg.disks.len()
        )));
    }
    let restore = match &cfg.boot {
        Boot::Restore(c) => Some(c.clone()),
        _ => None,
    };
    let linux =
        matches!(cfg.boot, Boot::Linux { .. }) || restore.as_ref().is_some_and(|c| c.conf.linux);
    if let Some(c) = &restore {
        if (c.conf.mem, c.conf.vcpus, c.conf.disks.len()) != (cfg.mem, cfg.vcpus, cfg.disks.len()) {
            return Err(Error::Config(format!(
                "the checkpoint is of a machine of {} MiB, {} vCPUs and {} disks; this one has \
                 {} MiB, {} vCPUs and {} disks",
                c.conf.mem >> 20,
                c.conf.vcpus,
                c.conf.disks.len(),
                cfg.mem >> 20,
                cfg.vcpus,
                cfg.disks.len()
            )));
        }
    }
    if linux && cfg.disks.len() > MAX_LINUX_DISKS {
        return Err(Error::Config(format!(
            "{} disks: a Linux guest can have at most {MAX_LINUX_DISKS} (one IO-APIC input each)",
            cfg.disks.len()
        )));
    }
    let kvm_err = |what: &'static str| move |source| Error::Kvm { what, source };
    // RAM first, so that it outlives the VM whose memory slot maps it.
    let ram = Arc::new(match &restore {
        // A checkpoint's memory file, mapped privately: read as touched.
        Some(c) => {
            memory::check_size(cfg.mem)?;
            crate::snapshot::memory::restore(&c.memory, cfg.mem).map_err(Error::Config)?
        }
        None => memory::create(cfg.mem)?,
    });
    let vm = Arc::new(kvm.create_vm().map_err(kvm_err("KVM_CREATE_VM"))?);
    memory::register(&vm, &ram)?;
    // A Linux guest's interrupt controllers, before its vCPUs; payload
    // mode has none.
    if linux {
        irq::create_irqchip(&vm)?;
        if let Some(state) = restore.as_ref().and_then(|c| c.vm.as_ref()) {
            crate::snapshot::restore_vm(&vm, state)
                .map_err(|e| Error::Config(format!("restoring the interrupt controllers: {e}")))?;
        }
    }
    // A checkpoint's memory holds the tables already.
    if restore.is_none() {
        x86::write_tables(&ram)?;
    }
    let entries = boot(&cfg.boot, &ram, cfg.vcpus, cfg.disks.len())?;
    let cpuid = kvm
        .get_supported_cpuid(KVM_MAX_CPUID_ENTRIES)
        .map_err(kvm_err("KVM_GET_SUPPORTED_CPUID"))?;
    install_kick_handler()?;

    let ctl = cfg.controller.clone().unwrap_or_default();
    let mut transports = Vec::new();
    let mut stats: Vec<Arc<Stats>> = Vec::new();
    let mut attached = Vec::new();
    // The disks go to their devices: nothing else here keeps them, so
    // that a checkpoint can close the active disk of a bundle and open the
    // next.
    let disks = std::mem::take(&mut cfg.disks);
    let names: Vec<String> = disks.iter().map(|d| d.name.clone()).collect();
    for (i, d) in disks.into_iter().enumerate() {
        let notify = EventFd::new(0).map_err(|e| Error::io("creating an event fd", e))?;
        // Every disk has limits, none at first, so that they can be set
        // while the guest runs.
        let qos = d
            .qos
            .clone()
            .unwrap_or_else(|| Arc::new(Qos::new(Limits::default())));
        let blk = Blk::new(d.disk, d.writable).with_qos(Some(qos.clone()));
        stats.push(blk.stats());
        let stats_of = blk.stats();
        let interrupt = if linux {
            Some(irq::irqfd(&vm, virtio_gsi(i))?)
        } else {
            None
        };
        let t = Transport::new(blk, ram.clone(), notify, interrupt).inline(cfg.io == IoMode::Vcpu);
        if let Some(c) = &restore {
            t.lock()
                .restore(&c.devices[i], &ram)
                .map_err(|e| Error::Config(format!("restoring disk {i}'s device: {e}")))?;
        }
        if cfg.io == IoMode::Thread {
            // QueueNotify writes of queue index 0 signal the event inside
            // KVM, without an exit; other values still exit.
            let at = VIRTIO_MMIO_BASE
                + i as u64 * VIRTIO_MMIO_SIZE
                + u64::from(VIRTIO_MMIO_QUEUE_NOTIFY);
            vm.register_ioevent(t.notify_event(), &IoEventAddress::Mmio(at), 0u32)
                .map_err(kvm_err("KVM_IOEVENTFD"))?;
        }
        let t = Arc::new(t);
        attached.push(Attached {
            name: std::sync::Mutex::new(d.name.clone()),
            writable: d.writable,
            stats: stats_of,
            qos,
            transport: t.clone(),
            migrating: std::sync::atomic::AtomicBool::new(false),
        });
        transports.push(t);
    }
    let uart_irq = if linux {
        Some(irq::irqfd(&vm, SERIAL_GSI)?)
    } else {
        None
    };
    let uart = match (&restore, uart_irq) {
        (Some(c), irq) => Uart::restored(cfg.console, irq, &c.uart).map_err(Error::Config)?,
        (None, Some(irq)) => Uart::with_irq(cfg.console, irq),
        (None, None) => Uart::new(cfg.console),
    };
    let bus = Arc::new(Bus {
        uart: std::sync::Mutex::new(uart),
        blk: transports.clone(),
        control: Control::new(cfg.vcpus),
        linux,
    });
    ctl.attach(crate::control::Parts {
        bus: bus.clone(),
        disks: attached,
        vcpus: cfg.vcpus,
        mem: cfg.mem,
        started,
        vm: vm.clone(),
        ram: ram.clone(),
        linux,
        bundle: cfg.bundle.take(),
    });
    let workers = match cfg.io {
        IoMode::Thread => transports
            .iter()
            .enumerate()
            .map(|(i, t)| Worker::spawn(format!("vmm-blk{i}"), t.clone()))
            .collect::<Result<Vec<_>>>()?,
        IoMode::Vcpu => Vec::new(),
    };

    // Every vCPU is made and set up before any runs (a Linux guest's
    // vCPUs but the first have no entry: they wait for start-up IPIs).
    let mut fds = Vec::new();
    for i in 0..cfg.vcpus {
        let fd = vm
            .create_vcpu(i as u64)
            .map_err(kvm_err("KVM_CREATE_VCPU"))?;
        // At most MAX_VCPUS (checked above), so the APIC id fits a byte.
        let apic_id = u8::try_from(i).unwrap_or(u8::MAX);
        x86::setup_vcpu(&fd, &cpuid, apic_id, entries.get(i))?;
        if linux {
            x86::setup_lapic(&fd, i == 0)?;
        }
        if let Some(c) = &restore {
            crate::snapshot::vcpu::restore(&fd, &c.vcpus[i].0, linux)
                .map_err(|e| Error::Config(format!("restoring vCPU {i}: {e}")))?;
        }
        fds.push(fd);
    }
    // The MSRs a checkpoint saves.
    let msrs = Arc::new(
        kvm.get_msr_index_list()
            .map(|l| l.as_slice().to_vec())
            .unwrap_or_default(),
    );
    let first_exit = Arc::new(OnceLock::new());
    let mut threads = Vec::new();
    for (i, fd) in fds.into_iter().enumerate() {
        let v = Vcpu {
            index: i,
            fd,
            bus: bus.clone(),
            started,
            first_exit: first_exit.clone(),
            ctl: ctl.clone(),
            msrs: msrs.clone(),
            lapic: linux,
            parked: restore.as_ref().is_some_and(|c| c.vcpus[i].1),
        };
        match std::thread::Builder::new()
            .name(format!("vmm-vcpu{i}"))
            .spawn(move || v.run())
        {
            Ok(h) => {
                ctl.add_thread(std::os::unix::thread::JoinHandleExt::as_pthread_t(&h));
                threads.push(h);
            }
            Err(e) => {
                bus.control
                    .finish(Err(Error::io("starting a vCPU thread", e)));
                break;
            }
        }
    }

    let outcome = bus.control.wait(cfg.timeout, cfg.stop.as_deref());
    // No more requests are taken, even by a queue waiting on its QoS limit;
    // vCPUs held at the pause gate go, and are kicked no more by a pause.
    for t in &transports {
        t.halt();
    }
    // The bundle is let go of after its disk is closed.
    let bundle = ctl.end();
    // Kick every vCPU out of KVM_RUN until its thread is done (a kick that
    // lands just before KVM_RUN is entered is lost: send again).
    for h in threads {
        while !h.is_finished() {
            let _ = h.kill(kick_signal());
            std::thread::sleep(Duration::from_millis(1));
        }
        let _ = h.join();
    }
    for w in workers {
        w.stop();
    }
    bus.flush_console();

    let devices = transports
        .iter()
        .zip(&stats)
        .zip(&names)
        .map(|((t, s), d)| {
            let st = t.lock();
            DeviceReport {
                name: d.clone(),
                requests: s.requests.load(std::sync::atomic::Ordering::Relaxed),
                io_errors: s.io_errors.load(std::sync::atomic::Ordering::Relaxed),
                refused: s.refused.load(std::sync::atomic::Ordering::Relaxed),
                last_problem: s.last_problem.lock().ok().and_then(|p| p.clone()),
                transport_problem: st.problem().map(str::to_string),
                needs_reset: st.status()
                    & virtio_bindings::virtio_config::VIRTIO_CONFIG_S_NEEDS_RESET
                    != 0,
            }
        })
        .collect();
    // Close what each device serves now (a migrated device serves its new
    // image; after a VM checkpoint, the bundle's new active disk).
    let serving: Vec<_> = transports
        .iter()
        .map(|t| t.lock().device().disk().clone())
        .collect();
    drop(bus);
    drop(transports);
    let mut close_error = None;
    for d in &serving {
        if let Err(e) = d.close() {
            close_error.get_or_insert(e);
        }
    }
    drop(serving);
    drop(bundle);
    drop(vm);
    let outcome = outcome?;
    if let Some(e) = close_error {
        return Err(e.into());
    }
    Ok(Report {
        outcome,
        devices,
        first_exit: first_exit.get().copied(),
        elapsed: started.elapsed(),
    })
}
