//! Errors of the model crate.

use std::path::PathBuf;

/// Everything that can go wrong loading or running a backbone.
#[derive(Debug, thiserror::Error)]
pub enum ModelError {
    /// A file could not be read.
    #[error("cannot read {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// A weights file exists but cannot be used.
    #[error("unusable weights file {path}: {reason}")]
    Weights { path: PathBuf, reason: String },
    /// The bytes are not a valid safetensors file (truncated, bad header...).
    #[error("invalid safetensors weights: {0}")]
    InvalidWeights(String),
    /// A tensor the network needs is not in the weights.
    #[error("weights have no tensor `{name}` (wrong model or variant?)")]
    MissingTensor { name: String },
    /// A tensor has a different shape than the network expects.
    #[error("weight `{name}` has shape {found:?}, expected {expected:?} (wrong model or variant?)")]
    ShapeMismatch {
        name: String,
        expected: Vec<usize>,
        found: Vec<usize>,
    },
    /// A tensor holds non-finite values or a batch-norm variance is negative.
    #[error("weight `{name}` is invalid: {reason}")]
    BadWeight { name: String, reason: String },
    /// The input tensor or image cannot be fed to the network.
    #[error("invalid input: {0}")]
    InvalidInput(String),
    /// A stage name that does not exist.
    #[error("unknown stage `{0}` (expected stem, stage1..stage7 or head)")]
    UnknownStage(String),
    /// A required file of a checkpoint folder is absent (CLIP).
    #[error("{}: missing {what}", dir.display())]
    MissingFile { dir: PathBuf, what: String },
    /// A checkpoint's `config.json` is unreadable, not JSON, or not a usable config (CLIP).
    #[error("{}: invalid model config: {reason}", path.display())]
    Config { path: PathBuf, reason: String },
    /// No CLIP checkpoint was found locally and none could be downloaded.
    /// The CLI maps this to exit code 2.
    #[error(
        "no CLIP weights for {model}: pass --clip-weights DIR or set FLAWSCOPE_CLIP_WEIGHTS \
         to a folder holding config.json, tokenizer.json and model.safetensors \
         (searched: {searched}; {reason})"
    )]
    NoClipWeights {
        /// The preset, e.g. `ViT-B/16 (openai/clip-vit-base-patch16)`.
        model: String,
        /// The places that were searched.
        searched: String,
        /// Why nothing was downloaded.
        reason: String,
    },
    /// An error from the tensor library while running the network.
    #[error("tensor operation failed: {0}")]
    Candle(#[from] candle_core::Error),
}

/// Result with [`ModelError`].
pub type Result<T, E = ModelError> = std::result::Result<T, E>;
