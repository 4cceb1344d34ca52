//! Decoding and scoring off the async runtime: decoding on a few threads of
//! its own before an inference slot is taken (a bad image is refused
//! whatever the load), scoring in `spawn_blocking` while one is held.

use std::sync::Arc;

use axum::body::Bytes;
use base64::Engine as _;
use flawscope_core::anomaly_map::AnomalyMap;
use flawscope_core::heatmap::{Legend, overlay_png};
use flawscope_core::images::decode_image;
use flawscope_core::model::{DefectReport, Inspection, Model};
use flawscope_core::operating_point::{OperatingPoint, Target};
use flawscope_core::prompt_layer::DefectCheck;
use flawscope_core::regions::{Region, area_above, regions};
use flawscope_core::verdict::layered;
use image::Rgb32FImage;
use serde::Serialize;

use crate::answer::{describe, describe_defect};
use crate::error::ApiError;
use crate::state::{AppState, Slot};

/// What a caller wants besides the verdict.
#[derive(Debug, Clone, Copy, Default)]
pub struct Extras {
    pub heatmap_png: bool,
    pub map: bool,
    /// The request's operating point (`max_far` / `max_mar`); the model's
    /// own threshold when `None`.
    pub target: Option<Target>,
}

/// A scored image.
#[derive(Debug, Clone)]
pub struct Scored {
    pub score: f32,
    pub is_anomalous: bool,
    pub threshold: f32,
    pub width: usize,
    pub height: usize,
    pub regions: Vec<Region>,
    /// Map pixels at or above the threshold (all regions, not only the
    /// listed ones).
    pub anomalous_pixels: usize,
    /// Where the map peaks, `(x, y)`.
    pub hotspot: (usize, usize),
    /// Base64 overlay PNG, when asked for.
    pub heatmap_png: Option<String>,
    /// The calibrated map, when asked for.
    pub map: Option<AnomalyMap>,
    /// The threshold used and its estimates (absent for zero-shot engines'
    /// answers, whose scores are uncalibrated probabilities).
    pub operating_point: Option<OperatingPoint>,
}

/// The JSON result of scoring one image with a model.
#[derive(Debug, Serialize)]
pub struct ScoreResponse {
    pub model: String,
    pub score: f32,
    pub is_anomalous: bool,
    pub threshold: f32,
    /// The threshold used and what it costs: estimated false-alarm rate
    /// with its bound, missed-alarm rates on synthetic (and, after a
    /// refit, marked) defects.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub operating_point: Option<OperatingPoint>,
    pub width: usize,
    pub height: usize,
    pub regions: Vec<Region>,
    /// Fraction of the image at or above the threshold, 0–1.
    pub anomalous_fraction: f64,
    pub latency_ms: f64,
    /// The verdict in a sentence: where the anomaly is and how large.
    pub answer: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub heatmap_png: Option<String>,
    /// Zero-shot requests: the object and defect descriptions scored.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub object: Option<String>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub prompts: Vec<String>,
    /// With typed defects on a model (`prompt` fields): the model's own
    /// verdict, while `is_anomalous` is then any layer's
    /// ([`flawscope_core::verdict::layered`]).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub model_is_anomalous: Option<bool>,
    /// With typed defects: the layers over their thresholds (`model`, then
    /// each flagged description).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub flagged_by: Option<Vec<String>>,
    /// With typed defects: each one's score, verdict, calibrated threshold,
    /// false-alarm estimate and location.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub defects: Vec<DefectCheck>,
    /// Why the typed defects could not be checked, when they could not.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub defects_unchecked: Option<String>,
}

impl Scored {
    pub fn anomalous_fraction(&self) -> f64 {
        let total = self.width.saturating_mul(self.height);
        if total == 0 {
            0.0
        } else {
            self.anomalous_pixels as f64 / total as f64
        }
    }

    pub fn response(self, model: &str, started: std::time::Instant) -> ScoreResponse {
        let answer = describe(model, &self);
        ScoreResponse {
            answer,
            model: model.to_owned(),
            score: self.score,
            is_anomalous: self.is_anomalous,
            threshold: self.threshold,
            operating_point: self.operating_point.clone(),
            width: self.width,
            height: self.height,
            anomalous_fraction: self.anomalous_fraction(),
            regions: self.regions,
            latency_ms: started.elapsed().as_secs_f64() * 1000.0,
            heatmap_png: self.heatmap_png,
            object: None,
            prompts: Vec::new(),
            model_is_anomalous: None,
            flagged_by: None,
            defects: Vec::new(),
            defects_unchecked: None,
        }
    }

    /// [`Scored::response`] with the typed defects `asked` and what the
    /// model's text layer made of them: the verdict becomes the layered
    /// one, and the answer gains a sentence per defect (or why none could
    /// be checked).
    pub fn layered_response(
        self,
        model: &str,
        started: std::time::Instant,
        asked: Vec<String>,
        report: DefectReport,
    ) -> ScoreResponse {
        let (width, height) = (self.width, self.height);
        let model_is_anomalous = self.is_anomalous;
        let mut response = self.response(model, started);
        let (is_anomalous, flagged_by) = layered(model_is_anomalous, &report.checks);
        for d in &report.checks {
            response.answer.push(' ');
            response.answer.push_str(&describe_defect(d, width, height));
        }
        if let Some(reason) = &report.unchecked_reason {
            // The reason is a sentence's tail ("the typed defects could not
            // be checked: …"); it ends the answer as a sentence of its own.
            let mut chars = reason.chars();
            let first = chars.next().map(|c| c.to_uppercase().to_string());
            response.answer.push_str(&format!(
                " {}{}.",
                first.unwrap_or_default(),
                chars.as_str()
            ));
        }
        response.is_anomalous = is_anomalous;
        response.model_is_anomalous = Some(model_is_anomalous);
        response.flagged_by = Some(flagged_by);
        response.prompts = asked;
        response.defects = report.checks;
        response.defects_unchecked = report.unchecked_reason;
        response
    }
}

/// Runs `work` on the blocking pool; the slot is held until it returns,
/// even when the request that asked for it has timed out.
pub async fn blocking<T, F>(slot: Slot, work: F) -> Result<T, ApiError>
where
    T: Send + 'static,
    F: FnOnce() -> Result<T, ApiError> + Send + 'static,
{
    tokio::task::spawn_blocking(move || {
        let _slot = slot;
        work()
    })
    .await
    .map_err(|join| ApiError::Internal(format!("inference task failed: {join}")))?
}

/// Decodes image bytes within the pixel budget, on the decoding threads and
/// without a slot.
pub async fn decode(state: &AppState, bytes: Bytes) -> Result<Rgb32FImage, ApiError> {
    let limits = state.config().image_limits;
    let (sender, receiver) = tokio::sync::oneshot::channel();
    state.decoders().spawn(move || {
        let decoded = decode_image(&bytes, "the uploaded image", &limits)
            .map_err(|e| ApiError::from_image(&e));
        // Nobody listens when the request has gone meanwhile.
        let _ = sender.send(decoded);
    });
    receiver
        .await
        .map_err(|_| ApiError::Internal("decoding the image failed (panic)".into()))?
}

/// Scores a decoded image with `model`.
pub async fn inspect(
    model: Arc<Model>,
    image: Rgb32FImage,
    extras: Extras,
    slot: Slot,
) -> Result<Scored, ApiError> {
    blocking(slot, move || {
        let point = operating_point(&model, extras.target)?;
        let inspection = model
            .inspect_at(&image, &point)
            .map_err(|e| ApiError::from_core(&e))?;
        scored(&image, inspection, extras, Some(point))
    })
    .await
}

/// [`inspect`], plus each typed defect checked by the model's text layer
/// (or the reason it could not be), on the same slot.
pub async fn inspect_with_defects(
    model: Arc<Model>,
    image: Rgb32FImage,
    extras: Extras,
    asked: Vec<String>,
    slot: Slot,
) -> Result<(Scored, DefectReport), ApiError> {
    blocking(slot, move || {
        let point = operating_point(&model, extras.target)?;
        let inspection = model
            .inspect_at(&image, &point)
            .map_err(|e| ApiError::from_core(&e))?;
        let report = model.check_defects(&image, &asked).map_err(|e| match e {
            // A phrase CLIP cannot read (too long) is the asker's to fix.
            flawscope_core::Error::Prompt(_) => ApiError::bad_request("bad_prompt", e.to_string()),
            other => ApiError::from_core(&other),
        })?;
        Ok((scored(&image, inspection, extras, Some(point))?, report))
    })
    .await
}

/// The model's operating point for a request's target; a target it cannot
/// meet (a zero-shot model, a file without kept scores) is the asker's 400.
fn operating_point(model: &Model, target: Option<Target>) -> Result<OperatingPoint, ApiError> {
    model.operating_point(target).map_err(|e| match e {
        flawscope_core::Error::Calibration(_) | flawscope_core::Error::InvalidConfig(_) => {
            ApiError::bad_request("invalid_operating_point", e.to_string())
        }
        other => ApiError::from_core(&other),
    })
}

/// The response parts of one inspection of `image`.
pub fn scored(
    image: &Rgb32FImage,
    inspection: Inspection,
    extras: Extras,
    operating_point: Option<OperatingPoint>,
) -> Result<Scored, ApiError> {
    let heatmap_png = if extras.heatmap_png {
        let png = overlay_png(image, &inspection.map, &Legend::of(&inspection))
            .map_err(|e| ApiError::from_core(&e))?;
        Some(base64::engine::general_purpose::STANDARD.encode(png))
    } else {
        None
    };
    let map = inspection.map;
    Ok(Scored {
        score: inspection.score,
        is_anomalous: inspection.is_anomalous,
        threshold: inspection.threshold,
        width: map.width,
        height: map.height,
        regions: regions(&map, inspection.threshold),
        anomalous_pixels: area_above(&map, inspection.threshold),
        hotspot: hotspot(&map),
        heatmap_png,
        map: extras.map.then_some(map),
        operating_point,
    })
}

/// Position of the highest map value (the first one on ties; NaN ignored).
pub fn hotspot(map: &AnomalyMap) -> (usize, usize) {
    let mut best = (0, f32::NEG_INFINITY);
    for (i, v) in map.values.iter().enumerate() {
        if *v > best.1 {
            best = (i, *v);
        }
    }
    let width = map.width.max(1);
    (best.0 % width, best.0 / width)
}
