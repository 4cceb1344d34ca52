//! Pretrained networks that turn an image into features.
//!
//! Each backbone loads real weights from safetensors, owns its preprocessing,
//! and returns its intermediate stages by name so a detector can pick the ones
//! it needs. Nothing here knows about anomalies.

mod bf16_gemm;
mod block;
pub mod checkpoint;
pub mod clip;
pub mod clip_weights;
pub mod depthwise;
pub mod dinov2;
pub mod efficientnet;
pub mod error;
pub mod i8_product;
mod pointwise;
mod pointwise_bf16;
pub mod resample;
pub mod simd;

/// The tensor library the models run on, re-exported so callers use the
/// same version.
pub use candle_core;
pub use clip::Precision;
pub use efficientnet::{EfficientNetLite, LiteVariant, Preprocess, Stage};
pub use error::ModelError;
