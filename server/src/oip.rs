//! Open Inference Protocol v2 over REST (KServe v2): health, server and
//! model metadata, model readiness and `infer`, also under the versioned
//! routes (`/v2/models/{name}/versions/1/...`; a model file has one
//! version, "1"). `infer` takes one BYTES input holding an encoded image
//! file, in JSON (the element is the file's bytes as a string) or in the
//! binary tensor data extension (`Inference-Header-Content-Length`), and
//! answers `score`, `is_anomalous` and `anomaly_map`, in JSON or binary as
//! asked. Errors on `/v2` are `{"error": "<message>"}`. The inference
//! itself ([`infer_image`]) is shared with the gRPC service.

use flawscope_core::operating_point::Target;
use std::sync::Arc;

use axum::Json;
use axum::body::{Body, Bytes};
use axum::extract::{Request, State};
use axum::http::{HeaderMap, HeaderValue, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use base64::Engine as _;
use base64::alphabet;
use base64::engine::{DecodePaddingMode, GeneralPurpose, GeneralPurposeConfig};
use flawscope_core::model::Model;
use image::Rgb32FImage;
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value, json};

use crate::error::{ApiError, ErrorMessage};
use crate::extract::{PathModel, ScoringBody, ScoringUpload};
use crate::inference::{Extras, decode, inspect};
use crate::oip_json::{Bounded, MAX_BATCH, MAX_DIMS, MAX_TENSORS, Parameters, Strings};
use crate::state::{AppState, MODEL_VERSION};
use crate::upload::read_body;

/// The one input of every model: `N` encoded image files.
pub const IMAGE_INPUT: &str = "image";

/// Outputs a model can give.
pub const OUTPUT_SCORE: &str = "score";
pub const OUTPUT_IS_ANOMALOUS: &str = "is_anomalous";
pub const OUTPUT_ANOMALY_MAP: &str = "anomaly_map";

/// Protocol extensions served (REST; gRPC carries raw tensors natively).
pub const EXTENSIONS: [&str; 1] = ["binary_tensor_data"];

/// The header of the binary tensor data extension: the length of the JSON
/// part at the start of the body.
pub const HEADER_LENGTH: &str = "inference-header-content-length";

/// Standard base64, padding optional (only with `content_type: base64`).
const BASE64: GeneralPurpose = GeneralPurpose::new(
    &alphabet::STANDARD,
    GeneralPurposeConfig::new().with_decode_padding_mode(DecodePaddingMode::Indifferent),
);

/// Rewrites the error body of every `/v2` route to the KServe v2 shape,
/// `{"error": "<message>"}`; the stable code moves to the
/// `Flawscope-Error-Code` header. Other routes keep their own shape.
pub async fn v2_errors(request: Request, next: Next) -> Response {
    let path = request.uri().path();
    let v2 = path == "/v2" || path.starts_with("/v2/");
    let response = next.run(request).await;
    if !v2 {
        return response;
    }
    let Some(ErrorMessage { code, message }) = response.extensions().get::<ErrorMessage>().cloned()
    else {
        return response;
    };
    let (mut parts, _) = response.into_parts();
    parts.headers.remove(header::CONTENT_LENGTH);
    if let Ok(value) = HeaderValue::from_str(code) {
        parts.headers.insert("flawscope-error-code", value);
    }
    let body = serde_json::to_vec(&json!({ "error": message }))
        .unwrap_or_else(|_| br#"{"error":"internal error"}"#.to_vec());
    Response::from_parts(parts, Body::from(body))
}

pub async fn server_metadata() -> Json<Value> {
    Json(json!({
        "name": "flawscope",
        "version": env!("CARGO_PKG_VERSION"),
        "extensions": EXTENSIONS,
    }))
}

pub async fn live() -> Json<Value> {
    Json(json!({"live": true}))
}

pub async fn ready(State(state): State<AppState>) -> Result<Json<Value>, ApiError> {
    if state.is_draining() {
        return Err(ApiError::ShuttingDown);
    }
    Ok(Json(json!({"ready": true})))
}

/// One tensor of the model's signature.
#[derive(Debug, Clone, Serialize)]
pub struct TensorMetadata {
    pub name: &'static str,
    pub datatype: &'static str,
    pub shape: Vec<i64>,
}

/// The model's signature: inputs, outputs.
pub fn signature() -> (Vec<TensorMetadata>, Vec<TensorMetadata>) {
    let tensor = |name, datatype, shape: &[i64]| TensorMetadata {
        name,
        datatype,
        shape: shape.to_vec(),
    };
    (
        vec![tensor(IMAGE_INPUT, "BYTES", &[-1])],
        vec![
            tensor(OUTPUT_SCORE, "FP32", &[1]),
            tensor(OUTPUT_IS_ANOMALOUS, "BOOL", &[1]),
            tensor(OUTPUT_ANOMALY_MAP, "FP32", &[-1, -1]),
        ],
    )
}

/// The platform string of a model's metadata.
pub fn platform(model: &Model) -> String {
    format!(
        "flawscope-{}-{}",
        model.detector_name(),
        model.summary().backbone
    )
}

pub async fn model_metadata(PathModel { name, model }: PathModel) -> Result<Json<Value>, ApiError> {
    let (inputs, outputs) = signature();
    Ok(Json(json!({
        "name": name,
        "versions": [MODEL_VERSION],
        "platform": platform(&model),
        "inputs": inputs,
        "outputs": outputs,
    })))
}

pub async fn model_ready(
    State(state): State<AppState>,
    PathModel { name, .. }: PathModel,
) -> Result<Json<Value>, ApiError> {
    if state.is_draining() {
        return Err(ApiError::ShuttingDown);
    }
    Ok(Json(json!({"name": name, "ready": true})))
}

#[derive(Debug, Deserialize)]
struct InferRequest {
    #[serde(default)]
    id: Option<String>,
    inputs: Bounded<InferInput, MAX_TENSORS>,
    #[serde(default)]
    outputs: Option<Bounded<RequestedOutput, MAX_TENSORS>>,
    #[serde(default)]
    parameters: Option<Parameters>,
}

#[derive(Debug, Deserialize)]
struct InferInput {
    name: String,
    shape: Bounded<i64, MAX_DIMS>,
    datatype: String,
    #[serde(default)]
    parameters: Option<Parameters>,
    #[serde(default)]
    data: Option<Strings>,
}

#[derive(Debug, Deserialize)]
struct RequestedOutput {
    name: String,
    #[serde(default)]
    parameters: Option<Parameters>,
}

/// An output the model can give.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OutputKind {
    Score,
    IsAnomalous,
    AnomalyMap,
}

impl OutputKind {
    pub const ALL: [Self; 3] = [Self::Score, Self::IsAnomalous, Self::AnomalyMap];

    pub fn name(self) -> &'static str {
        match self {
            Self::Score => OUTPUT_SCORE,
            Self::IsAnomalous => OUTPUT_IS_ANOMALOUS,
            Self::AnomalyMap => OUTPUT_ANOMALY_MAP,
        }
    }
}

/// The outputs asked for, by name, in order; none listed: all of them (as
/// the protocol says). Unknown or repeated names are refused.
pub(crate) fn wanted_outputs<'a>(
    names: impl IntoIterator<Item = &'a str>,
) -> Result<Vec<OutputKind>, ApiError> {
    let mut wanted = Vec::new();
    for name in names {
        let kind = OutputKind::ALL
            .into_iter()
            .find(|k| k.name() == name)
            .ok_or_else(|| {
                ApiError::bad_request(
                    "unknown_output",
                    format!("unknown output {name:?}; available: score, is_anomalous, anomaly_map"),
                )
            })?;
        if wanted.contains(&kind) {
            return Err(ApiError::bad_request(
                "duplicate_output",
                format!("output {name:?} asked for twice"),
            ));
        }
        wanted.push(kind);
    }
    if wanted.is_empty() {
        wanted = OutputKind::ALL.to_vec();
    }
    Ok(wanted)
}

/// The values of one output tensor.
#[derive(Debug, Clone, PartialEq)]
pub enum TensorData {
    Fp32(Vec<f32>),
    Bool(Vec<bool>),
}

impl TensorData {
    pub fn datatype(&self) -> &'static str {
        match self {
            Self::Fp32(_) => "FP32",
            Self::Bool(_) => "BOOL",
        }
    }

    /// The raw tensor layout both the binary extension and gRPC's
    /// `raw_output_contents` use: little-endian, row-major, BOOL one byte.
    pub fn to_le_bytes(&self) -> Vec<u8> {
        match self {
            Self::Fp32(values) => values.iter().flat_map(|v| v.to_le_bytes()).collect(),
            Self::Bool(values) => values.iter().map(|&b| u8::from(b)).collect(),
        }
    }

    fn to_json(&self) -> Value {
        match self {
            Self::Fp32(values) => json!(values),
            Self::Bool(values) => json!(values),
        }
    }
}

/// One output tensor.
#[derive(Debug, Clone)]
pub struct OutputTensor {
    pub name: &'static str,
    pub shape: Vec<usize>,
    pub data: TensorData,
}

/// Waits for a slot, scores a decoded `image` with `model` and returns the
/// `wanted` outputs (shared by REST and gRPC).
pub(crate) async fn infer_image(
    state: &AppState,
    model: Arc<Model>,
    image: Rgb32FImage,
    wanted: &[OutputKind],
    target: Option<Target>,
) -> Result<Vec<OutputTensor>, ApiError> {
    let extras = Extras {
        heatmap_png: false,
        target,
    };
    let slot = state.slot().await?;
    let scored = inspect(model, image, extras, Vec::new(), slot).await?;
    let mut map = Some(scored.inspection.map);
    let mut outputs = Vec::with_capacity(wanted.len());
    for kind in wanted {
        let (shape, data) = match kind {
            OutputKind::Score => (vec![1], TensorData::Fp32(vec![scored.inspection.score])),
            OutputKind::IsAnomalous => (
                vec![1],
                TensorData::Bool(vec![scored.inspection.is_anomalous]),
            ),
            OutputKind::AnomalyMap => {
                let map = map
                    .take()
                    .ok_or_else(|| ApiError::Internal("the anomaly map was not kept".to_owned()))?;
                (vec![map.height, map.width], TensorData::Fp32(map.values))
            }
        };
        outputs.push(OutputTensor {
            name: kind.name(),
            shape,
            data,
        });
    }
    Ok(outputs)
}

fn bad(message: String) -> ApiError {
    ApiError::bad_request("invalid_inference_request", message)
}

/// The outputs of a batch from each image's ([`infer_image`], in order):
/// one image's as they are; for several, `score` and `is_anomalous` of
/// shape `[N]` and `anomaly_map` of shape `[N, H, W]`, which needs the
/// images to share one size.
pub(crate) fn batch_outputs(
    mut answers: Vec<Vec<OutputTensor>>,
) -> Result<Vec<OutputTensor>, ApiError> {
    if answers.len() == 1 {
        return Ok(answers.pop().unwrap_or_default());
    }
    let n = answers.len();
    let Some(first) = answers.first() else {
        return Ok(Vec::new());
    };
    let mut outputs: Vec<OutputTensor> = first
        .iter()
        .map(|o| OutputTensor {
            name: o.name,
            shape: std::iter::once(n)
                .chain(if o.name == OUTPUT_ANOMALY_MAP {
                    o.shape.clone()
                } else {
                    Vec::new()
                })
                .collect(),
            data: match o.data {
                TensorData::Fp32(_) => TensorData::Fp32(Vec::new()),
                TensorData::Bool(_) => TensorData::Bool(Vec::new()),
            },
        })
        .collect();
    for answer in answers {
        for (out, part) in outputs.iter_mut().zip(answer) {
            if part.name == OUTPUT_ANOMALY_MAP && out.shape[1..] != part.shape[..] {
                return Err(bad(format!(
                    "the anomaly maps of this batch differ in size ({:?} and {:?}); send \
                     images of one size together, or ask for score and is_anomalous only",
                    &out.shape[1..],
                    part.shape
                )));
            }
            match (&mut out.data, part.data) {
                (TensorData::Fp32(all), TensorData::Fp32(mut more)) => all.append(&mut more),
                (TensorData::Bool(all), TensorData::Bool(mut more)) => all.append(&mut more),
                _ => return Err(ApiError::Internal("mixed output types".into())),
            }
        }
    }
    Ok(outputs)
}

/// Checks a request's inputs as the reference server (Triton) does: exactly
/// one input, named `image`, BYTES, of shape `[N]` with `1 ≤ N ≤`
/// [`MAX_BATCH`] (N images, answered one by one). Returns `N`.
pub(crate) fn check_inputs<'a>(
    inputs: &[(&'a str, &'a str, &'a [i64])],
    model: &str,
) -> Result<usize, ApiError> {
    if let Some((name, ..)) = inputs.iter().find(|(name, ..)| *name != IMAGE_INPUT) {
        return Err(bad(format!(
            "unexpected inference input {name:?} for model {model:?}; its one input is \
             \"{IMAGE_INPUT}\" (BYTES, shape [N])"
        )));
    }
    let [(name, datatype, shape)] = inputs else {
        return Err(bad(if inputs.is_empty() {
            format!(
                "expected 1 input but got 0 for model {model:?}: send the images as the \
                 BYTES input \"{IMAGE_INPUT}\""
            )
        } else {
            format!(
                "input \"{IMAGE_INPUT}\" is specified {} times for model {model:?}; send it once",
                inputs.len()
            )
        }));
    };
    if !datatype.eq_ignore_ascii_case("BYTES") {
        return Err(bad(format!(
            "input {name:?} has datatype {datatype}; expected BYTES (encoded image files)"
        )));
    }
    match shape {
        [n] if (1..=MAX_BATCH as i64).contains(n) => Ok(*n as usize),
        [n] if *n > MAX_BATCH as i64 => Err(bad(format!(
            "input {name:?} has shape {shape:?}: at most {MAX_BATCH} images per request"
        ))),
        _ => Err(bad(format!(
            "input {name:?} has shape {shape:?}; expected [N], N images (1 to {MAX_BATCH})"
        ))),
    }
}

/// The `count` elements of a BYTES tensor in the raw layout (each a 4-byte
/// little-endian length, then that many bytes), as the binary extension
/// and gRPC's `raw_input_contents` carry them; any other length is refused.
pub(crate) fn bytes_elements(name: &str, raw: &[u8], count: usize) -> Result<Vec<Bytes>, ApiError> {
    let malformed = || {
        bad(format!(
            "input {name:?}: binary BYTES data must be {count} element(s), each a 4-byte \
             little-endian length and then that many bytes ({} bytes received)",
            raw.len()
        ))
    };
    let mut rest = raw;
    let mut elements = Vec::with_capacity(count);
    for _ in 0..count {
        let (length, tail) = rest.split_first_chunk::<4>().ok_or_else(malformed)?;
        let length = u32::from_le_bytes(*length) as usize;
        if tail.len() < length {
            return Err(malformed());
        }
        let (element, tail) = tail.split_at(length);
        elements.push(Bytes::copy_from_slice(element));
        rest = tail;
    }
    if !rest.is_empty() {
        return Err(malformed());
    }
    Ok(elements)
}

/// Whether a tensor's `content_type` parameter asks for base64 (the one
/// alternative to raw bytes in JSON).
fn is_base64(parameters: Option<&Parameters>) -> bool {
    parameters
        .and_then(|p| p.0.get("content_type"))
        .and_then(Value::as_str)
        .is_some_and(|c| c.eq_ignore_ascii_case("base64"))
}

/// The `binary_data_size` parameter of a tensor, if it has one.
fn binary_size(name: &str, parameters: Option<&Parameters>) -> Result<Option<usize>, ApiError> {
    match parameters.and_then(|p| p.0.get("binary_data_size")) {
        None | Some(Value::Null) => Ok(None),
        Some(value) => value
            .as_u64()
            .and_then(|n| usize::try_from(n).ok())
            .map(Some)
            .ok_or_else(|| {
                bad(format!(
                    "input {name:?}: binary_data_size must be a byte count"
                ))
            }),
    }
}

/// The image files of a request whose binary part (after the JSON) is
/// `binary`: from the binary part when the input has `binary_data_size`,
/// else from its JSON `data` (each file's bytes as a string, or base64
/// with `"parameters": {"content_type": "base64"}`).
fn image_bytes(request: &InferRequest, binary: &[u8], model: &str) -> Result<Vec<Bytes>, ApiError> {
    let listed: Vec<(&str, &str, &[i64])> = request
        .inputs
        .0
        .iter()
        .map(|i| (i.name.as_str(), i.datatype.as_str(), i.shape.0.as_slice()))
        .collect();
    let count = check_inputs(&listed, model)?;
    let input = &request.inputs.0[0];
    if let Some(size) = binary_size(&input.name, input.parameters.as_ref())? {
        if size != binary.len() {
            return Err(bad(format!(
                "input {:?} claims {size} bytes of binary data, but {} follow the JSON header",
                input.name,
                binary.len()
            )));
        }
        return bytes_elements(&input.name, binary, count);
    }
    if !binary.is_empty() {
        return Err(bad(format!(
            "{} bytes of binary data follow the JSON header, but no input has binary_data_size",
            binary.len()
        )));
    }
    let data = input.data.as_ref().ok_or_else(|| {
        bad(format!(
            "input {:?} has neither data nor binary_data_size",
            input.name
        ))
    })?;
    if data.0.len() != count {
        return Err(bad(format!(
            "input {:?} has shape [{count}] but {} element(s) in data",
            input.name,
            data.0.len()
        )));
    }
    let base64 = is_base64(input.parameters.as_ref());
    data.0
        .iter()
        .map(|text| {
            if base64 {
                let compact: String = text.chars().filter(|c| !c.is_ascii_whitespace()).collect();
                BASE64
                    .decode(compact.as_bytes())
                    .map(Bytes::from)
                    .map_err(|e| bad(format!("input {:?} is not valid base64: {e}", input.name)))
            } else {
                Ok(Bytes::copy_from_slice(text.as_bytes()))
            }
        })
        .collect()
}

/// Splits a body into the JSON header and the binary part after it, as
/// `Inference-Header-Content-Length` says (none: all JSON).
fn split_body<'a>(headers: &HeaderMap, body: &'a [u8]) -> Result<(&'a [u8], &'a [u8]), ApiError> {
    let Some(value) = headers.get(HEADER_LENGTH) else {
        return Ok((body, &[]));
    };
    let length = value
        .to_str()
        .ok()
        .and_then(|v| v.trim().parse::<usize>().ok())
        .filter(|n| *n <= body.len())
        .ok_or_else(|| {
            bad(format!(
                "Inference-Header-Content-Length must be a byte count within the {}-byte body",
                body.len()
            ))
        })?;
    Ok(body.split_at(length))
}

fn parse_request(json: &[u8]) -> Result<InferRequest, ApiError> {
    serde_json::from_slice(json).map_err(|e| bad(format!("not a v2 inference request: {e}")))
}

/// The image files of an all-JSON `infer` request body, parsed as `infer`
/// parses it (for the fuzz target and its regression test).
pub(crate) fn request_images(body: &[u8]) -> Result<Vec<Vec<u8>>, ApiError> {
    let images = image_bytes(&parse_request(body)?, &[], "fuzz")?;
    Ok(images.into_iter().map(|b| b.to_vec()).collect())
}

/// A `bool` parameter (absent: `None`).
/// The request parameters `max_far` / `max_mar` (numbers in [0, 1), at
/// most one): the request's operating point.
pub(crate) fn request_target(
    parameters: Option<&Map<String, Value>>,
) -> Result<Option<Target>, ApiError> {
    let rate = |key: &str| -> Result<Option<f64>, ApiError> {
        match parameters.and_then(|p| p.get(key)) {
            None => Ok(None),
            Some(value) => value.as_f64().map(Some).ok_or_else(|| {
                ApiError::bad_request(
                    "invalid_operating_point",
                    format!("the parameter {key} must be a number in [0, 1)"),
                )
            }),
        }
    };
    Target::from_request(rate("max_far")?, rate("max_mar")?)
        .map_err(|e| ApiError::bad_request("invalid_operating_point", e.to_string()))
}

fn bool_parameter(parameters: Option<&Parameters>, key: &str) -> Option<bool> {
    parameters
        .and_then(|p| p.0.get(key))
        .and_then(Value::as_bool)
}

/// The body of an `infer` request: a v2 inference request, in JSON or with
/// the binary tensor data extension, parsed and checked.
pub(crate) struct InferBody {
    /// The request, its inputs left out (the image is read from them).
    parsed: InferRequest,
    wanted: Vec<OutputKind>,
    /// `binary_data_output`: every output in binary unless it says.
    all_binary: bool,
    target: Option<Target>,
    /// The batch's images after the first (which the extractor decodes),
    /// decoded and scored one at a time.
    rest: Vec<Bytes>,
}

/// Largest JSON part of an `infer` request: a quarter of the body limit
/// (at least 1 MiB). JSON carries an image as a string (base64 costs a
/// third more); large images belong in the binary extension, whose part
/// has the whole body limit.
pub(crate) fn json_limit(state: &AppState) -> usize {
    let body = state.config().body_limit;
    (body / 4).max(1 << 20).min(body)
}

fn json_too_large(state: &AppState) -> ApiError {
    ApiError::PayloadTooLarge(format!(
        "the JSON part of an inference request is over the limit of {} bytes; send images \
         with the binary tensor data extension (binary_data_size), limited to {} bytes",
        json_limit(state),
        state.config().body_limit
    ))
}

impl ScoringBody for InferBody {
    /// Compressed requests are refused before anything is read.
    fn admit(headers: &HeaderMap) -> Result<(), ApiError> {
        let encoding = headers
            .get(header::CONTENT_ENCODING)
            .and_then(|v| v.to_str().ok())
            .map(|v| v.trim().to_ascii_lowercase());
        if encoding.as_deref().is_some_and(|e| e != "identity") {
            return Err(ApiError::bad_request(
                "unsupported_encoding",
                "compressed requests are not supported; send the body uncompressed",
            ));
        }
        Ok(())
    }

    async fn read(state: &AppState, request: Request) -> Result<(Self, Bytes), ApiError> {
        let headers = request.headers().clone();
        // An all-JSON body declared over the JSON limit is refused unread.
        let declared = headers
            .get(header::CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.trim().parse::<u64>().ok());
        if !headers.contains_key(HEADER_LENGTH)
            && declared.is_some_and(|n| n > json_limit(state) as u64)
        {
            return Err(json_too_large(state));
        }
        let model = request
            .uri()
            .path()
            .split('/')
            .nth(3)
            .unwrap_or_default()
            .to_owned();
        let body = read_body(state, request).await?;
        let (json_part, _) = split_body(&headers, &body)?;
        if json_part.len() > json_limit(state) {
            return Err(json_too_large(state));
        }
        // Parsing takes a while for megabytes of JSON: off the async
        // threads, so health checks and other requests are not held up.
        let parse = move || -> Result<(Self, Bytes), ApiError> {
            let (json_part, binary) = split_body(&headers, &body)?;
            let mut parsed = parse_request(json_part)?;
            let wanted = wanted_outputs(
                parsed
                    .outputs
                    .iter()
                    .flat_map(|o| &o.0)
                    .map(|o| o.name.as_str()),
            )?;
            let mut images = image_bytes(&parsed, binary, &model)?.into_iter();
            let first = images
                .next()
                .ok_or_else(|| bad("no image in the request".into()))?;
            parsed.inputs = Bounded(Vec::new());
            let all_binary =
                bool_parameter(parsed.parameters.as_ref(), "binary_data_output").unwrap_or(false);
            let target = request_target(parsed.parameters.as_ref().map(|p| &p.0))?;
            let infer = Self {
                parsed,
                wanted,
                all_binary,
                target,
                rest: images.collect(),
            };
            Ok((infer, first))
        };
        tokio::task::spawn_blocking(parse)
            .await
            .map_err(|e| ApiError::Internal(format!("parsing the request failed: {e}")))?
    }
}

/// `POST /v2/models/{name}[/versions/{version}]/infer`.
pub async fn infer(
    State(state): State<AppState>,
    PathModel { name, model }: PathModel,
    upload: ScoringUpload<InferBody>,
) -> Result<Response, ApiError> {
    let ScoringUpload {
        permit: _body,
        pixels: _pixels,
        body:
            InferBody {
                parsed,
                wanted,
                all_binary,
                target,
                rest,
            },
        image,
    } = upload;
    let mut answers = vec![infer_image(&state, Arc::clone(&model), image, &wanted, target).await?];
    drop(_pixels);
    for bytes in rest {
        // One image of the batch at a time, each with its own room.
        let (image, _pixels) = decode(&state, bytes).await?;
        answers.push(infer_image(&state, Arc::clone(&model), image, &wanted, target).await?);
    }
    let outputs = batch_outputs(answers)?;
    let requested: Vec<&RequestedOutput> = parsed.outputs.iter().flat_map(|o| &o.0).collect();

    let mut json_outputs = Vec::with_capacity(outputs.len());
    let mut binary_part = Vec::new();
    for output in &outputs {
        let own = requested
            .iter()
            .find(|r| r.name == output.name)
            .and_then(|r| bool_parameter(r.parameters.as_ref(), "binary_data"));
        let mut tensor = json!({
            "name": output.name,
            "datatype": output.data.datatype(),
            "shape": output.shape,
        });
        if own.unwrap_or(all_binary) {
            let raw = output.data.to_le_bytes();
            tensor["parameters"] = json!({"binary_data_size": raw.len()});
            binary_part.extend_from_slice(&raw);
        } else {
            tensor["data"] = output.data.to_json();
        }
        json_outputs.push(tensor);
    }
    let mut answer = json!({
        "model_name": name,
        "model_version": MODEL_VERSION,
        "outputs": json_outputs,
    });
    if let Some(id) = parsed.id {
        answer["id"] = json!(id);
    }
    let mut bytes = serde_json::to_vec(&answer)
        .map_err(|e| ApiError::Internal(format!("writing the answer: {e}")))?;
    if binary_part.is_empty() {
        return Ok(([(header::CONTENT_TYPE, "application/json")], bytes).into_response());
    }
    let json_length = bytes.len();
    bytes.extend_from_slice(&binary_part);
    Ok((
        [
            (
                header::CONTENT_TYPE,
                HeaderValue::from_static("application/octet-stream"),
            ),
            (
                header::HeaderName::from_static(HEADER_LENGTH),
                HeaderValue::from(json_length),
            ),
        ],
        bytes,
    )
        .into_response())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn request(value: Value) -> InferRequest {
        serde_json::from_value(value).unwrap()
    }

    fn images(value: Value, binary: &[u8]) -> Result<Vec<Bytes>, ApiError> {
        image_bytes(&request(value), binary, "cells")
    }

    fn bytes_element(payload: &[u8]) -> Vec<u8> {
        let mut out = (payload.len() as u32).to_le_bytes().to_vec();
        out.extend_from_slice(payload);
        out
    }

    #[test]
    fn json_bytes_element_is_the_raw_string() {
        for data in [json!(["hi"]), json!([["hi"]]), json!("hi")] {
            let r = json!({"inputs": [{"name": "image", "shape": [1], "datatype": "BYTES", "data": data}]});
            assert_eq!(images(r, &[]).unwrap(), vec![Bytes::from_static(b"hi")]);
        }
        // A base64-looking string is still just bytes without the parameter.
        let r = json!({"inputs": [{"name": "image", "shape": [1], "datatype": "BYTES", "data": ["aGk="]}]});
        assert_eq!(images(r, &[]).unwrap(), vec![Bytes::from_static(b"aGk=")]);
    }

    #[test]
    fn base64_only_when_asked_for() {
        for data in [json!(["aGk="]), json!([["aGk"]]), json!("aGk=\n")] {
            let r = json!({"inputs": [{"name": "image", "shape": [1], "datatype": "BYTES",
                "parameters": {"content_type": "base64"}, "data": data}]});
            assert_eq!(images(r, &[]).unwrap(), vec![Bytes::from_static(b"hi")]);
        }
        let r = json!({"inputs": [{"name": "image", "shape": [1], "datatype": "BYTES",
            "parameters": {"content_type": "base64"}, "data": ["!!"]}]});
        assert!(images(r, &[]).is_err());
    }

    #[test]
    fn a_batch_is_n_elements_in_json_or_binary() {
        let r = json!({"inputs": [{"name": "image", "shape": [3], "datatype": "BYTES",
            "data": ["a", "b", "c"]}]});
        assert_eq!(images(r, &[]).unwrap().len(), 3);
        let binary = [bytes_element(b"PNG1"), bytes_element(b"PNG22")].concat();
        let r = json!({"inputs": [{"name": "image", "shape": [2], "datatype": "BYTES",
            "parameters": {"binary_data_size": binary.len()}}]});
        assert_eq!(
            images(r.clone(), &binary).unwrap(),
            vec![Bytes::from_static(b"PNG1"), Bytes::from_static(b"PNG22")]
        );
        // Sizes that do not add up to the binary part are refused.
        assert!(images(r.clone(), &binary[..binary.len() - 1]).is_err());
        let mut longer = binary.clone();
        longer.push(0);
        assert!(images(r, &longer).is_err());
    }

    #[test]
    fn binary_bytes_elements_must_be_length_prefixed() {
        assert_eq!(
            bytes_elements("x", &bytes_element(b"ab"), 1).unwrap(),
            vec![Bytes::from_static(b"ab")]
        );
        assert_eq!(
            bytes_elements("x", &bytes_element(b""), 1).unwrap(),
            vec![Bytes::new()]
        );
        for bad in [
            &b""[..],
            &b"\x02\0\0"[..],
            &b"\x02\0\0\0a"[..],
            &b"\x01\0\0\0ab"[..],
        ] {
            assert!(bytes_elements("x", bad, 1).is_err(), "{bad:?}");
        }
        let mut two = bytes_element(b"a");
        two.extend_from_slice(&bytes_element(b"b"));
        assert!(bytes_elements("x", &two, 1).is_err());
        assert_eq!(bytes_elements("x", &two, 2).unwrap().len(), 2);
        assert!(bytes_elements("x", &two, 3).is_err());
    }

    #[test]
    fn the_header_length_splits_the_body() {
        let mut headers = HeaderMap::new();
        let body = b"{}rest";
        assert_eq!(split_body(&headers, body).unwrap(), (&body[..], &b""[..]));
        headers.insert(HEADER_LENGTH, HeaderValue::from_static("2"));
        assert_eq!(
            split_body(&headers, body).unwrap(),
            (&b"{}"[..], &b"rest"[..])
        );
        for bad in ["7", "-1", "x", ""] {
            headers.insert(HEADER_LENGTH, HeaderValue::from_static(bad));
            assert!(split_body(&headers, body).is_err(), "{bad}");
        }
    }

    #[test]
    fn inputs_are_refused_as_triton_refuses_them() {
        let image = |name: &str, shape: Value| json!({"name": name, "shape": shape, "datatype": "BYTES", "data": ["a"]});
        for (inputs, says) in [
            (
                json!([image("nonsense_name", json!([1]))]),
                "unexpected inference input \"nonsense_name\"",
            ),
            (
                json!([image("image", json!([1])), image("extra", json!([1]))]),
                "unexpected inference input \"extra\"",
            ),
            (
                json!([image("image", json!([1])), image("image", json!([1]))]),
                "specified 2 times",
            ),
            (json!([]), "expected 1 input but got 0"),
            (json!([image("image", json!([]))]), "expected [N]"),
            (json!([image("image", json!([1, 1]))]), "expected [N]"),
            (json!([image("image", json!([0]))]), "expected [N]"),
            (json!([image("image", json!([-1]))]), "expected [N]"),
            (json!([image("image", json!([9]))]), "at most 8 images"),
            (
                json!([image("image", json!([2]))]),
                "shape [2] but 1 element",
            ),
            (
                json!([{"name": "image", "shape": [1], "datatype": "FP32", "data": ["a"]}]),
                "datatype FP32",
            ),
            (
                json!([{"name": "image", "shape": [1], "datatype": "BYTES"}]),
                "neither data",
            ),
        ] {
            let err = images(json!({ "inputs": inputs }), &[]).unwrap_err();
            assert!(err.to_string().contains(says), "{inputs}: {err}");
        }
        // Values of the wrong kind are refused while parsing.
        for body in [
            json!({"inputs": [{"name": "image", "shape": [1], "datatype": "BYTES", "data": [1]}]}),
            json!({"inputs": [{"name": "image", "shape": [1], "datatype": "BYTES",
                   "parameters": {"binary_data_size": -3}}]}),
            json!({"inputs": [{"name": "image", "shape": [1], "datatype": "BYTES", "data": ["a"],
                   "parameters": {"x": [1, 2]}}]}),
        ] {
            let parsed = serde_json::to_vec(&body).unwrap();
            assert!(request_images(&parsed).is_err(), "{body}");
        }
    }

    #[test]
    fn outputs_default_to_all_and_refuse_unknown_or_repeated() {
        assert_eq!(wanted_outputs([]).unwrap(), OutputKind::ALL.to_vec());
        assert_eq!(
            wanted_outputs(["anomaly_map", "score"]).unwrap(),
            vec![OutputKind::AnomalyMap, OutputKind::Score]
        );
        assert!(wanted_outputs(["logits"]).is_err());
        assert!(wanted_outputs(["score", "score"]).is_err());
    }

    #[test]
    fn batch_outputs_stack_per_image_answers() {
        let one = |score: f32, side: usize| {
            vec![
                OutputTensor {
                    name: OUTPUT_SCORE,
                    shape: vec![1],
                    data: TensorData::Fp32(vec![score]),
                },
                OutputTensor {
                    name: OUTPUT_ANOMALY_MAP,
                    shape: vec![side, side],
                    data: TensorData::Fp32(vec![score; side * side]),
                },
            ]
        };
        let single = batch_outputs(vec![one(0.1, 2)]).unwrap();
        assert_eq!(single[1].shape, vec![2, 2]);
        let two = batch_outputs(vec![one(0.1, 2), one(0.9, 2)]).unwrap();
        assert_eq!(two[0].shape, vec![2]);
        assert_eq!(two[0].data, TensorData::Fp32(vec![0.1, 0.9]));
        assert_eq!(two[1].shape, vec![2, 2, 2]);
        assert!(batch_outputs(vec![one(0.1, 2), one(0.9, 3)]).is_err());
    }

    #[test]
    fn raw_tensors_are_little_endian() {
        assert_eq!(
            TensorData::Fp32(vec![1.0, -2.5]).to_le_bytes(),
            [1.0f32.to_le_bytes(), (-2.5f32).to_le_bytes()].concat()
        );
        assert_eq!(
            TensorData::Bool(vec![true, false]).to_le_bytes(),
            vec![1, 0]
        );
    }
}
