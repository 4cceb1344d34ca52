//! WinCLIP's settings and plain data: the configuration stored in model
//! files, its defaults and checks, and WinCLIP's errors. Below the engine,
//! the formulas and the detector, which all read it.

use std::path::PathBuf;

use flawscope_prompts::{PromptSet, object_phrase};
use serde::{Deserialize, Serialize};

use super::checkpoint::ClipCheckpoint;
use crate::Error;
use crate::anomaly_map::DEFAULT_BLUR_SIGMA;

/// The `detector.kind` of a WinCLIP model file.
pub const DETECTOR_KIND: &str = "winclip";
/// Window sides, in patches, of the zero-shot and few-shot maps.
pub const DEFAULT_SCALES: [usize; 2] = [2, 3];
/// `s` of the two-class softmax: 1/0.07, the temperature anomalib's WinCLIP
/// uses (CLIP's initial one), whatever the checkpoint's own logit scale.
pub const DEFAULT_LOGIT_SCALE: f32 = 1.0 / 0.07;

/// WinCLIP settings, stored in the model file as its `detector`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct WinClipConfig {
    /// Normal images in the few-shot memory (0: zero-shot).
    pub shots: usize,
    /// Window sides in patches.
    pub scales: Vec<usize>,
    /// `s` of the softmax over the two classes; `None` until fitted (then
    /// [`DEFAULT_LOGIT_SCALE`]).
    pub logit_scale: Option<f32>,
    /// Blur of the map at the CLIP input size.
    pub blur_sigma: f32,
    /// The object as the prompts name it ("metal nut").
    #[serde(default)]
    pub object: String,
    /// User defect descriptions (extra anomalous states).
    #[serde(default)]
    pub prompts: Vec<String>,
    /// The checkpoint fitted with; `None` until fitted.
    #[serde(default)]
    pub clip: Option<ClipCheckpoint>,
    /// File names of the few-shot images, in memory order.
    #[serde(default)]
    pub shot_images: Vec<String>,
    /// The space of the few-shot patch memory. Files written before this
    /// field existed hold projected patches, hence the serde default.
    #[serde(default = "PatchFeatures::projected")]
    pub patch_features: PatchFeatures,
}

/// Which patch features the few-shot memory compares.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum PatchFeatures {
    /// Post-layernorm tokens, not projected (open_clip's `output_tokens`,
    /// as anomalib's WinCLIP compares them): the default.
    Tokens,
    /// Tokens projected into the joint space (flawscope before 2026-12).
    Projected,
}

impl PatchFeatures {
    fn projected() -> Self {
        Self::Projected
    }
}

impl Default for WinClipConfig {
    fn default() -> Self {
        Self {
            shots: 0,
            scales: DEFAULT_SCALES.to_vec(),
            logit_scale: None,
            blur_sigma: DEFAULT_BLUR_SIGMA,
            object: String::new(),
            prompts: Vec::new(),
            clip: None,
            shot_images: Vec::new(),
            patch_features: PatchFeatures::Tokens,
        }
    }
}

impl WinClipConfig {
    /// Zero-shot settings for `object` and defect descriptions `prompts`.
    pub fn zero_shot(object: &str, prompts: &[String]) -> Self {
        Self {
            object: object.to_owned(),
            prompts: prompts.to_vec(),
            ..Self::default()
        }
    }

    /// What is wrong with these settings, if anything.
    pub(crate) fn check(&self) -> Result<(), String> {
        if let Some(s) = self.logit_scale
            && !(s.is_finite() && s > 0.0)
        {
            return Err(format!("logit scale {s} is not positive"));
        }
        if !(self.blur_sigma.is_finite() && self.blur_sigma >= 0.0) {
            return Err(format!("blur sigma {} is invalid", self.blur_sigma));
        }
        if self.scales.is_empty() {
            return Err("no window scale".into());
        }
        Ok(())
    }
}

/// What can go wrong specifically in WinCLIP.
#[derive(Debug, thiserror::Error)]
pub enum WinClipError {
    #[error("the object name is empty: say what is inspected (for example --object \"metal nut\")")]
    EmptyObject,
    #[error(
        "{} was made with CLIP weights whose config.json has SHA-256 {expected}, but the weights \
         found at {} have {found}; pass --clip-weights DIR with the checkpoint used when fitting",
        model.display(),
        found_dir.display()
    )]
    CheckpointMismatch {
        model: PathBuf,
        expected: String,
        found_dir: PathBuf,
        found: String,
    },
    #[error("{}: not a usable WinCLIP model: {reason}", path.display())]
    BadModelFile { path: PathBuf, reason: String },
    #[error("{shots} shots asked for, but only {found} normal images are available")]
    NotEnoughShots { shots: usize, found: usize },
    #[error("WinCLIP produced non-finite scores (broken CLIP weights?)")]
    NonFinite,
    #[error("invalid WinCLIP settings: {0}")]
    Config(String),
}

/// The WinCLIP ensemble plus user defect descriptions.
pub fn prompt_set(prompts: &[String]) -> Result<PromptSet, Error> {
    Ok(PromptSet::winclip().with_defects(prompts)?)
}

pub(crate) fn checked_object(object: &str) -> Result<String, WinClipError> {
    let phrase = object_phrase(object);
    if phrase.is_empty() {
        Err(WinClipError::EmptyObject)
    } else {
        Ok(phrase)
    }
}

/// The first `shots` images of `paths` in a stable order (sorted by path).
pub fn first_shots(paths: &[PathBuf], shots: usize) -> Result<Vec<PathBuf>, WinClipError> {
    if paths.len() < shots {
        return Err(WinClipError::NotEnoughShots {
            shots,
            found: paths.len(),
        });
    }
    let mut sorted = paths.to_vec();
    sorted.sort();
    sorted.truncate(shots);
    Ok(sorted)
}

/// Every window scale fits a `rows × cols` patch grid.
pub(crate) fn check_scales(scales: &[usize], rows: usize, cols: usize) -> Result<(), WinClipError> {
    if scales.is_empty() {
        return Err(WinClipError::Config("no window scale".into()));
    }
    if let Some(k) = scales.iter().find(|&&k| k == 0 || k > rows || k > cols) {
        return Err(WinClipError::Config(format!(
            "window scale {k} does not fit the {rows}x{cols} patch grid"
        )));
    }
    Ok(())
}
