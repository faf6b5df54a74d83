//! What the vCPUs reach through their exits: the I/O ports (the exit port,
//! the park port, the UART) and the virtio-mmio windows; and the run's
//! control (who ended it, and how).

use crate::acpi::dsdt::S5_SLP_TYP;
use crate::layout::{
    ACPI_SLEEP_CONTROL, ACPI_SLEEP_STATUS, EXIT_PORT, PARK_PORT, SERIAL_PORT, VIRTIO_MMIO_BASE,
    VIRTIO_MMIO_SIZE,
};
use crate::serial::Uart;
use crate::virtio::blk::Blk;
use crate::virtio::mmio::Transport;
use crate::{Error, Outcome};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::Duration;

/// How often [`Control::wait`] looks at its stop flag.
const STOP_POLL: Duration = Duration::from_millis(20);

/// How a run ends: the first outcome wins; the others stop.
#[derive(Default)]
pub struct Control {
    outcome: Mutex<Option<Result<Outcome, Error>>>,
    done: Condvar,
    stop: AtomicBool,
    running: AtomicUsize,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

impl Control {
    /// A run of `vcpus` vCPUs.
    pub fn new(vcpus: usize) -> Control {
        Control {
            running: AtomicUsize::new(vcpus),
            ..Control::default()
        }
    }

    /// End the run (unless it already ended).
    pub fn finish(&self, result: Result<Outcome, Error>) {
        let mut o = lock(&self.outcome);
        if o.is_none() {
            *o = Some(result);
        }
        self.stop.store(true, Ordering::Release);
        self.done.notify_all();
    }

    /// Whether the run is over.
    pub fn stopping(&self) -> bool {
        self.stop.load(Ordering::Acquire)
    }

    /// A vCPU parks itself: it waits for the end of the run. The last
    /// vCPU to park ends it.
    ///
    /// The vCPU then waits for the end of the run at its controller's
    /// gate ([`crate::Controller`]), which [`crate::run`] opens for good
    /// once the outcome is known.
    pub fn park(&self, vcpu: usize) {
        if self.running.fetch_sub(1, Ordering::AcqRel) == 1 {
            self.finish(Ok(Outcome::Fault {
                vcpu,
                what: "every vCPU parked itself (port 0xf5) without ending the run (port 0xf4)"
                    .into(),
            }));
        }
    }

    /// Wait for the outcome, at most `timeout` (then the run is stopped
    /// as timed out), or until `stop` is set (then it ends as
    /// [`Outcome::Stopped`]; the flag is looked at every 20 ms).
    pub fn wait(
        &self,
        timeout: Option<Duration>,
        stop: Option<&AtomicBool>,
    ) -> Result<Outcome, Error> {
        let mut o = lock(&self.outcome);
        match (timeout, stop) {
            (_, Some(stop)) => {
                let start = std::time::Instant::now();
                while o.is_none() {
                    if stop.load(Ordering::Acquire) {
                        *o = Some(Ok(Outcome::Stopped));
                        break;
                    }
                    let slice = match timeout {
                        Some(t) if start.elapsed() >= t => {
                            *o = Some(Ok(Outcome::TimedOut(t)));
                            break;
                        }
                        Some(t) => (t - start.elapsed()).min(STOP_POLL),
                        None => STOP_POLL,
                    };
                    o = self
                        .done
                        .wait_timeout(o, slice)
                        .unwrap_or_else(std::sync::PoisonError::into_inner)
                        .0;
                }
            }
            (None, None) => {
                while o.is_none() {
                    o = self
                        .done
                        .wait(o)
                        .unwrap_or_else(std::sync::PoisonError::into_inner);
                }
            }
            (Some(t), None) => {
                let (g, _) = self
                    .done
                    .wait_timeout_while(o, t, |o| o.is_none())
                    .unwrap_or_else(std::sync::PoisonError::into_inner);
                o = g;
                if o.is_none() {
                    *o = Some(Ok(Outcome::TimedOut(t)));
                }
            }
        }
        self.stop.store(true, Ordering::Release);
        self.done.notify_all();
        o.take().unwrap_or(Ok(Outcome::TimedOut(Duration::ZERO)))
    }
}

/// The devices and the run's control, shared by the vCPU threads.
pub struct Bus {
    /// The UART.
    pub uart: Mutex<Uart>,
    /// The virtio-blk devices, device `i` at `VIRTIO_MMIO_BASE + i * 0x1000`.
    pub blk: Vec<Arc<Transport<Blk>>>,
    /// The run's control.
    pub control: Control,
    /// A Linux guest: the exit and park ports are ordinary (absent)
    /// ports, the ACPI sleep registers are there (a power-off ends the run
    /// as [`Outcome::Exited`]`(0)`), and loads and stores where there is
    /// nothing read all ones and are dropped, as on a PC.
    pub linux: bool,
}

/// SLP_EN in the sleep control register (ACPI 6.4 §4.8.3.7, table 4.20);
/// SLP_TYPx is in bits 2-4.
const SLP_EN: u8 = 1 << 5;

/// What a port or MMIO access asks of the vCPU's loop.
pub enum Action {
    /// Go on running.
    Continue,
    /// The run ended (the control knows how).
    Stop,
    /// Park this vCPU.
    Park,
}

impl Bus {
    /// A guest `out` of `data` to `port`.
    pub fn port_write(&self, port: u16, data: &[u8]) -> Action {
        match port {
            ACPI_SLEEP_CONTROL if self.linux => {
                let v = data.first().copied().unwrap_or(0);
                if v & SLP_EN != 0 && (v >> 2) & 7 == S5_SLP_TYP {
                    self.control.finish(Ok(Outcome::Exited(0)));
                    return Action::Stop;
                }
                Action::Continue
            }
            EXIT_PORT if !self.linux => {
                let mut v = [0u8; 4];
                let n = data.len().min(4);
                v[..n].copy_from_slice(&data[..n]);
                self.control
                    .finish(Ok(Outcome::Exited(u32::from_le_bytes(v))));
                Action::Stop
            }
            PARK_PORT if !self.linux => Action::Park,
            p if (SERIAL_PORT..SERIAL_PORT + 8).contains(&p) => {
                let mut u = lock(&self.uart);
                for b in data {
                    u.write(reg(p), *b);
                }
                Action::Continue
            }
            // No device: writes are dropped.
            _ => Action::Continue,
        }
    }

    /// A guest `in` from `port` into `data`.
    pub fn port_read(&self, port: u16, data: &mut [u8]) {
        match port {
            // Never asleep, no wake event pending.
            ACPI_SLEEP_STATUS if self.linux => data.fill(0),
            p if (SERIAL_PORT..SERIAL_PORT + 8).contains(&p) => {
                let mut u = lock(&self.uart);
                for b in data.iter_mut() {
                    *b = u.read(reg(p));
                }
            }
            // No device: all ones, as on a PC.
            _ => data.fill(0xff),
        }
    }

    /// The device whose window holds `addr`, and the offset in it.
    fn window(&self, addr: u64) -> Option<(&Arc<Transport<Blk>>, u64)> {
        let rel = addr.checked_sub(VIRTIO_MMIO_BASE)?;
        let i = usize::try_from(rel / VIRTIO_MMIO_SIZE).ok()?;
        Some((self.blk.get(i)?, rel % VIRTIO_MMIO_SIZE))
    }

    /// A guest load from `addr` outside RAM; `false` when nothing is
    /// there.
    pub fn mmio_read(&self, addr: u64, data: &mut [u8]) -> bool {
        match self.window(addr) {
            Some((t, off)) => {
                t.read(off, data);
                true
            }
            None if self.linux => {
                data.fill(0xff);
                true
            }
            None => false,
        }
    }

    /// A guest store to `addr` outside RAM; `false` when nothing is there.
    pub fn mmio_write(&self, addr: u64, data: &[u8]) -> bool {
        match self.window(addr) {
            Some((t, off)) => {
                t.write(off, data);
                true
            }
            None => self.linux,
        }
    }

    /// Flush the console.
    pub fn flush_console(&self) {
        lock(&self.uart).flush();
    }
}

/// The UART register a port in [SERIAL_PORT, SERIAL_PORT + 8) is.
fn reg(port: u16) -> u8 {
    u8::try_from(port.wrapping_sub(SERIAL_PORT) & 7).unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_last_vcpu_to_park_ends_the_run() {
        let c = Control::new(2);
        c.park(0);
        assert!(!c.stopping());
        c.park(1);
        assert!(c.stopping());
        match c.wait(None, None).unwrap() {
            Outcome::Fault { vcpu: 1, what } => assert!(what.contains("parked"), "{what}"),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn a_stop_flag_ends_the_wait() {
        let c = Arc::new(Control::new(1));
        let stop = Arc::new(AtomicBool::new(false));
        let setter = {
            let stop = stop.clone();
            std::thread::spawn(move || {
                std::thread::sleep(Duration::from_millis(30));
                stop.store(true, Ordering::Release);
            })
        };
        let o = c.wait(Some(Duration::from_secs(30)), Some(&stop)).unwrap();
        assert_eq!(o, Outcome::Stopped);
        assert!(c.stopping());
        setter.join().unwrap();
        // A timeout still applies while a flag is watched.
        let c = Control::new(1);
        let never = AtomicBool::new(false);
        let o = c
            .wait(Some(Duration::from_millis(40)), Some(&never))
            .unwrap();
        assert!(matches!(o, Outcome::TimedOut(_)), "{o:?}");
        // And an outcome that comes first wins.
        let c = Control::new(1);
        c.finish(Ok(Outcome::Exited(7)));
        assert_eq!(c.wait(None, Some(&never)).unwrap(), Outcome::Exited(7));
    }

    #[test]
    fn uart_registers() {
        assert_eq!(reg(SERIAL_PORT), 0);
        assert_eq!(reg(SERIAL_PORT + 5), 5);
    }
}
