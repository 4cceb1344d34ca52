//! The router, its middleware, and the health, metrics and `/v1` handlers.

use std::sync::Arc;
use std::time::Instant;

use axum::Json;
use axum::Router;
use axum::extract::{DefaultBodyLimit, FromRequestParts, MatchedPath, Query, Request, State};
use axum::http::request::Parts;
use axum::http::{HeaderValue, header};
use axum::middleware::{Next, from_fn_with_state};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use serde::Serialize;
use serde_json::json;

use flawscope_core::model::Model;
use flawscope_core::prompt_layer::DefectCheck;

use crate::answer::ask_answer;
use crate::error::ApiError;
use crate::extract::{PathModel, QueryExtras, ScoringUpload, Started, UploadForm, score_extras};
use crate::inference::{Extras, ScoreResponse, blocking, inference_error, inspect, scored};
use crate::oip;
use crate::question;
use crate::results_store::RecentResult;
use crate::site;
use crate::state::{AppState, ZeroShot, ZeroShotScorer, bearer};
use crate::upload::{MAX_PROMPTS, RawBody, Upload};
use crate::web;

pub use crate::site::HEALTH_ROUTES;

/// The whole service.
pub fn app(state: AppState) -> Router {
    let body_limit = state.config().body_limit;
    Router::new()
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .route("/v1/models", get(list_models))
        .route("/v1/models/{name}/score", post(score))
        .route("/v1/zero-shot", post(zero_shot))
        .route("/v1/ask", post(ask))
        .route("/v1/batch/score", post(crate::batch::score_batch))
        .route("/v2", get(oip::server_metadata))
        .route("/v2/health/live", get(oip::live))
        .route("/v2/health/ready", get(oip::ready))
        .route("/v2/models/{name}", get(oip::model_metadata))
        .route("/v2/models/{name}/ready", get(oip::model_ready))
        .route("/v2/models/{name}/infer", post(oip::infer))
        .route(
            "/v2/models/{name}/versions/{version}",
            get(oip::model_metadata),
        )
        .route(
            "/v2/models/{name}/versions/{version}/ready",
            get(oip::model_ready),
        )
        .route(
            "/v2/models/{name}/versions/{version}/infer",
            post(oip::infer),
        )
        .merge(web::routes())
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .layer(from_fn_with_state(state.clone(), timeout))
        .layer(from_fn_with_state(state.clone(), authenticate))
        .layer(from_fn_with_state(state.clone(), site::guard))
        .layer(DefaultBodyLimit::max(body_limit))
        .layer(axum::middleware::from_fn(oip::v2_errors))
        .layer(from_fn_with_state(state.clone(), track))
        .with_state(state)
}

/// Counts and logs every request (including refused ones) by route pattern.
async fn track(State(state): State<AppState>, request: Request, next: Next) -> Response {
    let route = request
        .extensions()
        .get::<MatchedPath>()
        .map_or_else(|| "unmatched".to_owned(), |m| m.as_str().to_owned());
    let method = request.method().clone();
    let may_leave_body_unread = has_body(request.headers());
    let _in_flight = state.metrics().start();
    let started = Instant::now();
    let mut response = next.run(request).await;
    let (status, elapsed) = (response.status().as_u16(), started.elapsed());
    state.metrics().record(&route, status, elapsed);
    tracing::info!(
        %method,
        route,
        status,
        latency_ms = elapsed.as_secs_f64() * 1000.0,
        "request"
    );
    // An error answered before the body was read leaves the connection
    // unusable; say so instead of letting the client find a broken pipe.
    if may_leave_body_unread
        && (response.status().is_client_error() || response.status().is_server_error())
    {
        response
            .headers_mut()
            .insert(header::CONNECTION, HeaderValue::from_static("close"));
    }
    response
}

fn has_body(headers: &axum::http::HeaderMap) -> bool {
    headers.contains_key(header::TRANSFER_ENCODING)
        || headers
            .get(header::CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok())
            .is_some_and(|v| v.trim() != "0")
}

/// With a token configured, every route but health needs
/// `Authorization: Bearer <token>`.
async fn authenticate(State(state): State<AppState>, request: Request, next: Next) -> Response {
    let Some(token) = state.token() else {
        return next.run(request).await;
    };
    if HEALTH_ROUTES.contains(&request.uri().path()) || web::is_public(request.uri().path()) {
        return next.run(request).await;
    }
    let presented = request
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(bearer);
    match presented {
        Some(candidate) if token.matches(candidate) => next.run(request).await,
        _ => ApiError::Unauthorized.into_response(),
    }
}

/// Bounds the time of every request.
async fn timeout(State(state): State<AppState>, request: Request, next: Next) -> Response {
    let limit = state.config().timeout;
    match tokio::time::timeout(limit, next.run(request)).await {
        Ok(response) => response,
        Err(_) => ApiError::Timeout(limit).into_response(),
    }
}

async fn not_found(request: Request) -> ApiError {
    ApiError::NotFound(format!("no route {}", request.uri().path()))
}

async fn method_not_allowed(request: Request) -> ApiError {
    ApiError::MethodNotAllowed(format!(
        "{} is not allowed on {}",
        request.method(),
        request.uri().path()
    ))
}

async fn healthz() -> Json<serde_json::Value> {
    Json(json!({"status": "ok"}))
}

async fn readyz(State(state): State<AppState>) -> Result<Json<serde_json::Value>, ApiError> {
    if state.is_draining() {
        return Err(ApiError::ShuttingDown);
    }
    Ok(Json(
        json!({"status": "ready", "models": state.models().len()}),
    ))
}

async fn metrics(State(state): State<AppState>) -> Response {
    let text = state.metrics().render(&[
        (
            "flawscope_models_loaded",
            "Models served.",
            state.models().len() as f64,
        ),
        (
            "flawscope_inference_slots_busy",
            "Inference slots in use.",
            state.busy_slots() as f64,
        ),
        (
            "flawscope_inference_slots",
            "Inference slots in all (--max-concurrent).",
            state.config().max_concurrent as f64,
        ),
        (
            "flawscope_request_bodies_held",
            "Requests holding a whole body (being decoded, queued or scored).",
            state.buffered() as f64,
        ),
        (
            "flawscope_request_body_bytes",
            "Bytes of request bodies held, counted as they arrive.",
            state.body_bytes_held() as f64,
        ),
    ]);
    (
        [(
            header::CONTENT_TYPE,
            HeaderValue::from_static("text/plain; version=0.0.4; charset=utf-8"),
        )],
        text,
    )
        .into_response()
}

/// One line of `/v1/models`.
#[derive(Serialize)]
struct ModelListing<'a> {
    name: &'a str,
    #[serde(flatten)]
    summary: flawscope_core::model::ModelSummary,
}

async fn list_models(State(state): State<AppState>) -> Json<serde_json::Value> {
    let models: Vec<ModelListing> = state
        .models()
        .iter()
        .map(|(name, model)| ModelListing {
            name,
            summary: model.summary(),
        })
        .collect();
    Json(json!({ "models": models }))
}

/// The form of `/v1/models/{name}/score`: the image as the body or a
/// multipart `image`, with optional `defect` fields (`prompt` is their
/// older spelling on this route).
struct ScoreForm {
    /// The typed defects asked about, checked by the model's text layer.
    asked: Vec<String>,
    /// The image file's content hash, when a results store may file the
    /// result (`serve --db`): a decision then names the result.
    hash: Option<String>,
}

impl UploadForm for ScoreForm {
    const RAW: RawBody = RawBody::Image;
    const FIELDS: &'static [&'static str] = &["defect", "prompt"];

    fn parse(upload: &Upload, state: &AppState) -> Result<Self, ApiError> {
        let hash = state
            .results()
            .and(upload.image.as_deref())
            .map(flawscope_results::store::content_hash);
        Ok(Self {
            asked: text_fields(upload, Self::FIELDS)?,
            hash,
        })
    }
}

/// `POST /v1/models/{name}/score`: raw image body or multipart `image`,
/// with optional `prompt` fields (typed defects, checked by the model's text
/// layer beside its own verdict).
async fn score(
    Started(started): Started,
    State(state): State<AppState>,
    PathModel { name, model }: PathModel,
    QueryExtras(extras): QueryExtras,
    upload: ScoringUpload<ScoreForm>,
) -> Result<Json<ScoreResponse>, ApiError> {
    let ScoringUpload {
        permit: _body,
        pixels: _pixels,
        body: ScoreForm { asked, hash },
        image,
    } = upload;
    let slot = state.slot().await?;
    let scored = inspect(model, image, extras, asked.clone(), slot).await?;
    let mut response = scored.response(&name, started, asked);
    // Kept for a decision on it (`POST /v1/decisions` with `result_id`), so
    // deciding never uploads or scores the image again. Only plain model
    // verdicts are filed, as `score --db` files them.
    if let (Some(results), Some(hash)) = (state.results(), hash)
        && response.inspection.defects.is_empty()
        && response.inspection.defects_unchecked.is_none()
    {
        response.result_id = Some(results.remember(RecentResult {
            model: name.clone(),
            content_hash: hash,
            score: response.inspection.score,
            raw_score: response.inspection.raw_score,
            threshold: response.inspection.threshold,
            inspection: serde_json::to_string(&response.inspection).ok(),
        }));
    }
    Ok(Json(response))
}

/// The `prompt` fields of an upload, trimmed: each must say something, and
/// there may be at most [`MAX_PROMPTS`].
fn typed_prompts(upload: &Upload) -> Result<Vec<String>, ApiError> {
    text_fields(upload, &["prompt"])
}

/// The fields `names` of an upload, in that order, trimmed: each must say
/// something, and there may be at most [`MAX_PROMPTS`] in all.
fn text_fields(upload: &Upload, names: &[&str]) -> Result<Vec<String>, ApiError> {
    let prompts: Vec<String> = names
        .iter()
        .filter_map(|name| upload.fields.get(*name))
        .flat_map(|v| v.iter().map(|p| p.trim().to_owned()))
        .collect();
    if prompts.iter().any(String::is_empty) {
        return Err(ApiError::bad_request(
            "bad_prompt",
            "a \"defect\" or \"prompt\" field is empty: describe a defect in each one",
        ));
    }
    if prompts.len() > MAX_PROMPTS {
        return Err(ApiError::bad_request(
            "too_many_prompts",
            format!("at most {MAX_PROMPTS} prompts"),
        ));
    }
    Ok(prompts)
}

/// Picks the model for `/v1/ask`: the `model` field, the only model, or
/// the one model the text means ([`question::match_model`]).
fn choose_model(state: &AppState, field: Option<&str>, text: &str) -> Result<String, ApiError> {
    if let Some(name) = field {
        state.model(name)?;
        return Ok(name.to_owned());
    }
    let names: Vec<&String> = state.models().keys().collect();
    if let [only] = names.as_slice() {
        return Ok((*only).clone());
    }
    let summaries: Vec<(&str, Option<String>)> = state
        .models()
        .iter()
        .map(|(name, model)| (name.as_str(), model.summary().object))
        .collect();
    let candidates: Vec<(&str, Option<&str>)> = summaries
        .iter()
        .map(|(name, object)| (*name, object.as_deref()))
        .collect();
    match question::match_model(text, &candidates) {
        Some(one) => Ok(one.to_owned()),
        None => Err(ApiError::bad_request(
            "model_required",
            format!(
                "several models are loaded ({}); say which with the \"model\" field",
                names
                    .iter()
                    .map(|n| n.as_str())
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
        )),
    }
}

#[derive(Serialize)]
struct AskResponse {
    answer: String,
    question: String,
    model: String,
    /// The defect phrases read from the question ([`question::defect_phrases`]).
    defects_asked: Vec<String>,
    /// Whether each asked defect was checked on its own by the model's text
    /// layer; when not, `note` says why.
    defects_checked: bool,
    /// Each asked defect: its score, verdict, calibrated threshold,
    /// false-alarm estimate and location.
    defects: Vec<DefectCheck>,
    /// Anomalous when the model or any asked defect is over its threshold.
    is_anomalous: bool,
    /// Which layers flagged the image (`model`, then each defect).
    flagged_by: Vec<String>,
    note: String,
    result: ScoreResponse,
}

/// How `/v1/ask` answers: the structured JSON, or the answer's paragraph
/// alone as plain text for a chat.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum AskStyle {
    Json,
    Chat,
}

impl AskStyle {
    fn parse(field: Option<&str>) -> Result<Self, ApiError> {
        match field {
            None | Some("json") => Ok(Self::Json),
            Some("chat") => Ok(Self::Chat),
            Some(other) => Err(ApiError::bad_request(
                "bad_style",
                format!("style must be \"json\" or \"chat\", not \"{other}\""),
            )),
        }
    }
}

/// The form of `/v1/ask`: multipart `image`, `text`, optional `model`
/// and `style`.
struct AskForm {
    question: String,
    /// The defect phrases read from the question, at most [`MAX_PROMPTS`].
    asked: Vec<String>,
    /// The model chosen ([`choose_model`]), and its name.
    name: String,
    model: Arc<Model>,
}

impl UploadForm for AskForm {
    const RAW: RawBody = RawBody::Refused;
    const FIELDS: &'static [&'static str] = &["text", "model", "style"];

    fn parse(upload: &Upload, state: &AppState) -> Result<Self, ApiError> {
        let question = upload.text("text").unwrap_or("").to_owned();
        if question::names_nothing(&question) {
            return Err(ApiError::bad_request(
                "no_defect_named",
                format!(
                    "I could not read a defect in \"{}\". Ask about one, e.g. \"any cracks or \
                     scratches?\", or ask \"is this part ok?\" for the general verdict.",
                    question.trim().chars().take(80).collect::<String>()
                ),
            ));
        }
        // The same bound as the score route's fields: each phrase costs a
        // text-layer pass (842 phrases from 4 KB of text held a slot 48 s).
        let asked = question::defect_phrases(&question);
        if asked.len() > MAX_PROMPTS {
            return Err(ApiError::bad_request(
                "too_many_prompts",
                format!(
                    "the question names {} defects; ask about at most {MAX_PROMPTS} at once",
                    asked.len()
                ),
            ));
        }
        let name = choose_model(state, upload.text("model"), &question)?;
        let model = state.model(&name)?;
        Ok(Self {
            question,
            asked,
            name,
            model,
        })
    }
}

/// The style a `/v1/ask` caller wants before its form is read: `?style=chat`
/// in the query, or `Accept: text/plain`; the form's `style` field then
/// decides, once read.
fn style_hint(request: &Request) -> AskStyle {
    let query_chat = request
        .uri()
        .query()
        .is_some_and(|q| q.split('&').any(|kv| kv == "style=chat"));
    let accepts_text = request
        .headers()
        .get(header::ACCEPT)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("text/plain"));
    if query_chat || accepts_text {
        AskStyle::Chat
    } else {
        AskStyle::Json
    }
}

/// An error as a chat message: the same status and headers, the message
/// as a sentence in plain text.
fn chat_error(err: ApiError) -> Response {
    let mut response = err.into_response();
    let message = response
        .extensions()
        .get::<crate::error::ErrorMessage>()
        .map(|m| m.message.clone())
        .unwrap_or_else(|| "the server could not answer".to_owned());
    let mut text = format!("Sorry, I could not answer: {message}");
    if !text.ends_with(['.', '!', '?']) {
        text.push('.');
    }
    *response.body_mut() = axum::body::Body::from(text);
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    response.headers_mut().remove(header::CONTENT_LENGTH);
    response
}

/// `POST /v1/ask`: multipart `image`, `text`, optional `model` and `style`
/// (`json`, the default, or `chat`). With `style=chat` errors are chat
/// messages too (from the form's field once it is read, or from the query
/// or an `Accept: text/plain` header before).
async fn ask(
    Started(started): Started,
    State(state): State<AppState>,
    request: Request,
) -> Response {
    let mut style = style_hint(&request);
    match answer_question(&state, started, request, &mut style).await {
        Ok(response) => response,
        Err(err) if style == AskStyle::Chat => chat_error(err),
        Err(err) => err.into_response(),
    }
}

/// `/v1/ask`'s work, in the order every scoring route keeps (body permit,
/// form, image decoded, then a slot); `style` is set as soon as the form
/// says it.
async fn answer_question(
    state: &AppState,
    started: Instant,
    request: Request,
    style: &mut AskStyle,
) -> Result<Response, ApiError> {
    let extras = score_extras(Query::try_from_uri(request.uri()))?;
    // As every scoring route: the body read first, its bytes counted as they
    // come, then a body permit, then room for the decoded image.
    let (request, meter) = state.meter(request);
    let mut upload = crate::upload::read_upload(state, request, AskForm::RAW, AskForm::FIELDS)
        .await
        .map_err(|e| meter.explain(e))?;
    let _permit = state.body_permit(Some(&meter))?;
    *style = AskStyle::parse(upload.text("style"))?;
    let AskForm {
        question,
        asked,
        name,
        model,
    } = AskForm::parse(&upload, state)?;
    let bytes = upload.require_image()?;
    let (image, _pixels) = crate::inference::decode(state, bytes).await?;
    let slot = state.slot().await?;
    let scored = inspect(model, image, extras, asked.clone(), slot).await?;
    let inspection = &scored.inspection;
    let note = match (&inspection.defects_unchecked, asked.is_empty()) {
        (_, true) => {
            "no defect was named; the answer is the model's general anomaly verdict".to_owned()
        }
        (Some(reason), false) => format!(
            "asked about {}: {reason}; the answer is the general anomaly verdict of {name}",
            quoted(&asked)
        ),
        (None, false) => format!("asked about {}", quoted(&asked)),
    };
    let answer = ask_answer(&name, inspection, &asked);
    let (defects, is_anomalous, flagged_by) = (
        inspection.defects.clone(),
        inspection.is_anomalous,
        inspection.flagged_by.clone(),
    );
    if *style == AskStyle::Chat {
        return Ok((
            [(
                header::CONTENT_TYPE,
                HeaderValue::from_static("text/plain; charset=utf-8"),
            )],
            answer,
        )
            .into_response());
    }
    Ok(Json(AskResponse {
        answer,
        question,
        defects_asked: asked,
        defects_checked: !defects.is_empty(),
        defects,
        is_anomalous,
        flagged_by,
        note,
        result: scored.response(&name, started, Vec::new()),
        model: name,
    })
    .into_response())
}

fn quoted(phrases: &[String]) -> String {
    phrases
        .iter()
        .map(|p| format!("\"{p}\""))
        .collect::<Vec<_>>()
        .join(", ")
}

/// The zero-shot engine; 503 while none is configured.
struct ZeroShotEngine(Arc<dyn ZeroShotScorer>);

impl FromRequestParts<AppState> for ZeroShotEngine {
    type Rejection = ApiError;

    async fn from_request_parts(_parts: &mut Parts, state: &AppState) -> Result<Self, ApiError> {
        match state.zero_shot() {
            ZeroShot::Engine(engine) => Ok(Self(engine.clone())),
            ZeroShot::Unavailable(reason) => Err(ApiError::ZeroShotUnavailable(reason.clone())),
        }
    }
}

/// The form of `/v1/zero-shot`: multipart `image`, `object`, one or more
/// `prompt`.
struct ZeroShotForm {
    object: String,
    prompts: Vec<String>,
}

impl UploadForm for ZeroShotForm {
    const RAW: RawBody = RawBody::Refused;
    const FIELDS: &'static [&'static str] = &["object", "prompt"];

    fn parse(upload: &Upload, _state: &AppState) -> Result<Self, ApiError> {
        let object = upload
            .text("object")
            .ok_or_else(|| {
                ApiError::bad_request(
                    "missing_object",
                    "say what the object is in the \"object\" field",
                )
            })?
            .to_owned();
        let prompts = typed_prompts(upload)?;
        if prompts.is_empty() {
            return Err(ApiError::bad_request(
                "missing_prompt",
                "describe a defect in at least one \"prompt\" field",
            ));
        }
        Ok(Self { object, prompts })
    }
}

/// `POST /v1/zero-shot`: multipart `image`, `object`, one or more `prompt`.
/// 503 while no zero-shot engine is configured.
async fn zero_shot(
    Started(started): Started,
    State(state): State<AppState>,
    QueryExtras(extras): QueryExtras,
    ZeroShotEngine(engine): ZeroShotEngine,
    upload: ScoringUpload<ZeroShotForm>,
) -> Result<Json<ScoreResponse>, ApiError> {
    // `max_far` / `max_mar` are checked but not applied: zero-shot scores
    // have no calibrated operating point.
    let extras = Extras {
        target: None,
        ..extras
    };
    let ScoringUpload {
        permit: _body,
        pixels: _pixels,
        body: ZeroShotForm { object, prompts },
        image,
    } = upload;
    let slot = state.slot().await?;
    let scored = {
        let (object, prompts) = (object.clone(), prompts.clone());
        blocking(slot, move || {
            let inspection = engine
                .inspect(&image, &object, &prompts)
                .map_err(inference_error)?;
            scored(&image, inspection, extras)
        })
        .await?
    };
    let mut response = scored.response("zero-shot", started, prompts);
    response.object = Some(object);
    Ok(Json(response))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn heatmap(uri: &str) -> Result<bool, ApiError> {
        let uri: axum::http::Uri = uri.parse().unwrap();
        Ok(score_extras(Query::try_from_uri(&uri))?.heatmap_png)
    }

    #[test]
    fn heatmap_query() {
        assert!(!heatmap("/s").unwrap());
        assert!(!heatmap("/s?x=1").unwrap());
        assert!(heatmap("/s?heatmap=png").unwrap());
        assert!(heatmap("/s?x=1&heatmap=png").unwrap());
        for bad in [
            "/s?heatmap=jpeg",
            "/s?heatmap",
            "/s?heatmap=",
            "/s?heatmap=PNG",
        ] {
            let err = heatmap(bad).unwrap_err();
            assert_eq!(err.code(), "invalid_query", "{bad}");
        }
    }
}
