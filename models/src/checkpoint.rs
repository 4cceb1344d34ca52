//! What the Hugging Face checkpoints (CLIP, DINOv2) share: the folder
//! layout (`config.json` beside `model.safetensors` or `pytorch_model.bin`)
//! and the checks on the pixels a vision tower is given.

use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use candle_nn::VarBuilder;

use crate::ModelError;
use crate::clip::weights_file::SafetensorsFile;

/// The weight file of a checkpoint folder (safetensors preferred).
pub fn weights_path(dir: &Path) -> Result<PathBuf, ModelError> {
    ["model.safetensors", "pytorch_model.bin"]
        .iter()
        .map(|name| dir.join(name))
        .find(|p| p.is_file())
        .ok_or_else(|| ModelError::MissingFile {
            dir: dir.to_owned(),
            what: "model.safetensors (or pytorch_model.bin)".into(),
        })
}

/// A checkpoint folder opened: its `config.json`, its weight file, and a
/// reader of the weights onto `device`.
pub(crate) struct Checkpoint {
    pub config: PathBuf,
    pub weights: PathBuf,
    pub vb: VarBuilder<'static>,
}

impl Checkpoint {
    pub(crate) fn open(dir: &Path, device: &Device) -> Result<Self, ModelError> {
        if !dir.is_dir() {
            return Err(ModelError::MissingFile {
                dir: dir.to_owned(),
                what: "the checkpoint folder itself".into(),
            });
        }
        let config = dir.join("config.json");
        if !config.is_file() {
            return Err(ModelError::MissingFile {
                dir: dir.to_owned(),
                what: "config.json".into(),
            });
        }
        let weights = weights_path(dir)?;
        let vb = if weights.extension().is_some_and(|e| e == "safetensors") {
            let file = SafetensorsFile::open(&weights)?;
            VarBuilder::from_backend(Box::new(file), DType::F32, device.clone())
        } else {
            VarBuilder::from_pth(&weights, DType::F32, device).map_err(|e| ModelError::Weights {
                path: weights.clone(),
                reason: e.to_string(),
            })?
        };
        Ok(Self {
            config,
            weights,
            vb,
        })
    }
}

/// `(batch, height, width)` of `pixels`, checked to be a non-empty
/// `[batch, channels, height, width]` batch at least one patch in size.
pub(crate) fn check_pixels(
    pixels: &Tensor,
    channels: usize,
    patch: usize,
) -> Result<(usize, usize, usize), ModelError> {
    let (b, c, h, w) = pixels.dims4().map_err(|_| {
        ModelError::InvalidInput(format!(
            "pixels must be [batch, channels, height, width], got {:?}",
            pixels.dims()
        ))
    })?;
    if b == 0 {
        return Err(ModelError::InvalidInput("empty image batch".into()));
    }
    if c != channels {
        return Err(ModelError::InvalidInput(format!(
            "{c} channels, the model takes {channels}"
        )));
    }
    if h < patch || w < patch {
        return Err(ModelError::InvalidInput(format!(
            "{h}x{w} input is smaller than one {patch}x{patch} patch"
        )));
    }
    Ok((b, h, w))
}
