//! One interface for every detector: fit on normal images → a fitted
//! [`Detector`]; score an image → a raw image score plus patch-score grids
//! ([`DetectorOutput`]). Turning grids into a map at the image's size is
//! shared code here ([`DetectorOutput::into_raw`]); calibration into a
//! verdict is shared code in [`crate::model`].
//!
//! [`DetectorConfig`] is the registry: the one place that lists the
//! detectors, stored in every model file as `detector` (tagged by `kind`).
//! Adding a detector means a file implementing [`Detector`], a variant here,
//! and its command-line options (see the README, "Adding a detector").

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

use candle_core::Tensor;
use image::Rgb32FImage;
use serde::{Deserialize, Serialize};

use crate::Error;
use crate::anomaly_map::{AnomalyMap, DEFAULT_BLUR_SIGMA};
use crate::crossfit::{Folds, Procedure};
use crate::features::{FeatureConfig, PatchGrid, Resize};
use crate::flow::{FlowConfig, FlowDetector};
use crate::images::ImageLimits;
use crate::padim::{PadimConfig, PadimDetector};
use crate::patchcore::{PatchCoreConfig, PatchCoreDetector};
use crate::progress::Progress;
use crate::recon::{ReconConfig, ReconDetector};
use crate::runtime::Runtime;
use crate::supersimplenet::{SuperSimpleNetConfig, SuperSimpleNetDetector};
use crate::tiling::{ImageSource, Tiling};
use crate::winclip::{WinClipConfig, WinClipDetector};

/// A detector that never saw one fold's images, and how it was derived
/// ([`Detector::without_fold`]).
pub type FoldDetector<'a> = (Box<dyn Detector + 'a>, Procedure);

/// A fitted detector, whatever its kind.
pub trait Detector: Send + Sync {
    /// Raw image score and patch-score grids of one image.
    fn score(&self, image: &Rgb32FImage) -> Result<DetectorOutput, Error>;

    /// The tensors a model file stores.
    fn tensors(&self) -> BTreeMap<String, Tensor>;

    /// Rows of the memory bank, for detectors that keep one.
    fn memory_bank_size(&self) -> Option<usize> {
        None
    }

    /// The settings to store when fitting completed them (WinCLIP records
    /// its CLIP checkpoint and shot images); `None` keeps the ones asked for.
    fn fitted_config(&self) -> Option<DetectorConfig> {
        None
    }

    /// Images the detector was fitted on, when it chose them itself
    /// (WinCLIP's first K shots); `None`: all it was given.
    fn images_used(&self) -> Option<usize> {
        None
    }

    /// This detector as fitted without the images of `fold` (see
    /// [`crate::crossfit`]), when it can derive one from its own fit
    /// (memory banks drop rows, Gaussians leave sums out) and was fitted
    /// with folds. `None`: it is fitted again on the other folds.
    fn without_fold(&self, _fold: usize) -> Result<Option<FoldDetector<'_>>, Error> {
        Ok(None)
    }

    /// Drops what fitting kept only for [`Detector::without_fold`].
    fn forget_folds(&mut self) {}

    /// The raw score and the map at the image's own size.
    fn inspect_raw(&self, image: &Rgb32FImage) -> Result<RawInspection, Error> {
        self.score(image)?.into_raw(image.dimensions())
    }
}

/// What a detector computes for one image, before any map is built.
#[derive(Debug, Clone)]
pub struct DetectorOutput {
    pub image_score: ImageScore,
    /// One grid per scale; their maps are averaged.
    pub grids: Vec<ScoreGrid>,
}

/// Where the raw image score comes from.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum ImageScore {
    /// The detector computed it (PatchCore's reweighted maximum, WinCLIP).
    Given(f32),
    /// The peak of the finished map (PaDiM, flow, recon).
    MapPeak,
}

/// Patch scores on a `width × height` grid computed at the network input
/// size `input_size`, row-major.
#[derive(Debug, Clone)]
pub struct ScoreGrid {
    pub width: usize,
    pub height: usize,
    pub values: Vec<f32>,
    pub input_size: (u32, u32),
    /// Blur of the map at the input size.
    pub blur_sigma: f32,
}

impl ScoreGrid {
    /// Scores of the patches of `grid`, blurred with the default σ.
    pub fn of(grid: &PatchGrid, values: Vec<f32>) -> Self {
        Self {
            width: grid.grid_width,
            height: grid.grid_height,
            values,
            input_size: grid.input_size,
            blur_sigma: DEFAULT_BLUR_SIGMA,
        }
    }

    /// Grid → map at the input size (bilinear, blurred there) → map at
    /// `image_size`.
    pub fn to_map(&self, image_size: (u32, u32)) -> Result<AnomalyMap, Error> {
        let coarse = AnomalyMap::new(self.width, self.height, self.values.clone())
            .ok_or_else(|| Error::InvalidConfig("patch scores do not fill the grid".into()))?;
        let (iw, ih) = (self.input_size.0 as usize, self.input_size.1 as usize);
        let at_input = AnomalyMap::from_grid(&coarse, iw, ih, self.blur_sigma);
        let (w, h) = (image_size.0 as usize, image_size.1 as usize);
        Ok(if (w, h) == (iw, ih) {
            at_input
        } else {
            at_input.resized_bilinear(w, h)
        })
    }
}

/// A raw image score and a raw map at the image's own size.
#[derive(Debug, Clone)]
pub struct RawInspection {
    pub score: f32,
    pub map: AnomalyMap,
}

impl DetectorOutput {
    /// One grid of patch scores whose map's peak is the image score (PaDiM,
    /// recon).
    pub fn peak_of(grid: &PatchGrid, scores: Vec<f32>) -> Self {
        Self {
            image_score: ImageScore::MapPeak,
            grids: vec![ScoreGrid::of(grid, scores)],
        }
    }

    /// The map of every grid at `image_size`, averaged, and the image score.
    pub fn into_raw(self, image_size: (u32, u32)) -> Result<RawInspection, Error> {
        let maps = self
            .grids
            .iter()
            .map(|g| g.to_map(image_size))
            .collect::<Result<Vec<_>, _>>()?;
        let map = AnomalyMap::mean(&maps)
            .ok_or_else(|| Error::InvalidConfig("a detector gave no map, or maps differ".into()))?;
        let score = match self.image_score {
            ImageScore::Given(score) => score,
            ImageScore::MapPeak => map.max(),
        };
        Ok(RawInspection { score, map })
    }
}

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

/// Everything a detector may need to fit.
pub struct FitInputs<'a> {
    /// The normal images to fit on (held-back ones excluded).
    pub normal: &'a [PathBuf],
    /// The feature recipe, for detectors on the CNN backbone.
    pub features: Option<&'a FeatureConfig>,
    pub runtime: &'a Runtime,
    pub limits: &'a ImageLimits,
    pub progress: &'a dyn Progress,
    /// Fit on tiles of the normal images instead of whole images.
    pub tiling: Option<Tiling>,
    /// The folds of `normal` for cross-fitted calibration: detectors that
    /// can, keep what [`Detector::without_fold`] needs.
    pub folds: Option<&'a Folds>,
}

impl FitInputs<'_> {
    /// The normal images as the detector is fitted on them.
    pub fn images(&self) -> ImageSource<'_> {
        ImageSource {
            paths: self.normal,
            limits: self.limits,
            tiling: self.tiling,
        }
    }
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

    /// Fits this detector.
    pub fn fit(&self, inputs: &FitInputs<'_>) -> Result<Box<dyn Detector>, Error> {
        // WinCLIP fits on text alone when it has no shots.
        if inputs.normal.is_empty() && !matches!(self, Self::WinClip(_)) {
            return Err(Error::InvalidConfig("no training images".into()));
        }
        Ok(match self {
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
            Self::WinClip(c) => Box::new(WinClipDetector::fit(c, inputs)?),
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
