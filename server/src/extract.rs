//! The extractors the routes share, each refusing with an [`ApiError`]:
//! the model a path names ([`PathModel`]) and a scoring upload read and
//! decoded in the one order every scoring route keeps ([`ScoringUpload`]),
//! and the query's operating point and heatmap ([`QueryExtras`]).

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::future::Future;
use std::sync::Arc;
use std::time::Instant;

use axum::body::Bytes;
use axum::extract::rejection::QueryRejection;
use axum::extract::{FromRequest, FromRequestParts, Path, Query, Request};
use axum::http::HeaderMap;
use axum::http::request::Parts;
use flawscope_core::model::Model;
use flawscope_core::operating_point::Target;
use image::Rgb32FImage;
use serde::Deserialize;

use crate::error::ApiError;
use crate::inference::{Extras, decode};
use crate::state::{AppState, BodyPermit, PixelPermit};
use crate::upload::{RawBody, Upload, read_upload};

/// The model a route's path names: `{name}`, and `{version}` on the
/// versioned `/v2` routes, looked up; 404 when there is no such model or
/// version, or when the path does not decode (a name that does not decode
/// is just unknown).
pub(crate) struct PathModel {
    pub name: String,
    pub model: Arc<Model>,
}

impl FromRequestParts<AppState> for PathModel {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &AppState) -> Result<Self, ApiError> {
        let unknown = || ApiError::NotFound("no such model".into());
        let Path(mut params) = Path::<BTreeMap<String, String>>::from_request_parts(parts, state)
            .await
            .map_err(|_| unknown())?;
        let name = params.remove("name").ok_or_else(unknown)?;
        let model = state.versioned_model(&name, params.get("version").map(String::as_str))?;
        Ok(Self { name, model })
    }
}

/// What a scoring route reads from its body besides the image.
pub(crate) trait ScoringBody: Sized + Send {
    /// Refuses a request by its headers alone, before a body permit is
    /// taken; the default refuses none.
    fn admit(_headers: &HeaderMap) -> Result<(), ApiError> {
        Ok(())
    }

    /// Reads the body within its limits and deadline, and checks it: the
    /// route's own part and the image's encoded bytes.
    fn read(
        state: &AppState,
        request: Request,
    ) -> impl Future<Output = Result<(Self, Bytes), ApiError>> + Send;
}

/// A scoring route that takes a multipart form with an `image` file (or,
/// with [`RawBody::Image`], the image as the whole body): what it accepts,
/// and how it reads its text fields.
pub(crate) trait UploadForm: Sized + Send {
    /// Whether a plain (non-multipart) body is taken as the image.
    const RAW: RawBody;
    /// The text fields read; others are ignored.
    const FIELDS: &'static [&'static str];

    /// The route's part of the form, checked before the image is looked at.
    fn parse(upload: &Upload, state: &AppState) -> Result<Self, ApiError>;
}

impl<F: UploadForm> ScoringBody for F {
    async fn read(state: &AppState, request: Request) -> Result<(Self, Bytes), ApiError> {
        let mut upload = read_upload(state, request, F::RAW, F::FIELDS).await?;
        let form = F::parse(&upload, state)?;
        Ok((form, upload.require_image()?))
    }
}

/// The front part of every scoring route: the body read and checked (`B`,
/// its bytes counted against the byte budget as they arrive), a body
/// permit (503 when too many bodies are held), and its image decoded, all
/// before an inference slot is taken, so a slow or bad upload never holds
/// one. Keep [`ScoringUpload::permit`] until the answer is ready.
pub(crate) struct ScoringUpload<B> {
    pub permit: BodyPermit,
    /// Room for the decoded image: keep it as long as the image.
    pub pixels: PixelPermit,
    /// The route's own part of the body.
    pub body: B,
    pub image: Rgb32FImage,
}

impl<B: ScoringBody> FromRequest<AppState> for ScoringUpload<B> {
    type Rejection = ApiError;

    async fn from_request(request: Request, state: &AppState) -> Result<Self, ApiError> {
        B::admit(request.headers())?;
        // The body is read first, its bytes counted as they come: a stalled
        // upload holds only the bytes it sent, not one of the body permits.
        let (request, meter) = state.meter(request);
        let (body, bytes) = B::read(state, request)
            .await
            .map_err(|e| meter.explain(e))?;
        let permit = state.body_permit(Some(&meter))?;
        let (image, pixels) = decode(state, bytes).await?;
        Ok(Self {
            permit,
            pixels,
            body,
            image,
        })
    }
}

/// When the handler started: put first, so the latency a route reports
/// counts reading and decoding the upload.
pub(crate) struct Started(pub Instant);

impl<S: Send + Sync> FromRequestParts<S> for Started {
    type Rejection = Infallible;

    async fn from_request_parts(_parts: &mut Parts, _state: &S) -> Result<Self, Infallible> {
        Ok(Self(Instant::now()))
    }
}

/// The query of `/v1/models/{name}/score`; other keys are ignored.
#[derive(Debug, Deserialize)]
pub(crate) struct ScoreQuery {
    heatmap: Option<String>,
    max_far: Option<String>,
    max_mar: Option<String>,
}

/// The request's [`Extras`] from the query ([`score_extras`]); 400 when
/// it is invalid.
pub(crate) struct QueryExtras(pub(crate) Extras);

impl<S: Send + Sync> FromRequestParts<S> for QueryExtras {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, _state: &S) -> Result<Self, ApiError> {
        score_extras(Query::try_from_uri(&parts.uri)).map(Self)
    }
}

/// `heatmap=png`, and `max_far` / `max_mar` (a rate in [0, 1), at most one
/// of them): the request's operating point.
pub(crate) fn score_extras(
    query: Result<Query<ScoreQuery>, QueryRejection>,
) -> Result<Extras, ApiError> {
    let invalid =
        || ApiError::bad_request("invalid_query", "heatmap must be \"png\" (the only format)");
    let Query(query) = query.map_err(|_| invalid())?;
    let heatmap_png = match query.heatmap.as_deref() {
        None => false,
        Some("png") => true,
        Some(_) => return Err(invalid()),
    };
    let rate = |name: &str, text: Option<&str>| -> Result<Option<f64>, ApiError> {
        text.map(|t| {
            t.trim().parse::<f64>().map_err(|_| {
                ApiError::bad_request(
                    "invalid_operating_point",
                    format!("{name} must be a number in [0, 1), got \"{t}\""),
                )
            })
        })
        .transpose()
    };
    let target = Target::from_request(
        rate("max_far", query.max_far.as_deref())?,
        rate("max_mar", query.max_mar.as_deref())?,
    )
    .map_err(|e| ApiError::bad_request("invalid_operating_point", e.to_string()))?;
    Ok(Extras {
        heatmap_png,
        target,
    })
}
