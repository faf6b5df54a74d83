//! Storage QoS: a disk's IOPS and bytes-per-second limits, as Hyper-V's
//! Storage QoS counts them — IOPS normalised to 8 KiB (a request of up to
//! 8 KiB is one I/O, a 64 KiB request eight) — enforced by token buckets
//! refilled lazily (from the time elapsed whenever they are looked at).
//!
//! A request is charged when the device takes it and always goes ahead;
//! a bucket it leaves in debt makes the device's queue wait until the debt
//! is paid back before it takes the next request. Requests over the limit
//! wait, never fail. A full bucket holds [`BURST`] of its rate, the small
//! burst an idle disk may spend at once. The wait happens outside every
//! lock the guest's register accesses need ([`crate::virtio::mmio`]).
//!
//! Limits can change at any time ([`Qos::set`]); 0 or `None` is no limit.

use std::sync::Mutex;
use std::time::{Duration, Instant};

/// The size one normalised I/O stands for (Hyper-V's 8 KiB).
pub const IO_UNIT: u64 = 8192;
/// How much of a second's worth of tokens a full bucket holds.
pub const BURST: Duration = Duration::from_millis(50);

/// A disk's limits.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Limits {
    /// Normalised I/Os (8 KiB units) per second.
    pub iops: Option<u64>,
    /// Bytes per second.
    pub bps: Option<u64>,
}

impl Limits {
    /// Whether any limit is set.
    pub fn any(&self) -> bool {
        self.iops.is_some_and(|v| v > 0) || self.bps.is_some_and(|v| v > 0)
    }
}

/// How many normalised I/Os a request moving `bytes` counts for: one per
/// started 8 KiB, at least one (a flush or a discard is one I/O).
pub fn io_units(bytes: u64) -> u64 {
    bytes.div_ceil(IO_UNIT).max(1)
}

/// One token bucket: `rate` tokens a second, at most `cap` held, `level`
/// below zero when in debt.
#[derive(Debug, Clone, Copy)]
struct Bucket {
    rate: f64,
    cap: f64,
    level: f64,
}

impl Bucket {
    fn new(rate: u64) -> Bucket {
        #[allow(clippy::cast_precision_loss)] // rates far below 2^52
        let rate = rate as f64;
        let cap = (rate * BURST.as_secs_f64()).max(1.0);
        Bucket {
            rate,
            cap,
            level: cap,
        }
    }

    fn refill(&mut self, elapsed: Duration) {
        self.level = (self.level + self.rate * elapsed.as_secs_f64()).min(self.cap);
    }

    /// How long until the debt is paid back.
    fn wait(&self) -> Duration {
        if self.level >= 0.0 {
            Duration::ZERO
        } else {
            Duration::from_secs_f64(-self.level / self.rate)
        }
    }
}

#[derive(Debug)]
struct State {
    limits: Limits,
    iops: Option<Bucket>,
    bps: Option<Bucket>,
    last: Instant,
}

impl State {
    fn refill(&mut self, now: Instant) {
        let elapsed = now.saturating_duration_since(self.last);
        self.last = now;
        for b in [&mut self.iops, &mut self.bps].into_iter().flatten() {
            b.refill(elapsed);
        }
    }
}

/// The limits of one disk and their buckets (shared between the device
/// and whoever changes the limits).
#[derive(Debug)]
pub struct Qos {
    state: Mutex<State>,
}

fn bucket(rate: Option<u64>) -> Option<Bucket> {
    rate.filter(|r| *r > 0).map(Bucket::new)
}

impl Qos {
    /// Buckets for `limits`, full.
    pub fn new(limits: Limits) -> Qos {
        Qos {
            state: Mutex::new(State {
                limits,
                iops: bucket(limits.iops),
                bps: bucket(limits.bps),
                last: Instant::now(),
            }),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// The limits in force.
    pub fn limits(&self) -> Limits {
        self.lock().limits
    }

    /// Change the limits; the new buckets start full (a debt under the old
    /// limits is forgiven).
    pub fn set(&self, limits: Limits) {
        let mut s = self.lock();
        s.limits = limits;
        s.iops = bucket(limits.iops);
        s.bps = bucket(limits.bps);
        s.last = Instant::now();
    }

    /// Charge a request moving `bytes` (0 for a flush, a discard, GET_ID).
    pub fn charge(&self, bytes: u64) {
        self.charge_at(bytes, Instant::now());
    }

    fn charge_at(&self, bytes: u64, now: Instant) {
        let mut s = self.lock();
        s.refill(now);
        #[allow(clippy::cast_precision_loss)] // request sizes far below 2^52
        let (units, bytes) = (io_units(bytes) as f64, bytes as f64);
        if let Some(b) = &mut s.iops {
            b.level -= units;
        }
        if let Some(b) = &mut s.bps {
            b.level -= bytes;
        }
    }

    /// How long the device must wait before it takes its next request
    /// (zero when no bucket is in debt).
    pub fn delay(&self) -> Duration {
        self.delay_at(Instant::now())
    }

    fn delay_at(&self, now: Instant) -> Duration {
        let mut s = self.lock();
        s.refill(now);
        [s.iops, s.bps]
            .into_iter()
            .flatten()
            .map(|b| b.wait())
            .max()
            .unwrap_or(Duration::ZERO)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ms(v: u64) -> Duration {
        Duration::from_millis(v)
    }

    #[test]
    fn units_are_8k() {
        assert_eq!(
            [0, 1, 4096, 8192, 8193, 65536].map(io_units),
            [1, 1, 1, 1, 2, 8]
        );
    }

    #[test]
    fn iops_debt_is_paid_back_at_the_rate() {
        let q = Qos::new(Limits {
            iops: Some(1000),
            bps: None,
        });
        let t0 = q.lock().last;
        // The burst: 50 ms of 1000/s, 50 I/Os, go at once.
        for _ in 0..50 {
            q.charge_at(4096, t0);
        }
        assert_eq!(q.delay_at(t0), Duration::ZERO);
        // Ten more: a debt of 10 I/Os, 10 ms at 1000/s.
        for _ in 0..10 {
            q.charge_at(4096, t0);
        }
        let d = q.delay_at(t0);
        assert!((d.as_secs_f64() - 0.010).abs() < 1e-6, "{d:?}");
        // 4 ms later, 6 ms remain; 10 ms later, none.
        let d = q.delay_at(t0 + ms(4));
        assert!((d.as_secs_f64() - 0.006).abs() < 1e-6, "{d:?}");
        assert_eq!(q.delay_at(t0 + ms(10)), Duration::ZERO);
        // A 64 KiB request is 8 I/Os: 8 ms of debt from an empty bucket.
        q.charge_at(65536, t0 + ms(10));
        let d = q.delay_at(t0 + ms(10));
        assert!((d.as_secs_f64() - 0.008).abs() < 1e-6, "{d:?}");
    }

    #[test]
    fn bytes_per_second_and_the_tighter_limit_wins() {
        let q = Qos::new(Limits {
            iops: Some(1_000_000),
            bps: Some(1 << 20),
        });
        let t0 = q.lock().last;
        // 1 MiB/s holds 52428.8 bytes full; a 1 MiB write leaves a debt
        // of the rest, paid back in just under 950 ms.
        q.charge_at(1 << 20, t0);
        let d = q.delay_at(t0).as_secs_f64();
        assert!((d - (1.0 - 0.05)).abs() < 1e-6, "{d}");
    }

    #[test]
    fn an_idle_bucket_holds_only_the_burst() {
        let q = Qos::new(Limits {
            iops: Some(100),
            bps: None,
        });
        let t0 = q.lock().last;
        // After an hour idle, still only 5 I/Os (50 ms of 100/s) go free.
        let later = t0 + Duration::from_secs(3600);
        for _ in 0..5 {
            q.charge_at(0, later);
        }
        assert_eq!(q.delay_at(later), Duration::ZERO);
        q.charge_at(0, later);
        assert_eq!(q.delay_at(later), ms(10));
    }

    #[test]
    fn limits_change_and_none_is_unlimited() {
        let q = Qos::new(Limits::default());
        assert!(!q.limits().any());
        for _ in 0..10_000 {
            q.charge(1 << 20);
        }
        assert_eq!(q.delay(), Duration::ZERO);
        let l = Limits {
            iops: Some(10),
            bps: Some(0),
        };
        q.set(l);
        assert_eq!(q.limits(), l);
        assert!(l.any());
        q.charge(0);
        q.charge(0);
        assert!(q.delay() > ms(50), "{:?}", q.delay());
        q.set(Limits::default());
        assert_eq!(q.delay(), Duration::ZERO);
    }
}
