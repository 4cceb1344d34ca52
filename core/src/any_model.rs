//! Any model file, whatever made it: the classical [`Inspector`]
//! (EfficientNet features + PatchCore / PaDiM / flow / autoencoder) or a
//! WinCLIP model ([`WinClipModel`]), behind one `inspect` call.
//!
//! The kind is read from the model file's metadata (`detector.kind`) before
//! the file is loaded, so callers (CLI, server, TUI) need not know it.

use std::io::Read;
use std::path::Path;

use candle_core::Device;
use flawscope_models::clip_weights::WeightsLookup;
use image::Rgb32FImage;

use crate::Error;
use crate::inspector::{Inspection, Inspector};
use crate::winclip::{DETECTOR_KIND, WinClipModel};

/// Largest safetensors header read to find a model's kind.
const MAX_HEADER: u64 = 100 * 1024 * 1024;

/// A loaded model of either family.
pub enum AnyModel {
    /// A fitted [`Inspector`].
    Classical(Inspector),
    /// A zero-shot or few-shot WinCLIP model.
    WinClip(WinClipModel),
}

impl std::fmt::Debug for AnyModel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Classical(m) => f.debug_tuple("Classical").field(m.info()).finish(),
            Self::WinClip(m) => f.debug_tuple("WinClip").field(m.info()).finish(),
        }
    }
}

impl AnyModel {
    /// Loads a model file of either kind. WinCLIP files find their CLIP
    /// weights through `lookup` (see
    /// [`WinClip::for_checkpoint`](crate::winclip::WinClip::for_checkpoint)).
    pub fn load(path: &Path, device: &Device, lookup: &WeightsLookup) -> Result<Self, Error> {
        if detector_kind(path).as_deref() == Some(DETECTOR_KIND) {
            Ok(Self::WinClip(WinClipModel::load(path, device, lookup)?))
        } else {
            // Unreadable headers too: the inspector's loader says what is wrong.
            Ok(Self::Classical(Inspector::load(path, device)?))
        }
    }

    /// Scores one image.
    pub fn inspect(&self, image: &Rgb32FImage) -> Result<Inspection, Error> {
        match self {
            Self::Classical(m) => m.inspect(image),
            Self::WinClip(m) => m.inspect(image),
        }
    }

    /// The detector's name (`patchcore`, `padim`, `flow`, `recon`, `winclip`).
    pub fn detector_name(&self) -> &str {
        match self {
            Self::Classical(m) => m.info().detector.name(),
            Self::WinClip(_) => DETECTOR_KIND,
        }
    }
}

/// The `detector.kind` in a model file's metadata, read from the header
/// alone; `None` when the file is not a readable model file.
pub fn detector_kind(path: &Path) -> Option<String> {
    let mut file = std::fs::File::open(path).ok()?;
    let mut len = [0u8; 8];
    file.read_exact(&mut len).ok()?;
    let len = u64::from_le_bytes(len);
    if len > MAX_HEADER {
        return None;
    }
    let mut header = Vec::new();
    file.take(len).read_to_end(&mut header).ok()?;
    let header: serde_json::Value = serde_json::from_slice(&header).ok()?;
    let metadata = header.get("__metadata__")?.get("flawscope")?.as_str()?;
    let metadata: serde_json::Value = serde_json::from_str(metadata).ok()?;
    Some(metadata.pointer("/detector/kind")?.as_str()?.to_owned())
}
