//! `flawscope bench`: speed and memory measurements of the default path.
//!
//! `bench backbone` times the backbone's forward pass; `bench patchcore`
//! fits PatchCore on growing parts of a folder of normal images and reports
//! fit time, memory-bank size and per-image scoring time. Every figure is a
//! median over repeated runs inside one process.

use std::path::PathBuf;
use std::time::Instant;

use anyhow::Context;
use flawscope_core::dataset::scan_image_folder;
use flawscope_core::detector::FitInputs;
use flawscope_core::features::BackboneKind;
use flawscope_core::images::{ImageLimits, load_image};
use flawscope_core::model::split_holdout;
use flawscope_core::runtime::Runtime;
use flawscope_models::{EfficientNetLite, Preprocess};
use image::Rgb32FImage;
use serde::Serialize;

use super::Outcome;
use super::clip::ClipArgs;
use super::options::{DetectorArgs, device};
use crate::progress::Bars;

#[derive(clap::Args)]
pub struct Args {
    #[command(subcommand)]
    pub what: Bench,
}

// Parsed once per run: the size of the detector options in one variant
// costs nothing worth boxing them for.
#[allow(clippy::large_enum_variant)]
#[derive(clap::Subcommand)]
pub enum Bench {
    /// Time an EfficientNet-Lite forward pass (to the logits) on one image.
    Backbone {
        /// lite0 (embedded), lite1 or lite2 (these need --backbone-weights).
        #[arg(long, default_value = "lite0")]
        backbone: String,
        /// Weights as safetensors (see `fit --backbone-weights`).
        #[arg(long, value_name = "FILE")]
        backbone_weights: Option<PathBuf>,
        /// Input side in pixels.
        #[arg(long, default_value_t = 224)]
        size: u32,
        /// Timed runs (after 3 warm-up runs).
        #[arg(long, default_value_t = 30)]
        runs: usize,
    },
    /// Fit a detector on 25 %, 50 % and 100 % of a folder and time fitting
    /// and scoring.
    Fit {
        /// Folder of normal images.
        #[arg(long)]
        train: PathBuf,
        /// Fractions of the folder to fit on.
        #[arg(long, value_delimiter = ',', default_value = "0.25,0.5,1.0")]
        fractions: Vec<f64>,
        /// Images scored per fraction (taken from outside the fitted part
        /// when possible).
        #[arg(long, default_value_t = 50)]
        score_images: usize,
        #[command(flatten)]
        detector: DetectorArgs,
        /// Print JSON lines.
        #[arg(long)]
        json: bool,
    },
}

#[derive(Serialize)]
struct FitBench {
    fraction: f64,
    train_images: usize,
    fit_seconds: f64,
    memory_bank_size: Option<usize>,
    median_ms_per_image: f64,
    scored_images: usize,
}

pub fn run(args: &Args) -> anyhow::Result<Outcome> {
    match &args.what {
        Bench::Backbone {
            backbone: kind,
            backbone_weights,
            size,
            runs,
        } => backbone(kind, backbone_weights.as_deref(), *size, *runs),
        Bench::Fit {
            train,
            fractions,
            score_images,
            detector,
            json,
        } => fit(train, fractions, *score_images, detector, *json),
    }
}

fn median(mut values: Vec<f64>) -> f64 {
    values.sort_by(f64::total_cmp);
    values.get(values.len() / 2).copied().unwrap_or(f64::NAN)
}

fn backbone(
    kind: &str,
    weights: Option<&std::path::Path>,
    size: u32,
    runs: usize,
) -> anyhow::Result<Outcome> {
    let kind: BackboneKind = kind
        .parse()
        .map_err(|e: flawscope_core::Error| super::UsageError(format!("--backbone: {e}")))?;
    if !(16..=2048).contains(&size) {
        return Err(
            super::UsageError(format!("--size must be between 16 and 2048, got {size}")).into(),
        );
    }
    let device = device();
    let net = match weights {
        Some(path) => EfficientNetLite::load(kind.variant(), path, &device)
            .with_context(|| format!("loading {} weights from {}", kind.name(), path.display()))?,
        None if kind.is_embedded() => EfficientNetLite::embedded_lite0(&device)?,
        None => {
            return Err(super::UsageError(format!(
                "--backbone {} needs --backbone-weights FILE",
                kind.name()
            ))
            .into());
        }
    };
    let image = image::DynamicImage::ImageRgb32F(Rgb32FImage::from_fn(size, size, |x, y| {
        image::Rgb([x as f32 / size as f32, y as f32 / size as f32, 0.5])
    }));
    let input = Preprocess::new(size, size).image(&image, &device)?;
    let mut times = Vec::with_capacity(runs);
    for i in 0..runs + 3 {
        let start = Instant::now();
        let logits = net.logits(&input)?;
        logits.to_vec2::<f32>()?;
        if i >= 3 {
            times.push(start.elapsed().as_secs_f64() * 1000.0);
        }
    }
    println!(
        "{} forward at {size}×{size}, batch 1: median {:.2} ms over {runs} runs ({} threads)",
        kind.name(),
        median(times),
        rayon::current_num_threads()
    );
    Ok(Outcome::Success)
}

fn fit(
    train: &std::path::Path,
    fractions: &[f64],
    score_images: usize,
    detector_args: &DetectorArgs,
    json: bool,
) -> anyhow::Result<Outcome> {
    let (features, detector_config) = detector_args.configs(&ClipArgs::default(), None)?;
    let all = scan_image_folder(train)
        .with_context(|| format!("reading training images in {}", train.display()))?;
    let limits = ImageLimits::default();
    let runtime = Runtime::new(device());
    let bars = Bars::new(json);
    if !json {
        println!(
            "{:>8} {:>7} {:>9} {:>9} {:>10}",
            "fraction", "images", "fit s", "bank", "ms/image"
        );
    }
    for &fraction in fractions {
        // The same hash order as calibration hold-outs: the first part is a
        // stable subset, the rest is unseen and used for timing the scoring.
        let (rest, subset) = if fraction >= 1.0 {
            (Vec::new(), all.clone())
        } else {
            split_holdout(&all, fraction).map_err(|e| super::UsageError(e.to_string()))?
        };
        let start = Instant::now();
        let detector = detector_config.fit(&FitInputs {
            normal: &subset,
            features: features.as_ref(),
            runtime: &runtime,
            limits: &limits,
            progress: &bars,
            tiling: None,
        })?;
        let fit_seconds = start.elapsed().as_secs_f64();

        let to_score: Vec<&PathBuf> = rest.iter().chain(&subset).take(score_images).collect();
        let mut times = Vec::with_capacity(to_score.len());
        for path in &to_score {
            let image = load_image(path, &limits)?;
            let start = Instant::now();
            detector.inspect_raw(&image)?;
            times.push(start.elapsed().as_secs_f64() * 1000.0);
        }
        let row = FitBench {
            fraction,
            train_images: subset.len(),
            fit_seconds,
            memory_bank_size: detector.memory_bank_size(),
            median_ms_per_image: median(times),
            scored_images: to_score.len(),
        };
        if json {
            println!("{}", serde_json::to_string(&row)?);
        } else {
            println!(
                "{:>8.2} {:>7} {:>9.1} {:>9} {:>10.1}",
                row.fraction,
                row.train_images,
                row.fit_seconds,
                row.memory_bank_size.map_or("-".into(), |n| n.to_string()),
                row.median_ms_per_image
            );
        }
    }
    Ok(Outcome::Success)
}
