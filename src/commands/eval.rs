//! `flawscope eval`: fit on a labelled dataset's normal images, score its
//! test set, and report the field's metrics.

use std::path::PathBuf;

use anyhow::Context;
use flawscope_core::dataset::Dataset;
use flawscope_core::detectors::DetectorConfig;
use flawscope_core::evaluation::{ThresholdTarget, evaluate_batch, evaluate_shots};
use flawscope_core::images::ImageLimits;
use flawscope_core::musc::MuscConfig;

use super::clip::{ClipArgs, setup_error};
use super::options::{DetectorArgs, DetectorKind, DeviceChoice, TileArgs, parse_rate};
use super::{Outcome, UsageError};
use crate::progress::Bars;

#[derive(clap::Args)]
pub struct Args {
    /// Dataset in the MVTec layout.
    #[arg(long)]
    pub dataset: PathBuf,
    /// Only this category (default: every category).
    #[arg(long)]
    pub category: Option<String>,
    #[command(flatten)]
    pub detector: DetectorArgs,
    #[command(flatten)]
    pub tile: TileArgs,
    /// One JSON object per category instead of a table.
    #[arg(long)]
    pub json: bool,
    /// Fit on the first K normal training images by path (as `fit
    /// --shots`). WinCLIP: the few-shot memory; 0 or absent: zero-shot.
    #[arg(long)]
    pub shots: Option<usize>,
    #[command(flatten)]
    pub clip: ClipArgs,
    /// Where the networks run.
    #[arg(long, value_enum, default_value = "auto")]
    pub device: DeviceChoice,
    /// Test images scored at once, concurrently (ms/image is then the wall
    /// time over the test set divided by its images: throughput, not the
    /// latency of one image, which batch 1 gives).
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u16).range(1..=flawscope_core::evaluation::MAX_BATCH as i64))]
    pub batch: u16,
    /// The threshold is fitted as `fit` does: at most this fraction of the
    /// normal training images (scored out of sample) flagged.
    #[arg(long, default_value_t = 0.01, value_parser = parse_rate)]
    pub max_far: f64,
    /// Instead: miss at most this fraction of synthetic defects.
    #[arg(long, value_parser = parse_rate, conflicts_with = "max_far")]
    pub max_mar: Option<f64>,
}

pub fn run(args: &Args) -> anyhow::Result<Outcome> {
    // Mutual scoring fits nothing: it takes each test set as one batch.
    let mutual = args.detector.detector == DetectorKind::Musc;
    if mutual && args.shots.is_some() {
        return Err(UsageError(
            "--detector musc uses no normal images (it is the k = 0 point); drop --shots".into(),
        )
        .into());
    }
    let d = &args.detector;
    if mutual && (d.backbone != "lite0" || d.backbone_weights.is_some() || d.layers.is_some()) {
        // musc takes its features from core's own recipe (embedded Lite0);
        // refusing is better than silently ignoring another backbone.
        return Err(UsageError(
            "--detector musc scores with the embedded Lite0 features; --backbone, \
             --backbone-weights and --layers do not apply to it yet"
                .into(),
        )
        .into());
    }
    let (features, detector) = if mutual {
        (None, DetectorConfig::PatchCore(Default::default()))
    } else {
        args.detector.configs(&args.clip, args.shots)?
    };
    let partner = args.detector.partner(&args.clip, args.shots)?;
    if let Some(k) = args.shots
        && detector.is_calibrated()
        && !mutual
    {
        flawscope_core::fewshot::check_shots(k, &detector)
            .map_err(|e| UsageError(e.to_string()))?;
    }
    let runtime = args.clip.runtime(args.device.device()?)?;
    let dataset = Dataset::open(&args.dataset)
        .with_context(|| format!("reading dataset {}", args.dataset.display()))?;
    let categories = match &args.category {
        Some(name) => vec![dataset.category(name)?.clone()],
        None => dataset.categories.clone(),
    };
    let bars = Bars::new(false);
    if !args.json {
        println!(
            "{:<16} {:<15} {:>9} {:>9} {:>7} {:>7} {:>11} {:>8} {:>10} {:>10} {:>8} {:>8} {:>8}",
            "category",
            "detector",
            "img AUROC",
            "pix AUROC",
            "AUPRO",
            "F1-max",
            "false alarm",
            "recall",
            "ref R@1%FA",
            "ref R@5%FA",
            "fit s",
            "ms/img",
            "bank"
        );
    }
    for category in &categories {
        let report = if mutual {
            evaluate_batch(
                category,
                &MuscConfig::default(),
                &runtime,
                &ImageLimits::default(),
                &bars,
            )
        } else {
            evaluate_shots(
                category,
                args.shots,
                features.as_ref(),
                &detector,
                partner.as_ref(),
                &runtime,
                &ImageLimits::default(),
                args.tile.choice(),
                usize::from(args.batch),
                ThresholdTarget {
                    max_far: args.max_far,
                    max_mar: args.max_mar,
                },
                &bars,
            )
        }
        .map_err(setup_error)
        .with_context(|| format!("evaluating category {}", category.name))?;
        if args.json {
            println!("{}", serde_json::to_string(&report)?);
        } else {
            let opt = |v: Option<f64>| v.map_or("-".to_string(), |v| format!("{v:.3}"));
            println!(
                "{:<16} {:<15} {:>9.3} {:>9} {:>7} {:>7.3} {:>11} {:>8.3} {:>10} {:>10} {:>8.1} {:>8.1} {:>8}",
                report.category,
                report.detector,
                report.image_auroc,
                opt(report.pixel_auroc),
                opt(report.aupro),
                report.f1_max,
                format!(
                    "{}/{} {:.3}",
                    report.at_threshold.false_alarms,
                    report.at_threshold.good_images,
                    report.at_threshold.false_alarm_rate
                ),
                report.at_threshold.recall,
                opt(report.recall_at_far.get("0.01").copied()),
                opt(report.recall_at_far.get("0.05").copied()),
                report.fit_seconds,
                report.ms_per_image,
                report
                    .memory_bank_size
                    .map_or("-".to_string(), |n| n.to_string()),
            );
            // What the fit decided on its own, as `fit` reports it.
            if let Some(decision) = &report.tiling_decision {
                eprintln!(
                    "{}: automatic tiling {}",
                    report.category,
                    decision.describe()
                );
            }
            if let Some(choice) = &report.detector_choice {
                eprintln!(
                    "{}: automatic detector choice {}",
                    report.category,
                    choice.describe()
                );
            }
        }
    }
    Ok(Outcome::Success)
}
