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
use crate::migrate::{migrate, Ends, MigrateOptions, MigrateReport};
use crate::qos::{Limits, Qos};
pub use crate::snapshot::take::CheckpointReport;
use crate::virtio::blk::{Blk, Stats};
use crate::virtio::mmio::Transport;
use crate::Outcome;
use std::cell::Cell;
use std::sync::atomic::AtomicBool;
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
    pub name: Mutex<String>,
    pub writable: bool,
    pub stats: Arc<Stats>,
    pub qos: Arc<Qos>,
    pub transport: Arc<Transport<Blk>>,
    pub migrating: AtomicBool,
}

/// What the controller reaches of a running machine.
pub(crate) struct Parts {
    pub bus: Arc<Bus>,
    pub disks: Vec<Attached>,
    pub vcpus: usize,
    pub mem: u64,
    pub started: Instant,
    pub vm: Arc<kvm_ioctls::VmFd>,
    pub ram: Arc<crate::memory::Ram>,
    pub linux: bool,
    /// The bundle of disk 0 (taken out while a checkpoint is under way).
    pub bundle: Option<checkpoint::Bundle>,
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
    run: Option<Parts>,
    /// The run is over: nothing waits at the gate any more.
    ended: bool,
    /// A capture of every vCPU's state is asked for (a VM checkpoint):
    /// its number; each vCPU answers once per number, in `captures`.
    capture_gen: u64,
    /// The capture number each vCPU last answered.
    served: Vec<u64>,
    /// Each vCPU's answer to the current capture (its state, and whether
    /// it is parked).
    captures: Vec<Option<Result<Captured, String>>>,
}

/// A vCPU's captured state and whether it is parked.
type Captured = (Vec<u8>, bool);

/// What a vCPU thread gives the gate to capture its state with.
pub(crate) type Capture<'a> = &'a dyn Fn() -> Result<Vec<u8>, String>;

/// The run, if it has started and not ended.
fn running(g: &Gate) -> Result<&Parts, String> {
    if g.ended {
        return Err("the run is over".into());
    }
    g.run
        .as_ref()
        .ok_or_else(|| "the machine has not started yet".into())
}

impl Parts {
    /// Disk `i`.
    fn disk(&self, i: usize) -> Result<&Attached, String> {
        self.disks.get(i).ok_or_else(|| {
            format!(
                "no disk {i}: the machine has {} (0-based)",
                self.disks.len()
            )
        })
    }
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
    pub(crate) fn attach(&self, parts: Parts) {
        let mut g = self.lock();
        g.active = parts.vcpus;
        g.run = Some(parts);
    }

    /// A vCPU thread started (it may be kicked from now on).
    pub(crate) fn add_thread(&self, tid: libc::pthread_t) {
        self.lock().tids.push(Tid(tid));
    }

    /// The run is over: release every vCPU at the gate, kick no more.
    /// Called before the vCPU threads are joined.
    /// Returns the bundle, for the run to let go of after its disks.
    pub(crate) fn end(&self) -> Option<checkpoint::Bundle> {
        let mut g = self.lock();
        g.ended = true;
        g.tids.clear();
        // Let go of the devices (and so of the disks) with the run.
        let bundle = g.run.take().and_then(|mut r| r.bundle.take());
        self.changed.notify_all();
        bundle
    }

    /// A vCPU at the top of its loop: wait here while a pause is wanted.
    ///
    /// While it waits it answers capture requests with `capture`.
    pub(crate) fn gate(&self, index: usize, capture: Capture<'_>) {
        let mut g = self.lock();
        if !g.closed || g.ended {
            return;
        }
        g.waiting += 1;
        self.changed.notify_all();
        while g.closed && !g.ended {
            if Self::serve_capture(&mut g, index, capture, false) {
                self.changed.notify_all();
                continue;
            }
            g = self
                .changed
                .wait(g)
                .unwrap_or_else(std::sync::PoisonError::into_inner);
        }
        g.waiting -= 1;
    }

    /// Answer the current capture request, if this vCPU has not yet:
    /// whether it did.
    fn serve_capture(g: &mut Gate, index: usize, capture: Capture<'_>, parked: bool) -> bool {
        if g.served.len() <= index {
            g.served.resize(index + 1, 0);
        }
        if g.served[index] == g.capture_gen {
            return false;
        }
        g.served[index] = g.capture_gen;
        let r = capture().map(|s| (s, parked));
        if let Some(slot) = g.captures.get_mut(index) {
            *slot = Some(r);
        }
        true
    }

    /// A vCPU leaves the run for good (done).
    pub(crate) fn leave(&self) {
        let mut g = self.lock();
        g.active = g.active.saturating_sub(1);
        self.changed.notify_all();
    }

    /// A vCPU parks (port 0xf5, or restored parked): it leaves the count
    /// of running vCPUs and waits for the end of the run, answering
    /// capture requests meanwhile (a checkpoint records it parked).
    pub(crate) fn park(&self, index: usize, capture: Capture<'_>) {
        let mut g = self.lock();
        g.active = g.active.saturating_sub(1);
        self.changed.notify_all();
        while !g.ended {
            if Self::serve_capture(&mut g, index, capture, true) {
                self.changed.notify_all();
                continue;
            }
            g = self
                .changed
                .wait(g)
                .unwrap_or_else(std::sync::PoisonError::into_inner);
        }
    }

    /// Every vCPU's state (all paused or parked: call after
    /// [`Controller::pause`]), in vCPU order, each with whether it is
    /// parked.
    pub(crate) fn capture_vcpus(&self, vcpus: usize) -> Result<Vec<(Vec<u8>, bool)>, String> {
        let start = Instant::now();
        let mut g = self.lock();
        g.capture_gen += 1;
        g.captures = vec![None; vcpus];
        self.changed.notify_all();
        while g.captures.iter().any(Option::is_none) {
            if g.ended {
                return Err("the run ended".into());
            }
            if start.elapsed() > PAUSE_TIMEOUT {
                return Err("the vCPUs did not give their state within 5 s".into());
            }
            g = self
                .changed
                .wait_timeout(g, KICK_EVERY)
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .0;
        }
        std::mem::take(&mut g.captures)
            .into_iter()
            .enumerate()
            .map(|(i, c)| {
                c.unwrap_or_else(|| Err("no answer".into()))
                    .map_err(|e| format!("vCPU {i}: {e}"))
            })
            .collect()
    }

    /// Pause the vCPUs; returns once none runs guest code.
    ///
    /// # Errors
    /// The run has not started or is over; the vCPUs did not stop within
    /// 5 s (the pause is then called off).
    pub fn pause(&self) -> Result<(), String> {
        let start = Instant::now();
        let mut g = self.lock();
        running(&g)?;
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
        running(&g)?.bus.control.finish(Ok(Outcome::Stopped));
        Ok(())
    }

    /// Change disk `disk`'s QoS limits.
    ///
    /// # Errors
    /// No such disk, or the run has not started.
    pub fn set_qos(&self, disk: usize, limits: Limits) -> Result<(), String> {
        let g = self.lock();
        running(&g)?.disk(disk)?.qos.set(limits);
        Ok(())
    }

    /// Move disk `disk` to a new image while the guest runs (see
    /// [`crate::migrate`]); returns when the device serves the new image,
    /// or, on failure, with the guest still on the old one.
    ///
    /// # Errors
    /// No such disk, one migration of it is already under way, the run has
    /// not started or ends, the destination cannot be created or written.
    pub fn migrate_storage(
        &self,
        disk: usize,
        o: &MigrateOptions,
    ) -> Result<MigrateReport, String> {
        let (transport, bus) = {
            let g = self.lock();
            let run = running(&g)?;
            let d = run.disk(disk)?;
            if d.migrating.swap(true, Ordering::AcqRel) {
                return Err(format!("disk {disk} is already being migrated"));
            }
            (d.transport.clone(), run.bus.clone())
        };
        // A machine paused by someone else stays paused after the switch.
        let was_paused = Cell::new(false);
        let pause = || {
            was_paused.set(self.lock().closed);
            self.pause()
        };
        let resume = || {
            if was_paused.get() {
                Ok(())
            } else {
                self.resume()
            }
        };
        let stopping = || bus.control.stopping();
        let r = migrate(
            &Ends {
                transport: &transport,
                pause: &pause,
                resume: &resume,
                stopping: &stopping,
            },
            o,
        );
        let g = self.lock();
        if let Some(d) = g.run.as_ref().and_then(|run| run.disks.get(disk)) {
            if r.is_ok() {
                if let Ok(mut n) = d.name.lock() {
                    *n = o.dest.display().to_string();
                }
            }
            d.migrating.store(false, Ordering::Release);
        }
        r
    }

    /// Take VM checkpoint `name`: the vCPUs paused, the devices drained,
    /// the vCPUs', devices', UART's and (Linux) interrupt controllers'
    /// state and guest memory written to the bundle (`vm/ID.state`,
    /// `vm/ID.mem`), then the bundle's disk checkpoint of the same name
    /// taken at the same instant (the active disk closed, frozen as
    /// `name`, its new child opened and served); then the vCPUs resume
    /// (unless they were paused before).
    ///
    /// # Errors
    /// No bundle, another writable disk (its contents would not be part
    /// of the checkpoint), a name the bundle refuses, I/O errors. On error
    /// the guest goes on as before, on the same disk.
    pub fn checkpoint(&self, name: &str) -> Result<CheckpointReport, String> {
        let started = Instant::now();
        let (mut bundle, bus, vm, ram, linux, mem, vcpus, transports, disks) = {
            let mut g = self.lock();
            running(&g)?;
            let Some(run) = g.run.as_mut() else {
                return Err("the machine has not started yet".into());
            };
            if let Some(i) = run.disks.iter().skip(1).position(|d| d.writable) {
                return Err(format!(
                    "disk {} is writable and not in the bundle: its contents would not be part \
                     of the checkpoint (give it ,ro)",
                    i + 1
                ));
            }
            let Some(bundle) = run.bundle.take() else {
                return Err(
                    "this VM runs no checkpoint bundle (vmm run --bundle DIR), or a checkpoint \
                     is under way"
                        .into(),
                );
            };
            let disks: Vec<crate::snapshot::DiskConf> = run
                .disks
                .iter()
                .map(|d| crate::snapshot::DiskConf {
                    name: d.name.lock().map(|n| n.clone()).unwrap_or_default(),
                    writable: d.writable,
                })
                .collect();
            (
                bundle,
                run.bus.clone(),
                run.vm.clone(),
                run.ram.clone(),
                run.linux,
                run.mem,
                run.vcpus,
                run.disks
                    .iter()
                    .map(|d| d.transport.clone())
                    .collect::<Vec<_>>(),
                disks,
            )
        };
        let was_paused = self.lock().closed;
        let r = self.pause().and_then(|()| {
            crate::snapshot::take::take(&mut crate::snapshot::take::Machine {
                ctl: self,
                bundle: &mut bundle,
                bus: &bus,
                vm: &vm,
                ram: &ram,
                linux,
                mem,
                vcpus,
                transports: &transports,
                disks,
                name,
            })
        });
        let resumed = if was_paused { Ok(()) } else { self.resume() };
        // The bundle goes back, whatever happened.
        if let Some(run) = self.lock().run.as_mut() {
            run.bundle = Some(bundle);
        }
        let mut report = r?;
        resumed?;
        report.elapsed = started.elapsed();
        Ok(report)
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
                    name: d.name.lock().map(|n| n.clone()).unwrap_or_default(),
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

#[cfg(test)]
mod tests {
    use super::*;

    /// A parked vCPU answers a capture and is let go at the end, however
    /// the end interleaves with its waiting (the wake-up once raced).
    #[test]
    fn parked_vcpus_answer_captures_and_wake_at_the_end() {
        for round in 0..500 {
            let c = Arc::new(Controller::default());
            c.lock().active = 1;
            let parked = {
                let c = c.clone();
                std::thread::spawn(move || c.park(0, &|| Ok(vec![7, 7])))
            };
            if round % 2 == 0 {
                let got = c.capture_vcpus(1).unwrap();
                assert_eq!(got, vec![(vec![7, 7], true)]);
            }
            let _ = c.end();
            let t0 = Instant::now();
            while !parked.is_finished() {
                assert!(t0.elapsed() < Duration::from_secs(5), "round {round}");
                std::thread::yield_now();
            }
            parked.join().unwrap();
            assert!(c.capture_vcpus(1).unwrap_err().contains("ended"));
        }
    }
}
