//! A DINOv2 checkpoint's architecture, read from its `config.json` with
//! `transformers`' defaults (`Dinov2Config`) for the fields a file leaves out.

use std::path::Path;

use serde::Deserialize;

use crate::ModelError;
use crate::clip::Activation;

/// Architecture of a `Dinov2Model`.
#[derive(Debug, Clone, PartialEq)]
pub struct Dinov2Config {
    /// Width of the transformer (384 for ViT-S/14, 768 for ViT-B/14).
    pub hidden_size: usize,
    /// Width of the MLP (`hidden_size · mlp_ratio`).
    pub intermediate_size: usize,
    /// Number of encoder layers.
    pub num_hidden_layers: usize,
    /// Number of attention heads.
    pub num_attention_heads: usize,
    /// Input channels (3).
    pub num_channels: usize,
    /// Side of the square training input (518 for the released checkpoints).
    pub image_size: usize,
    /// Side of a square patch (14).
    pub patch_size: usize,
    /// MLP non-linearity.
    pub hidden_act: Activation,
    /// Layer-norm epsilon.
    pub layer_norm_eps: f64,
}

#[derive(Debug, Deserialize)]
struct Raw {
    model_type: Option<String>,
    hidden_size: Option<usize>,
    num_hidden_layers: Option<usize>,
    num_attention_heads: Option<usize>,
    mlp_ratio: Option<f64>,
    hidden_act: Option<String>,
    layer_norm_eps: Option<f64>,
    image_size: Option<usize>,
    patch_size: Option<usize>,
    num_channels: Option<usize>,
    qkv_bias: Option<bool>,
    use_swiglu_ffn: Option<bool>,
    num_register_tokens: Option<usize>,
}

/// Largest accepted width, depth and patch (ViT-g/14 is 1536 wide, 40 deep).
const MAX_DIM: usize = 8192;

impl Dinov2Config {
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
        let raw: Raw = serde_json::from_str(json).map_err(|e| bad(e.to_string()))?;
        match raw.model_type.as_deref() {
            Some("dinov2") | None => {}
            Some("dinov2_with_registers") => {
                return Err(bad(
                    "model_type is \"dinov2_with_registers\": register tokens are not supported \
                     yet; use facebook/dinov2-small or facebook/dinov2-base"
                        .into(),
                ));
            }
            Some(kind) => return Err(bad(format!("model_type is {kind:?}, expected \"dinov2\""))),
        }
        if raw.num_register_tokens.is_some_and(|n| n > 0) {
            return Err(bad("register tokens are not supported yet".into()));
        }
        if raw.use_swiglu_ffn == Some(true) {
            return Err(bad(
                "use_swiglu_ffn (the ViT-g/14 MLP) is not supported; use dinov2-small, -base or -large"
                    .into(),
            ));
        }
        if raw.qkv_bias == Some(false) {
            return Err(bad("qkv_bias = false is not supported".into()));
        }
        let name = raw.hidden_act.unwrap_or_else(|| "gelu".into());
        let hidden_act = Activation::parse(&name)
            .ok_or_else(|| bad(format!("unsupported hidden_act {name:?}")))?;
        let hidden_size = raw.hidden_size.unwrap_or(768);
        let mlp_ratio = raw.mlp_ratio.unwrap_or(4.0);
        if !(mlp_ratio > 0.0 && mlp_ratio <= 16.0) {
            return Err(bad(format!("mlp_ratio {mlp_ratio} is not in (0, 16]")));
        }
        let config = Self {
            hidden_size,
            // As transformers: int(hidden_size * mlp_ratio).
            intermediate_size: (hidden_size as f64 * mlp_ratio) as usize,
            num_hidden_layers: raw.num_hidden_layers.unwrap_or(12),
            num_attention_heads: raw.num_attention_heads.unwrap_or(12),
            num_channels: raw.num_channels.unwrap_or(3),
            image_size: raw.image_size.unwrap_or(224),
            patch_size: raw.patch_size.unwrap_or(14),
            hidden_act,
            layer_norm_eps: raw.layer_norm_eps.unwrap_or(1e-6),
        };
        config.validate().map_err(bad)?;
        Ok(config)
    }

    fn validate(&self) -> Result<(), String> {
        let sizes = [
            ("hidden_size", self.hidden_size),
            ("intermediate_size", self.intermediate_size),
            ("num_hidden_layers", self.num_hidden_layers),
            ("num_attention_heads", self.num_attention_heads),
            ("num_channels", self.num_channels),
            ("patch_size", self.patch_size),
        ];
        if let Some((name, _)) = sizes.iter().find(|(_, v)| *v == 0) {
            return Err(format!("{name} is 0"));
        }
        if let Some((name, v)) = sizes.iter().find(|(_, v)| *v > MAX_DIM * 8) {
            return Err(format!("{name} {v} is implausibly large"));
        }
        if !self.hidden_size.is_multiple_of(self.num_attention_heads) {
            return Err("hidden_size is not a multiple of num_attention_heads".into());
        }
        if self.layer_norm_eps.is_nan() || self.layer_norm_eps <= 0.0 {
            return Err("layer_norm_eps must be positive".into());
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_the_released_layout() {
        // The fields of facebook/dinov2-small's config.json.
        let json = r#"{"architectures": ["Dinov2Model"], "attention_probs_dropout_prob": 0.0,
            "drop_path_rate": 0.0, "hidden_act": "gelu", "hidden_dropout_prob": 0.0,
            "hidden_size": 384, "image_size": 518, "initializer_range": 0.02,
            "layer_norm_eps": 1e-06, "layerscale_value": 1.0, "mlp_ratio": 4,
            "model_type": "dinov2", "num_attention_heads": 6, "num_channels": 3,
            "num_hidden_layers": 12, "patch_size": 14, "qkv_bias": true,
            "torch_dtype": "float32", "use_swiglu_ffn": false}"#;
        let c = Dinov2Config::from_json(json, Path::new("config.json")).unwrap();
        assert_eq!(c.hidden_size, 384);
        assert_eq!(c.intermediate_size, 1536);
        assert_eq!(c.num_hidden_layers, 12);
        assert_eq!(c.patch_size, 14);
        assert_eq!(c.hidden_act, Activation::Gelu);
    }

    #[test]
    fn refuses_what_it_cannot_run() {
        let p = Path::new("config.json");
        let err = |json: &str| Dinov2Config::from_json(json, p).unwrap_err().to_string();
        assert!(err("{").contains("invalid model config"));
        assert!(err(r#"{"model_type": "clip"}"#).contains("clip"));
        assert!(err(r#"{"model_type": "dinov2_with_registers"}"#).contains("register"));
        assert!(err(r#"{"use_swiglu_ffn": true}"#).contains("swiglu"));
        assert!(err(r#"{"num_attention_heads": 5}"#).contains("multiple"));
        assert!(err(r#"{"patch_size": 0}"#).contains("patch_size is 0"));
    }
}
