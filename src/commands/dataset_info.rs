//! `flawscope dataset-info DIR`: what a dataset folder holds.

use std::path::PathBuf;

use anyhow::Context;
use flawscope_core::dataset::Dataset;

use super::Outcome;

#[derive(clap::Args)]
pub struct Args {
    /// Dataset folder in the MVTec layout (one category or a folder of categories).
    pub dir: PathBuf,
    /// Print JSON instead of a table.
    #[arg(long)]
    pub json: bool,
}

pub fn run(args: &Args) -> anyhow::Result<Outcome> {
    let dataset = Dataset::open(&args.dir)
        .with_context(|| format!("reading dataset {}", args.dir.display()))?;
    let summaries: Vec<_> = dataset.categories.iter().map(|c| c.summary()).collect();
    if args.json {
        let json = serde_json::json!({
            "root": dataset.root,
            "categories": summaries,
        });
        println!("{}", serde_json::to_string_pretty(&json)?);
        return Ok(Outcome::Success);
    }
    println!(
        "{:<16} {:>11} {:>10} {:>14} {:>6}  defect types",
        "category", "train good", "test good", "test anomalous", "masks"
    );
    for s in &summaries {
        let types = s
            .test_defects
            .iter()
            .map(|(name, n)| format!("{name} {n}"))
            .collect::<Vec<_>>()
            .join(", ");
        println!(
            "{:<16} {:>11} {:>10} {:>14} {:>6}  {}",
            s.category, s.train_good, s.test_good, s.test_anomalous, s.masks, types
        );
    }
    Ok(Outcome::Success)
}
