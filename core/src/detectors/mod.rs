//! The detectors and their registry: the one place that lists them. Each
//! detector is a file in this folder implementing [`Detector`]
//! (`patchcore`, `padim`, the trained `flow`, `recon` and
//! `supersimplenet`; WinCLIP, which also serves the text layer, is
//! [`crate::winclip`]).
//!
//! [`DetectorConfig`] names a detector with its settings; it is stored in
//! every model file as `detector` (tagged by `kind`). It fits a detector
//! ([`DetectorConfig::fit`], returning the settings to store beside it) and
//! rebuilds one from a model file ([`DetectorConfig::load`]). The
//! [`Detector`] interface itself is in [`crate::detector`], below every
//! detector and this file.
//!
//! Adding a detector means a file in this folder implementing [`Detector`],
//! its `pub mod` line and a variant here, and its command-line options (see
//! the README, "Adding a detector").

pub mod flow;
pub mod padim;
pub mod patchcore;
pub mod recon;
pub mod supersimplenet;

use std::collections::HashMap;
use std::path::Path;

use candle_core::Tensor;
use serde::{Deserialize, Serialize};

use crate::Error;
use crate::detector::{Detector, FitInputs};
use crate::detectors::flow::{FlowConfig, FlowDetector};
use crate::detectors::padim::{PadimConfig, PadimDetector};
use crate::detectors::patchcore::{PatchCoreConfig, PatchCoreDetector};
use crate::detectors::recon::{ReconConfig, ReconDetector};
use crate::detectors::supersimplenet::{SuperSimpleNetConfig, SuperSimpleNetDetector};
use crate::features::{FeatureConfig, Resize};
use crate::runtime::Runtime;
use crate::winclip::config::WinClipConfig;
use crate::winclip::detector::WinClipDetector;

/// Which detector, with its settings: the registry of detectors.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "lowercase")]
pub enum DetectorConfig {
    PatchCore(PatchCoreConfig),
    Padim(PadimConfig),
    /// FastFlow-style normalizing flow, trained.
    Flow(FlowConfig),
    /// DFR-style feature autoencoder, trained.
    Recon(ReconConfig),
    /// SuperSimpleNet-style head trained on noise-made anomalous features.
    SuperSimpleNet(SuperSimpleNetConfig),
    /// CLIP and text prompts, plus a few normal images (WinCLIP).
    WinClip(WinClipConfig),
}

/// A freshly fitted detector and what a model file records of its fit.
pub struct Fitted {
    pub detector: Box<dyn Detector>,
    /// The settings to store: those asked for, completed where fitting
    /// completes them (WinCLIP records its CLIP checkpoint, logit scale and
    /// shot images).
    pub config: DetectorConfig,
    /// Images the detector was fitted on: all it was given, or the ones it
    /// chose itself (WinCLIP's first K shots).
    pub images_used: usize,
}

impl DetectorConfig {
    pub fn name(&self) -> &'static str {
        match self {
            Self::PatchCore(_) => "patchcore",
            Self::Padim(_) => "padim",
            Self::Flow(_) => "flow",
            Self::Recon(_) => "recon",
            Self::SuperSimpleNet(_) => "supersimplenet",
            Self::WinClip(_) => "winclip",
        }
    }

    /// The name in reports: WinCLIP with K shots is `winclip+K`.
    pub fn label(&self) -> String {
        match self {
            Self::WinClip(c) if c.shots > 0 => format!("winclip+{}", c.shots),
            _ => self.name().to_owned(),
        }
    }

    /// The detector's default feature recipe (`None`: it brings its own
    /// network).
    pub fn default_features(&self) -> Option<FeatureConfig> {
        match self {
            Self::PatchCore(_) => Some(PatchCoreConfig::default_features()),
            Self::Padim(_) => Some(PadimConfig::default_features()),
            Self::Flow(_) => Some(FlowConfig::default_features()),
            Self::Recon(_) => Some(ReconConfig::default_features()),
            Self::SuperSimpleNet(_) => Some(SuperSimpleNetConfig::default_features()),
            Self::WinClip(_) => None,
        }
    }

    /// Whether the detector scores on a fixed square grid (its input is
    /// always resized to a square, whatever is asked).
    pub fn square_input_only(&self) -> bool {
        matches!(
            self,
            Self::Padim(_) | Self::Flow(_) | Self::Recon(_) | Self::SuperSimpleNet(_)
        )
    }

    /// The side of the (square-ish) input the detector scores an image at:
    /// the tile side automatic tiling uses.
    pub fn input_side(&self, features: Option<&FeatureConfig>) -> u32 {
        match (self, features) {
            (_, Some(f)) => match f.resize {
                Resize::Fixed { width, height } => width.min(height),
                Resize::KeepAspect { side } => side,
            },
            // CLIP ViT-B/16, the one WinCLIP checkpoint, sees 224² pixels.
            (_, None) => 224,
        }
    }

    /// Whether its threshold is fitted on held-back normal images. WinCLIP's
    /// raw score is already a probability with its natural threshold at 0.5.
    pub fn is_calibrated(&self) -> bool {
        !matches!(self, Self::WinClip(_))
    }

    /// How many folds cross-fitted calibration deals the normal images
    /// into: memory banks and Gaussians derive each fold's detector cheaply,
    /// so they afford ten and five; trained detectors are fitted again per
    /// fold, so two (fit time about doubles).
    pub fn calibration_folds(&self) -> usize {
        match self {
            Self::PatchCore(_) => 10,
            Self::Padim(_) => 5,
            _ => 2,
        }
    }

    /// The network named in reports.
    pub fn backbone_label(&self, features: Option<&FeatureConfig>) -> String {
        match (self, features) {
            (Self::WinClip(c), _) => match &c.clip {
                Some(clip) => format!("clip-{}", clip.preset),
                None => "clip".to_owned(),
            },
            (_, Some(f)) => f.backbone.name().to_owned(),
            (_, None) => "none".to_owned(),
        }
    }

    /// The feature recipe of a detector on the CNN backbone.
    fn features<'a>(
        &self,
        features: Option<&'a FeatureConfig>,
    ) -> Result<&'a FeatureConfig, Error> {
        features.ok_or_else(|| {
            Error::InvalidConfig(format!(
                "the {} detector needs a feature recipe",
                self.name()
            ))
        })
    }

    /// Fits this detector on `inputs`.
    pub fn fit(&self, inputs: &FitInputs<'_>) -> Result<Fitted, Error> {
        // WinCLIP fits on text alone when it has no shots.
        if inputs.normal.is_empty() && !matches!(self, Self::WinClip(_)) {
            return Err(Error::InvalidConfig("no training images".into()));
        }
        let detector: Box<dyn Detector> = match self {
            Self::PatchCore(c) => Box::new(PatchCoreDetector::fit(
                c,
                self.features(inputs.features)?,
                inputs,
            )?),
            Self::Padim(c) => Box::new(PadimDetector::fit(
                c,
                self.features(inputs.features)?,
                inputs,
            )?),
            Self::Flow(c) => Box::new(FlowDetector::fit(
                c,
                self.features(inputs.features)?,
                inputs,
            )?),
            Self::Recon(c) => Box::new(ReconDetector::fit(
                c,
                self.features(inputs.features)?,
                inputs,
            )?),
            Self::SuperSimpleNet(c) => Box::new(SuperSimpleNetDetector::fit(
                c,
                self.features(inputs.features)?,
                inputs,
            )?),
            Self::WinClip(c) => {
                let detector = WinClipDetector::fit(c, inputs)?;
                let config = detector.config().clone();
                return Ok(Fitted {
                    images_used: config.shot_images.len(),
                    config: Self::WinClip(config),
                    detector: Box::new(detector),
                });
            }
        };
        Ok(Fitted {
            detector,
            config: self.clone(),
            images_used: inputs.normal.len(),
        })
    }

    /// Rebuilds a fitted detector from a model file's tensors.
    pub fn load(
        &self,
        features: Option<&FeatureConfig>,
        tensors: &mut HashMap<String, Tensor>,
        path: &Path,
        runtime: &Runtime,
    ) -> Result<Box<dyn Detector>, Error> {
        let device = runtime.device();
        Ok(match self {
            Self::PatchCore(c) => Box::new(PatchCoreDetector::load(
                c,
                self.features(features)?,
                tensors,
                path,
                device,
            )?),
            Self::Padim(_) => Box::new(PadimDetector::load(
                self.features(features)?,
                tensors,
                path,
                device,
            )?),
            Self::Flow(c) => Box::new(FlowDetector::load(
                c,
                self.features(features)?,
                tensors,
                path,
                device,
            )?),
            Self::Recon(_) => Box::new(ReconDetector::load(
                self.features(features)?,
                tensors,
                path,
                device,
            )?),
            Self::SuperSimpleNet(c) => Box::new(SuperSimpleNetDetector::load(
                c,
                self.features(features)?,
                tensors,
                path,
                device,
            )?),
            Self::WinClip(c) => Box::new(WinClipDetector::load(c, tensors, path, runtime)?),
        })
    }
}

/// A square input of `side` when `square`, else the aspect kept.
pub fn resize_for(side: u32, square: bool) -> Resize {
    if square {
        Resize::Fixed {
            width: side,
            height: side,
        }
    } else {
        Resize::KeepAspect { side }
    }
}
