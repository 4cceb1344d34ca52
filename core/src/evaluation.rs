//! Evaluation on a labelled category: fit on `train/good`, score `test/`,
//! and measure. No test image is ever seen while fitting.

use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant};

use flawscope_prompts::object_phrase;
use image::Rgb32FImage;
use rayon::prelude::*;
use serde::Serialize;

use crate::Error;
use crate::anomaly_map::AnomalyMap;
use crate::dataset::{Category, Mask};
use crate::detector::{DetectorConfig, FitInputs};
use crate::features::FeatureConfig;
use crate::images::{ImageLimits, load_image};
use crate::metrics::{PixelMetrics, PixelReport, f1_max, image_auroc};
use crate::progress::Progress;
use crate::runtime::Runtime;
use crate::tiling::{self, TileChoice};

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
    /// Image AUROC of each defect type against all good test images.
    pub per_defect_image_auroc: BTreeMap<String, f64>,
}

/// Fits `detector` on the category's normal training images (all of them:
/// no threshold is needed) and scores its test set with the raw scores,
/// `batch` images at a time (see [`score_test_set`]). A WinCLIP detector
/// without an object inspects the category's name (`metal_nut` → "metal nut").
#[allow(clippy::too_many_arguments)]
pub fn evaluate(
    category: &Category,
    features: Option<&FeatureConfig>,
    detector: &DetectorConfig,
    runtime: &Runtime,
    limits: &ImageLimits,
    tile: TileChoice,
    batch: usize,
    progress: &dyn Progress,
) -> Result<CategoryReport, Error> {
    let mut config = detector.clone();
    if let DetectorConfig::WinClip(c) = &mut config
        && c.object.trim().is_empty()
    {
        c.object = object_phrase(&category.name);
    }
    let fit_start = Instant::now();
    let tiling = tile.resolve(&category.train_good, config.input_side(features), limits)?;
    let fitted = config.fit(&FitInputs {
        normal: &category.train_good,
        features,
        runtime,
        limits,
        progress,
        tiling,
    })?;
    let fit_seconds = fit_start.elapsed().as_secs_f64();
    let results = score_test_set(category, limits, batch, progress, |image| {
        let raw = tiling::inspect_raw(fitted.as_ref(), tiling.as_ref(), image)?;
        Ok((raw.score, raw.map))
    })?;
    let stored = fitted.fitted_config().unwrap_or(config);
    results.into_report(
        category,
        FitSummary {
            detector: stored.label(),
            backbone: stored.backbone_label(features),
            fit_seconds,
            memory_bank_size: fitted.memory_bank_size(),
            train_images: fitted.images_used().unwrap_or(category.train_good.len()),
            tile_side: tiling.map(|t| t.side),
        },
    )
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
    let with_masks = category.has_masks();
    let mut pixels = PixelMetrics::new();
    let mut scores = Vec::with_capacity(category.test.len());
    let mut labels = Vec::with_capacity(category.test.len());
    let mut inference = Duration::ZERO;
    progress.start("test", category.test.len() as u64);
    for samples in category.test.chunks(batch) {
        let images = samples
            .iter()
            .map(|sample| load_image(&sample.path, limits))
            .collect::<Result<Vec<_>, _>>()?;
        let start = Instant::now();
        // One image stays on this thread: handing it to the pool would add a
        // thread hand-off to every image's measured latency.
        let outputs = if batch == 1 {
            images.iter().map(&inspect).collect::<Result<Vec<_>, _>>()?
        } else {
            images
                .par_iter()
                .map(&inspect)
                .collect::<Result<Vec<_>, _>>()?
        };
        inference += start.elapsed();
        for ((sample, image), (score, map)) in samples.iter().zip(&images).zip(outputs) {
            scores.push(score);
            labels.push(sample.is_anomalous());
            if with_masks {
                let mask = match (&sample.mask, sample.is_anomalous()) {
                    (Some(path), _) => Some(Mask::load(path, image.dimensions(), limits)?),
                    (None, false) => None,
                    // An anomalous image without a mask gets no pixel metrics.
                    (None, true) => {
                        progress.advance(1);
                        continue;
                    }
                };
                pixels.add_image(
                    &map.values,
                    mask.as_ref().map(|m| m.pixels.as_slice()),
                    map.width,
                    map.height,
                )?;
            }
            progress.advance(1);
        }
    }
    progress.finish();
    Ok(TestSetResults {
        pixels: if with_masks {
            Some(pixels.finish()?)
        } else {
            None
        },
        ms_per_image: inference.as_secs_f64() * 1000.0 / category.test.len().max(1) as f64,
        batch,
        scores,
        labels,
    })
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
        Ok(CategoryReport {
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
            test_images: category.test.len(),
            per_defect_image_auroc,
        })
    }
}
