//! A CLIP checkpoint's architecture, read from its `config.json` with
//! `transformers`' defaults for the fields a file leaves out.

use std::path::Path;

use candle_core::Tensor;
use serde::Deserialize;

use crate::ModelError;

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
    pub(crate) fn parse(name: &str) -> Option<Self> {
        match name {
            "quick_gelu" => Some(Self::QuickGelu),
            "gelu" => Some(Self::Gelu),
            "gelu_new" | "gelu_pytorch_tanh" => Some(Self::GeluTanh),
            _ => None,
        }
    }

    pub(crate) fn apply(self, x: &Tensor) -> candle_core::Result<Tensor> {
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

#[cfg(test)]
mod tests {
    use super::*;

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
