//! A FastFlow-style 2-D normalizing flow (Yu et al., 2021) on frozen
//! backbone stages.
//!
//! Each configured stage gets its own flow. Its features are first whitened
//! position by position ([`crate::gaussian`]: a fixed, invertible affine
//! layer fitted on the training images, where FastFlow has a layer norm),
//! then pass through `blocks` affine coupling blocks. A block permutes the channels with a fixed random permutation,
//! splits them in two halves, and lets a small convolutional subnet of the
//! first half (conv → ReLU → conv; 3×3 kernels in even blocks and 1×1 in
//! odd ones, as FastFlow alternates them) predict a log-scale `s` and a
//! shift `t` for the second half: `y₂ = x₂ · exp(s) + t`. The log-scale is
//! soft-clamped, `s = c · tanh(ŝ / c)`, which keeps training stable. The
//! subnet's last layer starts at zero, so the untrained flow is the
//! identity.
//!
//! Training maximises the likelihood of normal features under a standard
//! normal latent: the loss is the negative log-likelihood per channel,
//! `(½‖z‖² − Σ s) / C`, averaged over positions and summed over stages.
//! Backbone features of all training images are computed once; only the
//! flows are trained (see [`crate::train`] for seeding, validation and early
//! stopping).
//!
//! The anomaly map is the same per-channel negative log-likelihood at every
//! position, each stage upsampled bilinearly to the finest stage's grid and
//! averaged; the detector then upsamples and blurs it like PaDiM's, and the
//! image score is the peak of that smoothed map.
//!
//! All images must share one grid (batches are stacked, and the whitening
//! is per position), so the flow needs a fixed input size.
//!
//! Departures from FastFlow, for the CPU budget: 4 blocks with subnets half
//! as wide as the stage (FastFlow: 8 blocks, full width), a few epochs
//! instead of hundreds. And the per-position whitening: with per-channel
//! standardisation alone the trained flow reached only ≈ 0.70 image AUROC
//! on MTD (the tiles are aligned, a shared convolutional flow cannot know
//! what belongs where); with it ≈ 0.95. Most of that separation is the
//! Gaussian layer's: the same flow before training (identity couplings)
//! scores ≈ 0.95 as well, and training adds ≈ 0.001–0.01.

use std::collections::{BTreeMap, HashMap};
use std::path::Path;
use std::time::Instant;

use candle_core::{D, DType, Device, Tensor};
use flawscope_models::Stage;
use image::Rgb32FImage;
use serde::{Deserialize, Serialize};

use crate::Error;
use crate::anomaly_map::DEFAULT_BLUR_SIGMA;
use crate::detector::{Detector, DetectorOutput, FitInputs, ImageScore, ScoreGrid};
use crate::features::{FeatureConfig, FeatureExtractor, Resize};
use crate::gaussian;
use crate::model_file::{ModelFileError, take};
use crate::progress::Progress;
use crate::tiling::ImageSource;
use crate::train::{
    Initialiser, Trainable, TrainingConfig, TrainingReport, conv_same, split_validation, train,
};

#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct FlowConfig {
    /// Coupling blocks per stage.
    pub blocks: usize,
    /// Subnet width as a multiple of the stage's channels.
    pub hidden_ratio: f64,
    /// Soft clamp `c` of the log-scales.
    pub clamp: f64,
    pub training: TrainingConfig,
}

impl Default for FlowConfig {
    fn default() -> Self {
        Self {
            blocks: 4,
            hidden_ratio: 0.5,
            clamp: 2.0,
            // The shared defaults; an idle 2-core CPU fits MTD in about 2.5
            // minutes, well within their time limit.
            training: TrainingConfig {
                batch_size: 16,
                ..TrainingConfig::default()
            },
        }
    }
}

impl FlowConfig {
    fn validate(&self) -> Result<(), Error> {
        self.training.validate()?;
        if self.blocks == 0 {
            return Err(Error::InvalidConfig(
                "a flow needs at least one block".into(),
            ));
        }
        if !(self.hidden_ratio > 0.0 && self.hidden_ratio.is_finite()) {
            return Err(Error::InvalidConfig(format!(
                "hidden ratio must be positive, got {}",
                self.hidden_ratio
            )));
        }
        if !(self.clamp > 0.0 && self.clamp.is_finite()) {
            return Err(Error::InvalidConfig(format!(
                "clamp must be positive, got {}",
                self.clamp
            )));
        }
        Ok(())
    }
}

/// One affine coupling block.
#[derive(Debug, Clone)]
struct Coupling {
    /// `[C]` u32.
    permutation: Tensor,
    kernel: usize,
    /// Channels in the conditioning half.
    split: usize,
    w1: Tensor,
    b1: Tensor,
    w2: Tensor,
    b2: Tensor,
}

/// The flow of one stage.
#[derive(Debug, Clone)]
struct StageFlow {
    channels: usize,
    /// Grid positions `h · w`.
    positions: usize,
    /// `[h · w, C]`.
    mean: Tensor,
    /// `[h · w, C, C]`: per-position whitening, see [`crate::gaussian`].
    whiten: Tensor,
    blocks: Vec<Coupling>,
}

/// A fitted (or training) flow over several stages.
#[derive(Debug, Clone)]
pub struct Flow {
    stages: Vec<StageFlow>,
    clamp: f64,
    /// Everything [`Flow::tensors`] returns, by name.
    tensors: BTreeMap<String, Tensor>,
}

fn name(stage: usize, block: Option<usize>, part: &str) -> String {
    match block {
        Some(b) => format!("flow.s{stage}.b{b}.{part}"),
        None => format!("flow.s{stage}.{part}"),
    }
}

fn kernel_of(block: usize) -> usize {
    if block.is_multiple_of(2) { 3 } else { 1 }
}

impl StageFlow {
    /// Whitens a `[B, h, w, C]` map position by position.
    fn standardise(&self, x: &Tensor) -> Result<Tensor, Error> {
        let (b, h, w, c) = x.dims4()?;
        if h * w != self.positions || c != self.channels {
            return Err(Error::InvalidConfig(format!(
                "the flow was fitted on {} positions × {} channels, got {h}×{w} × {c} (use the model's fixed input size)",
                self.positions, self.channels
            )));
        }
        let z = gaussian::apply(&self.mean, &self.whiten, &x.reshape((b, h * w, c))?)?;
        Ok(z.reshape((b, h, w, c))?)
    }

    /// Per-channel negative log-likelihood `[B, h, w]` of standardised
    /// features `[B, h, w, C]`.
    fn nll(&self, x: &Tensor, clamp: f64) -> Result<Tensor, Error> {
        let c = self.channels;
        let mut x = x.clone();
        let mut log_det: Option<Tensor> = None;
        for block in &self.blocks {
            let permuted = x.index_select(&block.permutation, 3)?;
            let x1 = permuted.narrow(3, 0, block.split)?;
            let x2 = permuted.narrow(3, block.split, c - block.split)?;
            let hidden = conv_same(&x1, &block.w1, &block.b1, block.kernel)?.relu()?;
            let out = conv_same(&hidden, &block.w2, &block.b2, block.kernel)?;
            let half = c - block.split;
            let s = (out.narrow(3, 0, half)? / clamp)?
                .tanh()?
                .affine(clamp, 0.0)?;
            let t = out.narrow(3, half, half)?;
            let y2 = x2.mul(&s.exp()?)?.add(&t)?;
            let block_det = s.sum(D::Minus1)?;
            log_det = Some(match log_det {
                Some(d) => d.add(&block_det)?,
                None => block_det,
            });
            x = Tensor::cat(&[&x1, &y2], 3)?;
        }
        let energy = x.sqr()?.sum(D::Minus1)?.affine(0.5, 0.0)?;
        let nll = match log_det {
            Some(d) => energy.sub(&d)?,
            None => energy,
        };
        Ok(nll.affine(1.0 / c as f64, 0.0)?)
    }
}

impl Flow {
    /// Builds the flow from named tensors (`stages` stages of `blocks`
    /// blocks each).
    fn build(
        tensors: BTreeMap<String, Tensor>,
        stages: usize,
        blocks: usize,
        clamp: f64,
    ) -> Result<Self, Error> {
        let get = |n: String| -> Result<Tensor, Error> {
            tensors
                .get(&n)
                .cloned()
                .ok_or_else(|| Error::InvalidConfig(format!("flow tensor {n} is missing")))
        };
        let mut flows = Vec::with_capacity(stages);
        for s in 0..stages {
            let mean = get(name(s, None, "mean"))?.to_dtype(DType::F32)?;
            let whiten = get(name(s, None, "whiten"))?.to_dtype(DType::F32)?;
            let (positions, channels) = gaussian::check(&mean, &whiten)?;
            if channels < 2 {
                return Err(Error::InvalidConfig(format!(
                    "flow stage {s} has fewer than 2 channels"
                )));
            }
            let split = channels / 2;
            let half = channels - split;
            let mut couplings = Vec::with_capacity(blocks);
            for b in 0..blocks {
                let kernel = kernel_of(b);
                let permutation = get(name(s, Some(b), "perm"))?.to_dtype(DType::U32)?;
                let w1 = get(name(s, Some(b), "w1"))?;
                let b1 = get(name(s, Some(b), "b1"))?;
                let w2 = get(name(s, Some(b), "w2"))?;
                let b2 = get(name(s, Some(b), "b2"))?;
                let (rows1, hidden) = w1.dims2()?;
                let consistent = permutation.dims1()? == channels
                    && rows1 == kernel * kernel * split
                    && b1.dims1()? == hidden
                    && w2.dims2()? == (kernel * kernel * hidden, 2 * half)
                    && b2.dims1()? == 2 * half;
                if !consistent {
                    return Err(Error::InvalidConfig(format!(
                        "flow stage {s} block {b} has inconsistent shapes"
                    )));
                }
                couplings.push(Coupling {
                    permutation,
                    kernel,
                    split,
                    w1,
                    b1,
                    w2,
                    b2,
                });
            }
            flows.push(StageFlow {
                channels,
                positions,
                mean,
                whiten,
                blocks: couplings,
            });
        }
        Ok(Self {
            stages: flows,
            clamp,
            tensors,
        })
    }

    /// Rebuilds a fitted flow from a model file's tensors.
    pub fn from_tensors(
        config: &FlowConfig,
        tensors: &mut HashMap<String, Tensor>,
        path: &Path,
    ) -> Result<Self, Error> {
        config.validate()?;
        let mut stages = 0;
        while tensors.contains_key(&name(stages, None, "mean")) {
            stages += 1;
        }
        if stages == 0 {
            return Err(ModelFileError::MissingTensor {
                path: path.to_path_buf(),
                name: name(0, None, "mean"),
            }
            .into());
        }
        let mut named = BTreeMap::new();
        for s in 0..stages {
            for part in ["mean", "whiten"] {
                let n = name(s, None, part);
                named.insert(n.clone(), take(tensors, &n, path)?);
            }
            for b in 0..config.blocks {
                for part in ["perm", "w1", "b1", "w2", "b2"] {
                    let n = name(s, Some(b), part);
                    named.insert(n.clone(), take(tensors, &n, path)?);
                }
            }
        }
        Self::build(named, stages, config.blocks, config.clamp)
    }

    /// The tensors a model file stores.
    pub fn tensors(&self) -> &BTreeMap<String, Tensor> {
        &self.tensors
    }

    /// Fits on the normal images (or tiles) of `images`; returns the flow
    /// and what happened during training.
    pub fn fit(
        extractor: &FeatureExtractor,
        images: &ImageSource<'_>,
        config: &FlowConfig,
        started: Instant,
        progress: &dyn Progress,
    ) -> Result<(Self, TrainingReport), Error> {
        config.validate()?;
        progress.start("features", images.paths.len() as u64);
        let mut per_stage: Vec<Vec<Tensor>> = Vec::new();
        images.for_each(
            |_, image| {
                let (maps, _) = extractor.stage_maps(image)?;
                if per_stage.is_empty() {
                    per_stage = vec![Vec::with_capacity(images.paths.len()); maps.len()];
                }
                for (list, map) in per_stage.iter_mut().zip(maps) {
                    let map = map.permute((0, 2, 3, 1))?.contiguous()?;
                    if let Some(first) = list.first()
                        && first.dims() != map.dims()
                    {
                        return Err(Error::InvalidConfig(
                            "the flow needs every image on the same grid (use a fixed input size)"
                                .into(),
                        ));
                    }
                    list.push(map);
                }
                Ok(())
            },
            || progress.advance(1),
        )?;
        progress.finish();
        let stacked = per_stage
            .iter()
            .map(|maps| Tensor::cat(maps, 0))
            .collect::<Result<Vec<_>, _>>()?;
        drop(per_stage);
        Self::fit_features(&stacked, config, started, progress)
    }

    /// Fits on precomputed channels-last stage maps, one `[N, h, w, C]`
    /// tensor per stage.
    pub fn fit_features(
        stages: &[Tensor],
        config: &FlowConfig,
        started: Instant,
        progress: &dyn Progress,
    ) -> Result<(Self, TrainingReport), Error> {
        config.validate()?;
        let first = stages
            .first()
            .ok_or_else(|| Error::InvalidConfig("the flow needs at least one stage".into()))?;
        let n = first.dim(0)?;
        if n == 0 {
            return Err(Error::InvalidConfig("no training images".into()));
        }
        let device = first.device().clone();
        let training = &config.training;
        let (train_ids, val_ids) = split_validation(n, training.validation_fraction, training.seed);
        let to_ids = |ids: &[usize]| {
            Tensor::from_vec(
                ids.iter().map(|&i| i as u32).collect::<Vec<_>>(),
                ids.len(),
                &device,
            )
        };
        let train_index = to_ids(&train_ids)?;

        let mut init = Initialiser::new(training.seed, &device);
        let mut fixed = BTreeMap::new();
        let mut weights = BTreeMap::new();
        for (s, features) in stages.iter().enumerate() {
            let (count, h, w, c) = features.dims4()?;
            if count != n {
                return Err(Error::InvalidConfig(
                    "flow stages disagree on the number of images".into(),
                ));
            }
            if c < 2 {
                return Err(Error::InvalidConfig(
                    "a flow stage needs at least 2 channels".into(),
                ));
            }
            // Statistics over the training part only.
            let samples =
                features
                    .index_select(&train_index, 0)?
                    .reshape((train_ids.len(), h * w, c))?;
            let (mean, whiten) = gaussian::fit(&samples)?;
            fixed.insert(name(s, None, "mean"), mean);
            fixed.insert(name(s, None, "whiten"), whiten);
            let split = c / 2;
            let half = c - split;
            let hidden = ((c as f64 * config.hidden_ratio).round() as usize).max(1);
            for b in 0..config.blocks {
                let k = kernel_of(b);
                fixed.insert(name(s, Some(b), "perm"), init.permutation(c)?);
                let fan_in = k * k * split;
                let bound = 1.0 / (fan_in as f32).sqrt();
                weights.insert(
                    name(s, Some(b), "w1"),
                    init.uniform(&[fan_in, hidden], bound)?,
                );
                weights.insert(name(s, Some(b), "b1"), init.uniform(&[hidden], bound)?);
                // Zero output layer: the untrained block is the identity.
                weights.insert(
                    name(s, Some(b), "w2"),
                    init.zeros(&[k * k * hidden, 2 * half])?,
                );
                weights.insert(name(s, Some(b), "b2"), init.zeros(&[2 * half])?);
            }
        }
        let (trainable, live) = Trainable::new(weights, &fixed)?;
        let model = Self::build(live, stages.len(), config.blocks, config.clamp)?;
        let standardised = stages
            .iter()
            .zip(&model.stages)
            .map(|(x, flow)| flow.standardise(x))
            .collect::<Result<Vec<_>, _>>()?;
        let train_sets = standardised
            .iter()
            .map(|x| x.index_select(&train_index, 0))
            .collect::<Result<Vec<_>, _>>()?;
        let val_sets = if val_ids.is_empty() {
            None
        } else {
            let val_index = to_ids(&val_ids)?;
            Some(
                standardised
                    .iter()
                    .map(|x| x.index_select(&val_index, 0))
                    .collect::<Result<Vec<_>, _>>()?,
            )
        };
        drop(standardised);

        let loss_of = |sets: &[Tensor], batch: &Tensor| -> Result<Tensor, Error> {
            let mut total: Option<Tensor> = None;
            for (x, flow) in sets.iter().zip(&model.stages) {
                let loss = flow
                    .nll(&x.index_select(batch, 0)?, model.clamp)?
                    .mean_all()?;
                total = Some(match total {
                    Some(t) => t.add(&loss)?,
                    None => loss,
                });
            }
            total.ok_or_else(|| Error::InvalidConfig("the flow has no stages".into()))
        };
        let mut batch_loss = |batch: &[usize]| loss_of(&train_sets, &to_ids(batch)?);
        let batch_size = training.batch_size;
        let mut validation_loss = || -> Result<Option<f64>, Error> {
            let Some(sets) = &val_sets else {
                return Ok(None);
            };
            let count = val_ids.len();
            let mut sum = 0.0;
            let ids: Vec<usize> = (0..count).collect();
            for chunk in ids.chunks(batch_size) {
                let loss = loss_of(sets, &to_ids(chunk)?)?.detach();
                sum += f64::from(loss.to_scalar::<f32>()?) * chunk.len() as f64;
            }
            Ok(Some(sum / count as f64))
        };
        let deadline = training
            .max_minutes
            .map(|m| started + std::time::Duration::from_secs_f64(m * 60.0));
        let report = train(
            &trainable,
            training,
            train_ids.len(),
            deadline,
            progress,
            &mut batch_loss,
            &mut validation_loss,
        )?;
        let mut tensors = fixed;
        tensors.extend(trainable.values()?);
        let fitted = Self::build(tensors, stages.len(), config.blocks, config.clamp)?;
        Ok((fitted, report))
    }

    /// Per-position anomaly scores of one image's stage maps (each `[1, C,
    /// h, w]`, as [`FeatureExtractor::stage_maps`] returns them), on the
    /// finest stage's grid: `(scores, grid_width, grid_height)`.
    pub fn score(&self, maps: &[Tensor]) -> Result<(Vec<f32>, usize, usize), Error> {
        if maps.len() != self.stages.len() {
            return Err(Error::InvalidConfig(format!(
                "the flow was fitted on {} stages, got {}",
                self.stages.len(),
                maps.len()
            )));
        }
        let mut grid = None;
        let mut sum: Option<Tensor> = None;
        for (map, flow) in maps.iter().zip(&self.stages) {
            let x = map
                .to_dtype(DType::F32)?
                .permute((0, 2, 3, 1))?
                .contiguous()?;
            let nll = flow.nll(&flow.standardise(&x)?, self.clamp)?.unsqueeze(1)?; // [1,1,h,w]
            let (_, _, h, w) = nll.dims4()?;
            let (gh, gw) = *grid.get_or_insert((h, w));
            let nll = if (h, w) == (gh, gw) {
                nll
            } else {
                nll.upsample_bilinear2d(gh, gw, false)?
            };
            sum = Some(match sum {
                Some(s) => s.add(&nll)?,
                None => nll,
            });
        }
        let (Some((gh, gw)), Some(sum)) = (grid, sum) else {
            return Err(Error::InvalidConfig("the flow has no stages".into()));
        };
        let mean = sum.affine(1.0 / self.stages.len() as f64, 0.0)?;
        Ok((mean.flatten_all()?.to_vec1()?, gw, gh))
    }
}

impl FlowConfig {
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

/// The flow on the backbone's stage maps.
pub struct FlowDetector {
    extractor: FeatureExtractor,
    flow: Flow,
}

impl FlowDetector {
    /// A detector from a fitted model and the extractor it was fitted on.
    pub fn new(extractor: FeatureExtractor, flow: Flow) -> Self {
        Self { extractor, flow }
    }

    pub fn fit(
        config: &FlowConfig,
        features: &FeatureConfig,
        inputs: &FitInputs<'_>,
    ) -> Result<Self, Error> {
        let started = Instant::now();
        let extractor = FeatureExtractor::new(features.clone(), inputs.runtime.device())?;
        let (flow, _) = Flow::fit(
            &extractor,
            &inputs.images(),
            config,
            started,
            inputs.progress,
        )?;
        Ok(Self { extractor, flow })
    }

    pub fn load(
        config: &FlowConfig,
        features: &FeatureConfig,
        tensors: &mut HashMap<String, Tensor>,
        path: &Path,
        device: &Device,
    ) -> Result<Self, Error> {
        Ok(Self {
            flow: Flow::from_tensors(config, tensors, path)?,
            extractor: FeatureExtractor::new(features.clone(), device)?,
        })
    }
}

impl Detector for FlowDetector {
    fn score(&self, image: &Rgb32FImage) -> Result<DetectorOutput, Error> {
        let (maps, input_size) = self.extractor.stage_maps(image)?;
        let (values, width, height) = self.flow.score(&maps)?;
        Ok(DetectorOutput {
            image_score: ImageScore::MapPeak,
            grids: vec![ScoreGrid {
                width,
                height,
                values,
                input_size,
                blur_sigma: DEFAULT_BLUR_SIGMA,
            }],
        })
    }

    fn tensors(&self) -> BTreeMap<String, Tensor> {
        self.flow.tensors().clone()
    }
}
