//! Controlling a running machine from another thread: pause and resume its
//! vCPUs, stop it, change a disk's QoS limits, ask what it is doing. A
//! [`Controller`] is made before [`crate::run`] and given in
//! [`crate::Config::controller`]; the `vmm` binary serves one on its
//! `--api` socket.
//!
//! Pausing: every vCPU thread passes a gate at the top of its run loop.
//! [`Controller::pause`] closes the gate and kicks the vCPU threads out of
//! KVM_RUN (the signal of [`crate::vcpu`]'s kick, sent again every few
//! milliseconds, since a kick that lands just before KVM_RUN is entered is
//! lost) until each one waits at the gate or has left the run (parked on
//! port 0xf5, or done); only then does it return. The disks' I/O threads go
//! on: what the guest queued before the pause is still served.
//!
//! Lock order: the gate's lock, then (in [`Controller::info`] and
//! [`Controller::set_qos`]) a device's QoS lock; nothing is taken while
//! the gate's lock is held but those and the kick signal.

use crate::bus::Bus;
use crate::qos::{Limits, Qos};
use crate::virtio::blk::Stats;
use crate::Outcome;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};
use vmm_sys_util::signal::Killable;

/// How long [`Controller::pause`] waits for the vCPUs before it gives up.
const PAUSE_TIMEOUT: Duration = Duration::from_secs(5);
/// How often it kicks them meanwhile.
const KICK_EVERY: Duration = Duration::from_millis(2);

/// A vCPU thread, for kicking.
#[derive(Clone, Copy)]
struct Tid(libc::pthread_t);

// SAFETY: Killable's contract is that the handle names a thread that can
// be signalled. A Tid is recorded right after its vCPU thread is spawned
// and dropped by `Controller::end`, which `run` calls before it joins any
// vCPU thread; kicks are sent only under the gate's lock while not ended.
// So every handle kicked belongs to a thread not yet joined (running, or
// finished and still joinable), which pthread_kill may signal.
#[allow(unsafe_code)]
unsafe impl Killable for Tid {
    fn pthread_handle(&self) -> libc::pthread_t {
        self.0
    }
}

/// What a machine is doing.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum State {
    /// Not started yet.
    Starting,
    /// Its vCPUs run.
    Running,
    /// Its vCPUs are paused.
    Paused,
    /// The run is over.
    Ended,
}

impl State {
    /// A lower-case name (for the API).
    pub fn name(self) -> &'static str {
        match self {
            State::Starting => "starting",
            State::Running => "running",
            State::Paused => "paused",
            State::Ended => "ended",
        }
    }
}

/// One disk, as [`Controller::info`] tells it.
#[derive(Debug, Clone)]
pub struct DiskInfo {
    /// The file served.
    pub name: String,
    /// Whether the guest may write it.
    pub writable: bool,
    /// Requests completed so far.
    pub requests: u64,
    /// Requests the disk failed.
    pub io_errors: u64,
    /// Requests refused as malformed.
    pub refused: u64,
    /// Its QoS limits.
    pub qos: Limits,
}

/// What [`Controller::info`] answers.
#[derive(Debug, Clone)]
pub struct Info {
    /// The machine's state.
    pub state: State,
    /// Its vCPUs.
    pub vcpus: usize,
    /// Its RAM in bytes.
    pub mem: u64,
    /// Time since the run started.
    pub uptime: Duration,
    /// Its disks, in device order.
    pub disks: Vec<DiskInfo>,
}

/// A disk of the run, as the controller sees it.
pub(crate) struct Attached {
    pub name: String,
    pub writable: bool,
    pub stats: Arc<Stats>,
    pub qos: Arc<Qos>,
}

struct Run {
    bus: Arc<Bus>,
    disks: Vec<Attached>,
    vcpus: usize,
    mem: u64,
    started: Instant,
}

#[derive(Default)]
struct Gate {
    /// A pause is wanted (vCPUs stop at the gate).
    closed: bool,
    /// vCPUs waiting at the gate.
    waiting: usize,
    /// vCPUs still in the run (not parked, not done).
    active: usize,
    /// The vCPU threads, while they may be kicked.
    tids: Vec<Tid>,
    /// The run, once started.
    run: Option<Run>,
    /// The run is over: nothing waits at the gate any more.
    ended: bool,
}

/// The handle that controls a machine (see the module docs).
#[derive(Default)]
pub struct Controller {
    gate: Mutex<Gate>,
    changed: Condvar,
}

impl Controller {
    /// A controller for a machine that starts running.
    pub fn new() -> Arc<Controller> {
        Arc::new(Controller::default())
    }

    /// A controller for a machine that starts paused: its vCPUs wait at
    /// the gate before their first instruction, until [`Controller::resume`].
    pub fn paused() -> Arc<Controller> {
        let c = Controller::default();
        c.lock().closed = true;
        Arc::new(c)
    }

    fn lock(&self) -> MutexGuard<'_, Gate> {
        self.gate
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// The run starts: its devices, and how many vCPUs will pass the gate.
    pub(crate) fn attach(
        &self,
        bus: Arc<Bus>,
        disks: Vec<Attached>,
        vcpus: usize,
        mem: u64,
        started: Instant,
    ) {
        let mut g = self.lock();
        g.active = vcpus;
        g.run = Some(Run {
            bus,
            disks,
            vcpus,
            mem,
            started,
        });
    }

    /// A vCPU thread started (it may be kicked from now on).
    pub(crate) fn add_thread(&self, tid: libc::pthread_t) {
        self.lock().tids.push(Tid(tid));
    }

    /// The run is over: release every vCPU at the gate, kick no more.
    /// Called before the vCPU threads are joined.
    pub(crate) fn end(&self) {
        let mut g = self.lock();
        g.ended = true;
        g.tids.clear();
        self.changed.notify_all();
    }

    /// A vCPU at the top of its loop: wait here while a pause is wanted.
    pub(crate) fn gate(&self) {
        let mut g = self.lock();
        if !g.closed || g.ended {
            return;
        }
        g.waiting += 1;
        self.changed.notify_all();
        while g.closed && !g.ended {
            g = self
                .changed
                .wait(g)
                .unwrap_or_else(std::sync::PoisonError::into_inner);
        }
        g.waiting -= 1;
    }

    /// A vCPU leaves the run for good (parked or done).
    pub(crate) fn leave(&self) {
        let mut g = self.lock();
        g.active = g.active.saturating_sub(1);
        self.changed.notify_all();
    }

    /// Pause the vCPUs; returns once none runs guest code.
    ///
    /// # Errors
    /// The run has not started or is over; the vCPUs did not stop within
    /// 5 s (the pause is then called off).
    pub fn pause(&self) -> Result<(), String> {
        let start = Instant::now();
        let mut g = self.lock();
        if g.ended {
            return Err("the run is over".into());
        }
        if g.run.is_none() {
            return Err("the machine has not started yet".into());
        }
        g.closed = true;
        while g.waiting < g.active && !g.ended {
            for t in &g.tids {
                let _ = t.kill(crate::vcpu::kick_signal());
            }
            if start.elapsed() > PAUSE_TIMEOUT {
                g.closed = false;
                self.changed.notify_all();
                return Err("the vCPUs did not stop within 5 s".into());
            }
            g = self
                .changed
                .wait_timeout(g, KICK_EVERY)
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .0;
        }
        if g.ended {
            return Err("the run ended".into());
        }
        Ok(())
    }

    /// Let paused vCPUs run again (nothing if they run).
    ///
    /// # Errors
    /// The run is over.
    pub fn resume(&self) -> Result<(), String> {
        let mut g = self.lock();
        if g.ended {
            return Err("the run is over".into());
        }
        g.closed = false;
        self.changed.notify_all();
        Ok(())
    }

    /// End the run as [`Outcome::Stopped`] (the disks are flushed and
    /// closed as after any end).
    ///
    /// # Errors
    /// The run has not started or is over.
    pub fn stop(&self) -> Result<(), String> {
        let g = self.lock();
        if g.ended {
            return Err("the run is over".into());
        }
        let Some(run) = &g.run else {
            return Err("the machine has not started yet".into());
        };
        run.bus.control.finish(Ok(Outcome::Stopped));
        Ok(())
    }

    /// Change disk `disk`'s QoS limits.
    ///
    /// # Errors
    /// No such disk, or the run has not started.
    pub fn set_qos(&self, disk: usize, limits: Limits) -> Result<(), String> {
        let g = self.lock();
        let Some(run) = &g.run else {
            return Err("the machine has not started yet".into());
        };
        let d = run.disks.get(disk).ok_or_else(|| {
            format!(
                "no disk {disk}: the machine has {} (0-based)",
                run.disks.len()
            )
        })?;
        d.qos.set(limits);
        Ok(())
    }

    /// What the machine is doing.
    pub fn info(&self) -> Info {
        let g = self.lock();
        let state = match (&g.run, g.ended) {
            (_, true) => State::Ended,
            (None, false) => State::Starting,
            _ if g.closed && g.waiting >= g.active => State::Paused,
            _ => State::Running,
        };
        let Some(run) = &g.run else {
            return Info {
                state,
                vcpus: 0,
                mem: 0,
                uptime: Duration::ZERO,
                disks: Vec::new(),
            };
        };
        Info {
            state,
            vcpus: run.vcpus,
            mem: run.mem,
            uptime: run.started.elapsed(),
            disks: run
                .disks
                .iter()
                .map(|d| DiskInfo {
                    name: d.name.clone(),
                    writable: d.writable,
                    requests: d.stats.requests.load(Ordering::Relaxed),
                    io_errors: d.stats.io_errors.load(Ordering::Relaxed),
                    refused: d.stats.refused.load(Ordering::Relaxed),
                    qos: d.qos.limits(),
                })
                .collect(),
        }
    }
}
