//! WinCLIP as a detector like the others: fitted on the first K normal
//! images (K = 0: text alone), stored in a model file, scoring an image into
//! a raw score and a patch grid at the CLIP input size.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use candle_core::Tensor;
use image::Rgb32FImage;

use super::config::{
    DEFAULT_LOGIT_SCALE, PatchFeatures, WinClipConfig, WinClipError, check_scales, checked_object,
    first_shots, prompt_set,
};
use super::engine::WinClip;
use super::scoring::{Memory, score_embedded};
use crate::Error;
use crate::detector::{Detector, DetectorOutput, FitInputs, ImageScore, ScoreGrid};
use crate::model_file::take;
use crate::runtime::Runtime;
use crate::tiling::ImageSource;

const TEXT_TENSOR: &str = "winclip.text";
const PATCH_MEMORY: &str = "winclip.memory.patches";
const WINDOW_MEMORY: &str = "winclip.memory.windows";

/// A fitted WinCLIP layer: class vectors and (few-shot) the memory of normal
/// images, over a shared [`WinClip`] engine.
pub struct WinClipDetector {
    engine: Arc<WinClip>,
    config: WinClipConfig,
    text: Tensor,
    memory: Option<Memory>,
}

impl WinClipDetector {
    /// The first `config.shots` of the normal images (by path) make the
    /// memory; no shot gives the zero-shot detector.
    pub fn fit(config: &WinClipConfig, inputs: &FitInputs<'_>) -> Result<Self, Error> {
        config.check().map_err(WinClipError::Config)?;
        let engine = inputs.runtime.clip()?;
        let object = checked_object(&config.object)?;
        let vectors = engine.class_vectors(&object, &prompt_set(&config.prompts)?)?;
        let text = engine.text_tensor(&vectors)?;
        let (rows, cols) = engine.grid();
        check_scales(&config.scales, rows, cols)?;
        let shots = first_shots(inputs.normal, config.shots)?;
        let memory = if shots.is_empty() {
            None
        } else {
            Some(Self::memory(&engine, config, &shots, inputs)?)
        };
        let config = WinClipConfig {
            object,
            logit_scale: Some(config.logit_scale.unwrap_or(DEFAULT_LOGIT_SCALE)),
            clip: Some(engine.checkpoint().clone()),
            shot_images: shots
                .iter()
                .map(|p| {
                    p.file_name()
                        .unwrap_or(p.as_os_str())
                        .to_string_lossy()
                        .into_owned()
                })
                .collect(),
            ..config.clone()
        };
        Ok(Self {
            engine,
            config,
            text,
            memory,
        })
    }

    /// The settings as fitted: the object phrase, logit scale, CLIP
    /// checkpoint and shot images filled in.
    pub fn config(&self) -> &WinClipConfig {
        &self.config
    }

    fn memory(
        engine: &WinClip,
        config: &WinClipConfig,
        shots: &[PathBuf],
        inputs: &FitInputs<'_>,
    ) -> Result<Memory, Error> {
        let scales = &config.scales;
        let mut patches = Vec::with_capacity(shots.len());
        let mut windows: Vec<Vec<Tensor>> = vec![Vec::with_capacity(shots.len()); scales.len()];
        inputs.progress.start("few-shot memory", shots.len() as u64);
        let source = ImageSource {
            paths: shots,
            ..inputs.images()
        };
        source.for_each(
            |_, image| {
                let e = engine.embed(image, scales, Some(config.patch_features))?;
                let p = e
                    .patches
                    .ok_or_else(|| WinClipError::Config("no patch embeddings".into()))?;
                patches.push(p);
                for (bank, (_, emb)) in windows.iter_mut().zip(e.windows) {
                    bank.push(emb);
                }
                Ok(())
            },
            || inputs.progress.advance(1),
        )?;
        inputs.progress.finish();
        Ok(Memory {
            patches: Tensor::cat(&patches, 0)?,
            windows: windows
                .iter()
                .map(|w| Tensor::cat(w, 0))
                .collect::<Result<_, _>>()?,
        })
    }

    /// Rebuilds the detector from a model file, finding its CLIP weights
    /// through `runtime` (they must have the stored `config.json`).
    pub fn load(
        config: &WinClipConfig,
        tensors: &mut HashMap<String, Tensor>,
        path: &Path,
        runtime: &Runtime,
    ) -> Result<Self, Error> {
        let bad = |reason: String| WinClipError::BadModelFile {
            path: path.to_owned(),
            reason,
        };
        config.check().map_err(bad)?;
        let stored = config
            .clip
            .as_ref()
            .ok_or_else(|| bad("no CLIP checkpoint recorded".into()))?;
        // `clip_for` hands out only engines with the stored config.json
        // hash (a cached one matched on it; a new one is checked on load).
        let engine = runtime.clip_for(stored, path)?;
        let (rows, cols) = engine.grid();
        check_scales(&config.scales, rows, cols)?;
        let dim = engine.clip().embed_dim();
        let text = take(tensors, TEXT_TENSOR, path)?;
        if text.dims() != [2, dim] {
            return Err(bad(format!(
                "class vectors are {:?}, expected [2, {dim}]",
                text.dims()
            ))
            .into());
        }
        let memory = if config.shots > 0 {
            let check = |t: Tensor, name: &str, dim: usize| -> Result<Tensor, Error> {
                match t.dims() {
                    [n, d] if *d == dim && *n > 0 => Ok(t),
                    other => Err(bad(format!("{name} is {other:?}, expected [n, {dim}]")).into()),
                }
            };
            let patch_dim = match config.patch_features {
                PatchFeatures::Tokens => engine.clip().config().vision.hidden_size,
                PatchFeatures::Projected => dim,
            };
            let patches = check(take(tensors, PATCH_MEMORY, path)?, PATCH_MEMORY, patch_dim)?;
            let mut windows = Vec::with_capacity(config.scales.len());
            for k in &config.scales {
                let name = format!("{WINDOW_MEMORY}.{k}");
                windows.push(check(take(tensors, &name, path)?, &name, dim)?);
            }
            Some(Memory { patches, windows })
        } else {
            None
        };
        Ok(Self {
            engine,
            config: config.clone(),
            text,
            memory,
        })
    }
}

impl Detector for WinClipDetector {
    fn score(&self, image: &Rgb32FImage) -> Result<DetectorOutput, Error> {
        let memory = self.memory.as_ref();
        let patches = memory.map(|_| self.config.patch_features);
        let embedded = self.engine.embed(image, &self.config.scales, patches)?;
        let scored = score_embedded(&embedded, &self.config, &self.text, memory)?;
        let side = self.engine.input_size() as u32;
        Ok(DetectorOutput {
            image_score: ImageScore::Given(scored.score as f32),
            grids: vec![ScoreGrid {
                width: scored.cols,
                height: scored.rows,
                values: scored.grid.iter().map(|&v| v as f32).collect(),
                input_size: (side, side),
                blur_sigma: self.config.blur_sigma,
            }],
        })
    }

    fn tensors(&self) -> BTreeMap<String, Tensor> {
        let mut tensors = BTreeMap::from([(TEXT_TENSOR.to_owned(), self.text.clone())]);
        if let Some(memory) = &self.memory {
            tensors.insert(PATCH_MEMORY.to_owned(), memory.patches.clone());
            for (k, w) in self.config.scales.iter().zip(&memory.windows) {
                tensors.insert(format!("{WINDOW_MEMORY}.{k}"), w.clone());
            }
        }
        tensors
    }

    fn memory_bank_size(&self) -> Option<usize> {
        self.memory.as_ref().and_then(|m| m.rows().ok())
    }
}
