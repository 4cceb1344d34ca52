//! The detectors behind one type: fit on normal images, score one image into
//! a raw image score and a raw anomaly map at the image's own size.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::time::Instant;

use candle_core::Tensor;
use image::Rgb32FImage;
use serde::{Deserialize, Serialize};

use crate::Error;
use crate::anomaly_map::{AnomalyMap, DEFAULT_BLUR_SIGMA};
use crate::features::{BorderAveraging, FeatureConfig, FeatureExtractor, PatchGrid, Resize};
use crate::flow::{Flow, FlowConfig};
use crate::images::{ImageLimits, load_image};
use crate::model_file::{ModelFileError, take};
use crate::padim::{Padim, PadimConfig};
use crate::patchcore::{PatchCore, PatchCoreConfig};
use crate::progress::Progress;
use crate::recon::{Recon, ReconConfig};

/// Which detector, with its settings.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "lowercase")]
pub enum DetectorConfig {
    PatchCore(PatchCoreConfig),
    Padim(PadimConfig),
    /// FastFlow-style normalizing flow, trained.
    Flow(FlowConfig),
    /// DFR-style feature autoencoder, trained.
    Recon(ReconConfig),
}

impl DetectorConfig {
    pub fn name(&self) -> &'static str {
        match self {
            Self::PatchCore(_) => "patchcore",
            Self::Padim(_) => "padim",
            Self::Flow(_) => "flow",
            Self::Recon(_) => "recon",
        }
    }
}

/// A fitted detector.
#[derive(Debug, Clone)]
pub enum Detector {
    /// `fine` scores the image at the configured input size; `coarse`, when
    /// configured, scores it again at a smaller size, and the two image
    /// scores and the two maps are averaged.
    PatchCore {
        fine: PatchCore,
        coarse: Option<CoarsePatchCore>,
    },
    Padim(Padim),
    Flow(Flow),
    Recon(Recon),
}

/// PatchCore's second, coarse scale: a bank of its own, built from features
/// at `resize` with inside-only border averaging (see [`crate::features`]).
#[derive(Debug, Clone)]
pub struct CoarsePatchCore {
    pub bank: PatchCore,
    pub resize: Resize,
}

impl CoarsePatchCore {
    const BORDER: BorderAveraging = BorderAveraging::InsideOnly;

    /// The coarse scale `config` asks for, if any, for features resized by
    /// `fine` (a square fine input gives a square coarse one).
    fn resize(config: &PatchCoreConfig, fine: Resize) -> Option<Resize> {
        let side = config.coarse_side?;
        Some(match fine {
            Resize::Fixed { .. } => Resize::Fixed {
                width: side,
                height: side,
            },
            Resize::KeepAspect { .. } => Resize::KeepAspect { side },
        })
    }
}

/// What a detector says about one image, before calibration.
#[derive(Debug, Clone)]
pub struct RawInspection {
    pub score: f32,
    /// Per-pixel scores at the image's own size.
    pub map: AnomalyMap,
}

impl Detector {
    /// Fits on the normal images at `paths`.
    pub fn fit(
        extractor: &FeatureExtractor,
        paths: &[PathBuf],
        config: &DetectorConfig,
        limits: &ImageLimits,
        progress: &dyn Progress,
    ) -> Result<Self, Error> {
        if paths.is_empty() {
            return Err(Error::InvalidConfig("no training images".into()));
        }
        // The trained detectors read their own features (stage maps for the
        // flow) and split off their validation images themselves.
        let started = Instant::now();
        match config {
            DetectorConfig::Flow(c) => {
                let (flow, _) = Flow::fit(extractor, paths, c, limits, started, progress)?;
                return Ok(Self::Flow(flow));
            }
            DetectorConfig::Recon(c) => {
                let (recon, _) = Recon::fit(extractor, paths, c, limits, started, progress)?;
                return Ok(Self::Recon(recon));
            }
            DetectorConfig::PatchCore(_) | DetectorConfig::Padim(_) => {}
        }
        let coarse_resize = match config {
            DetectorConfig::PatchCore(c) => CoarsePatchCore::resize(c, extractor.config().resize),
            _ => None,
        };
        progress.start("features", paths.len() as u64);
        let mut grids = Vec::with_capacity(paths.len());
        let mut coarse_grids = Vec::new();
        for path in paths {
            let image = load_image(path, limits)?;
            grids.push(extractor.extract(&image)?.features);
            if let Some(resize) = coarse_resize {
                let grid = extractor.extract_at(&image, resize, CoarsePatchCore::BORDER)?;
                coarse_grids.push(grid.features);
            }
            progress.advance(1);
        }
        progress.finish();
        match config {
            DetectorConfig::PatchCore(c) => {
                let all = Tensor::cat(&grids, 0)?;
                drop(grids);
                let fine = PatchCore::fit(&all, c, progress)?;
                drop(all);
                let coarse = match coarse_resize {
                    Some(resize) => Some(CoarsePatchCore {
                        bank: PatchCore::fit(&Tensor::cat(&coarse_grids, 0)?, c, progress)?,
                        resize,
                    }),
                    None => None,
                };
                Ok(Self::PatchCore { fine, coarse })
            }
            DetectorConfig::Padim(c) => Ok(Self::Padim(Padim::fit(&grids, c, progress)?)),
            DetectorConfig::Flow(_) | DetectorConfig::Recon(_) => Err(Error::InvalidConfig(
                "trained detectors are fitted above".into(),
            )),
        }
    }

    /// Scores one image.
    pub fn inspect(
        &self,
        extractor: &FeatureExtractor,
        image: &Rgb32FImage,
    ) -> Result<RawInspection, Error> {
        if let Self::Flow(model) = self {
            let (maps, input_size) = extractor.stage_maps(image)?;
            let (scores, grid_width, grid_height) = model.score(&maps)?;
            let map = grid_to_map(
                grid_width,
                grid_height,
                input_size,
                scores,
                image.dimensions(),
            )?;
            // Like PaDiM: the peak of the smoothed map.
            return Ok(RawInspection {
                score: map.max(),
                map,
            });
        }
        let grid = extractor.extract(image)?;
        let patch_scores = match self {
            Self::PatchCore { fine, coarse } => {
                return patchcore_inspection(fine, coarse.as_ref(), &grid, extractor, image);
            }
            Self::Padim(model) => model.score(&grid.features)?,
            Self::Recon(model) => model.score(&grid.features)?,
            Self::Flow(_) => {
                return Err(Error::InvalidConfig("flows are scored above".into()));
            }
        };
        let map = upsampled_map(&grid, patch_scores, image.dimensions())?;
        // PaDiM's and the autoencoder's image score is the peak of the
        // smoothed map.
        Ok(RawInspection {
            score: map.max(),
            map,
        })
    }

    /// Memory-bank size, for detectors that have one.
    pub fn memory_bank_size(&self) -> Option<usize> {
        match self {
            Self::PatchCore { fine, coarse } => {
                Some(fine.bank_size() + coarse.as_ref().map_or(0, |c| c.bank.bank_size()))
            }
            Self::Padim(_) | Self::Flow(_) | Self::Recon(_) => None,
        }
    }

    /// The tensors a model file stores.
    pub fn tensors(&self) -> BTreeMap<String, Tensor> {
        match self {
            Self::PatchCore { fine, coarse } => {
                let mut tensors = BTreeMap::from([("patchcore.bank".into(), fine.bank().clone())]);
                if let Some(coarse) = coarse {
                    tensors.insert("patchcore.coarse_bank".into(), coarse.bank.bank().clone());
                }
                tensors
            }
            Self::Padim(m) => m
                .parts()
                .into_iter()
                .map(|(k, t)| (k.to_string(), t.clone()))
                .collect(),
            Self::Flow(m) => m.tensors().clone(),
            Self::Recon(m) => m.tensors().clone(),
        }
    }

    /// Rebuilds a detector from a model file's tensors; `features` is the
    /// recipe it was fitted with.
    pub fn from_tensors(
        config: &DetectorConfig,
        features: &FeatureConfig,
        tensors: &mut HashMap<String, Tensor>,
        path: &Path,
    ) -> Result<Self, Error> {
        let mut get = |name: &str| -> Result<Tensor, ModelFileError> { take(tensors, name, path) };
        Ok(match config {
            DetectorConfig::PatchCore(c) => {
                let fine = PatchCore::from_bank(get("patchcore.bank")?, c.neighbours)?;
                let coarse = match CoarsePatchCore::resize(c, features.resize) {
                    Some(resize) => Some(CoarsePatchCore {
                        bank: PatchCore::from_bank(get("patchcore.coarse_bank")?, c.neighbours)?,
                        resize,
                    }),
                    None => None,
                };
                Self::PatchCore { fine, coarse }
            }
            DetectorConfig::Padim(_) => Self::Padim(Padim::from_parts(
                get("padim.channels")?,
                get("padim.mean")?,
                get("padim.inverse_covariance")?,
            )?),
            DetectorConfig::Flow(c) => Self::Flow(Flow::from_tensors(c, tensors, path)?),
            DetectorConfig::Recon(_) => Self::Recon(Recon::from_tensors(tensors, path)?),
        })
    }
}

/// PatchCore on the fine `grid` and, when there is a coarse scale, on the
/// image again at that scale: each scores the image as PatchCore does, and
/// the two image scores and the two maps are averaged.
fn patchcore_inspection(
    fine: &PatchCore,
    coarse: Option<&CoarsePatchCore>,
    grid: &PatchGrid,
    extractor: &FeatureExtractor,
    image: &Rgb32FImage,
) -> Result<RawInspection, Error> {
    let scores = fine.score(&grid.features)?;
    let map = upsampled_map(grid, scores.patches, image.dimensions())?;
    let Some(coarse) = coarse else {
        return Ok(RawInspection {
            score: scores.image,
            map,
        });
    };
    let coarse_grid = extractor.extract_at(image, coarse.resize, CoarsePatchCore::BORDER)?;
    let coarse_scores = coarse.bank.score(&coarse_grid.features)?;
    let coarse_map = upsampled_map(&coarse_grid, coarse_scores.patches, image.dimensions())?;
    Ok(RawInspection {
        score: 0.5 * (scores.image + coarse_scores.image),
        map: map
            .averaged_with(&coarse_map)
            .ok_or_else(|| Error::InvalidConfig("coarse and fine maps differ in size".into()))?,
    })
}

/// Patch scores → map at the backbone input size (blurred, σ = 4 there) →
/// map at the image's own size.
fn upsampled_map(
    grid: &PatchGrid,
    patch_scores: Vec<f32>,
    image_size: (u32, u32),
) -> Result<AnomalyMap, Error> {
    grid_to_map(
        grid.grid_width,
        grid.grid_height,
        grid.input_size,
        patch_scores,
        image_size,
    )
}

/// [`upsampled_map`] for a `grid_width × grid_height` grid computed at
/// backbone input size `input_size`.
fn grid_to_map(
    grid_width: usize,
    grid_height: usize,
    input_size: (u32, u32),
    patch_scores: Vec<f32>,
    image_size: (u32, u32),
) -> Result<AnomalyMap, Error> {
    let coarse = AnomalyMap::new(grid_width, grid_height, patch_scores)
        .ok_or_else(|| Error::InvalidConfig("patch scores do not fill the grid".into()))?;
    let (iw, ih) = input_size;
    let at_input = AnomalyMap::from_grid(&coarse, iw as usize, ih as usize, DEFAULT_BLUR_SIGMA);
    let (w, h) = (image_size.0 as usize, image_size.1 as usize);
    Ok(if (w, h) == (iw as usize, ih as usize) {
        at_input
    } else {
        at_input.resized_bilinear(w, h)
    })
}
