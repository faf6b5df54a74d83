//! The virtio-blk device (virtio 1.2, section 5.2) over any image the
//! front door opens: its features and configuration, and the execution of
//! requests [`super::request`] validated.

use super::queue::{Popped, Queue, QueueError, Segment, QUEUE_MAX};
use super::request::{parse, Limits, Range, Refusal, Request, ID_BYTES, SECTOR};
use super::VirtioDevice;
use crate::memory::Ram;
use crate::migrate::DirtyMap;
use crate::qos::Qos;
use disk::VirtualDisk;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use virtio_bindings::virtio_blk::{
    VIRTIO_BLK_F_BLK_SIZE, VIRTIO_BLK_F_DISCARD, VIRTIO_BLK_F_FLUSH, VIRTIO_BLK_F_RO,
    VIRTIO_BLK_F_SEG_MAX, VIRTIO_BLK_F_TOPOLOGY, VIRTIO_BLK_F_WRITE_ZEROES, VIRTIO_BLK_S_IOERR,
    VIRTIO_BLK_S_OK, VIRTIO_BLK_S_UNSUPP,
};
use vm_memory::{Bytes, GuestAddress};

/// The virtio device id of a block device.
pub const DEVICE_ID: u32 = 2;
/// Bytes moved between the disk and guest memory at a time.
const CHUNK: usize = 1 << 20;
/// max_discard_seg and max_write_zeroes_seg.
const MAX_RANGES: u32 = 16;
/// max_discard_sectors and max_write_zeroes_sectors (1 GiB).
const MAX_RANGE_SECTORS: u32 = 1 << 21;
/// The size of the configuration space (through write_zeroes_may_unmap and
/// its padding).
const CONFIG_LEN: usize = 0x3c;

/// What a device did, for the VMM's report after a run.
#[derive(Debug, Default)]
pub struct Stats {
    /// Requests completed (any status).
    pub requests: AtomicU64,
    /// Requests answered IOERR because the disk failed.
    pub io_errors: AtomicU64,
    /// Requests refused (IOERR or UNSUPP for a bad request, or a chain
    /// given back unanswered).
    pub refused: AtomicU64,
    /// The last disk error or refusal, for messages.
    pub last_problem: Mutex<Option<String>>,
}

impl Stats {
    fn note(&self, counter: &AtomicU64, what: String) {
        counter.fetch_add(1, Ordering::Relaxed);
        if let Ok(mut l) = self.last_problem.lock() {
            *l = Some(what);
        }
    }
}

/// A virtio-blk device serving one disk.
pub struct Blk {
    disk: Arc<dyn VirtualDisk>,
    limits: Limits,
    config: [u8; CONFIG_LEN],
    features: u64,
    id: Option<[u8; ID_BYTES]>,
    buf: Vec<u8>,
    stats: Arc<Stats>,
    qos: Option<Arc<Qos>>,
    /// Armed during a live storage migration ([`crate::migrate`]).
    dirty: Option<Arc<DirtyMap>>,
}

/// The GET_ID string of a disk id: the first 20 of the 32 hexadecimal
/// digits of the UUID (lower case, no dashes: 80 of its 128 bits), which is
/// how the start of the disk's GUID reads.
pub fn id_string(id: uuid::Uuid) -> [u8; ID_BYTES] {
    let hex = id.simple().to_string();
    let mut out = [0u8; ID_BYTES];
    out.copy_from_slice(&hex.as_bytes()[..ID_BYTES]);
    out
}

impl Blk {
    /// A device for `disk`, read-only unless `writable` (and the disk is).
    pub fn new(disk: Arc<dyn VirtualDisk>, writable: bool) -> Blk {
        let g = disk.geometry();
        let writable = writable && disk.is_writable();
        let capacity = g.virtual_size / SECTOR;
        let logical = g.logical_sector_size.max(512);
        let physical = g.physical_sector_size.max(logical);
        let granularity = disk.discard_granularity();
        let mut features = (1u64 << VIRTIO_BLK_F_SEG_MAX)
            | (1 << VIRTIO_BLK_F_BLK_SIZE)
            | (1 << VIRTIO_BLK_F_FLUSH)
            | (1 << VIRTIO_BLK_F_TOPOLOGY);
        if writable {
            features |= (1 << VIRTIO_BLK_F_DISCARD) | (1 << VIRTIO_BLK_F_WRITE_ZEROES);
        } else {
            features |= 1 << VIRTIO_BLK_F_RO;
        }
        let mut c = [0u8; CONFIG_LEN];
        let mut put = |at: usize, b: &[u8]| c[at..at + b.len()].copy_from_slice(b);
        put(0x00, &capacity.to_le_bytes());
        put(0x0c, &u32::from(QUEUE_MAX - 2).to_le_bytes()); // seg_max
        put(0x14, &logical.to_le_bytes()); // blk_size
                                           // trailing_zeros of a u32 is at most 32.
        let exp = u8::try_from((physical / logical).trailing_zeros()).unwrap_or(0);
        put(0x18, &[exp]); // physical_block_exp
        put(0x1a, &1u16.to_le_bytes()); // min_io_size, in blocks
        let align_sectors = if granularity >= SECTOR {
            u32::try_from(granularity / SECTOR).unwrap_or(u32::MAX)
        } else {
            logical / 512
        };
        put(0x24, &MAX_RANGE_SECTORS.to_le_bytes()); // max_discard_sectors
        put(0x28, &MAX_RANGES.to_le_bytes()); // max_discard_seg
        put(0x2c, &align_sectors.to_le_bytes()); // discard_sector_alignment
        put(0x30, &MAX_RANGE_SECTORS.to_le_bytes()); // max_write_zeroes_sectors
        put(0x34, &MAX_RANGES.to_le_bytes()); // max_write_zeroes_seg
        put(0x38, &[u8::from(granularity > 0)]); // write_zeroes_may_unmap
        Blk {
            id: disk.disk_id().map(id_string),
            disk,
            limits: Limits {
                capacity,
                writable,
                max_ranges: MAX_RANGES,
                max_range_sectors: MAX_RANGE_SECTORS,
            },
            config: c,
            features,
            buf: Vec::new(),
            stats: Arc::new(Stats::default()),
            qos: None,
            dirty: None,
        }
    }

    /// Arm (or disarm) a dirty map on the write path: every write,
    /// discard and write-zeroes marks its range once the disk has done it.
    pub fn set_dirty(&mut self, map: Option<Arc<DirtyMap>>) {
        self.dirty = map;
    }

    /// Serve `disk` from now on (a migration's switch; the GET_ID identity
    /// and the configuration the guest read stay).
    pub fn set_disk(&mut self, disk: Arc<dyn VirtualDisk>) {
        self.disk = disk;
    }

    /// Serve `disk` from now on and give back the disk served until now.
    pub fn replace_disk(&mut self, disk: Arc<dyn VirtualDisk>) -> Arc<dyn VirtualDisk> {
        std::mem::replace(&mut self.disk, disk)
    }

    /// Limit the device's requests by `qos` (see [`crate::qos`]).
    pub fn with_qos(mut self, qos: Option<Arc<Qos>>) -> Blk {
        self.qos = qos;
        self
    }

    /// The device's counters.
    pub fn stats(&self) -> Arc<Stats> {
        self.stats.clone()
    }

    /// The disk.
    pub fn disk(&self) -> &Arc<dyn VirtualDisk> {
        &self.disk
    }

    fn buffer(&mut self, len: u64) -> &mut [u8] {
        let n = usize::try_from(len).unwrap_or(CHUNK).min(CHUNK);
        if self.buf.len() < n {
            self.buf.resize(n, 0);
        }
        &mut self.buf[..n]
    }

    /// Carry out a validated request; the status to answer and the number
    /// of bytes written into the guest's buffers before it.
    fn execute(&mut self, ram: &Ram, req: Request) -> Result<u32, String> {
        match req {
            Request::In { offset, data } => self.transfer(ram, offset, &data, true),
            Request::Out { offset, data } => {
                let len = data.iter().map(|s| u64::from(s.len)).sum();
                let r = self.transfer(ram, offset, &data, false).map(|_| 0);
                // Marked after the write, even a failed one (part of it
                // may have landed).
                self.mark(offset, len);
                r
            }
            Request::Flush => self.disk.flush().map(|()| 0).map_err(|e| e.to_string()),
            Request::GetId { data } => {
                let id = self.id.ok_or("the disk has no id")?;
                let mut at = 0usize;
                for s in &data {
                    let n = s.len as usize;
                    write(ram, &id[at..at + n], s.addr)?;
                    at += n;
                }
                // At most 20 bytes: the id is that long.
                Ok(u32::try_from(at).unwrap_or(u32::MAX))
            }
            Request::Discard(ranges) => self.ranges(&ranges, true),
            Request::WriteZeroes(ranges) => self.ranges(&ranges, false),
        }
    }

    fn ranges(&self, ranges: &[Range], discard: bool) -> Result<u32, String> {
        for r in ranges {
            let done = if discard {
                self.disk.discard(r.offset, r.len)
            } else {
                self.disk.write_zeroes(r.offset, r.len, r.unmap)
            };
            self.mark(r.offset, r.len);
            done.map_err(|e| e.to_string())?;
        }
        Ok(0)
    }

    /// A migration's dirty map, if armed, learns of a change.
    fn mark(&self, offset: u64, len: u64) {
        if let Some(m) = &self.dirty {
            m.mark(offset, len);
        }
    }

    /// Move the bytes of `data` to or from the disk at `offset`, a chunk at
    /// a time through the bounce buffer; the bytes written into the guest.
    fn transfer(
        &mut self,
        ram: &Ram,
        offset: u64,
        data: &[Segment],
        read: bool,
    ) -> Result<u32, String> {
        let total: u64 = data.iter().map(|s| u64::from(s.len)).sum();
        let disk = self.disk.clone();
        let buf = self.buffer(total);
        let chunk = buf.len() as u64;
        let mut done = 0u64;
        let mut segs = data.iter().copied().peekable();
        let mut seg_off = 0u64;
        while done < total {
            let n = (total - done).min(chunk);
            let b = &mut buf[..usize::try_from(n).unwrap_or(usize::MAX)];
            if read {
                disk.read_at(b, offset + done).map_err(|e| e.to_string())?;
            }
            // Scatter or gather this chunk through the segments.
            let mut at = 0usize;
            while at < b.len() {
                let Some(s) = segs.peek().copied() else {
                    return Err("segments shorter than the request".into());
                };
                let left = usize::try_from(u64::from(s.len) - seg_off).unwrap_or(usize::MAX);
                let take = left.min(b.len() - at);
                let addr = s.addr + seg_off;
                if read {
                    write(ram, &b[at..at + take], addr)?;
                } else {
                    ram.read_slice(&mut b[at..at + take], GuestAddress(addr))
                        .map_err(|e| format!("reading guest memory at {addr:#x}: {e}"))?;
                }
                at += take;
                seg_off += take as u64;
                if seg_off == u64::from(s.len) {
                    segs.next();
                    seg_off = 0;
                }
            }
            if !read {
                disk.write_at(b, offset + done).map_err(|e| e.to_string())?;
            }
            done += n;
        }
        Ok(u32::try_from(total).unwrap_or(u32::MAX))
    }
}

fn write(ram: &Ram, b: &[u8], addr: u64) -> Result<(), String> {
    ram.write_slice(b, GuestAddress(addr))
        .map_err(|e| format!("writing guest memory at {addr:#x}: {e}"))
}

impl VirtioDevice for Blk {
    fn device_id(&self) -> u32 {
        DEVICE_ID
    }

    fn features(&self) -> u64 {
        self.features
    }

    fn queue_count(&self) -> usize {
        1
    }

    fn throttle(&self) -> std::time::Duration {
        self.qos
            .as_ref()
            .map_or(std::time::Duration::ZERO, |q| q.delay())
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        for (i, b) in data.iter_mut().enumerate() {
            let at = usize::try_from(offset)
                .unwrap_or(usize::MAX)
                .saturating_add(i);
            *b = self.config.get(at).copied().unwrap_or(0);
        }
    }

    fn process(&mut self, ram: &Ram, queue: &mut Queue) -> Result<bool, QueueError> {
        let Some(popped) = queue.pop(ram)? else {
            return Ok(false);
        };
        let chain = match popped {
            Popped::Chain(c) => c,
            Popped::Bad { head, why } => {
                self.stats.note(
                    &self.stats.refused,
                    format!("descriptor chain refused: {why}"),
                );
                queue.add_used(ram, head, 0)?;
                return Ok(true);
            }
        };
        let parsed = match parse(ram, &chain, &self.limits) {
            Ok(p) => p,
            Err(m) => {
                self.stats
                    .note(&self.stats.refused, format!("request refused: {}", m.0));
                queue.add_used(ram, chain.head, 0)?;
                return Ok(true);
            }
        };
        if let (Some(q), Ok(req)) = (&self.qos, &parsed.request) {
            q.charge(req.data_len());
        }
        let (status, written) = match parsed.request {
            Ok(req) => match self.execute(ram, req) {
                Ok(n) => (VIRTIO_BLK_S_OK, n),
                Err(e) => {
                    self.stats.note(&self.stats.io_errors, e);
                    (VIRTIO_BLK_S_IOERR, 0)
                }
            },
            Err(Refusal::IoErr(why)) => {
                self.stats
                    .note(&self.stats.refused, format!("request refused: {why}"));
                (VIRTIO_BLK_S_IOERR, 0)
            }
            Err(Refusal::Unsupp(why)) => {
                self.stats
                    .note(&self.stats.refused, format!("request unsupported: {why}"));
                (VIRTIO_BLK_S_UNSUPP, 0)
            }
        };
        // The status byte was checked to lie in RAM with its descriptor.
        let wrote_status = ram
            .write_obj(
                u8::try_from(status).unwrap_or(u8::MAX), // 0, 1 or 2
                GuestAddress(parsed.status),
            )
            .is_ok();
        self.stats.requests.fetch_add(1, Ordering::Relaxed);
        queue.add_used(ram, chain.head, written + u32::from(wrote_status))?;
        Ok(true)
    }
}

#[cfg(test)]
#[allow(clippy::cast_possible_truncation, clippy::type_complexity)] // small test values; case tables
mod tests {
    use super::*;
    use crate::virtio::queue::tests::{ram, Driver};
    use virtio_bindings::virtio_blk::{VIRTIO_BLK_T_GET_ID, VIRTIO_BLK_T_IN, VIRTIO_BLK_T_OUT};

    fn raw_disk(dir: &std::path::Path, len: usize) -> Arc<dyn VirtualDisk> {
        let p = dir.join("d.raw");
        std::fs::write(&p, vec![0u8; len]).unwrap();
        let o = image::OpenOptions::new(image::Format::Raw).writable();
        image::open(&p, &o).unwrap().disk().clone()
    }

    #[test]
    fn config_space_layout() {
        let dir = tempfile::tempdir().unwrap();
        let d = Blk::new(raw_disk(dir.path(), 1 << 20), true);
        let mut b = [0u8; 8];
        d.read_config(0, &mut b);
        assert_eq!(u64::from_le_bytes(b), 2048);
        let mut b = [0u8; 4];
        d.read_config(0x14, &mut b);
        assert_eq!(u32::from_le_bytes(b), 512);
        d.read_config(0x0c, &mut b);
        assert_eq!(u32::from_le_bytes(b), 254);
        d.read_config(0x1000, &mut b);
        assert_eq!(b, [0; 4]);
        assert_eq!(d.features() & (1 << VIRTIO_BLK_F_RO), 0);
        assert_ne!(d.features() & (1 << VIRTIO_BLK_F_DISCARD), 0);
        let ro = Blk::new(d.disk().clone(), false);
        assert_ne!(ro.features() & (1 << VIRTIO_BLK_F_RO), 0);
        assert_eq!(ro.features() & (1 << VIRTIO_BLK_F_WRITE_ZEROES), 0);
    }

    #[test]
    fn requests_reach_the_disk() {
        let dir = tempfile::tempdir().unwrap();
        let disk = raw_disk(dir.path(), 1 << 20);
        let mut dev = Blk::new(disk.clone(), true);
        let ram = ram();
        let mut d = Driver::new(8);
        let mut q = Queue::new(&d.cfg, &ram).unwrap();
        let hdr = |kind: u32, sector: u64| {
            let mut h = [0u8; 16];
            h[0..4].copy_from_slice(&kind.to_le_bytes());
            h[8..16].copy_from_slice(&sector.to_le_bytes());
            ram.write_slice(&h, GuestAddress(0x40000)).unwrap();
        };
        // Write 3 sectors at sector 5, spread over two descriptors.
        let data: Vec<u8> = (0..1536u32).map(|i| (i * 7 + 1) as u8).collect();
        ram.write_slice(&data[..1000], GuestAddress(0x50000))
            .unwrap();
        ram.write_slice(&data[1000..], GuestAddress(0x60000))
            .unwrap();
        hdr(VIRTIO_BLK_T_OUT, 5);
        d.desc(&ram, 0, 0x40000, 16, 1, 1);
        d.desc(&ram, 1, 0x50000, 1000, 1, 2);
        d.desc(&ram, 2, 0x60000, 536, 1, 3);
        d.desc(&ram, 3, 0x70000, 1, 2, 0);
        d.publish(&ram, 0);
        assert!(dev.process(&ram, &mut q).unwrap());
        assert_eq!(ram.read_obj::<u8>(GuestAddress(0x70000)).unwrap(), 0);
        assert_eq!(d.used(&ram, 0), (1, 0, 1));
        let mut back = vec![0u8; 1536];
        disk.read_at(&mut back, 5 * 512).unwrap();
        assert_eq!(back, data);
        // Read them back into one buffer holding data and status.
        hdr(VIRTIO_BLK_T_IN, 5);
        d.desc(&ram, 0, 0x40000, 16, 1, 1);
        d.desc(&ram, 1, 0x80000, 1537, 2, 0);
        d.publish(&ram, 0);
        assert!(dev.process(&ram, &mut q).unwrap());
        let mut got = vec![0u8; 1537];
        ram.read_slice(&mut got, GuestAddress(0x80000)).unwrap();
        assert_eq!(&got[..1536], &data[..]);
        assert_eq!(got[1536], 0);
        assert_eq!(d.used(&ram, 1), (2, 0, 1537));
        // GET_ID: the disk id's first 20 hex digits.
        hdr(VIRTIO_BLK_T_GET_ID, 0);
        d.desc(&ram, 1, 0x80000, 20, 2 | 1, 2);
        d.desc(&ram, 2, 0x70000, 1, 2, 0);
        d.publish(&ram, 0);
        assert!(dev.process(&ram, &mut q).unwrap());
        let mut id = [0u8; 20];
        ram.read_slice(&mut id, GuestAddress(0x80000)).unwrap();
        assert_eq!(id, id_string(disk.disk_id().unwrap()));
        assert_eq!(d.used(&ram, 2), (3, 0, 21));
        // Past the end: IOERR, nothing written.
        hdr(VIRTIO_BLK_T_IN, 2048);
        d.desc(&ram, 1, 0x80000, 512, 2 | 1, 2);
        d.publish(&ram, 0);
        assert!(dev.process(&ram, &mut q).unwrap());
        assert_eq!(
            ram.read_obj::<u8>(GuestAddress(0x70000)).unwrap(),
            VIRTIO_BLK_S_IOERR as u8
        );
        assert_eq!(d.used(&ram, 3), (4, 0, 1));
        assert_eq!(dev.stats().refused.load(Ordering::Relaxed), 1);
        assert!(!dev.process(&ram, &mut q).unwrap());
    }
}
