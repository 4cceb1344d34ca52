//! Training machinery shared by the detectors that learn weights
//! ([`crate::detectors::flow`], [`crate::detectors::recon`], [`crate::detectors::supersimplenet`]).
//!
//! Weights are initialised from a seeded RNG (candle's CPU RNG cannot be
//! seeded), registered in a `candle_nn::VarMap` and trained with AdamW.
//! Batches are drawn in an order shuffled from the same seed, so a run is
//! reproducible given the seed (and the thread count, which fixes the order
//! of floating-point reductions). A deterministic part of the training
//! images is held back: after every epoch its loss decides whether the
//! weights are the best so far, and training stops after `patience` epochs
//! without improvement, after `epochs` epochs, or at the time limit. The
//! best weights are the ones kept.

use std::collections::BTreeMap;
use std::time::Instant;

use candle_core::{CpuStorage, CustomOp1, DType, Device, Layout, Shape, Tensor, Var};
use candle_nn::{AdamW, Optimizer, ParamsAdamW, VarMap};
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng, rngs::StdRng};
use rayon::prelude::*;
use serde::{Deserialize, Serialize};

use crate::Error;
use crate::progress::Progress;

/// How a trained detector is trained.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct TrainingConfig {
    /// Most passes over the training data.
    pub epochs: usize,
    /// Training stops once the whole fit (feature extraction included) has
    /// run this long; the best weights so far are kept.
    pub max_minutes: Option<f64>,
    /// Seeds weight initialisation, the validation split and batch order.
    pub seed: u64,
    pub learning_rate: f64,
    pub weight_decay: f64,
    /// Items (images or feature rows, per detector) per optimiser step.
    pub batch_size: usize,
    /// Fraction of the training images held back for early stopping.
    pub validation_fraction: f64,
    /// Epochs without a better validation loss before stopping.
    pub patience: usize,
}

impl Default for TrainingConfig {
    /// The settings the trained detectors share. `batch_size` counts
    /// different items per detector (images or feature rows), so each
    /// detector sets its own.
    fn default() -> Self {
        Self {
            epochs: 10,
            // A safety net for busy machines.
            max_minutes: Some(10.0),
            seed: 0,
            learning_rate: 1e-3,
            weight_decay: 1e-5,
            batch_size: 16,
            validation_fraction: 0.1,
            patience: 2,
        }
    }
}

impl TrainingConfig {
    pub fn validate(&self) -> Result<(), Error> {
        if self.epochs == 0 {
            return Err(Error::InvalidConfig("epochs must be at least 1".into()));
        }
        if self.batch_size == 0 {
            return Err(Error::InvalidConfig("batch size must be at least 1".into()));
        }
        if !(self.learning_rate > 0.0 && self.learning_rate.is_finite()) {
            return Err(Error::InvalidConfig(format!(
                "learning rate must be positive, got {}",
                self.learning_rate
            )));
        }
        if !(0.0..1.0).contains(&self.validation_fraction) {
            return Err(Error::InvalidConfig(format!(
                "validation fraction must be in [0, 1), got {}",
                self.validation_fraction
            )));
        }
        if let Some(m) = self.max_minutes
            && (m.is_nan() || m <= 0.0)
        {
            return Err(Error::InvalidConfig(format!(
                "max minutes must be positive, got {m}"
            )));
        }
        Ok(())
    }
}

/// Splits `n` items into (train, validation) index lists: a seeded shuffle,
/// the first `round(n · fraction)` held back (at least one when `n ≥ 2` and
/// the fraction is positive, never all). Both lists come back sorted.
pub fn split_validation(n: usize, fraction: f64, seed: u64) -> (Vec<usize>, Vec<usize>) {
    let mut order: Vec<usize> = (0..n).collect();
    let held = if n < 2 || fraction <= 0.0 {
        0
    } else {
        ((n as f64 * fraction).round() as usize).clamp(1, n - 1)
    };
    order.shuffle(&mut StdRng::seed_from_u64(seed ^ 0x005e_ed0f_da7a));
    let mut validation = order[..held].to_vec();
    let mut train = order[held..].to_vec();
    validation.sort_unstable();
    train.sort_unstable();
    (train, validation)
}

/// Draws initial weights from a seeded RNG.
pub struct Initialiser {
    rng: StdRng,
    device: Device,
}

impl Initialiser {
    pub fn new(seed: u64, device: &Device) -> Self {
        Self {
            rng: StdRng::seed_from_u64(seed),
            device: device.clone(),
        }
    }

    /// Uniform in `[-bound, bound]` (PyTorch's default for linear and
    /// convolution layers uses `bound = 1/√fan_in`).
    pub fn uniform(&mut self, shape: &[usize], bound: f32) -> Result<Tensor, Error> {
        let count = shape.iter().product();
        let values: Vec<f32> = (0..count)
            .map(|_| self.rng.random_range(-1.0f32..=1.0) * bound)
            .collect();
        Ok(Tensor::from_vec(values, shape, &self.device)?)
    }

    pub fn zeros(&self, shape: &[usize]) -> Result<Tensor, Error> {
        Ok(Tensor::zeros(shape, DType::F32, &self.device)?)
    }

    /// A random permutation of `0..n` as a u32 tensor.
    pub fn permutation(&mut self, n: usize) -> Result<Tensor, Error> {
        let mut order: Vec<u32> = (0..n as u32).collect();
        order.shuffle(&mut self.rng);
        Ok(Tensor::from_vec(order, n, &self.device)?)
    }
}

/// Trainable weights: the initial values go in, variables come out.
pub struct Trainable {
    varmap: VarMap,
}

impl Trainable {
    /// Registers `weights` as variables; returns the tensors to build the
    /// network from (they track gradients) plus `fixed` unchanged.
    pub fn new(
        weights: BTreeMap<String, Tensor>,
        fixed: &BTreeMap<String, Tensor>,
    ) -> Result<(Self, BTreeMap<String, Tensor>), Error> {
        let varmap = VarMap::new();
        let mut tensors = fixed.clone();
        {
            let mut data = varmap
                .data()
                .lock()
                .map_err(|_| Error::Training("variable store is poisoned".into()))?;
            for (name, value) in weights {
                let var = Var::from_tensor(&value)?;
                tensors.insert(name.clone(), var.as_tensor().clone());
                data.insert(name, var);
            }
        }
        Ok((Self { varmap }, tensors))
    }

    fn named_vars(&self) -> Result<Vec<(String, Var)>, Error> {
        let data = self
            .varmap
            .data()
            .lock()
            .map_err(|_| Error::Training("variable store is poisoned".into()))?;
        let mut vars: Vec<(String, Var)> =
            data.iter().map(|(k, v)| (k.clone(), v.clone())).collect();
        vars.sort_by(|a, b| a.0.cmp(&b.0));
        Ok(vars)
    }

    /// Current values, detached from the graph (deep copies).
    pub fn values(&self) -> Result<BTreeMap<String, Tensor>, Error> {
        self.named_vars()?
            .into_iter()
            .map(|(name, var)| Ok((name, var.as_tensor().copy()?.detach())))
            .collect()
    }

    fn restore(&self, values: &BTreeMap<String, Tensor>) -> Result<(), Error> {
        for (name, var) in self.named_vars()? {
            if let Some(value) = values.get(&name) {
                var.set(value)?;
            }
        }
        Ok(())
    }
}

/// The losses of one epoch.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct EpochLoss {
    /// 1-based.
    pub epoch: usize,
    /// Mean of the epoch's batch losses.
    pub train: f64,
    pub validation: Option<f64>,
}

/// What happened during training.
#[derive(Debug, Clone, PartialEq)]
pub struct TrainingReport {
    pub history: Vec<EpochLoss>,
    /// Epoch whose weights were kept (1-based; the last one without
    /// validation).
    pub kept_epoch: usize,
    pub stopped_early: bool,
    pub hit_time_limit: bool,
}

/// Runs the training loop. `batch_loss` gets indices into `0..train_items`
/// and returns a scalar loss that tracks gradients; `validation_loss`
/// returns the loss on the held-back data, `None` when there is none.
pub fn train(
    trainable: &Trainable,
    config: &TrainingConfig,
    train_items: usize,
    deadline: Option<Instant>,
    progress: &dyn Progress,
    batch_loss: &mut dyn FnMut(&[usize]) -> Result<Tensor, Error>,
    validation_loss: &mut dyn FnMut() -> Result<Option<f64>, Error>,
) -> Result<TrainingReport, Error> {
    config.validate()?;
    if train_items == 0 {
        return Err(Error::InvalidConfig("nothing to train on".into()));
    }
    let vars: Vec<Var> = trainable
        .named_vars()?
        .into_iter()
        .map(|(_, v)| v)
        .collect();
    let mut optimiser = AdamW::new(
        vars,
        ParamsAdamW {
            lr: config.learning_rate,
            weight_decay: config.weight_decay,
            ..Default::default()
        },
    )?;
    let mut order_rng = StdRng::seed_from_u64(config.seed ^ 0x0bad_5eed);
    let mut order: Vec<usize> = (0..train_items).collect();
    let mut history = Vec::new();
    let mut best: Option<(f64, usize, BTreeMap<String, Tensor>)> = None;
    let mut since_best = 0;
    let mut stopped_early = false;
    let mut hit_time_limit = false;
    let out_of_time = || deadline.is_some_and(|d| Instant::now() >= d);

    progress.start("training", config.epochs as u64);
    for epoch in 1..=config.epochs {
        order.shuffle(&mut order_rng);
        let (mut sum, mut batches) = (0.0f64, 0usize);
        for batch in order.chunks(config.batch_size) {
            let loss = batch_loss(batch)?;
            let value = f64::from(loss.to_dtype(DType::F32)?.to_scalar::<f32>()?);
            if !value.is_finite() {
                return Err(Error::Training(format!(
                    "the training loss diverged in epoch {epoch} (try a lower learning rate)"
                )));
            }
            optimiser.backward_step(&loss)?;
            sum += value;
            batches += 1;
            if out_of_time() {
                hit_time_limit = true;
                break;
            }
        }
        let train_loss = sum / batches.max(1) as f64;
        let validation = validation_loss()?;
        history.push(EpochLoss {
            epoch,
            train: train_loss,
            validation,
        });
        progress.advance(1);
        progress.message(&match validation {
            Some(v) => format!(
                "epoch {epoch}/{}: loss {train_loss:.4}, validation {v:.4}",
                config.epochs
            ),
            None => format!("epoch {epoch}/{}: loss {train_loss:.4}", config.epochs),
        });
        if let Some(v) = validation.filter(|v| v.is_finite()) {
            if best.as_ref().is_none_or(|(b, _, _)| v < *b) {
                best = Some((v, epoch, trainable.values()?));
                since_best = 0;
            } else {
                since_best += 1;
            }
        }
        if hit_time_limit {
            break;
        }
        if since_best > config.patience {
            stopped_early = true;
            break;
        }
    }
    progress.finish();
    let last_epoch = history.last().map_or(0, |e| e.epoch);
    let kept_epoch = match best {
        Some((_, epoch, values)) => {
            if epoch != last_epoch {
                trainable.restore(&values)?;
            }
            epoch
        }
        None => last_epoch,
    };
    Ok(TrainingReport {
        history,
        kept_epoch,
        stopped_early,
        hit_time_limit,
    })
}

/// `x · w + b` over the last dimension of `x` (`[…, in]` → `[…, out]`); `w`
/// is `[in, out]`.
pub fn linear(x: &Tensor, w: &Tensor, b: &Tensor) -> Result<Tensor, Error> {
    let dims = x.dims().to_vec();
    let (rows, inner): (usize, usize) = match dims.split_last() {
        Some((last, rest)) => (rest.iter().product(), *last),
        None => return Err(Error::InvalidConfig("linear layer on a scalar".into())),
    };
    let out = w.dim(1)?;
    let y = x.reshape((rows, inner))?.matmul(w)?.broadcast_add(b)?;
    let mut shape = dims;
    if let Some(last) = shape.last_mut() {
        *last = out;
    }
    Ok(y.reshape(shape)?)
}

/// Convolution with zero "same" padding on channels-last maps
/// `[B, H, W, C]`: the `k × k` neighbourhood is gathered into the channel
/// dimension (im2col) and multiplied by `w`, `[k·k·C, out]`, ordered
/// (dy, dx, c).
pub fn conv_same(x: &Tensor, w: &Tensor, b: &Tensor, k: usize) -> Result<Tensor, Error> {
    if k == 1 {
        return linear(x, w, b);
    }
    if k.is_multiple_of(2) {
        return Err(Error::InvalidConfig(format!(
            "convolution kernels must be odd, got {k}"
        )));
    }
    let columns = if x.device().is_cpu() && x.dtype() == DType::F32 {
        x.contiguous()?.apply_op1(Im2Col { k })?
    } else {
        im2col_views(x, k)?
    };
    linear(&columns, w, b)
}

/// im2col from shifted views of the padded map (any device; candle
/// differentiates it, but slowly on the CPU).
fn im2col_views(x: &Tensor, k: usize) -> Result<Tensor, Error> {
    let (_, h, wd, _) = x.dims4()?;
    let r = k / 2;
    let padded = x.pad_with_zeros(1, r, r)?.pad_with_zeros(2, r, r)?;
    let mut views = Vec::with_capacity(k * k);
    for dy in 0..k {
        for dx in 0..k {
            views.push(padded.narrow(1, dy, h)?.narrow(2, dx, wd)?);
        }
    }
    Ok(Tensor::cat(&views, 3)?)
}

/// CPU im2col on contiguous f32 `[B, H, W, C]` → `[B, H, W, k·k·C]`, zero
/// padded; its gradient is [`Col2Im`].
struct Im2Col {
    k: usize,
}

fn contiguous_f32<'a>(storage: &'a CpuStorage, layout: &Layout) -> candle_core::Result<&'a [f32]> {
    let CpuStorage::F32(data) = storage else {
        candle_core::bail!("im2col works on f32 only")
    };
    let Some((start, end)) = layout.contiguous_offsets() else {
        candle_core::bail!("im2col needs a contiguous input")
    };
    Ok(&data[start..end])
}

impl CustomOp1 for Im2Col {
    fn name(&self) -> &'static str {
        "im2col-nhwc"
    }

    fn cpu_fwd(
        &self,
        storage: &CpuStorage,
        layout: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let (b, h, w, c) = layout.shape().dims4()?;
        let src = contiguous_f32(storage, layout)?;
        let (k, r) = (self.k, self.k / 2);
        let kc = k * k * c;
        let mut out = vec![0f32; b * h * w * kc];
        if !out.is_empty() {
            out.par_chunks_mut(w * kc)
                .enumerate()
                .for_each(|(row, dst)| {
                    let (image, y) = (row / h, row % h);
                    for dy in 0..k {
                        let Some(sy) = (y + dy).checked_sub(r).filter(|sy| *sy < h) else {
                            continue;
                        };
                        for dx in 0..k {
                            for x in 0..w {
                                let Some(sx) = (x + dx).checked_sub(r).filter(|sx| *sx < w) else {
                                    continue;
                                };
                                let s = ((image * h + sy) * w + sx) * c;
                                let d = x * kc + (dy * k + dx) * c;
                                dst[d..d + c].copy_from_slice(&src[s..s + c]);
                            }
                        }
                    }
                });
        }
        Ok((CpuStorage::F32(out), Shape::from((b, h, w, kc))))
    }

    fn bwd(
        &self,
        arg: &Tensor,
        _res: &Tensor,
        grad_res: &Tensor,
    ) -> candle_core::Result<Option<Tensor>> {
        let c = arg.dim(3)?;
        Ok(Some(
            grad_res
                .contiguous()?
                .apply_op1_no_bwd(&Col2Im { k: self.k, c })?,
        ))
    }
}

/// The adjoint of [`Im2Col`]: `[B, H, W, k·k·C]` → `[B, H, W, C]`, summing
/// every column entry back onto the pixel it was copied from.
struct Col2Im {
    k: usize,
    c: usize,
}

impl CustomOp1 for Col2Im {
    fn name(&self) -> &'static str {
        "col2im-nhwc"
    }

    fn cpu_fwd(
        &self,
        storage: &CpuStorage,
        layout: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let (b, h, w, kc) = layout.shape().dims4()?;
        let (k, r, c) = (self.k, self.k / 2, self.c);
        if kc != k * k * c {
            candle_core::bail!("col2im: {kc} columns for {k}×{k} kernels of {c} channels")
        }
        let src = contiguous_f32(storage, layout)?;
        let mut out = vec![0f32; b * h * w * c];
        if !out.is_empty() {
            // Pixel (y, x) was copied to (y + r − dy, x + r − dx) at offset (dy, dx).
            out.par_chunks_mut(w * c)
                .enumerate()
                .for_each(|(row, dst)| {
                    let (image, y) = (row / h, row % h);
                    for dy in 0..k {
                        let Some(ty) = (y + r).checked_sub(dy).filter(|ty| *ty < h) else {
                            continue;
                        };
                        for dx in 0..k {
                            for x in 0..w {
                                let Some(tx) = (x + r).checked_sub(dx).filter(|tx| *tx < w) else {
                                    continue;
                                };
                                let s = ((image * h + ty) * w + tx) * kc + (dy * k + dx) * c;
                                for (o, v) in dst[x * c..(x + 1) * c].iter_mut().zip(&src[s..s + c])
                                {
                                    *o += v;
                                }
                            }
                        }
                    }
                });
        }
        Ok((CpuStorage::F32(out), Shape::from((b, h, w, c))))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn validation_split_is_seeded_disjoint_and_complete() {
        let (train, val) = split_validation(20, 0.1, 3);
        assert_eq!((train.len(), val.len()), (18, 2));
        assert_eq!(split_validation(20, 0.1, 3), (train.clone(), val.clone()));
        let mut all = [train, val].concat();
        all.sort_unstable();
        assert_eq!(all, (0..20).collect::<Vec<_>>());
        assert_eq!(split_validation(1, 0.5, 0).1.len(), 0);
        assert_eq!(split_validation(2, 0.01, 0).1.len(), 1);
    }

    #[test]
    fn im2col_convolution_matches_candle() {
        let dev = Device::Cpu;
        let mut init = Initialiser::new(1, &dev);
        let x = init.uniform(&[2, 5, 4, 3], 1.0).unwrap();
        let w = init.uniform(&[3 * 3 * 3, 6], 1.0).unwrap();
        let b = init.uniform(&[6], 1.0).unwrap();
        let ours = conv_same(&x, &w, &b, 3).unwrap();
        // candle: input [B, C, H, W], kernel [out, in, kh, kw].
        let kernel = w
            .reshape((3, 3, 3, 6))
            .unwrap()
            .permute((3, 2, 0, 1))
            .unwrap()
            .contiguous()
            .unwrap();
        let reference = x
            .permute((0, 3, 1, 2))
            .unwrap()
            .contiguous()
            .unwrap()
            .conv2d(&kernel, 1, 1, 1, 1)
            .unwrap()
            .broadcast_add(&b.reshape((1, 6, 1, 1)).unwrap())
            .unwrap()
            .permute((0, 2, 3, 1))
            .unwrap();
        let diff = (ours - reference)
            .unwrap()
            .abs()
            .unwrap()
            .flatten_all()
            .unwrap()
            .max(0)
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        assert!(diff < 1e-5, "{diff}");
        let views = im2col_views(&x, 3).unwrap();
        let fast = x.apply_op1(Im2Col { k: 3 }).unwrap();
        assert_eq!(max_abs(&(views - &fast).unwrap()), 0.0);
    }

    fn max_abs(t: &Tensor) -> f32 {
        t.abs()
            .unwrap()
            .flatten_all()
            .unwrap()
            .max(0)
            .unwrap()
            .to_scalar::<f32>()
            .unwrap()
    }

    #[test]
    fn im2col_gradient_matches_the_view_version() {
        let dev = Device::Cpu;
        let mut init = Initialiser::new(2, &dev);
        let x = Var::from_tensor(&init.uniform(&[2, 4, 5, 3], 1.0).unwrap()).unwrap();
        let weights = init.uniform(&[2, 4, 5, 27], 1.0).unwrap();
        let loss_of = |cols: Tensor| (cols * &weights).unwrap().sum_all().unwrap();
        let fast = loss_of(x.as_tensor().apply_op1(Im2Col { k: 3 }).unwrap())
            .backward()
            .unwrap();
        let slow = loss_of(im2col_views(x.as_tensor(), 3).unwrap())
            .backward()
            .unwrap();
        let (a, b) = (
            fast.get(x.as_tensor()).unwrap(),
            slow.get(x.as_tensor()).unwrap(),
        );
        assert!(max_abs(&(a - b).unwrap()) < 1e-5);
    }
}
