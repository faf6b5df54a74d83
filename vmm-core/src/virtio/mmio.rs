//! The virtio-mmio transport, version 2 (virtio 1.2, section 4.2.2): the
//! register window of one device, its status and feature negotiation, and
//! its queues' configuration.
//!
//! Every register access a guest makes is answered, whatever the order:
//! registers only take effect in the state the spec allows them in
//! (features before FEATURES_OK, queue layout before the queue is ready
//! and before DRIVER_OK), a feature set without VIRTIO_F_VERSION_1 or with
//! features not offered leaves FEATURES_OK clear, a queue layout that does
//! not fit guest RAM leaves the queue not ready, and a corrupt queue puts
//! the device in NEEDS_RESET until the driver resets it. Accesses to the
//! registers other than aligned 32-bit ones read 0 and are ignored.

use super::queue::{Queue, QueueConfig, QUEUE_MAX};
use super::VirtioDevice;
use crate::memory::Ram;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;
use virtio_bindings::virtio_config::{
    VIRTIO_CONFIG_S_ACKNOWLEDGE, VIRTIO_CONFIG_S_DRIVER, VIRTIO_CONFIG_S_DRIVER_OK,
    VIRTIO_CONFIG_S_FAILED, VIRTIO_CONFIG_S_FEATURES_OK, VIRTIO_CONFIG_S_NEEDS_RESET,
    VIRTIO_F_VERSION_1,
};
use virtio_bindings::virtio_mmio::{
    VIRTIO_MMIO_CONFIG, VIRTIO_MMIO_CONFIG_GENERATION, VIRTIO_MMIO_DEVICE_FEATURES,
    VIRTIO_MMIO_DEVICE_FEATURES_SEL, VIRTIO_MMIO_DEVICE_ID, VIRTIO_MMIO_DRIVER_FEATURES,
    VIRTIO_MMIO_DRIVER_FEATURES_SEL, VIRTIO_MMIO_INTERRUPT_ACK, VIRTIO_MMIO_INTERRUPT_STATUS,
    VIRTIO_MMIO_INT_CONFIG, VIRTIO_MMIO_INT_VRING, VIRTIO_MMIO_MAGIC_VALUE,
    VIRTIO_MMIO_QUEUE_AVAIL_HIGH, VIRTIO_MMIO_QUEUE_AVAIL_LOW, VIRTIO_MMIO_QUEUE_DESC_HIGH,
    VIRTIO_MMIO_QUEUE_DESC_LOW, VIRTIO_MMIO_QUEUE_NOTIFY, VIRTIO_MMIO_QUEUE_NUM,
    VIRTIO_MMIO_QUEUE_NUM_MAX, VIRTIO_MMIO_QUEUE_READY, VIRTIO_MMIO_QUEUE_SEL,
    VIRTIO_MMIO_QUEUE_USED_HIGH, VIRTIO_MMIO_QUEUE_USED_LOW, VIRTIO_MMIO_SHM_BASE_HIGH,
    VIRTIO_MMIO_SHM_BASE_LOW, VIRTIO_MMIO_SHM_LEN_HIGH, VIRTIO_MMIO_SHM_LEN_LOW,
    VIRTIO_MMIO_STATUS, VIRTIO_MMIO_VENDOR_ID, VIRTIO_MMIO_VERSION,
};
use vmm_sys_util::eventfd::EventFd;

/// "virt", the magic value.
const MAGIC: u32 = 0x7472_6976;
/// The transport version: 2, virtio 1.x ("modern").
const VERSION: u32 = 2;
/// The vendor id: "vdsk".
pub const VENDOR: u32 = u32::from_le_bytes(*b"vdsk");

/// What is behind a register window, under one lock: the transport's
/// registers and the device.
pub struct State<D> {
    device: D,
    status: u32,
    device_features_sel: u32,
    driver_features_sel: u32,
    driver_features: u64,
    queue_sel: u32,
    configs: Vec<QueueConfig>,
    queues: Vec<Option<Queue>>,
    interrupt_status: u32,
    /// Why the device last refused something or entered NEEDS_RESET.
    problem: Option<String>,
}

/// A transport's registers and queues, for a VM checkpoint (taken with no
/// request in flight: the device's lock held after its queues were served).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct TransportState {
    /// Status.
    pub status: u32,
    /// DeviceFeaturesSel.
    pub device_features_sel: u32,
    /// DriverFeaturesSel.
    pub driver_features_sel: u32,
    /// The features the driver accepted.
    pub driver_features: u64,
    /// QueueSel.
    pub queue_sel: u32,
    /// Each queue: size, ready, the three ring addresses, and (when ready)
    /// the device's next available and used indices.
    pub queues: Vec<QueueState>,
    /// InterruptStatus.
    pub interrupt_status: u32,
}

/// One queue in a [`TransportState`].
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct QueueState {
    /// QueueNum.
    pub size: u16,
    /// QueueReady.
    pub ready: bool,
    /// QueueDesc.
    pub desc: u64,
    /// QueueDriver.
    pub avail: u64,
    /// QueueDevice.
    pub used: u64,
    /// The device's next available and used indices, when ready.
    pub indices: Option<(u16, u16)>,
}

impl<D: VirtioDevice> State<D> {
    /// The registers and queues, for a checkpoint.
    pub fn save(&self) -> TransportState {
        TransportState {
            status: self.status,
            device_features_sel: self.device_features_sel,
            driver_features_sel: self.driver_features_sel,
            driver_features: self.driver_features,
            queue_sel: self.queue_sel,
            queues: self
                .configs
                .iter()
                .zip(&self.queues)
                .map(|(c, q)| QueueState {
                    size: c.size,
                    ready: c.ready,
                    desc: c.desc,
                    avail: c.avail,
                    used: c.used,
                    indices: q.as_ref().map(Queue::indices),
                })
                .collect(),
            interrupt_status: self.interrupt_status,
        }
    }

    /// Take the registers and queues of `s` (a checkpoint of a device of
    /// the same kind), the rings checked against `ram` again.
    ///
    /// # Errors
    /// The state does not fit this device or this RAM.
    pub fn restore(&mut self, s: &TransportState, ram: &Ram) -> Result<(), String> {
        if s.queues.len() != self.configs.len() {
            return Err(format!(
                "{} queues in the checkpoint, the device has {}",
                s.queues.len(),
                self.configs.len()
            ));
        }
        if s.driver_features & !self.offered() != 0 {
            return Err(format!(
                "the checkpoint's features {:#x} are not all offered by this device ({:#x})",
                s.driver_features,
                self.offered()
            ));
        }
        for (i, q) in s.queues.iter().enumerate() {
            let c = QueueConfig {
                size: q.size,
                ready: q.ready,
                desc: q.desc,
                avail: q.avail,
                used: q.used,
            };
            self.configs[i] = c;
            self.queues[i] = match q.indices {
                Some((a, u)) if q.ready => {
                    let mut made = Queue::new(&c, ram).map_err(|e| format!("queue {i}: {e}"))?;
                    made.set_indices(a, u);
                    Some(made)
                }
                _ => None,
            };
        }
        self.status = s.status;
        self.device_features_sel = s.device_features_sel;
        self.driver_features_sel = s.driver_features_sel;
        self.driver_features = s.driver_features;
        self.queue_sel = s.queue_sel;
        self.interrupt_status = s.interrupt_status;
        self.problem = None;
        Ok(())
    }

    /// Serve every request the driver has made available, here and now
    /// (with the lock held: a checkpoint drains the queues). Whether the
    /// queues are sound (false: the device entered NEEDS_RESET).
    pub fn drain(&mut self, ram: &Ram) -> bool {
        if !self.running() {
            return true;
        }
        loop {
            let mut any = false;
            for q in self.queues.iter_mut().flatten() {
                match self.device.process(ram, q) {
                    Ok(true) => any = true,
                    Ok(false) => {}
                    Err(e) => {
                        self.problem = Some(format!("queue corrupt, device needs reset: {e}"));
                        self.status |= VIRTIO_CONFIG_S_NEEDS_RESET;
                        self.interrupt_status |= VIRTIO_MMIO_INT_CONFIG;
                        return false;
                    }
                }
            }
            if !any {
                return true;
            }
            self.interrupt_status |= VIRTIO_MMIO_INT_VRING;
        }
    }

    fn offered(&self) -> u64 {
        self.device.features() | (1u64 << VIRTIO_F_VERSION_1)
    }

    fn reset(&mut self) {
        self.status = 0;
        self.device_features_sel = 0;
        self.driver_features_sel = 0;
        self.driver_features = 0;
        self.queue_sel = 0;
        self.configs
            .iter_mut()
            .for_each(|c| *c = QueueConfig::default());
        self.queues.iter_mut().for_each(|q| *q = None);
        self.interrupt_status = 0;
    }

    /// The selected queue's configuration, while the driver may still
    /// change it: features accepted, not yet DRIVER_OK, queue not ready.
    fn queue_config_mut(&mut self) -> Option<&mut QueueConfig> {
        let i = usize::try_from(self.queue_sel).ok()?;
        let open = self.status & VIRTIO_CONFIG_S_FEATURES_OK != 0
            && self.status & VIRTIO_CONFIG_S_DRIVER_OK == 0
            && self.queues.get(i).is_some_and(Option::is_none);
        if open {
            self.configs.get_mut(i)
        } else {
            None
        }
    }

    fn write_status(&mut self, v: u32) {
        if v == 0 {
            self.reset();
            return;
        }
        let old = self.status;
        // The driver never clears a bit but by resetting, never sets
        // NEEDS_RESET, and goes through the steps in order.
        let mut new = (v & !VIRTIO_CONFIG_S_NEEDS_RESET) | (old & VIRTIO_CONFIG_S_NEEDS_RESET);
        if new & old != old {
            self.problem = Some(format!(
                "status {v:#x} would clear bits of {old:#x}: ignored"
            ));
            return;
        }
        let steps = [
            VIRTIO_CONFIG_S_ACKNOWLEDGE,
            VIRTIO_CONFIG_S_DRIVER,
            VIRTIO_CONFIG_S_FEATURES_OK,
            VIRTIO_CONFIG_S_DRIVER_OK,
        ];
        for w in steps.windows(2) {
            if new & w[1] != 0 && new & w[0] == 0 {
                self.problem = Some(format!("status {v:#x} skips a step: ignored"));
                return;
            }
        }
        if new & VIRTIO_CONFIG_S_FEATURES_OK != 0 && old & VIRTIO_CONFIG_S_FEATURES_OK == 0 {
            let f = self.driver_features;
            if f & !self.offered() != 0 || f & (1 << VIRTIO_F_VERSION_1) == 0 {
                self.problem = Some(format!(
                    "features {f:#x} refused (offered {:#x}; VIRTIO_F_VERSION_1 is required)",
                    self.offered()
                ));
                new &= !(VIRTIO_CONFIG_S_FEATURES_OK | VIRTIO_CONFIG_S_DRIVER_OK);
            }
        }
        self.status = new;
    }

    fn read(&self, offset: u32) -> u32 {
        let q = usize::try_from(self.queue_sel).ok();
        let cfg = q.and_then(|i| self.configs.get(i));
        match offset {
            VIRTIO_MMIO_MAGIC_VALUE => MAGIC,
            VIRTIO_MMIO_VERSION => VERSION,
            VIRTIO_MMIO_DEVICE_ID => self.device.device_id(),
            VIRTIO_MMIO_VENDOR_ID => VENDOR,
            VIRTIO_MMIO_DEVICE_FEATURES => match self.device_features_sel {
                0 => lo(self.offered()),
                1 => lo(self.offered() >> 32),
                _ => 0,
            },
            VIRTIO_MMIO_QUEUE_NUM_MAX => cfg.map_or(0, |_| u32::from(QUEUE_MAX)),
            VIRTIO_MMIO_QUEUE_READY => u32::from(
                q.and_then(|i| self.queues.get(i))
                    .is_some_and(Option::is_some),
            ),
            VIRTIO_MMIO_INTERRUPT_STATUS => self.interrupt_status,
            VIRTIO_MMIO_STATUS => self.status,
            // No shared memory regions: length all ones.
            VIRTIO_MMIO_SHM_LEN_LOW | VIRTIO_MMIO_SHM_LEN_HIGH => u32::MAX,
            VIRTIO_MMIO_SHM_BASE_LOW | VIRTIO_MMIO_SHM_BASE_HIGH => u32::MAX,
            VIRTIO_MMIO_CONFIG_GENERATION => 0,
            _ => 0,
        }
    }

    /// A register write; whether the device's queues should be served now.
    fn write(&mut self, offset: u32, v: u32, ram: &Ram) -> bool {
        let set_lo = |a: &mut u64| *a = (*a & !0xffff_ffff) | u64::from(v);
        let set_hi = |a: &mut u64| *a = (*a & 0xffff_ffff) | (u64::from(v) << 32);
        match offset {
            VIRTIO_MMIO_DEVICE_FEATURES_SEL => self.device_features_sel = v,
            VIRTIO_MMIO_DRIVER_FEATURES_SEL => self.driver_features_sel = v,
            VIRTIO_MMIO_DRIVER_FEATURES => {
                let open = self.status & VIRTIO_CONFIG_S_DRIVER != 0
                    && self.status & VIRTIO_CONFIG_S_FEATURES_OK == 0;
                match self.driver_features_sel {
                    0 if open => set_lo(&mut self.driver_features),
                    1 if open => set_hi(&mut self.driver_features),
                    _ => {}
                }
            }
            VIRTIO_MMIO_QUEUE_SEL => self.queue_sel = v,
            VIRTIO_MMIO_QUEUE_NUM => {
                if let Some(c) = self.queue_config_mut() {
                    c.size = u16::try_from(v).unwrap_or(0);
                }
            }
            VIRTIO_MMIO_QUEUE_DESC_LOW => {
                self.queue_config_mut().map_or((), |c| set_lo(&mut c.desc))
            }
            VIRTIO_MMIO_QUEUE_DESC_HIGH => {
                self.queue_config_mut().map_or((), |c| set_hi(&mut c.desc))
            }
            VIRTIO_MMIO_QUEUE_AVAIL_LOW => {
                self.queue_config_mut().map_or((), |c| set_lo(&mut c.avail))
            }
            VIRTIO_MMIO_QUEUE_AVAIL_HIGH => {
                self.queue_config_mut().map_or((), |c| set_hi(&mut c.avail))
            }
            VIRTIO_MMIO_QUEUE_USED_LOW => {
                self.queue_config_mut().map_or((), |c| set_lo(&mut c.used))
            }
            VIRTIO_MMIO_QUEUE_USED_HIGH => {
                self.queue_config_mut().map_or((), |c| set_hi(&mut c.used))
            }
            VIRTIO_MMIO_QUEUE_READY if v == 1 => {
                if let Some(c) = self.queue_config_mut().copied() {
                    match Queue::new(&c, ram) {
                        Ok(q) => {
                            let i = self.queue_sel as usize;
                            self.configs[i].ready = true;
                            self.queues[i] = Some(q);
                        }
                        Err(e) => {
                            self.problem =
                                Some(format!("queue {} not made ready: {e}", self.queue_sel))
                        }
                    }
                }
            }
            VIRTIO_MMIO_QUEUE_NOTIFY => return self.running(),
            VIRTIO_MMIO_INTERRUPT_ACK => self.interrupt_status &= !v,
            VIRTIO_MMIO_STATUS => {
                self.write_status(v);
                return self.running();
            }
            _ => {}
        }
        false
    }

    /// DRIVER_OK, not FAILED, not NEEDS_RESET.
    fn running(&self) -> bool {
        self.status & VIRTIO_CONFIG_S_DRIVER_OK != 0
            && self.status & (VIRTIO_CONFIG_S_NEEDS_RESET | VIRTIO_CONFIG_S_FAILED) == 0
    }

    /// The device, for its owner.
    pub fn device(&self) -> &D {
        &self.device
    }

    /// The device, to change it (with no request in flight: the lock is
    /// held).
    pub fn device_mut(&mut self) -> &mut D {
        &mut self.device
    }

    /// Why the device last refused something, if it did.
    pub fn problem(&self) -> Option<&str> {
        self.problem.as_deref()
    }

    /// The device status register.
    pub fn status(&self) -> u32 {
        self.status
    }
}

/// One device's register window, shared between the vCPUs (register
/// accesses) and its I/O thread (serving the queues).
pub struct Transport<D> {
    state: Mutex<State<D>>,
    ram: Arc<Ram>,
    notify: EventFd,
    irq: Option<EventFd>,
    inline: bool,
    halted: AtomicBool,
}

/// The longest a throttled queue sleeps before it looks again (so that a
/// halt is noticed soon).
const THROTTLE_SLICE: Duration = Duration::from_millis(20);

impl<D: VirtioDevice> Transport<D> {
    /// A transport for `device`. `notify` is signalled when the driver
    /// notifies a queue (also registered as the queue-notify ioeventfd);
    /// `irq`, if any, when the device wants the driver's attention.
    pub fn new(device: D, ram: Arc<Ram>, notify: EventFd, irq: Option<EventFd>) -> Transport<D> {
        let n = device.queue_count();
        Transport {
            state: Mutex::new(State {
                device,
                status: 0,
                device_features_sel: 0,
                driver_features_sel: 0,
                driver_features: 0,
                queue_sel: 0,
                configs: vec![QueueConfig::default(); n],
                queues: (0..n).map(|_| None).collect(),
                interrupt_status: 0,
                problem: None,
            }),
            ram,
            notify,
            irq,
            inline: false,
            halted: AtomicBool::new(false),
        }
    }

    /// Stop serving for good: [`Transport::serve`] returns at once, even
    /// from a QoS wait (the run is ending; what the guest still queued
    /// stays unanswered).
    pub fn halt(&self) {
        self.halted.store(true, Ordering::Release);
    }

    /// Serve the queues on the vCPU thread, during the QueueNotify exit,
    /// rather than wake an I/O thread (for measurements: see the crate
    /// docs).
    pub fn inline(mut self, yes: bool) -> Transport<D> {
        self.inline = yes;
        self
    }

    /// The event the device's I/O thread waits on.
    pub fn notify_event(&self) -> &EventFd {
        &self.notify
    }

    /// The state, locked (a poisoned lock is taken over: the state is
    /// plain registers, consistent after any panic-free update).
    pub fn lock(&self) -> MutexGuard<'_, State<D>> {
        self.state
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// A guest read of `data.len()` bytes at `offset` in the window.
    pub fn read(&self, offset: u64, data: &mut [u8]) {
        let st = self.lock();
        if offset >= u64::from(VIRTIO_MMIO_CONFIG) {
            st.device
                .read_config(offset - u64::from(VIRTIO_MMIO_CONFIG), data);
            return;
        }
        if data.len() != 4 || !offset.is_multiple_of(4) {
            data.fill(0);
            return;
        }
        // Below VIRTIO_MMIO_CONFIG (0x100): fits.
        let v = st.read(u32::try_from(offset).unwrap_or(u32::MAX));
        data.copy_from_slice(&v.to_le_bytes());
    }

    /// A guest write of `data` at `offset` in the window.
    pub fn write(&self, offset: u64, data: &[u8]) {
        if offset >= u64::from(VIRTIO_MMIO_CONFIG) || data.len() != 4 || !offset.is_multiple_of(4) {
            // The block configuration is read-only (no VIRTIO_BLK_F_CONFIG_WCE).
            return;
        }
        let v = u32::from_le_bytes([data[0], data[1], data[2], data[3]]);
        let serve = self
            .lock()
            .write(u32::try_from(offset).unwrap_or(u32::MAX), v, &self.ram);
        if serve && self.inline {
            self.serve();
        } else if serve {
            // Wake the I/O thread (an eventfd write cannot fail short of
            // overflowing its counter, which a read resets).
            let _ = self.notify.write(1);
        }
    }

    /// Serve the queues until they are empty, one request per lock taken
    /// (so that register accesses wait for one request at most); a
    /// corrupt queue puts the device in NEEDS_RESET.
    pub fn serve(&self) {
        loop {
            if self.halted.load(Ordering::Acquire) {
                return;
            }
            // A QoS limit in debt: wait, without the lock, so that the
            // guest's register accesses go on meanwhile.
            let wait = self.lock().device.throttle();
            if !wait.is_zero() {
                std::thread::sleep(wait.min(THROTTLE_SLICE));
                continue;
            }
            let mut st = self.lock();
            if !st.running() {
                return;
            }
            let mut any = false;
            let st = &mut *st;
            for q in st.queues.iter_mut().flatten() {
                match st.device.process(&self.ram, q) {
                    Ok(true) => any = true,
                    Ok(false) => {}
                    Err(e) => {
                        st.problem = Some(format!("queue corrupt, device needs reset: {e}"));
                        st.status |= VIRTIO_CONFIG_S_NEEDS_RESET;
                        st.interrupt_status |= VIRTIO_MMIO_INT_CONFIG;
                        self.interrupt();
                        return;
                    }
                }
            }
            if !any {
                return;
            }
            st.interrupt_status |= VIRTIO_MMIO_INT_VRING;
            self.interrupt();
        }
    }

    fn interrupt(&self) {
        if let Some(irq) = &self.irq {
            let _ = irq.write(1);
        }
    }
}

/// The low 32 bits of `v`.
fn lo(v: u64) -> u32 {
    u32::try_from(v & 0xffff_ffff).unwrap_or(0)
}

#[cfg(test)]
#[allow(clippy::cast_possible_truncation)] // small test values
mod tests {
    use super::*;
    use crate::virtio::queue::tests::{ram, Driver};
    use crate::virtio::queue::QueueError;
    use vm_memory::Bytes;

    /// A device whose every request completes with length 7.
    struct Echo;
    impl VirtioDevice for Echo {
        fn device_id(&self) -> u32 {
            42
        }
        fn features(&self) -> u64 {
            1 << 3
        }
        fn queue_count(&self) -> usize {
            1
        }
        fn read_config(&self, offset: u64, data: &mut [u8]) {
            data.fill(offset as u8);
        }
        fn process(&mut self, ram: &Ram, q: &mut Queue) -> Result<bool, QueueError> {
            match q.pop(ram)? {
                Some(super::super::queue::Popped::Chain(c)) => {
                    q.add_used(ram, c.head, 7)?;
                    Ok(true)
                }
                Some(super::super::queue::Popped::Bad { head, .. }) => {
                    q.add_used(ram, head, 0)?;
                    Ok(true)
                }
                None => Ok(false),
            }
        }
    }

    fn rd(t: &Transport<Echo>, off: u32) -> u32 {
        let mut b = [0u8; 4];
        t.read(u64::from(off), &mut b);
        u32::from_le_bytes(b)
    }
    fn wr(t: &Transport<Echo>, off: u32, v: u32) {
        t.write(u64::from(off), &v.to_le_bytes());
    }

    fn setup(t: &Transport<Echo>, d: &Driver, features: [u32; 2]) {
        wr(t, VIRTIO_MMIO_STATUS, 0);
        wr(t, VIRTIO_MMIO_STATUS, 1);
        wr(t, VIRTIO_MMIO_STATUS, 3);
        for (sel, f) in features.iter().enumerate() {
            wr(t, VIRTIO_MMIO_DRIVER_FEATURES_SEL, sel as u32);
            wr(t, VIRTIO_MMIO_DRIVER_FEATURES, *f);
        }
        wr(t, VIRTIO_MMIO_STATUS, 11);
        wr(t, VIRTIO_MMIO_QUEUE_SEL, 0);
        wr(t, VIRTIO_MMIO_QUEUE_NUM, u32::from(d.cfg.size));
        wr(t, VIRTIO_MMIO_QUEUE_DESC_LOW, d.cfg.desc as u32);
        wr(t, VIRTIO_MMIO_QUEUE_AVAIL_LOW, d.cfg.avail as u32);
        wr(t, VIRTIO_MMIO_QUEUE_USED_LOW, d.cfg.used as u32);
        wr(t, VIRTIO_MMIO_QUEUE_READY, 1);
        wr(t, VIRTIO_MMIO_STATUS, 15);
    }

    #[test]
    fn negotiation_and_service() {
        let ram = Arc::new(ram());
        let t = Transport::new(Echo, ram.clone(), EventFd::new(0).unwrap(), None);
        assert_eq!(rd(&t, VIRTIO_MMIO_MAGIC_VALUE), MAGIC);
        assert_eq!(rd(&t, VIRTIO_MMIO_VERSION), 2);
        assert_eq!(rd(&t, VIRTIO_MMIO_DEVICE_ID), 42);
        wr(&t, VIRTIO_MMIO_DEVICE_FEATURES_SEL, 1);
        assert_eq!(
            rd(&t, VIRTIO_MMIO_DEVICE_FEATURES),
            1,
            "VERSION_1 is bit 32"
        );
        let mut d = Driver::new(4);
        // Without VERSION_1, FEATURES_OK does not stick and nothing runs.
        setup(&t, &d, [1 << 3, 0]);
        assert_eq!(rd(&t, VIRTIO_MMIO_STATUS), 3);
        assert!(t.lock().problem().unwrap().contains("VERSION_1"));
        // A feature not offered.
        setup(&t, &d, [1 << 4, 1]);
        assert_eq!(rd(&t, VIRTIO_MMIO_STATUS), 3);
        setup(&t, &d, [1 << 3, 1]);
        assert_eq!(rd(&t, VIRTIO_MMIO_STATUS), 15);
        assert_eq!(rd(&t, VIRTIO_MMIO_QUEUE_READY), 1);
        assert_eq!(
            t.notify_event().read().unwrap(),
            1,
            "DRIVER_OK wakes the I/O thread"
        );
        d.desc(&ram, 0, 0x40000, 8, 0, 0);
        d.publish(&ram, 0);
        d.publish(&ram, 0);
        wr(&t, VIRTIO_MMIO_QUEUE_NOTIFY, 0);
        t.serve();
        assert_eq!(d.used(&ram, 1), (2, 0, 7));
        assert_eq!(rd(&t, VIRTIO_MMIO_INTERRUPT_STATUS), 1);
        wr(&t, VIRTIO_MMIO_INTERRUPT_ACK, 1);
        assert_eq!(rd(&t, VIRTIO_MMIO_INTERRUPT_STATUS), 0);
        // Layout changes after DRIVER_OK are ignored.
        wr(&t, VIRTIO_MMIO_QUEUE_DESC_LOW, 0x1234);
        assert_eq!(t.lock().configs[0].desc, d.cfg.desc);
        // Config space: any width.
        let mut b = [0u8; 2];
        t.read(0x105, &mut b);
        assert_eq!(b, [5, 5]);
        // Unaligned or narrow register accesses read 0.
        let mut b = [9u8; 2];
        t.read(0, &mut b);
        assert_eq!(b, [0, 0]);
        t.read(1, &mut [0u8; 4]);
    }

    #[test]
    fn hostile_registers() {
        let ram = Arc::new(ram());
        let t = Transport::new(Echo, ram.clone(), EventFd::new(0).unwrap(), None);
        // DRIVER_OK first, FEATURES_OK without DRIVER: ignored.
        wr(&t, VIRTIO_MMIO_STATUS, 4);
        assert_eq!(rd(&t, VIRTIO_MMIO_STATUS), 0);
        wr(&t, VIRTIO_MMIO_STATUS, 9);
        assert_eq!(rd(&t, VIRTIO_MMIO_STATUS), 0);
        // Queue layout before FEATURES_OK: ignored.
        wr(&t, VIRTIO_MMIO_QUEUE_NUM, 4);
        assert_eq!(t.lock().configs[0].size, 0);
        // An absurd queue size, a ring outside RAM: never ready.
        let mut d = Driver::new(4);
        d.cfg.size = 60000;
        setup(&t, &d, [0, 1]);
        assert_eq!(rd(&t, VIRTIO_MMIO_QUEUE_READY), 0);
        d.cfg.size = 4;
        d.cfg.used = 0xd000_0000;
        setup(&t, &d, [0, 1]);
        assert_eq!(rd(&t, VIRTIO_MMIO_QUEUE_READY), 0);
        assert!(t.lock().problem().unwrap().contains("inside guest RAM"));
        // A nonexistent queue.
        wr(&t, VIRTIO_MMIO_QUEUE_SEL, 7);
        assert_eq!(rd(&t, VIRTIO_MMIO_QUEUE_NUM_MAX), 0);
        wr(&t, VIRTIO_MMIO_QUEUE_READY, 1);
        // A corrupt available ring: NEEDS_RESET, then a reset recovers.
        let mut d = Driver::new(4);
        setup(&t, &d, [0, 1]);
        ram.write_obj(1000u16, vm_memory::GuestAddress(d.cfg.avail + 2))
            .unwrap();
        t.serve();
        assert_eq!(
            rd(&t, VIRTIO_MMIO_STATUS) & VIRTIO_CONFIG_S_NEEDS_RESET,
            VIRTIO_CONFIG_S_NEEDS_RESET
        );
        assert_eq!(rd(&t, VIRTIO_MMIO_INTERRUPT_STATUS), 2);
        // Clearing a bit is ignored; the driver cannot clear NEEDS_RESET.
        wr(&t, VIRTIO_MMIO_STATUS, 15);
        assert_ne!(rd(&t, VIRTIO_MMIO_STATUS) & VIRTIO_CONFIG_S_NEEDS_RESET, 0);
        ram.write_obj(0u16, vm_memory::GuestAddress(d.cfg.avail + 2))
            .unwrap();
        ram.write_obj(0u16, vm_memory::GuestAddress(d.cfg.used + 2))
            .unwrap();
        d.avail_idx = 0;
        setup(&t, &d, [0, 1]);
        assert_eq!(rd(&t, VIRTIO_MMIO_STATUS), 15);
        d.desc(&ram, 0, 0x40000, 8, 0, 0);
        d.publish(&ram, 0);
        t.serve();
        assert_eq!(d.used(&ram, 0), (1, 0, 7));
    }
}
