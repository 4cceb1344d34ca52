//! `flawscope demo`: fit and score the small real sample shipped in the
//! repository (ELPV solar cells), offline, with no arguments.

use std::path::{Path, PathBuf};

use anyhow::Context;
use flawscope_core::dataset::Dataset;
use flawscope_core::heatmap::{Legend, save_overlay};
use flawscope_core::images::{ImageLimits, load_image};
use flawscope_core::metrics::image_auroc;
use flawscope_core::model::{FitOptions, Model};
use flawscope_core::runtime::Runtime;

use super::clip::ClipArgs;
use super::options::{DetectorArgs, device};
use super::{Outcome, UsageError};
use crate::progress::Bars;

#[derive(clap::Args)]
pub struct Args {
    /// The sample to use (default: the repository's demo/solar_cell).
    #[arg(long)]
    pub data: Option<PathBuf>,
    /// Folder for the heatmaps.
    #[arg(long, default_value = "flawscope-demo")]
    pub out: PathBuf,
    #[command(flatten)]
    pub detector: DetectorArgs,
}

fn default_sample() -> Option<PathBuf> {
    [
        Path::new(env!("CARGO_MANIFEST_DIR")).join("demo/solar_cell"),
        PathBuf::from("demo/solar_cell"),
    ]
    .into_iter()
    .find(|p| p.is_dir())
}

pub fn run(args: &Args) -> anyhow::Result<Outcome> {
    let sample = match &args.data {
        Some(dir) => dir.clone(),
        None => default_sample().ok_or_else(|| {
            UsageError(
                "the demo sample (demo/solar_cell) was not found; run from the repository or pass --data DIR".into(),
            )
        })?,
    };
    let dataset = Dataset::open(&sample)
        .with_context(|| format!("reading demo sample {}", sample.display()))?;
    let category = &dataset.categories[0];
    let (features, detector) = args.detector.configs(&ClipArgs::default(), None)?;
    let partner = args.detector.partner(&ClipArgs::default(), None)?;
    let limits = ImageLimits::default();
    let options = FitOptions {
        features,
        detector,
        limits,
        partner,
        ..FitOptions::default()
    };
    println!(
        "fitting {} on {} normal solar-cell images, each also scored out of sample for the \
         threshold (ELPV, CC BY-NC-SA 4.0) …",
        options.detector.name(),
        category.train_good.len(),
    );
    let runtime = Runtime::new(device());
    let inspector = Model::fit(&category.train_good, &options, &runtime, &Bars::new(false))?;
    std::fs::create_dir_all(&args.out)
        .with_context(|| format!("creating {}", args.out.display()))?;

    println!("\n{:<28} {:<10} {:>6}  verdict", "image", "truth", "score");
    let mut scores = Vec::new();
    let mut labels = Vec::new();
    for sample in &category.test {
        let image = load_image(&sample.path, &limits)?;
        let inspection = inspector.inspect(&image)?;
        let name = sample
            .path
            .file_name()
            .map_or_else(String::new, |n| n.to_string_lossy().into_owned());
        let stem = sample
            .path
            .file_stem()
            .map_or_else(String::new, |n| n.to_string_lossy().into_owned());
        let heatmap = args
            .out
            .join(format!("{}_{stem}_heatmap.png", sample.defect_type));
        save_overlay(&heatmap, &image, &inspection.map, &Legend::of(&inspection))?;
        println!(
            "{:<28} {:<10} {:>6.3}  {}",
            name,
            sample.defect_type,
            inspection.score,
            if inspection.is_anomalous {
                "ANOMALOUS"
            } else {
                "ok"
            }
        );
        scores.push(inspection.score);
        labels.push(sample.is_anomalous());
    }
    let correct = scores
        .iter()
        .zip(&labels)
        .filter(|(s, l)| (**s >= 0.5) == **l)
        .count();
    println!(
        "\nimage AUROC {:.3}; {correct} of {} verdicts right at threshold 0.5; heatmaps in {}",
        image_auroc(&scores, &labels)?,
        scores.len(),
        args.out.display()
    );
    Ok(Outcome::Success)
}
