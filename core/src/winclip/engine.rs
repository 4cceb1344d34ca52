//! The WinCLIP engine: a CLIP model, its tokenizer, and a cache of the
//! text side (class vectors), shared by every WinCLIP layer on one
//! checkpoint.

use std::path::Path;
use std::sync::{Arc, Mutex, PoisonError};

use candle_core::{Device, Tensor};
use flawscope_models::ModelError;
use flawscope_models::clip::{ClipModel, ClipPreprocessor, Precision, ResizeMode, sliding_windows};
use flawscope_models::clip_weights::{
    ClipPreset, WEIGHT_FILES, WeightsLookup, check_checkpoint_dir,
};
use flawscope_prompts::{
    ClassVectors, ClipTokenizer, PromptSet, SentenceEncoder, TextEmbeddingCache,
};
use image::{DynamicImage, Rgb32FImage};

use super::checkpoint::{ClipCheckpoint, file_sha256, source_name};
use super::config::{PatchFeatures, WinClipError, check_scales};
use super::scoring::{Embedded, unit_rows};
use crate::Error;

/// Names the vision tower's arithmetic for every engine: `f32` (the
/// reference implementation's) or `bf16` (the default; see [`Precision`]).
pub const PRECISION_VAR: &str = "FLAWSCOPE_CLIP_PRECISION";

/// The precision [`PRECISION_VAR`] asks for: bf16 unless set to `f32`.
/// bf16 runs only on CPUs with AVX512-BF16 (elsewhere f32 runs); its drift
/// from f32 is ~1e-4 on scores and maps (README, "Zero-shot and few-shot with CLIP").
fn vision_precision() -> Result<Precision, WinClipError> {
    match std::env::var(PRECISION_VAR) {
        Err(std::env::VarError::NotPresent) => Ok(Precision::Bf16),
        Ok(v) if v.eq_ignore_ascii_case("bf16") => Ok(Precision::Bf16),
        Ok(v) if v.eq_ignore_ascii_case("f32") => Ok(Precision::F32),
        Ok(v) => Err(WinClipError::Config(format!(
            "{PRECISION_VAR} is {v:?}; use f32 or bf16"
        ))),
        Err(e) => Err(WinClipError::Config(format!("{PRECISION_VAR}: {e}"))),
    }
}

/// The WinCLIP engine: a CLIP model, its tokenizer and a cache of class
/// vectors. Shared (behind an [`Arc`]) by every model that uses the same
/// checkpoint; safe to call from several threads.
pub struct WinClip {
    clip: ClipModel,
    tokenizer: ClipTokenizer,
    checkpoint: ClipCheckpoint,
    /// Names these exact weights in the text cache: the checkpoint's id
    /// plus the weights file's size and modification time, so replaced
    /// weights under the same config never reuse cached vectors.
    text_id: String,
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
        let clip = ClipModel::load(dir, device)?.with_vision_precision(vision_precision()?)?;
        let tokenizer = ClipTokenizer::from_dir(dir)?;
        let checkpoint = ClipCheckpoint {
            preset: preset.to_owned(),
            repo,
            dir: dir.to_owned(),
            source: source.to_owned(),
            config_sha256,
        };
        let text_id = format!("{}|{}", checkpoint.cache_id(), weights_stamp(dir));
        Ok(Self {
            clip,
            tokenizer,
            checkpoint,
            text_id,
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

    /// Replaces the in-memory class-vector cache (for example with one on
    /// disk, [`TextEmbeddingCache::in_dir`]).
    pub fn with_text_cache(mut self, cache: TextEmbeddingCache) -> Self {
        self.text_cache = Mutex::new(cache);
        self
    }

    /// The checkpoint's identity.
    pub fn checkpoint(&self) -> &ClipCheckpoint {
        &self.checkpoint
    }

    /// The CLIP model.
    /// Sets the arithmetic of the vision tower's linear layers (see
    /// [`Precision`]); the text side is unaffected.
    pub fn with_vision_precision(mut self, precision: Precision) -> Result<Self, Error> {
        self.clip = self.clip.with_vision_precision(precision)?;
        Ok(self)
    }

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

    /// The (normal, anomalous) class vectors of `object` under `prompts`,
    /// from the cache or computed (and cached) on a miss. A sentence longer
    /// than the tokenizer's context is an error, not silently cut.
    pub fn class_vectors(
        &self,
        object: &str,
        prompts: &PromptSet,
    ) -> Result<Arc<ClassVectors>, Error> {
        prompts.check_lengths(object, self.tokenizer.context_length(), |s| {
            self.tokenizer.token_count(s)
        })?;
        let encoder = TextEncoder {
            clip: &self.clip,
            tokenizer: &self.tokenizer,
            id: self.text_id.clone(),
        };
        let mut cache = self
            .text_cache
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        cache.class_vectors(&encoder, object, prompts)
    }

    /// The class vectors as a `[2, embed_dim]` tensor (normal, anomalous).
    pub(crate) fn text_tensor(&self, vectors: &ClassVectors) -> Result<Tensor, Error> {
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

    fn pixels(&self, image: &Rgb32FImage) -> Result<Tensor, Error> {
        let pre = ClipPreprocessor::new(self.input_size()).with_mode(ResizeMode::Stretch);
        let dynamic = DynamicImage::ImageRgb32F(image.clone());
        Ok(pre.tensor(std::slice::from_ref(&dynamic), self.clip.device())?)
    }

    /// The projected (not normalised) CLIP embedding of one whole image, `[1, D]`.
    pub(crate) fn image_embedding(&self, image: &Rgb32FImage) -> Result<Tensor, Error> {
        Ok(self.clip.encode_image(&self.pixels(image)?)?)
    }

    /// Unit embeddings of one image: class token, optionally every patch
    /// (in the space `patches` names), and every window of each scale.
    pub(crate) fn embed(
        &self,
        image: &Rgb32FImage,
        scales: &[usize],
        patches: Option<PatchFeatures>,
    ) -> Result<Embedded, Error> {
        let (rows, cols) = self.grid();
        check_scales(scales, rows, cols)?;
        let pixels = self.pixels(image)?;
        let (class, patches) = match patches {
            Some(PatchFeatures::Tokens) => {
                let (class, tokens) = self.clip.encode_image_and_patch_tokens(&pixels)?;
                (class, Some(unit_rows(&tokens.squeeze(0)?)?))
            }
            Some(PatchFeatures::Projected) => {
                let (class, patches) = self.clip.encode_image_and_patches(&pixels)?;
                (class, Some(unit_rows(&patches.squeeze(0)?)?))
            }
            None => (self.clip.encode_image(&pixels)?, None),
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
}

/// `size:mtime` of the checkpoint's weights file (`-` when unreadable).
fn weights_stamp(dir: &Path) -> String {
    WEIGHT_FILES
        .iter()
        .find_map(|name| std::fs::metadata(dir.join(name)).ok())
        .map_or_else(
            || "-".to_owned(),
            |m| {
                let mtime = m
                    .modified()
                    .ok()
                    .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
                    .map_or(0, |d| d.as_nanos());
                format!("{}:{mtime}", m.len())
            },
        )
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
