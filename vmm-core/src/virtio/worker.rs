//! The I/O thread of a device: it sleeps on the queue-notify event (the
//! ioeventfd KVM signals when the guest writes QueueNotify, without an exit
//! to the VMM) and serves the device's queues, off the vCPU threads.

use super::mmio::Transport;
use super::VirtioDevice;
use crate::{Error, Result};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use vmm_sys_util::eventfd::EventFd;

/// A running I/O thread.
pub struct Worker {
    handle: Option<JoinHandle<()>>,
    stop: Arc<AtomicBool>,
    wake: EventFd,
}

impl Worker {
    /// Start serving `transport` on a thread named `name`.
    ///
    /// # Errors
    /// The event cannot be shared or the thread cannot start.
    pub fn spawn<D: VirtioDevice + 'static>(
        name: String,
        transport: Arc<Transport<D>>,
    ) -> Result<Worker> {
        let wake = transport
            .notify_event()
            .try_clone()
            .map_err(|e| Error::io("sharing a queue-notify event", e))?;
        let stop = Arc::new(AtomicBool::new(false));
        let s = stop.clone();
        let handle = std::thread::Builder::new()
            .name(name)
            .spawn(move || loop {
                // A blocking read: returns once the guest (or stop) wrote.
                if transport.notify_event().read().is_err() || s.load(Ordering::Acquire) {
                    return;
                }
                transport.serve();
            })
            .map_err(|e| Error::io("starting an I/O thread", e))?;
        Ok(Worker {
            handle: Some(handle),
            stop,
            wake,
        })
    }

    /// Stop the thread (after the request it is serving) and wait for it.
    pub fn stop(mut self) {
        self.stop_now();
    }

    fn stop_now(&mut self) {
        self.stop.store(true, Ordering::Release);
        let _ = self.wake.write(1);
        if let Some(h) = self.handle.take() {
            let _ = h.join();
        }
    }
}

impl Drop for Worker {
    fn drop(&mut self) {
        self.stop_now();
    }
}
