//! WinCLIP (Jeong et al., CVPR 2023): anomaly scores from CLIP and text
//! prompts, with no training (zero-shot) or with a few normal images
//! (few-shot, "WinCLIP+").
//!
//! # Zero-shot
//!
//! Text side: the WinCLIP prompt ensemble for the object
//! ([`PromptSet::winclip`](flawscope_prompts::PromptSet::winclip)), with user defect descriptions as extra
//! anomalous states ([`PromptSet::with_defects`](flawscope_prompts::PromptSet::with_defects)), gives two unit class
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
//! Each file imports only from those listed before it:
//! [`checkpoint`] names the weights a model file was made with, [`config`]
//! holds the settings, constants and errors, [`scoring`] the formulas above
//! (on embeddings, with no model), [`engine`] loads CLIP, embeds images and
//! caches the text side, and [`detector`] is WinCLIP behind the common
//! [`Detector`](crate::detector::Detector) interface. This file only
//! re-exports.

pub mod checkpoint;
pub mod config;
pub mod detector;
pub mod engine;
pub mod scoring;
#[cfg(test)]
mod tests;

pub use checkpoint::ClipCheckpoint;
pub(crate) use config::checked_object;
pub use config::{
    DEFAULT_LOGIT_SCALE, DEFAULT_SCALES, DETECTOR_KIND, PatchFeatures, WinClipConfig, WinClipError,
    first_shots, prompt_set,
};
pub use detector::WinClipDetector;
pub use engine::{PRECISION_VAR, WinClip};
pub use scoring::{
    anomalous_probability, harmonic_mean, harmonic_window_aggregation, zero_shot_grid,
};
