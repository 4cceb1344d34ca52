//! The web page for engineers: `GET /` and its assets (embedded in the
//! binary, nothing fetched from elsewhere), plus the routes the page needs
//! that the `/v1` API lacks: what this server can do
//! (`GET /v1/capabilities`), a person's OK / NG decision recorded in the
//! results store the TUI uses (`POST /v1/decisions`, naming a result the
//! server scored, so nothing is scored twice), a model's calibration scores
//! and estimates for the threshold slider
//! (`GET /v1/models/{name}/calibration`) and the store as a report
//! (`GET /v1/report`). The page scores through the ordinary `/v1` routes,
//! so scoring costs it nothing extra.

use std::path::PathBuf;
use std::sync::Arc;

use axum::Json;
use axum::Router;
use axum::extract::{FromRequest, FromRequestParts, Request, State};
use axum::http::request::Parts;
use axum::http::{HeaderValue, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use flawscope_core::model::Model;
use flawscope_results::store::{Decision, NewScore, StoreError, content_hash};
use serde::{Deserialize, Serialize};

use crate::error::ApiError;
use crate::extract::{PathModel, ScoringUpload, UploadForm};
use crate::inference::blocking;
use crate::results_store::{RecentResult, SharedResults, StoredModel};
use crate::state::{AppState, ZeroShot};
use crate::upload::{MAX_PROMPTS, RawBody, Upload};

const INDEX_HTML: &str = include_str!("../web/index.html");
const APP_JS: &str = include_str!("../web/app.js");
const STYLE_CSS: &str = include_str!("../web/style.css");

/// Paths of the page itself, served without a token: they hold no data,
/// and the page asks for the token before it calls the API.
pub const PUBLIC_PATHS: [&str; 3] = ["/", "/web/app.js", "/web/style.css"];

/// Stored image paths of uploads start with this, so they are never taken
/// for files on the server.
pub const UPLOAD_PREFIX: &str = "upload:";

/// Longest file name kept for an upload, in characters.
const MAX_NAME_CHARS: usize = 200;

/// Everything but self is refused: no inline script, no other origin.
const CSP: &str = "default-src 'none'; script-src 'self'; style-src 'self'; \
     img-src 'self' data: blob:; connect-src 'self'; form-action 'none'; \
     frame-ancestors 'none'; base-uri 'none'";

/// The page's routes (the assets and the two API additions).
pub fn routes() -> Router<AppState> {
    Router::new()
        .route("/", get(index))
        .route("/web/app.js", get(app_js))
        .route("/web/style.css", get(style_css))
        .route("/v1/capabilities", get(capabilities))
        .route("/v1/decisions", post(decide))
        .route("/v1/models/{name}/calibration", get(calibration))
        .route("/v1/report", get(report))
}

fn asset(body: &'static str, content_type: &'static str) -> Response {
    let mut response = body.into_response();
    let headers = response.headers_mut();
    headers.insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    headers.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(CSP),
    );
    headers.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    headers.insert(
        header::REFERRER_POLICY,
        HeaderValue::from_static("no-referrer"),
    );
    // The assets change with the binary only; revalidating is cheap.
    headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    response
}

async fn index() -> Response {
    asset(INDEX_HTML, "text/html; charset=utf-8")
}

async fn app_js() -> Response {
    asset(APP_JS, "text/javascript; charset=utf-8")
}

async fn style_css() -> Response {
    asset(STYLE_CSS, "text/css; charset=utf-8")
}

#[derive(Serialize)]
struct ZeroShotInfo {
    available: bool,
    /// Why not, when unavailable.
    #[serde(skip_serializing_if = "Option::is_none")]
    reason: Option<String>,
    max_prompts: usize,
}

#[derive(Serialize)]
struct Capabilities {
    zero_shot: ZeroShotInfo,
    /// Whether `POST /v1/decisions` records decisions (`serve --db`).
    results_store: bool,
    body_limit_bytes: usize,
    /// What `POST /v1/batch/score` takes.
    batch: BatchInfo,
}

/// The bounds of a batch scored against itself.
#[derive(Serialize)]
struct BatchInfo {
    min_images: usize,
    max_images: usize,
    /// The images' pixels together.
    max_pixels: u64,
}

/// `GET /v1/capabilities`: whether typed defect descriptions can be
/// checked (CLIP), whether decisions are recorded, and the upload limit.
async fn capabilities(State(state): State<AppState>) -> Json<Capabilities> {
    let zero_shot = match state.zero_shot() {
        ZeroShot::Engine(_) => ZeroShotInfo {
            available: true,
            reason: None,
            max_prompts: MAX_PROMPTS,
        },
        ZeroShot::Unavailable(reason) => ZeroShotInfo {
            available: false,
            reason: Some(reason.clone()),
            max_prompts: MAX_PROMPTS,
        },
    };
    Json(Capabilities {
        zero_shot,
        results_store: state.results().is_some(),
        body_limit_bytes: state.config().body_limit,
        batch: BatchInfo {
            min_images: flawscope_core::musc::MIN_BATCH,
            max_images: flawscope_core::musc::MAX_BATCH,
            max_pixels: state.config().image_limits.max_pixels,
        },
    })
}

/// The answer of `POST /v1/decisions`: the stored row.
#[derive(Debug, Serialize)]
struct DecisionResponse {
    path: String,
    content_hash: String,
    model: String,
    score: f32,
    threshold: f32,
    decision: Decision,
    decided_at: Option<String>,
}

/// The stored path of an upload: [`UPLOAD_PREFIX`] and the file name as the
/// browser gave it, without directories or control characters.
fn upload_path(name: &str) -> Result<PathBuf, ApiError> {
    let base = name.rsplit(['/', '\\']).next().unwrap_or(name).trim();
    let clean: String = base
        .chars()
        .filter(|c| !c.is_control())
        .take(MAX_NAME_CHARS)
        .collect();
    if clean.is_empty() {
        return Err(ApiError::bad_request(
            "missing_name",
            "say the image's file name in the \"name\" field",
        ));
    }
    Ok(PathBuf::from(format!("{UPLOAD_PREFIX}{clean}")))
}

fn store_error(err: &StoreError) -> ApiError {
    ApiError::Internal(format!("results store: {err}"))
}

/// The results store decisions go to; 503 without one (`serve --db`).
struct Results(SharedResults);

impl FromRequestParts<AppState> for Results {
    type Rejection = ApiError;

    async fn from_request_parts(_parts: &mut Parts, state: &AppState) -> Result<Self, ApiError> {
        state
            .results()
            .cloned()
            .map(Self)
            .ok_or(ApiError::NoResultsStore)
    }
}

/// The form of `POST /v1/decisions`: multipart `image`, `model`, `name`
/// and `decision`.
struct DecisionForm {
    model: Arc<Model>,
    stored_model: StoredModel,
    decision: Decision,
    /// Where the row is filed ([`upload_path`]).
    path: PathBuf,
    /// The image's content hash (empty when there is no image, which the
    /// upload then refuses).
    hash: String,
}

impl UploadForm for DecisionForm {
    const RAW: RawBody = RawBody::Refused;
    const FIELDS: &'static [&'static str] = &["model", "name", "decision"];

    fn parse(upload: &Upload, state: &AppState) -> Result<Self, ApiError> {
        let name = upload.text("model").ok_or_else(|| {
            ApiError::bad_request("model_required", "say which model in the \"model\" field")
        })?;
        let model = state.model(name)?;
        let stored_model = state
            .results()
            .and_then(|results| results.models.get(name))
            .cloned()
            .ok_or_else(|| ApiError::Internal(format!("model {name:?} has no store entry")))?;
        let decision = upload
            .text("decision")
            .and_then(Decision::parse)
            .ok_or_else(|| {
                ApiError::bad_request(
                    "invalid_decision",
                    "\"decision\" must be \"ok\", \"ng\" or \"none\"",
                )
            })?;
        let path = upload_path(upload.text("name").unwrap_or(""))?;
        let hash = upload
            .image
            .as_deref()
            .map(content_hash)
            .unwrap_or_default();
        Ok(Self {
            model,
            stored_model,
            decision,
            path,
            hash,
        })
    }
}

/// `POST /v1/decisions`: multipart `image`, `model`, `name` (the file name)
/// and `decision` (`ok`, `ng` or `none`). The server scores the image
/// itself (the store never holds a score a client claimed), files the row
/// as `upload:NAME` with the image's content hash, and records the decision
/// on every row of that image, as the TUI's `a` / `x` / `u` do.
async fn decide_upload(
    state: AppState,
    results: SharedResults,
    upload: ScoringUpload<DecisionForm>,
) -> Result<Json<DecisionResponse>, ApiError> {
    let ScoringUpload {
        permit: _body,
        pixels: _pixels,
        body:
            DecisionForm {
                model,
                stored_model,
                decision,
                path,
                hash,
            },
        image,
    } = upload;
    let slot = state.slot().await?;
    let inspection = blocking(slot, move || {
        model.inspect(&image).map_err(|e| ApiError::from_core(&e))
    })
    .await?;
    let kept = serde_json::to_string(&inspection).ok();
    file_decision(
        results,
        stored_model,
        path,
        RecentResult {
            model: String::new(),
            content_hash: hash,
            score: inspection.score,
            raw_score: inspection.raw_score,
            threshold: inspection.threshold,
            inspection: kept,
        },
        decision,
    )
    .await
}

/// Longest JSON body of a decision by reference.
const MAX_DECISION_JSON: usize = 16 * 1024;

/// `POST /v1/decisions` by reference: a JSON body naming a result the
/// server scored (`result_id` from the score response).
#[derive(Debug, Deserialize)]
struct DecisionByReference {
    result_id: String,
    name: String,
    decision: String,
}

/// `POST /v1/decisions`: either a JSON body `{"result_id", "name",
/// "decision"}` naming a result this server scored (the page's way: no
/// upload, no second scoring), or the older multipart form with the image,
/// which is scored here (see [`decide_upload`]).
async fn decide(
    State(state): State<AppState>,
    Results(results): Results,
    request: Request,
) -> Result<Json<DecisionResponse>, ApiError> {
    let is_json = request
        .headers()
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("application/json"));
    if !is_json {
        let upload = ScoringUpload::<DecisionForm>::from_request(request, &state).await?;
        return decide_upload(state, results, upload).await;
    }
    let body = axum::body::to_bytes(request.into_body(), MAX_DECISION_JSON)
        .await
        .map_err(|_| {
            ApiError::bad_request(
                "invalid_json",
                format!("the decision must be a JSON object of at most {MAX_DECISION_JSON} bytes"),
            )
        })?;
    let asked: DecisionByReference = serde_json::from_slice(&body).map_err(|e| {
        ApiError::bad_request(
            "invalid_json",
            format!("expected {{\"result_id\", \"name\", \"decision\"}}: {e}"),
        )
    })?;
    let decision = Decision::parse(&asked.decision).ok_or_else(|| {
        ApiError::bad_request(
            "invalid_decision",
            "\"decision\" must be \"ok\", \"ng\" or \"none\"",
        )
    })?;
    let path = upload_path(&asked.name)?;
    let result = results.recall(&asked.result_id).ok_or_else(|| {
        ApiError::NotFound(
            "no such result: it was scored before the server restarted or too long ago; send \
             the image with the decision (multipart) instead"
                .into(),
        )
    })?;
    let stored_model = results.models.get(&result.model).cloned().ok_or_else(|| {
        ApiError::Internal(format!("model {:?} has no store entry", result.model))
    })?;
    file_decision(results, stored_model, path, result, decision).await
}

/// Files `result` as `path` under `stored_model` and records `decision` on
/// every row of that image.
async fn file_decision(
    results: SharedResults,
    stored_model: StoredModel,
    path: PathBuf,
    result: RecentResult,
    decision: Decision,
) -> Result<Json<DecisionResponse>, ApiError> {
    let RecentResult {
        content_hash: hash,
        score,
        raw_score,
        threshold,
        inspection: kept,
        ..
    } = result;
    let row = tokio::task::spawn_blocking(move || {
        // A panic elsewhere while holding the lock leaves SQLite consistent
        // (every write is its own transaction).
        let store = results.store.lock().unwrap_or_else(|e| e.into_inner());
        let entry = store
            .model(&stored_model.name, &stored_model.identity)
            .map_err(|e| store_error(&e))?;
        store
            .record_score(
                &entry,
                &NewScore {
                    inspection: kept.as_deref(),
                    path: &path,
                    content_hash: &hash,
                    score,
                    raw_score,
                    threshold,
                    defects: &[],
                },
            )
            .map_err(|e| store_error(&e))?;
        store
            .set_decision(&path, &hash, decision)
            .map_err(|e| store_error(&e))?;
        store
            .lookup(&entry, &path)
            .map_err(|e| store_error(&e))?
            .ok_or_else(|| ApiError::Internal("the row just written is missing".into()))
    })
    .await
    .map_err(|join| ApiError::Internal(format!("results store task failed: {join}")))??;
    tracing::info!(path = %row.path.display(), decision = row.decision.as_str(), "decision recorded");
    Ok(Json(DecisionResponse {
        path: row.path.to_string_lossy().into_owned(),
        content_hash: row.content_hash,
        model: row.model,
        score: row.score,
        threshold: row.threshold,
        decision: row.decision,
        decided_at: row.decided_at,
    }))
}

/// `GET /v1/models/{name}/calibration`: the model's calibration scores
/// (0–1, at most a few hundred per list) and the estimates at every
/// hundredth of the threshold, for the page's histogram and slider;
/// `calibrated: false` for zero-shot models and files without kept scores.
async fn calibration(PathModel { name, model }: PathModel) -> Json<serde_json::Value> {
    match model.calibration_view() {
        Some(view) => Json(serde_json::json!({
            "model": name,
            "calibrated": true,
            "view": view,
        })),
        None => Json(serde_json::json!({
            "model": name,
            "calibrated": false,
            "reason": "this model keeps no calibration scores (zero-shot, or a file written \
                       before they were kept): its threshold cannot be moved with estimates",
        })),
    }
}

/// `GET /v1/report`: the results store as one self-contained HTML file
/// (`flawscope report` for the served store), as a download. The server
/// reads no image file a row names, so its report has no thumbnails.
async fn report(Results(results): Results) -> Result<Response, ApiError> {
    let html = tokio::task::spawn_blocking(move || {
        let store = results.store.lock().unwrap_or_else(|e| e.into_inner());
        flawscope_results::report::render(&store, flawscope_results::report::Thumbnails::None)
            .map_err(|e| store_error(&e))
    })
    .await
    .map_err(|join| ApiError::Internal(format!("report task failed: {join}")))??;
    let mut response = html.into_response();
    let headers = response.headers_mut();
    headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/html; charset=utf-8"),
    );
    headers.insert(
        header::CONTENT_DISPOSITION,
        HeaderValue::from_static("attachment; filename=\"flawscope-report.html\""),
    );
    Ok(response)
}

/// Whether `path` is one of the page's own (token-free) paths.
pub fn is_public(path: &str) -> bool {
    PUBLIC_PATHS.contains(&path)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    #[test]
    fn upload_paths_keep_the_base_name_only() {
        assert_eq!(
            upload_path("good 1.png").unwrap(),
            PathBuf::from("upload:good 1.png")
        );
        assert_eq!(
            upload_path("C:\\x\\..\\a.png").unwrap(),
            PathBuf::from("upload:a.png")
        );
        assert_eq!(
            upload_path("../../etc/passwd").unwrap(),
            PathBuf::from("upload:passwd")
        );
        assert_eq!(
            upload_path("a\u{0}\nb.png").unwrap(),
            PathBuf::from("upload:ab.png")
        );
        assert!(upload_path("dir/").is_err());
        assert!(upload_path("  ").is_err());
        let long = "x".repeat(5000);
        let kept = upload_path(&long).unwrap();
        assert_eq!(
            kept.to_str().unwrap().len(),
            UPLOAD_PREFIX.len() + MAX_NAME_CHARS
        );
    }

    #[test]
    fn the_page_is_small_and_self_contained() {
        let total = INDEX_HTML.len() + APP_JS.len() + STYLE_CSS.len();
        assert!(total < 300 * 1024, "{total} bytes");
        for text in [INDEX_HTML, APP_JS, STYLE_CSS] {
            assert!(!text.contains("http://"), "an absolute URL in an asset");
            assert!(!text.contains("https://"), "an absolute URL in an asset");
            assert!(!text.contains("//cdn"), "a CDN reference in an asset");
        }
        assert!(INDEX_HTML.contains("src=\"/web/app.js\""));
        assert!(INDEX_HTML.contains("href=\"/web/style.css\""));
    }
}
