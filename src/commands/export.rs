//! `flawscope export`: write the results store out as CSV or JSON lines.

use std::path::PathBuf;

use anyhow::Context;
use clap::ValueEnum;
use flawscope_core::model_file::write_atomically;
use flawscope_results::export::{rows, write_csv, write_jsonl};
use flawscope_results::store::Store;

use super::Outcome;

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Format {
    /// Comma-separated values with a header line.
    Csv,
    /// One JSON object per line.
    Jsonl,
}

#[derive(clap::Args)]
pub struct Args {
    /// Results database written by `flawscope score --db` or `flawscope tui`.
    #[arg(long)]
    pub db: PathBuf,
    #[arg(long, value_enum, default_value = "csv")]
    pub format: Format,
    /// Write here (atomically: a temporary file renamed into place) instead
    /// of standard output.
    #[arg(long)]
    pub out: Option<PathBuf>,
}

pub fn run(args: &Args) -> anyhow::Result<Outcome> {
    let store = Store::open_existing(&args.db)?;
    let rows = rows(&store)?;
    let mut text = Vec::new();
    match args.format {
        Format::Csv => write_csv(&rows, &mut text)?,
        Format::Jsonl => write_jsonl(&rows, &mut text)?,
    }
    match &args.out {
        Some(out) => {
            write_atomically(out, &text).with_context(|| format!("writing {}", out.display()))?;
            eprintln!("wrote {} rows to {}", rows.len(), out.display());
        }
        None => {
            use std::io::Write;
            let mut stdout = std::io::stdout().lock();
            stdout.write_all(&text)?;
            stdout.flush()?;
        }
    }
    Ok(Outcome::Success)
}
