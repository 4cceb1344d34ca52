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
    /// Serve models over HTTP (JSON API, chat-ops, Open Inference Protocol v2, metrics).
    Serve(commands::serve::Args),
    /// Triage a folder in the terminal: worst first, mark OK / NG, saved as you go.
    Tui(commands::tui::Args),
    /// Write a results database out as CSV or JSON lines.
    Export(commands::export::Args),
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
    };
    match outcome {
        Ok(code) => code.into(),
        Err(err) => {
            eprintln!("error: {err:#}");
            commands::Outcome::from_error(&err).into()
        }
    }
}
