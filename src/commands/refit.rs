//! `flawscope refit`: learn from a person's OK / NG decisions in a results
//! database. Images marked OK that the model flagged join its normal
//! images; images marked NG give a labelled missed-alarm rate.

use std::collections::BTreeMap;
use std::path::PathBuf;

use anyhow::Context;
use flawscope_core::images::{ImageLimits, load_image};
use flawscope_results::store::{Decision, Store};

use super::clip::load_model;
use super::options::DeviceChoice;
use super::{Outcome, UsageError};
use crate::progress::Bars;

#[derive(clap::Args)]
pub struct Args {
    /// The model file to learn from decisions for.
    #[arg(long)]
    pub model: PathBuf,
    /// The results database holding the decisions (from `tui`, the page or
    /// `score --db`).
    #[arg(long)]
    pub db: PathBuf,
    /// Where to write the refitted model.
    #[arg(long)]
    pub out: PathBuf,
    /// Where the networks run.
    #[arg(long, value_enum, default_value = "auto")]
    pub device: DeviceChoice,
}

pub fn run(args: &Args) -> anyhow::Result<Outcome> {
    let runtime = flawscope_core::runtime::Runtime::new(args.device.device()?);
    let model = load_model(&args.model, &runtime)?;
    let store = Store::open_existing(&args.db)
        .with_context(|| format!("opening results database {}", args.db.display()))?;
    // A decision belongs to the image; the latest one counts.
    let mut decided: BTreeMap<PathBuf, (String, Decision)> = BTreeMap::new();
    for row in store.all_results()? {
        if row.decision == Decision::None {
            continue;
        }
        let at = row.decided_at.clone().unwrap_or_default();
        let newer = decided.get(&row.path).is_none_or(|(seen, _)| at > *seen);
        if newer {
            decided.insert(row.path.clone(), (at, row.decision));
        }
    }
    let limits = ImageLimits::default();
    let (mut marked_ok, mut added, mut marked_ng) = (0usize, Vec::new(), Vec::new());
    for (path, (_, decision)) in &decided {
        match decision {
            Decision::Ok => {
                marked_ok += 1;
                let image = load_image(path, &limits)
                    .with_context(|| format!("reading {} (marked OK)", path.display()))?;
                if model.inspect(&image)?.is_anomalous {
                    added.push(path.clone());
                }
            }
            Decision::Ng => marked_ng.push(path.clone()),
            Decision::None => {}
        }
    }
    if added.is_empty() && marked_ng.is_empty() {
        return Err(UsageError(format!(
            "{} holds no decision to learn from: no image marked OK that the model flags, and \
             none marked NG",
            args.db.display()
        ))
        .into());
    }
    eprintln!(
        "{} of {marked_ok} images marked OK were flagged by the model and join its normal \
         images; {} images are marked NG",
        added.len(),
        marked_ng.len()
    );
    let before = model.operating_point(None)?;
    let refitted = model
        .refit(
            &added,
            &marked_ng,
            &args.db.display().to_string(),
            &runtime,
            &Bars::new(false),
        )
        .context("refitting the model")?;
    refitted
        .save(&args.out)
        .with_context(|| format!("saving the model to {}", args.out.display()))?;
    let after = refitted.operating_point(None)?;
    eprintln!("before: {}", before.describe());
    eprintln!("after:  {}", after.describe());
    eprintln!("wrote {}", args.out.display());
    Ok(Outcome::Success)
}
