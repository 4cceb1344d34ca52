//! Which backbone produces the features, and the identity (path and
//! SHA-256) of a weight file read from disk: what a model file records so it
//! never runs on other weights than it was fitted with.

use std::path::{Path, PathBuf};

use flawscope_models::LiteVariant;
use serde::{Deserialize, Serialize};

use crate::Error;

/// Which pretrained network produces the features.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum BackboneKind {
    /// EfficientNet-Lite0, ImageNet weights, embedded in the binary.
    Lite0,
    /// EfficientNet-Lite1, ImageNet weights from a file
    /// ([`BackboneWeights`]).
    Lite1,
    /// EfficientNet-Lite2, ImageNet weights from a file.
    Lite2,
    /// DINOv2 ViT (`facebook/dinov2-small` / `-base` Hugging Face folder):
    /// patch tokens of chosen layers.
    Dinov2,
    /// The CLIP vision tower (a CLIP Hugging Face folder): patch tokens of
    /// chosen layers.
    Clip,
}

impl BackboneKind {
    pub fn name(self) -> &'static str {
        match self {
            Self::Lite0 => "lite0",
            Self::Lite1 => "lite1",
            Self::Lite2 => "lite2",
            Self::Dinov2 => "dinov2",
            Self::Clip => "clip",
        }
    }

    /// The EfficientNet-Lite variant (none for the vision transformers).
    pub fn variant(self) -> Option<LiteVariant> {
        match self {
            Self::Lite0 => Some(LiteVariant::Lite0),
            Self::Lite1 => Some(LiteVariant::Lite1),
            Self::Lite2 => Some(LiteVariant::Lite2),
            Self::Dinov2 | Self::Clip => None,
        }
    }

    /// Whether this is a vision transformer, whose features are the patch
    /// tokens of chosen layers ([`FeatureConfig::layers`]) rather than CNN stages.
    pub fn is_vit(self) -> bool {
        matches!(self, Self::Dinov2 | Self::Clip)
    }

    /// Whether the weights are compiled into the binary (else a
    /// [`BackboneWeights`] file is needed).
    pub fn is_embedded(self) -> bool {
        self == Self::Lite0
    }
}

impl std::str::FromStr for BackboneKind {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self, Error> {
        match s.trim().to_ascii_lowercase().as_str() {
            "lite0" => Ok(Self::Lite0),
            "lite1" => Ok(Self::Lite1),
            "lite2" => Ok(Self::Lite2),
            "dinov2" => Ok(Self::Dinov2),
            "clip" => Ok(Self::Clip),
            _ => Err(Error::InvalidConfig(format!(
                "unknown backbone {s:?}; available: lite0, lite1, lite2, dinov2, clip"
            ))),
        }
    }
}

/// Largest backbone weight file read (the Lite2 file is 25 MB).
pub const MAX_BACKBONE_WEIGHTS_BYTES: u64 = 512 << 20;

/// A backbone weight file (safetensors, as written by
/// `scripts/convert_efficientnet.py`) and its SHA-256, recorded in the
/// model file so that a model is never run on other weights than it was
/// fitted with.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BackboneWeights {
    /// Where the file was when the model was fitted (made absolute). The
    /// weights are not copied into the model file (25 MB each); loading
    /// reads them from here and checks the hash.
    pub path: PathBuf,
    /// Lower-case hex SHA-256 of the file's bytes.
    pub sha256: String,
}

impl BackboneWeights {
    /// Reads `path` and records its hash.
    pub fn from_file(path: &Path) -> Result<Self, Error> {
        let bytes = read_weights(path)?;
        let path = std::path::absolute(path).unwrap_or_else(|_| path.to_path_buf());
        Ok(Self {
            path,
            sha256: sha256_hex(&bytes),
        })
    }
}

pub(super) fn sha256_hex(bytes: &[u8]) -> String {
    use sha2::{Digest, Sha256};
    format!("{:x}", Sha256::digest(bytes))
}

/// The bytes of a weight file, bounded in size.
pub(super) fn read_weights(path: &Path) -> Result<Vec<u8>, Error> {
    use std::io::Read;
    let cannot =
        |e: std::io::Error| Error::BackboneWeights(format!("cannot read {}: {e}", path.display()));
    // A model file names this path: only a regular file of bounded size is
    // read (not a device or a pipe, which could be endless or block).
    let meta = std::fs::metadata(path).map_err(cannot)?;
    if !meta.is_file() || meta.len() > MAX_BACKBONE_WEIGHTS_BYTES {
        return Err(Error::BackboneWeights(format!(
            "{} is not a regular file of at most {} MiB: not an EfficientNet-Lite weight file",
            path.display(),
            MAX_BACKBONE_WEIGHTS_BYTES >> 20
        )));
    }
    let file = std::fs::File::open(path).map_err(cannot)?;
    let mut bytes = Vec::new();
    file.take(MAX_BACKBONE_WEIGHTS_BYTES + 1)
        .read_to_end(&mut bytes)
        .map_err(cannot)?;
    if bytes.len() as u64 > MAX_BACKBONE_WEIGHTS_BYTES {
        return Err(Error::BackboneWeights(format!(
            "{} is over {} MiB: not an EfficientNet-Lite weight file",
            path.display(),
            MAX_BACKBONE_WEIGHTS_BYTES >> 20
        )));
    }
    Ok(bytes)
}
