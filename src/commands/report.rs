//! `flawscope report`: the results store as one self-contained HTML file
//! to hand on (overlay thumbnails, verdicts, decisions, the threshold and
//! its estimates, a histogram), written to a temporary name and renamed.

use std::path::PathBuf;

use anyhow::Context;
use flawscope_core::model_file::write_atomically;
use flawscope_results::report::{Thumbnails, render};
use flawscope_results::store::Store;

use super::Outcome;

#[derive(clap::Args)]
pub struct Args {
    /// Results database written by `flawscope score --db`, `flawscope tui`
    /// or `flawscope serve --db`.
    #[arg(long)]
    pub db: PathBuf,
    /// The HTML file to write (it opens offline: everything is inline).
    #[arg(long)]
    pub out: PathBuf,
}

pub fn run(args: &Args) -> anyhow::Result<Outcome> {
    let store = Store::open_existing(&args.db)?;
    let html = render(&store, Thumbnails::FromFiles)
        .with_context(|| format!("reading {}", args.db.display()))?;
    write_atomically(&args.out, html.as_bytes())
        .with_context(|| format!("writing {}", args.out.display()))?;
    eprintln!("wrote the report to {}", args.out.display());
    Ok(Outcome::Success)
}
