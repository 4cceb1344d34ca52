//! Which CLIP checkpoint a WinCLIP model was made with, and how to tell
//! one checkpoint from another (the SHA-256 of its `config.json`).

use std::path::{Path, PathBuf};

use flawscope_models::ModelError;
use flawscope_models::clip_weights::WeightsSource;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::Error;

/// Which CLIP checkpoint a WinCLIP model was made with.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClipCheckpoint {
    /// Preset the weights were resolved for (`ViT-B/16`).
    pub preset: String,
    /// Hub repository and pinned commit of the preset, when it is a known one.
    pub repo: Option<String>,
    /// Folder the weights were loaded from.
    pub dir: PathBuf,
    /// How that folder was found: `flag`, `env`, `hub-cache`, `download` or `model-file`.
    pub source: String,
    /// SHA-256 of the folder's `config.json`.
    pub config_sha256: String,
}

impl ClipCheckpoint {
    /// A short name for reports: the preset, plus the folder name when the
    /// weights came from a folder given by hand (`ViT-B/16@tiny_clip`).
    pub fn label(&self) -> String {
        match self.source.as_str() {
            "hub-cache" | "download" => self.preset.clone(),
            _ => match self.dir.file_name() {
                Some(name) => format!("{}@{}", self.preset, name.to_string_lossy()),
                None => self.preset.clone(),
            },
        }
    }

    /// Key of these weights in a [`TextEmbeddingCache`].
    pub fn cache_id(&self) -> String {
        format!(
            "{}|{}|{}",
            self.repo.as_deref().unwrap_or(&self.preset),
            self.dir.display(),
            self.config_sha256
        )
    }
}

pub(crate) fn source_name(source: WeightsSource) -> &'static str {
    match source {
        WeightsSource::Flag => "flag",
        WeightsSource::Env => "env",
        WeightsSource::HubCache => "hub-cache",
        WeightsSource::Download => "download",
    }
}

pub(crate) fn file_sha256(path: &Path) -> Result<String, Error> {
    let bytes = std::fs::read(path).map_err(|source| ModelError::Io {
        path: path.to_owned(),
        source,
    })?;
    Ok(format!("{:x}", Sha256::digest(&bytes)))
}
