//! PaDiM (Defard et al., ICPR 2021): one Gaussian per grid position.
//!
//! A random subset of the feature channels is kept; at every grid position
//! the training features get a mean and a covariance (plus `ε·I`), and a test
//! patch scores its Mahalanobis distance to its position's Gaussian. All
//! images must share one grid, so PaDiM needs a fixed input size.

use std::collections::{BTreeMap, HashMap};
use std::path::Path;

use candle_core::{DType, Device, Tensor};
use flawscope_models::Stage;
use image::Rgb32FImage;
use rand::{SeedableRng, rngs::StdRng, seq::index::sample};
use rayon::prelude::*;
use serde::{Deserialize, Serialize};

use crate::Error;
use crate::detector::{Detector, DetectorOutput, FitInputs};
use crate::features::{FeatureConfig, FeatureExtractor, Resize, extract_all};
use crate::gaussian::inverse_cholesky_factor;
use crate::model_file::take;
use crate::progress::Progress;

#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct PadimConfig {
    /// Channels kept (randomly chosen); all of them when larger than the
    /// feature width.
    pub channels: usize,
    /// Added to the covariance diagonal.
    pub epsilon: f64,
    pub seed: u64,
}

impl Default for PadimConfig {
    fn default() -> Self {
        Self {
            channels: 100,
            epsilon: 0.01,
            seed: 0,
        }
    }
}

/// Fitted per-position Gaussians.
#[derive(Debug, Clone)]
pub struct Padim {
    /// `[d]` (u32): the kept channels.
    channels: Tensor,
    /// `[positions, d]`.
    mean: Tensor,
    /// `[positions, d, d]`.
    inverse_covariance: Tensor,
}

impl Padim {
    /// Fits on per-image features, each `[positions, channels]`.
    pub fn fit(
        images: &[Tensor],
        config: &PadimConfig,
        progress: &dyn Progress,
    ) -> Result<Self, Error> {
        let first = images
            .first()
            .ok_or_else(|| Error::InvalidConfig("PaDiM needs training images".into()))?;
        let (positions, width) = first.dims2()?;
        let kept = config.channels.min(width);
        let mut rng = StdRng::seed_from_u64(config.seed);
        let mut chosen: Vec<u32> = sample(&mut rng, width, kept)
            .into_iter()
            .map(|i| i as u32)
            .collect();
        chosen.sort_unstable();
        let channels = Tensor::from_vec(chosen, kept, first.device())?;

        progress.start("gaussians", positions as u64);
        let mut selected = Vec::with_capacity(images.len());
        for image in images {
            if image.dims2()? != (positions, width) {
                return Err(Error::InvalidConfig(
                    "PaDiM needs every image on the same grid (use a fixed input size)".into(),
                ));
            }
            selected.push(image.index_select(&channels, 1)?.to_dtype(DType::F32)?);
        }
        let n = selected.len();
        // [positions, n, d]
        let stacked = Tensor::stack(&selected, 1)?;
        let mean = stacked.mean(1)?; // [positions, d]
        let centred = stacked.broadcast_sub(&mean.unsqueeze(1)?)?;
        let denominator = (n.max(2) - 1) as f64;
        let covariance = centred
            .t()?
            .contiguous()?
            .matmul(&centred.contiguous()?)?
            .affine(1.0 / denominator, 0.0)?; // [positions, d, d]
        let host: Vec<f32> = covariance.flatten_all()?.to_vec1()?;
        let inverses: Vec<f32> = host
            .par_chunks(kept * kept)
            .map(|cov| {
                let inv = invert_spd(cov, kept, config.epsilon);
                progress.advance(1);
                inv
            })
            .collect::<Option<Vec<_>>>()
            .ok_or_else(|| Error::InvalidConfig("covariance is not invertible".into()))?
            .into_iter()
            .flatten()
            .collect();
        progress.finish();
        let inverse_covariance =
            Tensor::from_vec(inverses, (positions, kept, kept), first.device())?;
        Ok(Self {
            channels,
            mean,
            inverse_covariance,
        })
    }

    /// Rebuilds a fitted model from its tensors (as stored in a model file).
    pub fn from_parts(
        channels: Tensor,
        mean: Tensor,
        inverse_covariance: Tensor,
    ) -> Result<Self, Error> {
        let (positions, d) = mean.dims2()?;
        if channels.dims1()? != d || inverse_covariance.dims3()? != (positions, d, d) {
            return Err(Error::InvalidConfig(
                "PaDiM tensors have inconsistent shapes".into(),
            ));
        }
        Ok(Self {
            channels: channels.to_dtype(DType::U32)?,
            mean: mean.to_dtype(DType::F32)?,
            inverse_covariance: inverse_covariance.to_dtype(DType::F32)?,
        })
    }

    pub fn parts(&self) -> [(&'static str, &Tensor); 3] {
        [
            ("padim.channels", &self.channels),
            ("padim.mean", &self.mean),
            ("padim.inverse_covariance", &self.inverse_covariance),
        ]
    }

    pub fn positions(&self) -> usize {
        self.mean.dims()[0]
    }

    /// Mahalanobis distance of every position of `features`
    /// `[positions, channels]`.
    pub fn score(&self, features: &Tensor) -> Result<Vec<f32>, Error> {
        let (positions, _) = features.dims2()?;
        if positions != self.positions() {
            return Err(Error::InvalidConfig(format!(
                "PaDiM was fitted on {} grid positions, got {positions}",
                self.positions()
            )));
        }
        let diff = features
            .index_select(&self.channels, 1)?
            .to_dtype(DType::F32)?
            .sub(&self.mean)?
            .unsqueeze(1)?; // [p, 1, d]
        let left = diff.matmul(&self.inverse_covariance)?; // [p, 1, d]
        let d2: Vec<f32> = (left * diff)?.sum((1, 2))?.to_vec1()?;
        Ok(d2.into_iter().map(|v| v.max(0.0).sqrt()).collect())
    }
}

/// Inverse of `cov + ε·I` (symmetric positive definite) by Cholesky, in f64.
fn invert_spd(cov: &[f32], d: usize, epsilon: f64) -> Option<Vec<f32>> {
    let li = inverse_cholesky_factor(d, |i, j| {
        f64::from(cov[i * d + j]) + if i == j { epsilon } else { 0.0 }
    })?;
    // inv(A) = inv(L)ᵀ inv(L).
    let mut inv = vec![0.0f32; d * d];
    for i in 0..d {
        for j in 0..=i {
            let s: f64 = (i.max(j)..d).map(|k| li[k * d + i] * li[k * d + j]).sum();
            inv[i * d + j] = s as f32;
            inv[j * d + i] = s as f32;
        }
    }
    Some(inv)
}

impl PadimConfig {
    /// Stages 3 + 4 + 5 (a 32 × 32 grid) at 256 × 256.
    pub fn default_features() -> FeatureConfig {
        FeatureConfig::lite0(
            &[Stage::Stage3, Stage::Stage4, Stage::Stage5],
            Resize::Fixed {
                width: 256,
                height: 256,
            },
        )
    }
}

/// PaDiM on the backbone's patch features.
pub struct PadimDetector {
    extractor: FeatureExtractor,
    padim: Padim,
}

impl PadimDetector {
    pub fn fit(
        config: &PadimConfig,
        features: &FeatureConfig,
        inputs: &FitInputs<'_>,
    ) -> Result<Self, Error> {
        let extractor = FeatureExtractor::new(features.clone(), inputs.runtime.device())?;
        let grids = extract_all(&extractor, &inputs.images(), inputs.progress)?;
        let padim = Padim::fit(&grids, config, inputs.progress)?;
        Ok(Self { extractor, padim })
    }

    pub fn load(
        features: &FeatureConfig,
        tensors: &mut HashMap<String, Tensor>,
        path: &Path,
        device: &Device,
    ) -> Result<Self, Error> {
        let padim = Padim::from_parts(
            take(tensors, "padim.channels", path)?,
            take(tensors, "padim.mean", path)?,
            take(tensors, "padim.inverse_covariance", path)?,
        )?;
        Ok(Self {
            extractor: FeatureExtractor::new(features.clone(), device)?,
            padim,
        })
    }
}

impl Detector for PadimDetector {
    fn score(&self, image: &Rgb32FImage) -> Result<DetectorOutput, Error> {
        let grid = self.extractor.extract(image)?;
        let scores = self.padim.score(&grid.features)?;
        Ok(DetectorOutput::peak_of(&grid, scores))
    }

    fn tensors(&self) -> BTreeMap<String, Tensor> {
        self.padim
            .parts()
            .into_iter()
            .map(|(k, t)| (k.to_string(), t.clone()))
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::progress::NoProgress;
    use candle_core::Device;

    #[test]
    fn inverse_times_matrix_is_identity() {
        let cov = [4.0f32, 1.0, 0.5, 1.0, 3.0, 0.2, 0.5, 0.2, 2.0];
        let inv = invert_spd(&cov, 3, 0.0).unwrap();
        for i in 0..3 {
            for j in 0..3 {
                let v: f32 = (0..3).map(|k| cov[i * 3 + k] * inv[k * 3 + j]).sum();
                assert!((v - if i == j { 1.0 } else { 0.0 }).abs() < 1e-5);
            }
        }
    }

    #[test]
    fn outlying_position_scores_highest() {
        let dev = Device::Cpu;
        let images: Vec<Tensor> = (0..30)
            .map(|_| Tensor::randn(0f32, 1.0, (6, 5), &dev).unwrap())
            .collect();
        let model = Padim::fit(&images, &PadimConfig::default(), &NoProgress).unwrap();
        let mut test = vec![0.0f32; 30];
        test[2 * 5..3 * 5].copy_from_slice(&[8.0; 5]);
        let test = Tensor::from_vec(test, (6, 5), &dev).unwrap();
        let scores = model.score(&test).unwrap();
        let worst = scores
            .iter()
            .enumerate()
            .max_by(|a, b| a.1.total_cmp(b.1))
            .unwrap()
            .0;
        assert_eq!(worst, 2);
    }
}
