//! Calibration: from raw detector scores to 0–1 scores and a verdict.
//!
//! A [`Calibration`] is a plain value stored in the model file. Raw scores
//! map piecewise-linearly to `[0, 1]` so that the decision threshold lands at
//! exactly 0.5: `low → 0`, `threshold → 0.5`, `high → 1`. The mapping is
//! monotonic, so rankings (and AUROC) are unchanged.
//!
//! The threshold comes from held-back normal images: with `max_far = F` at
//! most a fraction `F` of them is flagged. When labelled anomalous images are
//! available too, the threshold is the F1-optimal one among those that still
//! respect the false-alarm limit.

use serde::{Deserialize, Serialize};

/// The normalised score at and above which an image is anomalous.
pub const DECISION_THRESHOLD: f32 = 0.5;

#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum CalibrationError {
    #[error("calibration needs at least one held-back normal image score")]
    NoNormalScores,
    #[error("calibration scores must be finite")]
    NonFinite,
    #[error("the false-alarm limit must be in [0, 1), got {0}")]
    InvalidFalseAlarmRate(f64),
}

/// How the threshold was chosen.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum ThresholdMethod {
    /// From normal images alone: no anomalies were seen, so F1-based
    /// calibration was impossible.
    NormalQuantile,
    /// F1-optimal on held-back normals plus labelled anomalies, within the
    /// false-alarm limit.
    F1Optimal { f1: f64 },
    /// Nothing fitted: the raw score is already a 0–1 probability whose
    /// natural threshold is 0.5 (zero-shot WinCLIP); see
    /// [`Calibration::probability`].
    Probability,
}

/// Maps raw scores to `[0, 1]` with the decision threshold at 0.5.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Calibration {
    /// Raw score mapped to 0.
    pub low: f32,
    /// Raw score mapped to 0.5: the decision threshold.
    pub threshold: f32,
    /// Raw score mapped to 1.
    pub high: f32,
    pub method: ThresholdMethod,
    /// The false-alarm limit asked for.
    pub max_far: f64,
    /// Fraction of held-back normal images at or above the threshold.
    pub estimated_far: f64,
    /// How many held-back normal images the estimate rests on.
    pub normal_images: usize,
    /// How many labelled anomalous images were used.
    pub anomalous_images: usize,
}

impl Calibration {
    /// Threshold from normal scores alone: at most `max_far · n` of the `n`
    /// normal scores are flagged. The threshold sits halfway between the last
    /// passing and the first flagged score (just above the largest score when
    /// none may be flagged).
    pub fn from_normal_scores(normal: &[f32], max_far: f64) -> Result<Self, CalibrationError> {
        let sorted = sorted_checked(normal, max_far)?;
        let threshold = quantile_threshold(&sorted, max_far);
        Ok(Self::build(
            &sorted,
            &[],
            threshold,
            ThresholdMethod::NormalQuantile,
            max_far,
        ))
    }

    /// F1-optimal threshold on normal plus anomalous scores, restricted to
    /// thresholds that flag at most `max_far` of the normals. Falls back to
    /// [`Calibration::from_normal_scores`] when `anomalous` is empty.
    pub fn from_labelled_scores(
        normal: &[f32],
        anomalous: &[f32],
        max_far: f64,
    ) -> Result<Self, CalibrationError> {
        if anomalous.is_empty() {
            return Self::from_normal_scores(normal, max_far);
        }
        let sorted_normal = sorted_checked(normal, max_far)?;
        let sorted_anomalous = sorted_checked(anomalous, max_far)?;
        let lowest_allowed = quantile_threshold(&sorted_normal, max_far);
        // Candidate thresholds: every score at or above the FAR-limited one.
        let mut candidates: Vec<f32> = sorted_normal
            .iter()
            .chain(&sorted_anomalous)
            .copied()
            .filter(|s| *s >= lowest_allowed)
            .collect();
        candidates.push(lowest_allowed);
        let mut best = (f64::NEG_INFINITY, lowest_allowed);
        for t in candidates {
            let tp = count_at_or_above(&sorted_anomalous, t) as f64;
            let fp = count_at_or_above(&sorted_normal, t) as f64;
            let fn_ = sorted_anomalous.len() as f64 - tp;
            let f1 = if tp == 0.0 {
                0.0
            } else {
                2.0 * tp / (2.0 * tp + fp + fn_)
            };
            if f1 > best.0 || (f1 == best.0 && t < best.1) {
                best = (f1, t);
            }
        }
        Ok(Self::build(
            &sorted_normal,
            &sorted_anomalous,
            best.1,
            ThresholdMethod::F1Optimal { f1: best.0 },
            max_far,
        ))
    }

    fn build(
        normal: &[f32],
        anomalous: &[f32],
        threshold: f32,
        method: ThresholdMethod,
        max_far: f64,
    ) -> Self {
        let low_seen = normal.first().copied().unwrap_or(threshold);
        let low = low_seen.min(threshold);
        let spread = (threshold - low).max(threshold.abs() * 1e-3).max(1e-6);
        let high_seen = anomalous
            .last()
            .copied()
            .unwrap_or(f32::NEG_INFINITY)
            .max(normal.last().copied().unwrap_or(f32::NEG_INFINITY));
        // Without anomalies, mirror the normal spread above the threshold.
        let high = if high_seen > threshold && !anomalous.is_empty() {
            high_seen
        } else {
            threshold + spread
        };
        Self {
            low: threshold - spread,
            threshold,
            high,
            method,
            max_far,
            estimated_far: count_at_or_above(normal, threshold) as f64 / normal.len() as f64,
            normal_images: normal.len(),
            anomalous_images: anomalous.len(),
        }
    }

    /// The identity on `[0, 1]` with the threshold at 0.5, for raw scores
    /// that already are probabilities.
    pub fn probability() -> Self {
        Self {
            low: 0.0,
            threshold: DECISION_THRESHOLD,
            high: 1.0,
            method: ThresholdMethod::Probability,
            max_far: 0.0,
            estimated_far: 0.0,
            normal_images: 0,
            anomalous_images: 0,
        }
    }

    /// The 0–1 score of a raw score.
    pub fn normalise(&self, raw: f32) -> f32 {
        let value = if raw < self.threshold {
            0.5 * (raw - self.low) / (self.threshold - self.low)
        } else {
            0.5 + 0.5 * (raw - self.threshold) / (self.high - self.threshold)
        };
        if value.is_nan() {
            0.0
        } else {
            value.clamp(0.0, 1.0)
        }
    }

    /// Whether a raw score is over the threshold.
    pub fn is_anomalous(&self, raw: f32) -> bool {
        raw >= self.threshold
    }
}

fn sorted_checked(scores: &[f32], max_far: f64) -> Result<Vec<f32>, CalibrationError> {
    if !(0.0..1.0).contains(&max_far) {
        return Err(CalibrationError::InvalidFalseAlarmRate(max_far));
    }
    if scores.is_empty() {
        return Err(CalibrationError::NoNormalScores);
    }
    if scores.iter().any(|s| !s.is_finite()) {
        return Err(CalibrationError::NonFinite);
    }
    let mut sorted = scores.to_vec();
    sorted.sort_by(f32::total_cmp);
    Ok(sorted)
}

/// Lowest threshold that flags at most `floor(max_far · n)` sorted scores.
fn quantile_threshold(sorted: &[f32], max_far: f64) -> f32 {
    let n = sorted.len();
    let allowed = ((max_far * n as f64).floor() as usize).min(n - 1);
    let last_passing = sorted[n - 1 - allowed];
    // Flagged scores are those >= threshold; ties with the last passing score
    // must pass too, so step just above it.
    let first_flagged = sorted[n - allowed..]
        .iter()
        .copied()
        .find(|s| *s > last_passing);
    match first_flagged {
        Some(next) => 0.5 * (last_passing + next),
        None => last_passing + last_passing.abs().max(1e-6) * 1e-4,
    }
}

fn count_at_or_above(sorted: &[f32], t: f32) -> usize {
    sorted.len() - sorted.partition_point(|s| *s < t)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn normal_quantile_respects_the_false_alarm_limit() {
        let normal: Vec<f32> = (1..=100).map(|i| i as f32).collect();
        let c = Calibration::from_normal_scores(&normal, 0.05).unwrap();
        assert_eq!(c.threshold, 95.5);
        assert!((c.estimated_far - 0.05).abs() < 1e-12);
        assert_eq!(c.normalise(95.5), 0.5);
        assert!(c.normalise(96.0) > 0.5 && c.normalise(95.0) < 0.5);
        let strict = Calibration::from_normal_scores(&normal, 0.0).unwrap();
        assert!(strict.threshold > 100.0);
        assert_eq!(strict.estimated_far, 0.0);
        assert!(matches!(strict.method, ThresholdMethod::NormalQuantile));
    }

    #[test]
    fn f1_threshold_separates_when_it_can_and_is_monotonic() {
        let normal = [1.0, 2.0, 3.0, 4.0];
        let anomalous = [6.0, 7.0, 8.0];
        let c = Calibration::from_labelled_scores(&normal, &anomalous, 0.5).unwrap();
        assert!(c.threshold > 4.0 && c.threshold <= 6.0, "{c:?}");
        assert_eq!(c.method, ThresholdMethod::F1Optimal { f1: 1.0 });
        let mut last = -1.0;
        for raw in [-10.0, 0.0, 1.0, 4.0, 5.0, 6.0, 8.0, 100.0] {
            let v = c.normalise(raw);
            assert!((0.0..=1.0).contains(&v) && v >= last);
            last = v;
        }
    }

    #[test]
    fn bad_inputs_are_errors() {
        assert_eq!(
            Calibration::from_normal_scores(&[], 0.01),
            Err(CalibrationError::NoNormalScores)
        );
        assert!(Calibration::from_normal_scores(&[f32::NAN], 0.01).is_err());
        assert!(Calibration::from_normal_scores(&[1.0], 1.5).is_err());
        // Equal scores give a usable, finite mapping.
        let c = Calibration::from_normal_scores(&[2.0; 5], 0.01).unwrap();
        assert!(c.normalise(2.0) < 0.5 && c.normalise(3.0) > 0.5);
    }
}
