//! A fitted model as users meet it: backbone recipe + detector +
//! calibration, saved in one file, answering "is this image anomalous, where,
//! and how sure".

use std::path::{Path, PathBuf};

use candle_core::Device;
use image::Rgb32FImage;
use serde::{Deserialize, Serialize};

use crate::Error;
use crate::anomaly_map::AnomalyMap;
use crate::calibration::{Calibration, DECISION_THRESHOLD};
use crate::detector::{Detector, DetectorConfig};
use crate::features::{FeatureConfig, FeatureExtractor};
use crate::images::{ImageLimits, load_image};
use crate::model_file;
use crate::progress::Progress;

/// Everything about a model except its tensors; stored as the model file's
/// JSON metadata.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ModelInfo {
    pub features: FeatureConfig,
    pub detector: DetectorConfig,
    pub calibration: Calibration,
    /// Images the detector was fitted on (held-back ones excluded).
    pub training_images: usize,
    pub memory_bank_size: Option<usize>,
    /// The flawscope version that wrote the file.
    pub written_by: String,
}

/// How to fit a model.
#[derive(Debug, Clone)]
pub struct FitOptions {
    pub features: FeatureConfig,
    pub detector: DetectorConfig,
    /// Fraction of the normal images held back for calibration.
    pub holdout: f64,
    /// At most this fraction of held-back normal images may be flagged.
    pub max_far: f64,
    /// Labelled anomalous images, if any, for an F1-optimal threshold.
    pub anomalies: Vec<PathBuf>,
    pub limits: ImageLimits,
}

/// The verdict on one image.
#[derive(Debug, Clone)]
pub struct Inspection {
    /// 0–1; anomalous at and above [`Inspection::threshold`].
    pub score: f32,
    pub raw_score: f32,
    pub is_anomalous: bool,
    /// Always [`DECISION_THRESHOLD`] (0.5): calibration puts it there.
    pub threshold: f32,
    /// Calibrated 0–1 map at the image's own size.
    pub map: AnomalyMap,
}

/// A loaded or freshly fitted model.
pub struct Inspector {
    extractor: FeatureExtractor,
    detector: Detector,
    info: ModelInfo,
}

impl Inspector {
    /// Fits on normal images: a deterministic part of them is held back to
    /// set the threshold.
    pub fn fit(
        normal: &[PathBuf],
        options: &FitOptions,
        device: &Device,
        progress: &dyn Progress,
    ) -> Result<Self, Error> {
        let (train, held_back) = split_holdout(normal, options.holdout)?;
        let extractor = FeatureExtractor::new(options.features.clone(), device)?;
        let detector = Detector::fit(
            &extractor,
            &train,
            &options.detector,
            &options.limits,
            progress,
        )?;

        let score_all = |paths: &[PathBuf], phase: &str| -> Result<Vec<f32>, Error> {
            progress.start(phase, paths.len() as u64);
            let mut scores = Vec::with_capacity(paths.len());
            for path in paths {
                let image = load_image(path, &options.limits)?;
                scores.push(detector.inspect(&extractor, &image)?.score);
                progress.advance(1);
            }
            progress.finish();
            Ok(scores)
        };
        let normal_scores = score_all(&held_back, "calibration (normal)")?;
        let anomalous_scores = score_all(&options.anomalies, "calibration (anomalous)")?;
        let calibration =
            Calibration::from_labelled_scores(&normal_scores, &anomalous_scores, options.max_far)?;
        let info = ModelInfo {
            features: options.features.clone(),
            detector: options.detector.clone(),
            calibration,
            training_images: train.len(),
            memory_bank_size: detector.memory_bank_size(),
            written_by: format!("flawscope {}", env!("CARGO_PKG_VERSION")),
        };
        Ok(Self {
            extractor,
            detector,
            info,
        })
    }

    pub fn info(&self) -> &ModelInfo {
        &self.info
    }

    /// Saves to one model file (atomically).
    pub fn save(&self, path: &Path) -> Result<(), Error> {
        model_file::save(path, &self.info, &self.detector.tensors())?;
        Ok(())
    }

    /// Loads a model file.
    pub fn load(path: &Path, device: &Device) -> Result<Self, Error> {
        let (info, mut tensors): (ModelInfo, _) = model_file::load(path, device)?;
        let detector = Detector::from_tensors(&info.detector, &info.features, &mut tensors, path)?;
        let extractor = FeatureExtractor::new(info.features.clone(), device)?;
        Ok(Self {
            extractor,
            detector,
            info,
        })
    }

    /// Scores one image.
    pub fn inspect(&self, image: &Rgb32FImage) -> Result<Inspection, Error> {
        let raw = self.detector.inspect(&self.extractor, image)?;
        let calibration = &self.info.calibration;
        let map = AnomalyMap {
            width: raw.map.width,
            height: raw.map.height,
            values: raw
                .map
                .values
                .iter()
                .map(|v| calibration.normalise(*v))
                .collect(),
        };
        Ok(Inspection {
            score: calibration.normalise(raw.score),
            raw_score: raw.score,
            is_anomalous: calibration.is_anomalous(raw.score),
            threshold: DECISION_THRESHOLD,
            map,
        })
    }
}

/// Splits normal images into (fit, held back). The images whose file names
/// hash lowest are held back, so the split is stable across runs and moves.
pub fn split_holdout(
    paths: &[PathBuf],
    fraction: f64,
) -> Result<(Vec<PathBuf>, Vec<PathBuf>), Error> {
    if !(fraction > 0.0 && fraction < 1.0) {
        return Err(Error::InvalidConfig(format!(
            "the held-back fraction must be in (0, 1), got {fraction}"
        )));
    }
    if paths.len() < 2 {
        return Err(Error::InvalidConfig(format!(
            "need at least 2 normal images (one to fit, one to calibrate), got {}",
            paths.len()
        )));
    }
    let mut keyed: Vec<(u64, &PathBuf)> = paths
        .iter()
        .map(|p| {
            let name = p.file_name().unwrap_or(p.as_os_str());
            (stable_hash(&name.to_string_lossy()), p)
        })
        .collect();
    keyed.sort();
    let held = ((paths.len() as f64 * fraction).round() as usize).clamp(1, paths.len() - 1);
    let held_back: Vec<PathBuf> = keyed[..held].iter().map(|(_, p)| (*p).clone()).collect();
    let mut train: Vec<PathBuf> = keyed[held..].iter().map(|(_, p)| (*p).clone()).collect();
    train.sort();
    Ok((train, held_back))
}

/// FNV-1a: stable across platforms and Rust versions.
fn stable_hash(text: &str) -> u64 {
    text.bytes().fold(0xcbf2_9ce4_8422_2325, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn holdout_is_stable_and_disjoint() {
        let paths: Vec<PathBuf> = (0..50).map(|i| PathBuf::from(format!("{i}.png"))).collect();
        let (train, held) = split_holdout(&paths, 0.1).unwrap();
        assert_eq!((train.len(), held.len()), (45, 5));
        assert!(held.iter().all(|p| !train.contains(p)));
        let mut reversed = paths.clone();
        reversed.reverse();
        let (_, held_again) = split_holdout(&reversed, 0.1).unwrap();
        assert_eq!(held, held_again);
        assert!(split_holdout(&paths[..1], 0.1).is_err());
    }
}
