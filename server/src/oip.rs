//! Open Inference Protocol v2 (KServe v2 REST, JSON only): health, model
//! metadata and `infer` with one BYTES input holding the base64 of an
//! encoded image file.

use axum::Json;
use axum::extract::rejection::PathRejection;
use axum::extract::{Path, Request, State};
use base64::Engine as _;
use base64::alphabet;
use base64::engine::{DecodePaddingMode, GeneralPurpose, GeneralPurposeConfig};
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};

use crate::error::ApiError;
use crate::inference::{Extras, decode, inspect};
use crate::routes::model_name;
use crate::state::AppState;
use crate::upload::read_body;

/// Outputs a model can give.
pub const OUTPUT_SCORE: &str = "score";
pub const OUTPUT_IS_ANOMALOUS: &str = "is_anomalous";
pub const OUTPUT_ANOMALY_MAP: &str = "anomaly_map";

/// Standard base64, padding optional.
const BASE64: GeneralPurpose = GeneralPurpose::new(
    &alphabet::STANDARD,
    GeneralPurposeConfig::new().with_decode_padding_mode(DecodePaddingMode::Indifferent),
);

pub async fn server_metadata() -> Json<Value> {
    Json(json!({
        "name": "flawscope",
        "version": env!("CARGO_PKG_VERSION"),
        "extensions": [],
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

#[derive(Serialize)]
struct TensorMetadata {
    name: &'static str,
    datatype: &'static str,
    shape: Vec<i64>,
}

pub async fn model_metadata(
    State(state): State<AppState>,
    path: Result<Path<String>, PathRejection>,
) -> Result<Json<Value>, ApiError> {
    let name = model_name(path)?;
    let model = state.model(&name)?;
    let backbone = model.summary().backbone;
    let inputs = [TensorMetadata {
        name: "image",
        datatype: "BYTES",
        shape: vec![1],
    }];
    let outputs = [
        TensorMetadata {
            name: OUTPUT_SCORE,
            datatype: "FP32",
            shape: vec![1],
        },
        TensorMetadata {
            name: OUTPUT_IS_ANOMALOUS,
            datatype: "BOOL",
            shape: vec![1],
        },
        TensorMetadata {
            name: OUTPUT_ANOMALY_MAP,
            datatype: "FP32",
            shape: vec![-1, -1],
        },
    ];
    Ok(Json(json!({
        "name": name,
        "versions": [],
        "platform": format!("flawscope-{}-{backbone}", model.detector_name()),
        "inputs": inputs,
        "outputs": outputs,
    })))
}

pub async fn model_ready(
    State(state): State<AppState>,
    path: Result<Path<String>, PathRejection>,
) -> Result<Json<Value>, ApiError> {
    let name = model_name(path)?;
    state.model(&name)?;
    if state.is_draining() {
        return Err(ApiError::ShuttingDown);
    }
    Ok(Json(json!({"name": name, "ready": true})))
}

#[derive(Debug, Deserialize)]
struct InferRequest {
    #[serde(default)]
    id: Option<String>,
    inputs: Vec<InferInput>,
    #[serde(default)]
    outputs: Option<Vec<RequestedOutput>>,
}

#[derive(Debug, Deserialize)]
struct InferInput {
    name: String,
    shape: Vec<i64>,
    datatype: String,
    data: Value,
}

#[derive(Debug, Deserialize)]
struct RequestedOutput {
    name: String,
}

#[derive(Debug, Serialize)]
pub struct InferOutput {
    name: &'static str,
    datatype: &'static str,
    shape: Vec<usize>,
    data: Value,
}

#[derive(Debug, Serialize)]
pub struct InferResponse {
    model_name: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    id: Option<String>,
    outputs: Vec<InferOutput>,
}

fn flatten<'a>(value: &'a Value, out: &mut Vec<&'a Value>) {
    match value {
        Value::Array(items) => items.iter().for_each(|v| flatten(v, out)),
        other => out.push(other),
    }
}

/// The image bytes of a request: one BYTES element holding base64.
fn image_bytes(request: &InferRequest) -> Result<Vec<u8>, ApiError> {
    let bad = |message: String| ApiError::bad_request("invalid_inference_request", message);
    let input = match request.inputs.as_slice() {
        [only] => only,
        [] => return Err(bad("no inputs: send one BYTES input with the image".into())),
        several => several
            .iter()
            .find(|i| i.name == "image")
            .ok_or_else(|| bad("several inputs and none named \"image\"".into()))?,
    };
    if !input.datatype.eq_ignore_ascii_case("BYTES") {
        return Err(bad(format!(
            "input {:?} has datatype {}; expected BYTES (base64 of an image file)",
            input.name, input.datatype
        )));
    }
    let elements =
        input.shape.iter().try_fold(
            1i64,
            |acc, d| if *d < 0 { None } else { acc.checked_mul(*d) },
        );
    if elements != Some(1) {
        return Err(bad(format!(
            "input {:?} has shape {:?}; one image per request (shape [1])",
            input.name, input.shape
        )));
    }
    let mut data = Vec::new();
    flatten(&input.data, &mut data);
    let [Value::String(encoded)] = data.as_slice() else {
        return Err(bad(format!(
            "input {:?} must hold exactly one string element (base64 of the image file)",
            input.name
        )));
    };
    let compact: String = encoded
        .chars()
        .filter(|c| !c.is_ascii_whitespace())
        .collect();
    BASE64
        .decode(compact.as_bytes())
        .map_err(|e| bad(format!("input {:?} is not valid base64: {e}", input.name)))
}

fn parse_request(body: &[u8]) -> Result<InferRequest, ApiError> {
    serde_json::from_slice(body).map_err(|e| {
        ApiError::bad_request(
            "invalid_inference_request",
            format!("not a v2 inference request: {e}"),
        )
    })
}

/// The image bytes of an `infer` request body, parsed as `infer` parses it
/// (for the fuzz target and its regression test).
pub(crate) fn request_image(body: &[u8]) -> Result<Vec<u8>, ApiError> {
    image_bytes(&parse_request(body)?)
}

/// `POST /v2/models/{name}/infer`.
pub async fn infer(
    State(state): State<AppState>,
    path: Result<Path<String>, PathRejection>,
    request: Request,
) -> Result<Json<InferResponse>, ApiError> {
    let name = model_name(path)?;
    let model = state.model(&name)?;
    if request
        .headers()
        .contains_key("inference-header-content-length")
    {
        return Err(ApiError::bad_request(
            "binary_extension_unsupported",
            "the binary tensor data extension is not supported; send JSON with the image as a \
             base64 BYTES element (binary_data=False)",
        ));
    }
    // The request is read, parsed and its image decoded before a slot is
    // taken, so a slow or bad upload never holds one.
    let _body = state.body_permit()?;
    let body = read_body(&state, request).await?;
    let parsed = parse_request(&body)?;
    drop(body);
    let wanted: Vec<&str> = match &parsed.outputs {
        Some(outputs) if !outputs.is_empty() => outputs.iter().map(|o| o.name.as_str()).collect(),
        _ => vec![OUTPUT_SCORE, OUTPUT_IS_ANOMALOUS],
    };
    for w in &wanted {
        if ![OUTPUT_SCORE, OUTPUT_IS_ANOMALOUS, OUTPUT_ANOMALY_MAP].contains(w) {
            return Err(ApiError::bad_request(
                "unknown_output",
                format!("unknown output {w:?}; available: score, is_anomalous, anomaly_map"),
            ));
        }
    }
    let image = image_bytes(&parsed)?;
    let extras = Extras {
        heatmap_png: false,
        map: wanted.contains(&OUTPUT_ANOMALY_MAP),
    };
    let image = decode(&state, image.into()).await?;
    let slot = state.slot().await?;
    let mut scored = inspect(model, image, extras, slot).await?;
    let mut outputs = Vec::with_capacity(wanted.len());
    for w in wanted {
        let output = match w {
            OUTPUT_SCORE => InferOutput {
                name: OUTPUT_SCORE,
                datatype: "FP32",
                shape: vec![1],
                data: json!([scored.score]),
            },
            OUTPUT_IS_ANOMALOUS => InferOutput {
                name: OUTPUT_IS_ANOMALOUS,
                datatype: "BOOL",
                shape: vec![1],
                data: json!([scored.is_anomalous]),
            },
            _ => {
                let map = scored.map.take().ok_or_else(|| {
                    ApiError::bad_request("duplicate_output", "anomaly_map asked for twice")
                })?;
                InferOutput {
                    name: OUTPUT_ANOMALY_MAP,
                    datatype: "FP32",
                    shape: vec![map.height, map.width],
                    data: json!(map.values),
                }
            }
        };
        outputs.push(output);
    }
    Ok(Json(InferResponse {
        model_name: name,
        id: parsed.id,
        outputs,
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn request(value: Value) -> InferRequest {
        serde_json::from_value(value).unwrap()
    }

    #[test]
    fn bytes_input_nested_or_flat_decodes() {
        for data in [json!(["aGk="]), json!([["aGk"]]), json!("aGk=\n")] {
            let r = request(
                json!({"inputs": [{"name": "x", "shape": [1], "datatype": "BYTES", "data": data}]}),
            );
            assert_eq!(image_bytes(&r).unwrap(), b"hi");
        }
    }

    #[test]
    fn wrong_inputs_are_refused() {
        for input in [
            json!({"name": "image", "shape": [1], "datatype": "FP32", "data": [1.0]}),
            json!({"name": "image", "shape": [2], "datatype": "BYTES", "data": ["aGk=", "aGk="]}),
            json!({"name": "image", "shape": [-1], "datatype": "BYTES", "data": ["aGk="]}),
            json!({"name": "image", "shape": [1], "datatype": "BYTES", "data": [1]}),
            json!({"name": "image", "shape": [1], "datatype": "BYTES", "data": ["!!"]}),
        ] {
            let r = request(json!({ "inputs": [input] }));
            assert!(image_bytes(&r).is_err());
        }
        assert!(image_bytes(&request(json!({"inputs": []}))).is_err());
    }
}
