//! DINOv2 vision transformer for Hugging Face checkpoints.
//!
//! Loads the safetensors layout of `facebook/dinov2-small`, `-base` and
//! `-large` (a `Dinov2Model` saved by `transformers`: `config.json` and
//! `model.safetensors`) and matches `transformers`' outputs:
//!
//! - [`Dinov2Model::hidden_states`]: the tokens of chosen layers with
//!   `transformers`' numbering (0 = the embeddings, `i` = the output of
//!   encoder layer `i`; nothing layer-normed), class token first.
//! - [`Dinov2Model::patch_tokens`]: the patch tokens of the last layer after
//!   the final layer norm (`last_hidden_state[:, 1:]`).
//!
//! Any input whose sides are multiples of the patch works: the position
//! embeddings are resized as `interpolate_pos_encoding` does (bicubic,
//! `align_corners=False`, in transformers 5.x). Register tokens
//! (`dinov2_with_registers`) and the SwiGLU MLP of ViT-g are refused.
//!
//! The layers are CLIP's pre-norm transformer ([`crate::clip`]); DINOv2's
//! layer scale is folded into the attention output and the second MLP
//! projection when the weights are loaded.

mod config;

use std::path::Path;

use candle_core::{DType, Device, Tensor};
use candle_nn::{LayerNorm, Module};

pub use config::Dinov2Config;

use crate::ModelError;
pub use crate::checkpoint::weights_path;
use crate::checkpoint::{Checkpoint, check_pixels};
use crate::clip::Precision;
use crate::clip::transformer::{Attention, Encoder, EncoderLayer, Linear, Weights};
use crate::clip::vision::resize_position_embeddings;

/// ImageNet channel means DINOv2 was trained with (pixels in `[0, 1]`).
pub const DINOV2_MEAN: [f32; 3] = [0.485, 0.456, 0.406];
/// ImageNet channel standard deviations DINOv2 was trained with.
pub const DINOV2_STD: [f32; 3] = [0.229, 0.224, 0.225];

/// A `Dinov2Model` ready for inference.
#[derive(Debug, Clone)]
pub struct Dinov2Model {
    config: Dinov2Config,
    /// Patch convolution as a matrix: `[hidden, channels * patch * patch]`.
    patch_weight: Tensor,
    patch_bias: Tensor,
    cls_token: Tensor,
    /// `[1 + grid², hidden]`.
    position_embedding: Tensor,
    /// Side of the square grid the position embeddings were trained on.
    grid: usize,
    encoder: Encoder,
    layernorm: LayerNorm,
    device: Device,
}

impl Dinov2Model {
    /// Loads `config.json` and `model.safetensors` (or `pytorch_model.bin`)
    /// from a checkpoint folder onto `device`.
    pub fn load(dir: &Path, device: &Device) -> Result<Self, ModelError> {
        let checkpoint = Checkpoint::open(dir, device)?;
        let config = Dinov2Config::from_file(&checkpoint.config)?;
        let path = checkpoint.weights;
        let w = Weights {
            vb: checkpoint.vb,
            path: &path,
        };
        // Saved as a bare Dinov2Model or inside a wrapper (e.g. a classifier).
        let w = if w.vb.contains_tensor("dinov2.embeddings.cls_token") {
            w.pp("dinov2")
        } else {
            w
        };
        Self::from_weights(config, &w, device)
    }

    fn from_weights(
        config: Dinov2Config,
        w: &Weights,
        device: &Device,
    ) -> Result<Self, ModelError> {
        let d = config.hidden_size;
        let c = config.num_channels;
        let p = config.patch_size;
        let emb = w.pp("embeddings");
        let proj = emb.pp("patch_embeddings").pp("projection");
        let patch_weight = proj.get((d, c, p, p), "weight")?.reshape((d, c * p * p))?;
        let patch_bias = proj.get(d, "bias")?;
        let cls_token = emb.get((1, 1, d), "cls_token")?.reshape(d)?;
        let pos = emb.get_any("position_embeddings")?;
        let bad_pos = || ModelError::Weights {
            path: w.path.to_owned(),
            reason: format!(
                "embeddings.position_embeddings has shape {:?}, expected [1, 1 + grid², {d}]",
                pos.dims()
            ),
        };
        let (one, n, dim) = pos.dims3().map_err(|_| bad_pos())?;
        let grid = (n.saturating_sub(1) as f64).sqrt().round() as usize;
        if one != 1 || dim != d || grid == 0 || grid * grid + 1 != n {
            return Err(bad_pos());
        }
        let position_embedding = pos.reshape((n, d))?;
        let enc = w.pp("encoder").pp("layer");
        let mut layers = Vec::with_capacity(config.num_hidden_layers);
        for i in 0..config.num_hidden_layers {
            let l = enc.pp(i);
            let a = l.pp("attention");
            let q = a.pp("attention").linear(d, d, "query")?;
            let k = a.pp("attention").linear(d, d, "key")?;
            let v = a.pp("attention").linear(d, d, "value")?;
            let scale1 = l.pp("layer_scale1").get(d, "lambda1")?;
            let scale2 = l.pp("layer_scale2").get(d, "lambda1")?;
            // Folding `lambda ⊙ (W x + b)` into `(diag(lambda) W) x + lambda ⊙ b`
            // lets the layer run as CLIP's (and in bf16) with no extra pass.
            let out = scaled(a.pp("output").linear(d, d, "dense")?, &scale1)?;
            let fc2 = scaled(
                l.pp("mlp").linear(config.intermediate_size, d, "fc2")?,
                &scale2,
            )?;
            layers.push(EncoderLayer::new(
                l.layer_norm(d, config.layer_norm_eps, "norm1")?,
                Attention::from_projections(q, k, v, out, d, config.num_attention_heads)?,
                l.layer_norm(d, config.layer_norm_eps, "norm2")?,
                l.pp("mlp").linear(d, config.intermediate_size, "fc1")?,
                fc2,
                config.hidden_act,
            ));
        }
        Ok(Self {
            layernorm: w.layer_norm(d, config.layer_norm_eps, "layernorm")?,
            config,
            patch_weight,
            patch_bias,
            cls_token,
            position_embedding,
            grid,
            encoder: Encoder::from_layers(layers),
            device: device.clone(),
        })
    }

    /// The architecture.
    pub fn config(&self) -> &Dinov2Config {
        &self.config
    }

    /// Where the weights live.
    pub fn device(&self) -> &Device {
        &self.device
    }

    /// Width of every token.
    pub fn hidden_size(&self) -> usize {
        self.config.hidden_size
    }

    /// Number of encoder layers (hidden states run `0..=depth`).
    pub fn depth(&self) -> usize {
        self.encoder.depth()
    }

    /// Patch grid `(rows, cols)` for a `height × width` input (remainders are dropped).
    pub fn grid(&self, height: usize, width: usize) -> (usize, usize) {
        let p = self.config.patch_size;
        (height / p, width / p)
    }

    /// The arithmetic of the transformer's linear layers (f32 by default).
    pub fn with_precision(mut self, precision: Precision) -> Result<Self, ModelError> {
        self.encoder.set_precision(precision)?;
        Ok(self)
    }

    fn check_pixels(&self, pixels: &Tensor) -> Result<(usize, usize, usize), ModelError> {
        check_pixels(pixels, self.config.num_channels, self.config.patch_size)
    }

    /// Position embeddings for a `rows × cols` grid, `[1 + rows*cols, hidden]`.
    fn position_embeddings(&self, rows: usize, cols: usize) -> Result<Tensor, ModelError> {
        // transformers skips the resize for a square input of the trained grid;
        // elsewhere a resize to the same grid is the identity anyway.
        resize_position_embeddings(
            &self.position_embedding,
            self.grid,
            rows,
            cols,
            &self.device,
        )
    }

    /// Tokens entering the encoder: class + patches with position
    /// embeddings, `[batch, 1 + rows*cols, hidden]`.
    fn embed(&self, pixels: &Tensor) -> Result<(Tensor, (usize, usize)), ModelError> {
        let (b, h, w) = self.check_pixels(pixels)?;
        let p = self.config.patch_size;
        let (rows, cols) = self.grid(h, w);
        let c = self.config.num_channels;
        let d = self.config.hidden_size;
        // A stride-p convolution with a p×p kernel is a product of flattened patches.
        let patches = pixels
            .to_device(&self.device)?
            .to_dtype(DType::F32)?
            .narrow(2, 0, rows * p)?
            .narrow(3, 0, cols * p)?
            .reshape(vec![b, c, rows, p, cols, p])?
            .permute(vec![0, 2, 4, 1, 3, 5])?
            .contiguous()?
            .reshape((b * rows * cols, c * p * p))?
            .matmul(&self.patch_weight.t()?)?
            .broadcast_add(&self.patch_bias)?
            .reshape((b, rows * cols, d))?;
        let cls = self.cls_token.reshape((1, 1, d))?.broadcast_as((b, 1, d))?;
        let tokens = Tensor::cat(&[&cls, &patches], 1)?
            .broadcast_add(&self.position_embeddings(rows, cols)?)?;
        Ok((tokens, (rows, cols)))
    }

    /// Raw tokens of the chosen layers, each `[batch, 1 + rows*cols, hidden]`
    /// (class token first), numbered as `transformers`' `hidden_states`: 0 is
    /// the embeddings, `i` the output of layer `i`, up to
    /// `num_hidden_layers`. Only the layers up to the deepest one asked for
    /// are run. Returns the patch grid `(rows, cols)` too.
    pub fn hidden_states(
        &self,
        pixels: &Tensor,
        layers: &[usize],
    ) -> Result<(Vec<Tensor>, (usize, usize)), ModelError> {
        let depth = self.depth();
        if let Some(bad) = layers.iter().find(|&&l| l > depth) {
            return Err(ModelError::InvalidInput(format!(
                "layer {bad} asked for; DINOv2 has hidden states 0..={depth}"
            )));
        }
        let (tokens, grid) = self.embed(pixels)?;
        let upto = layers.iter().copied().max().unwrap_or(0);
        let mut found: Vec<Option<Tensor>> = vec![None; layers.len()];
        self.encoder.forward(&tokens, None, upto, |i, x| {
            for (slot, &l) in found.iter_mut().zip(layers) {
                if l == i {
                    *slot = Some(x.clone());
                }
            }
        })?;
        let states = found
            .into_iter()
            .map(|t| t.ok_or_else(|| ModelError::InvalidInput("hidden state not produced".into())))
            .collect::<Result<_, _>>()?;
        Ok((states, grid))
    }

    /// Every token of the last layer after the final layer norm
    /// (`last_hidden_state`), `[batch, 1 + rows*cols, hidden]`.
    pub fn last_hidden_state(&self, pixels: &Tensor) -> Result<Tensor, ModelError> {
        let (tokens, _) = self.embed(pixels)?;
        let out = self.encoder.forward(&tokens, None, usize::MAX, |_, _| {})?;
        Ok(self.layernorm.forward(&out.contiguous()?)?)
    }

    /// The patch tokens of [`Dinov2Model::last_hidden_state`] (class token
    /// dropped), `[batch, rows*cols, hidden]`, row-major over the grid.
    pub fn patch_tokens(&self, pixels: &Tensor) -> Result<Tensor, ModelError> {
        let all = self.last_hidden_state(pixels)?;
        let n = all.dim(1)?;
        Ok(all.narrow(1, 1, n - 1)?.contiguous()?)
    }
}

/// `lambda ⊙ (x Wᵀ + b)` as one linear layer.
fn scaled(linear: Linear, lambda: &Tensor) -> Result<Linear, ModelError> {
    let weight = linear
        .weight
        .broadcast_mul(&lambda.reshape((lambda.dim(0)?, 1))?)?;
    let bias = match &linear.bias {
        Some(b) => Some((b * lambda)?),
        None => None,
    };
    Ok(Linear::new(weight, bias))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn model_can_be_shared_across_threads() {
        fn send_sync<T: Send + Sync>() {}
        send_sync::<Dinov2Model>();
    }
}
