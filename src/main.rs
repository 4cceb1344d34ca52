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
