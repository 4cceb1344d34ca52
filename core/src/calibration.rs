//! Calibration: from raw detector scores to 0–1 scores and a verdict.
//!
//! A [`Calibration`] is a plain value stored in the model file. A raw score
//! `r` maps to `0.5 + 0.5 · x / (1 + |x|)` with `x = (r − threshold) /
//! spread`: the decision threshold lands at exactly 0.5, the map is strictly
//! increasing over the whole range, and it approaches 0 and 1 only slowly
//! (a raw score 1 000 spreads above the threshold is still 0.9995), so clear
//! defects keep their order instead of all reading 1.000. Rankings (and
//! AUROC) are unchanged. `spread` is the distance from the median
//! out-of-sample normal score to the threshold: the median normal image scores 0.25.
//! (A rational map rather than a logistic one: a logistic saturates to
//! exactly 1.0 in `f32` some 17 spreads above the threshold.)
//!
//! The threshold comes from normal images (out-of-sample scores): with `max_far = F` at
//! most a fraction `F` of them is flagged. When labelled anomalous images are
//! available too, the threshold is the F1-optimal one among those that still
//! respect the false-alarm limit. With a missed-alarm target instead, the
//! threshold is the highest one that still flags all but that fraction of
//! the synthetic defects ([`Calibration::from_missed_alarm_target`]).
//!
//! The false-alarm estimate comes with an exact (Clopper–Pearson) one-sided
//! 95 % upper bound: with `n` normal images (out-of-sample scores) and no false alarm the
//! bound is `1 − 0.05^(1/n)`, so a limit of 1 % can only be confirmed with at
//! least 299 of them ([`images_needed`]).

use serde::{Deserialize, Serialize};

/// The normalised score at and above which an image is anomalous.
pub const DECISION_THRESHOLD: f32 = 0.5;

#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum CalibrationError {
    #[error("calibration needs at least one normal image score")]
    NoNormalScores,
    #[error("calibration scores must be finite")]
    NonFinite,
    #[error("the false-alarm limit must be in [0, 1), got {0}")]
    InvalidFalseAlarmRate(f64),
    #[error("the missed-alarm target must be in [0, 1), got {0}")]
    InvalidMissedAlarmRate(f64),
    #[error("give a false-alarm limit or a missed-alarm target, not both")]
    TwoTargets,
    #[error("this model kept no synthetic-defect scores, so a missed-alarm target cannot be met")]
    NoSyntheticScores,
    #[error(
        "this model file keeps no calibration scores (written before cross-fitting, or not \
         calibrated), so its threshold cannot be moved per request; fit it again"
    )]
    NoKeptScores,
}

/// How the threshold was chosen.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum ThresholdMethod {
    /// From normal images alone: no anomalies were seen, so F1-based
    /// calibration was impossible.
    NormalQuantile,
    /// F1-optimal on normal images plus labelled anomalies, within the
    /// false-alarm limit.
    F1Optimal { f1: f64 },
    /// The highest threshold that misses at most `max_mar` of the synthetic
    /// defects pasted into the normal images (out-of-sample scores).
    MissedAlarmTarget { max_mar: f64 },
    /// Nothing fitted: the raw score is already a 0–1 probability whose
    /// natural threshold is 0.5 (zero-shot WinCLIP); see
    /// [`Calibration::probability`].
    Probability,
    /// No normal images: the threshold is an outlier rule on a batch's own
    /// scores ([`crate::musc`]); no false-alarm rate is measured.
    BatchOutlier,
}

/// Maps raw scores to `(0, 1)` with the decision threshold at 0.5.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Calibration {
    /// Raw score mapped to 0.5: the decision threshold.
    pub threshold: f32,
    /// Raw-score distance from the threshold that maps to 0.25 / 0.75.
    /// Files written before it existed get `threshold − low` on load.
    pub spread: f32,
    pub method: ThresholdMethod,
    /// The false-alarm limit asked for (1 when a missed-alarm target chose
    /// the threshold instead).
    pub max_far: f64,
    /// Fraction of normal images (out-of-sample scores) at or above the threshold.
    pub estimated_far: f64,
    /// One-sided 95 % Clopper–Pearson upper bound on the false-alarm rate,
    /// from the out-of-sample normal scores (1 when there are none).
    #[serde(default = "one")]
    pub far_upper_95: f64,
    /// How many normal images (out-of-sample scores) the estimate rests on.
    pub normal_images: usize,
    /// How many labelled anomalous images were used.
    pub anomalous_images: usize,
}

fn one() -> f64 {
    1.0
}

/// One-sided 95 % upper confidence bound (exact, Clopper–Pearson) on a rate
/// seen `k` times in `n` trials: the `p` at which seeing `k` or fewer has
/// probability 5 %. 1 when `n` is 0 or `k ≥ n`.
pub fn upper_bound_95(k: usize, n: usize) -> f64 {
    use statrs::distribution::{Beta, ContinuousCDF};
    if n == 0 || k >= n {
        return 1.0;
    }
    match Beta::new((k + 1) as f64, (n - k) as f64) {
        Ok(beta) => beta.inverse_cdf(0.95),
        Err(_) => 1.0,
    }
}

/// How many normal images (out-of-sample scores), none of them flagged, it takes for the
/// 95 % upper bound to reach `max_far`: the smallest `n` with
/// `1 − 0.05^(1/n) ≤ max_far`. `None` for a limit of 0 (never).
pub fn images_needed(max_far: f64) -> Option<usize> {
    if !(max_far > 0.0 && max_far < 1.0) {
        return None;
    }
    Some((0.05f64.ln() / (1.0 - max_far).ln()).ceil() as usize)
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
            0,
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
            sorted_anomalous.len(),
            best.1,
            ThresholdMethod::F1Optimal { f1: best.0 },
            max_far,
        ))
    }

    /// The highest threshold that flags all but at most `floor(max_mar · m)`
    /// of the `m` scores of (synthetic) defects; the false-alarm rate it
    /// costs is estimated on the normal scores.
    pub fn from_missed_alarm_target(
        normal: &[f32],
        defects: &[f32],
        max_mar: f64,
    ) -> Result<Self, CalibrationError> {
        if !(0.0..1.0).contains(&max_mar) {
            return Err(CalibrationError::InvalidMissedAlarmRate(max_mar));
        }
        let sorted_normal = sorted_checked(normal, 0.0)?;
        let sorted_defects = sorted_checked(defects, 0.0)?;
        let allowed = (max_mar * sorted_defects.len() as f64).floor() as usize;
        // Scores below the threshold are missed: at most `allowed` of them.
        let threshold = sorted_defects[allowed.min(sorted_defects.len() - 1)];
        Ok(Self::build(
            &sorted_normal,
            0,
            threshold,
            ThresholdMethod::MissedAlarmTarget { max_mar },
            1.0,
        ))
    }

    fn build(
        normal: &[f32],
        anomalous_images: usize,
        threshold: f32,
        method: ThresholdMethod,
        max_far: f64,
    ) -> Self {
        let floor = (threshold.abs() * 1e-3).max(1e-6);
        let median = normal[normal.len() / 2];
        let lowest = normal.first().copied().unwrap_or(threshold);
        let spread = if threshold - median > floor {
            threshold - median
        } else {
            (threshold - lowest).max(floor)
        };
        let flagged = count_at_or_above(normal, threshold);
        Self {
            threshold,
            spread,
            method,
            max_far,
            estimated_far: flagged as f64 / normal.len() as f64,
            far_upper_95: upper_bound_95(flagged, normal.len()),
            normal_images: normal.len(),
            anomalous_images,
        }
    }

    /// The identity on `[0, 1]` with the threshold at 0.5, for raw scores
    /// that already are probabilities.
    pub fn probability() -> Self {
        Self {
            threshold: DECISION_THRESHOLD,
            spread: 0.5,
            method: ThresholdMethod::Probability,
            max_far: 0.0,
            estimated_far: 0.0,
            far_upper_95: 1.0,
            normal_images: 0,
            anomalous_images: 0,
        }
    }

    /// Only the 0–1 map, with `threshold` at 0.5 and `spread` below it at
    /// 0.25: for scores with a threshold but no measured false-alarm rate
    /// (mutual scoring's batch outlier rule, [`crate::musc`]).
    pub fn rational(threshold: f32, spread: f32) -> Self {
        Self {
            threshold,
            spread: spread.max(f32::EPSILON),
            method: ThresholdMethod::BatchOutlier,
            ..Self::probability()
        }
    }

    /// The 0–1 score of a raw score: 0.5 at the threshold, strictly below
    /// 0.5 under it (also after rounding to `f32`), strictly increasing, and
    /// never exactly 0 or 1 for finite raw scores within 10⁷ spreads of the
    /// threshold. NaN maps to 0.
    pub fn normalise(&self, raw: f32) -> f32 {
        if raw.is_nan() {
            return 0.0;
        }
        if self.method == ThresholdMethod::Probability {
            return raw.clamp(0.0, 1.0);
        }
        let x = (f64::from(raw) - f64::from(self.threshold)) / f64::from(self.spread);
        // 0.5 + 0.5·x/(1 + |x|), written per side so that neither side
        // cancels to exactly 0 or 1 in f64.
        let value = if x.is_infinite() {
            if x > 0.0 { 1.0 } else { 0.0 }
        } else if x < 0.0 {
            0.5 / (1.0 - x)
        } else {
            1.0 - 0.5 / (1.0 + x)
        };
        let rounded = value as f32;
        if raw < self.threshold && rounded >= DECISION_THRESHOLD {
            // Rounding must not turn a passing score into a flagged one.
            f32::from_bits(DECISION_THRESHOLD.to_bits() - 1)
        } else if rounded >= 1.0 && x.is_finite() {
            f32::from_bits(1.0f32.to_bits() - 1)
        } else {
            rounded
        }
    }

    /// The raw score that [`Calibration::normalise`] maps to `value` (its
    /// inverse on `(0, 1)`; 0 and 1 map to ∓∞).
    pub fn raw_at(&self, value: f32) -> f32 {
        if self.method == ThresholdMethod::Probability {
            return value;
        }
        let v = f64::from(value.clamp(0.0, 1.0));
        // Inverse of 0.5 + 0.5·x/(1 + |x|), per side.
        let x = if v < 0.5 {
            if v <= 0.0 {
                return f32::NEG_INFINITY;
            }
            1.0 - 0.5 / v
        } else {
            if v >= 1.0 {
                return f32::INFINITY;
            }
            0.5 / (1.0 - v) - 1.0
        };
        (f64::from(self.threshold) + x * f64::from(self.spread)) as f32
    }

    /// Whether a raw score is over the threshold.
    pub fn is_anomalous(&self, raw: f32) -> bool {
        raw >= self.threshold
    }

    /// Whether a false-alarm rate was estimated (not for raw probabilities).
    pub fn is_fitted(&self) -> bool {
        !matches!(
            self.method,
            ThresholdMethod::Probability | ThresholdMethod::BatchOutlier
        )
    }

    /// A warning when the normal images (out-of-sample scores) are too few to confirm
    /// the false-alarm limit asked for (its 95 % upper bound stays above
    /// the limit even with no false alarm).
    pub fn holdout_warning(&self) -> Option<String> {
        if !self.is_fitted() || matches!(self.method, ThresholdMethod::MissedAlarmTarget { .. }) {
            return None;
        }
        let best_case = upper_bound_95(0, self.normal_images);
        if best_case <= self.max_far {
            return None;
        }
        let needed = match images_needed(self.max_far) {
            Some(n) => format!("at least {n} normal images would be needed"),
            None => "no finite number of images can confirm a limit of 0".to_owned(),
        };
        Some(format!(
            "{} normal images cannot confirm a false-alarm limit of {}: even with no false \
             alarm the 95 % upper bound is {:.3}; {needed}",
            self.normal_images, self.max_far, best_case
        ))
    }

    /// Recomputes what older model files lack (the upper bound).
    pub fn refresh_bound(&mut self) {
        if self.is_fitted() && self.normal_images > 0 {
            let flagged = (self.estimated_far * self.normal_images as f64).round() as usize;
            self.far_upper_95 = upper_bound_95(flagged, self.normal_images);
        }
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
        // The median normal score maps to 0.25.
        assert!(
            (c.normalise(51.0) - 0.25).abs() < 1e-6,
            "{}",
            c.normalise(51.0)
        );
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
        let mut last = 0.0;
        for raw in [-10.0, 0.0, 1.0, 4.0, 5.0, 6.0, 8.0, 100.0, 1e6] {
            let v = c.normalise(raw);
            assert!(v > 0.0 && v < 1.0 && v > last, "{raw} → {v}");
            last = v;
        }
    }

    #[test]
    fn distinct_raw_scores_stay_distinct_and_ordered_above_the_threshold() {
        // A demo-like model: threshold near 30, clear defects at 42.5–51.8,
        // which the old piecewise-linear map all clipped to exactly 1.0.
        let normal: Vec<f32> = (0..10).map(|i| 24.0 + 0.6 * i as f32).collect();
        let c = Calibration::from_normal_scores(&normal, 0.01).unwrap();
        let mut raws: Vec<f32> = vec![42.5, 44.1, 47.3, 49.9, 51.8];
        // And a dense sweep from the threshold to 10 000 spreads above it.
        let mut raw = c.threshold;
        while raw < c.threshold + 1e4 * c.spread {
            raws.push(raw);
            raw += (raw - c.threshold).max(c.spread) * 0.01;
        }
        raws.sort_by(f32::total_cmp);
        raws.dedup();
        let scores: Vec<f32> = raws.iter().map(|r| c.normalise(*r)).collect();
        for (pair, r) in scores.windows(2).zip(raws.windows(2)) {
            assert!(pair[1] > pair[0], "{r:?} → {pair:?}");
        }
        assert!(scores.iter().all(|s| *s >= 0.5 && *s < 1.0));
        assert_eq!(c.normalise(c.threshold), 0.5);
        // Just under the threshold stays under 0.5 after rounding.
        let below = f32::from_bits(c.threshold.to_bits() - 1);
        assert!(c.normalise(below) < 0.5);
        assert!(c.normalise(-1e30) > 0.0 && c.normalise(1e30) <= 1.0);
        assert_eq!(c.normalise(f32::NAN), 0.0);
    }

    #[test]
    fn raw_at_inverts_the_score_map() {
        let normal: Vec<f32> = (1..=100).map(|i| i as f32).collect();
        let c = Calibration::from_normal_scores(&normal, 0.05).unwrap();
        for raw in [1.0f32, 30.0, 95.5, 96.0, 200.0] {
            let back = c.raw_at(c.normalise(raw));
            assert!(
                (back - raw).abs() < 1e-3 * raw.abs().max(1.0),
                "{raw} → {back}"
            );
        }
        assert_eq!(c.raw_at(0.5), c.threshold);
        assert!(c.raw_at(0.0).is_infinite() && c.raw_at(1.0).is_infinite());
    }

    #[test]
    fn upper_bound_is_exact_clopper_pearson() {
        for n in [1usize, 5, 10, 100] {
            let expected = 1.0 - 0.05f64.powf(1.0 / n as f64);
            assert!((upper_bound_95(0, n) - expected).abs() < 1e-9, "{n}");
        }
        // 1 of 10: the p with P(X ≤ 1) = 0.05, known to be ≈ 0.3942.
        assert!((upper_bound_95(1, 10) - 0.3942).abs() < 1e-3);
        assert_eq!(upper_bound_95(3, 3), 1.0);
        assert_eq!(images_needed(0.01), Some(299));
        assert!(upper_bound_95(0, 299) <= 0.01 && upper_bound_95(0, 298) > 0.01);
        assert_eq!(images_needed(0.0), None);
        let c = Calibration::from_normal_scores(&[1.0; 10], 0.01).unwrap();
        assert!((c.far_upper_95 - upper_bound_95(0, 10)).abs() < 1e-12);
        assert!(c.holdout_warning().is_some_and(|w| w.contains("299")));
        let many: Vec<f32> = (0..400).map(|i| i as f32).collect();
        let c = Calibration::from_normal_scores(&many, 0.01).unwrap();
        assert!(c.holdout_warning().is_none(), "{c:?}");
    }

    #[test]
    fn missed_alarm_target_sets_the_highest_threshold_that_meets_it() {
        let normal: Vec<f32> = (0..20).map(|i| i as f32).collect();
        let defects: Vec<f32> = (0..10).map(|i| 15.0 + i as f32).collect();
        let c = Calibration::from_missed_alarm_target(&normal, &defects, 0.2).unwrap();
        assert_eq!(c.threshold, 17.0);
        let missed = defects.iter().filter(|d| !c.is_anomalous(**d)).count();
        assert_eq!(missed, 2);
        assert!((c.estimated_far - 3.0 / 20.0).abs() < 1e-12);
        assert!(Calibration::from_missed_alarm_target(&normal, &defects, 1.0).is_err());
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
