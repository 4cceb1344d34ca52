//! The automatic choice between two detectors and their pair
//! (`--detector auto`): PatchCore, PaDiM, or both voting
//! ([`crate::model::Partner`]), decided at fit time on synthetic defects,
//! never on test labels.
//!
//! Each candidate is calibrated on the same out-of-fold normal images, so
//! each threshold sits at the same false-alarm target; what tells them
//! apart is the share of synthetic defects each misses at its own
//! threshold — the recall a user gets, where AUROC would average over
//! thresholds nobody runs at. Local kinds (cut-paste, blotch, scratch) and
//! global kinds (a missing or moved piece) weigh the same, as in the tiling
//! choice ([`crate::tiling`]). When a missed-alarm target set the
//! thresholds instead (`--max-mar`), every candidate misses about that
//! share by construction, and the share of normal images each flags there
//! tells them apart.

use serde::{Deserialize, Serialize};

use crate::synthetic::MissedAlarmEstimate;

/// A candidate is kept over the one before it only when it misses fewer
/// synthetic defects by more than this (the candidates are scored on the
/// same synthetic images, so smaller gaps are within their noise).
pub const CHOICE_MARGIN: f64 = 0.01;

/// Which candidate a fit kept.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Kept {
    First,
    Second,
    Pair,
}

/// What the candidates were weighed by (lower is better for both).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Evidence {
    /// [`balanced_missed_rate`] at each candidate's own threshold.
    SyntheticMissed,
    /// The out-of-fold false-alarm rate at each candidate's own threshold
    /// (thresholds set by a missed-alarm target).
    NormalFlagged,
}

/// The evidence and the outcome; stored in the model file.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DetectorChoice {
    /// Each candidate's name and its rate ([`DetectorChoice::evidence`]):
    /// the first detector, the second, the pair.
    pub candidates: Vec<(String, f64)>,
    pub evidence: Evidence,
    pub kept: Kept,
}

/// Mean of the local kinds' missed-alarm rates and of the global kinds',
/// averaged; one group alone when the other is absent, `None` for none.
pub fn balanced_missed_rate(estimate: &MissedAlarmEstimate) -> Option<f64> {
    let mean = |global: bool| {
        let rates: Vec<f64> = estimate
            .per_kind
            .iter()
            .filter(|k| k.kind.is_global() == global && k.images > 0)
            .map(|k| k.rate)
            .collect();
        (!rates.is_empty()).then(|| rates.iter().sum::<f64>() / rates.len() as f64)
    };
    match (mean(false), mean(true)) {
        (Some(l), Some(g)) => Some((l + g) / 2.0),
        (l, g) => l.or(g),
    }
}

impl DetectorChoice {
    /// The first detector (the default) unless the second's rate is lower
    /// by more than [`CHOICE_MARGIN`]; the pair over that single one only
    /// when it beats it by the margin too, since it costs both detectors'
    /// time. Without a rate for every candidate, the first is kept.
    pub fn weigh(names: [&str; 3], evidence: Evidence, rates: [Option<f64>; 3]) -> Self {
        let kept = match rates {
            [Some(a), Some(b), Some(p)] => {
                let (single, rate) = if b < a - CHOICE_MARGIN {
                    (Kept::Second, b)
                } else {
                    (Kept::First, a)
                };
                if p < rate - CHOICE_MARGIN {
                    Kept::Pair
                } else {
                    single
                }
            }
            _ => Kept::First,
        };
        Self {
            candidates: names
                .iter()
                .zip(rates)
                .filter_map(|(n, r)| Some(((*n).to_owned(), r?)))
                .collect(),
            evidence,
            kept,
        }
    }

    /// `kept padim: synthetic defects missed at each threshold …`, for
    /// `fit`'s report.
    pub fn describe(&self) -> String {
        let kept = match self.kept {
            Kept::First => 0,
            Kept::Second => 1,
            Kept::Pair => 2,
        };
        let name = self
            .candidates
            .get(kept)
            .map_or("the first detector", |(n, _)| n.as_str());
        let rates: Vec<String> = self
            .candidates
            .iter()
            .map(|(n, r)| format!("{n} {r:.3}"))
            .collect();
        let what = match self.evidence {
            Evidence::SyntheticMissed => {
                "synthetic defects missed at each one's threshold (local and global kinds \
                 weighed equally)"
            }
            Evidence::NormalFlagged => {
                "normal images flagged (out of fold) at each one's threshold"
            }
        };
        format!("kept {name}: {what} {}", rates.join(", "))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::synthetic::{DefectKind, KindRate};

    fn estimate(local: f64, global: f64) -> MissedAlarmEstimate {
        MissedAlarmEstimate {
            seed: 0,
            per_kind: DefectKind::ALL
                .iter()
                .map(|&kind| {
                    let rate = if kind.is_global() { global } else { local };
                    KindRate {
                        kind,
                        images: 100,
                        missed: (rate * 100.0).round() as usize,
                        rate,
                        upper_95: 1.0,
                    }
                })
                .collect(),
        }
    }

    const NAMES: [&str; 3] = ["patchcore", "padim", "patchcore+padim"];

    #[test]
    fn local_and_global_kinds_weigh_the_same() {
        // Three local kinds at 0.2 and two global at 0.8: 0.5, not 0.44.
        assert_eq!(balanced_missed_rate(&estimate(0.2, 0.8)), Some(0.5));
        let only_local = MissedAlarmEstimate {
            seed: 0,
            per_kind: estimate(0.3, 0.9).per_kind[..3].to_vec(),
        };
        assert_eq!(balanced_missed_rate(&only_local), Some(0.3));
    }

    #[test]
    fn the_first_is_kept_unless_another_misses_fewer_by_the_margin() {
        let weigh = |a: (f64, f64), b: (f64, f64), p: (f64, f64)| {
            let rates = [a, b, p].map(|(l, g)| balanced_missed_rate(&estimate(l, g)));
            DetectorChoice::weigh(NAMES, Evidence::SyntheticMissed, rates).kept
        };
        // MTD-like evidence: the pair beats the better single by 0.015.
        assert_eq!(weigh((0.46, 0.89), (0.28, 0.90), (0.29, 0.86)), Kept::Pair);
        // ELPV-like: the second is best, the pair no better than it.
        assert_eq!(
            weigh((0.08, 0.50), (0.02, 0.41), (0.05, 0.41)),
            Kept::Second
        );
        // Within the margin: the first (the default) stays.
        assert_eq!(
            weigh((0.30, 0.50), (0.29, 0.50), (0.295, 0.50)),
            Kept::First
        );
        // The pair must beat the kept single, not merely the first.
        assert_eq!(
            weigh((0.40, 0.60), (0.20, 0.40), (0.20, 0.39)),
            Kept::Second
        );
        let choice = DetectorChoice::weigh(NAMES, Evidence::SyntheticMissed, [None; 3]);
        assert_eq!(choice.kept, Kept::First);
        assert!(choice.candidates.is_empty());
        let partial = [Some(0.5), Some(0.1), None];
        let choice = DetectorChoice::weigh(NAMES, Evidence::NormalFlagged, partial);
        assert_eq!(choice.kept, Kept::First);
    }

    #[test]
    fn the_report_names_the_kept_one_and_every_rate() {
        let rates = [(0.4, 0.8), (0.2, 0.6), (0.3, 0.7)]
            .map(|(l, g)| balanced_missed_rate(&estimate(l, g)));
        let text = DetectorChoice::weigh(NAMES, Evidence::SyntheticMissed, rates).describe();
        assert!(
            text.starts_with("kept padim: synthetic defects missed"),
            "{text}"
        );
        assert!(
            text.contains("patchcore 0.600, padim 0.400, patchcore+padim 0.500"),
            "{text}"
        );
        let flagged = [Some(0.02), Some(0.05), Some(0.004)];
        let text = DetectorChoice::weigh(NAMES, Evidence::NormalFlagged, flagged).describe();
        assert!(
            text.starts_with("kept patchcore+padim: normal images flagged"),
            "{text}"
        );
    }
}
