//! A fitted model as users meet it: detector + calibration, saved in one
//! file, answering "is this image anomalous, where, and how sure". Every
//! face (CLI, server, TUI) loads, inspects and describes models through this
//! one type, whatever the detector.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};

use candle_core::Tensor;
use image::Rgb32FImage;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::Error;
use crate::anomaly_map::AnomalyMap;
use crate::calibration::{Calibration, CalibrationError, DECISION_THRESHOLD, ThresholdMethod};
use crate::choice::{DetectorChoice, Evidence, Kept, balanced_missed_rate};
use crate::crossfit::{OutOfFold, score_out_of_fold};
use crate::detector::{Detector, FitInputs, RawInspection};
use crate::detectors::patchcore::PatchCoreConfig;
use crate::detectors::{DetectorConfig, Fitted};
use crate::features::FeatureConfig;
use crate::fewshot::{FewShot, augments, first_shots, write_views};
use crate::folds::{Folds, hash_order};
use crate::images::{ImageLimits, load_image};
use crate::model_file::{self, ModelFileError, take};
use crate::operating_point::{
    CalibrationScores, Estimator, OperatingPoint, Target, kept, kept_synthetic,
};
use crate::progress::Progress;
use crate::prompt_layer::{DefectCheck, PromptLayer, PromptLayerInfo};
use crate::regions::{Region, area_above, hotspot, regions};
use crate::runtime::Runtime;
use crate::synthetic::{KindRate, MissedAlarmEstimate};
use crate::tiling::{Scale, TileChoice, Tiling, TilingDecision, View, ViewScales, ViewSeparation};
use crate::verdict::{Verdict, flagged_by};
use crate::winclip::config::WinClipConfig;

/// Most bank rows of a few-shot PatchCore ([`Model::fit_shots`]).
pub const FEW_SHOT_BANK: usize = 20_000;

/// `point`, whose estimates were made on the augmented views of
/// `few.shots` images, restated for those images: its upper bound and its
/// warning count images, not views.
fn restate_for_shots(mut point: OperatingPoint, few: &FewShot) -> OperatingPoint {
    let n = few.shots;
    let flagged = (point.estimated_false_alarm_rate * n as f64).round() as usize;
    point.false_alarm_upper_bound_95 = crate::calibration::upper_bound_95(flagged, n);
    point.normal_images = n;
    let best = crate::calibration::upper_bound_95(0, n);
    point.warning = Some(format!(
        "few-shot: the threshold rests on {} views of {n} normal images, and {n} images cannot \
         confirm a false-alarm rate below {best:.3} (the 95 % upper bound with no false alarm){}",
        n * few.views_per_image,
        if few.folds_by_image {
            ""
        } else {
            "; with one image, views were left out instead of images, so the threshold is \
             likely too low"
        }
    ));
    point
}

/// Everything about a model except its tensors; stored as the model file's
/// JSON metadata.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ModelInfo {
    /// The CNN feature recipe; `None` for detectors with their own network
    /// (WinCLIP).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub features: Option<FeatureConfig>,
    pub detector: DetectorConfig,
    pub calibration: Calibration,
    /// Images the detector was fitted on.
    #[serde(default)]
    pub training_images: usize,
    /// Their paths (absolute where they could be resolved), so `refit` can
    /// fit again with more normal images; empty in older files.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub training_paths: Vec<String>,
    pub memory_bank_size: Option<usize>,
    /// Images are cut into tiles of this side before scoring (absent in
    /// files written before tiling existed: no tiling).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tiling: Option<Tiling>,
    /// The automatic tiling choice's evidence, when the fit weighed tiles
    /// against the whole image ([`crate::tiling::TilingDecision`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tiling_decision: Option<TilingDecision>,
    /// Set when the whole image is scored beside the tiles: how the two
    /// views' raw scores are put on one scale.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub whole_view: Option<ViewScales>,
    /// Missed-alarm rates on synthetic defects at the threshold (absent for
    /// uncalibrated detectors and older files).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub missed_alarms: Option<MissedAlarmEstimate>,
    /// The out-of-sample scores the threshold rests on, for per-request
    /// operating points (absent for uncalibrated detectors and files
    /// written before cross-fitting).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub calibration_scores: Option<CalibrationScores>,
    /// What a `refit` added, when this model came from one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub refitted_from: Option<Refit>,
    /// The text layer, when the model was fitted with one (`fit --object`
    /// and CLIP weights beside a classical detector).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub prompt_layer: Option<PromptLayerInfo>,
    /// Set when fitted on a few shots ([`Model::fit_shots`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub few_shot: Option<FewShot>,
    /// A second detector scored beside this one (`--detector
    /// patchcore+padim`): its own fitted model and how the two raw scores
    /// share one scale ([`Partner`]); absent for one detector.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub partner: Option<Box<Partner>>,
    /// The automatic choice between two detectors and their pair, when the
    /// fit weighed them (`--detector auto`, [`DetectorChoice`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub detector_choice: Option<DetectorChoice>,
    /// The flawscope version that wrote the file.
    pub written_by: String,
}

/// The second detector of a pair: what it is (its own model metadata, with
/// its own calibration) and how its raw scores meet the first's.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Partner {
    pub info: ModelInfo,
    pub scales: PairScales,
}

/// Puts two detectors' raw scores on one scale and averages them, as the
/// whole-image view beside tiles does ([`ViewScales`]): each in its own
/// calibration's spreads from its own threshold (0 at the threshold, −1 at
/// the median normal image), then the mean, pixel by pixel for the maps.
/// Two detectors that err on different images (a memory bank's nearest
/// patch, PaDiM's per-position Gaussian) then vote, and the pair is
/// calibrated again on the mean of their out-of-fold scores.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct PairScales {
    pub first: Scale,
    pub second: Scale,
}

impl PairScales {
    pub fn fuse(&self, first: f32, second: f32) -> f32 {
        0.5 * (self.first.apply(first) + self.second.apply(second))
    }
}

/// The second detector of a pair to fit ([`FitOptions::partner`]).
#[derive(Debug, Clone, PartialEq)]
pub struct Member {
    /// `None` for detectors with their own network.
    pub features: Option<FeatureConfig>,
    pub detector: DetectorConfig,
    /// Keep whichever of the first detector, this one and the pair misses
    /// the fewest synthetic defects at its threshold ([`DetectorChoice`])
    /// instead of the pair.
    pub pick_best: bool,
    /// Its own tiling; `None`: the first's ([`FitOptions::tile`]), each
    /// detector then deciding for itself where that is automatic.
    pub tile: Option<TileChoice>,
}

impl ModelInfo {
    /// The tiling this model was fitted with, as a fixed choice (what a
    /// refit keeps).
    fn tile_kept(&self) -> TileChoice {
        match (self.tiling, &self.whole_view) {
            (Some(t), Some(_)) => TileChoice::SideAndWhole(t.side),
            (Some(t), None) => TileChoice::Side(t.side),
            (None, _) => TileChoice::Off,
        }
    }

    /// How the out-of-fold scores were made; for a pair, each detector's
    /// way (the pair's threshold rests on the mean of the two).
    pub fn calibration_procedure(&self) -> Option<String> {
        let own = |info: &ModelInfo| {
            let s = info.calibration_scores.as_ref()?;
            Some(s.procedure.describe(s.folds))
        };
        let first = own(self)?;
        Some(match &self.partner {
            Some(p) => format!(
                "{}: {first}; {}: {}; the pair on the mean of both",
                self.detector.name(),
                p.info.detector.name(),
                own(&p.info)?
            ),
            None => first,
        })
    }

    /// The detector's name in reports: `patchcore+padim` for a pair.
    pub fn detector_label(&self) -> String {
        match &self.partner {
            Some(p) => format!("{}+{}", self.detector.label(), p.info.detector.label()),
            None => self.detector.label(),
        }
    }
}

/// What a model is, for listings and metadata (`/v1/models`, `fit`).
#[derive(Debug, Clone, Serialize)]
pub struct ModelSummary {
    pub detector: String,
    pub backbone: String,
    /// Raw score at the decision threshold.
    pub raw_threshold: f32,
    /// The 0–1 threshold: always 0.5.
    pub threshold: f32,
    pub max_far: f64,
    pub estimated_false_alarm_rate: f64,
    /// One-sided 95 % upper confidence bound on the false-alarm rate.
    pub false_alarm_upper_bound_95: f64,
    /// Normal images the estimate rests on (out-of-sample scores).
    pub calibration_images: usize,
    /// How those scores were made (cross-fitting, or a hold-out in older
    /// files).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub calibration_procedure: Option<String>,
    /// Set when the held-back images are too few to confirm `max_far`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub calibration_warning: Option<String>,
    /// The missed-alarm target that set the threshold, if one did.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_mar: Option<f64>,
    /// Estimated missed-alarm rate per kind of synthetic defect.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub synthetic_missed_alarm_rates: Vec<KindRate>,
    /// Tile side when images are scored in tiles.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tile_side: Option<u32>,
    /// The whole image is scored beside the tiles.
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub whole_image_view: bool,
    /// Why automatic tiling tiled or not, when the fit weighed both.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tiling_decision: Option<TilingDecision>,
    /// Which detector an automatic choice kept, and why.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub detector_choice: Option<DetectorChoice>,
    pub training_images: usize,
    pub memory_bank_size: Option<usize>,
    /// What is inspected and the typed defect descriptions, for
    /// vision-language detectors.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub object: Option<String>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub prompts: Vec<String>,
    /// The text layer, when the model file has one: typed defect
    /// descriptions are then checked with CLIP beside the detector.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub text_layer: Option<TextLayerSummary>,
}

/// What [`ModelSummary`] says of a model's text layer.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct TextLayerSummary {
    pub object: String,
    /// Held-back normal images each description's threshold is set on.
    pub normal_images: usize,
    /// Whether typed descriptions can be checked here (CLIP weights found).
    pub available: bool,
    /// Why not, when they cannot.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
}

/// How to fit a model.
#[derive(Debug, Clone)]
pub struct FitOptions {
    /// `None` for detectors with their own network.
    pub features: Option<FeatureConfig>,
    pub detector: DetectorConfig,
    /// At most this fraction of normal images may be flagged.
    pub max_far: f64,
    /// Labelled anomalous images, if any, for an F1-optimal threshold.
    pub anomalies: Vec<PathBuf>,
    pub limits: ImageLimits,
    /// Whether to score images in tiles (see [`crate::tiling`]).
    pub tile: TileChoice,
    /// Set the threshold to miss at most this fraction of synthetic defects
    /// (instead of `max_far`).
    pub max_mar: Option<f64>,
    /// A second calibrated detector to score beside the first ([`Partner`]).
    pub partner: Option<Member>,
}

impl Default for FitOptions {
    /// PatchCore with its default features, at most 1 % false alarms, no
    /// labelled anomalies, the default image limits, automatic tiling.
    fn default() -> Self {
        Self {
            features: Some(PatchCoreConfig::default_features()),
            detector: DetectorConfig::PatchCore(PatchCoreConfig::default()),
            max_far: 0.01,
            anomalies: Vec::new(),
            limits: ImageLimits::default(),
            tile: TileChoice::Auto,
            max_mar: None,
            partner: None,
        }
    }
}

/// One answer per image, whatever asked: the model's calibrated score and
/// verdict at an operating point, each typed defect's check, the layered
/// verdict and what flagged it, the map and its regions. Every face (CLI
/// JSON, HTTP, results store, page, TUI) shows this; faces add transport
/// fields only (path, latency, PNG).
#[derive(Debug, Clone, Serialize)]
pub struct Inspection {
    /// 0–1; the model flags the image at and above [`Inspection::threshold`].
    pub score: f32,
    pub raw_score: f32,
    /// Anomalous when the model or any typed defect is over its threshold.
    pub is_anomalous: bool,
    /// The 0–1 threshold it was judged at: [`DECISION_THRESHOLD`] (0.5) at
    /// the model's own operating point, another at a request's.
    pub threshold: f32,
    /// The model's own verdict, typed defects aside.
    pub model_is_anomalous: bool,
    /// What flagged the image: `"model"`, then each flagged description
    /// ([`crate::verdict::flagged_by`]).
    pub flagged_by: Vec<String>,
    /// Each typed defect asked about, checked by the text layer.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub defects: Vec<DefectCheck>,
    /// Why the typed defects asked about could not be checked.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub defects_unchecked: Option<String>,
    /// The threshold used and what it costs in false and missed alarms.
    pub operating_point: OperatingPoint,
    /// The map's (and image's) size.
    pub width: usize,
    pub height: usize,
    /// Connected areas at or above the threshold, largest peak first (at
    /// most [`crate::regions::MAX_REGIONS`]).
    pub regions: Vec<Region>,
    /// Fraction of the image at or above the threshold, 0–1.
    pub anomalous_fraction: f64,
    /// Map pixels at or above the threshold (all areas, not only those
    /// listed).
    #[serde(skip)]
    pub anomalous_pixels: usize,
    /// Where the map peaks, `(x, y)`.
    #[serde(skip)]
    pub hotspot: (usize, usize),
    /// Calibrated 0–1 map at the image's own size.
    #[serde(skip)]
    pub map: AnomalyMap,
}

/// Typed defects checked on one image, or why they could not be.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct DefectReport {
    pub checks: Vec<DefectCheck>,
    /// Set when descriptions were given but could not be checked.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub unchecked_reason: Option<String>,
}

/// The text layer of a loaded model: ready, or its tensors kept (so a save
/// loses nothing) with the reason it cannot run here.
enum TextLayer {
    Ready(PromptLayer),
    Unavailable {
        tensors: BTreeMap<String, Tensor>,
        reason: String,
    },
}

/// A loaded or freshly fitted model.
pub struct Model {
    detector: Box<dyn Detector>,
    /// The whole-image view scored beside the tiles ([`ModelInfo::whole_view`]).
    whole: Option<Box<dyn Detector>>,
    /// The second detector of a pair ([`ModelInfo::partner`]).
    partner: Option<Box<Model>>,
    info: ModelInfo,
    text: Option<TextLayer>,
}

impl std::fmt::Debug for Model {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Model").field("info", &self.info).finish()
    }
}

impl Model {
    /// Fits on normal images. Calibrated detectors are fitted on all of
    /// them, and every image also gets an out-of-sample score by
    /// cross-fitting ([`crate::crossfit`]): the threshold and its estimates
    /// rest on all N images, and the scores are kept in the model so a
    /// request can move the threshold ([`Model::operating_point`]).
    ///
    /// With automatic tiling, images the size rule would tile
    /// ([`TileChoice::resolve`]) are fitted both whole and in tiles, and of
    /// the whole image, the tiles, and both together ([`ViewScales`]), the
    /// view that tells the out-of-fold normal images from synthetic defects
    /// (local and global ones) best is kept ([`TilingDecision`]): tiles see
    /// thin local detail but lose the part as a whole. Under
    /// [`crate::tiling::AUTO_MIN_IMAGES`] normal images the size rule
    /// decides alone.
    ///
    /// With [`FitOptions::partner`] the second detector is fitted the same
    /// way, and the pair is calibrated on the mean of the two detectors'
    /// scaled out-of-fold scores ([`PairScales`]).
    pub fn fit(
        normal: &[PathBuf],
        options: &FitOptions,
        runtime: &Runtime,
        progress: &dyn Progress,
    ) -> Result<Self, Error> {
        let Some(member) = &options.partner else {
            return Ok(Self::fit_alone(normal, options, runtime, progress)?.0);
        };
        if !options.detector.is_calibrated() || !member.detector.is_calibrated() {
            return Err(Error::InvalidConfig(format!(
                "a pair of detectors needs two calibrated ones, not {} and {}",
                options.detector.name(),
                member.detector.name()
            )));
        }
        let first_options = FitOptions {
            partner: None,
            ..options.clone()
        };
        let second_options = FitOptions {
            features: member.features.clone(),
            detector: member.detector.clone(),
            tile: member.tile.unwrap_or(options.tile),
            partner: None,
            ..options.clone()
        };
        let (first, first_out) = Self::fit_alone(normal, &first_options, runtime, progress)?;
        let (second, second_out) = Self::fit_alone(normal, &second_options, runtime, progress)?;
        let (Some(first_out), Some(second_out)) = (first_out, second_out) else {
            return Err(Error::InvalidConfig(
                "a pair of detectors needs out-of-fold scores from both".into(),
            ));
        };
        Self::with_partner(first, second, &first_out, &second_out, options, progress)
    }

    /// [`Model::fit`] of one detector, and the out-of-fold scores its
    /// calibration rests on (for calibrated detectors).
    fn fit_alone(
        normal: &[PathBuf],
        options: &FitOptions,
        runtime: &Runtime,
        progress: &dyn Progress,
    ) -> Result<(Self, Option<OutOfFold>), Error> {
        let tiling = options.tile.resolve(
            normal,
            options.detector.input_side(options.features.as_ref()),
            &options.limits,
        )?;
        let weigh = options.detector.is_calibrated()
            && match options.tile {
                TileChoice::Auto => normal.len() >= crate::tiling::AUTO_MIN_IMAGES,
                TileChoice::SideAndWhole(_) => true,
                TileChoice::Off | TileChoice::Side(_) => false,
            };
        let Some(tiles) = tiling.filter(|_| weigh) else {
            return Self::fit_view(normal, None, options, tiling, runtime, progress);
        };
        let (untiled, untiled_out) =
            Self::fit_view(normal, None, options, None, runtime, progress)?;
        let (tiled, tiled_out) =
            Self::fit_view(normal, None, options, Some(tiles), runtime, progress)?;
        let (Some(untiled_out), Some(tiled_out)) = (untiled_out, tiled_out) else {
            return Ok((untiled, None));
        };
        let separation = |out: &OutOfFold| ViewSeparation::measure(&out.normal, &out.synthetic);
        let scales = ViewScales {
            tiles: Scale::of(&tiled.info.calibration),
            whole: Scale::of(&untiled.info.calibration),
        };
        let both_out = fuse_out(|t, w| scales.fuse(t, w), &tiled_out, &untiled_out);
        let (view, decision) = match (
            options.tile,
            separation(&untiled_out),
            separation(&tiled_out),
        ) {
            (TileChoice::SideAndWhole(_), ..) => (View::Both, None),
            (_, Some(a), Some(b)) => {
                let decision = TilingDecision::new(tiles.side, a, b, separation(&both_out));
                (decision.view(), Some(decision))
            }
            _ => (View::Whole, None),
        };
        let (mut chosen, out) = match view {
            View::Whole => (untiled, untiled_out),
            View::Tiles => (tiled, tiled_out),
            View::Both => (
                Self::with_whole_view(tiled, untiled, scales, &both_out, options, progress)?,
                both_out,
            ),
        };
        chosen.info.tiling_decision = decision;
        Ok((chosen, Some(out)))
    }

    /// The model `first` with `second` scored beside it ([`Partner`]),
    /// calibrated on the mean of the two detectors' scaled out-of-fold
    /// scores of the same images and synthetic defects (each out of sample
    /// for its own detector, so their mean is too).
    fn with_partner(
        mut first: Self,
        second: Self,
        first_out: &OutOfFold,
        second_out: &OutOfFold,
        options: &FitOptions,
        progress: &dyn Progress,
    ) -> Result<Self, Error> {
        let scales = PairScales {
            first: Scale::of(&first.info.calibration),
            second: Scale::of(&second.info.calibration),
        };
        let out = fuse_out(|a, b| scales.fuse(a, b), first_out, second_out);
        // The pair's raw score is this mean (`first` has no partner yet).
        let anomalous = score_anomalies(options, progress, |image| {
            let (a, b) = (first.inspect_raw(image)?, second.inspect_raw(image)?);
            Ok(scales.fuse(a.score, b.score))
        })?;
        let (calibration, missed, scores) = calibrate(&out, &anomalous, options)?;
        if options.partner.as_ref().is_some_and(|m| m.pick_best) {
            let names = [
                first.detector_name(),
                second.detector_name(),
                format!("{}+{}", first.detector_name(), second.detector_name()),
            ];
            // With a missed-alarm target every candidate misses about the
            // same share; the normal images each flags then tell them apart.
            let names = [&names[0] as &str, &names[1], &names[2]];
            let choice = match options.max_mar {
                None => DetectorChoice::weigh(
                    names,
                    Evidence::SyntheticMissed,
                    [
                        first.info.missed_alarms.as_ref(),
                        second.info.missed_alarms.as_ref(),
                        Some(&missed),
                    ]
                    .map(|m| m.and_then(balanced_missed_rate)),
                ),
                Some(_) => DetectorChoice::weigh(
                    names,
                    Evidence::NormalFlagged,
                    [
                        &first.info.calibration,
                        &second.info.calibration,
                        &calibration,
                    ]
                    .map(|c| Some(c.estimated_far)),
                ),
            };
            match choice.kept {
                Kept::First => {
                    first.info.detector_choice = Some(choice);
                    return Ok(first);
                }
                Kept::Second => {
                    let mut second = second;
                    second.info.detector_choice = Some(choice);
                    return Ok(second);
                }
                Kept::Pair => first.info.detector_choice = Some(choice),
            }
        }
        first.info.memory_bank_size =
            match (first.info.memory_bank_size, second.info.memory_bank_size) {
                (Some(a), Some(b)) => Some(a + b),
                (a, b) => a.or(b),
            };
        first.info.partner = Some(Box::new(Partner {
            info: second.info.clone(),
            scales,
        }));
        first.partner = Some(Box::new(second));
        first.info.calibration = calibration;
        first.info.missed_alarms = Some(missed);
        first.info.calibration_scores = Some(scores);
        Ok(first)
    }

    /// [`Model::fit`] with the tiling settled, and the out-of-fold scores
    /// its calibration rests on (for calibrated detectors); `groups` (one
    /// per image) keeps images of one group in one calibration fold.
    fn fit_view(
        normal: &[PathBuf],
        groups: Option<&[usize]>,
        options: &FitOptions,
        tiling: Option<Tiling>,
        runtime: &Runtime,
        progress: &dyn Progress,
    ) -> Result<(Self, Option<OutOfFold>), Error> {
        let calibrated = options.detector.is_calibrated();
        let folds = if calibrated {
            let count = options.detector.calibration_folds();
            Some(match groups {
                Some(groups) => Folds::grouped(normal, groups, count)?,
                None => Folds::deal(normal, count)?,
            })
        } else {
            None
        };
        let inputs = FitInputs {
            normal,
            features: options.features.as_ref(),
            runtime,
            limits: &options.limits,
            progress,
            tiling,
            folds: folds.as_ref(),
        };
        let Fitted {
            mut detector,
            config,
            images_used,
        } = options.detector.fit(&inputs)?;
        let (calibration, missed_alarms, calibration_scores, out) = match &folds {
            Some(folds) => {
                let out = score_out_of_fold(&options.detector, detector.as_ref(), &inputs, folds)?;
                let anomalous = score_anomalies(options, progress, |image| {
                    Ok(detector.inspect_tiled(tiling.as_ref(), image)?.score)
                })?;
                let (calibration, missed, scores) = calibrate(&out, &anomalous, options)?;
                (calibration, Some(missed), Some(scores), Some(out))
            }
            None => (Calibration::probability(), None, None, None),
        };
        detector.forget_folds();
        let info = ModelInfo {
            features: options.features.clone(),
            detector: config,
            calibration,
            training_images: images_used,
            training_paths: normal
                .iter()
                .map(|p| {
                    std::fs::canonicalize(p)
                        .unwrap_or_else(|_| p.clone())
                        .display()
                        .to_string()
                })
                .collect(),
            memory_bank_size: detector.memory_bank_size(),
            tiling,
            tiling_decision: None,
            whole_view: None,
            partner: None,
            detector_choice: None,
            missed_alarms,
            calibration_scores,
            refitted_from: None,
            prompt_layer: None,
            few_shot: None,
            written_by: format!("flawscope {}", env!("CARGO_PKG_VERSION")),
        };
        Ok((
            Self {
                detector,
                whole: None,
                partner: None,
                info,
                text: None,
            },
            out,
        ))
    }

    /// The tiled model `tiled` with the whole-image model `whole` scored
    /// beside it ([`ViewScales`]), calibrated on the mean of the two views'
    /// scaled out-of-fold scores of each image, `out` (both views scored
    /// the same images and the same synthetic defects, so the fused scores
    /// are as out of sample as each view's).
    fn with_whole_view(
        mut tiled: Self,
        whole: Self,
        scales: ViewScales,
        out: &OutOfFold,
        options: &FitOptions,
        progress: &dyn Progress,
    ) -> Result<Self, Error> {
        tiled.info.memory_bank_size =
            match (tiled.info.memory_bank_size, whole.info.memory_bank_size) {
                (Some(a), Some(b)) => Some(a + b),
                (a, b) => a.or(b),
            };
        tiled.whole = Some(whole.detector);
        tiled.info.whole_view = Some(scales);
        let anomalous = score_anomalies(options, progress, |image| {
            Ok(tiled.inspect_raw(image)?.score)
        })?;
        let (calibration, missed, scores) = calibrate(out, &anomalous, options)?;
        tiled.info.calibration = calibration;
        tiled.info.missed_alarms = Some(missed);
        tiled.info.calibration_scores = Some(scores);
        Ok(tiled)
    }

    /// Fits on the first `shots` of `normal` (by path), with the rotated and
    /// flipped views of each for the detectors that call for them
    /// ([`crate::fewshot`]). The calibration states its estimates for
    /// `shots` images, and says they cannot confirm the limit asked.
    /// WinCLIP takes its shots from its own settings; it is fitted as
    /// [`Model::fit`] does.
    pub fn fit_shots(
        normal: &[PathBuf],
        shots: usize,
        options: &FitOptions,
        runtime: &Runtime,
        progress: &dyn Progress,
    ) -> Result<Self, Error> {
        if !options.detector.is_calibrated() {
            return Self::fit(normal, options, runtime, progress);
        }
        if options.partner.is_some() {
            return Err(Error::InvalidConfig(
                "two detectors (a pair, or --detector auto) are fitted on all normal images, not \
                 on a few shots"
                    .into(),
            ));
        }
        let chosen = first_shots(normal, shots, &options.detector)?;
        let mut options = options.clone();
        // Nothing to thin in a few images' patches: keep them all (up to a
        // bank of 20 000 rows, so scoring stays as fast as a full fit's).
        if let DetectorConfig::PatchCore(c) = &mut options.detector {
            c.coreset_ratio = 1.0;
            c.max_bank = Some(c.max_bank.unwrap_or(FEW_SHOT_BANK).min(FEW_SHOT_BANK));
        }
        let scratch = tempfile::tempdir()
            .map_err(|e| Error::InvalidConfig(format!("making a scratch folder: {e}")))?;
        let (fitted_on, groups) = if augments(&options.detector) {
            write_views(&chosen, &options.limits, scratch.path())?
        } else {
            let groups = (0..chosen.len()).collect();
            (chosen.clone(), groups)
        };
        let views_per_image = fitted_on.len() / chosen.len().max(1);
        let tiling = options.tile.resolve(
            &fitted_on,
            options.detector.input_side(options.features.as_ref()),
            &options.limits,
        )?;
        let (mut model, _) = Self::fit_view(
            &fitted_on,
            Some(&groups),
            &options,
            tiling,
            runtime,
            progress,
        )?;
        let info = &mut model.info;
        info.training_images = chosen.len();
        info.training_paths = chosen
            .iter()
            .map(|p| {
                std::fs::canonicalize(p)
                    .unwrap_or_else(|_| p.clone())
                    .display()
                    .to_string()
            })
            .collect();
        // The estimates rest on the images, not on their views.
        info.calibration.normal_images = chosen.len();
        info.calibration.refresh_bound();
        info.few_shot = Some(FewShot {
            shots: chosen.len(),
            views_per_image,
            folds_by_image: chosen.len() >= 2,
        });
        Ok(model)
    }

    /// Fits again, as this model was fitted, on its training images plus
    /// `added_normal` (images a person marked OK); `marked_defective`
    /// (marked NG) are scored by the new model and kept as labelled scores,
    /// so every operating point also states a labelled missed-alarm rate.
    /// The text layer is not carried over (fit it again with `--object`).
    pub fn refit(
        &self,
        added_normal: &[PathBuf],
        marked_defective: &[PathBuf],
        database: &str,
        runtime: &Runtime,
        progress: &dyn Progress,
    ) -> Result<Self, Error> {
        if self.info.training_paths.is_empty() {
            return Err(Error::InvalidConfig(
                "this model file does not list its training images (written before refit \
                 existed); fit it again"
                    .into(),
            ));
        }
        let mut normal: Vec<PathBuf> = self.info.training_paths.iter().map(PathBuf::from).collect();
        for path in added_normal {
            let path = std::fs::canonicalize(path).unwrap_or_else(|_| path.clone());
            if !normal.contains(&path) {
                normal.push(path);
            }
        }
        let calibration = &self.info.calibration;
        let options = FitOptions {
            features: self.info.features.clone(),
            detector: self.info.detector.clone(),
            max_far: calibration.max_far.min(0.999),
            max_mar: match calibration.method {
                ThresholdMethod::MissedAlarmTarget { max_mar } => Some(max_mar),
                _ => None,
            },
            tile: self.info.tile_kept(),
            partner: self.info.partner.as_ref().map(|p| Member {
                features: p.info.features.clone(),
                detector: p.info.detector.clone(),
                pick_best: false,
                tile: Some(p.info.tile_kept()),
            }),
            ..FitOptions::default()
        };
        let mut model = Self::fit(&normal, &options, runtime, progress)?;
        let mut labelled = Vec::with_capacity(marked_defective.len());
        for path in marked_defective {
            let image = load_image(path, &options.limits)?;
            labelled.push(model.inspect_raw(&image)?.score);
        }
        if let Some(scores) = &mut model.info.calibration_scores
            && !labelled.is_empty()
        {
            scores.labelled = vec![(String::new(), kept(&labelled))];
        }
        model.info.tiling_decision = self.info.tiling_decision;
        model.info.detector_choice = self.info.detector_choice.clone();
        model.info.refitted_from = Some(Refit {
            database: database.to_owned(),
            added_normal: added_normal
                .iter()
                .map(|p| p.display().to_string())
                .collect(),
            marked_defective: marked_defective.len(),
        });
        Ok(model)
    }

    /// What states the estimates at any threshold a person chooses; `None`
    /// for uncalibrated models and files without kept scores.
    pub fn estimator(&self) -> Option<Estimator> {
        let scores = self.info.calibration_scores.clone()?;
        self.info.calibration.is_fitted().then(|| Estimator {
            calibration: self.info.calibration.clone(),
            scores,
        })
    }

    /// The scores and estimates a person moves the threshold over
    /// ([`crate::operating_point::CalibrationView`]); `None` when
    /// uncalibrated (zero-shot) or without kept scores.
    pub fn calibration_view(&self) -> Option<crate::operating_point::CalibrationView> {
        self.estimator().map(|e| e.view())
    }

    /// The operating point of a request: the model's own threshold without
    /// a target, else the threshold that meets `target` on the kept
    /// calibration scores (no refit).
    pub fn operating_point(&self, target: Option<Target>) -> Result<OperatingPoint, Error> {
        let calibration = &self.info.calibration;
        if !calibration.is_fitted() {
            return match target {
                None => Ok(OperatingPoint::probability()),
                Some(_) => Err(Error::InvalidConfig(
                    "this model's scores are uncalibrated probabilities (zero-shot): no \
                     false-alarm or missed-alarm target can be met"
                        .into(),
                )),
            };
        }
        match &self.info.calibration_scores {
            Some(scores) => {
                let point = OperatingPoint::new(calibration, scores, target)?;
                Ok(match &self.info.few_shot {
                    Some(few) => restate_for_shots(point, few),
                    None => point,
                })
            }
            None if target.is_none() => Ok(OperatingPoint {
                target: None,
                threshold: DECISION_THRESHOLD,
                raw_threshold: calibration.threshold,
                estimated_false_alarm_rate: calibration.estimated_far,
                false_alarm_upper_bound_95: calibration.far_upper_95,
                normal_images: calibration.normal_images,
                synthetic_missed_alarm_rate: None,
                synthetic_missed_alarm_rates: self
                    .info
                    .missed_alarms
                    .as_ref()
                    .map(|m| m.per_kind.clone())
                    .unwrap_or_default(),
                labelled_missed_alarm_rate: None,
                warning: calibration.holdout_warning(),
            }),
            None => Err(CalibrationError::NoKeptScores.into()),
        }
    }

    /// Adds the text layer: the CLIP embeddings of the normal images (up to
    /// [`TEXT_LAYER_IMAGES`], the first in hash order), so typed defect
    /// descriptions can be checked and calibrated at request time
    /// ([`Model::check_defects`]). CLIP is not fitted on them, so their
    /// scores are exchangeable with new images' without cross-fitting.
    pub fn add_prompt_layer(
        &mut self,
        runtime: &Runtime,
        object: &str,
        normal: &[PathBuf],
        limits: &ImageLimits,
        progress: &dyn Progress,
    ) -> Result<(), Error> {
        if !self.info.detector.is_calibrated() {
            return Err(Error::InvalidConfig(
                "a text layer goes beside a calibrated (classical) detector; WinCLIP models \
                 take their descriptions when fitted"
                    .into(),
            ));
        }
        let chosen = first_by_hash(normal, TEXT_LAYER_IMAGES);
        let layer = PromptLayer::fit(
            runtime,
            object,
            &chosen,
            self.info.calibration.max_far,
            limits,
            progress,
        )?;
        self.info.prompt_layer = Some(layer.info().clone());
        self.text = Some(TextLayer::Ready(layer));
        Ok(())
    }

    /// Checks each typed defect description on `image` with the text layer.
    /// Without one, or without its CLIP weights here, the report says why
    /// instead (the classical verdict still stands).
    pub fn check_defects(
        &self,
        image: &Rgb32FImage,
        descriptions: &[String],
    ) -> Result<DefectReport, Error> {
        self.check_defects_until(image, descriptions, &AtomicBool::new(false))
    }

    /// [`Model::check_defects`], stopped between defects once `stop` is set.
    pub fn check_defects_until(
        &self,
        image: &Rgb32FImage,
        descriptions: &[String],
        stop: &AtomicBool,
    ) -> Result<DefectReport, Error> {
        if descriptions.is_empty() {
            return Ok(DefectReport::default());
        }
        let unchecked = |reason: String| DefectReport {
            checks: Vec::new(),
            unchecked_reason: Some(reason),
        };
        Ok(match &self.text {
            Some(TextLayer::Ready(layer)) => DefectReport {
                checks: layer.check_until(image, descriptions, stop)?,
                unchecked_reason: None,
            },
            Some(TextLayer::Unavailable { reason, .. }) => {
                unchecked(format!("the typed defects could not be checked: {reason}"))
            }
            None => unchecked(
                "the typed defects could not be checked: this model has no text layer (fit it \
                 with --object and CLIP weights to add one)"
                    .into(),
            ),
        })
    }

    /// Makes the text layer ready for `descriptions` ([`PromptLayer::prepare`]);
    /// nothing to do without a usable text layer.
    pub fn prepare_defects(&self, descriptions: &[String]) -> Result<(), Error> {
        match &self.text {
            Some(TextLayer::Ready(layer)) => layer.prepare(descriptions),
            _ => Ok(()),
        }
    }

    fn tensors(&self) -> BTreeMap<String, Tensor> {
        let mut tensors = self.detector.tensors();
        if let Some(whole) = &self.whole {
            tensors.extend(
                whole
                    .tensors()
                    .into_iter()
                    .map(|(name, t)| (format!("{WHOLE_VIEW_PREFIX}{name}"), t)),
            );
        }
        if let Some(partner) = &self.partner {
            tensors.extend(
                partner
                    .tensors()
                    .into_iter()
                    .map(|(name, t)| (format!("{PARTNER_PREFIX}{name}"), t)),
            );
        }
        match &self.text {
            Some(TextLayer::Ready(layer)) => tensors.extend(layer.tensors()),
            Some(TextLayer::Unavailable { tensors: kept, .. }) => {
                tensors.extend(kept.iter().map(|(k, v)| (k.clone(), v.clone())));
            }
            None => {}
        }
        tensors
    }

    /// A WinCLIP model of `object` with defect descriptions `prompts`, from
    /// text alone (no model file, no normal images).
    pub fn zero_shot(runtime: &Runtime, object: &str, prompts: &[String]) -> Result<Self, Error> {
        let options = FitOptions {
            features: None,
            detector: DetectorConfig::WinClip(WinClipConfig::zero_shot(object, prompts)),
            max_far: 0.0,
            tile: TileChoice::Off,
            ..FitOptions::default()
        };
        Self::fit(&[], &options, runtime, &crate::progress::NoProgress)
    }

    pub fn info(&self) -> &ModelInfo {
        &self.info
    }

    /// The detector's name (`patchcore`, `padim`, `flow`, `recon`, `winclip`;
    /// `patchcore+padim` for a pair).
    pub fn detector_name(&self) -> String {
        match &self.info.partner {
            Some(p) => format!("{}+{}", self.info.detector.name(), p.info.detector.name()),
            None => self.info.detector.name().to_owned(),
        }
    }

    /// What the model is, for listings.
    pub fn summary(&self) -> ModelSummary {
        let c = &self.info.calibration;
        let text_layer = self.info.prompt_layer.as_ref().map(|info| {
            let reason = match &self.text {
                Some(TextLayer::Unavailable { reason, .. }) => Some(reason.clone()),
                _ => None,
            };
            TextLayerSummary {
                object: info.object.clone(),
                normal_images: info.normal_images,
                available: reason.is_none(),
                reason,
            }
        });
        let (object, prompts) = match &self.info.detector {
            DetectorConfig::WinClip(w) => (Some(w.object.clone()), w.prompts.clone()),
            _ => (text_layer.as_ref().map(|t| t.object.clone()), Vec::new()),
        };
        ModelSummary {
            detector: self.detector_name().to_owned(),
            backbone: self
                .info
                .detector
                .backbone_label(self.info.features.as_ref()),
            raw_threshold: c.threshold,
            threshold: DECISION_THRESHOLD,
            max_far: c.max_far,
            estimated_false_alarm_rate: c.estimated_far,
            false_alarm_upper_bound_95: c.far_upper_95,
            calibration_images: c.normal_images,
            calibration_procedure: self.info.calibration_procedure(),
            calibration_warning: c.holdout_warning(),
            max_mar: match c.method {
                ThresholdMethod::MissedAlarmTarget { max_mar } => Some(max_mar),
                _ => None,
            },
            synthetic_missed_alarm_rates: self
                .info
                .missed_alarms
                .as_ref()
                .map(|m| m.per_kind.clone())
                .unwrap_or_default(),
            tile_side: self.info.tiling.map(|t| t.side),
            whole_image_view: self.info.whole_view.is_some(),
            tiling_decision: self.info.tiling_decision,
            detector_choice: self.info.detector_choice.clone(),
            training_images: self.info.training_images,
            memory_bank_size: self.info.memory_bank_size,
            object,
            prompts,
            text_layer,
        }
    }

    /// A stable id of what this model computes: the SHA-256 of its metadata
    /// and tensors, for result stores.
    pub fn identity(&self) -> Result<String, Error> {
        let mut hash = Sha256::new();
        hash.update(serde_json::to_vec(&self.info).map_err(ModelFileError::from)?);
        for (name, tensor) in self.tensors() {
            hash.update(name.as_bytes());
            let values = tensor
                .to_dtype(candle_core::DType::F32)?
                .flatten_all()?
                .to_vec1::<f32>()?;
            for v in values {
                hash.update(v.to_le_bytes());
            }
        }
        Ok(format!("{}:{:x}", self.detector_name(), hash.finalize()))
    }

    /// Saves to one model file (atomically).
    pub fn save(&self, path: &Path) -> Result<(), Error> {
        model_file::save(path, &self.info, &self.tensors())?;
        Ok(())
    }

    /// Loads a model file of any detector.
    pub fn load(path: &Path, runtime: &Runtime) -> Result<Self, Error> {
        let (metadata, tensors): (serde_json::Value, _) = model_file::load(path, runtime.device())?;
        let info: ModelInfo = serde_json::from_value(upgrade_metadata(metadata)).map_err(|e| {
            ModelFileError::NotAModel {
                path: path.to_owned(),
                reason: format!("unreadable metadata: {e}"),
            }
        })?;
        Self::from_parts(info, tensors, path, runtime)
    }

    /// The model `info` describes, from its tensors (those of a pair's
    /// second detector are named with [`PARTNER_PREFIX`]).
    fn from_parts(
        mut info: ModelInfo,
        mut tensors: HashMap<String, Tensor>,
        path: &Path,
        runtime: &Runtime,
    ) -> Result<Self, Error> {
        info.calibration.refresh_bound();
        let partner = match &info.partner {
            Some(about) => {
                let own = split_prefixed(&mut tensors, PARTNER_PREFIX);
                Some(Box::new(Self::from_parts(
                    about.info.clone(),
                    own,
                    path,
                    runtime,
                )?))
            }
            None => None,
        };
        let text = match &info.prompt_layer {
            Some(layer) => {
                let kept: BTreeMap<String, Tensor> = PromptLayer::tensor_names()
                    .iter()
                    .map(|name| Ok(((*name).to_owned(), take(&mut tensors, name, path)?)))
                    .collect::<Result<_, Error>>()?;
                Some(match PromptLayer::load(layer, &kept, path, runtime) {
                    Ok(ready) => TextLayer::Ready(ready),
                    // Missing or other CLIP weights disable the text layer,
                    // not the model: the classical verdict still works.
                    Err(e) if e.is_setup_problem() => TextLayer::Unavailable {
                        tensors: kept,
                        reason: e.to_string(),
                    },
                    Err(e) => return Err(e),
                })
            }
            None => None,
        };
        let whole = match info.whole_view {
            Some(_) => {
                let mut own = split_prefixed(&mut tensors, WHOLE_VIEW_PREFIX);
                Some(
                    info.detector
                        .load(info.features.as_ref(), &mut own, path, runtime)?,
                )
            }
            None => None,
        };
        let detector = info
            .detector
            .load(info.features.as_ref(), &mut tensors, path, runtime)?;
        Ok(Self {
            detector,
            whole,
            partner,
            info,
            text,
        })
    }

    /// The raw score and map of one image, before calibration.
    pub fn inspect_raw(&self, image: &Rgb32FImage) -> Result<RawInspection, Error> {
        let first = self.inspect_views(image)?;
        let (Some(partner), Some(about)) = (&self.partner, &self.info.partner) else {
            return Ok(first);
        };
        let second = partner.inspect_raw(image)?;
        let mut map = first.map;
        if map.values.len() != second.map.values.len() {
            return Err(Error::InvalidConfig(format!(
                "the pair's maps differ in size ({} and {} values)",
                map.values.len(),
                second.map.values.len()
            )));
        }
        for (a, b) in map.values.iter_mut().zip(&second.map.values) {
            *a = about.scales.fuse(*a, *b);
        }
        Ok(RawInspection {
            score: about.scales.fuse(first.score, second.score),
            map,
        })
    }

    /// [`Model::inspect_raw`] of this model's own detector: its tiles, and
    /// the whole image beside them where it keeps both views.
    fn inspect_views(&self, image: &Rgb32FImage) -> Result<RawInspection, Error> {
        let tiled = self
            .detector
            .inspect_tiled(self.info.tiling.as_ref(), image)?;
        let (Some(whole), Some(scales)) = (&self.whole, &self.info.whole_view) else {
            return Ok(tiled);
        };
        let whole = whole.inspect_raw(image)?;
        let mut map = tiled.map;
        for (t, w) in map.values.iter_mut().zip(&whole.map.values) {
            *t = scales.fuse(*t, *w);
        }
        Ok(RawInspection {
            score: scales.fuse(tiled.score, whole.score),
            map,
        })
    }

    /// Scores one image at the model's own threshold.
    pub fn inspect(&self, image: &Rgb32FImage) -> Result<Inspection, Error> {
        let point = self.operating_point(None)?;
        self.inspect_with(image, &point, &[])
    }

    /// Scores one image at `point` (from [`Model::operating_point`]).
    pub fn inspect_at(
        &self,
        image: &Rgb32FImage,
        point: &OperatingPoint,
    ) -> Result<Inspection, Error> {
        self.inspect_with(image, point, &[])
    }

    /// The whole answer: the image scored at `point`, each of `defects`
    /// checked by the text layer (or why not), and the layered verdict.
    pub fn inspect_with(
        &self,
        image: &Rgb32FImage,
        point: &OperatingPoint,
        defects: &[String],
    ) -> Result<Inspection, Error> {
        self.inspect_until(image, point, defects, &AtomicBool::new(false))
    }

    /// [`Model::inspect_with`] that gives up with [`Error::Cancelled`] once
    /// `stop` is set, checked between stages and between typed defects (a
    /// server sets it when the request times out, so its slot frees).
    pub fn inspect_until(
        &self,
        image: &Rgb32FImage,
        point: &OperatingPoint,
        defects: &[String],
        stop: &AtomicBool,
    ) -> Result<Inspection, Error> {
        // Inside the thread pool: called from outside it (a request's
        // thread, the CLI's main thread), each parallel layer would wake the
        // pool and wait for it; this way the image is handed over once.
        rayon::scope(|_| self.inspect_in_pool(image, point, defects, stop))
    }

    fn inspect_in_pool(
        &self,
        image: &Rgb32FImage,
        point: &OperatingPoint,
        defects: &[String],
        stop: &AtomicBool,
    ) -> Result<Inspection, Error> {
        if stop.load(Ordering::Relaxed) {
            return Err(Error::Cancelled);
        }
        let raw = self.inspect_raw(image)?;
        let calibration = &self.info.calibration;
        let score = calibration.normalise(raw.score);
        // In place: the raw map is not needed after (160 MB at 40 MP).
        let map = AnomalyMap {
            width: raw.map.width,
            height: raw.map.height,
            values: raw
                .map
                .values
                .into_iter()
                .map(|v| calibration.normalise(v))
                .collect(),
        };
        // The raw score decides where it can: two raw scores may round to
        // one f32.
        let model_is_anomalous = if calibration.is_fitted() {
            point.flags(raw.score)
        } else {
            Verdict::at(score, point.threshold).is_anomalous()
        };
        let mut inspection =
            Inspection::of_map(score, raw.score, model_is_anomalous, map, point.clone());
        let report = self.check_defects_until(image, defects, stop)?;
        inspection.flagged_by = flagged_by(
            model_is_anomalous,
            report
                .checks
                .iter()
                .map(|d| (d.is_anomalous, d.description.as_str())),
        );
        inspection.is_anomalous = !inspection.flagged_by.is_empty();
        inspection.defects = report.checks;
        inspection.defects_unchecked = report.unchecked_reason;
        Ok(inspection)
    }
}

impl Inspection {
    /// The answer for a 0–1 `score` and `map` judged at `point` (the model
    /// flags the image when `model_is_anomalous`), no typed defects: what
    /// [`Model::inspect_with`] starts from, and what an engine that scores
    /// by other means returns.
    pub fn of_map(
        score: f32,
        raw_score: f32,
        model_is_anomalous: bool,
        map: AnomalyMap,
        point: OperatingPoint,
    ) -> Self {
        let threshold = point.threshold;
        let anomalous_pixels = area_above(&map, threshold);
        let total = (map.width * map.height).max(1);
        Self {
            score,
            raw_score,
            is_anomalous: model_is_anomalous,
            threshold,
            model_is_anomalous,
            flagged_by: flagged_by(model_is_anomalous, []),
            defects: Vec::new(),
            defects_unchecked: None,
            operating_point: point,
            width: map.width,
            height: map.height,
            regions: regions(&map, threshold),
            anomalous_fraction: anomalous_pixels as f64 / total as f64,
            anomalous_pixels,
            hotspot: hotspot(&map),
            map,
        }
    }
}

/// Metadata of files written before WinCLIP became a detector like the
/// others: its object, prompts, checkpoint and shots sat beside `detector`.
/// Tensor names of the whole-image view kept beside tiles start with this.
const WHOLE_VIEW_PREFIX: &str = "whole_view.";
/// Tensor names of a pair's second detector start with this.
const PARTNER_PREFIX: &str = "partner.";

/// Takes the tensors named `prefix…` out of `tensors`, the prefix removed.
fn split_prefixed(tensors: &mut HashMap<String, Tensor>, prefix: &str) -> HashMap<String, Tensor> {
    let names: Vec<String> = tensors
        .keys()
        .filter(|k| k.starts_with(prefix))
        .cloned()
        .collect();
    names
        .into_iter()
        .filter_map(|name| {
            let t = tensors.remove(&name)?;
            Some((name[prefix.len()..].to_owned(), t))
        })
        .collect()
}

/// The out-of-fold scores of two views (or two detectors) of the same
/// images and synthetic defects, fused image by image; the procedure named
/// is the first's.
fn fuse_out(fuse: impl Fn(f32, f32) -> f32, first: &OutOfFold, second: &OutOfFold) -> OutOfFold {
    let pairs = |a: &[f32], b: &[f32]| a.iter().zip(b).map(|(x, y)| fuse(*x, *y)).collect();
    OutOfFold {
        normal: pairs(&first.normal, &second.normal),
        synthetic: first
            .synthetic
            .iter()
            .zip(&second.synthetic)
            .map(|((kind, a), (_, b))| (*kind, pairs(a, b)))
            .collect(),
        procedure: first.procedure,
        folds: first.folds,
    }
}

/// Raw scores of the labelled anomalies given to `fit`.
fn score_anomalies(
    options: &FitOptions,
    progress: &dyn Progress,
    score: impl Fn(&Rgb32FImage) -> Result<f32, Error>,
) -> Result<Vec<f32>, Error> {
    progress.start("calibration (anomalous)", options.anomalies.len() as u64);
    let mut scores = Vec::with_capacity(options.anomalies.len());
    for path in &options.anomalies {
        let image = load_image(path, &options.limits)?;
        scores.push(score(&image)?);
        progress.advance(1);
    }
    progress.finish();
    Ok(scores)
}

/// The threshold, the missed-alarm estimate and the kept scores from
/// out-of-fold scores (and labelled anomalies' scores).
fn calibrate(
    out: &OutOfFold,
    anomalous: &[f32],
    options: &FitOptions,
) -> Result<(Calibration, MissedAlarmEstimate, CalibrationScores), Error> {
    let calibration = match options.max_mar {
        Some(max_mar) => {
            if !anomalous.is_empty() {
                return Err(Error::InvalidConfig(
                    "a missed-alarm target and labelled anomalies cannot both set the threshold"
                        .into(),
                ));
            }
            let pooled: Vec<f32> = out
                .synthetic
                .iter()
                .flat_map(|(_, s)| s.iter().copied())
                .collect();
            Calibration::from_missed_alarm_target(&out.normal, &pooled, max_mar)?
        }
        None => Calibration::from_labelled_scores(&out.normal, anomalous, options.max_far)?,
    };
    let missed = MissedAlarmEstimate::measure(&out.synthetic, |s| calibration.is_anomalous(s));
    let scores = CalibrationScores {
        procedure: out.procedure,
        folds: out.folds,
        normal: kept(&out.normal),
        normal_images: out.normal.len(),
        synthetic: kept_synthetic(&out.synthetic),
        labelled: Vec::new(),
    };
    Ok((calibration, missed, scores))
}

fn upgrade_metadata(mut metadata: serde_json::Value) -> serde_json::Value {
    let is_old_winclip = metadata.pointer("/detector/kind").and_then(|k| k.as_str())
        == Some("winclip")
        && metadata.get("object").is_some();
    if is_old_winclip && let Some(top) = metadata.as_object_mut() {
        let moved: Vec<(String, serde_json::Value)> = ["object", "prompts", "clip", "shot_images"]
            .iter()
            .filter_map(|k| top.remove(*k).map(|v| ((*k).to_owned(), v)))
            .collect();
        if let Some(detector) = top.get_mut("detector").and_then(|d| d.as_object_mut()) {
            detector.extend(moved);
        }
    }
    // Files written before the rational score map stored `low` (the raw
    // score at 0) instead of `spread`; the old map's spread below the
    // threshold was `threshold − low`.
    if let Some(c) = metadata
        .get_mut("calibration")
        .and_then(|c| c.as_object_mut())
        && !c.contains_key("spread")
    {
        let number = |k: &str| c.get(k).and_then(serde_json::Value::as_f64);
        if let (Some(t), Some(low)) = (number("threshold"), number("low")) {
            c.insert("spread".into(), serde_json::json!((t - low).max(1e-6)));
        }
    }
    metadata
}

/// Normal images the text layer embeds at most: enough to confirm a 1 %
/// false-alarm limit (299), while a CLIP forward costs about a second each
/// on a laptop CPU.
pub const TEXT_LAYER_IMAGES: usize = 300;

/// The first `n` of `paths` in the order of a stable hash of their file
/// names (a subset that does not depend on the folder or listing order).
pub fn first_by_hash(paths: &[PathBuf], n: usize) -> Vec<PathBuf> {
    hash_order(paths)
        .into_iter()
        .take(n)
        .map(|i| paths[i].clone())
        .collect()
}

/// What a `refit` added to a model.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Refit {
    /// The results database the decisions came from.
    pub database: String,
    /// Images marked OK that the model had flagged, now among the normal
    /// images.
    pub added_normal: Vec<String>,
    /// Images marked NG: their scores give the labelled missed-alarm rate.
    pub marked_defective: usize,
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The first four demo solar cells (by name), for small fits.
    fn four_demo_cells() -> Vec<PathBuf> {
        let demo = Path::new(env!("CARGO_MANIFEST_DIR")).join("../demo/solar_cell/train/good");
        let mut cells: Vec<PathBuf> = std::fs::read_dir(demo)
            .unwrap()
            .map(|e| e.unwrap().path())
            .collect();
        cells.sort();
        cells.truncate(4);
        cells
    }

    /// One-scale PatchCore on `features`, half the images held back.
    fn small_patchcore(features: FeatureConfig) -> FitOptions {
        FitOptions {
            features: Some(features),
            detector: DetectorConfig::PatchCore(PatchCoreConfig {
                coarse_side: None,
                ..Default::default()
            }),
            tile: TileChoice::Off,
            ..FitOptions::default()
        }
    }

    #[test]
    fn the_text_layer_subset_is_stable() {
        let paths: Vec<PathBuf> = (0..50).map(|i| PathBuf::from(format!("{i}.png"))).collect();
        let first = first_by_hash(&paths, 5);
        assert_eq!(first.len(), 5);
        let mut reversed = paths.clone();
        reversed.reverse();
        assert_eq!(first, first_by_hash(&reversed, 5));
        assert_eq!(first_by_hash(&paths, 100).len(), 50);
    }

    #[test]
    fn old_winclip_metadata_moves_under_detector() {
        let old = serde_json::json!({
            "detector": {"kind": "winclip", "shots": 0},
            "object": "nut", "prompts": ["a scratch"], "shot_images": [],
            "calibration": {}
        });
        let new = upgrade_metadata(old);
        assert_eq!(
            new.pointer("/detector/object"),
            Some(&serde_json::json!("nut"))
        );
        assert!(new.get("object").is_none());
    }

    #[test]
    fn files_written_before_the_rational_map_and_tiling_still_load() {
        use crate::features::{Resize, parse_stage};
        let cells = four_demo_cells();
        let options = small_patchcore(FeatureConfig {
            backbone: crate::features::BackboneKind::Lite0,
            stages: vec![
                parse_stage("stage4").unwrap(),
                parse_stage("stage5").unwrap(),
            ],
            resize: Resize::KeepAspect { side: 64 },
            weights: None,
            layers: Vec::new(),
            precision: Default::default(),
        });
        let runtime = Runtime::new(candle_core::Device::Cpu);
        let model = Model::fit(&cells, &options, &runtime, &crate::progress::NoProgress).unwrap();
        // The metadata as the previous release wrote it.
        let mut old = serde_json::to_value(model.info()).unwrap();
        let threshold = model.info().calibration.threshold;
        let top = old.as_object_mut().unwrap();
        top.remove("missed_alarms");
        top.remove("calibration_scores");
        top.remove("training_paths");
        let c = top["calibration"].as_object_mut().unwrap();
        c.remove("spread");
        c.remove("far_upper_95");
        c.insert("low".into(), serde_json::json!(threshold - 2.0));
        c.insert("high".into(), serde_json::json!(threshold + 3.0));
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("old.flawscope");
        model_file::save(&path, &old, &model.detector.tensors()).unwrap();

        let back = Model::load(&path, &runtime).unwrap();
        let c = &back.info().calibration;
        assert!((c.spread - 2.0).abs() < 1e-4, "{c:?}");
        assert!((c.far_upper_95 - crate::calibration::upper_bound_95(0, 4)).abs() < 1e-12);
        assert!(back.operating_point(None).is_ok());
        assert!(back.operating_point(Some(Target::MaxFar(0.1))).is_err());
        assert!(back.info().missed_alarms.is_none() && back.info().tiling.is_none());
        assert_eq!(c.normalise(threshold), 0.5);
        let image = load_image(&cells[0], &ImageLimits::default()).unwrap();
        let fresh = model.inspect(&image).unwrap();
        let loaded = back.inspect(&image).unwrap();
        assert_eq!(fresh.raw_score, loaded.raw_score);
        assert_eq!(fresh.is_anomalous, loaded.is_anomalous);
    }

    /// Lite0 `stages` at 64 × 64: features small enough for many fits.
    fn tiny_features(stages: &[&str]) -> FeatureConfig {
        use crate::features::{BackboneKind, Resize, parse_stage};
        FeatureConfig {
            backbone: BackboneKind::Lite0,
            stages: stages.iter().map(|s| parse_stage(s).unwrap()).collect(),
            resize: Resize::Fixed {
                width: 64,
                height: 64,
            },
            weights: None,
            layers: Vec::new(),
            precision: Default::default(),
        }
    }

    /// A demo cell with a white 40-px square: a defect every model flags.
    fn cell_with_white_square(cell: &Path) -> Rgb32FImage {
        let mut image = load_image(cell, &ImageLimits::default()).unwrap();
        for y in 100..140 {
            for x in 100..140 {
                image.put_pixel(x, y, image::Rgb([1.0, 1.0, 1.0]));
            }
        }
        image
    }

    /// `model` saved and loaded back, and refitted with nothing added;
    /// both must score `image` as `model` does.
    fn saved_and_refitted(model: &Model, image: &Rgb32FImage, runtime: &Runtime) -> (Model, Model) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("model.flawscope");
        model.save(&path).unwrap();
        let back = Model::load(&path, runtime).unwrap();
        let raw = model.inspect_raw(image).unwrap().score;
        assert_eq!(back.inspect_raw(image).unwrap().score, raw);
        assert_eq!(
            back.inspect(image).unwrap().score,
            model.inspect(image).unwrap().score
        );
        let again = back
            .refit(
                &[],
                &[],
                "decisions.db",
                runtime,
                &crate::progress::NoProgress,
            )
            .unwrap();
        assert_eq!(again.inspect_raw(image).unwrap().score, raw);
        (back, again)
    }

    #[test]
    fn a_whole_image_view_beside_tiles_scores_the_mean_of_the_two_and_survives_a_save() {
        let cells = four_demo_cells();
        let features = tiny_features(&["stage4"]);
        let runtime = Runtime::new(candle_core::Device::Cpu);
        let fit = |tile| {
            let options = FitOptions {
                tile,
                ..small_patchcore(features.clone())
            };
            Model::fit(&cells, &options, &runtime, &crate::progress::NoProgress).unwrap()
        };
        let both = fit(TileChoice::SideAndWhole(160));
        let tiles = fit(TileChoice::Side(160));
        let whole = fit(TileChoice::Off);
        let scales = both.info().whole_view.expect("a whole view");
        assert_eq!(both.info().tiling, Some(Tiling { side: 160 }));
        assert_eq!(scales.tiles, Scale::of(&tiles.info().calibration));
        assert_eq!(scales.whole, Scale::of(&whole.info().calibration));

        // A bright square: its score is the mean of the views' scaled ones.
        let image = cell_with_white_square(&cells[0]);
        let (t, w) = (
            tiles.inspect_raw(&image).unwrap(),
            whole.inspect_raw(&image).unwrap(),
        );
        let fused = both.inspect_raw(&image).unwrap();
        assert_eq!(fused.score, scales.fuse(t.score, w.score));
        assert_eq!(
            fused.map.values[120 * 300 + 120],
            scales.fuse(t.map.values[120 * 300 + 120], w.map.values[120 * 300 + 120])
        );
        assert_eq!(
            both.info().memory_bank_size,
            Some(tiles.info().memory_bank_size.unwrap() + whole.info().memory_bank_size.unwrap())
        );

        // Saved, loaded and refitted, it keeps both views.
        let (back, again) = saved_and_refitted(&both, &image, &runtime);
        assert_eq!(back.info().whole_view, Some(scales));
        assert_eq!(again.info().whole_view, Some(scales));
    }

    #[test]
    fn a_pair_scores_the_mean_of_its_detectors_scaled_scores_and_survives_a_save() {
        use crate::detectors::padim::PadimConfig;
        let cells = four_demo_cells();
        let features = tiny_features;
        let padim_member = || Member {
            features: Some(features(&["stage3", "stage4"])),
            detector: DetectorConfig::Padim(PadimConfig {
                channels: 20,
                ..Default::default()
            }),
            pick_best: false,
            tile: None,
        };
        let padim = padim_member();
        let runtime = Runtime::new(candle_core::Device::Cpu);
        let fit = |options: FitOptions| {
            Model::fit(&cells, &options, &runtime, &crate::progress::NoProgress).unwrap()
        };
        let first = fit(small_patchcore(features(&["stage4"])));
        let second = fit(FitOptions {
            features: padim.features.clone(),
            detector: padim.detector.clone(),
            tile: TileChoice::Off,
            ..FitOptions::default()
        });
        let pair = fit(FitOptions {
            partner: Some(padim.clone()),
            ..small_patchcore(features(&["stage4"]))
        });
        let about = pair.info().partner.as_deref().expect("a partner");
        assert_eq!(about.scales.first, Scale::of(&first.info().calibration));
        assert_eq!(about.scales.second, Scale::of(&second.info().calibration));
        assert_eq!(pair.detector_name(), "patchcore+padim");
        assert_eq!(pair.summary().detector, "patchcore+padim");
        let procedure = pair.summary().calibration_procedure.unwrap();
        assert!(
            procedure.starts_with("patchcore: ") && procedure.contains("; padim: "),
            "{procedure}"
        );

        // A bright square: the pair's score and map are the mean of the two
        // detectors' scaled ones, and the pair has its own threshold.
        let image = cell_with_white_square(&cells[0]);
        let (a, b) = (
            first.inspect_raw(&image).unwrap(),
            second.inspect_raw(&image).unwrap(),
        );
        let fused = pair.inspect_raw(&image).unwrap();
        assert_eq!(fused.score, about.scales.fuse(a.score, b.score));
        let at = 120 * 300 + 120;
        assert_eq!(
            fused.map.values[at],
            about.scales.fuse(a.map.values[at], b.map.values[at])
        );
        assert!(
            fused.score > 0.0,
            "a white square is above the pair's threshold: {fused:?}"
        );
        assert_ne!(pair.info().calibration, first.info().calibration);
        assert_eq!(pair.info().calibration.normal_images, cells.len());

        // Saved, loaded and refitted, it stays a pair; few shots are refused.
        let (back, again) = saved_and_refitted(&pair, &image, &runtime);
        assert_eq!(
            back.info().partner.as_ref().map(|p| p.scales),
            Some(about.scales)
        );
        assert_eq!(back.detector_name(), "patchcore+padim");
        assert_eq!(again.detector_name(), "patchcore+padim");
        let shots = FitOptions {
            partner: Some(padim),
            ..small_patchcore(features(&["stage4"]))
        };
        let refused = Model::fit_shots(&cells, 2, &shots, &runtime, &crate::progress::NoProgress);
        assert!(refused.is_err());

        // Picking the best keeps one of the three as it is, with the evidence.
        let picked = fit(FitOptions {
            partner: Some(Member {
                pick_best: true,
                ..padim_member()
            }),
            ..small_patchcore(features(&["stage4"]))
        });
        let choice = picked.info().detector_choice.clone().expect("a choice");
        let names: Vec<&str> = choice.candidates.iter().map(|(n, _)| n.as_str()).collect();
        assert_eq!(names, ["patchcore", "padim", "patchcore+padim"]);
        let (kept, expected) = match choice.kept {
            Kept::First => ("patchcore", a.score),
            Kept::Second => ("padim", b.score),
            Kept::Pair => ("patchcore+padim", fused.score),
        };
        assert_eq!(picked.detector_name(), kept);
        assert_eq!(picked.inspect_raw(&image).unwrap().score, expected);
        assert_eq!(choice.evidence, Evidence::SyntheticMissed);
        // With a missed-alarm target, the normal images flagged decide.
        let by_far = fit(FitOptions {
            partner: Some(Member {
                pick_best: true,
                ..padim_member()
            }),
            max_mar: Some(0.5),
            ..small_patchcore(features(&["stage4"]))
        });
        let choice = by_far.info().detector_choice.clone().expect("a choice");
        assert_eq!(choice.evidence, Evidence::NormalFlagged);
        assert_eq!(choice.candidates.len(), 3);

        // Each detector keeps its own tiling, through a refit too.
        let mixed = fit(FitOptions {
            tile: TileChoice::Side(160),
            partner: Some(Member {
                tile: Some(TileChoice::Off),
                ..padim_member()
            }),
            ..small_patchcore(features(&["stage4"]))
        });
        let tilings = |m: &Model| {
            let second = m.info().partner.as_ref().map(|p| p.info.tiling);
            (m.info().tiling, second)
        };
        assert_eq!(tilings(&mixed), (Some(Tiling { side: 160 }), Some(None)));
        let (_, again) = saved_and_refitted(&mixed, &image, &runtime);
        assert_eq!(tilings(&again), tilings(&mixed));
    }

    #[test]
    fn a_model_refuses_other_backbone_weights_than_it_was_fitted_with() {
        use crate::features::{BackboneKind, BackboneWeights, Resize, parse_stage};
        use flawscope_models::EfficientNetLite;
        let cells = four_demo_cells();
        // The embedded Lite0 weights, as a file: the path Lite1 and Lite2 take.
        let dir = tempfile::tempdir().unwrap();
        let weights = dir.path().join("lite0.safetensors");
        std::fs::write(&weights, EfficientNetLite::embedded_lite0_bytes()).unwrap();
        let features = |kind, weights: Option<BackboneWeights>| FeatureConfig {
            backbone: kind,
            stages: vec![parse_stage("stage4").unwrap()],
            resize: Resize::Fixed {
                width: 64,
                height: 64,
            },
            weights,
            layers: Vec::new(),
            precision: Default::default(),
        };
        assert!(matches!(
            BackboneWeights::from_file(dir.path()),
            Err(Error::BackboneWeights(m)) if m.contains("not a regular file")
        ));
        let recorded = BackboneWeights::from_file(&weights).unwrap();
        assert_eq!(recorded.sha256.len(), 64);
        let mut options = small_patchcore(features(BackboneKind::Lite0, Some(recorded)));
        let runtime = Runtime::new(candle_core::Device::Cpu);
        let model = Model::fit(&cells, &options, &runtime, &crate::progress::NoProgress).unwrap();
        let path = dir.path().join("m.flawscope");
        model.save(&path).unwrap();
        let image = load_image(&cells[0], &ImageLimits::default()).unwrap();
        let back = Model::load(&path, &runtime).unwrap();
        assert_eq!(
            model.inspect(&image).unwrap().raw_score,
            back.inspect(&image).unwrap().raw_score
        );

        // Other bytes at the recorded path: refused, naming both hashes.
        let mut other = EfficientNetLite::embedded_lite0_bytes().to_vec();
        let last = other.len() - 1;
        other[last] ^= 1;
        std::fs::write(&weights, &other).unwrap();
        let err = Model::load(&path, &runtime).unwrap_err();
        assert!(matches!(err, Error::BackboneWeights(_)), "{err}");
        assert!(err.is_setup_problem());
        assert!(err.to_string().contains("SHA-256"), "{err}");
        std::fs::remove_file(&weights).unwrap();
        let err = Model::load(&path, &runtime).unwrap_err();
        assert!(
            matches!(&err, Error::BackboneWeights(m) if m.contains("cannot read")),
            "{err}"
        );

        // A Lite0 file given as Lite1, or Lite1 without a file: clear errors.
        std::fs::write(&weights, EfficientNetLite::embedded_lite0_bytes()).unwrap();
        options.features = Some(features(
            BackboneKind::Lite1,
            Some(BackboneWeights::from_file(&weights).unwrap()),
        ));
        let err = Model::fit(&cells, &options, &runtime, &crate::progress::NoProgress)
            .err()
            .unwrap();
        assert!(
            matches!(&err, Error::BackboneWeights(m) if m.contains("lite1")),
            "{err}"
        );
        options.features = Some(features(BackboneKind::Lite1, None));
        let err = Model::fit(&cells, &options, &runtime, &crate::progress::NoProgress)
            .err()
            .unwrap();
        assert!(
            matches!(&err, Error::BackboneWeights(m) if m.contains("needs a weight file")),
            "{err}"
        );
    }

    #[test]
    fn old_calibration_gets_a_spread() {
        let old =
            serde_json::json!({"calibration": {"low": 10.0, "threshold": 30.0, "high": 40.0}});
        let new = upgrade_metadata(old);
        assert_eq!(
            new.pointer("/calibration/spread"),
            Some(&serde_json::json!(20.0))
        );
    }
}
