//! The text layer of a model file: free-text defect descriptions checked
//! with CLIP (WinCLIP's zero-shot score), each calibrated at request time on
//! the model's held-back normal images.
//!
//! At fit time the layer stores the object name and the unit CLIP image
//! embeddings of the held-back normal images. A request's description gets
//! its own class vectors (WinCLIP's normal sentences against the
//! description's 21 sentences); the stored embeddings then give the normal
//! images' anomalous probabilities for that description, a few dot
//! products, and so its threshold at the model's false-alarm target and
//! that target's estimate and 95 % bound. The image's own score is WinCLIP's
//! zero-shot image score; its windows give where the description fits best.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use candle_core::Tensor;
use flawscope_prompts::PromptSet;
use image::Rgb32FImage;
use serde::{Deserialize, Serialize};

use crate::Error;
use crate::calibration::{Calibration, DECISION_THRESHOLD};
use crate::images::{ImageLimits, load_image};
use crate::progress::Progress;
use crate::runtime::Runtime;
use crate::verdict::Verdict;
use crate::winclip::scoring::{probabilities, unit_rows, zero_shot};
use crate::winclip::{
    ClipCheckpoint, DEFAULT_LOGIT_SCALE, DEFAULT_SCALES, WinClip, checked_object,
};

const NORMAL_TENSOR: &str = "prompt_layer.normal";

/// What a model file says of its text layer.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PromptLayerInfo {
    /// The object as the sentences name it ("metal nut").
    pub object: String,
    /// The CLIP weights the normal embeddings were made with.
    pub clip: ClipCheckpoint,
    /// `s` of WinCLIP's two-class softmax.
    pub logit_scale: f32,
    /// Held-back normal images whose embeddings are stored.
    pub normal_images: usize,
    /// The false-alarm target each description's threshold is set for.
    pub max_far: f64,
}

/// One typed defect, checked on one image.
/// Also what a results store keeps: rows written before it held every
/// field read the missing ones as 0 (their bound as 1).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct DefectCheck {
    /// The description as typed.
    pub description: String,
    /// 0–1, anomalous at 0.5 (calibrated like the model's own score).
    pub score: f32,
    /// WinCLIP's zero-shot probability for this description.
    #[serde(default)]
    pub probability: f32,
    /// The probability at which this description's threshold lies.
    #[serde(default)]
    pub raw_threshold: f32,
    pub is_anomalous: bool,
    /// Share of the normal images over the threshold.
    pub estimated_false_alarm_rate: f64,
    /// One-sided 95 % upper bound of that rate.
    #[serde(default = "one")]
    pub false_alarm_upper_bound_95: f64,
    /// How many normal images set the threshold.
    #[serde(default)]
    pub normal_images: usize,
    /// Where in the image (pixels) the description fits best.
    #[serde(default)]
    pub location: (u32, u32),
}

fn one() -> f64 {
    1.0
}

/// The text layer: CLIP plus the normal images' embeddings.
pub struct PromptLayer {
    info: PromptLayerInfo,
    engine: Arc<WinClip>,
    /// `[normal_images, D]`, unit rows.
    normal: Tensor,
}

impl std::fmt::Debug for PromptLayer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PromptLayer")
            .field("info", &self.info)
            .finish_non_exhaustive()
    }
}

impl PromptLayer {
    /// Embeds the held-back normal images `held_back` with the runtime's CLIP.
    pub fn fit(
        runtime: &Runtime,
        object: &str,
        held_back: &[PathBuf],
        max_far: f64,
        limits: &ImageLimits,
        progress: &dyn Progress,
    ) -> Result<Self, Error> {
        let object = checked_object(object)?;
        if held_back.is_empty() {
            return Err(Error::InvalidConfig(
                "the text layer needs held-back normal images to calibrate on".into(),
            ));
        }
        let engine = runtime.clip()?;
        progress.start("text layer (CLIP embeddings)", held_back.len() as u64);
        let mut rows = Vec::with_capacity(held_back.len());
        for path in held_back {
            let image = load_image(path, limits)?;
            rows.push(engine.image_embedding(&image)?);
            progress.advance(1);
        }
        progress.finish();
        let normal = unit_rows(&Tensor::cat(&rows, 0)?)?;
        Ok(Self {
            info: PromptLayerInfo {
                object,
                clip: engine.checkpoint().clone(),
                logit_scale: DEFAULT_LOGIT_SCALE,
                normal_images: held_back.len(),
                max_far,
            },
            engine,
            normal,
        })
    }

    /// Rebuilds the layer from a model file; the CLIP weights are found
    /// through `runtime` and must be the ones it was made with.
    pub fn load(
        info: &PromptLayerInfo,
        tensors: &BTreeMap<String, Tensor>,
        path: &Path,
        runtime: &Runtime,
    ) -> Result<Self, Error> {
        let normal = tensors.get(NORMAL_TENSOR).cloned().ok_or_else(|| {
            Error::InvalidConfig(format!("{}: no {NORMAL_TENSOR}", path.display()))
        })?;
        let engine = runtime.clip_for(&info.clip, path)?;
        let dim = engine.clip().embed_dim();
        if normal.dims() != [info.normal_images, dim] {
            return Err(Error::InvalidConfig(format!(
                "{}: the text layer's embeddings are {:?}, expected [{}, {dim}]",
                path.display(),
                normal.dims(),
                info.normal_images
            )));
        }
        Ok(Self {
            info: info.clone(),
            engine,
            normal,
        })
    }

    pub fn info(&self) -> &PromptLayerInfo {
        &self.info
    }

    /// Names of the tensors a model file stores for the layer.
    pub fn tensor_names() -> &'static [&'static str] {
        &[NORMAL_TENSOR]
    }

    /// The tensors a model file stores for the layer.
    pub fn tensors(&self) -> BTreeMap<String, Tensor> {
        BTreeMap::from([(NORMAL_TENSOR.to_owned(), self.normal.clone())])
    }

    /// Checks each description on `image`.
    /// Reads each description as [`PromptLayer::check`] will (an empty one
    /// or one over the tokenizer's limit is refused) and encodes its
    /// sentences, so a batch finds a bad description before its first
    /// image, and its text is cached.
    pub fn prepare(&self, descriptions: &[String]) -> Result<(), Error> {
        for description in descriptions {
            let prompts = PromptSet::winclip_normal().with_defect(description)?;
            self.engine.class_vectors(&self.info.object, &prompts)?;
        }
        Ok(())
    }

    pub fn check(
        &self,
        image: &Rgb32FImage,
        descriptions: &[String],
    ) -> Result<Vec<DefectCheck>, Error> {
        self.check_until(image, descriptions, &AtomicBool::new(false))
    }

    /// [`PromptLayer::check`] that stops with [`Error::Cancelled`] before
    /// the next description once `stop` is set.
    pub fn check_until(
        &self,
        image: &Rgb32FImage,
        descriptions: &[String],
        stop: &AtomicBool,
    ) -> Result<Vec<DefectCheck>, Error> {
        if descriptions.is_empty() {
            return Ok(Vec::new());
        }
        let embedded = self.engine.embed(image, &DEFAULT_SCALES, None)?;
        let scale = self.info.logit_scale;
        let mut checks = Vec::with_capacity(descriptions.len());
        for description in descriptions {
            if stop.load(Ordering::Relaxed) {
                return Err(Error::Cancelled);
            }
            let prompts = PromptSet::winclip_normal().with_defect(description)?;
            let vectors = self.engine.class_vectors(&self.info.object, &prompts)?;
            let text = self.engine.text_tensor(&vectors)?;
            let normal: Vec<f32> = probabilities(&self.normal, &text, scale)?
                .iter()
                .map(|&p| p as f32)
                .collect();
            let calibration = Calibration::from_normal_scores(&normal, self.info.max_far)?;
            let (probability, grid) = zero_shot(&embedded, &text, scale)?;
            let best = grid
                .iter()
                .enumerate()
                .max_by(|a, b| a.1.total_cmp(b.1))
                .map_or(0, |(i, _)| i);
            let (row, col) = (best / embedded.cols, best % embedded.cols);
            // The image is stretched onto the square CLIP input: a grid cell's
            // centre maps back proportionally on each axis.
            let at = |cell: usize, cells: usize, side: u32| {
                (((cell as f64 + 0.5) / cells as f64) * f64::from(side)) as u32
            };
            let score = calibration.normalise(probability as f32);
            checks.push(DefectCheck {
                description: description.clone(),
                score,
                probability: probability as f32,
                raw_threshold: calibration.threshold,
                is_anomalous: Verdict::at(score, DECISION_THRESHOLD).is_anomalous(),
                estimated_false_alarm_rate: calibration.estimated_far,
                false_alarm_upper_bound_95: calibration.far_upper_95,
                normal_images: calibration.normal_images,
                location: (
                    at(col, embedded.cols, image.width()),
                    at(row, embedded.rows, image.height()),
                ),
            });
        }
        Ok(checks)
    }
}
