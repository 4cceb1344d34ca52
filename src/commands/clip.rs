//! The CLIP options (object, defect descriptions, weights) and loading a
//! model of any kind with them.

use std::path::{Path, PathBuf};

use anyhow::Context;
use flawscope_core::Device;
use flawscope_core::model::Model;
use flawscope_core::runtime::{
    ClipPreset, PRESETS, Runtime, WeightsLookup, default_text_cache_dir,
};

use super::UsageError;

/// What WinCLIP needs to know: the object, defect descriptions, and where
/// the CLIP weights are.
#[derive(Debug, Clone, Default, clap::Args)]
pub struct ClipArgs {
    /// WinCLIP: what is inspected, as the prompts name it ("metal nut");
    /// `eval` defaults to the category name.
    #[arg(long)]
    pub object: Option<String>,
    /// WinCLIP (zero-shot, or `fit --detector winclip`): a defect
    /// description added to WinCLIP's anomalous prompt ensemble ("scratch
    /// on the thread"); repeatable. With `score --model`, the older spelling
    /// of `--defect` (a typed defect checked by the model's text layer).
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

    /// Where models run: `device`, with the CLIP weights these options
    /// point at ([`runtime`]).
    pub fn runtime(&self, device: Device) -> Result<Runtime, UsageError> {
        runtime(self.clip_weights.clone(), &self.clip_model, device)
    }

    /// `--object` only applies when zero-shot scoring: a model file carries
    /// its own object (`--prompt` asks its text layer about a defect).
    pub fn refuse_object_for_model(&self, model: &Path) -> Result<(), UsageError> {
        if self.object.is_some() {
            return Err(UsageError(format!(
                "--object applies to --zero-shot; {} was fitted with its own, so it would be \
                 ignored",
                model.display()
            )));
        }
        Ok(())
    }

    /// Each `--prompt` must say something.
    pub fn check_prompts(&self) -> Result<(), UsageError> {
        check_typed_defects(&self.prompts)
    }

    pub fn object(&self, what: &str) -> Result<&str, UsageError> {
        self.object
            .as_deref()
            .ok_or_else(|| UsageError(format!("{what} needs --object NAME (what is inspected)")))
    }
}

/// Where models run: `device`, with CLIP weights from `clip_weights` (else
/// FLAWSCOPE_CLIP_WEIGHTS, else the Hugging Face cache) for the preset
/// `clip_model`, loaded only when a model needs them. The CLIP text side is
/// cached on disk ([`default_text_cache_dir`]), so a second run encodes no
/// sentence it has seen.
pub fn runtime(
    clip_weights: Option<PathBuf>,
    clip_model: &str,
    device: Device,
) -> Result<Runtime, UsageError> {
    let preset = ClipPreset::find(clip_model).ok_or_else(|| {
        let known: Vec<&str> = PRESETS.iter().map(|p| p.name).collect();
        UsageError(format!(
            "unknown --clip-model {clip_model:?}; known: {}",
            known.join(", ")
        ))
    })?;
    Ok(
        Runtime::with_clip(device, WeightsLookup::from_env(clip_weights), preset)
            .with_text_cache_dir(default_text_cache_dir()),
    )
}

/// Refuses a blank `--prompt` before any image is read.
pub fn check_typed_defects(prompts: &[String]) -> Result<(), UsageError> {
    if prompts.iter().any(|p| p.trim().is_empty()) {
        return Err(UsageError(
            "a defect description is empty (--prompt): type what the defect looks like (for \
             example \"scratch on the thread\")"
                .into(),
        ));
    }
    Ok(())
}

/// Missing or mismatched CLIP weights are a setup problem (exit code 2),
/// reported as one line; everything else is a failure.
pub fn setup_error(err: flawscope_core::Error) -> anyhow::Error {
    if err.is_setup_problem() {
        UsageError(err.to_string()).into()
    } else {
        anyhow::Error::new(err)
    }
}

/// `score --zero-shot`: a zero-shot model for `--object` and `--prompt`s.
pub fn zero_shot_model(clip: &ClipArgs, runtime: &Runtime) -> anyhow::Result<Model> {
    let object = clip.object("--zero-shot")?;
    Model::zero_shot(runtime, object, &clip.prompts).map_err(setup_error)
}

/// `score --model FILE`: a model file of any kind.
pub fn load_model(path: &Path, runtime: &Runtime) -> anyhow::Result<Model> {
    // A model file that is not there is missing setup (exit 2), as the
    // README's table of exit codes says, not a failure of the run.
    if !path.exists() {
        return Err(UsageError(format!(
            "model file {} not found (make one with `flawscope fit`)",
            path.display()
        ))
        .into());
    }
    Model::load(path, runtime)
        .map_err(setup_error)
        .with_context(|| format!("loading model {}", path.display()))
}
