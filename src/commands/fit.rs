//! `flawscope fit`: learn "normal" from a folder of good images and save one
//! model file.

use std::path::PathBuf;

use anyhow::Context;
use flawscope_core::dataset::scan_image_folder;
use flawscope_core::images::ImageLimits;
use flawscope_core::inspector::{FitOptions, Inspector};

use super::Outcome;
use super::options::{DetectorArgs, DetectorKind, DeviceChoice};
use super::winclip::ClipArgs;
use crate::progress::Bars;

#[derive(clap::Args)]
pub struct Args {
    /// Folder of normal (good) images.
    #[arg(long)]
    pub train: PathBuf,
    /// Where to write the model file.
    #[arg(long)]
    pub out: PathBuf,
    #[command(flatten)]
    pub detector: DetectorArgs,
    /// Highest fraction of held-back normal images the threshold may flag.
    #[arg(long, default_value_t = 0.01)]
    pub max_far: f64,
    /// Fraction of the normal images held back to set the threshold.
    #[arg(long, default_value_t = 0.1)]
    pub holdout: f64,
    /// Optional folder of known-anomalous images: the threshold then
    /// maximises F1 within the false-alarm limit.
    #[arg(long)]
    pub anomalies: Option<PathBuf>,
    /// WinCLIP: how many normal images (the first by path) make the
    /// few-shot memory; 0 writes a zero-shot model.
    #[arg(long)]
    pub shots: Option<usize>,
    #[command(flatten)]
    pub clip: ClipArgs,
    /// Where the networks run.
    #[arg(long, value_enum, default_value = "auto")]
    pub device: DeviceChoice,
}

pub fn run(args: &Args) -> anyhow::Result<Outcome> {
    let device = args.device.device()?;
    if args.detector.detector == DetectorKind::Winclip {
        return super::winclip::fit(&args.train, &args.out, &args.clip, args.shots, &device);
    }
    let (features, detector) = args.detector.configs()?;
    let normal = scan_image_folder(&args.train)
        .with_context(|| format!("reading training images in {}", args.train.display()))?;
    let anomalies = match &args.anomalies {
        Some(dir) => scan_image_folder(dir)
            .with_context(|| format!("reading anomalous images in {}", dir.display()))?,
        None => Vec::new(),
    };
    let options = FitOptions {
        features,
        detector,
        holdout: args.holdout,
        max_far: args.max_far,
        anomalies,
        limits: ImageLimits::default(),
    };
    let started = std::time::Instant::now();
    let inspector = Inspector::fit(&normal, &options, &device, &Bars::new(false))
        .context("fitting the model")?;
    inspector
        .save(&args.out)
        .with_context(|| format!("saving the model to {}", args.out.display()))?;
    let info = inspector.info();
    let c = &info.calibration;
    eprintln!(
        "fitted {} on {} images in {:.1} s{}; threshold {:.4} (raw), estimated false-alarm rate {:.3} on {} held-back normal images; wrote {}",
        info.detector.name(),
        info.training_images,
        started.elapsed().as_secs_f64(),
        info.memory_bank_size
            .map_or(String::new(), |n| format!(", memory bank {n}")),
        c.threshold,
        c.estimated_far,
        c.normal_images,
        args.out.display()
    );
    Ok(Outcome::Success)
}
