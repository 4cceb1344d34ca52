//! Evaluation on a labelled category: fit on `train/good`, score `test/`,
//! and measure. No test image is ever seen while fitting.

use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;
use std::time::{Duration, Instant};

use flawscope_prompts::object_phrase;
use image::Rgb32FImage;
use rayon::prelude::*;
use serde::Serialize;

use crate::Error;
use crate::anomaly_map::AnomalyMap;
use crate::dataset::{Category, Mask};
use crate::detectors::DetectorConfig;
use crate::features::FeatureConfig;
use crate::images::{ImageLimits, load_image};
use crate::metrics::{Confusion, PixelMetrics, PixelReport, f1_max, image_auroc, recall_at_far};
use crate::model::{FitOptions, Member, Model};
use crate::operating_point::OperatingPoint;
use crate::progress::Progress;
use crate::runtime::Runtime;
use crate::tiling::TileChoice;

/// One category's results.
#[derive(Debug, Clone, Serialize)]
pub struct CategoryReport {
    pub category: String,
    pub detector: String,
    pub backbone: String,
    pub image_auroc: f64,
    /// `None` when the category has no masks.
    pub pixel_auroc: Option<f64>,
    /// AUPRO up to 30 % FPR, normalised; `None` without masks.
    pub aupro: Option<f64>,
    pub f1_max: f64,
    /// Raw score at which F1-max is reached.
    pub f1_threshold: f32,
    pub fit_seconds: f64,
    /// Backbone + detector + map per test image (decoding excluded): wall
    /// time over the test set divided by its images.
    pub ms_per_image: f64,
    /// Test images scored at once (concurrently) for `ms_per_image`.
    pub batch: usize,
    pub memory_bank_size: Option<usize>,
    pub train_images: usize,
    pub test_images: usize,
    /// Tile side when images were scored in tiles (see `tiling`).
    pub tile_side: Option<u32>,
    /// The whole image was scored beside the tiles.
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub whole_image_view: bool,
    /// Why automatic tiling tiled or not, when the fit weighed both.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tiling_decision: Option<crate::tiling::TilingDecision>,
    /// Which detector an automatic choice kept (`--detector auto`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub detector_choice: Option<crate::choice::DetectorChoice>,
    /// Image AUROC of each defect type against all good test images.
    pub per_defect_image_auroc: BTreeMap<String, f64>,
    /// Verdicts at the threshold the model gives users.
    pub at_threshold: AtThreshold,
    /// Reference from the test labels: the best recall at no more than 1 %
    /// and 5 % false alarms (keys `"0.01"`, `"0.05"`).
    pub recall_at_far: BTreeMap<String, f64>,
}

/// Fits a model on the category's normal training images exactly as `fit`
/// does (the detector on all of them, the threshold cross-fitted at
/// `max_far`, or `max_mar` on synthetic defects), then scores its test set
/// with the raw scores, `batch` images at a time (see [`score_test_set`]).
/// A WinCLIP detector without an object inspects the category's name
/// (`metal_nut` → "metal nut").
#[allow(clippy::too_many_arguments)]
pub fn evaluate(
    category: &Category,
    features: Option<&FeatureConfig>,
    detector: &DetectorConfig,
    runtime: &Runtime,
    limits: &ImageLimits,
    tile: TileChoice,
    batch: usize,
    threshold: ThresholdTarget,
    progress: &dyn Progress,
) -> Result<CategoryReport, Error> {
    evaluate_shots(
        category, None, features, detector, None, runtime, limits, tile, batch, threshold, progress,
    )
}

/// [`evaluate`], fitted on the first `shots` normal training images by
/// path when given ([`Model::fit_shots`]); WinCLIP takes its shots from its
/// own settings.
#[allow(clippy::too_many_arguments)]
pub fn evaluate_shots(
    category: &Category,
    shots: Option<usize>,
    features: Option<&FeatureConfig>,
    detector: &DetectorConfig,
    partner: Option<&Member>,
    runtime: &Runtime,
    limits: &ImageLimits,
    tile: TileChoice,
    batch: usize,
    threshold: ThresholdTarget,
    progress: &dyn Progress,
) -> Result<CategoryReport, Error> {
    let mut config = detector.clone();
    if let DetectorConfig::WinClip(c) = &mut config
        && c.object.trim().is_empty()
    {
        c.object = object_phrase(&category.name);
    }
    let fit_start = Instant::now();
    let options = FitOptions {
        features: features.cloned(),
        detector: config,
        max_far: threshold.max_far,
        limits: *limits,
        tile,
        max_mar: threshold.max_mar,
        partner: partner.cloned(),
        ..FitOptions::default()
    };
    let model = match shots {
        Some(k) if options.detector.is_calibrated() => {
            Model::fit_shots(&category.train_good, k, &options, runtime, progress)?
        }
        _ => Model::fit(&category.train_good, &options, runtime, progress)?,
    };
    let fit_seconds = fit_start.elapsed().as_secs_f64();
    let results = score_test_set(category, limits, batch, progress, |image| {
        let raw = model.inspect_raw(image)?;
        Ok((raw.score, raw.map))
    })?;
    let info = model.info();
    let operating_point = model.operating_point(None)?;
    results.into_report(
        category,
        FitSummary {
            detector: info.detector_label(),
            backbone: info.detector.backbone_label(features),
            fit_seconds,
            memory_bank_size: info.memory_bank_size,
            train_images: info.training_images,
            tile_side: info.tiling.map(|t| t.side),
            whole_image_view: info.whole_view.is_some(),
            tiling_decision: info.tiling_decision,
            detector_choice: info.detector_choice.clone(),
            operating_point,
            max_far: threshold.max_far,
            max_mar: threshold.max_mar,
        },
    )
}

/// What sets the threshold in [`evaluate`], as in `fit`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ThresholdTarget {
    pub max_far: f64,
    pub max_mar: Option<f64>,
}

impl Default for ThresholdTarget {
    fn default() -> Self {
        Self {
            max_far: 0.01,
            max_mar: None,
        }
    }
}

/// The verdicts at the model's own threshold on the test set.
#[derive(Debug, Clone, Serialize)]
pub struct AtThreshold {
    /// The raw score at and above which an image is flagged.
    pub threshold: f32,
    /// The false-alarm limit the threshold was fitted for (absent when a
    /// missed-alarm target set it).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_far: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_mar: Option<f64>,
    /// What calibration estimated on the training images (out of sample).
    pub estimated_false_alarm_rate: f64,
    pub false_alarm_upper_bound_95: f64,
    pub calibration_images: usize,
    /// Flagged good test images over good test images.
    pub false_alarm_rate: f64,
    pub false_alarms: usize,
    pub good_images: usize,
    /// Flagged defective test images over defective test images.
    pub recall: f64,
    pub detected: usize,
    pub defective_images: usize,
    /// Recall per defect type.
    pub per_type: BTreeMap<String, TypeRecall>,
    /// Reference from the test labels: the best recall any threshold gets
    /// at no more than the false-alarm rate this one reached.
    pub best_recall_at_this_false_alarm_rate: f64,
}

/// Recall on one defect type.
#[derive(Debug, Clone, Copy, Serialize)]
pub struct TypeRecall {
    pub recall: f64,
    pub detected: usize,
    pub images: usize,
}

/// How a model was fitted, for the report.
#[derive(Debug, Clone)]
pub struct FitSummary {
    pub detector: String,
    pub backbone: String,
    pub fit_seconds: f64,
    pub memory_bank_size: Option<usize>,
    pub train_images: usize,
    /// Tile side when images were scored in tiles.
    pub tile_side: Option<u32>,
    pub whole_image_view: bool,
    pub tiling_decision: Option<crate::tiling::TilingDecision>,
    pub detector_choice: Option<crate::choice::DetectorChoice>,
    /// The model's own operating point (its threshold and estimates).
    pub operating_point: OperatingPoint,
    pub max_far: f64,
    pub max_mar: Option<f64>,
}

/// Scores of a test set, before they become a [`CategoryReport`].
#[derive(Debug, Clone)]
pub struct TestSetResults {
    pub scores: Vec<f32>,
    pub labels: Vec<bool>,
    /// Pixel metrics, when the category has masks.
    pub pixels: Option<PixelReport>,
    pub ms_per_image: f64,
    /// Images scored at once.
    pub batch: usize,
}

/// The most test images decoded and scored at once (each holds its decoded
/// image and the detector's buffers).
pub const MAX_BATCH: usize = 64;

/// Scores every test image of `category` with `inspect` (image → score and
/// map) and gathers image labels and pixel metrics.
///
/// Images are decoded `batch` at a time, then scored concurrently (the
/// detector's own work shares the same threads); only the wall time spent
/// scoring counts as inference time. `batch` 1 scores one image after
/// another: the latency a single request sees.
pub fn score_test_set(
    category: &Category,
    limits: &ImageLimits,
    batch: usize,
    progress: &dyn Progress,
    inspect: impl Fn(&Rgb32FImage) -> Result<(f32, AnomalyMap), Error> + Sync,
) -> Result<TestSetResults, Error> {
    let batch = batch.clamp(1, MAX_BATCH);
    let mut gathered = Gathered::new(category);
    let mut inference = Duration::ZERO;
    progress.start("test", category.test.len() as u64);
    for samples in category.test.chunks(batch) {
        let images = samples
            .iter()
            .map(|sample| load_image(&sample.path, limits))
            .collect::<Result<Vec<_>, _>>()?;
        let start = Instant::now();
        // One image at a time runs inside the thread pool (one hand-off per
        // image): from outside it, each of the image's parallel steps would
        // wake the pool and wait for it, a hand-off per layer.
        let outputs = if batch == 1 {
            images
                .iter()
                .map(|image| rayon::scope(|_| inspect(image)))
                .collect::<Result<Vec<_>, _>>()?
        } else {
            images
                .par_iter()
                .map(&inspect)
                .collect::<Result<Vec<_>, _>>()?
        };
        inference += start.elapsed();
        for ((sample, image), (score, map)) in samples.iter().zip(&images).zip(outputs) {
            gathered.add(sample, image.dimensions(), score, &map, limits)?;
            progress.advance(1);
        }
    }
    progress.finish();
    gathered.finish(inference, batch)
}

/// Test-set scores, labels and pixel metrics as they come in.
struct Gathered {
    with_masks: bool,
    pixels: PixelMetrics,
    scores: Vec<f32>,
    labels: Vec<bool>,
    images: usize,
}

impl Gathered {
    fn new(category: &Category) -> Self {
        Self {
            with_masks: category.has_masks(),
            pixels: PixelMetrics::new(),
            scores: Vec::with_capacity(category.test.len()),
            labels: Vec::with_capacity(category.test.len()),
            images: category.test.len(),
        }
    }

    fn add(
        &mut self,
        sample: &crate::dataset::TestSample,
        size: (u32, u32),
        score: f32,
        map: &AnomalyMap,
        limits: &ImageLimits,
    ) -> Result<(), Error> {
        self.scores.push(score);
        self.labels.push(sample.is_anomalous());
        if !self.with_masks {
            return Ok(());
        }
        let mask = match (&sample.mask, sample.is_anomalous()) {
            (Some(path), _) => Some(Mask::load(path, size, limits)?),
            (None, false) => None,
            // An anomalous image without a mask gets no pixel metrics.
            (None, true) => return Ok(()),
        };
        self.pixels.add_image(
            &map.values,
            mask.as_ref().map(|m| m.pixels.as_slice()),
            map.width,
            map.height,
        )?;
        Ok(())
    }

    fn finish(self, inference: Duration, batch: usize) -> Result<TestSetResults, Error> {
        Ok(TestSetResults {
            pixels: if self.with_masks {
                Some(self.pixels.finish()?)
            } else {
                None
            },
            ms_per_image: inference.as_secs_f64() * 1000.0 / self.images.max(1) as f64,
            batch,
            scores: self.scores,
            labels: self.labels,
        })
    }
}

/// Scores the category's test set as one unlabeled batch by mutual scoring
/// ([`crate::musc`]): no model, and `train/` is never read. The operating
/// point is the batch's outlier rule (uncalibrated).
pub fn evaluate_batch(
    category: &Category,
    config: &crate::musc::MuscConfig,
    runtime: &Runtime,
    limits: &ImageLimits,
    progress: &dyn Progress,
) -> Result<CategoryReport, Error> {
    let paths: Vec<PathBuf> = category.test.iter().map(|s| s.path.clone()).collect();
    let start = Instant::now();
    let scored = crate::musc::score_batch(&paths, config, runtime, limits, progress)?
        .into_iter()
        .collect::<Result<Vec<_>, _>>()?;
    let inference = start.elapsed();
    let raw: Vec<f32> = scored.iter().map(|r| r.score).collect();
    let mut operating_point = OperatingPoint::probability();
    operating_point.raw_threshold = crate::musc::outlier_threshold(&raw);
    let mut gathered = Gathered::new(category);
    for (sample, r) in category.test.iter().zip(&scored) {
        let size = (r.map.width as u32, r.map.height as u32);
        gathered.add(sample, size, r.score, &r.map, limits)?;
    }
    let batch = paths.len().min(config.max_batch);
    gathered.finish(inference, batch)?.into_report(
        category,
        FitSummary {
            detector: "musc".into(),
            backbone: config.features.backbone.name().to_owned(),
            fit_seconds: 0.0,
            memory_bank_size: None,
            train_images: 0,
            tile_side: None,
            whole_image_view: false,
            tiling_decision: None,
            detector_choice: None,
            operating_point,
            max_far: 0.0,
            max_mar: None,
        },
    )
}

impl TestSetResults {
    /// The image-level metrics, overall and per defect type.
    pub fn into_report(
        self,
        category: &Category,
        fit: FitSummary,
    ) -> Result<CategoryReport, Error> {
        let f1 = f1_max(&self.scores, &self.labels)?;
        let mut per_defect_image_auroc = BTreeMap::new();
        let defect_types: BTreeSet<&str> = category
            .test
            .iter()
            .filter(|s| s.is_anomalous())
            .map(|s| s.defect_type.as_str())
            .collect();
        for defect in defect_types {
            let (s, l): (Vec<f32>, Vec<bool>) = category
                .test
                .iter()
                .zip(&self.scores)
                .filter(|(sample, _)| !sample.is_anomalous() || sample.defect_type == defect)
                .map(|(sample, score)| (*score, sample.is_anomalous()))
                .unzip();
            per_defect_image_auroc.insert(defect.to_string(), image_auroc(&s, &l)?);
        }
        let at_threshold = at_threshold(category, &self.scores, &self.labels, &fit)?;
        let recall_at_far = REFERENCE_FALSE_ALARM_RATES
            .iter()
            .map(|(key, far)| {
                Ok((
                    (*key).to_owned(),
                    recall_at_far(&self.scores, &self.labels, *far)?,
                ))
            })
            .collect::<Result<_, Error>>()?;
        Ok(CategoryReport {
            at_threshold,
            recall_at_far,
            category: category.name.clone(),
            detector: fit.detector,
            backbone: fit.backbone,
            image_auroc: image_auroc(&self.scores, &self.labels)?,
            pixel_auroc: self.pixels.map(|r| r.pixel_auroc),
            aupro: self.pixels.map(|r| r.aupro),
            f1_max: f1.f1,
            f1_threshold: f1.threshold,
            fit_seconds: fit.fit_seconds,
            ms_per_image: self.ms_per_image,
            batch: self.batch,
            memory_bank_size: fit.memory_bank_size,
            train_images: fit.train_images,
            tile_side: fit.tile_side,
            whole_image_view: fit.whole_image_view,
            tiling_decision: fit.tiling_decision,
            detector_choice: fit.detector_choice,
            test_images: category.test.len(),
            per_defect_image_auroc,
        })
    }
}

/// The false-alarm limits of the `recall_at_far` reference.
const REFERENCE_FALSE_ALARM_RATES: [(&str, f64); 2] = [("0.01", 0.01), ("0.05", 0.05)];

/// The verdicts on the test set at the model's raw threshold.
fn at_threshold(
    category: &Category,
    scores: &[f32],
    labels: &[bool],
    fit: &FitSummary,
) -> Result<AtThreshold, Error> {
    let point = &fit.operating_point;
    let threshold = point.raw_threshold;
    let all = Confusion::at(scores, labels, threshold);
    let mut per_type = BTreeMap::new();
    for (sample, score) in category.test.iter().zip(scores) {
        if !sample.is_anomalous() {
            continue;
        }
        let entry = per_type
            .entry(sample.defect_type.clone())
            .or_insert(TypeRecall {
                recall: 0.0,
                detected: 0,
                images: 0,
            });
        entry.images += 1;
        entry.detected += usize::from(*score >= threshold);
    }
    for entry in per_type.values_mut() {
        entry.recall = entry.detected as f64 / entry.images.max(1) as f64;
    }
    Ok(AtThreshold {
        threshold,
        max_far: fit.max_mar.is_none().then_some(fit.max_far),
        max_mar: fit.max_mar,
        estimated_false_alarm_rate: point.estimated_false_alarm_rate,
        false_alarm_upper_bound_95: point.false_alarm_upper_bound_95,
        calibration_images: point.normal_images,
        false_alarm_rate: all.false_alarm_rate(),
        false_alarms: all.false_alarms,
        good_images: all.normal,
        recall: all.recall(),
        detected: all.detected,
        defective_images: all.anomalous,
        per_type,
        best_recall_at_this_false_alarm_rate: recall_at_far(
            scores,
            labels,
            all.false_alarm_rate(),
        )?,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dataset::TestSample;
    use crate::operating_point::OperatingPoint;
    use std::path::PathBuf;

    /// Ten test images, worked out by hand below.
    fn fixture() -> (Category, Vec<f32>, Vec<bool>) {
        let samples = [
            ("good", 1.0),
            ("good", 2.0),
            ("good", 3.0),
            ("good", 4.0),
            ("good", 9.0),
            ("crack", 5.0),
            ("crack", 8.0),
            ("crack", 10.0),
            ("hole", 3.5),
            ("hole", 9.5),
        ];
        let test = samples
            .iter()
            .enumerate()
            .map(|(i, (kind, _))| TestSample {
                path: PathBuf::from(format!("{kind}/{i}.png")),
                defect_type: (*kind).to_owned(),
                mask: None,
            })
            .collect();
        let category = Category {
            name: "fixture".into(),
            root: PathBuf::new(),
            train_good: Vec::new(),
            test,
        };
        let scores = samples.iter().map(|(_, s)| *s).collect();
        let labels = samples.iter().map(|(k, _)| *k != "good").collect();
        (category, scores, labels)
    }

    fn summary(raw_threshold: f32) -> FitSummary {
        let mut point = OperatingPoint::probability();
        point.raw_threshold = raw_threshold;
        FitSummary {
            detector: "patchcore".into(),
            backbone: "lite0".into(),
            fit_seconds: 0.0,
            memory_bank_size: None,
            train_images: 0,
            tile_side: None,
            whole_image_view: false,
            tiling_decision: None,
            detector_choice: None,
            operating_point: point,
            max_far: 0.01,
            max_mar: None,
        }
    }

    #[test]
    fn verdicts_at_the_threshold_match_the_hand_computed_fixture() {
        let (category, scores, labels) = fixture();
        // Threshold 4.5: good 9.0 is the one false alarm (1 of 5); flagged
        // defects: crack 5, 8, 10 and hole 9.5 (4 of 5); hole 3.5 missed.
        let at = at_threshold(&category, &scores, &labels, &summary(4.5)).unwrap();
        assert_eq!((at.false_alarms, at.good_images), (1, 5));
        assert_eq!(at.false_alarm_rate, 0.2);
        assert_eq!((at.detected, at.defective_images), (4, 5));
        assert_eq!(at.recall, 0.8);
        assert_eq!(at.per_type["crack"].detected, 3);
        assert_eq!(at.per_type["hole"].recall, 0.5);
        // At ≤ 20 % false alarms (one good image may be flagged) the best
        // threshold is just above 4.0: the same four defects.
        assert_eq!(at.best_recall_at_this_false_alarm_rate, 0.8);
        // At 0 false alarms only scores above the top good (9.0) count:
        // crack 10 and hole 9.5.
        assert_eq!(recall_at_far(&scores, &labels, 0.01).unwrap(), 0.4);
        assert_eq!(recall_at_far(&scores, &labels, 0.05).unwrap(), 0.4);
        assert_eq!(recall_at_far(&scores, &labels, 0.2).unwrap(), 0.8);
        // A threshold on a score counts that score as flagged.
        let at = at_threshold(&category, &scores, &labels, &summary(9.0)).unwrap();
        assert_eq!((at.false_alarms, at.detected), (1, 2));
        assert_eq!(at.best_recall_at_this_false_alarm_rate, 0.8);
    }
}
