//! Feature-space synthetic anomalies: a SuperSimpleNet-style detector
//! (Rolih et al., "SuperSimpleNet: unifying unsupervised and supervised
//! learning for fast and reliable surface defect detection", ICPR 2024;
//! after SimpleNet, Liu et al., CVPR 2023).
//!
//! The frozen backbone's patch features ([`FeatureExtractor::extract`]:
//! stages averaged over 3×3 neighbourhoods, upsampled and concatenated) are
//! whitened position by position ([`crate::gaussian`], as flow and recon
//! do: a network shared by all positions cannot know where things belong on
//! an aligned part), then pass a trainable feature adaptor (a 1×1
//! convolution, initialised to the identity) and a small segmentation head
//! (a `k × k` convolution, LeakyReLU, a 1×1 convolution to one logit per
//! position). No defect is ever seen: during training Gaussian noise of
//! standard deviation `noise_std` is added to the whitened features inside
//! random blobs of the feature grid (SuperSimpleNet draws its blobs from
//! Perlin noise), and the adaptor and head learn, with a class-balanced
//! logistic loss, to tell noised positions from untouched ones.
//! SuperSimpleNet adds the noise after the adaptor
//! (`noise_after_adaptor`); there the adaptor learnt to shrink the
//! features until the noise stood out, and held-back defects were found
//! less well (README, "what was tried"). The patch score is the
//! logit; the detector upsamples and blurs it into the anomaly map, and the
//! image score is the map's peak (SuperSimpleNet adds a classification head;
//! the peak keeps the one-map-one-score rule of the other detectors).
//!
//! Which epoch to keep is decided on held-back data only, never on a test
//! set (SimpleNet's published numbers kept the epoch that scored best on the
//! test set): a seeded tenth of the training files is held back, and every
//! one of them also gets one image-space synthetic defect of each kind
//! ([`crate::synthetic`]: cut-paste, blotch, scratch), whose features are
//! computed once. After every epoch the criterion is `1 − AUROC` of the
//! held-back normal images against their defective copies, plus a
//! 10⁻⁶-weighted tie-break by the noise loss on the held-back normals
//! (fixed noise); the lowest criterion's weights are kept, and training
//! stops after `patience` epochs without a lower one (see [`crate::train`]).
//! Training never sees the image-space defects, so they judge it without
//! having been fitted to.
//!
//! The whitening is per position, so every image must share one grid (a
//! fixed input size).

use std::cell::{Cell, RefCell};
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::Path;
use std::time::Instant;

use candle_core::{DType, Device, Tensor};
use flawscope_models::Stage;
use image::Rgb32FImage;
use rand::{Rng, SeedableRng, rngs::StdRng};
use rand_distr::StandardNormal;
use serde::{Deserialize, Serialize};

use crate::Error;
use crate::anomaly_map::DEFAULT_BLUR_SIGMA;
use crate::detector::{Detector, DetectorOutput, FitInputs, ScoreGrid};
use crate::features::{FeatureConfig, FeatureExtractor, Resize};
use crate::gaussian;
use crate::metrics::image_auroc;
use crate::model_file::take;
use crate::progress::Progress;
use crate::synthetic::{DefectKind, with_defect};
use crate::tiling::ImageSource;
use crate::train::{
    Initialiser, Trainable, TrainingConfig, TrainingReport, conv_same, linear, split_validation,
    train,
};

const NAMES: [&str; 8] = [
    "ssn.mean",
    "ssn.whiten",
    "ssn.adapt.w",
    "ssn.adapt.b",
    "ssn.head1.w",
    "ssn.head1.b",
    "ssn.head2.w",
    "ssn.head2.b",
];
/// LeakyReLU's slope below zero (SuperSimpleNet's).
const LEAK: f64 = 0.2;
/// Weight of the held-back noise loss in the validation criterion: small
/// enough to only break ties of the synthetic-defect AUROC.
const TIE_BREAK: f64 = 1e-6;
/// Largest convolution kernel of the head.
const MAX_KERNEL: usize = 7;
/// Images whitened or scored at once outside the training steps.
const EVAL_CHUNK: usize = 32;

#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct SuperSimpleNetConfig {
    /// Width of the segmentation head's hidden layer.
    pub hidden: usize,
    /// Kernel side of the head's first convolution (odd; 1 looks at one
    /// position, 3 at its neighbours too).
    pub head_kernel: usize,
    /// Standard deviation of the noise that makes anomalous features, in
    /// units of the whitened features (whose normal spread is 1 per
    /// channel).
    pub noise_std: f64,
    /// Add the noise after the adaptor, as SuperSimpleNet does, instead of
    /// before it. After it, the adaptor can shrink the features until the
    /// fixed-size noise is trivially told apart (see the README).
    #[serde(default)]
    pub noise_after_adaptor: bool,
    /// `batch_size` counts images.
    pub training: TrainingConfig,
}

impl Default for SuperSimpleNetConfig {
    fn default() -> Self {
        Self {
            hidden: 128,
            head_kernel: 1,
            // Chosen on held-back synthetic defects (README).
            noise_std: 2.0,
            noise_after_adaptor: false,
            training: TrainingConfig {
                batch_size: 8,
                patience: 3,
                ..TrainingConfig::default()
            },
        }
    }
}

impl SuperSimpleNetConfig {
    fn validate(&self) -> Result<(), Error> {
        self.training.validate()?;
        if self.hidden == 0 {
            return Err(Error::InvalidConfig(
                "the segmentation head needs at least one hidden unit".into(),
            ));
        }
        if self.head_kernel.is_multiple_of(2) || self.head_kernel > MAX_KERNEL {
            return Err(Error::InvalidConfig(format!(
                "the head's kernel must be odd and at most {MAX_KERNEL}, got {}",
                self.head_kernel
            )));
        }
        if !(self.noise_std > 0.0 && self.noise_std <= 100.0) {
            return Err(Error::InvalidConfig(format!(
                "the noise's standard deviation must be in (0, 100], got {}",
                self.noise_std
            )));
        }
        Ok(())
    }

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

/// Patch features for a fit, one `[positions, C]` tensor per image (or
/// tile), all on one grid.
#[derive(Debug, Clone)]
pub struct FeatureSet {
    /// The images the weights and whitening are fitted on.
    pub train: Vec<Tensor>,
    /// Held-back normal images.
    pub validation: Vec<Tensor>,
    /// Synthetic-defect copies of the held-back images.
    pub defects: Vec<Tensor>,
    /// `(height, width)` of the feature grid.
    pub grid: (usize, usize),
    /// The network input size the grid was computed at.
    pub input_size: (u32, u32),
}

/// What happened during a fit.
#[derive(Debug, Clone, PartialEq)]
pub struct FitReport {
    pub training: TrainingReport,
    /// Per epoch: AUROC of the held-back normal images against their
    /// synthetic-defect copies (empty without held-back images).
    pub synthetic_auroc: Vec<f64>,
    /// Per epoch: the noise loss on the held-back normal images.
    pub noise_loss: Vec<f64>,
}

/// A fitted (or training) adaptor and segmentation head.
#[derive(Debug, Clone)]
pub struct SuperSimpleNet {
    /// In [`NAMES`] order.
    parts: Vec<Tensor>,
    tensors: BTreeMap<String, Tensor>,
    kernel: usize,
    noise_after_adaptor: bool,
}

impl SuperSimpleNet {
    fn build(
        tensors: BTreeMap<String, Tensor>,
        config: &SuperSimpleNetConfig,
    ) -> Result<Self, Error> {
        let kernel = config.head_kernel;
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
        let (fan_in, hidden) = parts[4].dims2()?;
        let consistent = kernel % 2 == 1
            && kernel <= MAX_KERNEL
            && parts[2].dims2()? == (c, c)
            && parts[3].dims1()? == c
            && fan_in == kernel * kernel * c
            && parts[5].dims1()? == hidden
            && parts[6].dims2()? == (hidden, 1)
            && parts[7].dims1()? == 1;
        if !consistent {
            return Err(Error::InvalidConfig(
                "SuperSimpleNet tensors have inconsistent shapes".into(),
            ));
        }
        Ok(Self {
            parts,
            tensors,
            kernel,
            noise_after_adaptor: config.noise_after_adaptor,
        })
    }

    /// Rebuilds a fitted network from a model file's tensors.
    pub fn from_tensors(
        tensors: &mut HashMap<String, Tensor>,
        path: &Path,
        config: &SuperSimpleNetConfig,
    ) -> Result<Self, Error> {
        let mut named = BTreeMap::new();
        for n in NAMES {
            named.insert(n.to_string(), take(tensors, n, path)?);
        }
        Self::build(named, config)
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

    /// Whitens images `[n, positions, C]` into maps `[n, h, w, C]`.
    fn whiten(&self, x: &Tensor, grid: (usize, usize)) -> Result<Tensor, Error> {
        let (n, positions, c) = x.dims3()?;
        if c != self.channels() || positions != self.positions() || positions != grid.0 * grid.1 {
            return Err(Error::InvalidConfig(format!(
                "the model was fitted on {} positions × {} channels, got a {}×{} grid × {c} \
                 (use the model's fixed input size)",
                self.positions(),
                self.channels(),
                grid.0,
                grid.1
            )));
        }
        let z = gaussian::apply(&self.parts[0], &self.parts[1], x)?;
        Ok(z.reshape((n, grid.0, grid.1, c))?)
    }

    /// One logit per position `[B, h, w]` of whitened maps `[B, h, w, C]`,
    /// with `noise` (same shape) added before or after the adaptor.
    fn logits(&self, z: &Tensor, noise: Option<&Tensor>) -> Result<Tensor, Error> {
        let p = &self.parts;
        let adapted = match noise {
            None => linear(z, &p[2], &p[3])?,
            Some(noise) if self.noise_after_adaptor => (linear(z, &p[2], &p[3])? + noise)?,
            Some(noise) => linear(&(z + noise)?, &p[2], &p[3])?,
        };
        let h = conv_same(&adapted, &p[4], &p[5], self.kernel)?;
        // LeakyReLU as 0.8·relu(x) + 0.2·x: differentiable with candle's ops.
        let h = ((h.relu()? * (1.0 - LEAK))? + (h * LEAK)?)?;
        Ok(linear(&h, &p[6], &p[7])?.squeeze(3)?)
    }

    /// Patch scores (logits) of one image's features `[positions, C]` on a
    /// `(height, width)` grid.
    pub fn score(&self, features: &Tensor, grid: (usize, usize)) -> Result<Vec<f32>, Error> {
        let z = self.whiten(&features.unsqueeze(0)?, grid)?;
        Ok(self.logits(&z, None)?.flatten_all()?.to_vec1()?)
    }

    /// Fits on the normal images (or tiles) of `images`: whole files are
    /// held back for validation, and each held-back one gets a synthetic
    /// defect of every kind.
    pub fn fit(
        extractor: &FeatureExtractor,
        images: &ImageSource<'_>,
        config: &SuperSimpleNetConfig,
        started: Instant,
        progress: &dyn Progress,
    ) -> Result<(Self, FitReport), Error> {
        config.validate()?;
        let training = &config.training;
        let (_, held) = split_validation(
            images.paths.len(),
            training.validation_fraction,
            training.seed,
        );
        let held: BTreeSet<usize> = held.into_iter().collect();
        let file = Cell::new(0usize);
        let mut set = FeatureSet {
            train: Vec::new(),
            validation: Vec::new(),
            defects: Vec::new(),
            grid: (0, 0),
            input_size: (0, 0),
        };
        let mut copies = 0usize;
        progress.start("features", images.paths.len() as u64);
        images.for_each(
            |_, image| {
                let grid = extractor.extract(image)?;
                let shape = (grid.grid_height, grid.grid_width);
                if set.train.is_empty() && set.validation.is_empty() {
                    (set.grid, set.input_size) = (shape, grid.input_size);
                } else if shape != set.grid {
                    return Err(Error::InvalidConfig(
                        "SuperSimpleNet needs every image on the same grid (use a fixed input size)"
                            .into(),
                    ));
                }
                if held.contains(&file.get()) {
                    set.validation.push(grid.features);
                    for kind in DefectKind::LOCAL {
                        let copy = with_defect(image, kind, copies);
                        set.defects.push(extractor.extract(&copy)?.features);
                    }
                    copies += 1;
                } else {
                    set.train.push(grid.features);
                }
                Ok(())
            },
            || {
                file.set(file.get() + 1);
                progress.advance(1);
            },
        )?;
        progress.finish();
        Self::fit_features(&set, config, started, progress)
    }

    /// Fits on precomputed patch features.
    pub fn fit_features(
        set: &FeatureSet,
        config: &SuperSimpleNetConfig,
        started: Instant,
        progress: &dyn Progress,
    ) -> Result<(Self, FitReport), Error> {
        config.validate()?;
        let first = set
            .train
            .first()
            .ok_or_else(|| Error::InvalidConfig("no training images".into()))?;
        let device = first.device().clone();
        let (positions, c) = first.dims2()?;
        let (gh, gw) = set.grid;
        if positions == 0 || c == 0 || positions != gh * gw {
            return Err(Error::InvalidConfig(format!(
                "{positions} feature rows do not fill a {gh}×{gw} grid"
            )));
        }
        for image in set.train.iter().chain(&set.validation).chain(&set.defects) {
            if image.dims2()? != (positions, c) {
                return Err(Error::InvalidConfig(
                    "SuperSimpleNet needs every image on the same grid (use a fixed input size)"
                        .into(),
                ));
            }
        }
        let training = &config.training;
        let stack = |images: &[Tensor]| -> Result<Tensor, Error> {
            Ok(Tensor::stack(images, 0)?.to_dtype(DType::F32)?)
        };
        let raw_train = stack(&set.train)?;
        let (mean, whiten) = gaussian::fit(&raw_train)?;

        let mut init = Initialiser::new(training.seed, &device);
        let k = config.head_kernel;
        let hidden = config.hidden;
        let bound1 = 1.0 / ((k * k * c) as f32).sqrt();
        let bound2 = 1.0 / (hidden as f32).sqrt();
        let weights = BTreeMap::from([
            // The identity: the untrained adaptor passes the whitened
            // features through.
            (
                "ssn.adapt.w".to_string(),
                Tensor::eye(c, DType::F32, &device)?,
            ),
            ("ssn.adapt.b".to_string(), init.zeros(&[c])?),
            (
                "ssn.head1.w".to_string(),
                init.uniform(&[k * k * c, hidden], bound1)?,
            ),
            ("ssn.head1.b".to_string(), init.uniform(&[hidden], bound1)?),
            (
                "ssn.head2.w".to_string(),
                init.uniform(&[hidden, 1], bound2)?,
            ),
            ("ssn.head2.b".to_string(), init.uniform(&[1], bound2)?),
        ]);
        let fixed = BTreeMap::from([
            ("ssn.mean".to_string(), mean),
            ("ssn.whiten".to_string(), whiten),
        ]);
        let (trainable, live) = Trainable::new(weights, &fixed)?;
        let model = Self::build(live, config)?;

        let whiten_all = |images: &[Tensor]| -> Result<Option<Tensor>, Error> {
            if images.is_empty() {
                return Ok(None);
            }
            let chunks = images
                .chunks(EVAL_CHUNK)
                .map(|chunk| model.whiten(&stack(chunk)?, set.grid))
                .collect::<Result<Vec<_>, _>>()?;
            Ok(Some(Tensor::cat(&chunks, 0)?))
        };
        let train_z = whiten_all(&set.train)?
            .ok_or_else(|| Error::InvalidConfig("no training images".into()))?;
        drop(raw_train);
        let val_z = whiten_all(&set.validation)?;
        let defect_z = whiten_all(&set.defects)?;

        let noise = Noise {
            grid: set.grid,
            channels: c,
            std: config.noise_std,
            device: device.clone(),
        };
        let mut rng = StdRng::seed_from_u64(training.seed ^ 0x5155_0157);
        let mut batch_loss = |batch: &[usize]| -> Result<Tensor, Error> {
            let ids = Tensor::from_vec(
                batch.iter().map(|&i| i as u32).collect::<Vec<_>>(),
                batch.len(),
                &device,
            )?;
            let sample = noise.sample(batch.len(), &mut rng)?;
            let logits = model.logits(&train_z.index_select(&ids, 0)?, Some(&sample.noise))?;
            sample.loss(&logits)
        };

        // Fixed noise for the held-back images, so that epochs compare.
        let val_noise = match &val_z {
            Some(z) => Some(noise.sample(
                z.dim(0)?,
                &mut StdRng::seed_from_u64(training.seed ^ 0x0ba1_da7e),
            )?),
            None => None,
        };
        let history = RefCell::new((Vec::new(), Vec::new()));
        let image_scores = |maps: &Tensor| -> Result<Vec<f32>, Error> {
            let mut scores = Vec::with_capacity(maps.dim(0)?);
            for start in (0..maps.dim(0)?).step_by(EVAL_CHUNK) {
                let len = EVAL_CHUNK.min(maps.dim(0)? - start);
                let logits = model.logits(&maps.narrow(0, start, len)?, None)?.detach();
                for row in logits.flatten_from(1)?.to_vec2::<f32>()? {
                    let grid = ScoreGrid {
                        width: gw,
                        height: gh,
                        values: row,
                        input_size: set.input_size,
                        blur_sigma: DEFAULT_BLUR_SIGMA,
                    };
                    scores.push(grid.to_map(set.input_size)?.max());
                }
            }
            Ok(scores)
        };
        let mut validation = || -> Result<Option<f64>, Error> {
            let (Some(z), Some(sample)) = (&val_z, &val_noise) else {
                return Ok(None);
            };
            let logits = model.logits(z, Some(&sample.noise))?.detach();
            let loss = f64::from(sample.loss(&logits)?.to_scalar::<f32>()?);
            let auroc = match &defect_z {
                Some(defects) => {
                    let normal = image_scores(z)?;
                    let defective = image_scores(defects)?;
                    let labels: Vec<bool> = std::iter::repeat_n(false, normal.len())
                        .chain(std::iter::repeat_n(true, defective.len()))
                        .collect();
                    image_auroc(&[normal, defective].concat(), &labels)?
                }
                None => 1.0,
            };
            let mut h = history.borrow_mut();
            h.0.push(auroc);
            h.1.push(loss);
            Ok(Some((1.0 - auroc) + TIE_BREAK * loss))
        };
        let deadline = training
            .max_minutes
            .map(|m| started + std::time::Duration::from_secs_f64(m * 60.0));
        let report = train(
            &trainable,
            training,
            set.train.len(),
            deadline,
            progress,
            &mut batch_loss,
            &mut validation,
        )?;
        let mut tensors = fixed;
        tensors.extend(trainable.values()?);
        let (synthetic_auroc, noise_loss) = history.into_inner();
        Ok((
            Self::build(tensors, config)?,
            FitReport {
                training: report,
                synthetic_auroc,
                noise_loss,
            },
        ))
    }
}

/// Draws the anomalous features' noise: Gaussian noise inside random
/// elliptical blobs of the feature grid, zero elsewhere.
struct Noise {
    grid: (usize, usize),
    channels: usize,
    std: f64,
    device: Device,
}

/// A batch's noise `[B, h, w, C]` and its mask `[B, h, w]` (1: noised).
struct NoiseSample {
    noise: Tensor,
    mask: Tensor,
    noised: usize,
    clean: usize,
}

impl Noise {
    fn sample(&self, images: usize, rng: &mut StdRng) -> Result<NoiseSample, Error> {
        let (h, w) = self.grid;
        let c = self.channels;
        let mut mask = vec![0f32; images * h * w];
        let mut noise = vec![0f32; images * h * w * c];
        // Blob radii up to a quarter of the grid's longer side.
        let max_radius = (h.max(w) as f64 / 4.0).max(1.0);
        for image in 0..images {
            let cells = &mut mask[image * h * w..(image + 1) * h * w];
            for _ in 0..rng.random_range(1..=3) {
                let (cy, cx) = (
                    rng.random_range(0.0..h as f64),
                    rng.random_range(0.0..w as f64),
                );
                let (ry, rx) = (
                    rng.random_range(0.5..=max_radius),
                    rng.random_range(0.5..=max_radius),
                );
                for y in 0..h {
                    for x in 0..w {
                        let dy = (y as f64 + 0.5 - cy) / ry;
                        let dx = (x as f64 + 0.5 - cx) / rx;
                        if dy * dy + dx * dx <= 1.0 {
                            cells[y * w + x] = 1.0;
                        }
                    }
                }
                // The blob's own cell, however thin the blob.
                cells[(cy as usize).min(h - 1) * w + (cx as usize).min(w - 1)] = 1.0;
            }
        }
        for (cell, &m) in mask.iter().enumerate() {
            if m > 0.0 {
                for v in &mut noise[cell * c..(cell + 1) * c] {
                    *v = (rng.sample::<f64, _>(StandardNormal) * self.std) as f32;
                }
            }
        }
        let noised = mask.iter().filter(|m| **m > 0.0).count();
        Ok(NoiseSample {
            noise: Tensor::from_vec(noise, (images, h, w, c), &self.device)?,
            mask: Tensor::from_vec(mask, (images, h, w), &self.device)?,
            noised,
            clean: images * h * w - noised,
        })
    }
}

impl NoiseSample {
    /// Class-balanced logistic loss of `logits` `[B, h, w]`: the mean over
    /// noised positions of `softplus(−s)` plus the mean over clean ones of
    /// `softplus(s)`.
    fn loss(&self, logits: &Tensor) -> Result<Tensor, Error> {
        // softplus(x) = max(x, 0) + ln(1 + e^{−|x|}), stable for any x.
        let softplus = |x: &Tensor| -> Result<Tensor, Error> {
            Ok((x.relu()? + x.abs()?.neg()?.exp()?.affine(1.0, 1.0)?.log()?)?)
        };
        let noised = (softplus(&logits.neg()?)? * &self.mask)?
            .sum_all()?
            .affine(1.0 / self.noised.max(1) as f64, 0.0)?;
        let clean = (softplus(logits)? * self.mask.affine(-1.0, 1.0)?)?
            .sum_all()?
            .affine(1.0 / self.clean.max(1) as f64, 0.0)?;
        Ok((noised + clean)?)
    }
}

/// The adaptor and segmentation head on the backbone's patch features.
pub struct SuperSimpleNetDetector {
    extractor: FeatureExtractor,
    net: SuperSimpleNet,
}

impl SuperSimpleNetDetector {
    /// A detector from a fitted network and the extractor it was fitted on.
    pub fn new(extractor: FeatureExtractor, net: SuperSimpleNet) -> Self {
        Self { extractor, net }
    }

    pub fn fit(
        config: &SuperSimpleNetConfig,
        features: &FeatureConfig,
        inputs: &FitInputs<'_>,
    ) -> Result<Self, Error> {
        let started = Instant::now();
        let extractor = FeatureExtractor::new(features.clone(), inputs.runtime.device())?;
        let (net, _) = SuperSimpleNet::fit(
            &extractor,
            &inputs.images(),
            config,
            started,
            inputs.progress,
        )?;
        Ok(Self { extractor, net })
    }

    pub fn load(
        config: &SuperSimpleNetConfig,
        features: &FeatureConfig,
        tensors: &mut HashMap<String, Tensor>,
        path: &Path,
        device: &Device,
    ) -> Result<Self, Error> {
        Ok(Self {
            net: SuperSimpleNet::from_tensors(tensors, path, config)?,
            extractor: FeatureExtractor::new(features.clone(), device)?,
        })
    }
}

impl Detector for SuperSimpleNetDetector {
    fn score(&self, image: &Rgb32FImage) -> Result<DetectorOutput, Error> {
        let grid = self.extractor.extract(image)?;
        let scores = self
            .net
            .score(&grid.features, (grid.grid_height, grid.grid_width))?;
        Ok(DetectorOutput::peak_of(&grid, scores))
    }

    fn tensors(&self) -> BTreeMap<String, Tensor> {
        self.net.tensors().clone()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::progress::NoProgress;

    const GRID: (usize, usize) = (4, 4);
    const CHANNELS: usize = 8;

    /// `n` images of correlated random features `[16, 8]`; `shift` adds a
    /// constant to the first channels of the positions in `rows`.
    fn images(n: usize, seed: u64, shift: f32, rows: &[usize]) -> Vec<Tensor> {
        let mut init = Initialiser::new(seed, &Device::Cpu);
        let mix = Initialiser::new(99, &Device::Cpu)
            .uniform(&[CHANNELS, CHANNELS], 1.0)
            .unwrap();
        (0..n)
            .map(|_| {
                let x = init
                    .uniform(&[GRID.0 * GRID.1, CHANNELS], 1.0)
                    .unwrap()
                    .matmul(&mix)
                    .unwrap();
                let mut bump = vec![0f32; GRID.0 * GRID.1 * CHANNELS];
                for &r in rows {
                    for v in &mut bump[r * CHANNELS..r * CHANNELS + 3] {
                        *v = shift;
                    }
                }
                (x + Tensor::from_vec(bump, (GRID.0 * GRID.1, CHANNELS), &Device::Cpu).unwrap())
                    .unwrap()
            })
            .collect()
    }

    fn set() -> FeatureSet {
        FeatureSet {
            train: images(40, 1, 0.0, &[]),
            validation: images(6, 2, 0.0, &[]),
            defects: images(6, 3, 2.0, &[5, 6]),
            grid: GRID,
            input_size: (64, 64),
        }
    }

    fn config(epochs: usize) -> SuperSimpleNetConfig {
        SuperSimpleNetConfig {
            hidden: 16,
            head_kernel: 1,
            noise_std: 1.0,
            noise_after_adaptor: false,
            training: TrainingConfig {
                epochs,
                max_minutes: None,
                seed: 3,
                learning_rate: 1e-2,
                weight_decay: 0.0,
                batch_size: 4,
                validation_fraction: 0.0,
                patience: epochs,
            },
        }
    }

    fn fit(config: &SuperSimpleNetConfig) -> (SuperSimpleNet, FitReport) {
        SuperSimpleNet::fit_features(&set(), config, Instant::now(), &NoProgress).unwrap()
    }

    #[test]
    fn learns_to_score_shifted_positions_above_normal_ones() {
        let (net, report) = fit(&config(8));
        let history = &report.training.history;
        assert!(
            history.last().unwrap().train < history[0].train,
            "{history:?}"
        );
        assert_eq!(report.synthetic_auroc.len(), history.len());
        // Fresh images: position 9 shifted far out, the rest normal.
        let mut above = 0;
        let tests = images(10, 4, 4.0, &[9]);
        for image in &tests {
            let scores = net.score(image, GRID).unwrap();
            let normal_max = scores
                .iter()
                .enumerate()
                .filter(|(i, _)| *i != 9)
                .map(|(_, s)| *s)
                .fold(f32::MIN, f32::max);
            above += usize::from(scores[9] > normal_max);
        }
        assert!(
            above >= 8,
            "shifted position on top in {above} of 10 images"
        );
    }

    #[test]
    fn the_same_seed_gives_the_same_weights_and_another_seed_does_not() {
        let (a, report_a) = fit(&config(2));
        let (b, report_b) = fit(&config(2));
        assert_eq!(report_a, report_b);
        let probe = &images(1, 7, 0.0, &[])[0];
        let (sa, sb) = (a.score(probe, GRID).unwrap(), b.score(probe, GRID).unwrap());
        assert_eq!(sa, sb);
        let mut other = config(2);
        other.training.seed = 4;
        let (c, _) = fit(&other);
        assert_ne!(sa, c.score(probe, GRID).unwrap());
    }

    #[test]
    fn saved_tensors_score_identically_and_bad_ones_are_refused() {
        let config = config(2);
        let (net, _) = fit(&config);
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("ssn.flawscope");
        let detector = crate::detectors::DetectorConfig::SuperSimpleNet(config);
        crate::model_file::save(&path, &detector, net.tensors()).unwrap();
        let (loaded_config, mut tensors): (crate::detectors::DetectorConfig, _) =
            crate::model_file::load(&path, &Device::Cpu).unwrap();
        assert_eq!(loaded_config, detector);
        let loaded = SuperSimpleNet::from_tensors(&mut tensors, &path, &config).unwrap();
        let probe = &images(1, 8, 1.0, &[2])[0];
        let bits = |n: &SuperSimpleNet| -> Vec<u32> {
            n.score(probe, GRID)
                .unwrap()
                .iter()
                .map(|s| s.to_bits())
                .collect()
        };
        assert_eq!(bits(&net), bits(&loaded));
        // A wrong grid or kernel is an error, not a panic.
        assert!(loaded.score(&images(1, 8, 0.0, &[])[0], (3, 4)).is_err());
        let mut three = config;
        three.head_kernel = 3;
        let mut named: HashMap<String, Tensor> = net.tensors().clone().into_iter().collect();
        assert!(SuperSimpleNet::from_tensors(&mut named, &path, &three).is_err());
    }

    #[test]
    fn bad_settings_are_refused() {
        for bad in [
            SuperSimpleNetConfig {
                hidden: 0,
                ..config(1)
            },
            SuperSimpleNetConfig {
                head_kernel: 2,
                ..config(1)
            },
            SuperSimpleNetConfig {
                noise_std: f64::NAN,
                ..config(1)
            },
            SuperSimpleNetConfig {
                noise_std: 0.0,
                ..config(1)
            },
        ] {
            assert!(
                SuperSimpleNet::fit_features(&set(), &bad, Instant::now(), &NoProgress).is_err()
            );
        }
        let mut mismatched = set();
        mismatched.grid = (2, 2);
        assert!(
            SuperSimpleNet::fit_features(&mismatched, &config(1), Instant::now(), &NoProgress)
                .is_err()
        );
    }
}
