//! `flawscope fit`: learn "normal" from a folder of good images and save one
//! model file.

use std::path::PathBuf;

use anyhow::Context;
use flawscope_core::calibration::ThresholdMethod;
use flawscope_core::dataset::scan_image_folder;
use flawscope_core::images::{ImageLimits, load_image};
use flawscope_core::model::{FitOptions, Model};
use rayon::prelude::*;

use super::clip::{ClipArgs, setup_error};
use super::options::{DetectorArgs, DeviceChoice, TileArgs, parse_rate};
use super::{Outcome, UsageError};
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
    /// Highest fraction of normal images the threshold may flag (each
    /// scored out of sample by cross-fitting).
    #[arg(long, default_value_t = 0.01, value_parser = parse_rate)]
    pub max_far: f64,
    /// Instead of a false-alarm limit: set the threshold to miss at most
    /// this fraction of the synthetic defects pasted into normal images,
    /// and report the false-alarm rate that costs.
    #[arg(long, value_parser = parse_rate, conflicts_with_all = ["max_far", "anomalies"])]
    pub max_mar: Option<f64>,
    #[command(flatten)]
    pub tile: TileArgs,
    /// Optional folder of known-anomalous images: the threshold then
    /// maximises F1 within the false-alarm limit.
    #[arg(long)]
    pub anomalies: Option<PathBuf>,
    /// Fit on the first K normal images by path. PatchCore and PaDiM also
    /// see the 8 rotations/flips of each (K ≥ 1); flow, recon and
    /// SuperSimpleNet need K ≥ 2. WinCLIP: the few-shot memory; 0 writes a
    /// zero-shot model.
    #[arg(long)]
    pub shots: Option<usize>,
    #[command(flatten)]
    pub clip: ClipArgs,
    /// Where the networks run.
    #[arg(long, value_enum, default_value = "auto")]
    pub device: DeviceChoice,
}

pub fn run(args: &Args) -> anyhow::Result<Outcome> {
    let (features, detector) = args.detector.fit_configs(&args.clip, args.shots)?;
    let partner = args.detector.partner(&args.clip, args.shots)?;
    if let Some(k) = args.shots
        && detector.is_calibrated()
    {
        flawscope_core::fewshot::check_shots(k, &detector)
            .map_err(|e| UsageError(e.to_string()))?;
    }
    // Beside a classical detector, --object adds the text layer; defects
    // are asked about when scoring, not here.
    let text_layer = if detector.is_calibrated() {
        if !args.clip.prompts.is_empty() {
            return Err(UsageError(
                "--prompt is asked when scoring (`score --model M --defect TEXT`); to check \
                 typed defects later, fit with --object NAME and CLIP weights"
                    .into(),
            )
            .into());
        }
        args.clip.object.clone()
    } else {
        None
    };
    let runtime = args.clip.runtime(args.device.device()?)?;
    let limits = FitOptions::default().limits;
    let normal = scan_image_folder(&args.train)
        .with_context(|| format!("reading training images in {}", args.train.display()))?;
    let normal = readable(normal, "training", &limits)?;
    let anomalies = match &args.anomalies {
        Some(dir) => readable(
            scan_image_folder(dir)
                .with_context(|| format!("reading anomalous images in {}", dir.display()))?,
            "anomalous",
            &limits,
        )?,
        None => Vec::new(),
    };
    let options = FitOptions {
        features,
        detector,
        max_far: args.max_far,
        anomalies,
        tile: args.tile.choice(),
        max_mar: args.max_mar,
        limits,
        partner,
    };
    let started = std::time::Instant::now();
    let fitted = match args.shots {
        Some(k) if options.detector.is_calibrated() => {
            Model::fit_shots(&normal, k, &options, &runtime, &Bars::new(false))
        }
        _ => Model::fit(&normal, &options, &runtime, &Bars::new(false)),
    };
    let mut model = fitted.map_err(setup_error).context("fitting the model")?;
    if let Some(object) = &text_layer {
        model
            .add_prompt_layer(
                &runtime,
                object,
                &normal,
                &options.limits,
                &Bars::new(false),
            )
            .map_err(setup_error)
            .context("adding the text layer")?;
        eprintln!(
            "text layer: CLIP embeddings of the normal images for \"{object}\"; ask about a \
             defect with `score --model {} --defect TEXT`",
            args.out.display()
        );
    }
    model
        .save(&args.out)
        .with_context(|| format!("saving the model to {}", args.out.display()))?;
    let summary = model.summary();
    let calibration = &model.info().calibration;
    let threshold = match calibration.method {
        ThresholdMethod::Probability | ThresholdMethod::BatchOutlier => {
            "threshold 0.5 (not calibrated: the score is a probability)".to_owned()
        }
        _ => format!(
            "threshold {:.4} (raw); estimated false-alarm rate {:.3} on {} normal images, \
             {} (95 % upper bound {:.3})",
            summary.raw_threshold,
            summary.estimated_false_alarm_rate,
            summary.calibration_images,
            summary
                .calibration_procedure
                .as_deref()
                .unwrap_or("held back"),
            summary.false_alarm_upper_bound_95
        ),
    };
    eprintln!(
        "fitted {} ({}) on {} images in {:.1} s{}{}; {threshold}; wrote {}",
        model.info().detector_label(),
        summary.backbone,
        summary.training_images,
        started.elapsed().as_secs_f64(),
        summary
            .memory_bank_size
            .map_or(String::new(), |n| format!(", memory bank {n}")),
        summary.tile_side.map_or(String::new(), |t| format!(
            ", in tiles of {t} px{}",
            if summary.whole_image_view {
                " with the whole image beside them"
            } else {
                ""
            }
        )),
        args.out.display()
    );
    if let ThresholdMethod::MissedAlarmTarget { max_mar } = calibration.method {
        eprintln!(
            "threshold chosen to miss at most {max_mar} of the synthetic defects; it costs an \
             estimated false-alarm rate of {:.3} (95 % upper bound {:.3})",
            summary.estimated_false_alarm_rate, summary.false_alarm_upper_bound_95
        );
    }
    if let Some(missed) = &model.info().missed_alarms {
        eprintln!(
            "estimated missed-alarm rate on synthetic defects (seed {:#x}): {}",
            missed.seed,
            missed.describe()
        );
    }
    if let Some(few) = &model.info().few_shot {
        eprintln!("{}", few.describe());
    }
    if let Some(decision) = &summary.tiling_decision {
        eprintln!("automatic tiling {}", decision.describe());
    }
    if let Some(choice) = &summary.detector_choice {
        eprintln!("automatic detector choice {}", choice.describe());
    }
    if let Some(warning) = &summary.calibration_warning {
        eprintln!("warning: {warning}");
    }
    Ok(Outcome::Success)
}

/// The images of `files` that decode; each one that does not is named in a
/// warning and left out, with a count at the end. An error only when none
/// is left (too few for the detector is the detector's error, said next).
/// Decoding every file once up front costs a fraction of fitting, and
/// one bad file no longer throws away the whole run.
fn readable(files: Vec<PathBuf>, kind: &str, limits: &ImageLimits) -> anyhow::Result<Vec<PathBuf>> {
    let all = files.len();
    let checked: Vec<(PathBuf, Option<String>)> = files
        .into_par_iter()
        .map(|path| {
            let problem = load_image(&path, limits).err().map(|e| e.to_string());
            (path, problem)
        })
        .collect();
    let mut kept = Vec::with_capacity(all);
    let mut skipped = 0usize;
    for (path, problem) in checked {
        match problem {
            None => kept.push(path),
            Some(problem) => {
                skipped += 1;
                eprintln!("warning: skipping a {kind} image: {problem}");
            }
        }
    }
    if skipped > 0 {
        eprintln!(
            "warning: {skipped} of {all} {kind} images could not be read and are left out; \
             fitting on the other {}",
            kept.len()
        );
    }
    if kept.is_empty() && all > 0 {
        anyhow::bail!("none of the {all} {kind} images could be read (see the warnings above)");
    }
    Ok(kept)
}
