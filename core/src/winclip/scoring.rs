//! The WinCLIP formulas (see the [module docs](super)): window
//! probabilities, harmonic aggregation, few-shot memory distances, and the
//! scoring of one embedded image into a raw score and a patch grid. They
//! work on embeddings ([`Embedded`], which the engine computes) and need no
//! model.

use candle_core::{D, Device, Tensor};

use super::config::{DEFAULT_LOGIT_SCALE, WinClipConfig, WinClipError};
use crate::Error;

/// Unit embeddings of one image.
pub(crate) struct Embedded {
    /// `[1, D]`.
    pub(crate) class: Tensor,
    /// `[rows*cols, D or hidden]`, when asked for.
    pub(crate) patches: Option<Tensor>,
    /// Per scale: its windows and their `[windows, D]` embeddings.
    pub(crate) windows: Vec<(Vec<Vec<usize>>, Tensor)>,
    pub(crate) patches_count: usize,
    pub(crate) rows: usize,
    pub(crate) cols: usize,
}

/// The few-shot memory, unit rows.
pub(crate) struct Memory {
    /// `[k·rows·cols, D]`.
    pub patches: Tensor,
    /// Per scale of the config, `[k·windows, D]`.
    pub windows: Vec<Tensor>,
}

impl Memory {
    /// Rows of the memory, every level together.
    pub(crate) fn rows(&self) -> Result<usize, Error> {
        let mut n = self.patches.dim(0)?;
        for w in &self.windows {
            n += w.dim(0)?;
        }
        Ok(n)
    }
}

/// Raw image score and patch grid (`rows × cols`, row-major) of one image.
pub(crate) struct Scored {
    pub score: f64,
    pub grid: Vec<f64>,
    pub rows: usize,
    pub cols: usize,
}

/// Scores one embedded image: zero-shot against the class vectors `text`,
/// plus the few-shot memory when there is one (then `e` holds the patches
/// in the memory's space).
pub(crate) fn score_embedded(
    e: &Embedded,
    config: &WinClipConfig,
    text: &Tensor,
    memory: Option<&Memory>,
) -> Result<Scored, Error> {
    let scale = config.logit_scale.unwrap_or(DEFAULT_LOGIT_SCALE);
    let (image_score, zero_shot) = zero_shot(e, text, scale)?;
    let (score, grid) = match (memory, &e.patches) {
        (Some(memory), Some(patches)) => {
            let mut levels = vec![memory_scores(patches, &memory.patches)?];
            for ((list, emb), bank) in e.windows.iter().zip(&memory.windows) {
                let a = memory_scores(emb, bank)?;
                levels.push(harmonic_window_aggregation(&a, list, e.patches_count)?);
            }
            let few_shot = mean_grid(&levels)?;
            let peak = few_shot.iter().copied().fold(0.0f64, f64::max);
            let grid: Vec<f64> = zero_shot
                .iter()
                .zip(&few_shot)
                .map(|(z, f)| 0.5 * (z + f))
                .collect();
            (0.5 * (image_score + peak), grid)
        }
        _ => (image_score, zero_shot),
    };
    if !score.is_finite() || grid.iter().any(|v| !v.is_finite()) {
        return Err(WinClipError::NonFinite.into());
    }
    Ok(Scored {
        score,
        grid,
        rows: e.rows,
        cols: e.cols,
    })
}

/// WinCLIP's zero-shot image score and patch grid of one embedded image
/// against the class vectors `text`.
pub(crate) fn zero_shot(e: &Embedded, text: &Tensor, scale: f32) -> Result<(f64, Vec<f64>), Error> {
    let image_score = *probabilities(&e.class, text, scale)?
        .first()
        .ok_or(WinClipError::NonFinite)?;
    let mut per_scale = Vec::with_capacity(e.windows.len());
    for (list, emb) in &e.windows {
        let p = probabilities(emb, text, scale)?;
        per_scale.push(harmonic_window_aggregation(&p, list, e.patches_count)?);
    }
    Ok((image_score, zero_shot_grid(image_score, &per_scale)?))
}

/// Rows scaled to unit length.
pub(crate) fn unit_rows(t: &Tensor) -> Result<Tensor, Error> {
    let norm = t.sqr()?.sum_keepdim(D::Minus1)?.sqrt()?.maximum(1e-12f32)?;
    Ok(t.broadcast_div(&norm)?)
}

/// Anomalous probability of each unit row of `emb` against unit text rows
/// (normal, anomalous): `σ(s·(cos_a − cos_n))`, in `f64` so that it never
/// rounds to exactly 0 or 1 for `s ≤ 100`.
pub(crate) fn probabilities(emb: &Tensor, text: &Tensor, scale: f32) -> Result<Vec<f64>, Error> {
    let cos = emb
        .matmul(&text.t()?)?
        .to_device(&Device::Cpu)?
        .to_vec2::<f32>()?;
    let s = f64::from(scale);
    cos.iter()
        .map(|row| match row.as_slice() {
            [n, a] => Ok(anomalous_probability(f64::from(*n), f64::from(*a), s)),
            _ => Err(WinClipError::Config("text side is not two class vectors".into()).into()),
        })
        .collect()
}

/// `softmax(s·[cos_n, cos_a])[1]`.
pub fn anomalous_probability(cos_normal: f64, cos_anomalous: f64, scale: f64) -> f64 {
    1.0 / (1.0 + (-scale * (cos_anomalous - cos_normal)).exp())
}

/// `min_r (1 − cos(v, r)) / 2` of each unit row `v` of `emb` against the
/// unit rows of `memory`.
pub(crate) fn memory_scores(emb: &Tensor, memory: &Tensor) -> Result<Vec<f64>, Error> {
    let best = emb
        .matmul(&memory.t()?)?
        .max(D::Minus1)?
        .to_device(&Device::Cpu)?
        .to_vec1::<f32>()?;
    Ok(best
        .iter()
        .map(|&c| ((1.0 - f64::from(c)) / 2.0).clamp(0.0, 1.0))
        .collect())
}

/// Harmonic mean `n / Σ 1/x` of positive scores. A score at or below 0
/// makes it 0 (the limit); no value gives NaN.
pub fn harmonic_mean(values: &[f64]) -> f64 {
    if values.is_empty() {
        return f64::NAN;
    }
    if values.iter().any(|&v| v <= 0.0) {
        return 0.0;
    }
    values.len() as f64 / values.iter().map(|v| 1.0 / v).sum::<f64>()
}

/// Each patch's score = harmonic mean of the scores of the windows covering
/// it. `windows[j]` lists the (row-major) patches of window `j`, scored
/// `window_scores[j]`. Every patch of `0..patches` must be covered.
pub fn harmonic_window_aggregation(
    window_scores: &[f64],
    windows: &[Vec<usize>],
    patches: usize,
) -> Result<Vec<f64>, WinClipError> {
    if window_scores.len() != windows.len() {
        return Err(WinClipError::Config(format!(
            "{} window scores for {} windows",
            window_scores.len(),
            windows.len()
        )));
    }
    let mut covering: Vec<Vec<f64>> = vec![Vec::new(); patches];
    for (window, &score) in windows.iter().zip(window_scores) {
        if !score.is_finite() {
            return Err(WinClipError::NonFinite);
        }
        for &p in window {
            covering
                .get_mut(p)
                .ok_or_else(|| {
                    WinClipError::Config(format!("window patch {p} is outside the grid"))
                })?
                .push(score);
        }
    }
    covering
        .iter()
        .enumerate()
        .map(|(i, scores)| {
            if scores.is_empty() {
                Err(WinClipError::Config(format!(
                    "patch {i} is covered by no window"
                )))
            } else {
                Ok(harmonic_mean(scores))
            }
        })
        .collect()
}

/// Zero-shot patch scores: per patch, the harmonic mean of the image score
/// and of each scale's patch score, `(1 + K) / (1/S0 + Σ_k 1/M_k(i))`.
pub fn zero_shot_grid(image_score: f64, scales: &[Vec<f64>]) -> Result<Vec<f64>, WinClipError> {
    let n = scales.first().map_or(0, Vec::len);
    if scales.iter().any(|s| s.len() != n) {
        return Err(WinClipError::Config(
            "scales of different grid sizes".into(),
        ));
    }
    Ok((0..n)
        .map(|i| {
            let mut values = Vec::with_capacity(scales.len() + 1);
            values.push(image_score);
            values.extend(scales.iter().map(|s| s[i]));
            harmonic_mean(&values)
        })
        .collect())
}

/// Per-patch arithmetic mean of equally sized grids.
pub(crate) fn mean_grid(levels: &[Vec<f64>]) -> Result<Vec<f64>, WinClipError> {
    let n = levels.first().map_or(0, Vec::len);
    if levels.is_empty() || levels.iter().any(|l| l.len() != n) {
        return Err(WinClipError::Config(
            "few-shot levels of different sizes".into(),
        ));
    }
    let k = levels.len() as f64;
    Ok((0..n)
        .map(|i| levels.iter().map(|l| l[i]).sum::<f64>() / k)
        .collect())
}
