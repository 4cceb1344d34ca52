//! Progress bars on standard error for the library's long work.

use std::sync::Mutex;

use flawscope_core::progress::Progress;
use indicatif::{ProgressBar, ProgressStyle};

/// Shows each phase as its own bar. Draws nothing when stderr is not a
/// terminal.
pub struct Bars {
    current: Mutex<Option<ProgressBar>>,
    quiet: bool,
}

impl Bars {
    pub fn new(quiet: bool) -> Self {
        Self {
            current: Mutex::new(None),
            quiet,
        }
    }

    /// Runs `f` with the bar hidden, so lines printed meanwhile do not
    /// leave stale bar lines between them.
    pub fn suspend<T>(&self, f: impl FnOnce() -> T) -> T {
        let bar = self.current.lock().ok().and_then(|guard| guard.clone());
        match bar {
            Some(bar) => bar.suspend(f),
            None => f(),
        }
    }

    fn with_bar(&self, f: impl FnOnce(&ProgressBar)) {
        if let Ok(guard) = self.current.lock()
            && let Some(bar) = guard.as_ref()
        {
            f(bar);
        }
    }
}

impl Progress for Bars {
    fn start(&self, phase: &str, total: u64) {
        if self.quiet {
            return;
        }
        let bar = ProgressBar::new(total);
        if let Ok(style) =
            ProgressStyle::with_template("{msg:>24} [{bar:30}] {pos}/{len} ({elapsed}, eta {eta})")
        {
            bar.set_style(style.progress_chars("=> "));
        }
        bar.set_message(phase.to_string());
        if let Ok(mut guard) = self.current.lock()
            && let Some(old) = guard.replace(bar)
        {
            old.finish_and_clear();
        }
    }

    fn advance(&self, steps: u64) {
        self.with_bar(|bar| bar.inc(steps));
    }

    fn message(&self, text: &str) {
        self.with_bar(|bar| bar.set_message(text.to_string()));
    }

    fn finish(&self) {
        if let Ok(mut guard) = self.current.lock()
            && let Some(bar) = guard.take()
        {
            bar.finish_and_clear();
        }
    }
}
