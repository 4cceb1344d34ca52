//! Progress reporting for long work (fitting, scoring folders, training).
//!
//! The library only announces progress; the program that drives it decides
//! how to show it (a progress bar, a gauge, nothing).

/// Receives progress from long-running library calls.
pub trait Progress: Sync {
    /// A new phase of `total` steps begins.
    fn start(&self, phase: &str, total: u64);
    /// `steps` more steps are done.
    fn advance(&self, steps: u64);
    /// A free-form status line (for example the loss of a training epoch).
    fn message(&self, _text: &str) {}
    /// The current phase is over.
    fn finish(&self) {}
}

/// Discards progress.
#[derive(Debug, Clone, Copy, Default)]
pub struct NoProgress;

impl Progress for NoProgress {
    fn start(&self, _phase: &str, _total: u64) {}
    fn advance(&self, _steps: u64) {}
}
