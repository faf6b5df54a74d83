//! virtio devices on the virtio-mmio transport, version 2 (virtio 1.x):
//! the transport ([`mmio`]), the split queue ([`queue`]), the block device
//! ([`blk`]) and its requests ([`request`]), and the I/O thread that serves
//! a device's queue ([`worker`]).

pub mod blk;
pub mod mmio;
pub mod queue;
pub mod request;
pub mod worker;

use crate::memory::Ram;
use queue::{Queue, QueueError};

/// A device behind a virtio-mmio transport.
pub trait VirtioDevice: Send {
    /// The virtio device id (2: block).
    fn device_id(&self) -> u32;
    /// The device-specific features it offers (the transport adds
    /// VIRTIO_F_VERSION_1).
    fn features(&self) -> u64;
    /// How many queues it has.
    fn queue_count(&self) -> usize;
    /// Read its configuration space at `offset` (bytes past its end read
    /// as 0).
    fn read_config(&self, offset: u64, data: &mut [u8]);
    /// Serve the next request of `queue`, if there is one: whether there
    /// was.
    ///
    /// # Errors
    /// The queue is corrupt: the device must enter NEEDS_RESET.
    fn process(&mut self, ram: &Ram, queue: &mut Queue) -> Result<bool, QueueError>;
    /// How long to wait before taking the next request (a QoS limit in
    /// debt: [`crate::qos`]); the transport waits without holding its lock.
    fn throttle(&self) -> std::time::Duration {
        std::time::Duration::ZERO
    }
}
