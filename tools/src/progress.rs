//! An optional progress bar on stderr (`-p`), counting virtual bytes done.

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use std::time::Duration;

/// A progress bar that draws nothing unless enabled. Cheap to share between
/// threads (`inc` takes `&self`).
#[derive(Clone)]
pub struct Progress {
    bar: ProgressBar,
}

impl Progress {
    /// A bar for `total` bytes, drawn on stderr when `enabled`.
    pub fn new(enabled: bool, total: u64, message: &str) -> Self {
        Self::drawn(
            enabled,
            Some(total),
            "{msg} [{elapsed_precise}] [{wide_bar}] {bytes}/{total_bytes} ({bytes_per_sec}, ETA {eta})",
            message,
        )
    }

    /// A bar counting units of work (blocks, entries) rather than bytes,
    /// drawn on stderr when `enabled`; its length comes with the first
    /// [`Progress::set_position`].
    pub fn counting(enabled: bool, message: &str) -> Self {
        Self::drawn(
            enabled,
            Some(0),
            "{msg} [{elapsed_precise}] [{wide_bar}] {pos}/{len}",
            message,
        )
    }

    /// A spinner with the elapsed time, for work whose amount is not known
    /// beforehand, drawn on stderr when `enabled`.
    pub fn spinner(enabled: bool, message: &str) -> Self {
        Self::drawn(
            enabled,
            None,
            "{spinner} {msg} [{elapsed_precise}]",
            message,
        )
    }

    /// A bar (or, without a length, a spinner) in `template`, hidden unless
    /// `enabled`.
    fn drawn(enabled: bool, len: Option<u64>, template: &str, message: &str) -> Self {
        if !enabled {
            return Progress {
                bar: ProgressBar::hidden(),
            };
        }
        let bar = ProgressBar::with_draw_target(len, ProgressDrawTarget::stderr());
        let fallback = if len.is_some() {
            ProgressStyle::default_bar()
        } else {
            ProgressStyle::default_spinner()
        };
        let style = ProgressStyle::with_template(template)
            .unwrap_or(fallback)
            .progress_chars("=> ");
        bar.set_style(style);
        bar.set_message(message.to_string());
        // Keep redrawing while a long flush runs with nothing moving.
        bar.enable_steady_tick(Duration::from_millis(if len.is_some() { 250 } else { 120 }));
        Progress { bar }
    }

    /// `n` more bytes are done.
    pub fn inc(&self, n: u64) {
        self.bar.inc(n);
    }

    /// The callback's view: `done` of `total` bytes are done (both
    /// absolute; `total` may be learnt only once the work starts).
    pub fn set_position(&self, done: u64, total: u64) {
        if self.bar.length() != Some(total) {
            self.bar.set_length(total);
        }
        self.bar.set_position(done);
    }

    /// Show what is happening now (e.g. "flushing" once the bytes are copied).
    pub fn set_message(&self, message: &str) {
        self.bar.set_message(message.to_string());
    }

    /// The work is complete: draw the bar full and leave it on screen, with
    /// the cursor on the next line.
    pub fn finish(&self) {
        if self.bar.is_hidden() {
            return;
        }
        self.bar.finish();
        eprintln!();
    }

    /// The work stopped early: remove the bar so an error message reads cleanly.
    pub fn abandon(&self) {
        self.bar.finish_and_clear();
    }
}
