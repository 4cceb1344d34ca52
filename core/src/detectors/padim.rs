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
use crate::detector::{
    Detector, DetectorOutput, FitInputs, FoldDetector, TileOutputs, score_tiles_with,
};
use crate::features::{FeatureConfig, FeatureExtractor, PatchGrid, Resize, for_each_grid};
use crate::folds::Procedure;
use crate::gaussian::inverse_cholesky_factor;
use crate::model_file::take;
use crate::progress::Progress;
use crate::tiling::Tiling;

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
        let mut builder = PadimBuilder::new(*config);
        for image in images {
            builder.add(image)?;
        }
        builder.finish(progress)
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

/// Images whose features are stacked for one covariance update.
const BATCH: usize = 16;

/// Fits [`Padim`] one image at a time: only the per-position mean and
/// scatter matrix (in f64) and a batch of [`BATCH`] images' kept channels
/// are held, never the whole training set's features.
///
/// Each batch's mean and centred scatter come from one batched matrix
/// product and are merged into the running ones with Chan et al.'s
/// pairwise update, which is as exact as a two-pass covariance.
pub struct PadimBuilder {
    config: PadimConfig,
    /// Grid positions, feature width and kept channels, from the first image.
    shape: Option<(usize, usize, Tensor)>,
    pending: Vec<Tensor>,
    count: usize,
    /// `[positions · d]`.
    mean: Vec<f64>,
    /// `[positions · d · d]`: `Σ (x − mean)(x − mean)ᵀ`.
    scatter: Vec<f64>,
}

impl PadimBuilder {
    pub fn new(config: PadimConfig) -> Self {
        Self {
            config,
            shape: None,
            pending: Vec::with_capacity(BATCH),
            count: 0,
            mean: Vec::new(),
            scatter: Vec::new(),
        }
    }

    /// Adds one image's features `[positions, channels]`.
    pub fn add(&mut self, image: &Tensor) -> Result<(), Error> {
        let dims = image.dims2()?;
        if self.shape.is_none() {
            let (positions, width) = dims;
            let kept = self.config.channels.min(width);
            let mut rng = StdRng::seed_from_u64(self.config.seed);
            let mut chosen: Vec<u32> = sample(&mut rng, width, kept)
                .into_iter()
                .map(|i| i as u32)
                .collect();
            chosen.sort_unstable();
            self.mean = vec![0.0; positions * kept];
            self.scatter = vec![0.0; positions * kept * kept];
            self.shape = Some((
                positions,
                width,
                Tensor::from_vec(chosen, kept, image.device())?,
            ));
        }
        let Some((positions, width, channels)) = &self.shape else {
            return Err(Error::InvalidConfig("PaDiM needs training images".into()));
        };
        if dims != (*positions, *width) {
            return Err(Error::InvalidConfig(
                "PaDiM needs every image on the same grid (use a fixed input size)".into(),
            ));
        }
        let selected = image.index_select(channels, 1)?.to_dtype(DType::F32)?;
        self.pending.push(selected);
        if self.pending.len() == BATCH {
            self.merge_pending()?;
        }
        Ok(())
    }

    fn merge_pending(&mut self) -> Result<(), Error> {
        if self.pending.is_empty() {
            return Ok(());
        }
        let batch = self.pending.len();
        // [positions, batch, d]
        let stacked = Tensor::stack(&self.pending, 1)?;
        self.pending.clear();
        let batch_mean = stacked.mean_keepdim(1)?;
        let centred = stacked.broadcast_sub(&batch_mean)?;
        drop(stacked);
        let batch_scatter: Vec<f32> = centred
            .t()?
            .contiguous()?
            .matmul(&centred.contiguous()?)?
            .flatten_all()?
            .to_vec1()?;
        drop(centred);
        let batch_mean = batch_mean.squeeze(1)?;
        let (_, d) = batch_mean.dims2()?;
        let batch_mean: Vec<f32> = batch_mean.flatten_all()?.to_vec1()?;
        merge_moments(
            (&mut self.mean, &mut self.scatter, self.count),
            (&batch_mean, &batch_scatter, batch),
            d,
        );
        self.count += batch;
        Ok(())
    }

    /// Adds everything `other` has seen ([`merge_moments`]); both must have
    /// kept the same channels, and `other` must hold no pending batch
    /// ([`PadimBuilder::flush`]).
    pub fn absorb(&mut self, other: &PadimBuilder) -> Result<(), Error> {
        self.merge_pending()?;
        if !other.pending.is_empty() {
            return Err(Error::InvalidConfig(
                "a PaDiM builder with pending images cannot be absorbed; flush it first".into(),
            ));
        }
        if other.count == 0 {
            return Ok(());
        }
        if self.count == 0 {
            self.shape.clone_from(&other.shape);
            self.mean.clone_from(&other.mean);
            self.scatter.clone_from(&other.scatter);
            self.count = other.count;
            return Ok(());
        }
        let same = match (&self.shape, &other.shape) {
            (Some((p, w, a)), Some((q, v, b))) => {
                p == q && w == v && a.to_vec1::<u32>()? == b.to_vec1::<u32>()?
            }
            _ => false,
        };
        if !same {
            return Err(Error::InvalidConfig(
                "PaDiM needs every image on the same grid (use a fixed input size)".into(),
            ));
        }
        let d = self.kept()?;
        merge_moments(
            (&mut self.mean, &mut self.scatter, self.count),
            (&other.mean, &other.scatter, other.count),
            d,
        );
        self.count += other.count;
        Ok(())
    }

    /// Folds the pending batch into the running moments.
    pub fn flush(&mut self) -> Result<(), Error> {
        self.merge_pending()
    }

    fn kept(&self) -> Result<usize, Error> {
        match &self.shape {
            Some((_, _, channels)) => Ok(channels.dims1()?),
            None => Err(Error::InvalidConfig("PaDiM needs training images".into())),
        }
    }

    /// An empty builder with the same settings.
    fn empty_like(&self) -> Self {
        Self::new(self.config)
    }

    /// The fitted Gaussians.
    pub fn finish(mut self, progress: &dyn Progress) -> Result<Padim, Error> {
        self.merge_pending()?;
        let Some((positions, _, channels)) = self.shape else {
            return Err(Error::InvalidConfig("PaDiM needs training images".into()));
        };
        let kept = channels.dims1()?;
        let denominator = (self.count.max(2) - 1) as f64;
        let epsilon = self.config.epsilon;
        progress.start("gaussians", positions as u64);
        let inverses: Vec<f32> = self
            .scatter
            .par_chunks(kept * kept)
            .map(|scatter| {
                let inv = invert_spd(kept, |i, j| {
                    scatter[i * kept + j] / denominator + if i == j { epsilon } else { 0.0 }
                });
                progress.advance(1);
                inv
            })
            .collect::<Option<Vec<_>>>()
            .ok_or_else(|| Error::InvalidConfig("covariance is not invertible".into()))?
            .into_iter()
            .flatten()
            .collect();
        progress.finish();
        drop(self.scatter);
        let device = channels.device().clone();
        let inverse_covariance = Tensor::from_vec(inverses, (positions, kept, kept), &device)?;
        let mean: Vec<f32> = self.mean.iter().map(|m| *m as f32).collect();
        Ok(Padim {
            channels,
            mean: Tensor::from_vec(mean, (positions, kept), &device)?,
            inverse_covariance,
        })
    }
}

/// Chan et al.'s pairwise update: the per-position `mean` `[positions · d]`
/// and `scatter` `[positions · d · d]` of `before` samples take in those of
/// `added` more (`other`, in f32 from a batch or f64 from another builder),
/// in f64.
fn merge_moments<T: Copy + Into<f64> + Sync>(
    (mean, scatter, before): (&mut [f64], &mut [f64], usize),
    (other_mean, other_scatter, added): (&[T], &[T], usize),
    d: usize,
) {
    let (before, added) = (before as f64, added as f64);
    let total = before + added;
    let weight = before * added / total;
    mean.par_chunks_mut(d)
        .zip(scatter.par_chunks_mut(d * d))
        .zip(other_mean.par_chunks(d))
        .zip(other_scatter.par_chunks(d * d))
        .for_each(|(((mean, scatter), other_mean), other_scatter)| {
            let delta: Vec<f64> = other_mean
                .iter()
                .zip(mean.iter())
                .map(|(b, m)| Into::<f64>::into(*b) - m)
                .collect();
            for i in 0..d {
                for j in 0..d {
                    scatter[i * d + j] +=
                        Into::<f64>::into(other_scatter[i * d + j]) + delta[i] * delta[j] * weight;
                }
            }
            for (m, dl) in mean.iter_mut().zip(&delta) {
                *m += dl * added / total;
            }
        });
}

/// Inverse of the symmetric positive definite matrix `a(i, j)` by Cholesky,
/// in f64.
fn invert_spd(d: usize, a: impl Fn(usize, usize) -> f64) -> Option<Vec<f32>> {
    let li = inverse_cholesky_factor(d, a)?;
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
    /// One builder per fold, when fitted with folds (until
    /// [`Detector::forget_folds`]).
    fold_sums: Vec<PadimBuilder>,
}

/// PaDiM fitted without one fold, for cross-fitting.
struct PadimWithout<'a> {
    extractor: &'a FeatureExtractor,
    padim: Padim,
}

impl Detector for PadimWithout<'_> {
    fn score(&self, image: &Rgb32FImage) -> Result<DetectorOutput, Error> {
        score_grid(&self.padim, self.extractor.extract(image)?)
    }

    fn score_tiles(&self, tiling: &Tiling, image: &Rgb32FImage) -> TileOutputs {
        score_tiles_of(self.extractor, &self.padim, tiling, image)
    }

    fn tensors(&self) -> BTreeMap<String, Tensor> {
        BTreeMap::new()
    }
}

impl PadimDetector {
    pub fn fit(
        config: &PadimConfig,
        features: &FeatureConfig,
        inputs: &FitInputs<'_>,
    ) -> Result<Self, Error> {
        let extractor = FeatureExtractor::new(features.clone(), inputs.runtime.device())?;
        let progress = inputs.progress;
        // With folds, one builder per fold: the whole fit is their merge,
        // each fold's detector the merge of the others.
        let folds = inputs.folds.map_or(1, |f| f.count());
        let mut builders: Vec<PadimBuilder> =
            (0..folds).map(|_| PadimBuilder::new(*config)).collect();
        progress.start("features", inputs.normal.len() as u64);
        for_each_grid(
            &extractor,
            &inputs.images(),
            |index, _, grid| {
                let fold = inputs.folds.map_or(0, |f| f.of(index));
                builders[fold].add(&grid.features)
            },
            || progress.advance(1),
        )?;
        progress.finish();
        if folds == 1 {
            let padim = builders.remove(0).finish(progress)?;
            return Ok(Self {
                extractor,
                padim,
                fold_sums: Vec::new(),
            });
        }
        let mut all = builders[0].empty_like();
        for builder in &mut builders {
            builder.flush()?;
            all.absorb(builder)?;
        }
        let padim = all.finish(progress)?;
        Ok(Self {
            extractor,
            padim,
            fold_sums: builders,
        })
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
            fold_sums: Vec::new(),
        })
    }
}

/// Every tile's output under `padim` ([`Detector::score_tiles`]).
fn score_tiles_of(
    extractor: &FeatureExtractor,
    padim: &Padim,
    tiling: &Tiling,
    image: &Rgb32FImage,
) -> TileOutputs {
    score_tiles_with(extractor, tiling, image, |_, grid| score_grid(padim, grid))
}

/// The map of one image's patch features under `padim`; its peak is the
/// image score.
fn score_grid(padim: &Padim, grid: PatchGrid) -> Result<DetectorOutput, Error> {
    let scores = padim.score(&grid.features)?;
    Ok(DetectorOutput::peak_of(&grid, scores))
}

impl Detector for PadimDetector {
    fn score(&self, image: &Rgb32FImage) -> Result<DetectorOutput, Error> {
        score_grid(&self.padim, self.extractor.extract(image)?)
    }

    fn score_tiles(&self, tiling: &Tiling, image: &Rgb32FImage) -> TileOutputs {
        score_tiles_of(&self.extractor, &self.padim, tiling, image)
    }

    fn without_fold(&self, fold: usize) -> Result<Option<FoldDetector<'_>>, Error> {
        if self.fold_sums.len() < 2 {
            return Ok(None);
        }
        let mut others = self.fold_sums[0].empty_like();
        for (f, builder) in self.fold_sums.iter().enumerate() {
            if f != fold {
                others.absorb(builder)?;
            }
        }
        if others.count < 2 {
            return Ok(None);
        }
        Ok(Some((
            Box::new(PadimWithout {
                extractor: &self.extractor,
                padim: others.finish(&crate::progress::NoProgress)?,
            }),
            Procedure::GaussianFolds,
        )))
    }

    fn forget_folds(&mut self) {
        self.fold_sums = Vec::new();
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
        let inv = invert_spd(3, |i, j| f64::from(cov[i * 3 + j])).unwrap();
        for i in 0..3 {
            for j in 0..3 {
                let v: f32 = (0..3).map(|k| cov[i * 3 + k] * inv[k * 3 + j]).sum();
                assert!((v - if i == j { 1.0 } else { 0.0 }).abs() < 1e-5);
            }
        }
    }

    /// Two-pass mean and covariance in f64, the textbook way.
    fn two_pass(images: &[Vec<f32>], positions: usize, d: usize) -> (Vec<f64>, Vec<f64>) {
        let n = images.len() as f64;
        let mut mean = vec![0f64; positions * d];
        for image in images {
            for (m, v) in mean.iter_mut().zip(image) {
                *m += f64::from(*v) / n;
            }
        }
        let mut cov = vec![0f64; positions * d * d];
        for image in images {
            for p in 0..positions {
                for i in 0..d {
                    for j in 0..d {
                        let a = f64::from(image[p * d + i]) - mean[p * d + i];
                        let b = f64::from(image[p * d + j]) - mean[p * d + j];
                        cov[(p * d + i) * d + j] += a * b / (n - 1.0).max(1.0);
                    }
                }
            }
        }
        (mean, cov)
    }

    #[test]
    fn streaming_fit_equals_two_pass_covariance() {
        let dev = Device::Cpu;
        let (positions, d) = (5, 4);
        // 37 images: two full batches and a partial one; an offset far from
        // zero, where one-pass sums of squares would lose digits.
        for count in [1usize, 2, 16, 37] {
            let images: Vec<Vec<f32>> = (0..count)
                .map(|k| {
                    (0..positions * d)
                        .map(|i| 1000.0 + ((k * 31 + i * 17) % 23) as f32 * 0.37 + (i % d) as f32)
                        .collect()
                })
                .collect();
            let tensors: Vec<Tensor> = images
                .iter()
                .map(|v| Tensor::from_slice(v, (positions, d), &dev).unwrap())
                .collect();
            let config = PadimConfig {
                channels: d,
                epsilon: 0.01,
                seed: 0,
            };
            let model = Padim::fit(&tensors, &config, &NoProgress).unwrap();
            let (mean, cov) = two_pass(&images, positions, d);
            let got_mean: Vec<f32> = model.mean.flatten_all().unwrap().to_vec1().unwrap();
            for (g, w) in got_mean.iter().zip(&mean) {
                assert!((f64::from(*g) - w).abs() < 1e-3, "{count}: mean {g} vs {w}");
            }
            let inverse: Vec<f32> = model
                .inverse_covariance
                .flatten_all()
                .unwrap()
                .to_vec1()
                .unwrap();
            for p in 0..positions {
                for i in 0..d {
                    for j in 0..d {
                        // (cov + εI) · inverse = I.
                        let v: f64 = (0..d)
                            .map(|k| {
                                let c = cov[(p * d + i) * d + k] + if i == k { 0.01 } else { 0.0 };
                                c * f64::from(inverse[(p * d + k) * d + j])
                            })
                            .sum();
                        let want = if i == j { 1.0 } else { 0.0 };
                        assert!((v - want).abs() < 1e-3, "{count} images, position {p}: {v}");
                    }
                }
            }
        }
    }

    #[test]
    fn images_on_different_grids_are_an_error() {
        let dev = Device::Cpu;
        let images = [
            Tensor::zeros((6, 5), DType::F32, &dev).unwrap(),
            Tensor::zeros((4, 5), DType::F32, &dev).unwrap(),
        ];
        assert!(Padim::fit(&images, &PadimConfig::default(), &NoProgress).is_err());
        assert!(Padim::fit(&[], &PadimConfig::default(), &NoProgress).is_err());
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
