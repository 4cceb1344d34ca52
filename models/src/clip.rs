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

mod preprocess;
mod weights_file;

use std::path::{Path, PathBuf};

use candle_core::{DType, Device, IndexOp, Shape, Tensor};
use candle_nn::{LayerNorm, Module, VarBuilder};
use serde::Deserialize;

pub use preprocess::{CLIP_MEAN, CLIP_STD, ClipPreprocessor, CropBox, ResizeMode, resize_bicubic};

use crate::ModelError;
use weights_file::SafetensorsFile;

/// Token budget of one batched pass in [`ClipModel::encode_windows`]: enough
/// to amortise the matrix products, small enough to bound activations.
const WINDOW_BATCH_TOKENS: usize = 4096;
/// Sentences per pass in [`ClipModel::encode_text`].
const TEXT_BATCH: usize = 128;

/// The MLP non-linearity named by `hidden_act`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Activation {
    /// `x * sigmoid(1.702 x)` (`quick_gelu`, OpenAI CLIP).
    QuickGelu,
    /// Exact, erf-based GELU (`gelu`).
    Gelu,
    /// Tanh approximation of GELU (`gelu_new`, `gelu_pytorch_tanh`).
    GeluTanh,
}

impl Activation {
    fn parse(name: &str) -> Option<Self> {
        match name {
            "quick_gelu" => Some(Self::QuickGelu),
            "gelu" => Some(Self::Gelu),
            "gelu_new" | "gelu_pytorch_tanh" => Some(Self::GeluTanh),
            _ => None,
        }
    }

    fn apply(self, x: &Tensor) -> candle_core::Result<Tensor> {
        match self {
            Self::QuickGelu => x * candle_nn::ops::sigmoid(&(x * 1.702)?)?,
            Self::Gelu => x.gelu_erf(),
            Self::GeluTanh => x.gelu(),
        }
    }
}

/// Architecture of the text tower.
#[derive(Debug, Clone, PartialEq)]
pub struct ClipTextConfig {
    /// Number of token ids.
    pub vocab_size: usize,
    /// Width of the transformer.
    pub hidden_size: usize,
    /// Width of the MLP.
    pub intermediate_size: usize,
    /// Number of encoder layers.
    pub num_hidden_layers: usize,
    /// Number of attention heads.
    pub num_attention_heads: usize,
    /// Longest token sequence (77 for CLIP).
    pub max_position_embeddings: usize,
    /// MLP non-linearity.
    pub hidden_act: Activation,
    /// Layer-norm epsilon.
    pub layer_norm_eps: f64,
    /// End-of-text id; `2` (OpenAI's legacy value) means "pool at the largest id".
    pub eos_token_id: i64,
}

/// Architecture of the vision tower.
#[derive(Debug, Clone, PartialEq)]
pub struct ClipVisionConfig {
    /// Width of the transformer.
    pub hidden_size: usize,
    /// Width of the MLP.
    pub intermediate_size: usize,
    /// Number of encoder layers.
    pub num_hidden_layers: usize,
    /// Number of attention heads.
    pub num_attention_heads: usize,
    /// Input channels (3).
    pub num_channels: usize,
    /// Side of the square training input.
    pub image_size: usize,
    /// Side of a square patch.
    pub patch_size: usize,
    /// MLP non-linearity.
    pub hidden_act: Activation,
    /// Layer-norm epsilon.
    pub layer_norm_eps: f64,
}

impl ClipVisionConfig {
    /// Patches per side at the training resolution.
    pub fn grid(&self) -> usize {
        self.image_size / self.patch_size
    }
}

/// A CLIP checkpoint's `config.json`, reduced to what inference needs.
#[derive(Debug, Clone, PartialEq)]
pub struct ClipConfig {
    /// Text tower.
    pub text: ClipTextConfig,
    /// Vision tower.
    pub vision: ClipVisionConfig,
    /// Width of the joint embedding space.
    pub projection_dim: usize,
}

#[derive(Debug, Default, Deserialize)]
struct RawText {
    vocab_size: Option<usize>,
    hidden_size: Option<usize>,
    intermediate_size: Option<usize>,
    num_hidden_layers: Option<usize>,
    num_attention_heads: Option<usize>,
    max_position_embeddings: Option<usize>,
    hidden_act: Option<String>,
    layer_norm_eps: Option<f64>,
    eos_token_id: Option<i64>,
}

#[derive(Debug, Default, Deserialize)]
struct RawVision {
    hidden_size: Option<usize>,
    intermediate_size: Option<usize>,
    num_hidden_layers: Option<usize>,
    num_attention_heads: Option<usize>,
    num_channels: Option<usize>,
    image_size: Option<usize>,
    patch_size: Option<usize>,
    hidden_act: Option<String>,
    layer_norm_eps: Option<f64>,
}

#[derive(Debug, Deserialize)]
struct RawConfig {
    model_type: Option<String>,
    projection_dim: Option<usize>,
    text_config: Option<RawText>,
    vision_config: Option<RawVision>,
    // Older OpenAI files also carry these; their values take precedence, as in transformers.
    text_config_dict: Option<RawText>,
    vision_config_dict: Option<RawVision>,
}

impl ClipConfig {
    /// Reads a checkpoint's `config.json`.
    pub fn from_file(path: &Path) -> Result<Self, ModelError> {
        let text = std::fs::read_to_string(path).map_err(|e| ModelError::Config {
            path: path.to_owned(),
            reason: e.to_string(),
        })?;
        Self::from_json(&text, path)
    }

    /// Parses `config.json` text; `path` is only used in error messages.
    pub fn from_json(json: &str, path: &Path) -> Result<Self, ModelError> {
        let bad = |reason: String| ModelError::Config {
            path: path.to_owned(),
            reason,
        };
        let raw: RawConfig = serde_json::from_str(json).map_err(|e| bad(e.to_string()))?;
        if let Some(kind) = &raw.model_type
            && kind != "clip"
        {
            return Err(bad(format!("model_type is {kind:?}, expected \"clip\"")));
        }
        let (Some(t), Some(v)) = (raw.text_config, raw.vision_config) else {
            return Err(bad("needs text_config and vision_config".into()));
        };
        let td = raw.text_config_dict.unwrap_or_default();
        let vd = raw.vision_config_dict.unwrap_or_default();
        let act = |name: Option<String>| -> Result<Activation, ModelError> {
            let name = name.unwrap_or_else(|| "quick_gelu".into());
            Activation::parse(&name).ok_or_else(|| bad(format!("unsupported hidden_act {name:?}")))
        };
        // transformers' defaults for fields a file leaves out.
        let text = ClipTextConfig {
            vocab_size: td.vocab_size.or(t.vocab_size).unwrap_or(49408),
            hidden_size: td.hidden_size.or(t.hidden_size).unwrap_or(512),
            intermediate_size: td.intermediate_size.or(t.intermediate_size).unwrap_or(2048),
            num_hidden_layers: td.num_hidden_layers.or(t.num_hidden_layers).unwrap_or(12),
            num_attention_heads: td
                .num_attention_heads
                .or(t.num_attention_heads)
                .unwrap_or(8),
            max_position_embeddings: td
                .max_position_embeddings
                .or(t.max_position_embeddings)
                .unwrap_or(77),
            hidden_act: act(td.hidden_act.or(t.hidden_act))?,
            layer_norm_eps: td.layer_norm_eps.or(t.layer_norm_eps).unwrap_or(1e-5),
            eos_token_id: td.eos_token_id.or(t.eos_token_id).unwrap_or(49407),
        };
        let vision = ClipVisionConfig {
            hidden_size: vd.hidden_size.or(v.hidden_size).unwrap_or(768),
            intermediate_size: vd.intermediate_size.or(v.intermediate_size).unwrap_or(3072),
            num_hidden_layers: vd.num_hidden_layers.or(v.num_hidden_layers).unwrap_or(12),
            num_attention_heads: vd
                .num_attention_heads
                .or(v.num_attention_heads)
                .unwrap_or(12),
            num_channels: vd.num_channels.or(v.num_channels).unwrap_or(3),
            image_size: vd.image_size.or(v.image_size).unwrap_or(224),
            patch_size: vd.patch_size.or(v.patch_size).unwrap_or(32),
            hidden_act: act(vd.hidden_act.or(v.hidden_act))?,
            layer_norm_eps: vd.layer_norm_eps.or(v.layer_norm_eps).unwrap_or(1e-5),
        };
        let config = Self {
            text,
            vision,
            projection_dim: raw.projection_dim.unwrap_or(512),
        };
        config.validate().map_err(bad)?;
        Ok(config)
    }

    fn validate(&self) -> Result<(), String> {
        let t = &self.text;
        let v = &self.vision;
        let positive = [
            ("text vocab_size", t.vocab_size),
            ("text hidden_size", t.hidden_size),
            ("text intermediate_size", t.intermediate_size),
            ("text num_hidden_layers", t.num_hidden_layers),
            ("text num_attention_heads", t.num_attention_heads),
            ("text max_position_embeddings", t.max_position_embeddings),
            ("vision hidden_size", v.hidden_size),
            ("vision intermediate_size", v.intermediate_size),
            ("vision num_hidden_layers", v.num_hidden_layers),
            ("vision num_attention_heads", v.num_attention_heads),
            ("vision num_channels", v.num_channels),
            ("vision patch_size", v.patch_size),
            ("projection_dim", self.projection_dim),
        ];
        if let Some((name, _)) = positive.iter().find(|(_, value)| *value == 0) {
            return Err(format!("{name} is 0"));
        }
        if !t.hidden_size.is_multiple_of(t.num_attention_heads) {
            return Err("text hidden_size is not a multiple of num_attention_heads".into());
        }
        if !v.hidden_size.is_multiple_of(v.num_attention_heads) {
            return Err("vision hidden_size is not a multiple of num_attention_heads".into());
        }
        if v.image_size < v.patch_size {
            return Err("vision image_size is smaller than patch_size".into());
        }
        if !(t.layer_norm_eps > 0.0 && v.layer_norm_eps > 0.0) {
            return Err("layer_norm_eps must be positive".into());
        }
        Ok(())
    }
}

/// Weights reader that names the file and the tensor in its errors.
struct Weights<'a> {
    vb: VarBuilder<'a>,
    path: &'a Path,
}

impl<'a> Weights<'a> {
    fn pp(&self, prefix: impl ToString) -> Weights<'a> {
        Weights {
            vb: self.vb.pp(prefix),
            path: self.path,
        }
    }

    fn full_name(&self, name: &str) -> String {
        let prefix = self.vb.prefix();
        if prefix.is_empty() {
            name.to_owned()
        } else {
            format!("{prefix}.{name}")
        }
    }

    fn missing(&self, name: &str) -> ModelError {
        ModelError::Weights {
            path: self.path.to_owned(),
            reason: format!("missing tensor {}", self.full_name(name)),
        }
    }

    fn get(&self, shape: impl Into<Shape>, name: &str) -> Result<Tensor, ModelError> {
        if !self.vb.contains_tensor(name) {
            return Err(self.missing(name));
        }
        self.vb.get(shape, name).map_err(|e| ModelError::Weights {
            path: self.path.to_owned(),
            reason: format!("tensor {}: {e}", self.full_name(name)),
        })
    }

    /// A tensor whose shape is checked by the caller.
    fn get_any(&self, name: &str) -> Result<Tensor, ModelError> {
        if !self.vb.contains_tensor(name) {
            return Err(self.missing(name));
        }
        self.vb
            .get_unchecked(name)
            .map_err(|e| ModelError::Weights {
                path: self.path.to_owned(),
                reason: format!("tensor {}: {e}", self.full_name(name)),
            })
    }

    fn linear(&self, inp: usize, out: usize, name: &str) -> Result<Linear, ModelError> {
        let w = self.pp(name);
        Ok(Linear {
            weight: w.get((out, inp), "weight")?,
            bias: Some(w.get(out, "bias")?),
        })
    }

    fn layer_norm(&self, dim: usize, eps: f64, name: &str) -> Result<LayerNorm, ModelError> {
        let w = self.pp(name);
        Ok(LayerNorm::new(
            w.get(dim, "weight")?,
            w.get(dim, "bias")?,
            eps,
        ))
    }
}

/// `y = x Wᵀ + b` over the last dimension, as one 2-D product.
#[derive(Debug, Clone)]
struct Linear {
    weight: Tensor,
    bias: Option<Tensor>,
}

impl Linear {
    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        let dims = x.dims();
        let (&inp, lead) = dims
            .split_last()
            .ok_or_else(|| candle_core::Error::Msg("linear layer on a scalar".into()))?;
        let rows: usize = lead.iter().product();
        let y = x.reshape((rows, inp))?.matmul(&self.weight.t()?)?;
        let y = match &self.bias {
            Some(b) => y.broadcast_add(b)?,
            None => y,
        };
        let mut out = lead.to_vec();
        out.push(self.weight.dim(0)?);
        y.reshape(out)
    }
}

#[derive(Debug, Clone)]
struct Attention {
    qkv: Linear,
    out: Linear,
    heads: usize,
    head_dim: usize,
    scale: f64,
}

impl Attention {
    fn load(w: &Weights, dim: usize, heads: usize) -> Result<Self, ModelError> {
        let q = w.linear(dim, dim, "q_proj")?;
        let k = w.linear(dim, dim, "k_proj")?;
        let v = w.linear(dim, dim, "v_proj")?;
        let bias = |l: &Linear| {
            l.bias
                .clone()
                .ok_or_else(|| candle_core::Error::Msg("attention projection without bias".into()))
        };
        let qkv = Linear {
            weight: Tensor::cat(&[&q.weight, &k.weight, &v.weight], 0)?,
            bias: Some(Tensor::cat(&[bias(&q)?, bias(&k)?, bias(&v)?], 0)?),
        };
        let head_dim = dim / heads;
        Ok(Self {
            qkv,
            out: w.linear(dim, dim, "out_proj")?,
            heads,
            head_dim,
            scale: (head_dim as f64).powf(-0.5),
        })
    }

    fn forward(&self, x: &Tensor, mask: Option<&Tensor>) -> candle_core::Result<Tensor> {
        let (b, n, d) = x.dims3()?;
        let (h, hd) = (self.heads, self.head_dim);
        let qkv = self
            .qkv
            .forward(x)?
            .reshape((b, n, 3, h, hd))?
            .permute((2, 0, 3, 1, 4))?;
        let q = (qkv.i(0)? * self.scale)?.reshape((b * h, n, hd))?;
        let k = qkv.i(1)?.contiguous()?.reshape((b * h, n, hd))?;
        let v = qkv.i(2)?.contiguous()?.reshape((b * h, n, hd))?;
        let scores = q.matmul(&k.t()?)?;
        let scores = match mask {
            Some(m) => scores.broadcast_add(m)?,
            None => scores,
        };
        let probs = candle_nn::ops::softmax_last_dim(&scores)?;
        let ctx = probs
            .matmul(&v)?
            .reshape((b, h, n, hd))?
            .transpose(1, 2)?
            .reshape((b, n, d))?;
        self.out.forward(&ctx)
    }
}

#[derive(Debug, Clone)]
struct EncoderLayer {
    ln1: LayerNorm,
    attn: Attention,
    ln2: LayerNorm,
    fc1: Linear,
    fc2: Linear,
    act: Activation,
}

impl EncoderLayer {
    fn forward(&self, x: &Tensor, mask: Option<&Tensor>) -> candle_core::Result<Tensor> {
        let h = self.attn.forward(&self.ln1.forward(x)?, mask)?;
        let x = (x + h)?;
        let h = self.fc1.forward(&self.ln2.forward(&x)?)?;
        let h = self.fc2.forward(&self.act.apply(&h)?)?;
        x + h
    }
}

#[derive(Debug, Clone)]
struct Encoder {
    layers: Vec<EncoderLayer>,
}

impl Encoder {
    #[allow(clippy::too_many_arguments)]
    fn load(
        w: &Weights,
        dim: usize,
        mlp: usize,
        layers: usize,
        heads: usize,
        eps: f64,
        act: Activation,
    ) -> Result<Self, ModelError> {
        let w = w.pp("layers");
        let layers = (0..layers)
            .map(|i| {
                let l = w.pp(i);
                Ok(EncoderLayer {
                    ln1: l.layer_norm(dim, eps, "layer_norm1")?,
                    attn: Attention::load(&l.pp("self_attn"), dim, heads)?,
                    ln2: l.layer_norm(dim, eps, "layer_norm2")?,
                    fc1: l.pp("mlp").linear(dim, mlp, "fc1")?,
                    fc2: l.pp("mlp").linear(mlp, dim, "fc2")?,
                    act,
                })
            })
            .collect::<Result<_, ModelError>>()?;
        Ok(Self { layers })
    }

    /// Runs the first `upto` layers; `keep(i)` says whether to record
    /// the output of layer `i` (1-based; 0 is the input).
    fn forward(
        &self,
        x: &Tensor,
        mask: Option<&Tensor>,
        upto: usize,
        mut record: impl FnMut(usize, &Tensor),
    ) -> candle_core::Result<Tensor> {
        record(0, x);
        let mut x = x.clone();
        for (i, layer) in self.layers.iter().take(upto).enumerate() {
            x = layer.forward(&x, mask)?;
            record(i + 1, &x);
        }
        Ok(x)
    }
}

#[derive(Debug, Clone)]
struct TextTower {
    token_embedding: Tensor,
    position_embedding: Tensor,
    encoder: Encoder,
    final_ln: LayerNorm,
    projection: Linear,
}

#[derive(Debug, Clone)]
struct VisionTower {
    class_embedding: Tensor,
    /// Patch convolution as a matrix: `[hidden, channels * patch * patch]`.
    patch_weight: Tensor,
    /// `[1 + grid², hidden]`.
    position_embedding: Tensor,
    pre_ln: LayerNorm,
    encoder: Encoder,
    post_ln: LayerNorm,
    projection: Linear,
}

/// Which file a checkpoint folder keeps its weights in.
fn weights_path(dir: &Path) -> Result<PathBuf, ModelError> {
    ["model.safetensors", "pytorch_model.bin"]
        .iter()
        .map(|name| dir.join(name))
        .find(|p| p.is_file())
        .ok_or_else(|| ModelError::MissingFile {
            dir: dir.to_owned(),
            what: "model.safetensors (or pytorch_model.bin)".into(),
        })
}

/// A CLIP model: both towers and both projections, ready for inference.
#[derive(Debug, Clone)]
pub struct ClipModel {
    config: ClipConfig,
    text: TextTower,
    vision: VisionTower,
    logit_scale: Option<f32>,
    device: Device,
}

impl ClipModel {
    /// Loads `config.json` and `model.safetensors` (or `pytorch_model.bin`)
    /// from a checkpoint folder onto `device`.
    pub fn load(dir: &Path, device: &Device) -> Result<Self, ModelError> {
        if !dir.is_dir() {
            return Err(ModelError::MissingFile {
                dir: dir.to_owned(),
                what: "the checkpoint folder itself".into(),
            });
        }
        let config_path = dir.join("config.json");
        if !config_path.is_file() {
            return Err(ModelError::MissingFile {
                dir: dir.to_owned(),
                what: "config.json".into(),
            });
        }
        let config = ClipConfig::from_file(&config_path)?;
        let path = weights_path(dir)?;
        let vb = if path.extension().is_some_and(|e| e == "safetensors") {
            let file = SafetensorsFile::open(&path)?;
            VarBuilder::from_backend(Box::new(file), DType::F32, device.clone())
        } else {
            VarBuilder::from_pth(&path, DType::F32, device).map_err(|e| ModelError::Weights {
                path: path.clone(),
                reason: e.to_string(),
            })?
        };
        Self::from_weights(config, &Weights { vb, path: &path }, device)
    }

    fn from_weights(config: ClipConfig, w: &Weights, device: &Device) -> Result<Self, ModelError> {
        let t = &config.text;
        let v = &config.vision;
        let p = config.projection_dim;

        let tw = w.pp("text_model");
        let text = TextTower {
            token_embedding: tw
                .pp("embeddings.token_embedding")
                .get((t.vocab_size, t.hidden_size), "weight")?,
            position_embedding: tw
                .pp("embeddings.position_embedding")
                .get((t.max_position_embeddings, t.hidden_size), "weight")?,
            encoder: Encoder::load(
                &tw.pp("encoder"),
                t.hidden_size,
                t.intermediate_size,
                t.num_hidden_layers,
                t.num_attention_heads,
                t.layer_norm_eps,
                t.hidden_act,
            )?,
            final_ln: tw.layer_norm(t.hidden_size, t.layer_norm_eps, "final_layer_norm")?,
            projection: Linear {
                weight: w.pp("text_projection").get((p, t.hidden_size), "weight")?,
                bias: None,
            },
        };

        let vw = w.pp("vision_model");
        let grid = v.grid();
        let patch = v.patch_size;
        let emb = vw.pp("embeddings");
        let patch_weight = emb
            .pp("patch_embedding")
            .get((v.hidden_size, v.num_channels, patch, patch), "weight")?
            .reshape((v.hidden_size, v.num_channels * patch * patch))?;
        let vision = VisionTower {
            // transformers would silently draw a random class token here; refuse instead.
            class_embedding: emb.get(v.hidden_size, "class_embedding")?,
            patch_weight,
            position_embedding: emb
                .pp("position_embedding")
                .get((grid * grid + 1, v.hidden_size), "weight")?,
            pre_ln: vw.layer_norm(v.hidden_size, v.layer_norm_eps, "pre_layrnorm")?,
            encoder: Encoder::load(
                &vw.pp("encoder"),
                v.hidden_size,
                v.intermediate_size,
                v.num_hidden_layers,
                v.num_attention_heads,
                v.layer_norm_eps,
                v.hidden_act,
            )?,
            post_ln: vw.layer_norm(v.hidden_size, v.layer_norm_eps, "post_layernorm")?,
            projection: Linear {
                weight: w
                    .pp("visual_projection")
                    .get((p, v.hidden_size), "weight")?,
                bias: None,
            },
        };
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

    // ----- text -----

    /// Projected text embeddings (not normalised), `[n, embed_dim]`.
    ///
    /// `token_ids` is `[n, len]` (`u32` or `i64`, `len` ≤ 77) as produced by
    /// the checkpoint's tokenizer. Each row is pooled at its end token. The
    /// padding after the end token cannot change the result (causal
    /// attention), so it is not computed.
    pub fn encode_text(&self, token_ids: &Tensor) -> Result<Tensor, ModelError> {
        let (n, len) = token_ids.dims2().map_err(|_| {
            ModelError::InvalidInput(format!(
                "token ids must be [n, len], got {:?}",
                token_ids.dims()
            ))
        })?;
        let t = &self.config.text;
        if n == 0 || len == 0 {
            return Err(ModelError::InvalidInput("no token ids".into()));
        }
        if len > t.max_position_embeddings {
            return Err(ModelError::InvalidInput(format!(
                "{len} tokens per sentence, the model takes at most {}",
                t.max_position_embeddings
            )));
        }
        let ids: Vec<Vec<i64>> = token_ids
            .to_device(&Device::Cpu)?
            .to_dtype(DType::I64)?
            .to_vec2::<i64>()?;
        if let Some(bad) = ids
            .iter()
            .flatten()
            .find(|&&id| id < 0 || id as usize >= t.vocab_size)
        {
            return Err(ModelError::InvalidInput(format!(
                "token id {bad} is outside the vocabulary of {}",
                t.vocab_size
            )));
        }
        let pools: Vec<usize> = ids.iter().map(|row| self.pool_index(row)).collect();
        // Short sentences together, each chunk cut after its longest one.
        let mut order: Vec<usize> = (0..n).collect();
        order.sort_by_key(|&i| pools[i]);
        let mut parts = Vec::new();
        for chunk in order.chunks(TEXT_BATCH) {
            let keep = chunk.iter().map(|&i| pools[i]).max().unwrap_or(0) + 1;
            let flat: Vec<u32> = chunk
                .iter()
                .flat_map(|&i| ids[i][..keep].iter().map(|&id| id as u32))
                .collect();
            let chunk_pools: Vec<usize> = chunk.iter().map(|&i| pools[i]).collect();
            parts.push(self.text_chunk(&flat, chunk.len(), keep, &chunk_pools)?);
        }
        let sorted = Tensor::cat(&parts, 0)?;
        Ok(unsort(&sorted, &order, &self.device)?)
    }

    /// Row position transformers pools the text at.
    fn pool_index(&self, row: &[i64]) -> usize {
        if self.config.text.eos_token_id == 2 {
            // Legacy OpenAI configs: the end token has the largest id (first one wins).
            let mut best = 0;
            for (i, &id) in row.iter().enumerate() {
                if id > row[best] {
                    best = i;
                }
            }
            best
        } else {
            row.iter()
                .position(|&id| id == self.config.text.eos_token_id)
                .unwrap_or(0)
        }
    }

    fn text_chunk(
        &self,
        ids: &[u32],
        n: usize,
        len: usize,
        pools: &[usize],
    ) -> Result<Tensor, ModelError> {
        let tt = &self.text;
        let d = self.config.text.hidden_size;
        let ids = Tensor::from_slice(ids, n * len, &self.device)?;
        let x = tt
            .token_embedding
            .index_select(&ids, 0)?
            .reshape((n, len, d))?
            .broadcast_add(&tt.position_embedding.narrow(0, 0, len)?)?;
        let mask = causal_mask(len, &self.device)?;
        let x = tt.encoder.forward(&x, Some(&mask), usize::MAX, |_, _| {})?;
        let rows: Vec<u32> = pools
            .iter()
            .enumerate()
            .map(|(b, &p)| (b * len + p) as u32)
            .collect();
        let rows = Tensor::from_vec(rows, n, &self.device)?;
        let pooled = x.reshape((n * len, d))?.index_select(&rows, 0)?;
        let pooled = tt.final_ln.forward(&pooled)?;
        Ok(tt.projection.forward(&pooled)?)
    }

    // ----- vision -----

    fn check_pixels(&self, pixels: &Tensor) -> Result<(usize, usize, usize), ModelError> {
        let v = &self.config.vision;
        let (b, c, h, w) = pixels.dims4().map_err(|_| {
            ModelError::InvalidInput(format!(
                "pixels must be [batch, channels, height, width], got {:?}",
                pixels.dims()
            ))
        })?;
        if b == 0 {
            return Err(ModelError::InvalidInput("empty image batch".into()));
        }
        if c != v.num_channels {
            return Err(ModelError::InvalidInput(format!(
                "{c} channels, the model takes {}",
                v.num_channels
            )));
        }
        if h < v.patch_size || w < v.patch_size {
            return Err(ModelError::InvalidInput(format!(
                "{h}x{w} input is smaller than one {0}x{0} patch",
                v.patch_size
            )));
        }
        Ok((b, h, w))
    }

    /// Position embeddings for a `rows × cols` grid, `[1 + rows*cols, hidden]`.
    fn position_embeddings(&self, rows: usize, cols: usize) -> Result<Tensor, ModelError> {
        let g = self.config.vision.grid();
        let pos = &self.vision.position_embedding;
        if (rows, cols) == (g, g) {
            return Ok(pos.clone());
        }
        let d = self.config.vision.hidden_size;
        let table = pos
            .to_device(&Device::Cpu)?
            .to_dtype(DType::F32)?
            .to_vec2::<f32>()?;
        let mut out = Vec::with_capacity((1 + rows * cols) * d);
        if let Some(cls) = table.first() {
            out.extend_from_slice(cls);
        }
        let patches = &table[1..];
        let wy = cubic_taps(g, rows);
        let wx = cubic_taps(g, cols);
        let mut row_mix = vec![0f64; g * d];
        for (ty, ky) in &wy {
            // Interpolate along y first: one source row per grid column.
            row_mix.iter_mut().for_each(|v| *v = 0.0);
            for (k, &sy) in ty.iter().enumerate() {
                for sx in 0..g {
                    let src = &patches[sy * g + sx];
                    let dst = &mut row_mix[sx * d..(sx + 1) * d];
                    for (o, &s) in dst.iter_mut().zip(src) {
                        *o += ky[k] * f64::from(s);
                    }
                }
            }
            for (tx, kx) in &wx {
                let mut acc = vec![0f64; d];
                for (k, &sx) in tx.iter().enumerate() {
                    for (a, &s) in acc.iter_mut().zip(&row_mix[sx * d..(sx + 1) * d]) {
                        *a += kx[k] * s;
                    }
                }
                out.extend(acc.iter().map(|&v| v as f32));
            }
        }
        Ok(Tensor::from_vec(out, (1 + rows * cols, d), &self.device)?)
    }

    /// Tokens entering the encoder: class + patches, position embeddings
    /// added, pre-layernormed; `[batch, 1 + rows*cols, hidden]`.
    fn embed(&self, pixels: &Tensor) -> Result<(Tensor, (usize, usize)), ModelError> {
        let (b, h, w) = self.check_pixels(pixels)?;
        let v = &self.config.vision;
        let p = v.patch_size;
        let (rows, cols) = self.grid(h, w);
        let c = v.num_channels;
        let d = v.hidden_size;
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
            .matmul(&self.vision.patch_weight.t()?)?
            .reshape((b, rows * cols, d))?;
        let cls = self
            .vision
            .class_embedding
            .reshape((1, 1, d))?
            .broadcast_as((b, 1, d))?;
        let tokens = Tensor::cat(&[&cls, &patches], 1)?
            .broadcast_add(&self.position_embeddings(rows, cols)?)?;
        Ok((self.vision.pre_ln.forward(&tokens)?, (rows, cols)))
    }

    /// Post-layernorm then projection of `[.., hidden]` tokens.
    fn project_tokens(&self, tokens: &Tensor) -> Result<Tensor, ModelError> {
        let normed = self.vision.post_ln.forward(&tokens.contiguous()?)?;
        Ok(self.vision.projection.forward(&normed)?)
    }

    /// Projected image embeddings (not normalised), `[batch, embed_dim]`,
    /// from normalised pixels `[batch, 3, H, W]` (see [`ClipModel::preprocessor`]).
    pub fn encode_image(&self, pixels: &Tensor) -> Result<Tensor, ModelError> {
        let (tokens, _) = self.embed(pixels)?;
        let out = self
            .vision
            .encoder
            .forward(&tokens, None, usize::MAX, |_, _| {})?;
        self.project_tokens(&out.i((.., 0, ..))?)
    }

    /// Every patch token of the last layer, post-layernormed and projected
    /// into the joint space, `[batch, rows*cols, embed_dim]` (row-major grid).
    pub fn encode_patches(&self, pixels: &Tensor) -> Result<Tensor, ModelError> {
        Ok(self.encode_image_and_patches(pixels)?.1)
    }

    /// [`ClipModel::encode_image`] and [`ClipModel::encode_patches`] from one forward pass.
    pub fn encode_image_and_patches(
        &self,
        pixels: &Tensor,
    ) -> Result<(Tensor, Tensor), ModelError> {
        let (tokens, _) = self.embed(pixels)?;
        let out = self
            .vision
            .encoder
            .forward(&tokens, None, usize::MAX, |_, _| {})?;
        let projected = self.project_tokens(&out)?;
        let n = projected.dim(1)?;
        Ok((
            projected.i((.., 0, ..))?.contiguous()?,
            projected.narrow(1, 1, n - 1)?.contiguous()?,
        ))
    }

    /// Raw tokens of the chosen layers, each `[batch, 1 + rows*cols, hidden]`
    /// (class token first), numbered as `transformers`' `hidden_states`:
    /// 0 is the embeddings after the pre-layernorm, `i` the output of layer
    /// `i`, up to `num_hidden_layers`. Nothing is post-layernormed. Only the
    /// layers up to the deepest one asked for are run.
    pub fn vision_hidden_states(
        &self,
        pixels: &Tensor,
        layers: &[usize],
    ) -> Result<Vec<Tensor>, ModelError> {
        let depth = self.config.vision.num_hidden_layers;
        if let Some(bad) = layers.iter().find(|&&l| l > depth) {
            return Err(ModelError::InvalidInput(format!(
                "layer {bad} asked for; the vision tower has hidden states 0..={depth}"
            )));
        }
        let (tokens, _) = self.embed(pixels)?;
        let upto = layers.iter().copied().max().unwrap_or(0);
        let mut found: Vec<Option<Tensor>> = vec![None; layers.len()];
        self.vision.encoder.forward(&tokens, None, upto, |i, x| {
            for (slot, &l) in found.iter_mut().zip(layers) {
                if l == i {
                    *slot = Some(x.clone());
                }
            }
        })?;
        found
            .into_iter()
            .map(|t| t.ok_or_else(|| ModelError::InvalidInput("hidden state not produced".into())))
            .collect()
    }

    /// WinCLIP's windowed forward for one image (`pixels` is `[1, 3, H, W]`):
    /// for each window — a list of patch indices, row-major in the
    /// [`ClipModel::grid`] — the class token and those patch tokens, with
    /// their position embeddings, go through the whole transformer alone;
    /// the class output is post-layernormed and projected. Returns
    /// `[windows.len(), embed_dim]` (not normalised). Windows of equal size
    /// are batched together; see [`sliding_windows`].
    pub fn encode_windows(
        &self,
        pixels: &Tensor,
        windows: &[Vec<usize>],
    ) -> Result<Tensor, ModelError> {
        let (b, _, _) = self.check_pixels(pixels)?;
        if b != 1 {
            return Err(ModelError::InvalidInput(format!(
                "encode_windows takes one image, got {b}"
            )));
        }
        if windows.is_empty() {
            return Err(ModelError::InvalidInput("no window".into()));
        }
        let (tokens, (rows, cols)) = self.embed(pixels)?;
        let n_patches = rows * cols;
        for (i, w) in windows.iter().enumerate() {
            if w.is_empty() {
                return Err(ModelError::InvalidInput(format!("window {i} is empty")));
            }
            if let Some(p) = w.iter().find(|&&p| p >= n_patches) {
                return Err(ModelError::InvalidInput(format!(
                    "window {i} holds patch {p}; the grid is {rows}x{cols}"
                )));
            }
        }
        let tokens = tokens.squeeze(0)?;
        let d = self.config.vision.hidden_size;
        // Group by window size, keeping the original order within a group.
        let mut order: Vec<usize> = (0..windows.len()).collect();
        order.sort_by_key(|&i| windows[i].len());
        let mut parts = Vec::new();
        let mut start = 0;
        while start < order.len() {
            let len = windows[order[start]].len() + 1;
            let per_batch = (WINDOW_BATCH_TOKENS / len).max(1);
            let mut end = start;
            while end < order.len()
                && end - start < per_batch
                && windows[order[end]].len() + 1 == len
            {
                end += 1;
            }
            let chunk = &order[start..end];
            let index: Vec<u32> = chunk
                .iter()
                .flat_map(|&i| {
                    std::iter::once(0u32).chain(windows[i].iter().map(|&p| p as u32 + 1))
                })
                .collect();
            let index = Tensor::from_vec(index, chunk.len() * len, &self.device)?;
            let x = tokens
                .index_select(&index, 0)?
                .reshape((chunk.len(), len, d))?;
            let out = self
                .vision
                .encoder
                .forward(&x, None, usize::MAX, |_, _| {})?;
            parts.push(self.project_tokens(&out.i((.., 0, ..))?)?);
            start = end;
        }
        let sorted = Tensor::cat(&parts, 0)?;
        Ok(unsort(&sorted, &order, &self.device)?)
    }
}

/// All `size × size` windows of a `rows × cols` patch grid at `stride`,
/// row-major, each as row-major patch indices (WinCLIP's sliding windows).
pub fn sliding_windows(rows: usize, cols: usize, size: usize, stride: usize) -> Vec<Vec<usize>> {
    if size == 0 || stride == 0 || size > rows || size > cols {
        return Vec::new();
    }
    let mut out = Vec::new();
    for top in (0..=rows - size).step_by(stride) {
        for left in (0..=cols - size).step_by(stride) {
            out.push(
                (0..size)
                    .flat_map(|r| (0..size).map(move |c| (top + r) * cols + left + c))
                    .collect(),
            );
        }
    }
    out
}

/// Puts rows computed in `order` back in their original places.
fn unsort(sorted: &Tensor, order: &[usize], device: &Device) -> candle_core::Result<Tensor> {
    let mut inverse = vec![0u32; order.len()];
    for (pos, &orig) in order.iter().enumerate() {
        inverse[orig] = pos as u32;
    }
    sorted.index_select(&Tensor::from_vec(inverse, order.len(), device)?, 0)
}

fn causal_mask(len: usize, device: &Device) -> candle_core::Result<Tensor> {
    let mask: Vec<f32> = (0..len)
        .flat_map(|i| (0..len).map(move |j| if j > i { f32::NEG_INFINITY } else { 0.0 }))
        .collect();
    Tensor::from_vec(mask, (len, len), device)
}

/// PyTorch's bicubic interpolation weights (`align_corners=False`, A = -0.75):
/// for each output index, four clamped source indices and their weights.
fn cubic_taps(in_size: usize, out_size: usize) -> Vec<([usize; 4], [f64; 4])> {
    const A: f64 = -0.75;
    let near = |x: f64| ((A + 2.0) * x - (A + 3.0)) * x * x + 1.0;
    let far = |x: f64| ((A * x - 5.0 * A) * x + 8.0 * A) * x - 4.0 * A;
    let scale = in_size as f64 / out_size as f64;
    let last = in_size as i64 - 1;
    (0..out_size)
        .map(|i| {
            let src = (i as f64 + 0.5) * scale - 0.5;
            let base = src.floor();
            let t = src - base;
            let base = base as i64;
            let idx = [base - 1, base, base + 1, base + 2].map(|j| j.clamp(0, last) as usize);
            (idx, [far(t + 1.0), near(t), near(1.0 - t), far(2.0 - t)])
        })
        .collect()
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

    #[test]
    fn sliding_windows_cover_the_grid() {
        let w = sliding_windows(14, 14, 2, 1);
        assert_eq!(w.len(), 169);
        assert_eq!(w[0], vec![0, 1, 14, 15]);
        assert_eq!(sliding_windows(14, 14, 3, 1).len(), 144);
        assert_eq!(
            sliding_windows(4, 6, 2, 2),
            vec![
                vec![0, 1, 6, 7],
                vec![2, 3, 8, 9],
                vec![4, 5, 10, 11],
                vec![12, 13, 18, 19],
                vec![14, 15, 20, 21],
                vec![16, 17, 22, 23],
            ]
        );
        assert!(sliding_windows(2, 2, 3, 1).is_empty());
        assert!(sliding_windows(2, 2, 1, 0).is_empty());
    }

    #[test]
    fn cubic_taps_are_identity_at_the_same_size() {
        for (idx, w) in cubic_taps(5, 5) {
            let sum: f64 = w.iter().sum();
            assert!((sum - 1.0).abs() < 1e-12);
            assert!((w[1] - 1.0).abs() < 1e-12, "{idx:?} {w:?}");
        }
    }

    #[test]
    fn config_reads_openai_layout() {
        // The shape of OpenAI's config.json files: full text/vision configs,
        // partial *_config_dict overrides, legacy token ids.
        let json = r#"{
            "architectures": ["CLIPModel"], "model_type": "clip", "projection_dim": 768,
            "text_config": {"hidden_size": 512, "eos_token_id": 2, "hidden_act": "quick_gelu",
                            "max_position_embeddings": 77, "vocab_size": 49408},
            "text_config_dict": {"hidden_size": 768, "intermediate_size": 3072,
                                 "num_attention_heads": 12, "num_hidden_layers": 12},
            "vision_config": {"hidden_size": 1024, "image_size": 336, "patch_size": 14,
                              "intermediate_size": 4096, "num_attention_heads": 16,
                              "num_hidden_layers": 24},
            "vision_config_dict": null
        }"#;
        let c = ClipConfig::from_json(json, Path::new("config.json")).unwrap();
        assert_eq!(c.projection_dim, 768);
        assert_eq!(c.text.hidden_size, 768);
        assert_eq!(c.text.num_hidden_layers, 12);
        assert_eq!(c.text.eos_token_id, 2);
        assert_eq!(c.vision.grid(), 24);
        assert_eq!(c.vision.hidden_act, Activation::QuickGelu);
        assert!((c.vision.layer_norm_eps - 1e-5).abs() < 1e-12);
    }

    #[test]
    fn config_errors_are_specific() {
        let p = Path::new("config.json");
        let err = |json: &str| ClipConfig::from_json(json, p).unwrap_err().to_string();
        assert!(err("{").contains("invalid model config"));
        assert!(
            err(r#"{"model_type": "siglip", "text_config": {}, "vision_config": {}}"#)
                .contains("siglip")
        );
        assert!(err(r#"{"text_config": {}}"#).contains("vision_config"));
        assert!(
            err(r#"{"text_config": {"hidden_act": "relu"}, "vision_config": {}}"#).contains("relu")
        );
        assert!(
            err(r#"{"text_config": {}, "vision_config": {"num_attention_heads": 5}}"#)
                .contains("multiple")
        );
    }
}
