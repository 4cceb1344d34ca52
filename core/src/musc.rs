//! Mutual scoring of an unlabeled batch: anomaly scores with no normal
//! images, no training and no text (after MuSc, Li et al., ICLR 2024).
//!
//! Normal texture recurs from part to part; a defect is rare and differs
//! from one part to the next. So every patch of every image is compared with
//! the patches of each *other* image of the batch: its distance to the
//! nearest patch of image `j`, for every `j`. A normal patch finds a close
//! match in almost every image; a defect finds one in few. The patch score
//! is the mean of the smallest [`INTERVAL`] (30 %) of those per-image
//! distances, so a defect that happens to recur in a few images of the batch
//! still stands out, and the image score is the peak of the blurred map.
//!
//! Features are the memory-bank recipe's (EfficientNet-Lite0 stages 4 and 5,
//! locally averaged, `PatchCoreConfig::default_features`). Batches over
//! [`MAX_BATCH`] images, or over [`MAX_PART_PATCHES`] patches in all, are
//! split into near-equal parts scored apart (each of at least
//! [`MIN_BATCH`]); batches under [`MIN_BATCH`] readable images are refused.
//! Memory per part: its features (`patches · channels · 4` bytes: at most
//! 61 MB with the 192 channels of the default recipe) plus the distances of
//! [`ROWS`] patches to every patch of the part (at most 20 MB), and every
//! image's small score grid and final map.
//!
//! The scores are uncalibrated: with no normal image there is no false-alarm
//! rate. [`answers`] ranks the batch and flags the images whose score is an
//! outlier of the batch's own scores (above the median by more than
//! [`OUTLIER_MADS`] scaled median absolute deviations), and says so.

use std::path::PathBuf;

use candle_core::Tensor;
use image::Rgb32FImage;
use rayon::prelude::*;

use crate::Error;
use crate::anomaly_map::AnomalyMap;
use crate::calibration::Calibration;
use crate::detector::{DetectorOutput, ImageScore, RawInspection, ScoreGrid};
use crate::detectors::patchcore::PatchCoreConfig;
use crate::features::{FeatureConfig, FeatureExtractor};
use crate::images::{ImageLimits, load_image};
use crate::model::Inspection;
use crate::operating_point::OperatingPoint;
use crate::progress::Progress;
use crate::runtime::Runtime;

/// Share of the other images whose nearest distances are averaged (the
/// smallest ones), as in the paper.
pub const INTERVAL: f64 = 0.3;
/// Fewest readable images a batch needs: with fewer, the smallest 30 % of
/// the others is one or two images, and one look-alike defect hides another.
pub const MIN_BATCH: usize = 8;
/// Most images scored against each other at once.
pub const MAX_BATCH: usize = 200;
/// Most patches scored against each other at once (200 images of 20 × 20).
pub const MAX_PART_PATCHES: usize = 80_000;
/// Patches whose distances to the whole part are computed at once.
pub const ROWS: usize = 64;
/// The outlier rule of [`answers`]: flagged above `median + 3 · 1.4826 · MAD`.
pub const OUTLIER_MADS: f32 = 3.0;

/// What mutual scoring computes with.
#[derive(Debug, Clone)]
pub struct MuscConfig {
    pub features: FeatureConfig,
    pub interval: f64,
    pub max_batch: usize,
}

impl Default for MuscConfig {
    fn default() -> Self {
        Self {
            features: PatchCoreConfig::default_features(),
            interval: INTERVAL,
            max_batch: MAX_BATCH,
        }
    }
}

/// One image's features and size.
struct Patches {
    /// `[patches, channels]` row-major.
    features: Vec<f32>,
    grid: (usize, usize),
    input_size: (u32, u32),
    image_size: (u32, u32),
}

/// The raw score and map of every image of `paths`, in order: `Err` for an
/// image that could not be read (the others are scored without it). Fails
/// as a whole when fewer than [`MIN_BATCH`] images are readable.
pub fn score_batch(
    paths: &[PathBuf],
    config: &MuscConfig,
    runtime: &Runtime,
    limits: &ImageLimits,
    progress: &dyn Progress,
) -> Result<Vec<Result<RawInspection, Error>>, Error> {
    let extractor = FeatureExtractor::new(config.features.clone(), runtime.device())?;
    progress.start("features", paths.len() as u64);
    let patches: Vec<Result<Patches, Error>> = paths
        .par_iter()
        .map(|path| {
            let image = load_image(path, limits)?;
            let patches = patches_of(&extractor, &image);
            progress.advance(1);
            patches
        })
        .collect();
    progress.finish();
    let readable: Vec<usize> = (0..paths.len()).filter(|i| patches[*i].is_ok()).collect();
    check_batch_size(readable.len(), paths.len())?;
    let total_patches: usize = readable
        .iter()
        .filter_map(|i| patches[*i].as_ref().ok())
        .map(|p| p.grid.0 * p.grid.1)
        .sum();
    let parts = readable
        .len()
        .div_ceil(config.max_batch.max(MIN_BATCH))
        .max(total_patches.div_ceil(MAX_PART_PATCHES))
        .min(readable.len() / MIN_BATCH)
        .max(1);
    let mut scored: Vec<Option<RawInspection>> = (0..paths.len()).map(|_| None).collect();
    progress.start("mutual scoring", readable.len() as u64);
    for part in 0..parts {
        let members: Vec<usize> = readable
            .iter()
            .copied()
            .skip(part * readable.len() / parts)
            .take((part + 1) * readable.len() / parts - part * readable.len() / parts)
            .collect();
        let set: Vec<&Patches> = members
            .iter()
            .filter_map(|i| patches[*i].as_ref().ok())
            .collect();
        let grids = mutual_scores(&set, config.interval, runtime, progress)?;
        for (i, (grid, p)) in members.iter().zip(grids.into_iter().zip(&set)) {
            let output = DetectorOutput {
                image_score: ImageScore::MapPeak,
                grids: vec![grid],
            };
            scored[*i] = Some(output.into_raw(p.image_size)?);
        }
    }
    progress.finish();
    Ok(patches
        .into_iter()
        .zip(scored)
        .map(|(p, s)| match (p, s) {
            (Err(e), _) => Err(e),
            (Ok(_), Some(s)) => Ok(s),
            (Ok(_), None) => Err(Error::InvalidConfig("an image was left unscored".into())),
        })
        .collect())
}

/// Refuses a batch of fewer than [`MIN_BATCH`] readable images (`readable`
/// of `given`); callers may check the count given before reading any.
pub fn check_batch_size(readable: usize, given: usize) -> Result<(), Error> {
    if readable < MIN_BATCH {
        return Err(Error::InvalidConfig(format!(
            "mutual scoring needs at least {MIN_BATCH} readable images in the batch, got \
             {readable} (of {given})"
        )));
    }
    Ok(())
}

fn patches_of(extractor: &FeatureExtractor, image: &Rgb32FImage) -> Result<Patches, Error> {
    let grid = extractor.extract(image)?;
    Ok(Patches {
        features: grid.features.flatten_all()?.to_vec1::<f32>()?,
        grid: (grid.grid_width, grid.grid_height),
        input_size: grid.input_size,
        image_size: image.dimensions(),
    })
}

/// Every image's patch scores against the other images of `set`.
fn mutual_scores(
    set: &[&Patches],
    interval: f64,
    runtime: &Runtime,
    progress: &dyn Progress,
) -> Result<Vec<ScoreGrid>, Error> {
    let channels = set
        .iter()
        .find(|p| p.grid.0 * p.grid.1 > 0)
        .map_or(0, |p| p.features.len() / (p.grid.0 * p.grid.1));
    let offsets: Vec<usize> = set
        .iter()
        .scan(0, |at, p| {
            let start = *at;
            *at += p.grid.0 * p.grid.1;
            Some(start)
        })
        .collect();
    let total: usize = set.iter().map(|p| p.grid.0 * p.grid.1).sum();
    let all: Vec<f32> = set
        .iter()
        .flat_map(|p| p.features.iter().copied())
        .collect();
    let bank = Tensor::from_vec(all, (total, channels), runtime.device())?;
    let bank_t = bank.t()?.contiguous()?;
    let norms: Vec<f32> = bank.sqr()?.sum(1)?.to_vec1()?;
    let others = set.len() - 1;
    let keep = ((interval * others as f64).ceil() as usize).clamp(1, others);
    let mut grids = Vec::with_capacity(set.len());
    for (i, p) in set.iter().enumerate() {
        let count = p.grid.0 * p.grid.1;
        let mut scores = Vec::with_capacity(count);
        for first in (0..count).step_by(ROWS) {
            let rows = ROWS.min(count - first);
            let products: Vec<f32> = bank
                .narrow(0, offsets[i] + first, rows)?
                .matmul(&bank_t)?
                .flatten_all()?
                .to_vec1()?;
            scores.par_extend((0..rows).into_par_iter().map(|row| {
                let own = norms[offsets[i] + first + row];
                let line = &products[row * total..(row + 1) * total];
                let mut nearest: Vec<f32> = (0..set.len())
                    .filter(|j| *j != i)
                    .map(|j| {
                        let start = offsets[j];
                        let end = start + set[j].grid.0 * set[j].grid.1;
                        (start..end)
                            .map(|c| own + norms[c] - 2.0 * line[c])
                            .fold(f32::INFINITY, f32::min)
                            .max(0.0)
                            .sqrt()
                    })
                    .collect();
                nearest.select_nth_unstable_by(keep - 1, f32::total_cmp);
                nearest[..keep].iter().sum::<f32>() / keep as f32
            }));
        }
        grids.push(ScoreGrid {
            width: p.grid.0,
            height: p.grid.1,
            values: scores,
            input_size: p.input_size,
            blur_sigma: crate::anomaly_map::DEFAULT_BLUR_SIGMA,
        });
        progress.advance(1);
    }
    Ok(grids)
}

/// The batch's answers: each raw score and map on a 0–1 scale whose 0.5 is
/// the batch's outlier threshold (see the module's notes), flagged above
/// it, with an operating point that says the verdict is uncalibrated.
/// `None` where `scored` holds no score.
pub fn answers(scored: &[Option<&RawInspection>]) -> Vec<Option<Inspection>> {
    let raw: Vec<f32> = scored.iter().flatten().map(|r| r.score).collect();
    let (median, threshold) = outlier_rule(&raw);
    let map = Calibration::rational(threshold, threshold - median);
    let mut point = OperatingPoint::probability();
    point.raw_threshold = threshold;
    point.warning = Some(format!(
        "uncalibrated: mutual scoring of a batch of {} images without normal images; the score \
         ranks the batch, and an image is flagged when it stands out from the batch's own \
         scores (above the median by {OUTLIER_MADS} scaled median absolute deviations), not at \
         a measured false-alarm rate",
        raw.len()
    ));
    scored
        .iter()
        .map(|r| {
            r.map(|r| {
                let values = r.map.values.iter().map(|v| map.normalise(*v)).collect();
                let map_01 = AnomalyMap {
                    width: r.map.width,
                    height: r.map.height,
                    values,
                };
                Inspection::of_map(
                    map.normalise(r.score),
                    r.score,
                    r.score >= threshold,
                    map_01,
                    point.clone(),
                )
            })
        })
        .collect()
}

/// The raw score above which an image of a batch scoring `raw` is an
/// outlier of it (`median + 3 · 1.4826 · MAD`).
pub fn outlier_threshold(raw: &[f32]) -> f32 {
    outlier_rule(raw).1
}

/// The median of `raw` and the outlier threshold.
fn outlier_rule(raw: &[f32]) -> (f32, f32) {
    let mut raw = raw.to_vec();
    raw.sort_by(f32::total_cmp);
    let median = median_of_sorted(&raw);
    let mut deviations: Vec<f32> = raw.iter().map(|s| (s - median).abs()).collect();
    deviations.sort_by(f32::total_cmp);
    let spread = (1.4826 * median_of_sorted(&deviations)).max(f32::EPSILON * median.abs().max(1.0));
    (median, median + OUTLIER_MADS * spread)
}

fn median_of_sorted(values: &[f32]) -> f32 {
    match values.len() {
        0 => 0.0,
        n if n % 2 == 1 => values[n / 2],
        n => (values[n / 2 - 1] + values[n / 2]) / 2.0,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn patches(rows: &[[f32; 2]]) -> Patches {
        Patches {
            features: rows.iter().flatten().copied().collect(),
            grid: (rows.len(), 1),
            input_size: (rows.len() as u32, 1),
            image_size: (rows.len() as u32, 1),
        }
    }

    /// Mutual scores of ten two-patch images, (0, 0) and (1, 0), where
    /// `odd(i)` images have (0, 5) as their second patch instead.
    fn scores_with_odd(odd: impl Fn(usize) -> bool) -> Vec<ScoreGrid> {
        let images: Vec<Patches> = (0..10)
            .map(|i| {
                let second = if odd(i) { [0.0, 5.0] } else { [1.0, 0.0] };
                patches(&[[0.0, 0.0], second])
            })
            .collect();
        let set: Vec<&Patches> = images.iter().collect();
        let runtime = Runtime::new(candle_core::Device::Cpu);
        mutual_scores(&set, INTERVAL, &runtime, &crate::progress::NoProgress).unwrap()
    }

    #[test]
    fn a_patch_no_other_image_has_stands_out() {
        // Ten images of two patches each: (0, 0) and (1, 0) everywhere,
        // except image 3, whose second patch is (0, 5).
        let grids = scores_with_odd(|i| i == 3);
        // Its nearest patch in every other image is (1, 0) or (0, 0):
        // distance √26 or 5; the smallest 3 of 9 are all 5.
        assert!(
            (grids[3].values[1] - 5.0).abs() < 1e-4,
            "{:?}",
            grids[3].values
        );
        assert!(grids[3].values[0].abs() < 1e-4);
        // Everyone else's patches have exact matches.
        for (i, g) in grids.iter().enumerate().filter(|(i, _)| *i != 3) {
            assert!(
                g.values.iter().all(|v| v.abs() < 1e-3),
                "{i}: {:?}",
                g.values
            );
        }
    }

    #[test]
    fn a_defect_shared_by_a_few_images_still_stands_out() {
        // The odd patch in 2 of 10 images: each finds its twin in one other
        // image, but the mean of the smallest 3 of 9 distances stays high.
        let grids = scores_with_odd(|i| i < 2);
        assert!(
            (grids[0].values[1] - 10.0 / 3.0).abs() < 1e-4,
            "{:?}",
            grids[0].values
        );
    }

    #[test]
    fn outliers_of_the_batch_are_flagged_and_said_to_be_uncalibrated() {
        let raw: Vec<RawInspection> = [1.0f32, 1.1, 0.9, 1.05, 0.95, 1.0, 1.02, 4.0]
            .iter()
            .map(|s| RawInspection {
                score: *s,
                map: AnomalyMap::new(2, 1, vec![*s, 0.0]).unwrap(),
            })
            .collect();
        let refs: Vec<Option<&RawInspection>> = raw.iter().map(Some).chain([None]).collect();
        let answers = answers(&refs);
        assert!(answers[8].is_none());
        let flagged: Vec<bool> = answers[..8]
            .iter()
            .map(|a| a.as_ref().unwrap().is_anomalous)
            .collect();
        assert_eq!(
            flagged,
            [false, false, false, false, false, false, false, true]
        );
        let a = answers[7].as_ref().unwrap();
        assert!(
            a.score > 0.5
                && a.operating_point
                    .warning
                    .as_ref()
                    .unwrap()
                    .starts_with("uncalibrated")
        );
        // The order of the raw scores is kept.
        assert!(answers[1].as_ref().unwrap().score > answers[0].as_ref().unwrap().score);
    }
}
