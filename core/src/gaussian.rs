//! Per-position whitening: at every grid position `p`, `z = L⁻¹ (x − μ)`
//! where `L Lᵀ = Σ + ε I` is the Cholesky factor of the training features'
//! covariance there (`ε` is a fraction of the mean variance).
//!
//! This is PaDiM's per-position Gaussian written as a fixed, invertible
//! first layer: `½‖z‖²` is half the squared Mahalanobis distance. The
//! trained detectors ([`crate::flow`], [`crate::recon`]) put it in front of
//! their networks, so that what they learn is shared across positions while
//! where-things-usually-are stays in the statistics (the images of one
//! product are aligned; a translation-invariant network alone cannot know
//! that a bright edge belongs at the top and not in the middle).

use candle_core::{DType, Tensor};
use rayon::prelude::*;

use crate::Error;

/// Ridge added to each covariance, relative to its mean diagonal.
const RELATIVE_RIDGE: f64 = 0.01;
const ABSOLUTE_RIDGE: f64 = 1e-6;

/// Mean `[P, C]` and whitening transform `[P, C, C]` of samples `[N, P, C]`.
/// The transform is `L⁻ᵀ`, to multiply row vectors: `z = (x − μ) · L⁻ᵀ`.
pub fn fit(samples: &Tensor) -> Result<(Tensor, Tensor), Error> {
    let (n, positions, c) = samples.dims3()?;
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
    let host: Vec<f32> = covariance.flatten_all()?.to_vec1()?;
    let transforms: Vec<f32> = host
        .par_chunks(c * c)
        .map(|cov| inverse_cholesky_transposed(cov, c))
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

/// `(L⁻¹)ᵀ` of `cov + ε I = L Lᵀ`, row-major, in f64 internally.
fn inverse_cholesky_transposed(cov: &[f32], d: usize) -> Option<Vec<f32>> {
    let trace: f64 = (0..d).map(|i| f64::from(cov[i * d + i])).sum();
    let ridge = RELATIVE_RIDGE * trace / d.max(1) as f64 + ABSOLUTE_RIDGE;
    let mut l = vec![0.0f64; d * d];
    for i in 0..d {
        for j in 0..=i {
            let mut sum = f64::from(cov[i * d + j]);
            if i == j {
                sum += ridge;
            }
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
    // inv(L) by forward substitution (lower triangular).
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
    // Transpose while converting.
    let mut out = vec![0.0f32; d * d];
    for i in 0..d {
        for j in 0..d {
            out[j * d + i] = inv[i * d + j] as f32;
        }
    }
    Some(out)
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
        // The 1 % ridge shrinks the variances slightly below 1.
        assert!((cov[0][0] - 0.99).abs() < 0.02, "{cov:?}");
        assert!((cov[1][1] - 0.99).abs() < 0.02, "{cov:?}");
        assert!(cov[0][1].abs() < 0.02, "{cov:?}");
    }
}
