//! WinCLIP (Jeong et al., CVPR 2023): anomaly scores from CLIP and text
//! prompts, with no training (zero-shot) or with a few normal images
//! (few-shot, "WinCLIP+").
//!
//! # Zero-shot
//!
//! Text side: the WinCLIP prompt ensemble for the object
//! ([`PromptSet::winclip`]), with user defect descriptions as extra
//! anomalous states ([`PromptSet::with_defects`]), gives two unit class
//! vectors `t_n` (normal) and `t_a` (anomalous): the normalised mean of the
//! sentence embeddings of each class. They are computed once per
//! (checkpoint, object, prompt set) through a [`TextEmbeddingCache`], so
//! repeated queries cost only the image pass.
//!
//! For a unit image-side embedding `e`, with `s = 1/0.07` (WinCLIP's
//! temperature as anomalib sets it, [`DEFAULT_LOGIT_SCALE`]; a model file
//! stores the `s` it was made with):
//!
//! ```text
//! p(e) = softmax(s·[cos(e, t_n), cos(e, t_a)])[anomalous] = σ(s·(cos(e, t_a) − cos(e, t_n)))
//! ```
//!
//! - image score `S0 = p(class embedding of the whole image)`;
//! - for each window scale `k ∈ {2, 3}`: every `k×k` window of the patch grid
//!   (stride 1) goes through the whole transformer alone with the class
//!   token ([`ClipModel::encode_windows`]), giving `p_w` per window, and each
//!   patch gets the harmonic mean of the windows covering it:
//!   `M_k(i) = n_i / Σ_{w ∋ i} 1/p_w`;
//! - zero-shot patch score: the harmonic mean of the image score and every
//!   scale, `Z(i) = (1 + K) / (1/S0 + Σ_k 1/M_k(i))` (`K` = number of scales).
//!
//! # Few-shot (WinCLIP+)
//!
//! The memory holds the unit patch tokens (post-layernorm, not projected:
//! [`ClipModel::encode_image_and_patch_tokens`]) of the `k` normal images
//! and, per scale, their unit window embeddings (projected). A test vector `v` against the memory `R` of
//! its level scores `a(v) = min_{r ∈ R} (1 − cos(v, r)) / 2`.
//!
//! - `F_0(i) = a(patch i)` against the patch memory;
//! - `F_k(i)` = harmonic mean, as above, of `a(w)` of the scale-`k` windows
//!   covering patch `i`, against the scale-`k` window memory;
//! - few-shot patch score `F(i) = (F_0(i) + Σ_k F_k(i)) / (1 + K)`;
//! - final patch score `A(i) = (Z(i) + F(i)) / 2` and image score
//!   `S = (S0 + max_i F(i)) / 2`.
//!
//! These are the formulas of anomalib's WinCLIP reproduction, and on the
//! same weights flawscope gives anomalib's numbers: scripts/make_winclip_reference.py
//! runs anomalib's own `WinClipModel` on the tiny test checkpoint, and
//! `core/tests/winclip_reference.rs` matches its scores and maps within 1e-4.
//! The one deliberate difference is the map blur below (switched off there).
//!
//! # Maps and verdicts
//!
//! The images are stretched to the square CLIP input (the whole image is
//! kept). The patch grid is upsampled bilinearly to the CLIP input size,
//! blurred with σ = 4 there ([`DEFAULT_BLUR_SIGMA`]), then resized to the
//! image's own size. Every value above is already in `[0, 1]`, with 0.5 the
//! natural decision point of the zero-shot probability, so nothing is
//! calibrated: the stored [`Calibration`] is [`Calibration::probability`],
//! the identity with the threshold at 0.5. For few-shot models the same 0.5
//! is used; it is *not* fitted on normal images.
//!
//! # Layout
//!
//! [`engine`] loads CLIP and caches the text side, [`scoring`] holds the
//! formulas above, [`detector`] is WinCLIP behind the common
//! [`Detector`](crate::detector::Detector) interface, [`checkpoint`] names
//! the weights a model file was made with.

pub mod checkpoint;
pub mod detector;
pub mod engine;
pub mod scoring;
#[cfg(test)]
mod tests;

use std::path::PathBuf;

use flawscope_prompts::{PromptSet, object_phrase};

use crate::Error;

pub use checkpoint::ClipCheckpoint;
pub use detector::{PatchFeatures, WinClipConfig, WinClipDetector};
pub use engine::{PRECISION_VAR, WinClip};
pub use scoring::{
    anomalous_probability, harmonic_mean, harmonic_window_aggregation, zero_shot_grid,
};

/// The `detector.kind` of a WinCLIP model file.
pub const DETECTOR_KIND: &str = "winclip";
/// Window sides, in patches, of the zero-shot and few-shot maps.
pub const DEFAULT_SCALES: [usize; 2] = [2, 3];
/// `s` of the two-class softmax: 1/0.07, the temperature anomalib's WinCLIP
/// uses (CLIP's initial one), whatever the checkpoint's own logit scale.
pub const DEFAULT_LOGIT_SCALE: f32 = 1.0 / 0.07;

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
