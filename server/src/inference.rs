//! Decoding and scoring off the async runtime: decoding on a few threads of
//! its own before an inference slot is taken (a bad image is refused
//! whatever the load), scoring in `spawn_blocking` while one is held.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use axum::body::Bytes;
use base64::Engine as _;
use flawscope_core::heatmap::{Legend, overlay_png};
use flawscope_core::images::{decode_image, peek_dimensions};
use flawscope_core::model::{Inspection, Model};
use flawscope_core::operating_point::{OperatingPoint, Target};
use image::Rgb32FImage;
use serde::Serialize;

use crate::answer::{UNCHECKED, describe, describe_defect};
use crate::error::ApiError;
use crate::state::{AppState, PixelPermit, Slot};

/// What a caller wants besides the verdict.
#[derive(Debug, Clone, Copy, Default)]
pub struct Extras {
    pub heatmap_png: bool,
    /// The request's operating point (`max_far` / `max_mar`); the model's
    /// own threshold when `None`.
    pub target: Option<Target>,
}

/// A scored image: core's answer plus what the transport adds.
#[derive(Debug, Clone)]
pub struct Scored {
    pub inspection: Inspection,
    /// Base64 overlay PNG, when asked for.
    pub heatmap_png: Option<String>,
}

/// The JSON result of scoring one image with a model: core's answer with
/// the model's name, the latency, a sentence and the optional PNG.
#[derive(Debug, Serialize)]
pub struct ScoreResponse {
    pub model: String,
    #[serde(flatten)]
    pub inspection: Inspection,
    pub latency_ms: f64,
    /// The verdict in a sentence: where the anomaly is and how large, and
    /// each typed defect's.
    pub answer: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub heatmap_png: Option<String>,
    /// Zero-shot requests: the object scored.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub object: Option<String>,
    /// The typed defects asked about (zero-shot: the descriptions scored).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub prompts: Vec<String>,
    /// With a results store (`serve --db`): the id a decision names
    /// (`POST /v1/decisions`) to file this result without scoring again.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub result_id: Option<String>,
}

impl Scored {
    /// The response, with a sentence per typed defect (or why none could
    /// be checked) after the model's.
    pub fn response(
        self,
        model: &str,
        started: std::time::Instant,
        asked: Vec<String>,
    ) -> ScoreResponse {
        let inspection = self.inspection;
        let mut answer = describe(model, &inspection);
        for d in &inspection.defects {
            answer.push(' ');
            answer.push_str(&describe_defect(d, inspection.width, inspection.height));
        }
        if inspection.defects_unchecked.is_some() {
            // Why (and how to add a text layer) is for whoever runs the
            // server: it stays in the JSON's `defects_unchecked`.
            answer.push(' ');
            answer.push_str(UNCHECKED);
        }
        ScoreResponse {
            model: model.to_owned(),
            inspection,
            latency_ms: started.elapsed().as_secs_f64() * 1000.0,
            answer,
            heatmap_png: self.heatmap_png,
            object: None,
            prompts: asked,
            result_id: None,
        }
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
/// without a slot, once there is room for the decoded image among those
/// held ([`crate::ServerConfig::max_decoded_pixels`]; its sides are read
/// from the header first). Keep the permit as long as the image.
pub(crate) async fn decode(
    state: &AppState,
    bytes: Bytes,
) -> Result<(Rgb32FImage, PixelPermit), ApiError> {
    const NAME: &str = "the uploaded image";
    let limits = state.config().image_limits;
    let (width, height) =
        peek_dimensions(&bytes, NAME, &limits).map_err(|e| ApiError::from_image(&e))?;
    let permit = state
        .pixel_permit(u64::from(width) * u64::from(height))
        .await?;
    let (sender, receiver) = tokio::sync::oneshot::channel();
    state.decoders().spawn(move || {
        let decoded = decode_image(&bytes, NAME, &limits).map_err(|e| ApiError::from_image(&e));
        // Nobody listens when the request has gone meanwhile.
        let _ = sender.send(decoded);
    });
    let image = receiver
        .await
        .map_err(|_| ApiError::Internal("decoding the image failed (panic)".into()))??;
    Ok((image, permit))
}

/// A failed inference as the client's answer: a phrase CLIP cannot read
/// (too long, empty) is the asker's to fix, on every route alike.
pub fn inference_error(err: flawscope_core::Error) -> ApiError {
    match err {
        flawscope_core::Error::Prompt(_) => ApiError::bad_request("bad_prompt", err.to_string()),
        other => ApiError::from_core(&other),
    }
}

/// Sets its flag when dropped: held by a request's future, so the work it
/// started hears when the request is gone (timed out, client left).
struct StopOnDrop(Arc<AtomicBool>);

impl Drop for StopOnDrop {
    fn drop(&mut self) {
        self.0.store(true, Ordering::Relaxed);
    }
}

/// Scores a decoded image with `model` at the request's operating point,
/// with each typed defect in `asked` checked by the model's text layer (or
/// the reason it could not be), on one slot. When the request goes away
/// (its timeout), the work stops at its next check (between stages and
/// between typed defects) and the slot frees.
pub async fn inspect(
    model: Arc<Model>,
    image: Rgb32FImage,
    extras: Extras,
    asked: Vec<String>,
    slot: Slot,
) -> Result<Scored, ApiError> {
    let stop = Arc::new(AtomicBool::new(false));
    let _stop_on_drop = StopOnDrop(Arc::clone(&stop));
    blocking(slot, move || {
        let point = operating_point(&model, extras.target)?;
        let inspection = model
            .inspect_until(&image, &point, &asked, &stop)
            .map_err(inference_error)?;
        scored(&image, inspection, extras)
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
) -> Result<Scored, ApiError> {
    let heatmap_png = if extras.heatmap_png {
        let png = overlay_png(image, &inspection.map, &Legend::of(&inspection))
            .map_err(|e| ApiError::from_core(&e))?;
        Some(base64::engine::general_purpose::STANDARD.encode(png))
    } else {
        None
    };
    Ok(Scored {
        inspection,
        heatmap_png,
    })
}
