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
//! unit sentence embeddings of each class. They are computed once per
//! (checkpoint, object, prompt set) through a [`TextEmbeddingCache`], so
//! repeated queries cost only the image pass.
//!
//! For a unit image-side embedding `e`, with `s` the checkpoint's logit scale
//! (`exp(logit_scale)`, 100 for OpenAI CLIP; 100 when the checkpoint has
//! none):
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
//! The memory holds the unit patch embeddings (post-layernorm, projected:
//! [`ClipModel::encode_patches`]) of the `k` normal images and, per scale,
//! their unit window embeddings. A test vector `v` against the memory `R` of
//! its level scores `a(v) = min_{r ∈ R} (1 − cos(v, r)) / 2`.
//!
//! - `F_0(i) = a(patch i)` against the patch memory;
//! - `F_k(i)` = harmonic mean, as above, of `a(w)` of the scale-`k` windows
//!   covering patch `i`, against the scale-`k` window memory;
//! - few-shot patch score `F(i) = (F_0(i) + Σ_k F_k(i)) / (1 + K)`;
//! - final patch score `A(i) = (Z(i) + F(i)) / 2` and image score
//!   `S = (S0 + max_i F(i)) / 2`.
//!
//! (These are the formulas of anomalib's WinCLIP reproduction.)
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

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Instant;

use candle_core::{D, Device, Tensor};
use flawscope_models::ModelError;
use flawscope_models::clip::{ClipModel, ClipPreprocessor, ResizeMode, sliding_windows};
use flawscope_models::clip_weights::{
    ClipPreset, WeightsLookup, WeightsSource, check_checkpoint_dir,
};
use flawscope_prompts::{
    ClassVectors, ClipTokenizer, PromptSet, SentenceEncoder, TextEmbeddingCache, object_phrase,
};
use image::{DynamicImage, Rgb32FImage};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::Error;
use crate::anomaly_map::{AnomalyMap, DEFAULT_BLUR_SIGMA};
use crate::calibration::{Calibration, DECISION_THRESHOLD};
use crate::dataset::Category;
use crate::evaluation::{CategoryReport, FitSummary, score_test_set};
use crate::images::{ImageLimits, load_image};
use crate::inspector::Inspection;
use crate::model_file::{self, take};
use crate::progress::Progress;

/// The `detector.kind` of a WinCLIP model file.
pub const DETECTOR_KIND: &str = "winclip";
/// Window sides, in patches, of the zero-shot and few-shot maps.
pub const DEFAULT_SCALES: [usize; 2] = [2, 3];
/// Logit scale used when a checkpoint has none (OpenAI CLIP's value).
pub const FALLBACK_LOGIT_SCALE: f32 = 100.0;

const TEXT_TENSOR: &str = "winclip.text";
const PATCH_MEMORY: &str = "winclip.memory.patches";
const WINDOW_MEMORY: &str = "winclip.memory.windows";

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

/// Which CLIP checkpoint a WinCLIP model was made with.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClipCheckpoint {
    /// Preset the weights were resolved for (`ViT-B/16`).
    pub preset: String,
    /// Hub repository and pinned commit of the preset, when it is a known one.
    pub repo: Option<String>,
    /// Folder the weights were loaded from.
    pub dir: PathBuf,
    /// How that folder was found: `flag`, `env`, `hub-cache`, `download` or `model-file`.
    pub source: String,
    /// SHA-256 of the folder's `config.json`.
    pub config_sha256: String,
}

impl ClipCheckpoint {
    /// A short name for reports: the preset, plus the folder name when the
    /// weights came from a folder given by hand (`ViT-B/16@tiny_clip`).
    pub fn label(&self) -> String {
        match self.source.as_str() {
            "hub-cache" | "download" => self.preset.clone(),
            _ => match self.dir.file_name() {
                Some(name) => format!("{}@{}", self.preset, name.to_string_lossy()),
                None => self.preset.clone(),
            },
        }
    }

    /// Key of these weights in a [`TextEmbeddingCache`].
    pub fn cache_id(&self) -> String {
        format!(
            "{}|{}|{}",
            self.repo.as_deref().unwrap_or(&self.preset),
            self.dir.display(),
            self.config_sha256
        )
    }
}

fn source_name(source: WeightsSource) -> &'static str {
    match source {
        WeightsSource::Flag => "flag",
        WeightsSource::Env => "env",
        WeightsSource::HubCache => "hub-cache",
        WeightsSource::Download => "download",
    }
}

fn file_sha256(path: &Path) -> Result<String, Error> {
    let bytes = std::fs::read(path).map_err(|source| ModelError::Io {
        path: path.to_owned(),
        source,
    })?;
    Ok(format!("{:x}", Sha256::digest(&bytes)))
}

/// The WinCLIP engine: a CLIP model, its tokenizer and a cache of class
/// vectors. Shared (behind an [`Arc`]) by every model that uses the same
/// checkpoint; safe to call from several threads.
pub struct WinClip {
    clip: ClipModel,
    tokenizer: ClipTokenizer,
    checkpoint: ClipCheckpoint,
    text_cache: Mutex<TextEmbeddingCache>,
}

impl std::fmt::Debug for WinClip {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WinClip")
            .field("checkpoint", &self.checkpoint)
            .finish_non_exhaustive()
    }
}

impl WinClip {
    /// Finds the weights of `preset` (see [`WeightsLookup::resolve`] for the
    /// order) and loads them onto `device`.
    pub fn resolve(
        lookup: &WeightsLookup,
        preset: &ClipPreset,
        device: &Device,
    ) -> Result<Self, Error> {
        let found = lookup.resolve(preset)?;
        Self::from_dir(
            &found.dir,
            preset.name,
            Some(preset.model_id()),
            source_name(found.source),
            device,
        )
    }

    /// Loads the checkpoint folder `dir` (`config.json`, `tokenizer.json`,
    /// weights); `preset`, `repo` and `source` only label it.
    pub fn from_dir(
        dir: &Path,
        preset: &str,
        repo: Option<String>,
        source: &str,
        device: &Device,
    ) -> Result<Self, Error> {
        check_checkpoint_dir(dir)?;
        // Absolute, so that a model file made here finds it from anywhere.
        let dir = &dir.canonicalize().unwrap_or_else(|_| dir.to_owned());
        let config_sha256 = file_sha256(&dir.join("config.json"))?;
        let clip = ClipModel::load(dir, device)?;
        let tokenizer = ClipTokenizer::from_dir(dir)?;
        Ok(Self {
            clip,
            tokenizer,
            checkpoint: ClipCheckpoint {
                preset: preset.to_owned(),
                repo,
                dir: dir.to_owned(),
                source: source.to_owned(),
                config_sha256,
            },
            text_cache: Mutex::new(TextEmbeddingCache::in_memory()),
        })
    }

    /// The engine a model file needs. Lookup order: `--clip-weights` /
    /// `FLAWSCOPE_CLIP_WEIGHTS` when set; else the folder the model was made
    /// with, if it still holds the same `config.json`; else the hub cache
    /// (or a download) of the stored preset. The weights found must have the
    /// stored `config.json` hash.
    pub fn for_checkpoint(
        stored: &ClipCheckpoint,
        lookup: &WeightsLookup,
        device: &Device,
        model_path: &Path,
    ) -> Result<Self, Error> {
        let preset = ClipPreset::find(&stored.preset);
        let explicit = lookup.flag_dir.is_some() || lookup.env_dir.is_some();
        let same_folder = !explicit
            && check_checkpoint_dir(&stored.dir).is_ok()
            && file_sha256(&stored.dir.join("config.json"))
                .is_ok_and(|sha| sha == stored.config_sha256);
        let engine = if same_folder {
            Self::from_dir(
                &stored.dir,
                &stored.preset,
                stored.repo.clone(),
                "model-file",
                device,
            )?
        } else {
            let preset = preset.ok_or_else(|| ModelError::NoClipWeights {
                model: stored.preset.clone(),
                searched: format!("{} (gone or changed)", stored.dir.display()),
                reason: "the preset is not a known one, so it cannot be looked up".into(),
            })?;
            Self::resolve(lookup, &preset, device)?
        };
        if engine.checkpoint.config_sha256 != stored.config_sha256 {
            return Err(WinClipError::CheckpointMismatch {
                model: model_path.to_owned(),
                expected: stored.config_sha256.clone(),
                found_dir: engine.checkpoint.dir.clone(),
                found: engine.checkpoint.config_sha256.clone(),
            }
            .into());
        }
        Ok(engine)
    }

    /// Replaces the in-memory class-vector cache (for example with a
    /// file-backed one, [`TextEmbeddingCache::with_file`]).
    pub fn with_text_cache(mut self, cache: TextEmbeddingCache) -> Self {
        self.text_cache = Mutex::new(cache);
        self
    }

    /// The checkpoint's identity.
    pub fn checkpoint(&self) -> &ClipCheckpoint {
        &self.checkpoint
    }

    /// The CLIP model.
    pub fn clip(&self) -> &ClipModel {
        &self.clip
    }

    /// Side of the square CLIP input (224 for ViT-B/16).
    pub fn input_size(&self) -> usize {
        self.clip.config().vision.image_size
    }

    /// Patch grid `(rows, cols)` at the CLIP input size.
    pub fn grid(&self) -> (usize, usize) {
        let s = self.input_size();
        self.clip.grid(s, s)
    }

    /// The checkpoint's `exp(logit_scale)`, or [`FALLBACK_LOGIT_SCALE`].
    pub fn logit_scale(&self) -> f32 {
        self.clip
            .logit_scale()
            .filter(|s| s.is_finite() && *s > 0.0)
            .unwrap_or(FALLBACK_LOGIT_SCALE)
    }

    /// Default settings for `shots` normal images.
    pub fn default_config(&self, shots: usize) -> WinClipConfig {
        WinClipConfig {
            kind: DETECTOR_KIND.into(),
            shots,
            scales: DEFAULT_SCALES.to_vec(),
            logit_scale: self.logit_scale(),
            blur_sigma: DEFAULT_BLUR_SIGMA,
        }
    }

    /// The (normal, anomalous) class vectors of `object` under `prompts`,
    /// from the cache or computed (and cached) on a miss.
    pub fn class_vectors(
        &self,
        object: &str,
        prompts: &PromptSet,
    ) -> Result<Arc<ClassVectors>, Error> {
        let encoder = TextEncoder {
            clip: &self.clip,
            tokenizer: &self.tokenizer,
            id: self.checkpoint.cache_id(),
        };
        let mut cache = self
            .text_cache
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        cache.class_vectors(&encoder, object, prompts)
    }

    /// The class vectors as a `[2, embed_dim]` tensor (normal, anomalous).
    fn text_tensor(&self, vectors: &ClassVectors) -> Result<Tensor, Error> {
        let dim = self.clip.embed_dim();
        if vectors.normal.len() != dim || vectors.anomalous.len() != dim {
            return Err(WinClipError::Config(format!(
                "class vectors have {} and {} values, the checkpoint embeds in {dim}",
                vectors.normal.len(),
                vectors.anomalous.len()
            ))
            .into());
        }
        let data = [vectors.normal.as_slice(), vectors.anomalous.as_slice()].concat();
        Ok(Tensor::from_vec(data, (2, dim), self.clip.device())?)
    }

    /// Zero-shot scoring of one image as `object`, with extra defect
    /// descriptions `prompts`; the text side is cached across calls.
    pub fn zero_shot(
        &self,
        image: &Rgb32FImage,
        object: &str,
        prompts: &[String],
    ) -> Result<Inspection, Error> {
        let object = checked_object(object)?;
        let vectors = self.class_vectors(&object, &prompt_set(prompts)?)?;
        let text = self.text_tensor(&vectors)?;
        self.inspect_with(&self.default_config(0), &text, None, image)
    }

    fn pixels(&self, image: &Rgb32FImage) -> Result<Tensor, Error> {
        let pre = ClipPreprocessor::new(self.input_size()).with_mode(ResizeMode::Stretch);
        let dynamic = DynamicImage::ImageRgb32F(image.clone());
        Ok(pre.tensor(std::slice::from_ref(&dynamic), self.clip.device())?)
    }

    /// Unit embeddings of one image: class token, optionally every patch,
    /// and every window of each scale.
    fn embed(
        &self,
        image: &Rgb32FImage,
        scales: &[usize],
        with_patches: bool,
    ) -> Result<Embedded, Error> {
        let (rows, cols) = self.grid();
        check_scales(scales, rows, cols)?;
        let pixels = self.pixels(image)?;
        let (class, patches) = if with_patches {
            let (class, patches) = self.clip.encode_image_and_patches(&pixels)?;
            (class, Some(unit_rows(&patches.squeeze(0)?)?))
        } else {
            (self.clip.encode_image(&pixels)?, None)
        };
        let per_scale: Vec<Vec<Vec<usize>>> = scales
            .iter()
            .map(|&k| sliding_windows(rows, cols, k, 1))
            .collect();
        let all: Vec<Vec<usize>> = per_scale.iter().flatten().cloned().collect();
        let embedded = unit_rows(&self.clip.encode_windows(&pixels, &all)?)?;
        let mut windows = Vec::with_capacity(per_scale.len());
        let mut start = 0;
        for list in per_scale {
            let n = list.len();
            windows.push((list, embedded.narrow(0, start, n)?));
            start += n;
        }
        Ok(Embedded {
            class: unit_rows(&class)?,
            patches,
            windows,
            patches_count: rows * cols,
            rows,
            cols,
        })
    }

    /// Scores one image: raw image score and patch grid, then the map.
    fn inspect_with(
        &self,
        config: &WinClipConfig,
        text: &Tensor,
        memory: Option<&Memory>,
        image: &Rgb32FImage,
    ) -> Result<Inspection, Error> {
        let e = self.embed(image, &config.scales, memory.is_some())?;
        let scale = config.logit_scale;
        let image_score = *probabilities(&e.class, text, scale)?
            .first()
            .ok_or(WinClipError::NonFinite)?;
        let mut zero_shot_scales = Vec::with_capacity(e.windows.len());
        for (list, emb) in &e.windows {
            let p = probabilities(emb, text, scale)?;
            zero_shot_scales.push(harmonic_window_aggregation(&p, list, e.patches_count)?);
        }
        let zero_shot = zero_shot_grid(image_score, &zero_shot_scales)?;
        let (raw, grid) = match (memory, &e.patches) {
            (Some(memory), Some(patches)) => {
                let mut levels = vec![memory_scores(patches, &memory.patches)?];
                for ((list, emb), bank) in e.windows.iter().zip(&memory.windows) {
                    let a = memory_scores(emb, bank)?;
                    levels.push(harmonic_window_aggregation(&a, list, e.patches_count)?);
                }
                let few_shot = mean_grid(&levels)?;
                let peak = few_shot.iter().copied().fold(0.0f64, f64::max);
                let grid: Vec<f64> = zero_shot
                    .iter()
                    .zip(&few_shot)
                    .map(|(z, f)| 0.5 * (z + f))
                    .collect();
                (0.5 * (image_score + peak), grid)
            }
            _ => (image_score, zero_shot),
        };
        if !raw.is_finite() || grid.iter().any(|v| !v.is_finite()) {
            return Err(WinClipError::NonFinite.into());
        }
        let coarse = AnomalyMap::new(e.cols, e.rows, grid.iter().map(|&v| v as f32).collect())
            .ok_or_else(|| WinClipError::Config("patch scores do not fill the grid".into()))?;
        let s = self.input_size();
        let at_input = AnomalyMap::from_grid(&coarse, s, s, config.blur_sigma);
        let (w, h) = (image.width() as usize, image.height() as usize);
        let map = if (w, h) == (s, s) {
            at_input
        } else {
            at_input.resized_bilinear(w, h)
        };
        Ok(inspection(raw as f32, map))
    }
}

/// Unit embeddings of one image.
struct Embedded {
    /// `[1, D]`.
    class: Tensor,
    /// `[rows*cols, D]`, when asked for.
    patches: Option<Tensor>,
    /// Per scale: its windows and their `[windows, D]` embeddings.
    windows: Vec<(Vec<Vec<usize>>, Tensor)>,
    patches_count: usize,
    rows: usize,
    cols: usize,
}

/// The few-shot memory, unit rows.
struct Memory {
    /// `[k·rows·cols, D]`.
    patches: Tensor,
    /// Per scale of the config, `[k·windows, D]`.
    windows: Vec<Tensor>,
}

impl Memory {
    fn rows(&self) -> Result<usize, Error> {
        let mut n = self.patches.dim(0)?;
        for w in &self.windows {
            n += w.dim(0)?;
        }
        Ok(n)
    }
}

struct TextEncoder<'a> {
    clip: &'a ClipModel,
    tokenizer: &'a ClipTokenizer,
    id: String,
}

impl SentenceEncoder for TextEncoder<'_> {
    type Error = Error;

    fn model_id(&self) -> String {
        self.id.clone()
    }

    fn encode_sentences(&self, sentences: &[String]) -> Result<Vec<Vec<f32>>, Error> {
        let batch = self.tokenizer.encode_batch(sentences)?;
        let ids = Tensor::from_vec(batch.ids, (batch.rows, batch.len), self.clip.device())?;
        let embedded = self.clip.encode_text(&ids)?;
        Ok(embedded.to_device(&Device::Cpu)?.to_vec2::<f32>()?)
    }
}

/// The WinCLIP ensemble plus user defect descriptions.
pub fn prompt_set(prompts: &[String]) -> Result<PromptSet, Error> {
    Ok(PromptSet::winclip().with_defects(prompts)?)
}

fn checked_object(object: &str) -> Result<String, WinClipError> {
    let phrase = object_phrase(object);
    if phrase.is_empty() {
        Err(WinClipError::EmptyObject)
    } else {
        Ok(phrase)
    }
}

fn check_scales(scales: &[usize], rows: usize, cols: usize) -> Result<(), WinClipError> {
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

/// Rows scaled to unit length.
fn unit_rows(t: &Tensor) -> Result<Tensor, Error> {
    let norm = t.sqr()?.sum_keepdim(D::Minus1)?.sqrt()?.maximum(1e-12f32)?;
    Ok(t.broadcast_div(&norm)?)
}

/// Anomalous probability of each unit row of `emb` against unit text rows
/// (normal, anomalous): `σ(s·(cos_a − cos_n))`, in `f64` so that it never
/// rounds to exactly 0 or 1 for `s ≤ 100`.
fn probabilities(emb: &Tensor, text: &Tensor, scale: f32) -> Result<Vec<f64>, Error> {
    let cos = emb
        .matmul(&text.t()?)?
        .to_device(&Device::Cpu)?
        .to_vec2::<f32>()?;
    let s = f64::from(scale);
    cos.iter()
        .map(|row| match row.as_slice() {
            [n, a] => Ok(anomalous_probability(f64::from(*n), f64::from(*a), s)),
            _ => Err(WinClipError::Config("text side is not two class vectors".into()).into()),
        })
        .collect()
}

/// `softmax(s·[cos_n, cos_a])[1]`.
pub fn anomalous_probability(cos_normal: f64, cos_anomalous: f64, scale: f64) -> f64 {
    1.0 / (1.0 + (-scale * (cos_anomalous - cos_normal)).exp())
}

/// `min_r (1 − cos(v, r)) / 2` of each unit row `v` of `emb` against the
/// unit rows of `memory`.
fn memory_scores(emb: &Tensor, memory: &Tensor) -> Result<Vec<f64>, Error> {
    let best = emb
        .matmul(&memory.t()?)?
        .max(D::Minus1)?
        .to_device(&Device::Cpu)?
        .to_vec1::<f32>()?;
    Ok(best
        .iter()
        .map(|&c| ((1.0 - f64::from(c)) / 2.0).clamp(0.0, 1.0))
        .collect())
}

/// Harmonic mean `n / Σ 1/x` of positive scores. A score at or below 0
/// makes it 0 (the limit); no value gives NaN.
pub fn harmonic_mean(values: &[f64]) -> f64 {
    if values.is_empty() {
        return f64::NAN;
    }
    if values.iter().any(|&v| v <= 0.0) {
        return 0.0;
    }
    values.len() as f64 / values.iter().map(|v| 1.0 / v).sum::<f64>()
}

/// Each patch's score = harmonic mean of the scores of the windows covering
/// it. `windows[j]` lists the (row-major) patches of window `j`, scored
/// `window_scores[j]`. Every patch of `0..patches` must be covered.
pub fn harmonic_window_aggregation(
    window_scores: &[f64],
    windows: &[Vec<usize>],
    patches: usize,
) -> Result<Vec<f64>, WinClipError> {
    if window_scores.len() != windows.len() {
        return Err(WinClipError::Config(format!(
            "{} window scores for {} windows",
            window_scores.len(),
            windows.len()
        )));
    }
    let mut covering: Vec<Vec<f64>> = vec![Vec::new(); patches];
    for (window, &score) in windows.iter().zip(window_scores) {
        if !score.is_finite() {
            return Err(WinClipError::NonFinite);
        }
        for &p in window {
            covering
                .get_mut(p)
                .ok_or_else(|| {
                    WinClipError::Config(format!("window patch {p} is outside the grid"))
                })?
                .push(score);
        }
    }
    covering
        .iter()
        .enumerate()
        .map(|(i, scores)| {
            if scores.is_empty() {
                Err(WinClipError::Config(format!(
                    "patch {i} is covered by no window"
                )))
            } else {
                Ok(harmonic_mean(scores))
            }
        })
        .collect()
}

/// Zero-shot patch scores: per patch, the harmonic mean of the image score
/// and of each scale's patch score, `(1 + K) / (1/S0 + Σ_k 1/M_k(i))`.
pub fn zero_shot_grid(image_score: f64, scales: &[Vec<f64>]) -> Result<Vec<f64>, WinClipError> {
    let n = scales.first().map_or(0, Vec::len);
    if scales.iter().any(|s| s.len() != n) {
        return Err(WinClipError::Config(
            "scales of different grid sizes".into(),
        ));
    }
    Ok((0..n)
        .map(|i| {
            let mut values = Vec::with_capacity(scales.len() + 1);
            values.push(image_score);
            values.extend(scales.iter().map(|s| s[i]));
            harmonic_mean(&values)
        })
        .collect())
}

/// Per-patch arithmetic mean of equally sized grids.
fn mean_grid(levels: &[Vec<f64>]) -> Result<Vec<f64>, WinClipError> {
    let n = levels.first().map_or(0, Vec::len);
    if levels.is_empty() || levels.iter().any(|l| l.len() != n) {
        return Err(WinClipError::Config(
            "few-shot levels of different sizes".into(),
        ));
    }
    let k = levels.len() as f64;
    Ok((0..n)
        .map(|i| levels.iter().map(|l| l[i]).sum::<f64>() / k)
        .collect())
}

/// The verdict from a raw 0–1 score and map, through the identity calibration.
fn inspection(raw: f32, map: AnomalyMap) -> Inspection {
    let calibration = Calibration::probability();
    let map = AnomalyMap {
        width: map.width,
        height: map.height,
        values: map
            .values
            .iter()
            .map(|&v| calibration.normalise(v))
            .collect(),
    };
    Inspection {
        score: calibration.normalise(raw),
        raw_score: raw,
        is_anomalous: calibration.is_anomalous(raw),
        threshold: DECISION_THRESHOLD,
        map,
    }
}

/// WinCLIP settings, stored in the model file as its `detector`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct WinClipConfig {
    /// Always [`DETECTOR_KIND`]; tells WinCLIP files from the others.
    pub kind: String,
    /// Normal images in the few-shot memory (0: zero-shot).
    pub shots: usize,
    /// Window sides in patches.
    pub scales: Vec<usize>,
    /// `s` of the softmax over the two classes.
    pub logit_scale: f32,
    /// Blur of the map at the CLIP input size.
    pub blur_sigma: f32,
}

impl WinClipConfig {
    fn check(&self) -> Result<(), String> {
        if self.kind != DETECTOR_KIND {
            return Err(format!("detector kind {:?} is not winclip", self.kind));
        }
        if !(self.logit_scale.is_finite() && self.logit_scale > 0.0) {
            return Err(format!("logit scale {} is not positive", self.logit_scale));
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

/// The JSON metadata of a WinCLIP model file.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct WinClipInfo {
    pub detector: WinClipConfig,
    /// The object as the prompts name it ("metal nut").
    pub object: String,
    /// User defect descriptions (extra anomalous states).
    pub prompts: Vec<String>,
    pub clip: ClipCheckpoint,
    /// The identity with threshold 0.5 ([`Calibration::probability`]).
    pub calibration: Calibration,
    /// File names of the few-shot images, in memory order.
    pub shot_images: Vec<String>,
    /// Rows of the few-shot memory (patches and windows), if any.
    pub memory_bank_size: Option<usize>,
    /// The flawscope version that wrote the file.
    pub written_by: String,
}

/// A WinCLIP model: object, prompts, class vectors and (few-shot) the
/// memory of normal images, over a shared [`WinClip`] engine.
pub struct WinClipModel {
    engine: Arc<WinClip>,
    info: WinClipInfo,
    text: Tensor,
    memory: Option<Memory>,
}

impl std::fmt::Debug for WinClipModel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WinClipModel")
            .field("info", &self.info)
            .finish_non_exhaustive()
    }
}

impl WinClipModel {
    /// A zero-shot model of `object` with extra defect descriptions.
    pub fn zero_shot(
        engine: Arc<WinClip>,
        object: &str,
        prompts: &[String],
    ) -> Result<Self, Error> {
        let object = checked_object(object)?;
        let vectors = engine.class_vectors(&object, &prompt_set(prompts)?)?;
        let text = engine.text_tensor(&vectors)?;
        let info = WinClipInfo {
            detector: engine.default_config(0),
            object,
            prompts: prompts.to_vec(),
            clip: engine.checkpoint.clone(),
            calibration: Calibration::probability(),
            shot_images: Vec::new(),
            memory_bank_size: None,
            written_by: format!("flawscope {}", env!("CARGO_PKG_VERSION")),
        };
        Ok(Self {
            engine,
            info,
            text,
            memory: None,
        })
    }

    /// A few-shot model: `shots` (normal images, in this order) make the
    /// memory. No shot gives the zero-shot model.
    pub fn fit(
        engine: Arc<WinClip>,
        object: &str,
        prompts: &[String],
        shots: &[PathBuf],
        limits: &ImageLimits,
        progress: &dyn Progress,
    ) -> Result<Self, Error> {
        let mut model = Self::zero_shot(engine, object, prompts)?;
        if shots.is_empty() {
            return Ok(model);
        }
        let scales = model.info.detector.scales.clone();
        let mut patches = Vec::with_capacity(shots.len());
        let mut windows: Vec<Vec<Tensor>> = vec![Vec::with_capacity(shots.len()); scales.len()];
        progress.start("few-shot memory", shots.len() as u64);
        for path in shots {
            let image = load_image(path, limits)?;
            let e = model.engine.embed(&image, &scales, true)?;
            let p = e
                .patches
                .ok_or_else(|| WinClipError::Config("no patch embeddings".into()))?;
            patches.push(p);
            for (bank, (_, emb)) in windows.iter_mut().zip(e.windows) {
                bank.push(emb);
            }
            progress.advance(1);
        }
        progress.finish();
        let memory = Memory {
            patches: Tensor::cat(&patches, 0)?,
            windows: windows
                .iter()
                .map(|w| Tensor::cat(w, 0))
                .collect::<Result<_, _>>()?,
        };
        model.info.detector.shots = shots.len();
        model.info.shot_images = shots
            .iter()
            .map(|p| {
                p.file_name()
                    .unwrap_or(p.as_os_str())
                    .to_string_lossy()
                    .into_owned()
            })
            .collect();
        model.info.memory_bank_size = Some(memory.rows()?);
        model.memory = Some(memory);
        Ok(model)
    }

    /// The metadata.
    pub fn info(&self) -> &WinClipInfo {
        &self.info
    }

    /// The engine.
    pub fn engine(&self) -> &Arc<WinClip> {
        &self.engine
    }

    /// A short stable id of what this model computes (checkpoint, object,
    /// prompts, memory size), for result stores.
    pub fn identity(&self) -> String {
        let mut hash = Sha256::new();
        hash.update(self.info.clip.config_sha256.as_bytes());
        hash.update(self.info.object.as_bytes());
        for p in &self.info.prompts {
            hash.update(b"\0");
            hash.update(p.as_bytes());
        }
        for s in &self.info.shot_images {
            hash.update(b"\x01");
            hash.update(s.as_bytes());
        }
        format!("winclip:{:x}", hash.finalize())
    }

    /// Scores one image.
    pub fn inspect(&self, image: &Rgb32FImage) -> Result<Inspection, Error> {
        self.engine
            .inspect_with(&self.info.detector, &self.text, self.memory.as_ref(), image)
    }

    /// Saves to one model file (atomically).
    pub fn save(&self, path: &Path) -> Result<(), Error> {
        let mut tensors = BTreeMap::from([(TEXT_TENSOR.to_owned(), self.text.clone())]);
        if let Some(memory) = &self.memory {
            tensors.insert(PATCH_MEMORY.to_owned(), memory.patches.clone());
            for (k, w) in self.info.detector.scales.iter().zip(&memory.windows) {
                tensors.insert(format!("{WINDOW_MEMORY}.{k}"), w.clone());
            }
        }
        model_file::save(path, &self.info, &tensors)?;
        Ok(())
    }

    /// Loads a model file, finding its CLIP weights as
    /// [`WinClip::for_checkpoint`] does.
    pub fn load(path: &Path, device: &Device, lookup: &WeightsLookup) -> Result<Self, Error> {
        let (info, tensors): (WinClipInfo, _) = model_file::load(path, device)?;
        let bad = |reason: String| WinClipError::BadModelFile {
            path: path.to_owned(),
            reason,
        };
        info.detector.check().map_err(bad)?;
        let engine = Arc::new(WinClip::for_checkpoint(&info.clip, lookup, device, path)?);
        Self::from_parts(engine, info, tensors, path)
    }

    /// Loads a model file onto an engine already loaded (its checkpoint
    /// must have the same `config.json`).
    pub fn load_with_engine(path: &Path, engine: Arc<WinClip>) -> Result<Self, Error> {
        let (info, tensors): (WinClipInfo, _) = model_file::load(path, engine.clip.device())?;
        if info.clip.config_sha256 != engine.checkpoint.config_sha256 {
            return Err(WinClipError::CheckpointMismatch {
                model: path.to_owned(),
                expected: info.clip.config_sha256.clone(),
                found_dir: engine.checkpoint.dir.clone(),
                found: engine.checkpoint.config_sha256.clone(),
            }
            .into());
        }
        Self::from_parts(engine, info, tensors, path)
    }

    fn from_parts(
        engine: Arc<WinClip>,
        info: WinClipInfo,
        mut tensors: HashMap<String, Tensor>,
        path: &Path,
    ) -> Result<Self, Error> {
        let bad = |reason: String| WinClipError::BadModelFile {
            path: path.to_owned(),
            reason,
        };
        info.detector.check().map_err(bad)?;
        let (rows, cols) = engine.grid();
        check_scales(&info.detector.scales, rows, cols)?;
        let dim = engine.clip.embed_dim();
        let text = take(&mut tensors, TEXT_TENSOR, path)?;
        if text.dims() != [2, dim] {
            return Err(bad(format!(
                "class vectors are {:?}, expected [2, {dim}]",
                text.dims()
            ))
            .into());
        }
        let memory = if info.detector.shots > 0 {
            let check = |t: Tensor, name: &str| -> Result<Tensor, Error> {
                match t.dims() {
                    [n, d] if *d == dim && *n > 0 => Ok(t),
                    other => Err(bad(format!("{name} is {other:?}, expected [n, {dim}]")).into()),
                }
            };
            let patches = check(take(&mut tensors, PATCH_MEMORY, path)?, PATCH_MEMORY)?;
            let mut windows = Vec::with_capacity(info.detector.scales.len());
            for k in &info.detector.scales {
                let name = format!("{WINDOW_MEMORY}.{k}");
                windows.push(check(take(&mut tensors, &name, path)?, &name)?);
            }
            Some(Memory { patches, windows })
        } else {
            None
        };
        Ok(Self {
            engine,
            info,
            text,
            memory,
        })
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

/// Evaluation of WinCLIP on a labelled category: zero-shot when `shots` is
/// 0, else the first `shots` training images (by path) make the memory.
/// `object` defaults to the category name (`metal_nut` → `metal nut`).
pub fn evaluate(
    engine: &Arc<WinClip>,
    category: &Category,
    object: Option<&str>,
    prompts: &[String],
    shots: usize,
    limits: &ImageLimits,
    progress: &dyn Progress,
) -> Result<CategoryReport, Error> {
    let object = object.map_or_else(|| object_phrase(&category.name), object_phrase);
    let fit_start = Instant::now();
    let shot_paths = first_shots(&category.train_good, shots)?;
    let model = WinClipModel::fit(
        Arc::clone(engine),
        &object,
        prompts,
        &shot_paths,
        limits,
        progress,
    )?;
    let fit_seconds = fit_start.elapsed().as_secs_f64();

    let results = score_test_set(category, limits, progress, |image| {
        let inspection = model.inspect(image)?;
        Ok((inspection.raw_score, inspection.map))
    })?;
    results.into_report(
        category,
        FitSummary {
            detector: if shots == 0 {
                "winclip".into()
            } else {
                format!("winclip+{shots}")
            },
            backbone: format!("clip {}", engine.checkpoint.label()),
            fit_seconds,
            memory_bank_size: model.info.memory_bank_size,
            train_images: shot_paths.len(),
        },
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::progress::NoProgress;

    fn close(a: f64, b: f64) -> bool {
        (a - b).abs() < 1e-12
    }

    #[test]
    fn harmonic_mean_of_hand_values() {
        assert!(close(harmonic_mean(&[0.5]), 0.5));
        // 2 / (1/0.2 + 1/0.8) = 2 / 6.25
        assert!(close(harmonic_mean(&[0.2, 0.8]), 0.32));
        // 3 / (1 + 2 + 4)
        assert!(close(harmonic_mean(&[1.0, 0.5, 0.25]), 3.0 / 7.0));
        assert_eq!(harmonic_mean(&[0.9, 0.0]), 0.0);
        assert!(harmonic_mean(&[]).is_nan());
    }

    #[test]
    fn windows_are_aggregated_per_patch_by_harmonic_mean() {
        // A 2x3 grid, 2x2 windows at stride 1: w0 = {0,1,3,4}, w1 = {1,2,4,5}.
        let windows = sliding_windows(2, 3, 2, 1);
        assert_eq!(windows, vec![vec![0, 1, 3, 4], vec![1, 2, 4, 5]]);
        let scores = [0.2, 0.8];
        let patches = harmonic_window_aggregation(&scores, &windows, 6).unwrap();
        // Patches 0 and 3 see only w0, 2 and 5 only w1, 1 and 4 both.
        let expected = [0.2, 0.32, 0.8, 0.2, 0.32, 0.8];
        for (got, want) in patches.iter().zip(expected) {
            assert!(close(*got, want), "{patches:?}");
        }

        // 3x3 grid, 2x2 windows: the centre is covered by all four.
        let windows = sliding_windows(3, 3, 2, 1);
        let scores = [0.1, 0.2, 0.4, 0.8];
        let patches = harmonic_window_aggregation(&scores, &windows, 9).unwrap();
        assert!(close(patches[4], 4.0 / (10.0 + 5.0 + 2.5 + 1.25)));
        assert!(close(patches[0], 0.1));
        assert!(close(patches[8], 0.8));
        // Edge patch 1 is in windows 0 and 1.
        assert!(close(patches[1], 2.0 / (10.0 + 5.0)));

        // Errors: count mismatch, an uncovered patch, a window off the grid.
        assert!(harmonic_window_aggregation(&[0.5], &windows, 9).is_err());
        assert!(harmonic_window_aggregation(&[0.5], &[vec![0]], 2).is_err());
        assert!(harmonic_window_aggregation(&[0.5], &[vec![7]], 2).is_err());
        assert!(harmonic_window_aggregation(&[f64::NAN], &[vec![0]], 1).is_err());
    }

    #[test]
    fn scales_and_image_score_combine_by_harmonic_mean() {
        let small = vec![0.5, 0.25];
        let mid = vec![0.5, 1.0];
        let z = zero_shot_grid(0.5, &[small, mid]).unwrap();
        assert!(close(z[0], 0.5));
        // 3 / (2 + 4 + 1)
        assert!(close(z[1], 3.0 / 7.0));
        assert!(zero_shot_grid(0.5, &[vec![0.1], vec![0.1, 0.2]]).is_err());
        let m = mean_grid(&[vec![0.0, 0.3], vec![0.6, 0.3]]).unwrap();
        assert!(close(m[0], 0.3) && close(m[1], 0.3));
    }

    #[test]
    fn probability_is_the_two_class_softmax() {
        assert!(close(anomalous_probability(0.3, 0.3, 100.0), 0.5));
        let p = anomalous_probability(0.20, 0.25, 100.0);
        let softmax = (100.0f64 * 0.25).exp() / ((100.0f64 * 0.2).exp() + (100.0f64 * 0.25).exp());
        assert!((p - softmax).abs() < 1e-12);
        // Never exactly 0 at CLIP's scale.
        assert!(anomalous_probability(1.0, -1.0, 100.0) > 0.0);
    }

    #[test]
    fn identity_calibration_keeps_probabilities() {
        let c = Calibration::probability();
        for v in [0.0f32, 0.1, 0.5, 0.77, 1.0] {
            assert!((c.normalise(v) - v).abs() < 1e-6);
        }
        assert!(c.is_anomalous(0.5) && !c.is_anomalous(0.49));
    }

    #[test]
    fn first_shots_are_stable() {
        let paths: Vec<PathBuf> = ["c.png", "a.png", "b.png"].map(PathBuf::from).to_vec();
        assert_eq!(
            first_shots(&paths, 2).unwrap(),
            vec![PathBuf::from("a.png"), PathBuf::from("b.png")]
        );
        assert!(matches!(
            first_shots(&paths, 4),
            Err(WinClipError::NotEnoughShots { shots: 4, found: 3 })
        ));
    }

    fn tiny() -> PathBuf {
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../models/tests/fixtures/tiny_clip")
    }

    fn engine() -> Arc<WinClip> {
        Arc::new(WinClip::from_dir(&tiny(), "tiny", None, "flag", &Device::Cpu).unwrap())
    }

    fn image(seed: u32, w: u32, h: u32) -> Rgb32FImage {
        Rgb32FImage::from_fn(w, h, |x, y| {
            let v = ((x * 7 + y * 13 + seed * 31) % 17) as f32 / 16.0;
            image::Rgb([v, 1.0 - v, (v * 3.0) % 1.0])
        })
    }

    #[test]
    fn zero_shot_and_few_shot_on_the_tiny_checkpoint() {
        let engine = engine();
        let prompts = vec!["scratch".to_owned()];
        let z = engine
            .zero_shot(&image(0, 50, 30), "metal_nut", &prompts)
            .unwrap();
        assert_eq!((z.map.width, z.map.height), (50, 30));
        assert!((0.0..=1.0).contains(&z.score));
        assert!(
            z.map
                .values
                .iter()
                .all(|v| v.is_finite() && (0.0..=1.0).contains(v))
        );
        assert_eq!(z.is_anomalous, z.raw_score >= 0.5);

        let model = WinClipModel::zero_shot(Arc::clone(&engine), "metal nut", &prompts).unwrap();
        let again = model.inspect(&image(0, 50, 30)).unwrap();
        assert_eq!(again.raw_score, z.raw_score);
        assert!(engine.zero_shot(&image(0, 5, 5), "  ", &prompts).is_err());

        let dir = tempfile::tempdir().unwrap();
        let shots: Vec<PathBuf> = (0..2)
            .map(|i| {
                let p = dir.path().join(format!("{i}.png"));
                image::DynamicImage::ImageRgb32F(image(i, 40, 40))
                    .to_rgb8()
                    .save(&p)
                    .unwrap();
                p
            })
            .collect();
        let limits = ImageLimits::default();
        let few = WinClipModel::fit(
            Arc::clone(&engine),
            "metal nut",
            &prompts,
            &shots,
            &limits,
            &NoProgress,
        )
        .unwrap();
        // 8x8 grid: 64 patches + 49 + 36 windows per shot.
        assert_eq!(few.info().memory_bank_size, Some(2 * (64 + 49 + 36)));
        // A shot image matches its own memory: the few-shot part is ~0.
        let shot = load_image(&shots[0], &limits).unwrap();
        let own = few.inspect(&shot).unwrap();
        let zero = model.inspect(&shot).unwrap();
        assert!(
            (own.raw_score - 0.5 * zero.raw_score).abs() < 1e-4,
            "{own:?}"
        );

        let path = dir.path().join("m.flawscope");
        few.save(&path).unwrap();
        let lookup = WeightsLookup::from_vars(None, |_| None);
        let back = WinClipModel::load(&path, &Device::Cpu, &lookup).unwrap();
        assert_eq!(back.info(), few.info());
        let probe = image(5, 33, 21);
        let a = few.inspect(&probe).unwrap();
        let b = back.inspect(&probe).unwrap();
        assert_eq!(a.raw_score, b.raw_score);
        assert_eq!(a.map, b.map);
        let shared = WinClipModel::load_with_engine(&path, engine).unwrap();
        assert_eq!(shared.inspect(&probe).unwrap().raw_score, a.raw_score);
    }

    #[test]
    fn text_side_is_cached() {
        let engine = engine();
        let set = prompt_set(&[]).unwrap();
        let a = engine.class_vectors("screw", &set).unwrap();
        let b = engine.class_vectors("screw", &set).unwrap();
        assert!(Arc::ptr_eq(&a, &b));
    }
}
