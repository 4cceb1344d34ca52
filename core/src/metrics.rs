//! Detection metrics: how well anomaly scores separate good from bad.
//!
//! * Image level, exact: [`image_auroc`] (area under the ROC curve) and
//!   [`f1_max`] (the best F1 over all thresholds).
//! * Pixel level, streamed: [`PixelMetrics`] takes one anomaly map at a time
//!   and reports pixel AUROC and AUPRO (the area under the per-region-overlap
//!   curve up to 30 % false-positive rate, as in MVTec AD) in bounded memory.
//!
//! Everywhere, a higher score means "more anomalous", `true` / a set mask
//! pixel means anomalous, and scores that are equal are tied: a threshold
//! never separates them.

use serde::Serialize;

use crate::regions::label_components;

/// Why a metric could not be computed. Metrics never return NaN.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum MetricError {
    #[error("no scores to evaluate")]
    Empty,
    #[error("{scores} scores but {labels} labels")]
    LengthMismatch { scores: usize, labels: usize },
    #[error("score {index} is not a finite number ({value})")]
    NonFinite { index: usize, value: f32 },
    #[error("no anomalous samples: the metric needs at least one")]
    NoAnomalous,
    #[error("no normal samples: the metric needs at least one")]
    NoNormal,
    #[error("a {width}×{height} score map needs {expected} scores, got {len}")]
    ScoreMapSize {
        width: usize,
        height: usize,
        expected: usize,
        len: usize,
    },
    #[error("the mask has {len} pixels but the score map has {expected}")]
    MaskSize { expected: usize, len: usize },
    #[error("the false-positive-rate limit must be in (0, 1], got {0}")]
    InvalidLimit(f64),
    #[error("the bin count must be between {min} and {max}, got {0}", min = MIN_BINS, max = MAX_BINS)]
    InvalidBins(usize),
    #[error("a {width}×{height} map is too large to label its regions")]
    TooLarge { width: usize, height: usize },
}

/// Checks that scores and labels pair up, are non-empty and finite.
fn check_scores(scores: &[f32], labels: &[bool]) -> Result<(), MetricError> {
    if scores.len() != labels.len() {
        return Err(MetricError::LengthMismatch {
            scores: scores.len(),
            labels: labels.len(),
        });
    }
    if scores.is_empty() {
        return Err(MetricError::Empty);
    }
    check_finite(scores)
}

fn check_finite(scores: &[f32]) -> Result<(), MetricError> {
    match scores.iter().position(|s| !s.is_finite()) {
        Some(index) => Err(MetricError::NonFinite {
            index,
            value: scores[index],
        }),
        None => Ok(()),
    }
}

/// `(score, label)` pairs sorted by ascending score. Equal scores end up
/// next to each other (`-0.0` and `0.0` too), so `chunk_by(==)` groups ties.
fn sorted_pairs(scores: &[f32], labels: &[bool]) -> Vec<(f32, bool)> {
    let mut pairs: Vec<(f32, bool)> = scores.iter().copied().zip(labels.iter().copied()).collect();
    pairs.sort_unstable_by(|a, b| a.0.total_cmp(&b.0));
    pairs
}

/// Counts `(anomalous, normal)` in a group of pairs.
fn class_counts(pairs: &[(f32, bool)]) -> (u64, u64) {
    let anomalous = pairs.iter().filter(|p| p.1).count() as u64;
    (anomalous, pairs.len() as u64 - anomalous)
}

/// Sorted `(score, label)` pairs with the counts of anomalous and normal
/// samples.
type Classes = (Vec<(f32, bool)>, u64, u64);

/// Checked scores as [`Classes`]; both classes must be present.
fn both_classes(scores: &[f32], labels: &[bool]) -> Result<Classes, MetricError> {
    check_scores(scores, labels)?;
    let pairs = sorted_pairs(scores, labels);
    let (anomalous, normal) = class_counts(&pairs);
    if anomalous == 0 {
        return Err(MetricError::NoAnomalous);
    }
    if normal == 0 {
        return Err(MetricError::NoNormal);
    }
    Ok((pairs, anomalous, normal))
}

/// Exact area under the ROC curve of `scores` for `labels` (`true` =
/// anomalous).
///
/// This is the Mann-Whitney statistic: the probability that a random
/// anomalous sample scores higher than a random normal one, a tie counting
/// one half. It equals `sklearn.metrics.roc_auc_score`. Needs both classes.
pub fn image_auroc(scores: &[f32], labels: &[bool]) -> Result<f64, MetricError> {
    let (pairs, anomalous, normal) = both_classes(scores, labels)?;
    // Twice the number of (anomalous, normal) pairs ranked correctly, ties
    // counted once: an exact integer.
    let mut twice_wins: u128 = 0;
    let mut normal_below: u64 = 0;
    for group in pairs.chunk_by(|a, b| a.0 == b.0) {
        let (a, n) = class_counts(group);
        twice_wins += u128::from(a) * u128::from(2 * normal_below + n);
        normal_below += n;
    }
    Ok(twice_wins as f64 / (2.0 * anomalous as f64 * normal as f64))
}

/// The best F1 score over all thresholds and the threshold reaching it.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct F1Max {
    /// `2·TP / (2·TP + FP + FN)` at the best threshold.
    pub f1: f64,
    /// A score from the input: samples with `score >= threshold` are called
    /// anomalous. Among thresholds with the same best F1, the highest.
    pub threshold: f32,
}

/// The highest F1 reachable by calling every sample with
/// `score >= threshold` anomalous, over all thresholds.
///
/// Only the distinct scores are candidate thresholds, so tied samples are
/// always called together. Equals the maximum of `2PR / (P + R)` over
/// `sklearn.metrics.precision_recall_curve`. Needs at least one anomalous
/// sample; normal ones may be absent.
pub fn f1_max(scores: &[f32], labels: &[bool]) -> Result<F1Max, MetricError> {
    check_scores(scores, labels)?;
    let pairs = sorted_pairs(scores, labels);
    let (anomalous, _) = class_counts(&pairs);
    if anomalous == 0 {
        return Err(MetricError::NoAnomalous);
    }
    let mut best: Option<F1Max> = None;
    let (mut tp, mut fp) = (0u64, 0u64);
    // From the highest score down: each group of ties lowers the threshold.
    for group in pairs.chunk_by(|a, b| a.0 == b.0).rev() {
        let (a, n) = class_counts(group);
        tp += a;
        fp += n;
        // 2TP / (2TP + FP + FN) with FN = anomalous - TP.
        let f1 = 2.0 * tp as f64 / (tp + fp + anomalous) as f64;
        if best.is_none_or(|b| f1 > b.f1) {
            best = Some(F1Max {
                f1,
                threshold: group[0].0,
            });
        }
    }
    best.ok_or(MetricError::Empty)
}

/// The highest recall reachable while flagging at most a fraction `far` of
/// the normal samples (`score >= threshold` flagged, tied samples always
/// called together): a reference on labelled data for what a ranking
/// allows at a false-alarm limit, not a threshold a model can know.
/// Needs both classes.
pub fn recall_at_far(scores: &[f32], labels: &[bool], far: f64) -> Result<f64, MetricError> {
    let (pairs, anomalous, normal) = both_classes(scores, labels)?;
    let allowed = (far * normal as f64 + 1e-9).floor() as u64;
    let (mut tp, mut fp, mut best) = (0u64, 0u64, 0u64);
    for group in pairs.chunk_by(|a, b| a.0 == b.0).rev() {
        let (a, n) = class_counts(group);
        if fp + n > allowed {
            break;
        }
        tp += a;
        fp += n;
        best = tp;
    }
    Ok(best as f64 / anomalous as f64)
}

/// Counts at a fixed threshold: `score >= threshold` is flagged.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct Confusion {
    pub false_alarms: usize,
    pub normal: usize,
    pub detected: usize,
    pub anomalous: usize,
}

impl Confusion {
    pub fn at(scores: &[f32], labels: &[bool], threshold: f32) -> Self {
        let mut c = Self {
            false_alarms: 0,
            normal: 0,
            detected: 0,
            anomalous: 0,
        };
        for (score, label) in scores.iter().zip(labels) {
            let flagged = *score >= threshold;
            if *label {
                c.anomalous += 1;
                c.detected += usize::from(flagged);
            } else {
                c.normal += 1;
                c.false_alarms += usize::from(flagged);
            }
        }
        c
    }

    /// Flagged normal samples over normal samples (0 without any).
    pub fn false_alarm_rate(&self) -> f64 {
        self.false_alarms as f64 / self.normal.max(1) as f64
    }

    /// Flagged anomalous samples over anomalous samples (0 without any).
    pub fn recall(&self) -> f64 {
        self.detected as f64 / self.anomalous.max(1) as f64
    }
}

/// Default number of histogram bins of [`PixelMetrics`]: 2¹⁶, 2 MiB.
pub const DEFAULT_BINS: usize = 1 << 16;
/// Fewest bins [`PixelMetrics::with_bins`] accepts.
pub const MIN_BINS: usize = 2;
/// Most bins [`PixelMetrics::with_bins`] accepts (512 MiB).
pub const MAX_BINS: usize = 1 << 24;
/// FPR limit of the standard AUPRO (MVTec AD).
pub const DEFAULT_FPR_LIMIT: f64 = 0.3;

/// Bin width exponent of an empty accumulator: 2⁻¹⁴⁹ is the smallest
/// positive `f32`, so no finer grid can ever be useful.
const FINEST_LEVEL: i32 = -149;
/// Cells are kept well inside `i64`.
const CELL_LIMIT: f64 = (1u64 << 62) as f64;

/// Pixel AUROC and AUPRO over a test set, each with a guaranteed bound on
/// its distance from the exact value (see [`PixelMetrics`]).
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct PixelReport {
    /// Area under the ROC curve over all pixels of all images.
    pub pixel_auroc: f64,
    /// Area under the PRO curve for FPR in `[0, fpr_limit]`, divided by
    /// `fpr_limit` (so 1.0 is perfect).
    pub aupro: f64,
    /// The FPR limit of `aupro`; 0.3 unless asked otherwise.
    pub fpr_limit: f64,
    /// `|pixel_auroc − exact pixel AUROC|` is at most this.
    pub pixel_auroc_error_bound: f64,
    /// `|aupro − exact AUPRO|` is at most this.
    pub aupro_error_bound: f64,
}

/// One histogram bin: the pixels whose score falls in it.
#[derive(Debug, Clone, Copy)]
struct Bin {
    normal: u64,
    anomalous: u64,
    /// Sum over the bin's anomalous pixels of `1 / size of their region`.
    region_share: f64,
    /// Lowest and highest score in the bin; equal when every pixel in the
    /// bin has the same score, so the bin is exact.
    min: f32,
    max: f32,
}

impl Bin {
    const EMPTY: Bin = Bin {
        normal: 0,
        anomalous: 0,
        region_share: 0.0,
        min: f32::INFINITY,
        max: f32::NEG_INFINITY,
    };

    fn is_empty(&self) -> bool {
        self.normal == 0 && self.anomalous == 0
    }

    /// True when its pixels span more than one distinct score, so binning
    /// may have merged scores that the exact metric tells apart.
    fn is_blurred(&self) -> bool {
        self.min < self.max
    }

    fn merge(&mut self, other: &Bin) {
        self.normal += other.normal;
        self.anomalous += other.anomalous;
        self.region_share += other.region_share;
        self.min = self.min.min(other.min);
        self.max = self.max.max(other.max);
    }
}

/// Streaming pixel AUROC and AUPRO in fixed memory.
///
/// Feed one score map (and its ground-truth mask) at a time with
/// [`add_image`](Self::add_image), then call [`finish`](Self::finish).
/// Memory is a fixed histogram ([`DEFAULT_BINS`] bins of 32 bytes) however
/// many images are added; only the image being added is labelled.
///
/// **Definitions.** Pixel AUROC is [`image_auroc`] over every pixel of every
/// image (mask pixel set = anomalous). For AUPRO each connected region of
/// each mask (8-connectivity: pixels touching at a corner are one region) is
/// one defect; at threshold `t`, PRO is the mean over all regions of all
/// images of the share of the region's pixels scoring `>= t`, and FPR is the
/// share of all normal pixels (of normal and anomalous images) scoring
/// `>= t`. The PRO-over-FPR curve from (0, 0), through one point per
/// threshold, is integrated with the trapezoid rule up to FPR = limit
/// (interpolated linearly there) and divided by the limit.
///
/// **Binning.** Bins are `2^k` wide and aligned to multiples of `2^k`. An
/// empty accumulator starts at the finest `k` that covers the first image's
/// scores. When a later score falls outside, the window of bins moves, and
/// if the scores no longer fit in it, `k` grows (pairs of bins merge
/// exactly, nothing is re-read). Tied scores always share a bin: a bin edge
/// never falls inside a tie.
///
/// **Error bound.** The histogram knows the curves exactly at every bin
/// edge; only the path between two consecutive edges is unknown, and only
/// inside a bin holding more than one distinct score (a *blurred* bin;
/// each bin records its lowest and highest score). Both curves rise
/// monotonically, so the true area over one bin lies between the rectangles
/// under and over the straight chord that is used, and:
///
/// * `|pixel AUROC − exact| ≤ ½ · Σ aᵢ·nᵢ / (A·N)` over blurred bins, with
///   `aᵢ`, `nᵢ` the bin's anomalous and normal pixel counts and `A`, `N` the
///   totals (a blurred bin's pairs are counted as ties, off by ½ at most);
/// * `|AUPRO − exact| ≤ (Σ ½·ΔFPRᵢ·ΔPROᵢ + ΔFPR*·ΔPRO*) / limit`, the sum
///   over blurred bins below the limit, `*` the blurred bin whose step
///   crosses the limit (if any), clipped at the limit.
///
/// Both bounds are computed and reported in [`PixelReport`]; they are 0 when
/// no bin is blurred (e.g. scores with few distinct values, or all equal).
/// The AUROC bound is at most half the largest share of all normal pixels
/// in one blurred bin, the AUPRO bound at most 1.5 × the largest PRO step of
/// one blurred bin. Bins are at most about `2·range / bins` wide (`range` = highest
/// − lowest score seen), so with the default 2¹⁶ bins and no extreme outlier
/// both bounds are of order 10⁻⁵. The tests check that the actual error stays
/// within the bound (also with 2 to 1000 bins, where it is visible) and that
/// the bound stays under 10⁻⁴ on the reference fixtures, whose test tolerance
/// is 10⁻³.
#[derive(Debug, Clone)]
pub struct PixelMetrics {
    bins: Vec<Bin>,
    /// Bin width is `2^level`.
    level: i32,
    /// Cell (`floor(score / 2^level)`) that bin 0 holds.
    origin: i64,
    /// Lowest and highest occupied cell; `None` while empty.
    occupied: Option<(i64, i64)>,
    normal: u64,
    anomalous: u64,
    regions: u64,
}

impl Default for PixelMetrics {
    fn default() -> Self {
        Self::new()
    }
}

impl PixelMetrics {
    /// An empty accumulator with [`DEFAULT_BINS`] bins.
    pub fn new() -> Self {
        Self::with_bin_vec(DEFAULT_BINS)
    }

    /// An empty accumulator with `bins` bins: more bins, tighter bounds.
    pub fn with_bins(bins: usize) -> Result<Self, MetricError> {
        if !(MIN_BINS..=MAX_BINS).contains(&bins) {
            return Err(MetricError::InvalidBins(bins));
        }
        Ok(Self::with_bin_vec(bins))
    }

    fn with_bin_vec(bins: usize) -> Self {
        Self {
            bins: vec![Bin::EMPTY; bins],
            level: FINEST_LEVEL,
            origin: 0,
            occupied: None,
            normal: 0,
            anomalous: 0,
            regions: 0,
        }
    }

    /// Normal pixels added so far.
    pub fn normal_pixels(&self) -> u64 {
        self.normal
    }

    /// Anomalous pixels added so far.
    pub fn anomalous_pixels(&self) -> u64 {
        self.anomalous
    }

    /// Connected anomalous regions added so far.
    pub fn regions(&self) -> u64 {
        self.regions
    }

    /// Adds one image: `scores` row-major, `width × height`, and its mask
    /// (`true` = anomalous pixel) or `None` when every pixel is normal.
    /// A mask with no pixel set is fine (all normal). Nothing is added when
    /// an error is returned.
    pub fn add_image(
        &mut self,
        scores: &[f32],
        mask: Option<&[bool]>,
        width: usize,
        height: usize,
    ) -> Result<(), MetricError> {
        let expected = width.saturating_mul(height);
        if scores.len() != expected {
            return Err(MetricError::ScoreMapSize {
                width,
                height,
                expected,
                len: scores.len(),
            });
        }
        if scores.is_empty() {
            return Err(MetricError::Empty);
        }
        if let Some(mask) = mask
            && mask.len() != expected
        {
            return Err(MetricError::MaskSize {
                expected,
                len: mask.len(),
            });
        }
        check_finite(scores)?;
        // Labelled before anything changes, so that a refused image leaves no trace.
        let labelled = match mask {
            Some(mask) => Some(
                label_regions(mask, width, height)
                    .ok_or(MetricError::TooLarge { width, height })?,
            ),
            None => None,
        };

        let (lowest, highest) = scores
            .iter()
            .fold((f32::INFINITY, f32::NEG_INFINITY), |(lo, hi), &s| {
                (lo.min(s), hi.max(s))
            });
        self.make_room(lowest, highest);

        let Some((labels, sizes)) = labelled else {
            for &score in scores {
                let bin = self.bin_mut(score);
                bin.normal += 1;
                bin.min = bin.min.min(score);
                bin.max = bin.max.max(score);
            }
            self.normal += scores.len() as u64;
            return Ok(());
        };
        let shares: Vec<f64> = sizes.iter().map(|&n| 1.0 / n as f64).collect();
        for (&score, &label) in scores.iter().zip(&labels) {
            let bin = self.bin_mut(score);
            if label == 0 {
                bin.normal += 1;
            } else {
                bin.anomalous += 1;
                bin.region_share += shares[label as usize - 1];
            }
            bin.min = bin.min.min(score);
            bin.max = bin.max.max(score);
        }
        let anomalous: u64 = sizes.iter().sum();
        self.anomalous += anomalous;
        self.normal += scores.len() as u64 - anomalous;
        self.regions += sizes.len() as u64;
        Ok(())
    }

    /// The bin that holds `score`. Only called after `make_room` covered it.
    fn bin_mut(&mut self, score: f32) -> &mut Bin {
        let cell = cell_of(score, self.level).unwrap_or(self.origin);
        let index = usize::try_from(cell - self.origin).unwrap_or(0);
        debug_assert!(index < self.bins.len(), "score {score} outside the grid");
        let last = self.bins.len() - 1;
        &mut self.bins[index.min(last)]
    }

    /// Coarsens and/or moves the grid so that `[lowest, highest]` fits.
    fn make_room(&mut self, lowest: f32, highest: f32) {
        let bins = self.bins.len() as i128;
        let mut level = self.level;
        let mut occupied = self.occupied;
        let span = loop {
            if let (Some(lo), Some(hi)) = (cell_of(lowest, level), cell_of(highest, level)) {
                let (lo, hi) = match occupied {
                    Some((a, b)) => (lo.min(a), hi.max(b)),
                    None => (lo, hi),
                };
                if i128::from(hi) - i128::from(lo) < bins {
                    break (lo, hi);
                }
            }
            level += 1;
            occupied = occupied.map(|(a, b)| (a >> 1, b >> 1));
        };
        let fits = |origin: i64| {
            i128::from(span.0) >= i128::from(origin)
                && i128::from(span.1) < i128::from(origin) + bins
        };
        if level == self.level && fits(self.origin) {
            // The grid stays, but the occupied range may have grown.
            self.occupied = Some(span);
            return;
        }
        // Centre the occupied cells, leaving room to grow both ways.
        let slack = (bins - 1 - (i128::from(span.1) - i128::from(span.0))) / 2;
        let origin = (i128::from(span.0) - slack) as i64;
        let shift = (level - self.level) as u32;
        let mut rebinned = vec![Bin::EMPTY; self.bins.len()];
        for (i, bin) in self.bins.iter().enumerate().filter(|(_, b)| !b.is_empty()) {
            let cell = coarser(self.origin + i as i64, shift);
            rebinned[(cell - origin) as usize].merge(bin);
        }
        self.bins = rebinned;
        self.level = level;
        self.origin = origin;
        self.occupied = Some(span);
    }

    /// Pixel AUROC and AUPRO (FPR limit 0.3) with their error bounds.
    pub fn finish(&self) -> Result<PixelReport, MetricError> {
        self.finish_with_limit(DEFAULT_FPR_LIMIT)
    }

    /// Like [`finish`](Self::finish) with AUPRO integrated up to
    /// `fpr_limit` (in `(0, 1]`) and divided by it.
    pub fn finish_with_limit(&self, fpr_limit: f64) -> Result<PixelReport, MetricError> {
        if !(fpr_limit > 0.0 && fpr_limit <= 1.0) {
            return Err(MetricError::InvalidLimit(fpr_limit));
        }
        if self.anomalous == 0 {
            return Err(MetricError::NoAnomalous);
        }
        if self.normal == 0 {
            return Err(MetricError::NoNormal);
        }
        let (pixel_auroc, pixel_auroc_error_bound) = self.auroc();
        let (aupro, aupro_error_bound) = self.aupro(fpr_limit);
        Ok(PixelReport {
            pixel_auroc,
            aupro,
            fpr_limit,
            pixel_auroc_error_bound,
            aupro_error_bound,
        })
    }

    /// AUPRO up to `fpr_limit` alone (see [`finish_with_limit`](Self::finish_with_limit)).
    pub fn aupro_with_limit(&self, fpr_limit: f64) -> Result<f64, MetricError> {
        self.finish_with_limit(fpr_limit).map(|r| r.aupro)
    }

    /// Binned AUROC and its bound; needs both classes.
    fn auroc(&self) -> (f64, f64) {
        let mut twice_wins: u128 = 0;
        let mut blurred_pairs: u128 = 0;
        let mut normal_below: u64 = 0;
        for bin in &self.bins {
            twice_wins += u128::from(bin.anomalous) * u128::from(2 * normal_below + bin.normal);
            if bin.is_blurred() {
                blurred_pairs += u128::from(bin.anomalous) * u128::from(bin.normal);
            }
            normal_below += bin.normal;
        }
        let pairs = self.anomalous as f64 * self.normal as f64;
        (
            twice_wins as f64 / (2.0 * pairs),
            blurred_pairs as f64 / (2.0 * pairs),
        )
    }

    /// Binned AUPRO up to `limit` and its bound; needs both classes.
    fn aupro(&self, limit: f64) -> (f64, f64) {
        let (normal, regions) = (self.normal as f64, self.regions as f64);
        let (mut area, mut bound) = (0.0, 0.0);
        let (mut fpr0, mut pro0) = (0.0, 0.0);
        let (mut false_positives, mut share) = (0u64, 0.0);
        // From the highest bin down, one curve point per bin edge.
        for bin in self.bins.iter().rev().filter(|b| !b.is_empty()) {
            false_positives += bin.normal;
            share += bin.region_share;
            let fpr1 = false_positives as f64 / normal;
            let pro1 = (share / regions).min(1.0);
            let rise = pro1 - pro0;
            if fpr1 <= limit {
                area += (fpr1 - fpr0) * (pro0 + pro1) / 2.0;
                if bin.is_blurred() {
                    bound += (fpr1 - fpr0) * rise / 2.0;
                }
            } else {
                let width = limit - fpr0;
                let pro_at_limit = pro0 + rise * width / (fpr1 - fpr0);
                area += width * (pro0 + pro_at_limit) / 2.0;
                if bin.is_blurred() {
                    bound += width * rise;
                }
                break;
            }
            (fpr0, pro0) = (fpr1, pro1);
        }
        (area / limit, bound / limit)
    }
}

/// `2^e` exactly, for `e` in the normal `f64` range.
fn pow2(e: i32) -> f64 {
    let e = e.clamp(-1022, 1023);
    f64::from_bits(((e + 1023) as u64) << 52)
}

/// `floor(score / 2^level)`, or `None` when that is too large for a cell.
/// Exact: scaling by a power of two loses nothing here.
fn cell_of(score: f32, level: i32) -> Option<i64> {
    let cell = (f64::from(score) * pow2(-level)).floor();
    (cell.abs() < CELL_LIMIT).then_some(cell as i64)
}

/// The cell `shift` levels coarser: `floor(cell / 2^shift)`.
fn coarser(cell: i64, shift: u32) -> i64 {
    if shift >= 63 {
        if cell < 0 { -1 } else { 0 }
    } else {
        cell >> shift
    }
}

/// Labels the 8-connected regions of set pixels in a row-major mask.
///
/// Returns one label per pixel (0 = not set, `1..=n` = region) and the
/// size of each region, region `i` at index `i - 1`; `None` for a mask
/// larger than [`label_components`] takes.
fn label_regions(mask: &[bool], width: usize, height: usize) -> Option<(Vec<u32>, Vec<u64>)> {
    let (labels, count) = label_components(width, height, |i| mask.get(i) == Some(&true))?;
    let mut sizes = vec![0u64; count];
    for &label in &labels {
        if let Some(size) = (label as usize)
            .checked_sub(1)
            .and_then(|k| sizes.get_mut(k))
        {
            *size += 1;
        }
    }
    Some((labels, sizes))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A small deterministic generator (xorshift), so tests need no crate.
    struct Rng(u64);

    impl Rng {
        fn next(&mut self) -> f64 {
            self.0 ^= self.0 << 13;
            self.0 ^= self.0 >> 7;
            self.0 ^= self.0 << 17;
            (self.0 >> 11) as f64 / (1u64 << 53) as f64
        }

        fn normal(&mut self) -> f64 {
            let (u, v) = (self.next().max(1e-12), self.next());
            (-2.0 * u.ln()).sqrt() * (2.0 * std::f64::consts::PI * v).cos()
        }
    }

    /// Scores, mask, width, height.
    type Image = (Vec<f32>, Option<Vec<bool>>, usize, usize);

    /// Exact AUPRO by the definition: every distinct score is a threshold.
    fn exact_aupro(images: &[Image], limit: f64) -> f64 {
        let mut normal = Vec::new();
        let mut regions: Vec<Vec<f32>> = Vec::new();
        for (scores, mask, w, h) in images {
            match mask {
                None => normal.extend_from_slice(scores),
                Some(mask) => {
                    let (labels, sizes) = label_regions(mask, *w, *h).unwrap();
                    let mut own = vec![Vec::new(); sizes.len()];
                    for (&s, &l) in scores.iter().zip(&labels) {
                        if l == 0 {
                            normal.push(s);
                        } else {
                            own[l as usize - 1].push(s);
                        }
                    }
                    regions.extend(own);
                }
            }
        }
        let mut thresholds: Vec<f32> = normal
            .iter()
            .chain(regions.iter().flatten())
            .copied()
            .collect();
        thresholds.sort_by(|a, b| b.total_cmp(a));
        thresholds.dedup_by(|a, b| a == b);
        let share =
            |v: &[f32], t: f32| v.iter().filter(|&&s| s >= t).count() as f64 / v.len() as f64;
        let mut points = vec![(0.0, 0.0)];
        for t in thresholds {
            let pro = regions.iter().map(|r| share(r, t)).sum::<f64>() / regions.len() as f64;
            points.push((share(&normal, t), pro));
        }
        let mut area = 0.0;
        for pair in points.windows(2) {
            let ((f0, p0), (f1, p1)) = (pair[0], pair[1]);
            if f1 <= limit {
                area += (f1 - f0) * (p0 + p1) / 2.0;
            } else {
                let p = p0 + (p1 - p0) * (limit - f0) / (f1 - f0);
                area += (limit - f0) * (p0 + p) / 2.0;
                break;
            }
        }
        area / limit
    }

    /// Images of random noise with square defects that score higher.
    fn random_images(rng: &mut Rng, count: usize, scale: f64) -> Vec<Image> {
        let (w, h) = (23, 17);
        (0..count)
            .map(|i| {
                let mut mask = vec![false; w * h];
                if i % 3 != 0 {
                    for _ in 0..1 + i % 3 {
                        let (x0, y0) = ((rng.next() * 18.0) as usize, (rng.next() * 12.0) as usize);
                        let side = 1 + (rng.next() * 5.0) as usize;
                        for y in y0..(y0 + side).min(h) {
                            for x in x0..(x0 + side).min(w) {
                                mask[y * w + x] = true;
                            }
                        }
                    }
                }
                let scores = mask
                    .iter()
                    .map(|&m| {
                        ((rng.normal() + if m { 1.5 } else { 0.0 }) * scale * (1.0 + i as f64))
                            as f32
                    })
                    .collect();
                (scores, (i % 3 != 0).then_some(mask), w, h)
            })
            .collect()
    }

    fn accumulate(images: &[Image], bins: usize) -> PixelMetrics {
        let mut metrics = PixelMetrics::with_bins(bins).unwrap();
        for (scores, mask, w, h) in images {
            metrics.add_image(scores, mask.as_deref(), *w, *h).unwrap();
        }
        metrics
    }

    fn flatten(images: &[Image]) -> (Vec<f32>, Vec<bool>) {
        let mut scores = Vec::new();
        let mut labels = Vec::new();
        for (s, m, _, _) in images {
            scores.extend_from_slice(s);
            match m {
                Some(m) => labels.extend_from_slice(m),
                None => labels.extend(std::iter::repeat_n(false, s.len())),
            }
        }
        (scores, labels)
    }

    #[test]
    fn auroc_perfect_reversed_and_tied() {
        let scores = [0.1, 0.2, 0.3, 0.8, 0.9];
        let labels = [false, false, false, true, true];
        assert_eq!(image_auroc(&scores, &labels).unwrap(), 1.0);
        let reversed: Vec<bool> = labels.iter().map(|l| !l).collect();
        assert_eq!(image_auroc(&scores, &reversed).unwrap(), 0.0);
        assert_eq!(image_auroc(&[0.5; 5], &labels).unwrap(), 0.5);
        // one tie across classes: 6 pairs, 5 won, 1 tied
        let scores = [0.1, 0.2, 0.5, 0.5, 0.9];
        assert_eq!(image_auroc(&scores, &labels).unwrap(), 5.5 / 6.0);
        // -0.0 and 0.0 are the same score
        assert_eq!(image_auroc(&[-0.0, 0.0], &[true, false]).unwrap(), 0.5);
    }

    #[test]
    fn auroc_errors() {
        assert_eq!(image_auroc(&[], &[]), Err(MetricError::Empty));
        assert_eq!(
            image_auroc(&[1.0], &[true, false]),
            Err(MetricError::LengthMismatch {
                scores: 1,
                labels: 2
            })
        );
        assert!(matches!(
            image_auroc(&[1.0, f32::NAN], &[true, false]),
            Err(MetricError::NonFinite { index: 1, .. })
        ));
        assert!(matches!(
            image_auroc(&[1.0, f32::INFINITY], &[true, false]),
            Err(MetricError::NonFinite { index: 1, .. })
        ));
        assert_eq!(
            image_auroc(&[1.0, 2.0], &[false, false]),
            Err(MetricError::NoAnomalous)
        );
        assert_eq!(
            image_auroc(&[1.0, 2.0], &[true, true]),
            Err(MetricError::NoNormal)
        );
    }

    #[test]
    fn f1_max_groups_ties() {
        // threshold 0.9: tp 1 fp 0 -> 2/3; 0.5 (tied pair): tp 2 fp 1 -> 0.8;
        // 0.2: tp 2 fp 2 -> 2/3; 0.1: tp 2 fp 3 -> 4/7
        let scores = [0.1, 0.2, 0.5, 0.5, 0.9];
        let labels = [false, false, true, false, true];
        let best = f1_max(&scores, &labels).unwrap();
        assert!((best.f1 - 0.8).abs() < 1e-12);
        assert_eq!(best.threshold, 0.5);
        // all equal: one threshold, everything called anomalous
        let best = f1_max(&[0.3; 4], &[true, false, false, false]).unwrap();
        assert!((best.f1 - 0.4).abs() < 1e-12);
        assert_eq!(best.threshold, 0.3);
        // equal F1 at several thresholds: the highest one is reported
        let best = f1_max(&[0.1, 0.9], &[true, true]).unwrap();
        assert_eq!((best.f1, best.threshold), (1.0, 0.1));
        let best = f1_max(&[0.1, 0.5, 0.9], &[false, true, true]).unwrap();
        assert_eq!((best.f1, best.threshold), (1.0, 0.5));
        assert_eq!(f1_max(&[0.1], &[false]), Err(MetricError::NoAnomalous));
        assert_eq!(f1_max(&[], &[]), Err(MetricError::Empty));
    }

    #[test]
    fn regions_are_8_connected() {
        // two squares touching at a corner, one separate pixel
        #[rustfmt::skip]
        let mask = [
            1, 1, 0, 0, 0,
            1, 1, 0, 0, 1,
            0, 0, 1, 0, 0,
            0, 0, 0, 0, 0,
        ].map(|v| v == 1);
        let (labels, sizes) = label_regions(&mask, 5, 4).unwrap();
        assert_eq!(sizes, vec![5, 1]);
        assert_eq!(labels[12], labels[0]);
        assert_eq!(labels[9], 2);
        let (_, sizes) = label_regions(&[false; 6], 3, 2).unwrap();
        assert!(sizes.is_empty());
        let (_, sizes) = label_regions(&[true; 6], 6, 1).unwrap();
        assert_eq!(sizes, vec![6]);
    }

    #[test]
    fn pixel_perfect_and_all_equal() {
        let mut m = PixelMetrics::new();
        let mask = [false, true, true, false];
        m.add_image(&[0.1, 0.9, 0.8, 0.2], Some(&mask), 2, 2)
            .unwrap();
        m.add_image(&[0.0, 0.3, 0.1, 0.2], None, 2, 2).unwrap();
        let r = m.finish().unwrap();
        assert_eq!(r.pixel_auroc, 1.0);
        assert_eq!(r.aupro, 1.0);

        let mut m = PixelMetrics::new();
        m.add_image(
            &[0.7; 6],
            Some(&[false, true, false, false, false, true]),
            3,
            2,
        )
        .unwrap();
        m.add_image(&[0.7; 6], None, 3, 2).unwrap();
        let r = m.finish().unwrap();
        assert_eq!(r.pixel_auroc, 0.5);
        assert_eq!(r.pixel_auroc_error_bound, 0.0);
        // the curve is the diagonal: area 0.045 up to 0.3
        assert!((r.aupro - 0.15).abs() < 1e-12);
        assert_eq!(r.aupro_error_bound, 0.0);
    }

    #[test]
    fn pixel_errors_and_empty_masks() {
        let mut m = PixelMetrics::new();
        assert_eq!(m.finish(), Err(MetricError::NoAnomalous));
        m.add_image(&[0.1, 0.2], Some(&[false, false]), 2, 1)
            .unwrap();
        m.add_image(&[0.1, 0.2], None, 1, 2).unwrap();
        assert_eq!(m.finish(), Err(MetricError::NoAnomalous));
        assert_eq!(m.normal_pixels(), 4);

        let mut m = PixelMetrics::new();
        m.add_image(&[0.1, 0.2], Some(&[true, true]), 2, 1).unwrap();
        assert_eq!(m.finish(), Err(MetricError::NoNormal));
        m.add_image(&[0.0], None, 1, 1).unwrap();
        assert_eq!(
            m.finish_with_limit(0.0),
            Err(MetricError::InvalidLimit(0.0))
        );
        assert!(m.finish_with_limit(f64::NAN).is_err());
        assert!(m.finish_with_limit(1.0).is_ok());

        // rejected images leave the accumulator untouched
        let before = (m.normal_pixels(), m.anomalous_pixels(), m.regions());
        assert!(matches!(
            m.add_image(&[0.1; 3], None, 2, 2),
            Err(MetricError::ScoreMapSize { .. })
        ));
        assert!(matches!(
            m.add_image(&[0.1; 4], Some(&[true]), 2, 2),
            Err(MetricError::MaskSize { .. })
        ));
        assert!(matches!(
            m.add_image(&[0.1, 1e9, f32::NAN, 0.1], None, 2, 2),
            Err(MetricError::NonFinite { index: 2, .. })
        ));
        assert_eq!(m.add_image(&[], None, 0, 5), Err(MetricError::Empty));
        assert!(m.add_image(&[], None, usize::MAX, 2).is_err());
        assert_eq!(
            before,
            (m.normal_pixels(), m.anomalous_pixels(), m.regions())
        );
        assert_eq!(
            PixelMetrics::with_bins(1).unwrap_err(),
            MetricError::InvalidBins(1)
        );
    }

    /// Binned pixel AUROC against the exact one, and AUPRO against the
    /// brute-force definition: the error is within the reported bound, and
    /// with the default bins it is tiny.
    #[test]
    fn binned_error_within_bound() {
        let mut rng = Rng(0x9E37_79B9_7F4A_7C15);
        for (bins, scale) in [
            (2, 1.0),
            (8, 1.0),
            (64, 0.01),
            (1000, 3.0),
            (DEFAULT_BINS, 1.0),
        ] {
            let images = random_images(&mut rng, 9, scale);
            let metrics = accumulate(&images, bins);
            let (scores, labels) = flatten(&images);
            let exact_auroc = image_auroc(&scores, &labels).unwrap();
            for limit in [0.3, 0.05, 1.0] {
                let r = metrics.finish_with_limit(limit).unwrap();
                let exact = exact_aupro(&images, limit);
                let slack = 1e-12;
                assert!(
                    (r.pixel_auroc - exact_auroc).abs() <= r.pixel_auroc_error_bound + slack,
                    "{bins} bins: auroc {} vs {exact_auroc}, bound {}",
                    r.pixel_auroc,
                    r.pixel_auroc_error_bound
                );
                assert!(
                    (r.aupro - exact).abs() <= r.aupro_error_bound + slack,
                    "{bins} bins, limit {limit}: aupro {} vs {exact}, bound {}",
                    r.aupro,
                    r.aupro_error_bound
                );
                if bins == 8 {
                    // coarse bins really do lose something: the bound is not vacuous
                    assert!(r.pixel_auroc_error_bound > 1e-3);
                    assert!((r.pixel_auroc - exact_auroc).abs() > 1e-4);
                }
                if bins == DEFAULT_BINS {
                    assert!(r.pixel_auroc_error_bound < 1e-4, "{r:?}");
                    assert!(r.aupro_error_bound < 1e-3, "{r:?}");
                }
            }
        }
    }

    /// Growing ranges, negative scores, an enormous outlier and subnormals
    /// force many re-binnings; pixel AUROC and AUPRO stay within bound.
    #[test]
    fn rebinning_keeps_counts_and_bounds() {
        let mut rng = Rng(42);
        let mut images = random_images(&mut rng, 6, 1e-3);
        images.insert(0, (vec![0.0; 4], None, 2, 2));
        images.insert(1, (vec![-0.0, 1e-45, -1e-45, 0.0], None, 2, 2));
        images.push((
            vec![3e38, -1.0, 2.0, -3e38],
            Some(vec![true, false, false, false]),
            2,
            2,
        ));
        let metrics = accumulate(&images, DEFAULT_BINS);
        let total: u64 = metrics.bins.iter().map(|b| b.normal + b.anomalous).sum();
        assert_eq!(total, images.iter().map(|i| i.0.len() as u64).sum::<u64>());
        let (scores, labels) = flatten(&images);
        let r = metrics.finish().unwrap();
        let exact = image_auroc(&scores, &labels).unwrap();
        assert!((r.pixel_auroc - exact).abs() <= r.pixel_auroc_error_bound + 1e-12);
        assert!((r.aupro - exact_aupro(&images, 0.3)).abs() <= r.aupro_error_bound + 1e-12);
        // the outliers squeeze everything else into a few bins: honest bounds
        assert!(r.pixel_auroc_error_bound > 0.01);

        // ties across the classes at the grid's finest level stay ties
        let mut m = PixelMetrics::with_bins(2).unwrap();
        m.add_image(&[1e-45, 0.0, -0.0], Some(&[true, false, true]), 3, 1)
            .unwrap();
        let r = m.finish_with_limit(1.0).unwrap();
        assert_eq!((r.pixel_auroc, r.pixel_auroc_error_bound), (0.75, 0.0));
    }
}
