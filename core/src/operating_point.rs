//! Operating points: the threshold an image is judged at, and what it costs
//! in false and missed alarms.
//!
//! A model file keeps the out-of-sample calibration scores its threshold
//! was set on ([`CalibrationScores`]), so a request can ask for another
//! false-alarm limit or missed-alarm target ([`Target`]) without refitting;
//! [`OperatingPoint`] states the threshold used and both estimates at it.

use serde::{Deserialize, Serialize};

use crate::calibration::{Calibration, CalibrationError, upper_bound_95};
use crate::folds::Procedure;
use crate::synthetic::{DefectKind, KindRate, MissedAlarmEstimate};

/// Scores kept per list at most: evenly spaced order statistics beyond it
/// (a 1 % quantile of 4 096 kept scores is off by at most 0.03 %).
pub const MAX_KEPT_SCORES: usize = 4_096;

/// The raw scores a model's threshold rests on.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CalibrationScores {
    pub procedure: Procedure,
    pub folds: usize,
    /// Out-of-sample scores of the normal images, sorted ascending.
    pub normal: Vec<f32>,
    /// How many normal images were scored (more than `normal.len()` when
    /// thinned to [`MAX_KEPT_SCORES`]).
    pub normal_images: usize,
    /// Out-of-sample scores of synthetic defects, per kind, sorted.
    pub synthetic: Vec<(DefectKind, Vec<f32>)>,
    /// Scores of images a person marked defective (`refit`), per defect
    /// type, sorted.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub labelled: Vec<(String, Vec<f32>)>,
}

/// Sorted and thinned to at most [`MAX_KEPT_SCORES`].
pub fn kept(scores: &[f32]) -> Vec<f32> {
    let mut sorted = scores.to_vec();
    sorted.sort_by(f32::total_cmp);
    let n = sorted.len();
    if n <= MAX_KEPT_SCORES {
        return sorted;
    }
    (0..MAX_KEPT_SCORES)
        .map(|i| sorted[(i * (n - 1) + (MAX_KEPT_SCORES - 1) / 2) / (MAX_KEPT_SCORES - 1)])
        .collect()
}

/// What a request asks the threshold to meet.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Target {
    /// Flag at most this fraction of normal images.
    MaxFar(f64),
    /// Miss at most this fraction of synthetic defects.
    MaxMar(f64),
    /// A threshold a person chose on the 0–1 score (the TUI's `+` / `-`):
    /// the estimates are stated at it.
    Threshold(f32),
}

impl Target {
    /// A target from optional request fields; both at once is an error.
    pub fn from_request(
        max_far: Option<f64>,
        max_mar: Option<f64>,
    ) -> Result<Option<Self>, CalibrationError> {
        match (max_far, max_mar) {
            (Some(_), Some(_)) => Err(CalibrationError::TwoTargets),
            (Some(far), None) if (0.0..1.0).contains(&far) => Ok(Some(Self::MaxFar(far))),
            (Some(far), None) => Err(CalibrationError::InvalidFalseAlarmRate(far)),
            (None, Some(mar)) if (0.0..1.0).contains(&mar) => Ok(Some(Self::MaxMar(mar))),
            (None, Some(mar)) => Err(CalibrationError::InvalidMissedAlarmRate(mar)),
            (None, None) => Ok(None),
        }
    }
}

/// A missed-alarm rate measured on labelled defective images.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LabelledRate {
    pub images: usize,
    pub missed: usize,
    pub rate: f64,
    /// One-sided 95 % Clopper–Pearson upper bound.
    pub upper_95: f64,
    /// The same per defect type a person named.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub per_type: Vec<(String, LabelledRate)>,
}

impl LabelledRate {
    fn of(scores: &[f32], raw_threshold: f32) -> Self {
        let missed = scores.iter().filter(|s| **s < raw_threshold).count();
        Self {
            images: scores.len(),
            missed,
            rate: missed as f64 / scores.len().max(1) as f64,
            upper_95: upper_bound_95(missed, scores.len()),
            per_type: Vec::new(),
        }
    }
}

/// The threshold an image was judged at and what it costs.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct OperatingPoint {
    /// The request's target; absent: the model's own threshold.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub target: Option<Target>,
    /// The 0–1 score at and above which an image is anomalous (0.5 at the
    /// model's own threshold).
    pub threshold: f32,
    pub raw_threshold: f32,
    /// Fraction of the calibration's normal images at or above it.
    pub estimated_false_alarm_rate: f64,
    /// One-sided 95 % upper bound on the false-alarm rate.
    pub false_alarm_upper_bound_95: f64,
    /// Normal images the estimate rests on (out-of-sample scores).
    pub normal_images: usize,
    /// Fraction of synthetic defects (all kinds) below it.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub synthetic_missed_alarm_rate: Option<f64>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub synthetic_missed_alarm_rates: Vec<KindRate>,
    /// On images a person marked defective, once a refit has seen some.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub labelled_missed_alarm_rate: Option<LabelledRate>,
    /// Set when the normal images are too few to confirm the limit asked.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub warning: Option<String>,
}

impl OperatingPoint {
    /// Whether a raw score is flagged at this operating point.
    pub fn flags(&self, raw: f32) -> bool {
        raw >= self.raw_threshold
    }

    /// Uncalibrated scores (zero-shot probabilities): 0.5, no estimates.
    pub fn probability() -> Self {
        Self {
            target: None,
            threshold: crate::calibration::DECISION_THRESHOLD,
            raw_threshold: crate::calibration::DECISION_THRESHOLD,
            estimated_false_alarm_rate: f64::NAN,
            false_alarm_upper_bound_95: 1.0,
            normal_images: 0,
            synthetic_missed_alarm_rate: None,
            synthetic_missed_alarm_rates: Vec::new(),
            labelled_missed_alarm_rate: None,
            warning: Some(
                "uncalibrated: the score is the vision-language model's probability, and no \
                 false-alarm rate has been measured"
                    .into(),
            ),
        }
    }

    /// The operating point of `calibration` (the model's), or of `target`
    /// on the kept scores.
    pub fn new(
        calibration: &Calibration,
        scores: &CalibrationScores,
        target: Option<Target>,
    ) -> Result<Self, CalibrationError> {
        let pooled: Vec<f32> = scores
            .synthetic
            .iter()
            .flat_map(|(_, s)| s.iter().copied())
            .collect();
        let (raw_threshold, max_far) = match target {
            None => (calibration.threshold, Some(calibration.max_far)),
            Some(Target::MaxFar(far)) => (
                Calibration::from_normal_scores(&scores.normal, far)?.threshold,
                Some(far),
            ),
            Some(Target::Threshold(value)) => (calibration.raw_at(value), None),
            Some(Target::MaxMar(mar)) => {
                if pooled.is_empty() {
                    return Err(CalibrationError::NoSyntheticScores);
                }
                (
                    Calibration::from_missed_alarm_target(&scores.normal, &pooled, mar)?.threshold,
                    None,
                )
            }
        };
        let kept = scores.normal.len().max(1);
        let flagged_kept =
            scores.normal.len() - scores.normal.partition_point(|s| *s < raw_threshold);
        let far = flagged_kept as f64 / kept as f64;
        let n = scores.normal_images.max(scores.normal.len());
        let flagged = (far * n as f64).round() as usize;
        let missed = MissedAlarmEstimate::measure(&scores.synthetic, |s| s >= raw_threshold);
        let synthetic_missed_alarm_rate = (!pooled.is_empty()).then(|| {
            pooled.iter().filter(|s| **s < raw_threshold).count() as f64 / pooled.len() as f64
        });
        let labelled_missed_alarm_rate = if scores.labelled.is_empty() {
            None
        } else {
            let all: Vec<f32> = scores
                .labelled
                .iter()
                .flat_map(|(_, s)| s.iter().copied())
                .collect();
            let mut rate = LabelledRate::of(&all, raw_threshold);
            rate.per_type = scores
                .labelled
                .iter()
                .filter(|(name, _)| !name.is_empty())
                .map(|(name, s)| (name.clone(), LabelledRate::of(s, raw_threshold)))
                .collect();
            Some(rate)
        };
        let bound = upper_bound_95(flagged, n);
        let warning = max_far.and_then(|limit| {
            let best = upper_bound_95(0, n);
            (best > limit).then(|| {
                format!(
                    "{n} normal images cannot confirm a false-alarm limit of {limit}: even with \
                     no false alarm the 95 % upper bound is {best:.3}; at least {} normal images \
                     would be needed",
                    crate::calibration::images_needed(limit)
                        .map_or_else(|| "infinitely many".to_owned(), |k| k.to_string())
                )
            })
        });
        Ok(Self {
            target,
            threshold: calibration.normalise(raw_threshold),
            raw_threshold,
            estimated_false_alarm_rate: far,
            false_alarm_upper_bound_95: bound,
            normal_images: n,
            synthetic_missed_alarm_rate,
            synthetic_missed_alarm_rates: missed.per_kind,
            labelled_missed_alarm_rate,
            warning,
        })
    }

    /// `threshold 0.500 (raw 12.3); false alarms 0.9 % (95 % bound 1.6 %) on
    /// 763 normal images; missed synthetic defects 12.0 %`.
    pub fn describe(&self) -> String {
        let mut text = format!(
            "threshold {:.3} (raw {:.4})",
            self.threshold, self.raw_threshold
        );
        if self.normal_images > 0 {
            text.push_str(&format!(
                "; false alarms {:.1} % (95 % bound {:.1} %) on {} normal images",
                100.0 * self.estimated_false_alarm_rate,
                100.0 * self.false_alarm_upper_bound_95,
                self.normal_images
            ));
        }
        if let Some(mar) = self.synthetic_missed_alarm_rate {
            text.push_str(&format!("; missed synthetic defects {:.1} %", 100.0 * mar));
        }
        if let Some(l) = &self.labelled_missed_alarm_rate {
            text.push_str(&format!(
                "; missed marked defects {:.1} % ({}/{}, 95 % bound {:.1} %)",
                100.0 * l.rate,
                l.missed,
                l.images,
                100.0 * l.upper_95
            ));
        }
        text
    }
}

/// A model's calibration and kept scores, to state the estimates at any
/// threshold a person moves to without the model at hand (the TUI's
/// `+` / `-`).
#[derive(Debug, Clone, PartialEq)]
pub struct Estimator {
    pub calibration: Calibration,
    pub scores: CalibrationScores,
}

impl Estimator {
    /// The operating point at the 0–1 `threshold`.
    pub fn at(&self, threshold: f32) -> Option<OperatingPoint> {
        OperatingPoint::new(
            &self.calibration,
            &self.scores,
            Some(Target::Threshold(threshold)),
        )
        .ok()
    }
}

/// Scores a [`CalibrationView`] lists per kind at most: enough for a
/// histogram, small enough for a page to fetch.
pub const VIEW_SCORES: usize = 512;

/// Steps of a [`CalibrationView`]'s table over the 0–1 threshold.
pub const VIEW_STEPS: usize = 100;

/// What a person needs to move a model's threshold by hand: the 0–1
/// scores the calibration rests on (normal, synthetic and labelled
/// defects, each thinned to [`VIEW_SCORES`]) and the estimates at every
/// hundredth of the threshold, all from the kept scores (no refit).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct CalibrationView {
    /// The model's own 0–1 threshold.
    pub threshold: f32,
    pub normal_images: usize,
    pub normal: Vec<f32>,
    pub synthetic: Vec<f32>,
    pub labelled: Vec<f32>,
    /// The estimates at `0.00, 0.01, …, 1.00`.
    pub table: Vec<ViewPoint>,
}

/// The estimates at one threshold of a [`CalibrationView`].
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct ViewPoint {
    pub threshold: f32,
    pub false_alarm_rate: f64,
    pub false_alarm_upper_bound_95: f64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub synthetic_missed_alarm_rate: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub labelled_missed_alarm_rate: Option<f64>,
}

impl Estimator {
    /// The view a page or terminal draws its histogram and threshold
    /// slider from.
    pub fn view(&self) -> CalibrationView {
        let normalised = |scores: &[f32]| -> Vec<f32> {
            let mut out: Vec<f32> = scores
                .iter()
                .map(|s| self.calibration.normalise(*s))
                .collect();
            out.sort_by(f32::total_cmp);
            thin(&out, VIEW_SCORES)
        };
        let pooled = |lists: Vec<&Vec<f32>>| -> Vec<f32> {
            normalised(&lists.into_iter().flatten().copied().collect::<Vec<f32>>())
        };
        let table = (0..=VIEW_STEPS)
            .filter_map(|i| {
                let t = i as f32 / VIEW_STEPS as f32;
                self.at(t).map(|p| ViewPoint {
                    threshold: t,
                    false_alarm_rate: p.estimated_false_alarm_rate,
                    false_alarm_upper_bound_95: p.false_alarm_upper_bound_95,
                    synthetic_missed_alarm_rate: p.synthetic_missed_alarm_rate,
                    labelled_missed_alarm_rate: p.labelled_missed_alarm_rate.map(|l| l.rate),
                })
            })
            .collect();
        CalibrationView {
            threshold: self.calibration.normalise(self.calibration.threshold),
            normal_images: self.scores.normal_images.max(self.scores.normal.len()),
            normal: normalised(&self.scores.normal),
            synthetic: pooled(self.scores.synthetic.iter().map(|(_, s)| s).collect()),
            labelled: pooled(self.scores.labelled.iter().map(|(_, s)| s).collect()),
            table,
        }
    }
}

/// Evenly spaced order statistics of sorted `scores`, at most `max`.
fn thin(scores: &[f32], max: usize) -> Vec<f32> {
    let n = scores.len();
    if n <= max || max < 2 {
        return scores.iter().take(max.max(n.min(1))).copied().collect();
    }
    (0..max)
        .map(|i| scores[(i * (n - 1) + (max - 1) / 2) / (max - 1)])
        .collect()
}

/// Scores per synthetic kind, sorted and thinned.
pub fn kept_synthetic(scores: &[(DefectKind, Vec<f32>)]) -> Vec<(DefectKind, Vec<f32>)> {
    scores.iter().map(|(k, s)| (*k, kept(s))).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn scores() -> CalibrationScores {
        CalibrationScores {
            procedure: Procedure::BankFolds,
            folds: 10,
            normal: (1..=200).map(|i| i as f32).collect(),
            normal_images: 200,
            synthetic: vec![(DefectKind::Blotch, (150..250).map(|i| i as f32).collect())],
            labelled: vec![("crack".into(), vec![180.0, 195.0, 199.5, 250.0])],
        }
    }

    #[test]
    fn the_view_is_bounded_and_agrees_with_the_estimator() {
        let s = CalibrationScores {
            normal: (1..=5000).map(|i| i as f32 / 50.0).collect(),
            normal_images: 5000,
            ..scores()
        };
        let calibration = Calibration::from_normal_scores(&s.normal, 0.01).unwrap();
        let estimator = Estimator {
            calibration,
            scores: s,
        };
        let view = estimator.view();
        assert_eq!(view.normal.len(), VIEW_SCORES);
        assert_eq!(view.table.len(), VIEW_STEPS + 1);
        assert!(view.normal.windows(2).all(|w| w[0] <= w[1]));
        assert_eq!(view.labelled.len(), 4);
        for point in &view.table {
            let at = estimator.at(point.threshold).unwrap();
            assert_eq!(point.false_alarm_rate, at.estimated_false_alarm_rate);
        }
        assert!((view.threshold - 0.5).abs() < 1e-6, "{}", view.threshold);
        // Higher thresholds flag fewer normal images.
        assert!(
            view.table
                .windows(2)
                .all(|w| w[0].false_alarm_rate >= w[1].false_alarm_rate)
        );
    }

    #[test]
    fn a_request_moves_the_threshold_and_both_estimates() {
        let s = scores();
        let model = Calibration::from_normal_scores(&s.normal, 0.01).unwrap();
        let own = OperatingPoint::new(&model, &s, None).unwrap();
        assert_eq!(own.threshold, 0.5);
        assert!((own.estimated_false_alarm_rate - 0.01).abs() < 1e-12);
        let loose = OperatingPoint::new(&model, &s, Some(Target::MaxFar(0.05))).unwrap();
        assert!(loose.raw_threshold < own.raw_threshold && loose.threshold < 0.5);
        assert!((loose.estimated_false_alarm_rate - 0.05).abs() < 1e-12);
        assert!(loose.synthetic_missed_alarm_rate < own.synthetic_missed_alarm_rate);
        // Every normal score flagged at the request's threshold is counted.
        assert!(loose.flags(191.0) && !loose.flags(190.0));
        // Own threshold 198.5 (two of 200 normal scores above it): 180 and
        // 195 are missed.
        assert_eq!(own.raw_threshold, 198.5);
        let labelled = own.labelled_missed_alarm_rate.unwrap();
        assert_eq!((labelled.missed, labelled.images), (2, 4));
        assert_eq!(labelled.per_type[0].0, "crack");
        // A person's threshold on the 0–1 score: the same point as the
        // false-alarm target that put it there.
        let chosen =
            OperatingPoint::new(&model, &s, Some(Target::Threshold(loose.threshold))).unwrap();
        assert!(
            (chosen.raw_threshold - loose.raw_threshold).abs() < 1e-3,
            "{chosen:?}"
        );
        assert_eq!(
            chosen.estimated_false_alarm_rate,
            loose.estimated_false_alarm_rate
        );
        let mar = OperatingPoint::new(&model, &s, Some(Target::MaxMar(0.1))).unwrap();
        assert!(mar.synthetic_missed_alarm_rate.unwrap() <= 0.1);
        assert!(Target::from_request(Some(0.1), Some(0.1)).is_err());
        assert!(Target::from_request(Some(1.5), None).is_err());
        assert_eq!(Target::from_request(None, None).unwrap(), None);
    }

    #[test]
    fn kept_scores_are_bounded_and_keep_the_extremes() {
        let many: Vec<f32> = (0..10_000).rev().map(|i| i as f32).collect();
        let k = kept(&many);
        assert_eq!(k.len(), MAX_KEPT_SCORES);
        assert_eq!((k[0], k[MAX_KEPT_SCORES - 1]), (0.0, 9_999.0));
        assert!(k.windows(2).all(|w| w[0] <= w[1]));
    }
}
