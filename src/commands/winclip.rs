//! The CLIP options and the WinCLIP side of `score`, `fit` and `eval`.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::Context;
use flawscope_core::Device;
use flawscope_core::any_model::AnyModel;
use flawscope_core::dataset::{Category, scan_image_folder};
use flawscope_core::evaluation::CategoryReport;
use flawscope_core::images::ImageLimits;
use flawscope_core::progress::Progress;
use flawscope_core::winclip::{self, WinClip, WinClipError, WinClipModel};
use flawscope_models::ModelError;
use flawscope_models::clip_weights::{ClipPreset, PRESETS, WeightsLookup};

use super::{Outcome, UsageError};
use crate::progress::Bars;

/// What WinCLIP needs to know: the object, defect descriptions, and where
/// the CLIP weights are.
#[derive(Debug, Clone, clap::Args)]
pub struct ClipArgs {
    /// WinCLIP: what is inspected, as the prompts name it ("metal nut");
    /// `eval` defaults to the category name.
    #[arg(long)]
    pub object: Option<String>,
    /// WinCLIP: a defect description, added to the anomalous prompts
    /// ("scratch on the thread"); repeatable.
    #[arg(long = "prompt", value_name = "TEXT")]
    pub prompts: Vec<String>,
    /// CLIP checkpoint folder (config.json, tokenizer.json,
    /// model.safetensors); else FLAWSCOPE_CLIP_WEIGHTS, else the Hugging Face
    /// cache.
    #[arg(long, value_name = "DIR")]
    pub clip_weights: Option<PathBuf>,
    /// CLIP preset looked up in the Hugging Face cache (vit-b-16, vit-l-14,
    /// vit-l-14-336).
    #[arg(long, default_value = "vit-b-16")]
    pub clip_model: String,
}

impl ClipArgs {
    /// Where CLIP weights are looked for.
    pub fn lookup(&self) -> WeightsLookup {
        WeightsLookup::from_env(self.clip_weights.clone())
    }

    fn preset(&self) -> Result<ClipPreset, UsageError> {
        ClipPreset::find(&self.clip_model).ok_or_else(|| {
            let known: Vec<&str> = PRESETS.iter().map(|p| p.name).collect();
            UsageError(format!(
                "unknown --clip-model {:?}; known: {}",
                self.clip_model,
                known.join(", ")
            ))
        })
    }

    /// Resolves and loads the CLIP weights; missing weights exit with code 2.
    pub fn engine(&self, device: &Device) -> anyhow::Result<Arc<WinClip>> {
        let preset = self.preset()?;
        let engine = WinClip::resolve(&self.lookup(), &preset, device).map_err(setup_error)?;
        Ok(Arc::new(engine))
    }

    fn object(&self, what: &str) -> Result<&str, UsageError> {
        self.object
            .as_deref()
            .ok_or_else(|| UsageError(format!("{what} needs --object NAME (what is inspected)")))
    }
}

/// Missing or mismatched CLIP weights are a setup problem (exit code 2),
/// reported as one line; everything else is a failure.
pub fn setup_error(err: flawscope_core::Error) -> anyhow::Error {
    use flawscope_core::Error as E;
    match &err {
        E::Model(ModelError::NoClipWeights { .. } | ModelError::MissingFile { .. })
        | E::WinClip(WinClipError::CheckpointMismatch { .. } | WinClipError::EmptyObject) => {
            UsageError(err.to_string()).into()
        }
        _ => anyhow::Error::new(err),
    }
}

/// `score --zero-shot`: a zero-shot model for `--object` and `--prompt`s.
pub fn zero_shot_model(clip: &ClipArgs, device: &Device) -> anyhow::Result<AnyModel> {
    let object = clip.object("--zero-shot")?;
    let engine = clip.engine(device)?;
    let model = WinClipModel::zero_shot(engine, object, &clip.prompts).map_err(setup_error)?;
    Ok(AnyModel::WinClip(model))
}

/// `score --model FILE`: a model file of any kind.
pub fn load_model(path: &Path, clip: &ClipArgs, device: &Device) -> anyhow::Result<AnyModel> {
    AnyModel::load(path, device, &clip.lookup())
        .map_err(setup_error)
        .with_context(|| format!("loading model {}", path.display()))
}

/// `fit --detector winclip --shots K`: the first K images of `train` (by
/// path) make the memory; K = 0 writes a zero-shot model file.
pub fn fit(
    train: &Path,
    out: &Path,
    clip: &ClipArgs,
    shots: Option<usize>,
    device: &Device,
) -> anyhow::Result<Outcome> {
    let shots = shots.ok_or_else(|| {
        UsageError("--detector winclip needs --shots K (0 for a zero-shot model)".into())
    })?;
    let object = clip.object("--detector winclip")?;
    let normal = scan_image_folder(train)
        .with_context(|| format!("reading training images in {}", train.display()))?;
    let shot_paths = winclip::first_shots(&normal, shots)?;
    let engine = clip.engine(device)?;
    let started = std::time::Instant::now();
    let model = WinClipModel::fit(
        engine,
        object,
        &clip.prompts,
        &shot_paths,
        &ImageLimits::default(),
        &Bars::new(false),
    )
    .map_err(setup_error)
    .context("fitting WinCLIP")?;
    model
        .save(out)
        .with_context(|| format!("saving the model to {}", out.display()))?;
    let info = model.info();
    eprintln!(
        "fitted winclip ({} shots{}) for \"{}\" with CLIP {} from {} in {:.1} s; threshold 0.5 \
         (not calibrated); wrote {}",
        info.detector.shots,
        info.memory_bank_size
            .map_or(String::new(), |n| format!(", memory {n}")),
        info.object,
        info.clip.label(),
        info.clip.dir.display(),
        started.elapsed().as_secs_f64(),
        out.display()
    );
    Ok(Outcome::Success)
}

/// `eval --detector winclip`: one category, zero-shot when `shots` is 0 or absent.
pub fn evaluate(
    engine: &Arc<WinClip>,
    category: &Category,
    clip: &ClipArgs,
    shots: Option<usize>,
    progress: &dyn Progress,
) -> anyhow::Result<CategoryReport> {
    winclip::evaluate(
        engine,
        category,
        clip.object.as_deref(),
        &clip.prompts,
        shots.unwrap_or(0),
        &ImageLimits::default(),
        progress,
    )
    .map_err(setup_error)
}
