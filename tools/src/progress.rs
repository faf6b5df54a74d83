//! `-p`: progress on stderr. On a terminal, a bar (indicatif); elsewhere (a
//! pipe, a file, a CI log) percentage lines as qemu-img prints them,
//! `    (12.34/100%)`, at most one per whole percent, each followed by the
//! bytes copied so far and the rate. qemu-img prints its lines on stdout
//! and ends them with `\r` (one line, redrawn, on a terminal); ours go to
//! stderr, where every other message is, and end with `\n`, as lines for a
//! log should.
//!
//! The percentage is of the work scanned (virtual bytes, or blocks); the
//! rate is of the bytes actually copied, which each command defines and
//! names: `convert` the bytes written into the target (zero ranges are
//! skipped, not written), `compare` the bytes read and compared (ranges
//! both images map as zeros are skipped unread), `merge` and `rebase` the
//! bytes copied into the image, `compact` the bytes of the blocks moved.
//! A rate of virtual bytes scanned would be that of reading the block map
//! of a sparse disk: gigabytes per second, meaning nothing.

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use std::io::IsTerminal;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// Progress that shows nothing unless enabled. Cheap to share between
/// threads (clones report to the same place; methods take `&self`).
#[derive(Clone)]
pub struct Progress {
    inner: Option<Arc<Inner>>,
}

struct Inner {
    out: Out,
    /// What the copied bytes are: "written", "compared", "copied", "moved".
    label: &'static str,
    start: Instant,
    done: AtomicU64,
    /// 0 until known.
    total: AtomicU64,
    copied: AtomicU64,
    /// No percentage (a spinner): only the final line.
    spinner: bool,
}

enum Out {
    /// A terminal: the bar, its message (what is happening), and when the
    /// message's figures were last refreshed (ms since start).
    Bar {
        bar: ProgressBar,
        message: Mutex<String>,
        refreshed: AtomicU64,
    },
    /// Lines: the last whole percent printed.
    Lines { printed: Mutex<Option<u64>> },
}

/// How often a bar's figures (copied, rate) are refreshed.
const REFRESH_MS: u64 = 250;

impl Progress {
    /// Progress that shows nothing.
    pub fn hidden() -> Self {
        Progress { inner: None }
    }

    /// Progress over `total` bytes of the virtual disk (0: learnt with the
    /// first [`Progress::step`]), copying bytes named `label`, shown on
    /// stderr when `enabled`.
    pub fn bytes(enabled: bool, total: u64, message: &str, label: &'static str) -> Self {
        Self::make(enabled, Some(total), message, label)
    }

    /// Progress over units of work (blocks, entries) rather than bytes:
    /// their total comes with the first [`Progress::step`].
    pub fn counting(enabled: bool, message: &str, label: &'static str) -> Self {
        Self::make(enabled, Some(0), message, label)
    }

    /// A spinner with the elapsed time, for work whose amount is not known
    /// beforehand; without a terminal, one line when it is done.
    pub fn spinner(enabled: bool, message: &str) -> Self {
        Self::make(enabled, None, message, "")
    }

    fn make(enabled: bool, total: Option<u64>, message: &str, label: &'static str) -> Self {
        if !enabled {
            return Self::hidden();
        }
        let out = if !std::io::stderr().is_terminal() {
            Out::Lines {
                printed: Mutex::new(None),
            }
        } else {
            let bar = ProgressBar::with_draw_target(total, ProgressDrawTarget::stderr());
            let (template, fallback) = if total.is_some() {
                (
                    "{msg} [{elapsed_precise}] [{wide_bar}] {percent}% (ETA {eta})",
                    ProgressStyle::default_bar(),
                )
            } else {
                (
                    "{spinner} {msg} [{elapsed_precise}]",
                    ProgressStyle::default_spinner(),
                )
            };
            let style = ProgressStyle::with_template(template)
                .unwrap_or(fallback)
                .progress_chars("=> ");
            bar.set_style(style);
            bar.set_message(message.to_string());
            // Keep redrawing while a long flush runs with nothing moving.
            bar.enable_steady_tick(Duration::from_millis(if total.is_some() {
                250
            } else {
                120
            }));
            Out::Bar {
                bar,
                message: Mutex::new(message.to_string()),
                refreshed: AtomicU64::new(0),
            }
        };
        Self::with_out(out, total, label)
    }

    fn with_out(out: Out, total: Option<u64>, label: &'static str) -> Self {
        Progress {
            inner: Some(Arc::new(Inner {
                out,
                label,
                start: Instant::now(),
                done: AtomicU64::new(0),
                total: AtomicU64::new(total.unwrap_or(0)),
                copied: AtomicU64::new(0),
                spinner: total.is_none(),
            })),
        }
    }

    /// `n` more units (virtual bytes) are done.
    pub fn inc(&self, n: u64) {
        if let Some(i) = &self.inner {
            i.done.fetch_add(n, Ordering::Relaxed);
            i.update();
        }
    }

    /// `n` more bytes were copied (shown at the next update).
    pub fn add_copied(&self, n: u64) {
        if let Some(i) = &self.inner {
            i.copied.fetch_add(n, Ordering::Relaxed);
        }
    }

    /// A library's progress callback: where the work is, absolute.
    pub fn step(&self, s: disk::Step) {
        if let Some(i) = &self.inner {
            i.total.store(s.total, Ordering::Relaxed);
            i.done.store(s.done, Ordering::Relaxed);
            i.copied.store(s.copied, Ordering::Relaxed);
            i.update();
        }
    }

    /// Show what is happening now (e.g. "flushing" once the bytes are
    /// copied); on a terminal only.
    pub fn set_message(&self, message: &str) {
        if let Some(Inner {
            out: Out::Bar {
                bar, message: m, ..
            },
            ..
        }) = self.inner.as_deref()
        {
            *m.lock().unwrap_or_else(|e| e.into_inner()) = message.to_string();
            bar.set_message(message.to_string());
        }
    }

    /// The work is complete: the bar is drawn full and left on screen, or
    /// the last line is printed (100%, the bytes copied, the time taken,
    /// the average rate).
    pub fn finish(&self) {
        let Some(i) = &self.inner else { return };
        match &i.out {
            Out::Bar { bar, message, .. } => {
                let m = message.lock().unwrap_or_else(|e| e.into_inner()).clone();
                bar.set_message(i.bar_message(&m, true));
                bar.finish();
                eprintln!();
            }
            Out::Lines { .. } => eprintln!("{}", i.final_line()),
        }
    }

    /// The work stopped early: the bar is removed so an error message
    /// reads cleanly (lines stay as printed).
    pub fn abandon(&self) {
        if let Some(Inner {
            out: Out::Bar { bar, .. },
            ..
        }) = self.inner.as_deref()
        {
            bar.finish_and_clear();
        }
    }
}

impl Inner {
    fn elapsed(&self) -> Duration {
        self.start.elapsed()
    }

    /// Draw what changed: the bar's position (and now and then its
    /// figures), or a line when a new whole percent is reached.
    fn update(&self) {
        let (done, total) = (
            self.done.load(Ordering::Relaxed),
            self.total.load(Ordering::Relaxed),
        );
        match &self.out {
            Out::Bar {
                bar,
                message,
                refreshed,
            } => {
                if !self.spinner {
                    if bar.length() != Some(total) {
                        bar.set_length(total);
                    }
                    bar.set_position(done.min(total));
                }
                let now = u64::try_from(self.elapsed().as_millis()).unwrap_or(u64::MAX);
                let last = refreshed.load(Ordering::Relaxed);
                if now >= last + REFRESH_MS
                    && refreshed
                        .compare_exchange(last, now, Ordering::Relaxed, Ordering::Relaxed)
                        .is_ok()
                {
                    let m = message.lock().unwrap_or_else(|e| e.into_inner()).clone();
                    bar.set_message(self.bar_message(&m, false));
                }
            }
            Out::Lines { printed } => {
                if self.spinner || total == 0 {
                    return;
                }
                let whole = whole_percent(done, total);
                // 100% is the final line's.
                if whole >= 100 {
                    return;
                }
                let mut p = printed.lock().unwrap_or_else(|e| e.into_inner());
                if p.is_some_and(|p| whole <= p) {
                    return;
                }
                *p = Some(whole);
                let copied = self.copied.load(Ordering::Relaxed);
                eprintln!(
                    "{}",
                    line(done, total, copied, self.label, self.elapsed(), false)
                );
            }
        }
    }

    /// The bar's message: what is happening, then the bytes copied and
    /// the rate.
    fn bar_message(&self, what: &str, last: bool) -> String {
        if self.label.is_empty() {
            return what.to_string();
        }
        let copied = self.copied.load(Ordering::Relaxed);
        let e = self.elapsed();
        let in_time = if last {
            format!(" in {:.1} s", e.as_secs_f64())
        } else {
            String::new()
        };
        format!(
            "{what}: {} {}{in_time}, {}/s",
            short(copied),
            self.label,
            short(rate(copied, e))
        )
    }

    fn final_line(&self) -> String {
        let total = self.total.load(Ordering::Relaxed).max(1);
        let copied = self.copied.load(Ordering::Relaxed);
        line(total, total, copied, self.label, self.elapsed(), true)
    }
}

/// Whole percent of `done` out of `total` (at most 100).
fn whole_percent(done: u64, total: u64) -> u64 {
    // At most 100: the conversion never fails.
    u64::try_from(u128::from(done.min(total)) * 100 / u128::from(total.max(1))).unwrap_or(100)
}

/// A progress line: qemu-img's `    (P/100%)`, then the bytes copied and
/// the average rate (for the last line, the time taken too).
fn line(done: u64, total: u64, copied: u64, label: &str, elapsed: Duration, last: bool) -> String {
    let pct = done.min(total) as f64 * 100.0 / total.max(1) as f64;
    let mut s = format!("    ({pct:.2}/100%)");
    if !label.is_empty() {
        s.push_str(&format!(" {} {label}", short(copied)));
    }
    if last {
        s.push_str(&format!(" in {:.1} s", elapsed.as_secs_f64()));
    }
    if !label.is_empty() {
        s.push_str(&format!(", {}/s", short(rate(copied, elapsed))));
    }
    s
}

/// Bytes per second, over at least a millisecond.
fn rate(bytes: u64, elapsed: Duration) -> u64 {
    let ms = elapsed.as_millis().max(1);
    u64::try_from(u128::from(bytes) * 1000 / ms).unwrap_or(u64::MAX)
}

/// A size with one decimal: "0 B", "512 B", "1.5 KiB", "120.3 MiB".
fn short(v: u64) -> String {
    const UNITS: [&str; 7] = ["B", "KiB", "MiB", "GiB", "TiB", "PiB", "EiB"];
    let mut unit = 0;
    while unit + 1 < UNITS.len() && v >> (10 * (unit + 1)) > 0 {
        unit += 1;
    }
    if unit == 0 {
        return format!("{v} B");
    }
    format!(
        "{:.1} {}",
        v as f64 / (1u64 << (10 * unit)) as f64,
        UNITS[unit]
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lines_read_like_qemu_img_with_the_bytes_copied() {
        let s = Duration::from_secs(2);
        assert_eq!(
            line(1 << 30, 4 << 30, 96 << 20, "written", s, false),
            "    (25.00/100%) 96.0 MiB written, 48.0 MiB/s"
        );
        assert_eq!(
            line(
                4 << 30,
                4 << 30,
                3 << 29,
                "copied",
                Duration::from_millis(1500),
                true
            ),
            "    (100.00/100%) 1.5 GiB copied in 1.5 s, 1.0 GiB/s"
        );
        assert_eq!(
            line(1, 3, 0, "moved", s, false),
            "    (33.33/100%) 0 B moved, 0 B/s"
        );
        assert_eq!(line(7, 7, 0, "", s, true), "    (100.00/100%) in 2.0 s");
        assert_eq!(whole_percent(999, 1000), 99);
        assert_eq!(whole_percent(5, 0), 0, "no total: nothing done");
        assert_eq!(whole_percent(u64::MAX, u64::MAX), 100);
        assert_eq!(rate(1000, Duration::ZERO), 1_000_000);
        assert_eq!(short(1023), "1023 B");
        assert_eq!(short(1536), "1.5 KiB");
        assert_eq!(short(u64::MAX), "16.0 EiB");
    }

    #[test]
    fn lines_come_once_per_whole_percent() {
        let p = Progress::hidden();
        p.inc(5);
        p.add_copied(5);
        p.step(disk::Step::default());
        p.set_message("x");
        p.finish();
        p.abandon();
        let printed = |p: &Progress| match &p.inner.as_deref().unwrap().out {
            Out::Lines { printed } => *printed.lock().unwrap(),
            Out::Bar { .. } => unreachable!(),
        };
        let lines = || Out::Lines {
            printed: Mutex::new(None),
        };
        let p = Progress::with_out(lines(), Some(1000), "written");
        assert_eq!(printed(&p), None);
        p.inc(1);
        assert_eq!(printed(&p), Some(0));
        for _ in 0..998 {
            p.inc(1);
        }
        assert_eq!(printed(&p), Some(99), "100% is left to the final line");
        // A total learnt later, from a library's steps.
        let p = Progress::with_out(lines(), Some(0), "moved");
        p.inc(1);
        assert_eq!(printed(&p), None, "no total yet");
        p.step(disk::Step {
            done: 3,
            total: 4,
            copied: 9,
        });
        assert_eq!(printed(&p), Some(75));
        p.step(disk::Step {
            done: 2,
            total: 4,
            copied: 9,
        });
        assert_eq!(printed(&p), Some(75), "never back");
        assert_eq!(
            p.inner
                .as_deref()
                .unwrap()
                .final_line()
                .split(" in ")
                .next(),
            Some("    (100.00/100%) 9 B moved")
        );
    }
}
