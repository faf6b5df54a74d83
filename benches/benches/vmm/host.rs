//! The same requests without the VMM: 4 KiB random reads and writes and
//! 1 MiB sequential reads through the disk the device serves
//! ([`disk::VirtualDisk::read_at`] / `write_at`, the calls the device
//! makes), one at a time on this thread, timed with [`Instant`]. Next to
//! the guest's QD1 numbers this splits a request's time into the library's
//! part and the VMM's (the exits, the I/O thread's wake-up, the virtio
//! queue, the copy into guest memory).

use crate::guest::{self, ImageFile, Sample, STRIDE};
use std::collections::BTreeMap;
use std::time::{Duration, Instant};

/// The payload's generator (vmmbench.c `next_rand`), same seed.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
}

/// Time `op` on offsets from `next` until `budget` is spent.
fn timed(
    budget: Duration,
    len: u64,
    mut next: impl FnMut() -> u64,
    mut op: impl FnMut(u64) -> disk::Result<()>,
) -> Result<Sample, String> {
    let t = Instant::now();
    let mut ops = 0u64;
    while t.elapsed() < budget {
        op(next()).map_err(|e| e.to_string())?;
        ops += 1;
    }
    Ok(Sample {
        ops,
        bytes: ops * len,
        secs: t.elapsed().as_secs_f64(),
    })
}

/// What the payload does first (vmmbench.c `first_write`): the last 4 KiB
/// read and written back, untimed here, so that a one-time cost of the
/// first write after an open (a VHDX's header update and sync) stays out
/// of the per-request times.
fn first_write(d: &dyn disk::VirtualDisk) -> Result<(), String> {
    let mut page = vec![0u8; 4096];
    let last = d.virtual_size() / 4096 * 4096 - 4096;
    d.read_at(&mut page, last).map_err(|e| e.to_string())?;
    d.write_at(&page, last).map_err(|e| e.to_string())
}

/// Each test for `ms` on `img`, opened as the VMM opens it; the samples by
/// the guest's test names (QD1 ones).
pub fn measure(img: &ImageFile, ms: u64) -> Result<BTreeMap<String, Sample>, String> {
    let open = guest::open(img)?;
    let d = open.disk();
    let budget = Duration::from_millis(ms);
    let pages = d.virtual_size() / 4096;
    let mut small = vec![0x5au8; 4096];
    let mut big = vec![0xa5u8; 1 << 20];
    let mut out = BTreeMap::new();
    first_write(&*d)?;
    let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
    let mut rand = move || (rng.next() % pages) * 4096;
    let s = timed(budget, 4096, &mut rand, |off| d.read_at(&mut small, off))?;
    out.insert("randread4k_qd1".to_string(), s);
    let s = timed(budget, 4096, &mut rand, |off| d.write_at(&small, off))?;
    out.insert("randwrite4k_qd1".to_string(), s);
    let size = d.virtual_size();
    let mut at = 0u64;
    let seq = move || {
        if at + (1 << 20) > size {
            at = 0;
        }
        at += 1 << 20;
        at - (1 << 20)
    };
    let s = timed(budget, 1 << 20, seq, |off| d.read_at(&mut big, off))?;
    out.insert("seqread1m".to_string(), s);
    drop(d);
    open.image
        .close()
        .map_err(|e| format!("{}: {e}", img.label))?;
    Ok(out)
}

/// First-touch writes on a fresh image, as the payload does them: 4 KiB
/// every [`STRIDE`] bytes over the first half, for `ms` (or the half).
pub fn first_touch(img: &ImageFile, ms: u64) -> Result<BTreeMap<String, Sample>, String> {
    let open = guest::open(img)?;
    let d = open.disk();
    let half = d.virtual_size() / 2;
    first_write(&*d)?;
    let buf = vec![0x5au8; 4096];
    let t = Instant::now();
    let budget = Duration::from_millis(ms);
    let mut ops = 0u64;
    let mut at = 0u64;
    while at + 4096 <= half && t.elapsed() < budget {
        d.write_at(&buf, at).map_err(|e| e.to_string())?;
        ops += 1;
        at += STRIDE;
    }
    let s = Sample {
        ops,
        bytes: ops * 4096,
        secs: t.elapsed().as_secs_f64(),
    };
    drop(d);
    open.image
        .close()
        .map_err(|e| format!("{}: {e}", img.label))?;
    Ok(BTreeMap::from([("firsttouch4k".to_string(), s)]))
}
