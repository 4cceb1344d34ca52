//! CLIP vision and text towers for Hugging Face checkpoints.
//!
//! Loads the safetensors layout of `openai/clip-vit-base-patch16`,
//! `openai/clip-vit-large-patch14` and `openai/clip-vit-large-patch14-336`
//! (and any `CLIPModel` saved by `transformers`), with the architecture read
//! from the checkpoint's `config.json`, and matches `transformers`' outputs:
//!
//! - [`ClipModel::encode_text`]: projected text embeddings, pooled at the end
//!   token (`argmax(ids)` for OpenAI's legacy configs, first `eos_token_id`
//!   otherwise, as `transformers` does).
//! - [`ClipModel::encode_image`]: projected image embeddings (class token,
//!   post-layernorm, projection).
//! - [`ClipModel::vision_hidden_states`]: the tokens of chosen layers, with
//!   `transformers`' numbering (0 = embeddings after the pre-layernorm,
//!   `i` = output of encoder layer `i`).
//! - [`ClipModel::encode_windows`]: WinCLIP's windowed forward — the class
//!   token plus the patch tokens of one window (with their position
//!   embeddings) through the whole transformer — batched over many windows.
//! - [`ClipModel::encode_patches`]: every patch token, post-layernormed and
//!   projected into the joint space (WinCLIP's few-shot memory).
//!
//! Inputs of another size than the checkpoint's are handled by bicubic
//! interpolation of the position embeddings (`interpolate_pos_encoding=True`
//! in `transformers`). Computation is in `f32`.
//!
//! The transformer is written here rather than taken from
//! `candle_transformers::models::clip`, which hard-codes QuickGELU and the
//! layer-norm epsilon, keeps the post-layernorm and projections private, has
//! no token-subset forward, no position interpolation, and silently replaces
//! a missing `class_embedding` with random values.
//!
//! Layout, as in `candle_transformers::models::clip`: `config` reads
//! `config.json`, `transformer` holds the layers both towers share, `text`
//! and `vision` the towers and their forwards, `preprocess` turns images
//! into pixels and `weights_file` reads safetensors.

mod config;
mod preprocess;
mod text;
pub(crate) mod transformer;
pub(crate) mod vision;
pub(crate) mod weights_file;

use std::path::Path;

use candle_core::{Device, Tensor};

pub use config::{Activation, ClipConfig, ClipTextConfig, ClipVisionConfig};
pub use preprocess::{CLIP_MEAN, CLIP_STD, ClipPreprocessor, CropBox, ResizeMode, resize_bicubic};
pub use transformer::Precision;
pub use vision::sliding_windows;

use crate::ModelError;
use crate::checkpoint::Checkpoint;
use text::TextTower;
use transformer::Weights;
use vision::VisionTower;

/// A CLIP model: both towers and both projections, ready for inference.
#[derive(Debug, Clone)]
pub struct ClipModel {
    config: ClipConfig,
    text: TextTower,
    vision: VisionTower,
    logit_scale: Option<f32>,
    vision_precision: Precision,
    device: Device,
}

impl ClipModel {
    /// Loads `config.json` and `model.safetensors` (or `pytorch_model.bin`)
    /// from a checkpoint folder onto `device`.
    pub fn load(dir: &Path, device: &Device) -> Result<Self, ModelError> {
        let checkpoint = Checkpoint::open(dir, device)?;
        let config = ClipConfig::from_file(&checkpoint.config)?;
        let weights = Weights {
            vb: checkpoint.vb,
            path: &checkpoint.weights,
        };
        Self::from_weights(config, &weights, device)
    }

    fn from_weights(config: ClipConfig, w: &Weights, device: &Device) -> Result<Self, ModelError> {
        let text = TextTower::load(w, &config.text, config.projection_dim)?;
        let vision = VisionTower::load(w, &config.vision, config.projection_dim)?;
        let logit_scale = if w.vb.contains_tensor("logit_scale") {
            let s = w.get_any("logit_scale")?.flatten_all()?.to_vec1::<f32>()?;
            s.first().map(|v| v.exp())
        } else {
            None
        };
        Ok(Self {
            config,
            text,
            vision,
            logit_scale,
            vision_precision: Precision::F32,
            device: device.clone(),
        })
    }

    /// The architecture.
    pub fn config(&self) -> &ClipConfig {
        &self.config
    }

    /// Where the weights live.
    pub fn device(&self) -> &Device {
        &self.device
    }

    /// Width of the joint embedding space (512 for ViT-B/16, 768 for ViT-L/14).
    pub fn embed_dim(&self) -> usize {
        self.config.projection_dim
    }

    /// `exp(logit_scale)` (100 for OpenAI CLIP), if the checkpoint has it.
    pub fn logit_scale(&self) -> Option<f32> {
        self.logit_scale
    }

    /// CLIP's preprocessing at the checkpoint's input size.
    pub fn preprocessor(&self) -> ClipPreprocessor {
        ClipPreprocessor::new(self.config.vision.image_size)
    }

    /// Patch grid `(rows, cols)` for a `height × width` input (remainders are dropped).
    pub fn grid(&self, height: usize, width: usize) -> (usize, usize) {
        let p = self.config.vision.patch_size;
        (height / p, width / p)
    }
}

/// Puts rows computed in `order` back in their original places.
fn unsort(sorted: &Tensor, order: &[usize], device: &Device) -> candle_core::Result<Tensor> {
    let mut inverse = vec![0u32; order.len()];
    for (pos, &orig) in order.iter().enumerate() {
        inverse[orig] = pos as u32;
    }
    sorted.index_select(&Tensor::from_vec(inverse, order.len(), device)?, 0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn model_can_be_shared_across_threads() {
        fn send_sync<T: Send + Sync>() {}
        send_sync::<ClipModel>();
        send_sync::<ClipPreprocessor>();
    }
}
