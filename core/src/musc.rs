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
//! Features, as in the paper but on the CNN the other detectors use:
//! EfficientNet-Lite0 stages 3, 4 and 5 at 224 px on the short side
//! (aspect kept), each stage brought to stage 4's grid and layer-normalised
//! per image, then each averaged over square neighbourhoods of
//! [`DEGREES`] (1, 3 and 5 patches: a small defect stands out at degree 1,
//! a larger one at 5) and scaled to unit length. Every (stage, degree) pair
//! is scored on its own and the patch score is their mean. Batches over
//! [`MAX_BATCH`] images, or over [`MAX_PART_PATCHES`] patches in all, are
//! split into near-equal parts scored apart (each of at least
//! [`MIN_BATCH`]), the images dealt round robin so that every part mixes
//! the batch alike (a part of only one defect type would hide it); batches
//! under [`MIN_BATCH`] readable images are refused. Memory per part: its
//! layer-normalised stage maps (`patches · channels · 4` bytes: at most
//! 74 MB with the 232 channels of stages 3 to 5) plus one (stage, degree)
//! copy of them (at most 36 MB), the distances of [`ROWS`] patches to
//! every patch of the part (at most 20 MB), and every image's small score
//! grid and final map.
//!
//! The scores are uncalibrated: with no normal image there is no false-alarm
//! rate. [`answers`] ranks the batch and flags the images whose score is an
//! outlier of the batch's own scores (above the median by more than
//! [`OUTLIER_MADS`] scaled median absolute deviations), and says so.

use std::path::PathBuf;

use candle_core::{D, Tensor};
use flawscope_models::Stage;
use image::Rgb32FImage;
use rayon::prelude::*;

use crate::Error;
use crate::anomaly_map::AnomalyMap;
use crate::calibration::Calibration;
use crate::detector::{DetectorOutput, ImageScore, RawInspection, ScoreGrid};
use crate::features::{FeatureConfig, FeatureExtractor, Resize, resample};
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
/// Neighbourhood sizes (in patches) each stage's features are averaged over
/// before scoring, as in the paper.
pub const DEGREES: [usize; 3] = [1, 3, 5];
/// The neighbourhoods (in images) of the image-level re-scoring when it is
/// asked for ([`MuscConfig::rescore`]), the paper's choice for MVTec AD.
/// Off by default: on MTD it lowered image AUROC (0.693 to 0.675,
/// docs/musc.md); the paper's image descriptor is CLIP's, ours the CNN's.
pub const RESCORE: [usize; 3] = [1, 2, 3];
/// Patches whose distances to the whole part are computed at once.
pub const ROWS: usize = 64;
/// The outlier rule of [`answers`]: flagged above `median + 3 · 1.4826 · MAD`.
pub const OUTLIER_MADS: f32 = 3.0;

/// What mutual scoring computes with.
#[derive(Debug, Clone)]
pub struct MuscConfig {
    /// Backbone, stages (each scored on its own; the first sets the grid)
    /// and input size.
    pub features: FeatureConfig,
    pub interval: f64,
    pub max_batch: usize,
    /// Neighbourhood sizes (odd, in patches) each stage is averaged over.
    pub degrees: Vec<usize>,
    /// Image-level re-scoring over the `k` most similar images, for each
    /// `k` here (the paper's RsCIN, e.g. [`RESCORE`]); empty (the default):
    /// the map's peak alone.
    pub rescore: Vec<usize>,
}

impl Default for MuscConfig {
    fn default() -> Self {
        Self {
            features: FeatureConfig::lite0(
                &[Stage::Stage4, Stage::Stage3, Stage::Stage5],
                Resize::KeepAspect { side: 224 },
            ),
            interval: INTERVAL,
            max_batch: MAX_BATCH,
            degrees: DEGREES.to_vec(),
            rescore: Vec::new(),
        }
    }
}

/// One image's layer-normalised stage maps and size.
struct Patches {
    /// Per stage, `[channels, patches]` row-major on the grid.
    stages: Vec<Vec<f32>>,
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
    if config.degrees.is_empty() || config.degrees.iter().any(|d| d % 2 == 0 || *d > 15) {
        return Err(Error::InvalidConfig(format!(
            "mutual scoring degrees must be odd, 1 to 15, and at least one: {:?}",
            config.degrees
        )));
    }
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
        // Round robin: every part a like mix of the batch.
        let members: Vec<usize> = readable.iter().copied().skip(part).step_by(parts).collect();
        let set: Vec<&Patches> = members
            .iter()
            .filter_map(|i| patches[*i].as_ref().ok())
            .collect();
        let grids = scores_of_part(&set, config, runtime, progress)?;
        let mut raws = Vec::with_capacity(set.len());
        for (grid, p) in grids.into_iter().zip(&set) {
            let output = DetectorOutput {
                image_score: ImageScore::MapPeak,
                grids: vec![grid],
            };
            raws.push(output.into_raw(p.image_size)?);
        }
        if !config.rescore.is_empty() {
            let peaks: Vec<f32> = raws.iter().map(|r| r.score).collect();
            let descriptors: Vec<Vec<f32>> = set.iter().map(|p| descriptor(p)).collect();
            for (raw, score) in raws
                .iter_mut()
                .zip(rescored(&peaks, &descriptors, &config.rescore))
            {
                raw.score = score;
            }
        }
        for (i, raw) in members.iter().zip(raws) {
            scored[*i] = Some(raw);
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

/// The stage maps of one image on the first stage's grid, each
/// layer-normalised over all its values (the paper's per-layer LayerNorm).
fn patches_of(extractor: &FeatureExtractor, image: &Rgb32FImage) -> Result<Patches, Error> {
    let (maps, input_size) = extractor.stage_maps(image)?;
    let wanted = &extractor.config().stages;
    // stage_maps returns network order; the first stage configured sets
    // the grid.
    let order = network_order(wanted);
    let at = |stage: &Stage| order.iter().position(|s| s == stage).unwrap_or(0);
    let (_, _, gh, gw) = maps[at(&wanted[0])].dims4()?;
    let mut stages = Vec::with_capacity(maps.len());
    for stage in wanted {
        let map = resample(maps[at(stage)].clone(), gh, gw)?;
        let map = map.squeeze(0)?.flatten_from(1)?; // [C, patches]
        let mean = map.mean_all()?.to_scalar::<f32>()?;
        let centred = (map - f64::from(mean))?;
        let var = centred.sqr()?.mean_all()?.to_scalar::<f32>()?;
        let normed = (centred / f64::from((var + 1e-5).sqrt()))?;
        stages.push(normed.flatten_all()?.to_vec1::<f32>()?);
    }
    Ok(Patches {
        stages,
        grid: (gw, gh),
        input_size,
        image_size: image.dimensions(),
    })
}

/// `stages` sorted as the network computes them (what `stage_maps`
/// returns).
fn network_order(stages: &[Stage]) -> Vec<Stage> {
    Stage::ALL
        .into_iter()
        .filter(|s| stages.contains(s))
        .collect()
}

/// One image's stage map averaged over `degree × degree` neighbourhoods
/// (zero-padded at the border, as an unfold with padding does), each patch
/// then scaled to unit length: `[patches, channels]` row-major.
fn aggregated(
    map: &[f32],
    grid: (usize, usize),
    degree: usize,
    device: &candle_core::Device,
) -> Result<Vec<f32>, Error> {
    let (w, h) = grid;
    let channels = map.len() / (w * h).max(1);
    let mut t = Tensor::from_slice(map, (1, channels, h, w), device)?;
    if degree > 1 {
        let pad = degree / 2;
        t = t
            .pad_with_zeros(2, pad, pad)?
            .pad_with_zeros(3, pad, pad)?
            .avg_pool2d_with_stride(degree, 1)?;
    }
    let rows = t.reshape((channels, h * w))?.t()?.contiguous()?;
    let norms = rows
        .sqr()?
        .sum_keepdim(D::Minus1)?
        .sqrt()?
        .clamp(1e-12, f64::MAX)?;
    Ok(rows.broadcast_div(&norms)?.flatten_all()?.to_vec1()?)
}

/// An image's global descriptor for re-scoring: the mean of each
/// layer-normalised stage channel over the image, all stages joined, at
/// unit length (the CNN's stand-in for the paper's class token).
fn descriptor(p: &Patches) -> Vec<f32> {
    let count = (p.grid.0 * p.grid.1).max(1);
    let mut joined: Vec<f32> = p
        .stages
        .iter()
        .flat_map(|map| {
            map.chunks(count)
                .map(|channel| channel.iter().sum::<f32>() / count as f32)
        })
        .collect();
    let norm = joined.iter().map(|v| v * v).sum::<f32>().sqrt().max(1e-12);
    joined.iter_mut().for_each(|v| *v /= norm);
    joined
}

/// The paper's image-level re-scoring (RsCIN), on raw scores: for each `k`
/// of `ks`, an image's score becomes the similarity-weighted mean of the
/// scores of its `k` most similar images of the part (itself among them,
/// negative similarities weighing nothing); the result is the mean over the
/// `ks`. A weighted mean commutes with the paper's min-max scaling, so the
/// ranking is the paper's.
fn rescored(scores: &[f32], descriptors: &[Vec<f32>], ks: &[usize]) -> Vec<f32> {
    let n = scores.len();
    (0..n)
        .map(|i| {
            let mut similar: Vec<(f32, usize)> = (0..n)
                .map(|j| {
                    let s = if i == j {
                        1.0
                    } else {
                        descriptors[i]
                            .iter()
                            .zip(&descriptors[j])
                            .map(|(a, b)| a * b)
                            .sum::<f32>()
                            .max(0.0)
                    };
                    (s, j)
                })
                .collect();
            // Itself first (a twin must not push it out of k = 1), then the
            // most similar.
            similar.sort_by(|a, b| {
                (b.1 == i)
                    .cmp(&(a.1 == i))
                    .then(b.0.total_cmp(&a.0))
                    .then(a.1.cmp(&b.1))
            });
            let per_k: Vec<f32> = ks
                .iter()
                .map(|k| {
                    let top = &similar[..(*k).clamp(1, n)];
                    let weight: f32 = top.iter().map(|(w, _)| w).sum();
                    top.iter().map(|(w, j)| w * scores[*j]).sum::<f32>() / weight.max(1e-12)
                })
                .collect();
            per_k.iter().sum::<f32>() / per_k.len().max(1) as f32
        })
        .collect()
}

/// Every image's patch scores in `set`: the mean over stages and degrees of
/// its mutual scores against the other images.
fn scores_of_part(
    set: &[&Patches],
    config: &MuscConfig,
    runtime: &Runtime,
    progress: &dyn Progress,
) -> Result<Vec<ScoreGrid>, Error> {
    let stages = set.first().map_or(0, |p| p.stages.len());
    let mut sums: Vec<Vec<f32>> = set
        .iter()
        .map(|p| vec![0f32; p.grid.0 * p.grid.1])
        .collect();
    let runs = stages * config.degrees.len();
    for stage in 0..stages {
        for degree in &config.degrees {
            let features: Vec<Vec<f32>> = set
                .par_iter()
                .map(|p| aggregated(&p.stages[stage], p.grid, *degree, runtime.device()))
                .collect::<Result<_, _>>()?;
            let rows: Vec<(&[f32], usize)> = features
                .iter()
                .zip(set)
                .map(|(f, p)| (f.as_slice(), p.grid.0 * p.grid.1))
                .collect();
            let scores = mutual_scores(&rows, config.interval, runtime)?;
            for (sum, s) in sums.iter_mut().zip(scores) {
                for (a, b) in sum.iter_mut().zip(s) {
                    *a += b / runs as f32;
                }
            }
        }
    }
    progress.advance(set.len() as u64);
    Ok(set
        .iter()
        .zip(sums)
        .map(|(p, values)| ScoreGrid {
            width: p.grid.0,
            height: p.grid.1,
            values,
            input_size: p.input_size,
            blur_sigma: crate::anomaly_map::DEFAULT_BLUR_SIGMA,
        })
        .collect())
}

/// Every image's patch scores against the other images of `set`: each
/// image given as its `[patches, channels]` row-major features and its
/// patch count.
fn mutual_scores(
    set: &[(&[f32], usize)],
    interval: f64,
    runtime: &Runtime,
) -> Result<Vec<Vec<f32>>, Error> {
    let channels = set
        .iter()
        .find(|(_, n)| *n > 0)
        .map_or(0, |(f, n)| f.len() / n);
    let offsets: Vec<usize> = set
        .iter()
        .scan(0, |at, (_, n)| {
            let start = *at;
            *at += n;
            Some(start)
        })
        .collect();
    let total: usize = set.iter().map(|(_, n)| n).sum();
    let all: Vec<f32> = set.iter().flat_map(|(f, _)| f.iter().copied()).collect();
    let bank = Tensor::from_vec(all, (total, channels), runtime.device())?;
    let bank_t = bank.t()?.contiguous()?;
    let norms: Vec<f32> = bank.sqr()?.sum(1)?.to_vec1()?;
    let others = set.len() - 1;
    let keep = ((interval * others as f64).ceil() as usize).clamp(1, others);
    let mut out = Vec::with_capacity(set.len());
    for (i, (_, count)) in set.iter().enumerate() {
        let mut scores = Vec::with_capacity(*count);
        for first in (0..*count).step_by(ROWS) {
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
                        let end = start + set[j].1;
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
        out.push(scores);
    }
    Ok(out)
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

    /// Mutual scores of ten two-patch images, (0, 0) and (1, 0), where
    /// `odd(i)` images have (0, 5) as their second patch instead.
    fn scores_with_odd(odd: impl Fn(usize) -> bool) -> Vec<Vec<f32>> {
        let images: Vec<Vec<f32>> = (0..10)
            .map(|i| {
                let second = if odd(i) { [0.0, 5.0] } else { [1.0, 0.0] };
                [0.0, 0.0, second[0], second[1]].to_vec()
            })
            .collect();
        let set: Vec<(&[f32], usize)> = images.iter().map(|f| (f.as_slice(), 2)).collect();
        let runtime = Runtime::new(candle_core::Device::Cpu);
        mutual_scores(&set, INTERVAL, &runtime).unwrap()
    }

    #[test]
    fn a_patch_no_other_image_has_stands_out() {
        // Ten images of two patches each: (0, 0) and (1, 0) everywhere,
        // except image 3, whose second patch is (0, 5).
        let grids = scores_with_odd(|i| i == 3);
        // Its nearest patch in every other image is (1, 0) or (0, 0):
        // distance √26 or 5; the smallest 3 of 9 are all 5.
        assert!((grids[3][1] - 5.0).abs() < 1e-4, "{:?}", grids[3]);
        assert!(grids[3][0].abs() < 1e-4);
        // Everyone else's patches have exact matches.
        for (i, g) in grids.iter().enumerate().filter(|(i, _)| *i != 3) {
            assert!(g.iter().all(|v| v.abs() < 1e-3), "{i}: {:?}", g);
        }
    }

    #[test]
    fn a_defect_shared_by_a_few_images_still_stands_out() {
        // The odd patch in 2 of 10 images: each finds its twin in one other
        // image, but the mean of the smallest 3 of 9 distances stays high.
        let grids = scores_with_odd(|i| i < 2);
        assert!((grids[0][1] - 10.0 / 3.0).abs() < 1e-4, "{:?}", grids[0]);
    }

    #[test]
    fn rescoring_averages_over_the_most_similar_images() {
        // Images 0 and 1 alike, image 2 apart.
        let d = vec![vec![1.0, 0.0], vec![1.0, 0.0], vec![0.0, 1.0]];
        let s = rescored(&[1.0, 3.0, 5.0], &d, &[1, 2]);
        // k = 1 keeps each score; k = 2 averages 0 and 1 (weights 1, 1)
        // and leaves 2 with itself (its other similarities are 0).
        assert_eq!(s, [1.5, 2.5, 5.0]);
        assert_eq!(rescored(&[1.0, 3.0, 5.0], &d, &[1]), [1.0, 3.0, 5.0]);
    }

    #[test]
    fn degrees_average_the_neighbourhood_and_scale_to_unit_length() {
        // One channel on a 3 × 1 grid: 3, 0, 0; two channels so the
        // length is not trivially one.
        let map = [3.0, 0.0, 0.0, 0.0, 0.0, 4.0];
        let device = candle_core::Device::Cpu;
        let one = aggregated(&map, (3, 1), 1, &device).unwrap();
        assert_eq!(one, [1.0, 0.0, 0.0, 0.0, 0.0, 1.0]);
        // Degree 3, zero-padded: patch 1 sees (3 + 0 + 0) / 9 and
        // (0 + 0 + 4) / 9 -> (0.6, 0.8).
        let three = aggregated(&map, (3, 1), 3, &device).unwrap();
        assert!(
            (three[2] - 0.6).abs() < 1e-6 && (three[3] - 0.8).abs() < 1e-6,
            "{three:?}"
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
