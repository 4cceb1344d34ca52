//! The `flawscope` command: find defects in industrial images without
//! labelled defects.
//!
//! Exit codes: 0 success; 1 failure; 2 bad usage or missing setup (clap's own
//! usage errors use 2 too); 3 some inputs could not be processed while the
//! rest were.

mod commands;
mod progress;

use std::process::ExitCode;

use clap::{Parser, Subcommand};

/// Backbone layers allocate multi-megabyte buffers per image; glibc returns
/// them to the kernel and faults them in again each time, mimalloc reuses them.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// mimalloc's `mi_option_purge_delay`: the entry before
/// `mi_option_use_numa_nodes` in its `mi_option_e` (the sys crate names
/// that one, not this).
const PURGE_DELAY: libmimalloc_sys::mi_option_t = libmimalloc_sys::mi_option_use_numa_nodes - 1;

/// Keeps freed memory committed instead of handing it back to the kernel
/// (by default a second after it is freed): the layers' buffers were
/// returned and faulted in again: 900 page faults instead of 15–20 000 over
/// 300 images, and eval at batch 1 took 19.7–22.3 against 20.6–25.2
/// ms/image (faster in 4 of 5 pairs). The process keeps its high-water mark.
fn keep_freed_memory() {
    // An FFI call into the allocator's option table; -1 means "never purge".
    #[allow(unsafe_code)]
    // SAFETY: sets one option of the linked mimalloc; every value is valid for it.
    unsafe {
        libmimalloc_sys::mi_option_set(PURGE_DELAY, -1);
    }
}

#[derive(Parser)]
#[command(name = "flawscope", version, about, long_about = None)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Count the images of a dataset in the MVTec layout, per category and split.
    DatasetInfo(commands::dataset_info::Args),
    /// Learn normal appearance from a folder of good images and save a model file.
    Fit(commands::fit::Args),
    /// Score images or folders with a fitted model.
    Score(commands::score::Args),
    /// Fit and score the small real sample shipped with flawscope (offline).
    Demo(commands::demo::Args),
    /// Measure speed: the backbone, and fitting and scoring at several training sizes.
    Bench(commands::bench::Args),
    /// Fit on a labelled dataset's normal images, score its test set and report metrics.
    Eval(commands::eval::Args),
    /// Serve models over HTTP (JSON API, chat-ops, Open Inference Protocol v2, metrics) and gRPC.
    Serve(commands::serve::Args),
    /// Triage a folder in the terminal: worst first, mark OK / NG, saved as you go.
    Tui(commands::tui::Args),
    /// Write a results database out as CSV or JSON lines.
    Export(commands::export::Args),
    /// Work on results databases as a whole (merge those of sharded runs).
    Results(commands::results::Args),
    /// Learn from OK / NG decisions in a results database: fit again with the
    /// false alarms marked OK as normal images; NG marks give a labelled
    /// missed-alarm rate.
    Refit(commands::refit::Args),
    /// Watch a folder: score every image that appears, once, and push each
    /// result to webhooks and MQTT topics until acknowledged.
    Watch(commands::watch::Args),
    /// Write a results database as one self-contained HTML report (thumbnails, verdicts, decisions, threshold and estimates, histogram).
    Report(commands::report::Args),
}

fn main() -> ExitCode {
    keep_freed_memory();
    let cli = Cli::parse();
    let outcome = match cli.command {
        Command::DatasetInfo(args) => commands::dataset_info::run(&args),
        Command::Eval(args) => commands::eval::run(&args),
        Command::Fit(args) => commands::fit::run(&args),
        Command::Demo(args) => commands::demo::run(&args),
        Command::Bench(args) => commands::bench::run(&args),
        Command::Score(args) => commands::score::run(&args),
        Command::Serve(args) => commands::serve::run(&args),
        Command::Tui(args) => commands::tui::run(&args),
        Command::Export(args) => commands::export::run(&args),
        Command::Results(args) => commands::results::run(&args),
        Command::Refit(args) => commands::refit::run(&args),
        Command::Watch(args) => commands::watch::run(&args),
        Command::Report(args) => commands::report::run(&args),
    };
    match outcome {
        Ok(code) => code.into(),
        // A reader that went away (`score ... | head`) is not an error.
        Err(err) if is_broken_pipe(&err) => commands::Outcome::Success.into(),
        Err(err) => {
            eprintln!("error: {}", commands::describe(&err));
            commands::Outcome::from_error(&err).into()
        }
    }
}

fn is_broken_pipe(err: &anyhow::Error) -> bool {
    err.chain().any(|cause| {
        cause
            .downcast_ref::<std::io::Error>()
            .is_some_and(|e| e.kind() == std::io::ErrorKind::BrokenPipe)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, thiserror::Error)]
    #[error("cannot read x: {0}")]
    struct Quoting(#[source] std::io::Error);

    #[test]
    fn freed_memory_is_kept() {
        #[allow(unsafe_code)]
        // SAFETY: reads one option of the linked mimalloc.
        let get = || unsafe { libmimalloc_sys::mi_option_get(PURGE_DELAY) };
        if std::env::var_os("MIMALLOC_PURGE_DELAY").is_none() {
            // The purge delay's default in mimalloc 3 (1 000 ms; other
            // options default to 0, 1, 2 or 100): the index is the right one.
            assert_eq!(get(), 1000);
        }
        keep_freed_memory();
        assert_eq!(get(), -1);
    }

    #[test]
    fn causes_quoted_by_their_error_are_said_once() {
        let io = std::io::Error::new(
            std::io::ErrorKind::UnexpectedEof,
            "failed to fill whole buffer",
        );
        let err = anyhow::Error::new(Quoting(io)).context("scoring a.png");
        assert_eq!(
            commands::describe(&err),
            "scoring a.png: cannot read x: failed to fill whole buffer"
        );
    }
}
