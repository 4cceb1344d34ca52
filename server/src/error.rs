//! Errors: [`ApiError`] is what a request can fail with, answered as
//! `{"error": {"code", "message"}}`; [`ServerError`] is what setting the
//! service up can fail with.

use std::path::PathBuf;

use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use flawscope_core::images::ImageError;
use serde::Serialize;

/// Why a request failed. The message of every variant but
/// [`ApiError::Internal`] is sent to the client; internal details are only
/// logged.
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    #[error("{message}")]
    BadRequest { code: &'static str, message: String },
    #[error("missing or invalid bearer token")]
    Unauthorized,
    /// Refused whoever asks: a host not served, a write from another site.
    #[error("{message}")]
    Forbidden { code: &'static str, message: String },
    #[error("{0}")]
    NotFound(String),
    #[error("{0}")]
    MethodNotAllowed(String),
    #[error("{0}")]
    PayloadTooLarge(String),
    #[error("the server is at its concurrency limit; retry shortly")]
    Overloaded,
    #[error("{0}")]
    ZeroShotUnavailable(String),
    #[error(
        "OK / NG decisions are not recorded: the server has no results store (start it with --db FILE)"
    )]
    NoResultsStore,
    #[error("the server is shutting down")]
    ShuttingDown,
    #[error("the request took longer than {0:?}")]
    Timeout(std::time::Duration),
    #[error("the request body did not arrive within {0:?}")]
    BodyTimeout(std::time::Duration),
    /// Logged with its detail; the client sees a generic message.
    #[error("internal error: {0}")]
    Internal(String),
}

impl ApiError {
    pub fn bad_request(code: &'static str, message: impl Into<String>) -> Self {
        Self::BadRequest {
            code,
            message: message.into(),
        }
    }

    pub fn forbidden(code: &'static str, message: impl Into<String>) -> Self {
        Self::Forbidden {
            code,
            message: message.into(),
        }
    }

    pub fn status(&self) -> StatusCode {
        match self {
            Self::BadRequest { .. } => StatusCode::BAD_REQUEST,
            Self::Forbidden { .. } => StatusCode::FORBIDDEN,
            Self::Unauthorized => StatusCode::UNAUTHORIZED,
            Self::NotFound(_) => StatusCode::NOT_FOUND,
            Self::MethodNotAllowed(_) => StatusCode::METHOD_NOT_ALLOWED,
            Self::PayloadTooLarge(_) => StatusCode::PAYLOAD_TOO_LARGE,
            Self::Overloaded
            | Self::ZeroShotUnavailable(_)
            | Self::NoResultsStore
            | Self::ShuttingDown => StatusCode::SERVICE_UNAVAILABLE,
            Self::Timeout(_) => StatusCode::GATEWAY_TIMEOUT,
            Self::BodyTimeout(_) => StatusCode::REQUEST_TIMEOUT,
            Self::Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }

    /// The stable, machine-readable code.
    pub fn code(&self) -> &'static str {
        match self {
            Self::BadRequest { code, .. } | Self::Forbidden { code, .. } => code,
            Self::Unauthorized => "unauthorized",
            Self::NotFound(_) => "not_found",
            Self::MethodNotAllowed(_) => "method_not_allowed",
            Self::PayloadTooLarge(_) => "payload_too_large",
            Self::Overloaded => "overloaded",
            Self::ZeroShotUnavailable(_) => "zero_shot_unavailable",
            Self::NoResultsStore => "no_results_store",
            Self::ShuttingDown => "shutting_down",
            Self::Timeout(_) => "timeout",
            Self::BodyTimeout(_) => "body_timeout",
            Self::Internal(_) => "internal",
        }
    }

    /// The message the client sees.
    pub fn public_message(&self) -> String {
        match self {
            Self::Internal(_) => "internal error; the server log has the details".to_owned(),
            other => other.to_string(),
        }
    }

    /// From an image that could not be read.
    pub fn from_image(err: &ImageError) -> Self {
        match err {
            ImageError::TooLarge { .. } => Self::PayloadTooLarge(err.to_string()),
            ImageError::Empty { .. } => Self::bad_request("empty_image", err.to_string()),
            ImageError::UnsupportedFormat { .. } => {
                Self::bad_request("unsupported_image", err.to_string())
            }
            ImageError::Truncated { .. } => Self::bad_request("truncated_image", err.to_string()),
            ImageError::ExtremeAspect { .. } => {
                Self::bad_request("unsupported_image_shape", err.to_string())
            }
            ImageError::ZeroSized { .. } | ImageError::Corrupt { .. } => {
                Self::bad_request("invalid_image", err.to_string())
            }
            ImageError::Io { .. } => Self::Internal(err.to_string()),
        }
    }

    /// From a failed inference: bad images are the client's fault, the rest
    /// is ours.
    pub fn from_core(err: &flawscope_core::Error) -> Self {
        match err {
            flawscope_core::Error::Image(image) => Self::from_image(image),
            other => Self::Internal(other.to_string()),
        }
    }
}

#[derive(Serialize)]
struct ErrorBody<'a> {
    error: ErrorDetail<'a>,
}

#[derive(Serialize)]
struct ErrorDetail<'a> {
    code: &'a str,
    message: &'a str,
}

/// What an error response said, kept in the response's extensions so the
/// `/v2` routes can answer in their own shape (see `oip::v2_errors`).
#[derive(Debug, Clone)]
pub struct ErrorMessage {
    pub code: &'static str,
    pub message: String,
}

/// The JSON error body, as bytes.
pub fn error_json(code: &str, message: &str) -> Vec<u8> {
    let body = ErrorBody {
        error: ErrorDetail { code, message },
    };
    serde_json::to_vec(&body).unwrap_or_else(|_| br#"{"error":{"code":"internal"}}"#.to_vec())
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        match &self {
            Self::Internal(detail) => tracing::error!(%detail, "internal error"),
            Self::Timeout(limit) => tracing::warn!(?limit, "request timed out"),
            other => tracing::debug!(code = other.code(), message = %other, "request refused"),
        }
        let status = self.status();
        let message = ErrorMessage {
            code: self.code(),
            message: self.public_message(),
        };
        let body = error_json(message.code, &message.message);
        let mut response = (
            status,
            [(
                header::CONTENT_TYPE,
                HeaderValue::from_static("application/json"),
            )],
            body,
        )
            .into_response();
        response.extensions_mut().insert(message);
        let headers = response.headers_mut();
        match self {
            Self::Overloaded | Self::ShuttingDown => {
                headers.insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
            }
            Self::Unauthorized => {
                headers.insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
            }
            _ => {}
        }
        response
    }
}

/// Why the service could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    #[error("cannot read the model folder {dir}: {cause}")]
    ModelDir {
        dir: PathBuf,
        #[source]
        cause: std::io::Error,
    },
    #[error(
        "no model files (*.flawscope) in {0}; fit one with `flawscope fit --out DIR/NAME.flawscope`"
    )]
    NoModels(PathBuf),
    #[error(
        "model file {0} has a name that cannot be served; use letters, digits, '.', '-' and '_' (not starting with '.')"
    )]
    BadModelName(PathBuf),
    #[error("cannot load model {path}: {cause}")]
    Model {
        path: PathBuf,
        #[source]
        cause: flawscope_core::Error,
    },
    #[error("cannot read the token file {path}: {cause}")]
    TokenFile {
        path: PathBuf,
        #[source]
        cause: std::io::Error,
    },
    #[error("the token file {0} is empty")]
    EmptyToken(PathBuf),
    #[error("invalid setting: {0}")]
    InvalidConfig(String),
    #[error("cannot start the image decoding threads: {0}")]
    DecodeThreads(#[source] rayon::ThreadPoolBuildError),
}
