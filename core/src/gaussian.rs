//! Per-position whitening: at every grid position `p`, `z = L⁻¹ (x − μ)`
//! where `L Lᵀ = Σ̂` is the Cholesky factor of the training features'
//! covariance there, shrunk towards a multiple of the identity with the
//! Ledoit–Wolf intensity (`Σ̂ = (1 − δ) S + δ (tr S / C) I`, `δ` estimated
//! from the samples): with few training images (fewer than channels, say)
//! the sample covariance is singular, and a fixed small ridge would let the
//! directions it never saw blow up.
//!
//! This is PaDiM's per-position Gaussian written as a fixed, invertible
//! first layer: `½‖z‖²` is half the squared Mahalanobis distance. The
//! trained detectors ([`crate::detectors::flow`], [`crate::detectors::recon`]) put it in front of
//! their networks, so that what they learn is shared across positions while
//! where-things-usually-are stays in the statistics (the images of one
//! product are aligned; a translation-invariant network alone cannot know
//! that a bright edge belongs at the top and not in the middle).

use candle_core::{DType, Tensor};
use rayon::prelude::*;

use crate::Error;

/// Added to every shrunk variance, relative to the mean variance, so that
/// constant channels stay invertible.
const RELATIVE_RIDGE: f64 = 1e-4;
const ABSOLUTE_RIDGE: f64 = 1e-8;

/// Mean `[P, C]` and whitening transform `[P, C, C]` of samples `[N, P, C]`.
/// The transform is `L⁻ᵀ`, to multiply row vectors: `z = (x − μ) · L⁻ᵀ`.
pub fn fit(samples: &Tensor) -> Result<(Tensor, Tensor), Error> {
    let (n, positions, c) = samples.dims3()?;
    if positions == 0 || c == 0 {
        return Err(Error::InvalidConfig(
            "per-position statistics need at least one position and channel".into(),
        ));
    }
    if n < 2 {
        return Err(Error::InvalidConfig(
            "per-position statistics need at least 2 training images".into(),
        ));
    }
    let samples = samples.to_dtype(DType::F32)?;
    let mean = samples.mean(0)?; // [P, C]
    let centred = samples
        .broadcast_sub(&mean)?
        .transpose(0, 1)?
        .contiguous()?; // [P, N, C]
    let covariance = centred
        .transpose(1, 2)?
        .contiguous()?
        .matmul(&centred)?
        .affine(1.0 / (n - 1) as f64, 0.0)?; // [P, C, C]
    // Σₖ ‖xₖ‖⁴ per position, for the shrinkage intensity.
    let fourth: Vec<f32> = centred.sqr()?.sum(2)?.sqr()?.sum(1)?.to_vec1()?;
    let host: Vec<f32> = covariance.flatten_all()?.to_vec1()?;
    let transforms: Vec<f32> = host
        .par_chunks(c * c)
        .zip(fourth.par_iter())
        .map(|(cov, fourth)| {
            let delta = ledoit_wolf_intensity(cov, c, n, f64::from(*fourth));
            inverse_cholesky_transposed(cov, c, delta)
        })
        .collect::<Option<Vec<_>>>()
        .ok_or_else(|| Error::InvalidConfig("a feature covariance is not invertible".into()))?
        .into_iter()
        .flatten()
        .collect();
    let transform = Tensor::from_vec(transforms, (positions, c, c), samples.device())?;
    Ok((mean, transform))
}

/// Whitens `x` `[B, P, C]` with [`fit`]'s mean and transform.
pub fn apply(mean: &Tensor, transform: &Tensor, x: &Tensor) -> Result<Tensor, Error> {
    let centred = x
        .to_dtype(DType::F32)?
        .broadcast_sub(mean)?
        .transpose(0, 1)?
        .contiguous()?; // [P, B, C]
    Ok(centred.matmul(transform)?.transpose(0, 1)?.contiguous()?)
}

/// Checks that a mean `[P, C]` and transform `[P, C, C]` fit together;
/// returns `(P, C)`.
pub fn check(mean: &Tensor, transform: &Tensor) -> Result<(usize, usize), Error> {
    let (positions, c) = mean.dims2()?;
    if transform.dims3()? != (positions, c, c) {
        return Err(Error::InvalidConfig(
            "whitening statistics have inconsistent shapes".into(),
        ));
    }
    Ok((positions, c))
}

/// Ledoit & Wolf (2004): the shrinkage intensity `δ ∈ [0, 1]` towards
/// `(tr S / C) I` for the covariance `cov` (normalised by `n − 1`) of `n`
/// centred samples whose squared norms, squared, sum to `fourth`.
fn ledoit_wolf_intensity(cov: &[f32], d: usize, n: usize, fourth: f64) -> f64 {
    // Their estimator uses S normalised by n.
    let scale = (n - 1) as f64 / n as f64;
    let frobenius2: f64 = cov.iter().map(|v| (f64::from(*v) * scale).powi(2)).sum();
    let mu = (0..d)
        .map(|i| f64::from(cov[i * d + i]) * scale)
        .sum::<f64>()
        / d as f64;
    let dispersion = frobenius2 - d as f64 * mu * mu;
    if dispersion <= 0.0 || !dispersion.is_finite() {
        return 1.0;
    }
    let noise = ((fourth / n as f64 - frobenius2) / n as f64).clamp(0.0, dispersion);
    noise / dispersion
}

/// `(L⁻¹)ᵀ` of the shrunk `(1 − δ) cov + δ μ I = L Lᵀ`, row-major, in f64
/// internally.
fn inverse_cholesky_transposed(cov: &[f32], d: usize, delta: f64) -> Option<Vec<f32>> {
    let trace: f64 = (0..d).map(|i| f64::from(cov[i * d + i])).sum();
    let mu = trace / d.max(1) as f64;
    let diagonal = delta * mu + RELATIVE_RIDGE * mu + ABSOLUTE_RIDGE;
    let inv = inverse_cholesky_factor(d, |i, j| {
        (1.0 - delta) * f64::from(cov[i * d + j]) + if i == j { diagonal } else { 0.0 }
    })?;
    // Transpose while converting.
    let mut out = vec![0.0f32; d * d];
    for i in 0..d {
        for j in 0..d {
            out[j * d + i] = inv[i * d + j] as f32;
        }
    }
    Some(out)
}

/// `L⁻¹` (lower triangular, row-major) of the Cholesky factor of the
/// symmetric positive definite `d × d` matrix whose lower triangle `entry(i,
/// j)` gives; `None` when it is not positive definite.
pub(crate) fn inverse_cholesky_factor(
    d: usize,
    entry: impl Fn(usize, usize) -> f64,
) -> Option<Vec<f64>> {
    let mut l = vec![0.0f64; d * d];
    for i in 0..d {
        for j in 0..=i {
            let mut sum = entry(i, j);
            for k in 0..j {
                sum -= l[i * d + k] * l[j * d + k];
            }
            if i == j {
                if sum <= 0.0 || !sum.is_finite() {
                    return None;
                }
                l[i * d + i] = sum.sqrt();
            } else {
                l[i * d + j] = sum / l[j * d + j];
            }
        }
    }
    // inv(L) by forward substitution.
    let mut inv = vec![0.0f64; d * d];
    for col in 0..d {
        for i in col..d {
            let mut sum = if i == col { 1.0 } else { 0.0 };
            for k in col..i {
                sum -= l[i * d + k] * inv[k * d + col];
            }
            inv[i * d + col] = sum / l[i * d + i];
        }
    }
    Some(inv)
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn whitened_training_samples_have_identity_covariance() {
        let dev = Device::Cpu;
        // Correlated 2-D samples at 3 positions.
        let base = crate::train::Initialiser::new(5, &dev)
            .uniform(&[400, 3, 2], 1.0)
            .unwrap();
        let mix = Tensor::new(&[[1.0f32, 0.0], [0.5, 1.0]], &dev).unwrap();
        let samples = base
            .reshape((1200, 2))
            .unwrap()
            .matmul(&mix)
            .unwrap()
            .reshape((400, 3, 2))
            .unwrap();
        let (mean, transform) = fit(&samples).unwrap();
        assert_eq!(check(&mean, &transform).unwrap(), (3, 2));
        let z = apply(&mean, &transform, &samples).unwrap(); // [400, 3, 2]
        let z0 = z.narrow(1, 0, 1).unwrap().squeeze(1).unwrap();
        let cov: Vec<Vec<f32>> = (z0.t().unwrap().matmul(&z0).unwrap() / 399.0)
            .unwrap()
            .to_vec2()
            .unwrap();
        // 400 samples of 2 channels: hardly any shrinkage.
        assert!((cov[0][0] - 1.0).abs() < 0.02, "{cov:?}");
        assert!((cov[1][1] - 1.0).abs() < 0.02, "{cov:?}");
        assert!(cov[0][1].abs() < 0.02, "{cov:?}");
    }

    /// The shrinkage intensity of `n` samples of 16 strongly correlated
    /// channels.
    fn intensity(n: usize) -> f64 {
        let dev = Device::Cpu;
        let mut init = crate::train::Initialiser::new(9, &dev);
        let common = init.uniform(&[n, 1], 1.0).unwrap();
        let own = init.uniform(&[n, 16], 0.3).unwrap();
        let x = own.broadcast_add(&common).unwrap();
        let x = x.broadcast_sub(&x.mean(0).unwrap()).unwrap();
        let cov: Vec<f32> = (x.t().unwrap().matmul(&x).unwrap() / (n - 1) as f64)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap();
        let fourth = x
            .sqr()
            .unwrap()
            .sum(1)
            .unwrap()
            .sqr()
            .unwrap()
            .sum_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        ledoit_wolf_intensity(&cov, 16, n, f64::from(fourth))
    }

    #[test]
    fn few_samples_shrink_harder_than_many() {
        let (few, many) = (intensity(6), intensity(2000));
        assert!((0.0..=1.0).contains(&few) && (0.0..=1.0).contains(&many));
        assert!(few > 5.0 * many, "few {few}, many {many}");
        assert!(many < 0.05, "{many}");
    }
}
