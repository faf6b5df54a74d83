//! A vCPU thread: KVM_RUN in a loop, each exit handed to the bus, until the
//! run ends; guest faults turned into an [`Outcome::Fault`] that says what
//! happened and where.

use crate::bus::{Action, Bus};
use crate::control::Controller;
use crate::{Error, Outcome};
use kvm_ioctls::{VcpuExit, VcpuFd};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

/// The signal that kicks a vCPU thread out of KVM_RUN when the run ends.
pub fn kick_signal() -> i32 {
    vmm_sys_util::signal::SIGRTMIN()
}

extern "C" fn on_kick(_: libc::c_int, _: *mut libc::siginfo_t, _: *mut libc::c_void) {}

/// Install the (empty) handler of [`kick_signal`], once per process: its
/// only effect is to interrupt KVM_RUN with EINTR.
///
/// # Errors
/// The handler cannot be installed.
pub fn install_kick_handler() -> Result<(), Error> {
    static DONE: OnceLock<Result<(), i32>> = OnceLock::new();
    DONE.get_or_init(|| {
        vmm_sys_util::signal::register_signal_handler(kick_signal(), on_kick).map_err(|e| e.errno())
    })
    .map_err(|e| {
        Error::io(
            "installing the vCPU kick signal handler",
            std::io::Error::from_raw_os_error(e),
        )
    })
}

/// What a vCPU thread needs.
pub struct Vcpu {
    /// Its index.
    pub index: usize,
    /// Its file.
    pub fd: VcpuFd,
    /// The devices and the run's control.
    pub bus: Arc<Bus>,
    /// When the run started, and where the time of the first exit goes.
    pub started: Instant,
    /// The time from the start of the run to vCPU 0's first exit.
    pub first_exit: Arc<OnceLock<Duration>>,
    /// Its pause gate.
    pub ctl: Arc<Controller>,
    /// The MSRs a checkpoint saves (KVM's index list).
    pub msrs: Arc<Vec<u32>>,
    /// Whether it has an in-kernel local APIC (Linux mode).
    pub lapic: bool,
    /// It starts parked (restored from a checkpoint that recorded it so).
    pub parked: bool,
}

/// What to do after an exit, decided while the exit borrows the vCPU.
enum Next {
    Go,
    Stop,
    Park,
    Fault(String),
    Failed(Error),
}

impl Vcpu {
    /// Run until the run ends, then leave the controller's count of
    /// running vCPUs (a parked vCPU leaves it when it parks).
    pub fn run(self) {
        if self.parked {
            self.park();
            return;
        }
        let ctl = self.ctl.clone();
        if !self.run_loop() {
            ctl.leave();
        }
    }

    /// Park: count as parked, then wait for the end of the run at the
    /// gate (answering checkpoint captures).
    fn park(&self) {
        self.bus.control.park(self.index);
        self.ctl.park(self.index, &|| self.capture());
    }

    /// This vCPU's state, for a checkpoint.
    fn capture(&self) -> Result<Vec<u8>, String> {
        crate::snapshot::vcpu::capture(&self.fd, &self.msrs, self.lapic)
    }

    /// The loop; whether the vCPU parked.
    fn run_loop(mut self) -> bool {
        let bus = self.bus.clone();
        loop {
            if bus.control.stopping() {
                return false;
            }
            self.ctl.gate(self.index, &|| self.capture());
            if bus.control.stopping() {
                return false;
            }
            let next = match self.fd.run() {
                Ok(exit) => {
                    if self.index == 0 {
                        let _ = self.first_exit.set(self.started.elapsed());
                    }
                    Self::handle(&bus, exit)
                }
                Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => Next::Go,
                Err(e) => Next::Failed(Error::Kvm {
                    what: "KVM_RUN",
                    source: e,
                }),
            };
            match next {
                Next::Go => {}
                Next::Stop => return false,
                Next::Park => {
                    self.park();
                    return true;
                }
                Next::Fault(what) => {
                    let what = format!("{what}{}", self.where_());
                    bus.control.finish(Ok(Outcome::Fault {
                        vcpu: self.index,
                        what,
                    }));
                    return false;
                }
                Next::Failed(e) => {
                    bus.control.finish(Err(e));
                    return false;
                }
            }
        }
    }

    fn handle(bus: &Bus, exit: VcpuExit<'_>) -> Next {
        match exit {
            VcpuExit::IoOut(port, data) => match bus.port_write(port, data) {
                Action::Continue => Next::Go,
                Action::Stop => Next::Stop,
                Action::Park => Next::Park,
            },
            VcpuExit::IoIn(port, data) => {
                bus.port_read(port, data);
                Next::Go
            }
            VcpuExit::MmioRead(addr, data) => {
                if bus.mmio_read(addr, data) {
                    Next::Go
                } else {
                    Next::Fault(format!(
                        "a {}-byte load from guest-physical {addr:#x}, where there is neither RAM nor a device",
                        data.len()
                    ))
                }
            }
            VcpuExit::MmioWrite(addr, data) => {
                if bus.mmio_write(addr, data) {
                    Next::Go
                } else {
                    Next::Fault(format!(
                        "a {}-byte store to guest-physical {addr:#x}, where there is neither RAM nor a device",
                        data.len()
                    ))
                }
            }
            VcpuExit::Shutdown if bus.linux => Next::Fault(
                "the guest reset the machine (a triple fault: a reboot, or an exception the kernel could not handle)"
                    .into(),
            ),
            VcpuExit::Shutdown => Next::Fault(
                "triple fault: the guest took an exception it cannot handle (payload mode has no IDT)"
                    .into(),
            ),
            VcpuExit::InternalError => Next::Fault(
                "KVM internal error: on this host, what a guest exception (a fault, int3, ud2, hlt at CPL3...) gives"
                    .into(),
            ),
            VcpuExit::Hlt => Next::Fault("the guest halted with interrupts off".into()),
            VcpuExit::Exception => Next::Fault("an exception exit".into()),
            VcpuExit::FailEntry(reason, cpu) => Next::Fault(format!(
                "KVM could not enter the guest (hardware reason {reason:#x}, cpu {cpu})"
            )),
            VcpuExit::Intr => Next::Go,
            VcpuExit::SystemEvent(kind, _) => Next::Fault(format!("a system event of type {kind}")),
            other => Next::Fault(format!("an unexpected exit: {other:?}")),
        }
    }

    /// ", at RIP=... (RSP=...)" for fault messages, as far as KVM tells.
    fn where_(&self) -> String {
        match (self.fd.get_regs(), self.fd.get_sregs()) {
            (Ok(r), Ok(s)) => format!(
                " (vCPU {} at RIP={:#x}, RSP={:#x}, CR2={:#x}, CPL {}) rflags {:#x}",
                self.index,
                r.rip,
                r.rsp,
                s.cr2,
                s.cs.selector & 3,
                r.rflags
            ),
            _ => format!(" (vCPU {})", self.index),
        }
    }
}
