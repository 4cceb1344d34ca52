//! Reading request bodies: raw bytes, or a multipart form with an `image`
//! file and a few short text fields, within the body deadline. Every
//! failure maps to 400, 408 or 413.

use std::collections::BTreeMap;

use axum::body::Bytes;
use axum::extract::{FromRequest, Multipart, Request};
use axum::http::{HeaderMap, StatusCode, header};

use crate::error::ApiError;
use crate::state::AppState;

/// Most `prompt` / `defect` text fields accepted by one request.
pub const MAX_PROMPTS: usize = 32;

/// Longest accepted text field, in bytes.
pub const MAX_TEXT_FIELD: usize = 4096;
/// Most text fields accepted in one form.
pub const MAX_TEXT_FIELDS: usize = 64;

/// A parsed upload.
#[derive(Debug, Default)]
pub struct Upload {
    pub image: Option<Bytes>,
    /// Text fields by name, in order of arrival.
    pub fields: BTreeMap<String, Vec<String>>,
}

impl Upload {
    /// The first value of a text field, trimmed; `None` when absent or blank.
    pub fn text(&self, name: &str) -> Option<&str> {
        self.fields
            .get(name)
            .and_then(|v| v.first())
            .map(|s| s.trim())
            .filter(|s| !s.is_empty())
    }

    /// The image, or 400.
    pub fn require_image(&mut self) -> Result<Bytes, ApiError> {
        match self.image.take() {
            Some(bytes) if !bytes.is_empty() => Ok(bytes),
            Some(_) => Err(ApiError::bad_request(
                "empty_image",
                "the image is empty (0 bytes)",
            )),
            None => Err(ApiError::bad_request(
                "missing_image",
                "no image: send the image bytes as the body or as a multipart field named \"image\"",
            )),
        }
    }
}

/// Whether a plain (non-multipart) body is accepted as the image.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RawBody {
    Image,
    Refused,
}

fn is_multipart(headers: &HeaderMap) -> bool {
    headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| {
            v.trim_start()
                .to_ascii_lowercase()
                .starts_with("multipart/form-data")
        })
}

fn too_large(state: &AppState) -> ApiError {
    ApiError::PayloadTooLarge(format!(
        "the request body is over the limit of {} bytes",
        state.config().body_limit
    ))
}

/// Refuses a body whose declared length is over the limit before reading it.
fn check_declared_length(state: &AppState, headers: &HeaderMap) -> Result<(), ApiError> {
    let declared = headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse::<u64>().ok());
    match declared {
        Some(n) if n > state.config().body_limit as u64 => Err(too_large(state)),
        _ => Ok(()),
    }
}

/// Runs `read` within the body deadline; 408 when the client is slower.
async fn within_deadline<T>(
    state: &AppState,
    read: impl Future<Output = Result<T, ApiError>>,
) -> Result<T, ApiError> {
    let limit = state.config().body_timeout;
    tokio::time::timeout(limit, read)
        .await
        .unwrap_or(Err(ApiError::BodyTimeout(limit)))
}

/// The whole body, within the size limit and the body deadline.
pub async fn read_body(state: &AppState, request: Request) -> Result<Bytes, ApiError> {
    within_deadline(state, read_bytes(state, request)).await
}

async fn read_bytes(state: &AppState, request: Request) -> Result<Bytes, ApiError> {
    check_declared_length(state, request.headers())?;
    Bytes::from_request(request, &())
        .await
        .map_err(|rejection| {
            if rejection.status() == StatusCode::PAYLOAD_TOO_LARGE {
                too_large(state)
            } else {
                ApiError::bad_request("unreadable_body", rejection.body_text())
            }
        })
}

/// A multipart form (or, with [`RawBody::Image`], a raw image body), within
/// the size limit and the body deadline. Text fields other than
/// `text_fields` are ignored; so are unnamed parts.
pub async fn read_upload(
    state: &AppState,
    request: Request,
    raw: RawBody,
    text_fields: &[&str],
) -> Result<Upload, ApiError> {
    within_deadline(state, read_form(state, request, raw, text_fields)).await
}

async fn read_form(
    state: &AppState,
    request: Request,
    raw: RawBody,
    text_fields: &[&str],
) -> Result<Upload, ApiError> {
    check_declared_length(state, request.headers())?;
    if !is_multipart(request.headers()) {
        return match raw {
            RawBody::Image => Ok(Upload {
                image: Some(read_bytes(state, request).await?),
                fields: BTreeMap::new(),
            }),
            RawBody::Refused => Err(ApiError::bad_request(
                "expected_multipart",
                "send a multipart/form-data form",
            )),
        };
    }
    let multipart_error = |err| multipart_error(state, err);
    let mut form = open_form(request).await?;
    let mut upload = Upload::default();
    let mut text_count = 0;
    while let Some(field) = form.next_field().await.map_err(multipart_error)? {
        let Some(name) = field.name().map(str::to_owned) else {
            continue;
        };
        if name == "image" {
            if upload.image.is_some() {
                return Err(ApiError::bad_request(
                    "too_many_images",
                    "send one \"image\" field",
                ));
            }
            upload.image = Some(field.bytes().await.map_err(multipart_error)?);
        } else if text_fields.contains(&name.as_str()) {
            text_count += 1;
            if text_count > MAX_TEXT_FIELDS {
                return Err(ApiError::bad_request(
                    "too_many_fields",
                    format!("at most {MAX_TEXT_FIELDS} text fields"),
                ));
            }
            let bytes = field.bytes().await.map_err(multipart_error)?;
            if bytes.len() > MAX_TEXT_FIELD {
                return Err(ApiError::bad_request(
                    "field_too_long",
                    format!("the field {name:?} is over {MAX_TEXT_FIELD} bytes"),
                ));
            }
            let text = String::from_utf8(bytes.to_vec()).map_err(|_| {
                ApiError::bad_request("invalid_field", format!("the field {name:?} is not UTF-8"))
            })?;
            upload.fields.entry(name).or_default().push(text);
        }
    }
    Ok(upload)
}

/// One image of a batch form: the file name it was sent with (or
/// `image-N`) and its bytes.
#[derive(Debug)]
pub struct BatchImage {
    pub name: String,
    pub bytes: Bytes,
}

/// Longest file name kept for an image of a batch, in characters.
const MAX_IMAGE_NAME: usize = 200;

/// The `image` files of a multipart form, in order (other fields are
/// ignored), within the size limit and the body deadline; 400 past
/// `max_images` files, before the rest is read.
pub async fn read_images(
    state: &AppState,
    request: Request,
    max_images: usize,
) -> Result<Vec<BatchImage>, ApiError> {
    within_deadline(state, read_image_parts(state, request, max_images)).await
}

async fn read_image_parts(
    state: &AppState,
    request: Request,
    max_images: usize,
) -> Result<Vec<BatchImage>, ApiError> {
    check_declared_length(state, request.headers())?;
    if !is_multipart(request.headers()) {
        return Err(ApiError::bad_request(
            "expected_multipart",
            "send a multipart/form-data form with one \"image\" file per image",
        ));
    }
    let multipart_error = |err| multipart_error(state, err);
    let mut form = open_form(request).await?;
    let mut images = Vec::new();
    while let Some(field) = form.next_field().await.map_err(multipart_error)? {
        if field.name() != Some("image") {
            continue;
        }
        if images.len() == max_images {
            return Err(ApiError::bad_request(
                "too_many_images",
                format!("a batch holds at most {max_images} images"),
            ));
        }
        let name = field
            .file_name()
            .map(|n| {
                n.chars()
                    .filter(|c| !c.is_control())
                    .take(MAX_IMAGE_NAME)
                    .collect::<String>()
            })
            .filter(|n| !n.trim().is_empty())
            .unwrap_or_else(|| format!("image-{}", images.len() + 1));
        let bytes = field.bytes().await.map_err(multipart_error)?;
        images.push(BatchImage { name, bytes });
    }
    Ok(images)
}

/// A multipart form read from `request`'s body.
async fn open_form(request: Request) -> Result<Multipart, ApiError> {
    Multipart::from_request(request, &())
        .await
        .map_err(|rejection| ApiError::bad_request("invalid_multipart", rejection.body_text()))
}

/// A multipart error as the client sees it: over the body limit is 413.
fn multipart_error(state: &AppState, err: axum::extract::multipart::MultipartError) -> ApiError {
    if err.status() == StatusCode::PAYLOAD_TOO_LARGE {
        too_large(state)
    } else {
        ApiError::bad_request("invalid_multipart", err.body_text())
    }
}
