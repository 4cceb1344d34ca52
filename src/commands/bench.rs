//! `flawscope bench`: speed and memory measurements of the default path.
//!
//! `bench backbone` times the backbone's forward pass; `bench patchcore`
//! fits PatchCore on growing parts of a folder of normal images and reports
//! fit time, memory-bank size and per-image scoring time; `bench nearest`
//! splits PatchCore's scoring time into backbone and nearest-neighbour search
//! and compares the search index with all query–bank products. Every figure
//! is a median over repeated runs inside one process.

use std::path::PathBuf;
use std::time::Instant;

use anyhow::Context;
use flawscope_core::Tensor;
use flawscope_core::dataset::{scan_image_folder, scan_image_tree};
use flawscope_core::detector::{FitInputs, ScoreGrid};
use flawscope_core::detectors::patchcore::{PatchCore, PatchCoreConfig};
use flawscope_core::detectors::resize_for;
use flawscope_core::features::{
    BackboneKind, BackbonePrecision, FeatureConfig, FeatureExtractor, parse_stage, time_backbone,
};
use flawscope_core::images::{ImageLimits, load_image};
use flawscope_core::model::first_by_hash;
use flawscope_core::nearest::BankIndex;
use flawscope_core::progress::NoProgress;
use flawscope_core::runtime::Runtime;
use serde::Serialize;

use super::Outcome;
use super::clip::{ClipArgs, setup_error};
use super::options::{DetectorArgs, PrecisionArg, device};
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
        /// Arithmetic of the 1×1 layers (see `fit --backbone-precision`).
        #[arg(long, value_enum, default_value = "f32")]
        backbone_precision: PrecisionArg,
        /// Input side in pixels (32 to 2048, as for fitting).
        #[arg(long, default_value_t = 224,
              value_parser = clap::value_parser!(u32).range(32..=2048))]
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
    /// Build a PatchCore bank and time, per test image, the backbone and
    /// the nearest-neighbour search (index vs all products), checking that
    /// both searches agree.
    Nearest {
        /// Folder of normal images for the bank.
        #[arg(long)]
        train: PathBuf,
        /// Folder (searched recursively) of images to score.
        #[arg(long)]
        test: PathBuf,
        /// Backbone stages, comma-separated.
        #[arg(long, value_delimiter = ',', default_value = "stage3,stage5")]
        stages: Vec<String>,
        /// Input side in pixels (32 to 2048, as for fitting).
        #[arg(long, default_value_t = 256,
              value_parser = clap::value_parser!(u32).range(32..=2048))]
        size: u32,
        /// Resize to a square (aspect not kept).
        #[arg(long)]
        square: bool,
        /// Fraction of training patches kept in the bank.
        #[arg(long, default_value_t = 0.1)]
        coreset: f64,
        /// Test images timed.
        #[arg(long, default_value_t = 50,
              value_parser = clap::value_parser!(u64).range(1..=100_000))]
        images: u64,
        /// Also time indexes with these numbers of leading axes.
        #[arg(long, value_delimiter = ',')]
        leads: Vec<usize>,
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
            backbone_precision,
            size,
            runs,
        } => backbone(
            kind,
            backbone_weights.as_deref(),
            (*backbone_precision).into(),
            *size,
            *runs,
        ),
        Bench::Fit {
            train,
            fractions,
            score_images,
            detector,
            json,
        } => fit(train, fractions, *score_images, detector, *json),
        Bench::Nearest {
            train,
            test,
            stages,
            size,
            square,
            coreset,
            images,
            leads,
        } => nearest(&NearestBench {
            train,
            test,
            stages,
            size: *size,
            square: *square,
            coreset: *coreset,
            images: usize::try_from(*images).unwrap_or(usize::MAX),
            leads,
        }),
    }
}

fn median(mut values: Vec<f64>) -> f64 {
    values.sort_by(f64::total_cmp);
    values.get(values.len() / 2).copied().unwrap_or(f64::NAN)
}

fn backbone(
    kind: &str,
    weights: Option<&std::path::Path>,
    precision: BackbonePrecision,
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
    let times =
        time_backbone(kind, weights, precision, size, runs, &device()).map_err(setup_error)?;
    let arithmetic = match precision {
        BackbonePrecision::F32 => "",
        BackbonePrecision::Bf16 => ", bf16 1×1 layers",
    };
    println!(
        "{} forward at {size}×{size}{arithmetic}, batch 1: median {:.2} ms over {runs} runs ({} threads)",
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
    if detector_args.partner(&ClipArgs::default(), None)?.is_some() {
        return Err(super::UsageError(
            "bench fit times one detector; time a pair with `flawscope eval`".into(),
        )
        .into());
    }
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
        // A stable subset (the first in hash order); the rest is unseen and
        // used for timing the scoring.
        let (rest, subset) = if fraction >= 1.0 {
            (Vec::new(), all.clone())
        } else {
            if fraction.is_nan() || fraction <= 0.0 {
                return Err(super::UsageError(format!(
                    "fractions must be in (0, 1], got {fraction}"
                ))
                .into());
            }
            let n = ((all.len() as f64 * fraction).round() as usize).clamp(1, all.len().max(2) - 1);
            let subset = first_by_hash(&all, n);
            let rest: Vec<PathBuf> = all
                .iter()
                .filter(|p| !subset.contains(p))
                .cloned()
                .collect();
            (rest, subset)
        };
        let start = Instant::now();
        let detector = detector_config
            .fit(&FitInputs {
                normal: &subset,
                features: features.as_ref(),
                runtime: &runtime,
                limits: &limits,
                progress: &bars,
                tiling: None,
                folds: None,
            })?
            .detector;
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

struct NearestBench<'a> {
    train: &'a std::path::Path,
    test: &'a std::path::Path,
    stages: &'a [String],
    size: u32,
    square: bool,
    coreset: f64,
    images: usize,
    leads: &'a [usize],
}

fn nearest(args: &NearestBench<'_>) -> anyhow::Result<Outcome> {
    if !(args.coreset > 0.0 && args.coreset <= 1.0) {
        return Err(super::UsageError(format!(
            "--coreset must be in (0, 1], got {}",
            args.coreset
        ))
        .into());
    }
    let stages = args
        .stages
        .iter()
        .map(|n| parse_stage(n.trim()))
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| super::UsageError(e.to_string()))?;
    let features = FeatureConfig::lite0(&stages, resize_for(args.size, args.square));
    let device = device();
    let extractor = FeatureExtractor::new(features, &device)?;
    let limits = ImageLimits::default();
    let train = scan_image_folder(args.train)
        .with_context(|| format!("reading training images in {}", args.train.display()))?;
    let test = scan_image_tree(args.test)
        .with_context(|| format!("reading test images in {}", args.test.display()))?;
    let mut grids = Vec::with_capacity(train.len());
    for path in &train {
        grids.push(extractor.extract(&load_image(path, &limits)?)?.features);
    }
    let start = Instant::now();
    let config = PatchCoreConfig {
        coreset_ratio: args.coreset,
        coarse_side: None,
        ..Default::default()
    };
    let bank = PatchCore::fit(&Tensor::cat(&grids, 0)?, &config, &NoProgress)?;
    drop(grids);
    let fit_seconds = start.elapsed().as_secs_f64();
    let mut indexes = vec![("index".to_string(), None)];
    for &lead in args.leads {
        let index = BankIndex::with_lead(bank.bank(), Some(lead))?;
        indexes.push((
            format!(
                "index, lead {} ({:.1} % of variance)",
                index.lead(),
                100.0 * index.lead_share()
            ),
            Some(index),
        ));
    }
    if let Some(index) = bank.index().filter(|i| i.uses_i8()) {
        indexes.push((
            format!("index, lead {}, f32 bound product", index.lead()),
            Some(BankIndex::with_lead_f32(bank.bank(), Some(index.lead()))?),
        ));
    }
    let default_lead = bank
        .index()
        .map_or((0, 0.0), |i| (i.lead(), i.lead_share()));
    let mut backbone = Vec::new();
    let mut scoring = Vec::new();
    let mut maps = Vec::new();
    let mut products = Vec::new();
    let mut index_times = vec![Vec::new(); indexes.len()];
    let mut computed = vec![0u64; indexes.len()];
    let (mut queries, mut same, mut worst) = (0usize, 0usize, 0f32);
    for (i, path) in test.iter().take(args.images).enumerate() {
        let image = load_image(path, &limits)?;
        let start = Instant::now();
        let grid = extractor.extract(&image)?;
        backbone.push(start.elapsed().as_secs_f64() * 1000.0);
        let start = Instant::now();
        let scores = bank.score(&grid.features)?;
        scoring.push(start.elapsed().as_secs_f64() * 1000.0);
        // The map as a detector's output builds it: upsampled to the input,
        // blurred, resized to the image.
        let start = Instant::now();
        let map = ScoreGrid::of(&grid, scores.patches).to_map(image.dimensions())?;
        maps.push(start.elapsed().as_secs_f64() * 1000.0);
        std::hint::black_box(map);
        // The order of the searches rotates so none always runs on a
        // warmer cache.
        let order: Vec<usize> = (0..=indexes.len())
            .map(|k| (k + i) % (indexes.len() + 1))
            .collect();
        let mut reference = None;
        let mut found_all = vec![None; indexes.len()];
        for k in order {
            let start = Instant::now();
            if k == indexes.len() {
                let found = bank.nearest_by_products(&grid.features)?;
                products.push(start.elapsed().as_secs_f64() * 1000.0);
                reference = Some(found);
            } else {
                let found = match &indexes[k].1 {
                    Some(index) => index.nearest(&grid.features)?,
                    None => bank
                        .index()
                        .context("the bank has no index (not on the CPU)")?
                        .nearest(&grid.features)?,
                };
                index_times[k].push(start.elapsed().as_secs_f64() * 1000.0);
                computed[k] += found.full_distances_computed;
                found_all[k] = Some(found);
            }
        }
        let (want_d, want_i) = reference.context("no reference search")?;
        queries += want_i.len();
        for found in found_all.into_iter().flatten() {
            same += found
                .indices
                .iter()
                .zip(&want_i)
                .filter(|(a, b)| a == b)
                .count();
            for (a, b) in found.distances.iter().zip(&want_d) {
                worst = worst.max((a.max(0.0).sqrt() - b.max(0.0).sqrt()).abs());
            }
        }
    }
    let n = backbone.len();
    println!(
        "bank {} × {} from {} images ({fit_seconds:.1} s); {n} test images, {queries} patches; {} threads",
        bank.bank_size(),
        bank.bank().dims().get(1).copied().unwrap_or(0),
        train.len(),
        rayon::current_num_threads()
    );
    println!(
        "backbone + patch features: median {:.1} ms/image",
        median(backbone)
    );
    println!(
        "PatchCore score (index search + image-score reweighting): median {:.1} ms/image",
        median(scoring)
    );
    println!(
        "anomaly map (upsample, blur, resize): median {:.1} ms/image",
        median(maps)
    );
    println!(
        "nearest, all products:     median {:.1} ms/image",
        median(products)
    );
    let pairs = (queries * bank.bank_size()).max(1) as f64;
    for (((name, _), times), computed) in indexes.iter().zip(index_times).zip(computed) {
        let name = if name == "index" {
            format!(
                "index (default lead {}, {:.1} % of variance, {} bound product)",
                default_lead.0,
                100.0 * default_lead.1,
                if bank.index().is_some_and(|i| i.uses_i8()) {
                    "8-bit"
                } else {
                    "f32"
                }
            )
        } else {
            name.clone()
        };
        println!(
            "nearest, {name}: median {:.1} ms/image, full distances for {:.2} % of pairs",
            median(times),
            100.0 * computed as f64 / pairs
        );
    }
    println!(
        "same nearest row as all products for {same} of {} searches; largest distance difference {worst:.2e}",
        queries * indexes.len()
    );
    Ok(Outcome::Success)
}
