//! The split virtqueue (virtio 1.2, section 2.7), device side: rings
//! checked against guest RAM once when the driver makes the queue ready,
//! every descriptor chain walked with bounds on its length and indices, no
//! indirect descriptors (VIRTIO_RING_F_INDIRECT_DESC is not offered) and no
//! event index.
//!
//! Nothing here allocates more than one queue size worth of segments, and
//! nothing a guest writes can make a walk loop: a chain longer than the
//! queue is a loop.

use crate::memory::{contains, Ram};
use std::num::Wrapping;
use std::sync::atomic::Ordering;
use vm_memory::{Bytes, GuestAddress};

/// The largest queue a device offers (QueueNumMax).
pub const QUEUE_MAX: u16 = 256;

/// Descriptor flags (virtio 1.2, 2.7.5).
const DESC_F_NEXT: u16 = 1;
const DESC_F_WRITE: u16 = 2;
const DESC_F_INDIRECT: u16 = 4;

/// A queue's configuration as the driver writes it through the transport.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct QueueConfig {
    /// QueueNum: the size the driver chose.
    pub size: u16,
    /// QueueReady.
    pub ready: bool,
    /// QueueDesc: the descriptor table.
    pub desc: u64,
    /// QueueDriver: the available ring.
    pub avail: u64,
    /// QueueDevice: the used ring.
    pub used: u64,
}

/// A piece of guest memory a descriptor names, already checked to lie in
/// RAM.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Segment {
    /// Guest-physical address.
    pub addr: u64,
    /// Length in bytes.
    pub len: u32,
}

/// A descriptor chain, checked: its device-readable segments (all before
/// the writable ones, as the spec requires) and its device-writable ones.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Chain {
    /// The head descriptor's index (what goes back in the used ring).
    pub head: u16,
    /// Device-readable segments, in order.
    pub readable: Vec<Segment>,
    /// Device-writable segments, in order.
    pub writable: Vec<Segment>,
}

impl Chain {
    /// Total bytes of the readable segments.
    pub fn readable_len(&self) -> u64 {
        self.readable.iter().map(|s| u64::from(s.len)).sum()
    }

    /// Total bytes of the writable segments.
    pub fn writable_len(&self) -> u64 {
        self.writable.iter().map(|s| u64::from(s.len)).sum()
    }
}

/// What the available ring held next.
#[derive(Debug, PartialEq, Eq)]
pub enum Popped {
    /// A well-formed chain.
    Chain(Chain),
    /// A chain the device refuses without touching the memory it names
    /// (a loop, an index past the table, an indirect descriptor, memory
    /// outside RAM, a readable descriptor after a writable one): it goes
    /// back in the used ring with length 0.
    Bad {
        /// Its head descriptor.
        head: u16,
        /// Why.
        why: String,
    },
}

/// The queue as a whole can no longer be trusted (the available index
/// moved by more than the queue size, a head index past the table): the
/// device must enter NEEDS_RESET.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct QueueError(pub String);

/// A ready split queue.
#[derive(Debug)]
pub struct Queue {
    size: u16,
    desc: u64,
    avail: u64,
    used: u64,
    next_avail: Wrapping<u16>,
    next_used: Wrapping<u16>,
}

impl Queue {
    /// The device's next available and next used ring indices (for a VM
    /// checkpoint).
    pub fn indices(&self) -> (u16, u16) {
        (self.next_avail.0, self.next_used.0)
    }

    /// Set them back (restoring a checkpoint; the queue was made from the
    /// same configuration).
    pub fn set_indices(&mut self, next_avail: u16, next_used: u16) {
        self.next_avail = Wrapping(next_avail);
        self.next_used = Wrapping(next_used);
    }

    /// A queue from the driver's configuration, checked: a power-of-two
    /// size up to [`QUEUE_MAX`], rings aligned as the spec says (16, 2, 4)
    /// and wholly inside RAM.
    ///
    /// # Errors
    /// What is wrong with the configuration.
    pub fn new(cfg: &QueueConfig, ram: &Ram) -> Result<Queue, QueueError> {
        let n = cfg.size;
        if n == 0 || n > QUEUE_MAX || !n.is_power_of_two() {
            return Err(QueueError(format!(
                "queue size {n}: it must be a power of two from 1 to {QUEUE_MAX}"
            )));
        }
        let n64 = u64::from(n);
        let rings = [
            ("descriptor table", cfg.desc, 16, 16 * n64),
            ("available ring", cfg.avail, 2, 6 + 2 * n64),
            ("used ring", cfg.used, 4, 6 + 8 * n64),
        ];
        for (what, addr, align, len) in rings {
            if addr % align != 0 {
                return Err(QueueError(format!(
                    "{what} at {addr:#x} is not aligned to {align} bytes"
                )));
            }
            if !contains(ram, addr, len) {
                return Err(QueueError(format!(
                    "{what} at {addr:#x} ({len} bytes) is not inside guest RAM"
                )));
            }
        }
        Ok(Queue {
            size: n,
            desc: cfg.desc,
            avail: cfg.avail,
            used: cfg.used,
            next_avail: Wrapping(0),
            next_used: Wrapping(0),
        })
    }

    /// The queue size.
    pub fn size(&self) -> u16 {
        self.size
    }

    fn read_u16(ram: &Ram, addr: u64) -> Result<u16, QueueError> {
        let mut b = [0u8; 2];
        ram.read_slice(&mut b, GuestAddress(addr))
            .map_err(|e| QueueError(format!("reading {addr:#x}: {e}")))?;
        Ok(u16::from_le_bytes(b))
    }

    /// The next available chain, walked and checked; `None` when the
    /// driver has made none available.
    ///
    /// # Errors
    /// The available ring is corrupt (see [`QueueError`]).
    pub fn pop(&mut self, ram: &Ram) -> Result<Option<Popped>, QueueError> {
        let idx: u16 = ram
            .load(GuestAddress(self.avail + 2), Ordering::Acquire)
            .map_err(|e| QueueError(format!("reading the available index: {e}")))?;
        let idx = Wrapping(u16::from_le(idx));
        let pending = (idx - self.next_avail).0;
        if pending == 0 {
            return Ok(None);
        }
        if pending > self.size {
            return Err(QueueError(format!(
                "the available index moved from {} to {} on a queue of {}",
                self.next_avail.0, idx.0, self.size
            )));
        }
        let slot = u64::from(self.next_avail.0 % self.size);
        let head = Self::read_u16(ram, self.avail + 4 + 2 * slot)?;
        if head >= self.size {
            return Err(QueueError(format!(
                "available ring entry {slot} names descriptor {head} of a table of {}",
                self.size
            )));
        }
        self.next_avail += 1;
        Ok(Some(match self.walk(ram, head) {
            Ok(c) => Popped::Chain(c),
            Err(why) => Popped::Bad { head, why },
        }))
    }

    /// Walk the chain from `head`, checking each descriptor.
    fn walk(&self, ram: &Ram, head: u16) -> Result<Chain, String> {
        let mut chain = Chain {
            head,
            ..Chain::default()
        };
        let mut index = head;
        for _ in 0..self.size {
            let mut d = [0u8; 16];
            let at = self.desc + 16 * u64::from(index);
            ram.read_slice(&mut d, GuestAddress(at))
                .map_err(|e| format!("reading descriptor {index}: {e}"))?;
            let addr = u64::from_le_bytes(d[0..8].try_into().unwrap_or_default());
            let len = u32::from_le_bytes(d[8..12].try_into().unwrap_or_default());
            let flags = u16::from_le_bytes([d[12], d[13]]);
            let next = u16::from_le_bytes([d[14], d[15]]);
            if flags & DESC_F_INDIRECT != 0 {
                return Err(format!(
                    "descriptor {index} is indirect, a feature not offered"
                ));
            }
            if !contains(ram, addr, u64::from(len)) {
                return Err(format!(
                    "descriptor {index} names {len} bytes at {addr:#x}, outside guest RAM"
                ));
            }
            let seg = Segment { addr, len };
            if flags & DESC_F_WRITE != 0 {
                chain.writable.push(seg);
            } else if chain.writable.is_empty() {
                chain.readable.push(seg);
            } else {
                return Err(format!(
                    "descriptor {index} is device-readable but follows a device-writable one"
                ));
            }
            if flags & DESC_F_NEXT == 0 {
                return Ok(chain);
            }
            if next >= self.size {
                return Err(format!(
                    "descriptor {index} links to descriptor {next} of a table of {}",
                    self.size
                ));
            }
            index = next;
        }
        Err(format!(
            "the chain from descriptor {head} is longer than the queue ({}): a loop",
            self.size
        ))
    }

    /// Give the chain `head` back to the driver, saying `len` bytes were
    /// written into it.
    ///
    /// # Errors
    /// The used ring cannot be written (cannot happen: it was checked).
    pub fn add_used(&mut self, ram: &Ram, head: u16, len: u32) -> Result<(), QueueError> {
        let slot = u64::from(self.next_used.0 % self.size);
        let at = self.used + 4 + 8 * slot;
        let mut elem = [0u8; 8];
        elem[0..4].copy_from_slice(&u32::from(head).to_le_bytes());
        elem[4..8].copy_from_slice(&len.to_le_bytes());
        ram.write_slice(&elem, GuestAddress(at))
            .map_err(|e| QueueError(format!("writing used ring entry {slot}: {e}")))?;
        self.next_used += 1;
        ram.store(
            self.next_used.0.to_le(),
            GuestAddress(self.used + 2),
            Ordering::Release,
        )
        .map_err(|e| QueueError(format!("writing the used index: {e}")))
    }
}

#[cfg(test)]
#[allow(clippy::cast_possible_truncation, clippy::type_complexity)] // small test values; case tables
pub(crate) mod tests {
    use super::*;
    use crate::memory;

    /// A little driver-side model of a queue in guest memory, for tests.
    pub(crate) struct Driver {
        pub cfg: QueueConfig,
        pub avail_idx: u16,
    }

    impl Driver {
        pub fn new(size: u16) -> Driver {
            Driver {
                cfg: QueueConfig {
                    size,
                    ready: true,
                    desc: 0x10000,
                    avail: 0x20000,
                    used: 0x30000,
                },
                avail_idx: 0,
            }
        }

        pub fn desc(&self, ram: &Ram, i: u16, addr: u64, len: u32, flags: u16, next: u16) {
            let mut d = [0u8; 16];
            d[0..8].copy_from_slice(&addr.to_le_bytes());
            d[8..12].copy_from_slice(&len.to_le_bytes());
            d[12..14].copy_from_slice(&flags.to_le_bytes());
            d[14..16].copy_from_slice(&next.to_le_bytes());
            ram.write_slice(&d, GuestAddress(self.cfg.desc + 16 * u64::from(i)))
                .unwrap();
        }

        pub fn publish(&mut self, ram: &Ram, head: u16) {
            let slot = u64::from(self.avail_idx % self.cfg.size);
            ram.write_obj(head.to_le(), GuestAddress(self.cfg.avail + 4 + 2 * slot))
                .unwrap();
            self.avail_idx = self.avail_idx.wrapping_add(1);
            ram.write_obj(self.avail_idx.to_le(), GuestAddress(self.cfg.avail + 2))
                .unwrap();
        }

        pub fn used(&self, ram: &Ram, n: u16) -> (u16, u32, u32) {
            let idx: u16 = ram.read_obj(GuestAddress(self.cfg.used + 2)).unwrap();
            let at = self.cfg.used + 4 + 8 * u64::from(n % self.cfg.size);
            let id: u32 = ram.read_obj(GuestAddress(at)).unwrap();
            let len: u32 = ram.read_obj(GuestAddress(at + 4)).unwrap();
            (idx, id, len)
        }
    }

    pub(crate) fn ram() -> Ram {
        memory::create(64 << 20).unwrap()
    }

    #[test]
    fn configurations_are_checked() {
        let ram = ram();
        let ok = Driver::new(8).cfg;
        assert!(Queue::new(&ok, &ram).is_ok());
        for (cfg, what) in [
            (QueueConfig { size: 0, ..ok }, "power of two"),
            (QueueConfig { size: 3, ..ok }, "power of two"),
            (QueueConfig { size: 512, ..ok }, "power of two"),
            (
                QueueConfig {
                    desc: 0x10008,
                    ..ok
                },
                "aligned",
            ),
            (
                QueueConfig {
                    used: 0x30002,
                    ..ok
                },
                "aligned",
            ),
            (
                QueueConfig {
                    avail: 64 << 20,
                    ..ok
                },
                "inside guest RAM",
            ),
            (
                QueueConfig {
                    used: (64 << 20) - 8,
                    ..ok
                },
                "inside guest RAM",
            ),
            (
                QueueConfig {
                    desc: u64::MAX - 15,
                    ..ok
                },
                "inside guest RAM",
            ),
        ] {
            let e = Queue::new(&cfg, &ram).unwrap_err().to_string();
            assert!(e.contains(what), "{cfg:?}: {e}");
        }
    }

    #[test]
    fn chains_are_walked_and_checked() {
        let ram = ram();
        let mut d = Driver::new(4);
        let mut q = Queue::new(&d.cfg, &ram).unwrap();
        assert_eq!(q.pop(&ram).unwrap(), None);
        // A good chain: readable, readable, writable.
        d.desc(&ram, 0, 0x40000, 16, DESC_F_NEXT, 2);
        d.desc(&ram, 2, 0x41000, 512, DESC_F_NEXT, 1);
        d.desc(&ram, 1, 0x42000, 1, DESC_F_WRITE, 0);
        d.publish(&ram, 0);
        let Some(Popped::Chain(c)) = q.pop(&ram).unwrap() else {
            panic!("no chain")
        };
        assert_eq!(c.head, 0);
        assert_eq!(c.readable_len(), 528);
        assert_eq!(
            c.writable,
            vec![Segment {
                addr: 0x42000,
                len: 1
            }]
        );
        q.add_used(&ram, 0, 1).unwrap();
        assert_eq!(d.used(&ram, 0), (1, 0, 1));
        // A loop.
        d.desc(&ram, 3, 0x40000, 16, DESC_F_NEXT, 3);
        d.publish(&ram, 3);
        let Some(Popped::Bad { head: 3, why }) = q.pop(&ram).unwrap() else {
            panic!("loop accepted")
        };
        assert!(why.contains("loop"), "{why}");
        // Out of the table, outside RAM, indirect, readable after writable,
        // a length that wraps.
        for (flags, addr, len, next, what) in [
            (DESC_F_NEXT, 0x40000, 16, 9, "links to descriptor 9"),
            (0, (64 << 20) - 4, 8, 0, "outside guest RAM"),
            (0, u64::MAX - 2, 8, 0, "outside guest RAM"),
            (DESC_F_INDIRECT, 0x40000, 16, 0, "indirect"),
        ] {
            d.desc(&ram, 1, addr, len, flags, next);
            d.publish(&ram, 1);
            let Some(Popped::Bad { why, .. }) = q.pop(&ram).unwrap() else {
                panic!("{what} accepted")
            };
            assert!(why.contains(what), "{why}");
        }
        d.desc(&ram, 0, 0x40000, 16, DESC_F_NEXT | DESC_F_WRITE, 1);
        d.desc(&ram, 1, 0x40000, 16, 0, 0);
        d.publish(&ram, 0);
        let Some(Popped::Bad { why, .. }) = q.pop(&ram).unwrap() else {
            panic!("order accepted")
        };
        assert!(why.contains("follows a device-writable"), "{why}");
        // A head past the table, and an index jump, are fatal.
        d.publish(&ram, 7);
        assert!(q.pop(&ram).unwrap_err().0.contains("descriptor 7"));
        let mut q = Queue::new(&d.cfg, &ram).unwrap();
        ram.write_obj(100u16, GuestAddress(d.cfg.avail + 2))
            .unwrap();
        assert!(q.pop(&ram).unwrap_err().0.contains("moved from 0 to 100"));
    }

    #[test]
    fn indices_wrap() {
        let ram = ram();
        let mut d = Driver::new(2);
        let mut q = Queue::new(&d.cfg, &ram).unwrap();
        d.desc(&ram, 0, 0x40000, 1, DESC_F_WRITE, 0);
        for n in 0..70000u32 {
            d.publish(&ram, 0);
            assert!(matches!(q.pop(&ram).unwrap(), Some(Popped::Chain(_))));
            q.add_used(&ram, 0, n).unwrap();
            assert_eq!(q.pop(&ram).unwrap(), None);
        }
        let (idx, _, _) = d.used(&ram, 0);
        assert_eq!(idx, (70000u32 % 65536) as u16);
    }
}
