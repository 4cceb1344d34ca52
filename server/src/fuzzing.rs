//! Entry points of the request-parsing fuzz targets (`fuzz/fuzz_targets/`)
//! and of the tests that replay their regression corpora: the parsers run
//! on arbitrary bytes exactly as the routes run them, without a model.

use std::sync::OnceLock;

use axum::body::Body;
use axum::extract::Request;
use axum::http::{HeaderValue, Method, header};

use crate::error::ApiError;
use crate::state::{AppState, ServerConfig};
use crate::upload::{RawBody, read_upload};

/// What a parsed upload held: image bytes (if any) and text values.
#[derive(Debug)]
pub struct UploadSummary {
    pub image_len: Option<usize>,
    pub text_values: usize,
}

fn state() -> &'static AppState {
    static STATE: OnceLock<AppState> = OnceLock::new();
    STATE.get_or_init(|| {
        let config = ServerConfig {
            body_limit: 1 << 20,
            ..ServerConfig::default()
        }
        .with_slots(1);
        // A model-less state: only the limits are read.
        match AppState::new(Vec::new(), config) {
            Ok(state) => state,
            Err(err) => unreachable!("the fixed fuzzing config is valid: {err}"),
        }
    })
}

fn runtime() -> &'static tokio::runtime::Runtime {
    static RUNTIME: OnceLock<tokio::runtime::Runtime> = OnceLock::new();
    RUNTIME.get_or_init(|| {
        match tokio::runtime::Builder::new_current_thread()
            .enable_time()
            .build()
        {
            Ok(runtime) => runtime,
            Err(err) => unreachable!("a current-thread runtime starts: {err}"),
        }
    })
}

/// Parses `data` as a request: the first byte picks the route (even: the
/// score route, which takes a raw body or a form; odd: the ask route, form
/// only), the bytes up to the next newline are the `Content-Type` header
/// (left out when not a valid header value), the rest is the body.
pub fn upload(data: &[u8]) -> Result<UploadSummary, ApiError> {
    let (raw, rest) = match data.split_first() {
        Some((mode, rest)) if mode % 2 == 0 => (RawBody::Image, rest),
        Some((_, rest)) => (RawBody::Refused, rest),
        None => (RawBody::Refused, data),
    };
    let split = rest.iter().position(|&b| b == b'\n').unwrap_or(rest.len());
    let content_type = &rest[..split];
    let body = rest.get(split + 1..).unwrap_or_default();
    let mut request = Request::new(Body::from(body.to_vec()));
    *request.method_mut() = Method::POST;
    if let Ok(value) = HeaderValue::from_bytes(content_type) {
        request.headers_mut().insert(header::CONTENT_TYPE, value);
    }
    let fields = ["text", "model", "object", "prompt"];
    let upload = runtime().block_on(read_upload(state(), request, raw, &fields))?;
    Ok(UploadSummary {
        image_len: upload.image.as_ref().map(|b| b.len()),
        text_values: upload.fields.values().map(Vec::len).sum(),
    })
}

/// Parses `data` as the JSON body of an Open Inference Protocol `infer`
/// request and returns the image files it holds (one per batch element).
pub fn infer_request(data: &[u8]) -> Result<Vec<Vec<u8>>, ApiError> {
    crate::oip::request_images(data)
}
