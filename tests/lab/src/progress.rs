//! Timestamped progress lines on stderr.

use std::fmt::Display;
use std::time::Instant;

/// Timestamped progress lines on stderr.
pub(crate) struct Progress {
    start: Instant,
}

impl Progress {
    pub(crate) fn new() -> Self {
        Progress {
            start: Instant::now(),
        }
    }

    pub(crate) fn step(&self, msg: impl Display) {
        eprintln!("[{:>7.1}s] {msg}", self.start.elapsed().as_secs_f64());
    }
}
