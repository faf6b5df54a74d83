//! The results of every run, and the tables: medians over the rounds,
//! ratios to a baseline, the range of the per-round ratios.

use crate::guest::Sample;
use std::collections::BTreeMap;
use std::time::Duration;

/// How a test's result is shown.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Unit {
    /// Requests a second.
    Iops,
    /// 10^6 bytes a second.
    Mbs,
    /// Milliseconds (lower is better).
    Ms,
}

impl Unit {
    fn value(self, s: &Sample) -> f64 {
        match self {
            Unit::Iops => s.ops as f64 / s.secs,
            Unit::Mbs => s.bytes as f64 / s.secs / 1e6,
            Unit::Ms => s.secs * 1e3,
        }
    }

    fn show(self, v: f64) -> String {
        match self {
            Unit::Iops => format!("{:.1}k IOPS", v / 1e3),
            Unit::Mbs => format!("{v:.0} MB/s"),
            Unit::Ms => format!("{v:.1} ms"),
        }
    }

    /// Speed of `v` relative to `base` (> 1: faster).
    fn ratio(self, v: f64, base: f64) -> f64 {
        match self {
            Unit::Ms => base / v,
            _ => v / base,
        }
    }
}

/// The rows of the prefilled tests (`qd`: "QD32" and the like).
pub fn prefilled_rows(qd: &str) -> Vec<(&'static str, String, Unit)> {
    vec![
        ("randread4k_qd1", "4K random read, QD1".into(), Unit::Iops),
        (
            "randread4k_qdN",
            format!("4K random read, {qd}"),
            Unit::Iops,
        ),
        ("randwrite4k_qd1", "4K random write, QD1".into(), Unit::Iops),
        (
            "randwrite4k_qdN",
            format!("4K random write, {qd}"),
            Unit::Iops,
        ),
        ("seqread1m", "1M sequential read".into(), Unit::Mbs),
        (
            "seqwrite1m",
            "1M sequential write (one pass)".into(),
            Unit::Mbs,
        ),
        ("flush", "flush after the writes".into(), Unit::Ms),
        ("firstwrite", "first write after the open".into(), Unit::Ms),
    ]
}

/// Every sample: (configuration, test) -> round -> sample.
#[derive(Default)]
pub struct Results(BTreeMap<(String, String), BTreeMap<usize, Sample>>);

fn median(v: &mut [f64]) -> Option<f64> {
    if v.is_empty() {
        return None;
    }
    v.sort_by(f64::total_cmp);
    let n = v.len();
    Some(if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    })
}

/// The minimum, median and maximum of some durations.
pub fn min_med_max(v: &[Duration]) -> (Duration, Duration, Duration) {
    let mut s = v.to_vec();
    s.sort();
    match (s.first(), s.last()) {
        (Some(a), Some(b)) => (*a, s[s.len() / 2], *b),
        _ => Default::default(),
    }
}

impl Results {
    /// Record a run's tests.
    pub fn add(&mut self, config: &str, round: usize, tests: &BTreeMap<String, Sample>) {
        for (name, s) in tests {
            self.0
                .entry((config.to_string(), name.clone()))
                .or_default()
                .insert(round, *s);
        }
    }

    fn per_round(&self, config: &str, test: &str, unit: Unit) -> BTreeMap<usize, f64> {
        self.0
            .get(&(config.to_string(), test.to_string()))
            .map(|m| m.iter().map(|(r, s)| (*r, unit.value(s))).collect())
            .unwrap_or_default()
    }

    fn median(&self, config: &str, test: &str, unit: Unit) -> Option<f64> {
        median(
            &mut self
                .per_round(config, test, unit)
                .into_values()
                .collect::<Vec<_>>(),
        )
    }

    /// The median time of one request of `test` on `config`, µs.
    pub fn micros(&self, config: &str, test: &str) -> Option<f64> {
        self.median(config, test, Unit::Iops).map(|iops| 1e6 / iops)
    }

    /// A table: each row's value on `base` and on each of `others` with its
    /// ratio to `base`; for `target` (one of `others`), whether its ratio
    /// meets 0.9x (IOPS and MB/s rows) and the range of its per-round
    /// ratios.
    pub fn print<L: AsRef<str>>(
        &self,
        rows: &[(&str, L, Unit)],
        base: &str,
        others: &[&str],
        target: Option<&str>,
    ) {
        let mut head = format!("{:<36} {:>14}", "test", base);
        for o in others {
            head += &format!(" {:>14} {:>7}", o, "ratio");
        }
        if target.is_some() {
            head += &format!("  {:>7} {:>6}  {}", "target", "result", "per-round ratio");
        }
        println!("{head}");
        for (test, label, unit) in rows {
            let Some(b) = self.median(base, test, *unit) else {
                continue;
            };
            let mut line = format!("{:<36} {:>14}", label.as_ref(), unit.show(b));
            for o in others {
                match self.median(o, test, *unit) {
                    Some(v) => {
                        line += &format!(" {:>14} {:>6.3}x", unit.show(v), unit.ratio(v, b));
                    }
                    None => line += &format!(" {:>14} {:>7}", "-", "-"),
                }
            }
            if let Some(t) = target {
                let ratio = self
                    .median(t, test, *unit)
                    .map(|v| unit.ratio(v, b))
                    .unwrap_or(f64::NAN);
                let (goal, result) = if *unit == Unit::Ms {
                    ("-".to_string(), "info")
                } else if ratio >= 0.9 {
                    (">= 0.9x".to_string(), "PASS")
                } else {
                    (">= 0.9x".to_string(), "MISS")
                };
                let base_rounds = self.per_round(base, test, *unit);
                let ratios: Vec<f64> = self
                    .per_round(t, test, *unit)
                    .into_iter()
                    .filter_map(|(r, v)| Some(unit.ratio(v, *base_rounds.get(&r)?)))
                    .collect();
                let lo = ratios.iter().copied().fold(f64::INFINITY, f64::min);
                let hi = ratios.iter().copied().fold(f64::NEG_INFINITY, f64::max);
                line += &format!("  {goal:>7} {result:>6}  {lo:.2}-{hi:.2}");
            }
            println!("{line}");
        }
    }
}
