//! `flawscope results`: work on results databases as a whole
//! (`results merge`: combine the stores of sharded scoring runs).

use std::path::PathBuf;

use flawscope_results::merge::merge;
use flawscope_results::store::StoreError;

use super::{Outcome, UsageError};

#[derive(clap::Args)]
pub struct Args {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(clap::Subcommand)]
pub enum Command {
    /// Combine results databases (e.g. of `score --shard I/N --db PART`
    /// workers) into a new one; an image scored twice by a model is kept
    /// once (the later score), decisions are kept.
    Merge(MergeArgs),
}

#[derive(clap::Args)]
pub struct MergeArgs {
    /// Results databases to combine.
    #[arg(required = true)]
    pub sources: Vec<PathBuf>,
    /// The new database (must not exist; written under a temporary name and
    /// renamed into place).
    #[arg(long)]
    pub out: PathBuf,
}

pub fn run(args: &Args) -> anyhow::Result<Outcome> {
    match &args.command {
        Command::Merge(merge_args) => run_merge(merge_args),
    }
}

fn run_merge(args: &MergeArgs) -> anyhow::Result<Outcome> {
    let summary = merge(&args.sources, &args.out).map_err(|err| match err {
        StoreError::Exists(_) | StoreError::Missing(_) => UsageError(err.to_string()).into(),
        other => anyhow::Error::new(other),
    })?;
    eprintln!(
        "merged {} databases: {} rows read, {} rows in {}",
        summary.sources,
        summary.rows_read,
        summary.rows_written,
        args.out.display()
    );
    Ok(Outcome::Success)
}
