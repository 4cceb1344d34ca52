//! Feature reconstruction: a DFR-style autoencoder (Shi et al., "Unsupervised
//! anomaly segmentation via deep feature reconstruction", Neurocomputing
//! 2021) over multi-scale backbone features.
//!
//! Why DFR and not STFPM: STFPM trains a student CNN on pixels, so every
//! training step runs a backbone-sized network forward and backward over
//! whole images — far too slow on a few CPU cores. DFR learns only a small
//! autoencoder on the frozen teacher's features, which are computed once per
//! training image; an epoch is then a handful of small matrix products per
//! batch, so many epochs fit in a minute or two.
//!
//! The features are the extractor's patch features ([`FeatureExtractor::
//! extract`]: each stage averaged over 3×3 neighbourhoods, upsampled to the
//! finest stage's grid and concatenated — DFR's "regional multi-scale
//! features"), whitened position by position with training statistics
//! ([`crate::gaussian`]; DFR has no such layer, but MTD's aligned tiles
//! need it: with per-channel standardisation the autoencoder reached only
//! ≈ 0.79 image AUROC there, with whitening ≈ 0.96 — most of which the
//! whitening alone already gives, an untrained autoencoder scoring ≈ 0.96
//! too). The autoencoder is DFR's stack of 1×1 convolutions, i.e. the same
//! small MLP at every grid position: `C → hidden → latent → hidden → C`
//! with ReLUs.
//! Its narrow latent lets it reproduce normal features but not unusual
//! ones. Training minimises the mean squared reconstruction error (see
//! [`crate::train`] for seeding, validation and early stopping); the patch
//! score is the same error at that position (mean over channels), the
//! detector upsamples and blurs it into the anomaly map, and the image score
//! is the peak of that smoothed map.
//!
//! The whitening is per position, so every image must share one grid (a
//! fixed input size).

use std::collections::{BTreeMap, HashMap};
use std::path::Path;
use std::time::Instant;

use candle_core::{D, DType, Device, Tensor};
use flawscope_models::Stage;
use image::Rgb32FImage;
use serde::{Deserialize, Serialize};

use crate::Error;
use crate::detector::{Detector, DetectorOutput, FitInputs};
use crate::features::{FeatureConfig, FeatureExtractor, Resize, extract_all};
use crate::gaussian;
use crate::model_file::take;
use crate::progress::Progress;
use crate::tiling::ImageSource;
use crate::train::{
    Initialiser, Trainable, TrainingConfig, TrainingReport, linear, split_validation, train,
};

/// Rows scored at once when computing the validation loss.
const EVAL_CHUNK: usize = 16_384;
const NAMES: [&str; 10] = [
    "recon.mean",
    "recon.whiten",
    "recon.enc1.w",
    "recon.enc1.b",
    "recon.enc2.w",
    "recon.enc2.b",
    "recon.dec1.w",
    "recon.dec1.b",
    "recon.dec2.w",
    "recon.dec2.b",
];

#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct ReconConfig {
    /// Width of the autoencoder's outer hidden layers.
    pub hidden: usize,
    /// Width of the bottleneck.
    pub latent: usize,
    /// `batch_size` counts patches (grid positions), not images.
    pub training: TrainingConfig,
}

impl Default for ReconConfig {
    fn default() -> Self {
        Self {
            hidden: 128,
            latent: 32,
            training: TrainingConfig {
                batch_size: 1024,
                ..TrainingConfig::default()
            },
        }
    }
}

impl ReconConfig {
    fn validate(&self) -> Result<(), Error> {
        self.training.validate()?;
        if self.hidden == 0 || self.latent == 0 {
            return Err(Error::InvalidConfig(
                "autoencoder layers need at least one unit".into(),
            ));
        }
        Ok(())
    }
}

/// A fitted (or training) feature autoencoder.
#[derive(Debug, Clone)]
pub struct Recon {
    /// In [`NAMES`] order.
    parts: Vec<Tensor>,
    tensors: BTreeMap<String, Tensor>,
}

impl Recon {
    fn build(tensors: BTreeMap<String, Tensor>) -> Result<Self, Error> {
        let parts = NAMES
            .iter()
            .map(|n| {
                tensors
                    .get(*n)
                    .cloned()
                    .ok_or_else(|| Error::InvalidConfig(format!("tensor {n} is missing")))
            })
            .collect::<Result<Vec<_>, _>>()?;
        let (_, c) = gaussian::check(&parts[0], &parts[1])?;
        let (c1, hidden) = parts[2].dims2()?;
        let (h2, latent) = parts[4].dims2()?;
        let consistent = c1 == c
            && parts[3].dims1()? == hidden
            && h2 == hidden
            && parts[5].dims1()? == latent
            && parts[6].dims2()? == (latent, hidden)
            && parts[7].dims1()? == hidden
            && parts[8].dims2()? == (hidden, c)
            && parts[9].dims1()? == c;
        if !consistent {
            return Err(Error::InvalidConfig(
                "autoencoder tensors have inconsistent shapes".into(),
            ));
        }
        Ok(Self { parts, tensors })
    }

    /// Rebuilds a fitted autoencoder from a model file's tensors.
    pub fn from_tensors(tensors: &mut HashMap<String, Tensor>, path: &Path) -> Result<Self, Error> {
        let mut named = BTreeMap::new();
        for n in NAMES {
            named.insert(n.to_string(), take(tensors, n, path)?);
        }
        Self::build(named)
    }

    pub fn tensors(&self) -> &BTreeMap<String, Tensor> {
        &self.tensors
    }

    pub fn channels(&self) -> usize {
        self.parts[0].dims().last().copied().unwrap_or(0)
    }

    /// Grid positions the model was fitted on.
    pub fn positions(&self) -> usize {
        self.parts[0].dims().first().copied().unwrap_or(0)
    }

    /// Whitens rows `[n · P, C]` (whole images, grid order) position by
    /// position.
    fn standardise(&self, x: &Tensor) -> Result<Tensor, Error> {
        let (rows, c) = x.dims2()?;
        let positions = self.positions();
        if c != self.channels() || positions == 0 || rows % positions != 0 {
            return Err(Error::InvalidConfig(format!(
                "the autoencoder was fitted on {positions} positions × {} channels, got {rows} × {c} (use the model's fixed input size)",
                self.channels()
            )));
        }
        let z = gaussian::apply(
            &self.parts[0],
            &self.parts[1],
            &x.reshape((rows / positions, positions, c))?,
        )?;
        Ok(z.reshape((rows, c))?)
    }

    /// Squared reconstruction error per row (mean over channels) of
    /// standardised rows `[n, C]`.
    fn errors(&self, x: &Tensor) -> Result<Tensor, Error> {
        let p = &self.parts;
        let h = linear(x, &p[2], &p[3])?.relu()?;
        let z = linear(&h, &p[4], &p[5])?.relu()?;
        let h = linear(&z, &p[6], &p[7])?.relu()?;
        let y = linear(&h, &p[8], &p[9])?;
        Ok(y.sub(x)?.sqr()?.mean(D::Minus1)?)
    }

    /// Fits on the normal images (or tiles) of `images`.
    pub fn fit(
        extractor: &FeatureExtractor,
        images: &ImageSource<'_>,
        config: &ReconConfig,
        started: Instant,
        progress: &dyn Progress,
    ) -> Result<(Self, TrainingReport), Error> {
        config.validate()?;
        let images = extract_all(extractor, images, progress)?;
        Self::fit_features(&images, config, started, progress)
    }

    /// Fits on precomputed patch features, one `[positions, C]` tensor per
    /// image.
    pub fn fit_features(
        images: &[Tensor],
        config: &ReconConfig,
        started: Instant,
        progress: &dyn Progress,
    ) -> Result<(Self, TrainingReport), Error> {
        config.validate()?;
        let first = images
            .first()
            .ok_or_else(|| Error::InvalidConfig("no training images".into()))?;
        let device = first.device().clone();
        let (positions, c) = first.dims2()?;
        for image in images {
            if image.dims2()? != (positions, c) {
                return Err(Error::InvalidConfig(
                    "the autoencoder needs every image on the same grid (use a fixed input size)"
                        .into(),
                ));
            }
        }
        let training = &config.training;
        let (train_ids, val_ids) =
            split_validation(images.len(), training.validation_fraction, training.seed);
        let gather = |ids: &[usize]| -> Result<Tensor, Error> {
            let parts: Vec<&Tensor> = ids.iter().map(|&i| &images[i]).collect();
            Ok(Tensor::cat(&parts, 0)?.to_dtype(DType::F32)?)
        };
        let raw_train = gather(&train_ids)?;
        let (mean, whiten) = gaussian::fit(&raw_train.reshape((train_ids.len(), positions, c))?)?;

        let mut init = Initialiser::new(training.seed, &device);
        let mut layer =
            |name: &str, fan_in: usize, fan_out: usize| -> Result<[(String, Tensor); 2], Error> {
                let bound = 1.0 / (fan_in as f32).sqrt();
                Ok([
                    (
                        format!("recon.{name}.w"),
                        init.uniform(&[fan_in, fan_out], bound)?,
                    ),
                    (format!("recon.{name}.b"), init.uniform(&[fan_out], bound)?),
                ])
            };
        let mut weights = BTreeMap::new();
        weights.extend(layer("enc1", c, config.hidden)?);
        weights.extend(layer("enc2", config.hidden, config.latent)?);
        weights.extend(layer("dec1", config.latent, config.hidden)?);
        weights.extend(layer("dec2", config.hidden, c)?);
        let fixed = BTreeMap::from([
            ("recon.mean".to_string(), mean),
            ("recon.whiten".to_string(), whiten),
        ]);
        let (trainable, live) = Trainable::new(weights, &fixed)?;
        let model = Self::build(live)?;

        let train_rows = model.standardise(&raw_train)?;
        drop(raw_train);
        let val_rows = if val_ids.is_empty() {
            None
        } else {
            Some(model.standardise(&gather(&val_ids)?)?)
        };
        let row_count = train_rows.dim(0)?;
        let mut batch_loss = |batch: &[usize]| -> Result<Tensor, Error> {
            let ids = Tensor::from_vec(
                batch.iter().map(|&i| i as u32).collect::<Vec<_>>(),
                batch.len(),
                &device,
            )?;
            Ok(model
                .errors(&train_rows.index_select(&ids, 0)?)?
                .mean_all()?)
        };
        let mut validation_loss = || -> Result<Option<f64>, Error> {
            let Some(rows) = &val_rows else {
                return Ok(None);
            };
            let n = rows.dim(0)?;
            let mut sum = 0.0;
            let mut start = 0;
            while start < n {
                let len = EVAL_CHUNK.min(n - start);
                let errors = model.errors(&rows.narrow(0, start, len)?)?.detach();
                sum += f64::from(errors.sum_all()?.to_scalar::<f32>()?);
                start += len;
            }
            Ok(Some(sum / n.max(1) as f64))
        };
        let deadline = training
            .max_minutes
            .map(|m| started + std::time::Duration::from_secs_f64(m * 60.0));
        let report = train(
            &trainable,
            training,
            row_count,
            deadline,
            progress,
            &mut batch_loss,
            &mut validation_loss,
        )?;
        let mut tensors = fixed;
        tensors.extend(trainable.values()?);
        Ok((Self::build(tensors)?, report))
    }

    /// Reconstruction error of every row of `features` `[positions, C]`.
    pub fn score(&self, features: &Tensor) -> Result<Vec<f32>, Error> {
        let (_, c) = features.dims2()?;
        if c != self.channels() {
            return Err(Error::InvalidConfig(format!(
                "the autoencoder expects {} channels, got {c}",
                self.channels()
            )));
        }
        Ok(self.errors(&self.standardise(features)?)?.to_vec1()?)
    }
}

impl ReconConfig {
    /// Stages 4 + 5 at 256 × 256.
    pub fn default_features() -> FeatureConfig {
        FeatureConfig::lite0(
            &[Stage::Stage4, Stage::Stage5],
            Resize::Fixed {
                width: 256,
                height: 256,
            },
        )
    }
}

/// The feature autoencoder on the backbone's patch features.
pub struct ReconDetector {
    extractor: FeatureExtractor,
    recon: Recon,
}

impl ReconDetector {
    /// A detector from a fitted model and the extractor it was fitted on.
    pub fn new(extractor: FeatureExtractor, recon: Recon) -> Self {
        Self { extractor, recon }
    }

    pub fn fit(
        config: &ReconConfig,
        features: &FeatureConfig,
        inputs: &FitInputs<'_>,
    ) -> Result<Self, Error> {
        let started = Instant::now();
        let extractor = FeatureExtractor::new(features.clone(), inputs.runtime.device())?;
        let (recon, _) = Recon::fit(
            &extractor,
            &inputs.images(),
            config,
            started,
            inputs.progress,
        )?;
        Ok(Self { extractor, recon })
    }

    pub fn load(
        features: &FeatureConfig,
        tensors: &mut HashMap<String, Tensor>,
        path: &Path,
        device: &Device,
    ) -> Result<Self, Error> {
        Ok(Self {
            recon: Recon::from_tensors(tensors, path)?,
            extractor: FeatureExtractor::new(features.clone(), device)?,
        })
    }
}

impl Detector for ReconDetector {
    fn score(&self, image: &Rgb32FImage) -> Result<DetectorOutput, Error> {
        let grid = self.extractor.extract(image)?;
        let scores = self.recon.score(&grid.features)?;
        Ok(DetectorOutput::peak_of(&grid, scores))
    }

    fn tensors(&self) -> BTreeMap<String, Tensor> {
        self.recon.tensors().clone()
    }
}
