//! `POST /v1/batch/score`: several images in one multipart request, scored
//! against each other by core's mutual scoring ([`musc`]: no model, no
//! normal images) and answered per image, with the batch's ranking.
//!
//! Bounds, on top of every route's (body size and byte budget, body
//! permit, timeouts, token, Host and cross-site checks): from
//! [`musc::MIN_BATCH`] to [`musc::MAX_BATCH`] images, and their pixels
//! together within the pixel budget of one image
//! ([`flawscope_core::images::ImageLimits::max_pixels`]), held as one
//! pixel permit, so a batch takes no more memory than one largest image
//! (see docs/serving.md). An image that cannot be read is answered with
//! its error and the others are scored without it; fewer than
//! [`musc::MIN_BATCH`] readable images fail the request (400
//! `batch_too_small`).

use std::path::PathBuf;

use axum::Json;
use axum::body::Bytes;
use axum::extract::{Request, State};
use flawscope_core::images::{decode_image, peek_dimensions};
use flawscope_core::model::Inspection;
use flawscope_core::musc::{self, MuscConfig};
use flawscope_core::progress::NoProgress;
use serde::Serialize;

use crate::error::ApiError;
use crate::extract::{QueryExtras, Started};
use crate::inference::{Extras, ScoreResponse, blocking, scored};
use crate::state::AppState;
use crate::upload::{BatchImage, read_images};

/// What the answers name as their scorer.
pub const SCORER: &str = "musc";

/// The answer to a batch.
#[derive(Debug, Serialize)]
pub struct BatchResponse {
    /// How the batch was scored: `"musc"`, each image against the others.
    pub detector: &'static str,
    /// Images sent, scored, and refused (each with its error).
    pub images: usize,
    pub scored: usize,
    pub failed: usize,
    /// Indices into `results` of the scored images, highest score first.
    pub ranking: Vec<usize>,
    /// Why the verdicts are uncalibrated (every scored answer's operating
    /// point says it too).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub warning: Option<String>,
    pub latency_ms: f64,
    /// One per image sent, in the order sent.
    pub results: Vec<BatchResult>,
}

/// One image's answer: the score route's answer, or its error.
#[derive(Debug, Serialize)]
pub struct BatchResult {
    /// Its place in the request, from 0.
    pub index: usize,
    /// The file name it was sent with (`image-N` without one).
    pub name: String,
    /// 1 for the highest score of the batch.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub rank: Option<usize>,
    #[serde(flatten)]
    pub result: Option<ScoreResponse>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<ItemError>,
}

/// Why one image of a batch was not scored (as the single-image routes
/// would refuse it).
#[derive(Debug, Serialize)]
pub struct ItemError {
    pub code: &'static str,
    pub message: String,
}

impl ItemError {
    fn of(err: &ApiError) -> Self {
        Self {
            code: err.code(),
            message: err.public_message(),
        }
    }
}

/// `POST /v1/batch/score`: one `image` file per image (at least
/// [`musc::MIN_BATCH`], at most [`musc::MAX_BATCH`]); `heatmap=png` adds
/// each overlay. `max_far` / `max_mar` are checked but not applied: a
/// batch scored against itself has no calibrated operating point.
pub(crate) async fn score_batch(
    Started(started): Started,
    State(state): State<AppState>,
    QueryExtras(extras): QueryExtras,
    request: Request,
) -> Result<Json<BatchResponse>, ApiError> {
    let extras = Extras {
        target: None,
        ..extras
    };
    // As every scoring route: the body read first, its bytes counted as
    // they come, then a body permit, then room for the decoded pixels.
    let (request, meter) = state.meter(request);
    let images = read_images(&state, request, musc::MAX_BATCH)
        .await
        .map_err(|e| meter.explain(e))?;
    let _permit = state.body_permit(Some(&meter))?;
    musc::check_batch_size(images.len(), images.len())
        .map_err(|e| ApiError::bad_request("batch_too_small", e.to_string()))?;
    let limits = state.config().image_limits;
    let (sender, receiver) = tokio::sync::oneshot::channel();
    let headers: Vec<(String, Bytes)> = images
        .iter()
        .map(|i| (i.name.clone(), i.bytes.clone()))
        .collect();
    state.decoders().spawn(move || {
        let sizes: Vec<Result<(u32, u32), ApiError>> = headers
            .iter()
            .map(|(name, bytes)| {
                peek_dimensions(bytes, name, &limits).map_err(|e| ApiError::from_image(&e))
            })
            .collect();
        let _ = sender.send(sizes);
    });
    let sizes = receiver
        .await
        .map_err(|_| ApiError::Internal("reading the images' headers failed (panic)".into()))?;
    let readable = sizes.iter().filter(|s| s.is_ok()).count();
    if let Err(e) = musc::check_batch_size(readable, images.len()) {
        let reasons: Vec<String> = images
            .iter()
            .zip(&sizes)
            .filter_map(|(image, size)| {
                size.as_ref()
                    .err()
                    .map(|e| format!("{}: {}", image.name, e.public_message()))
            })
            .take(5)
            .collect();
        return Err(ApiError::bad_request(
            "batch_too_small",
            format!("{e}; unreadable: {}", reasons.join("; ")),
        ));
    }
    let pixels: u64 = sizes
        .iter()
        .flatten()
        .map(|(w, h)| u64::from(*w) * u64::from(*h))
        .sum();
    if pixels > limits.max_pixels {
        return Err(ApiError::PayloadTooLarge(format!(
            "the batch's images hold {pixels} pixels together; a batch may hold at most {} \
             (the pixel budget of one image): send fewer or smaller images, or score the \
             folder with `flawscope score --detector musc`",
            limits.max_pixels
        )));
    }
    let _pixels = state.pixel_permit(pixels).await?;
    let slot = state.slot().await?;
    let runtime = std::sync::Arc::clone(state.runtime());
    let errors: Vec<Option<ApiError>> = sizes.into_iter().map(Result::err).collect();
    let mut response = blocking(slot, move || {
        score_images(&images, errors, &runtime, &limits, extras)
    })
    .await?;
    let latency_ms = started.elapsed().as_secs_f64() * 1000.0;
    response.latency_ms = latency_ms;
    for item in response
        .results
        .iter_mut()
        .filter_map(|r| r.result.as_mut())
    {
        item.latency_ms = latency_ms;
    }
    Ok(Json(response))
}

/// Scores the images whose header was read (`errors[i]` is `None`) as one
/// batch through core, the same call `score --detector musc` makes.
fn score_images(
    images: &[BatchImage],
    mut errors: Vec<Option<ApiError>>,
    runtime: &flawscope_core::runtime::Runtime,
    limits: &flawscope_core::images::ImageLimits,
    extras: Extras,
) -> Result<BatchResponse, ApiError> {
    // Core's batch scoring reads files, as the CLI gives it: the uploads
    // go to a scratch folder (removed when dropped), so both faces run the
    // very same code on the very same bytes.
    let dir = tempfile::tempdir()
        .map_err(|e| ApiError::Internal(format!("cannot make a scratch folder: {e}")))?;
    let mut sent: Vec<(usize, PathBuf)> = Vec::new();
    for (index, image) in images.iter().enumerate() {
        if errors[index].is_some() {
            continue;
        }
        let path = dir.path().join(format!("{index}"));
        std::fs::write(&path, &image.bytes)
            .map_err(|e| ApiError::Internal(format!("cannot write {}: {e}", path.display())))?;
        sent.push((index, path));
    }
    let paths: Vec<PathBuf> = sent.iter().map(|(_, p)| p.clone()).collect();
    let raw = musc::score_batch(&paths, &MuscConfig::default(), runtime, limits, &NoProgress)
        .map_err(|e| match e {
            flawscope_core::Error::InvalidConfig(message) => {
                ApiError::bad_request("batch_too_small", message)
            }
            other => ApiError::from_core(&other),
        })?;
    let answers = musc::answers(&raw.iter().map(|r| r.as_ref().ok()).collect::<Vec<_>>());
    let mut inspections: Vec<Option<Inspection>> = images.iter().map(|_| None).collect();
    for (((index, path), result), answer) in sent.iter().zip(&raw).zip(answers) {
        match (result, answer) {
            (Ok(_), Some(inspection)) => inspections[*index] = Some(inspection),
            (Err(err), _) => {
                // Named as sent, not by the scratch file.
                let err = ApiError::from_core(err);
                let message = err
                    .public_message()
                    .replace(&path.display().to_string(), &images[*index].name);
                errors[*index] = Some(ApiError::bad_request(err.code(), message));
            }
            (Ok(_), None) => {
                errors[*index] = Some(ApiError::Internal("an image was left unscored".into()));
            }
        }
    }
    let warning = inspections
        .iter()
        .flatten()
        .find_map(|i| i.operating_point.warning.clone());
    let mut ranking: Vec<usize> = (0..images.len())
        .filter(|i| inspections[*i].is_some())
        .collect();
    let score = |i: usize| {
        inspections[i]
            .as_ref()
            .map_or(f32::NEG_INFINITY, |a| a.score)
    };
    ranking.sort_by(|a, b| score(*b).total_cmp(&score(*a)).then(a.cmp(b)));
    let mut rank_of = vec![None; images.len()];
    for (rank, index) in ranking.iter().enumerate() {
        rank_of[*index] = Some(rank + 1);
    }
    let started = std::time::Instant::now();
    let mut results = Vec::with_capacity(images.len());
    for (index, (image, inspection)) in images.iter().zip(inspections).enumerate() {
        let mut item = BatchResult {
            index,
            name: image.name.clone(),
            rank: rank_of[index],
            result: None,
            error: errors[index].as_ref().map(ItemError::of),
        };
        if let Some(inspection) = inspection {
            // The overlay needs the pixels again: decoded one at a time.
            let pixels = if extras.heatmap_png {
                decode_image(&image.bytes, &image.name, limits)
                    .map_err(|e| ApiError::from_image(&e))?
            } else {
                image::Rgb32FImage::default()
            };
            item.result =
                Some(scored(&pixels, inspection, extras)?.response(SCORER, started, Vec::new()));
        }
        results.push(item);
    }
    let scored = ranking.len();
    Ok(BatchResponse {
        detector: SCORER,
        images: images.len(),
        scored,
        failed: images.len() - scored,
        ranking,
        warning,
        latency_ms: 0.0,
        results,
    })
}
