//! Open Inference Protocol v2 conformance, REST and gRPC: the binary tensor
//! data extension both ways, raw bytes as a JSON BYTES element, the KServe
//! error body on `/v2`, versioned routes, and the gRPC service sharing
//! models, slots, token, limits and metrics with HTTP.
#![allow(clippy::unwrap_used)]

use std::sync::{Arc, OnceLock};

use axum::Router;
use axum::body::{Body, Bytes, to_bytes};
use axum::http::{HeaderMap, Request, StatusCode, header};
use flawscope_core::Device;
use flawscope_core::model::Model;
use flawscope_core::runtime::Runtime;
use flawscope_server::grpc::proto;
use flawscope_server::grpc::proto::grpc_inference_service_client::GrpcInferenceServiceClient;
use flawscope_server::{AppState, ServedModel, ServerConfig, Token, app};
use serde_json::{Value, json};
use tonic::Code;
use tower::ServiceExt;

mod common;
use common::images_in;

/// One model per test binary: fitted on 12 good cells.
fn model() -> Arc<Model> {
    static MODEL: OnceLock<Arc<Model>> = OnceLock::new();
    MODEL
        .get_or_init(|| Arc::new(common::small_patchcore(12, 256, &Runtime::new(Device::Cpu))))
        .clone()
}

fn state_with(config: ServerConfig) -> AppState {
    AppState::new(
        vec![ServedModel {
            name: "cells".into(),
            model: model(),
        }],
        config,
    )
    .unwrap()
}

fn config() -> ServerConfig {
    ServerConfig::default().with_slots(2)
}

fn defect_png() -> Vec<u8> {
    std::fs::read(&images_in("test/defect")[0]).unwrap()
}

/// A 32×32 grey 24-bit BMP whose every byte is ASCII, so it can travel as
/// a JSON string (raw bytes in JSON must be UTF-8).
fn ascii_bmp() -> Vec<u8> {
    let (w, h) = (32u32, 32u32);
    let pixels = (w * h * 3) as usize;
    let mut out = b"BM".to_vec();
    for v in [54 + pixels as u32, 0, 54, 40, w, h] {
        out.extend_from_slice(&v.to_le_bytes());
    }
    out.extend_from_slice(&1u16.to_le_bytes());
    out.extend_from_slice(&24u16.to_le_bytes());
    for v in [0u32, pixels as u32, 0, 0, 0, 0] {
        out.extend_from_slice(&v.to_le_bytes());
    }
    // Rows of a 24-bit 32-pixel BMP are 96 bytes, already 4-aligned.
    out.extend((0..pixels).map(|i| 0x30 + (i % 7) as u8));
    assert!(out.is_ascii());
    out
}

struct Reply {
    status: StatusCode,
    headers: HeaderMap,
    body: Bytes,
}

impl Reply {
    fn json(&self) -> Value {
        serde_json::from_slice(&self.body)
            .unwrap_or_else(|e| panic!("{e}: {}", String::from_utf8_lossy(&self.body)))
    }
}

async fn send(app: &Router, request: Request<Body>) -> Reply {
    let response = app.clone().oneshot(request).await.unwrap();
    let status = response.status();
    let headers = response.headers().clone();
    let body = to_bytes(response.into_body(), usize::MAX).await.unwrap();
    Reply {
        status,
        headers,
        body,
    }
}

fn get(uri: &str) -> Request<Body> {
    Request::get(uri).body(Body::empty()).unwrap()
}

fn post(uri: &str, headers: &[(&str, String)], body: Vec<u8>) -> Request<Body> {
    let mut request = Request::post(uri).header(header::CONTENT_LENGTH, body.len());
    for (name, value) in headers {
        request = request.header(*name, value);
    }
    request.body(Body::from(body)).unwrap()
}

/// A request in the binary tensor data extension, as tritonclient sends
/// it by default: the JSON header, then the image as one BYTES element.
fn binary_infer(image: &[u8], parameters: Value, outputs: Option<Value>) -> (Vec<u8>, usize) {
    let mut element = (image.len() as u32).to_le_bytes().to_vec();
    element.extend_from_slice(image);
    let mut request = json!({
        "inputs": [{"name": "image", "shape": [1], "datatype": "BYTES",
                    "parameters": {"binary_data_size": element.len()}}],
        "parameters": parameters,
    });
    if let Some(outputs) = outputs {
        request["outputs"] = outputs;
    }
    let mut body = serde_json::to_vec(&request).unwrap();
    let json_length = body.len();
    body.extend_from_slice(&element);
    (body, json_length)
}

/// The `/v1` score of `image`.
async fn v1_score(app: &Router, image: &[u8]) -> Value {
    let reply = send(app, post("/v1/models/cells/score", &[], image.to_vec())).await;
    assert_eq!(reply.status, StatusCode::OK);
    reply.json()
}

/// Splits a binary-extension answer into its JSON and its outputs' bytes.
fn split_answer(reply: &Reply) -> (Value, Vec<(String, Vec<u8>)>) {
    let length: usize = reply.headers["inference-header-content-length"]
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    let v: Value = serde_json::from_slice(&reply.body[..length]).unwrap();
    let mut offset = length;
    let mut binary = Vec::new();
    for output in v["outputs"].as_array().unwrap() {
        if let Some(size) = output["parameters"]["binary_data_size"].as_u64() {
            let end = offset + size as usize;
            binary.push((
                output["name"].as_str().unwrap().to_owned(),
                reply.body[offset..end].to_vec(),
            ));
            offset = end;
        }
    }
    assert_eq!(offset, reply.body.len(), "binary outputs fill the body");
    (v, binary)
}

fn f32s(bytes: &[u8]) -> Vec<f32> {
    bytes
        .chunks_exact(4)
        .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
        .collect()
}

#[tokio::test]
async fn binary_extension_both_ways_matches_v1() {
    let app = app(state_with(config()));
    let png = defect_png();
    let reference = v1_score(&app, &png).await;

    // All outputs binary (tritonclient's default: no outputs listed and
    // binary_data_output).
    let (body, length) = binary_infer(&png, json!({"binary_data_output": true}), None);
    let reply = send(
        &app,
        post(
            "/v2/models/cells/infer",
            &[("Inference-Header-Content-Length", length.to_string())],
            body,
        ),
    )
    .await;
    assert_eq!(
        reply.status,
        StatusCode::OK,
        "{}",
        String::from_utf8_lossy(&reply.body)
    );
    let (v, binary) = split_answer(&reply);
    assert_eq!(v["model_name"], "cells");
    assert_eq!(v["model_version"], "1");
    let names: Vec<&str> = binary.iter().map(|(n, _)| n.as_str()).collect();
    assert_eq!(names, ["score", "is_anomalous", "anomaly_map"]);
    let score = f32s(&binary[0].1);
    assert_eq!(score.len(), 1);
    assert_eq!(
        f64::from(score[0]),
        f64::from(reference["score"].as_f64().unwrap() as f32)
    );
    assert_eq!(
        binary[1].1,
        vec![u8::from(reference["is_anomalous"].as_bool().unwrap())]
    );
    assert_eq!(v["outputs"][2]["shape"], json!([300, 300]));
    let map = f32s(&binary[2].1);
    assert_eq!(map.len(), 90_000);
    let over = map.iter().filter(|v| **v >= 0.5).count() as f64 / 90_000.0;
    assert!((over - reference["anomalous_fraction"].as_f64().unwrap()).abs() < 1e-12);

    // Per-output choice wins over the request's: score in JSON, the map
    // binary; no binary_data_output means JSON.
    let (body, length) = binary_infer(
        &png,
        json!({"binary_data_output": true}),
        Some(json!([
            {"name": "score", "parameters": {"binary_data": false}},
            {"name": "anomaly_map"},
        ])),
    );
    let reply = send(
        &app,
        post(
            "/v2/models/cells/infer",
            &[("inference-header-content-length", length.to_string())],
            body,
        ),
    )
    .await;
    let (v, binary) = split_answer(&reply);
    assert_eq!(
        v["outputs"][0]["data"][0].as_f64().unwrap() as f32,
        reference["score"].as_f64().unwrap() as f32
    );
    assert_eq!(binary.len(), 1);
    assert_eq!(binary[0].0, "anomaly_map");

    let (body, length) = binary_infer(&png, json!({}), Some(json!([{"name": "is_anomalous"}])));
    let reply = send(
        &app,
        post(
            "/v2/models/cells/infer",
            &[("inference-header-content-length", length.to_string())],
            body,
        ),
    )
    .await;
    assert!(
        reply
            .headers
            .get("inference-header-content-length")
            .is_none()
    );
    assert_eq!(
        reply.json()["outputs"][0]["data"],
        json!([reference["is_anomalous"]])
    );

    // A header length past the body, and binary sizes that do not add up.
    let (body, length) = binary_infer(&png, json!({}), None);
    for (declared, cut) in [(body.len() + 1, 0), (length, 1)] {
        let reply = send(
            &app,
            post(
                "/v2/models/cells/infer",
                &[("inference-header-content-length", declared.to_string())],
                body[..body.len() - cut].to_vec(),
            ),
        )
        .await;
        assert_eq!(reply.status, StatusCode::BAD_REQUEST);
        assert!(reply.json()["error"].is_string());
    }
}

#[tokio::test]
async fn raw_bytes_in_json_and_base64_only_when_said() {
    let app = app(state_with(config()));
    let bmp = ascii_bmp();
    let reference = v1_score(&app, &bmp).await;
    let text = String::from_utf8(bmp.clone()).unwrap();
    let request = json!({"id": "a", "inputs": [{"name": "image", "shape": [1], "datatype": "BYTES",
                          "data": [text]}], "outputs": [{"name": "score"}]});
    let reply = send(
        &app,
        post(
            "/v2/models/cells/infer",
            &[],
            serde_json::to_vec(&request).unwrap(),
        ),
    )
    .await;
    assert_eq!(
        reply.status,
        StatusCode::OK,
        "{}",
        String::from_utf8_lossy(&reply.body)
    );
    let v = reply.json();
    assert_eq!(v["id"], "a");
    assert_eq!(
        v["outputs"][0]["data"][0].as_f64().unwrap() as f32,
        reference["score"].as_f64().unwrap() as f32
    );

    // The documented alternative: base64 with content_type "base64".
    use base64::Engine as _;
    let png = defect_png();
    let encoded = base64::engine::general_purpose::STANDARD.encode(&png);
    let reference = v1_score(&app, &png).await;
    let request = json!({"inputs": [{"name": "image", "shape": [1], "datatype": "BYTES",
                          "parameters": {"content_type": "base64"}, "data": [encoded]}],
                          "outputs": [{"name": "score"}]});
    let v = send(
        &app,
        post(
            "/v2/models/cells/infer",
            &[],
            serde_json::to_vec(&request).unwrap(),
        ),
    )
    .await
    .json();
    assert_eq!(
        v["outputs"][0]["data"][0].as_f64().unwrap() as f32,
        reference["score"].as_f64().unwrap() as f32
    );
    // Without the parameter the same text is taken as the file itself.
    let request = json!({"inputs": [{"name": "image", "shape": [1], "datatype": "BYTES",
                          "data": [encoded]}]});
    let reply = send(
        &app,
        post(
            "/v2/models/cells/infer",
            &[],
            serde_json::to_vec(&request).unwrap(),
        ),
    )
    .await;
    assert_eq!(reply.status, StatusCode::BAD_REQUEST);
    assert_eq!(reply.headers["flawscope-error-code"], "unsupported_image");
}

#[tokio::test]
async fn v2_errors_are_kserve_shaped_and_v1_keeps_its_own() {
    let state = state_with(config()).with_token(Token::new("s3cret"));
    let app = app(state);
    let auth = ("authorization", "Bearer s3cret".to_owned());
    for (request, status, code) in [
        (
            post(
                "/v2/models/nope/infer",
                std::slice::from_ref(&auth),
                b"{}".to_vec(),
            ),
            StatusCode::NOT_FOUND,
            "not_found",
        ),
        (
            post(
                "/v2/models/cells/infer",
                std::slice::from_ref(&auth),
                b"[".to_vec(),
            ),
            StatusCode::BAD_REQUEST,
            "invalid_inference_request",
        ),
        (
            post("/v2/models/cells/infer", &[], b"{}".to_vec()),
            StatusCode::UNAUTHORIZED,
            "unauthorized",
        ),
        (
            Request::get("/v2/nowhere")
                .header("authorization", "Bearer s3cret")
                .body(Body::empty())
                .unwrap(),
            StatusCode::NOT_FOUND,
            "not_found",
        ),
        (
            Request::get("/v2/models/cells/infer")
                .header("authorization", "Bearer s3cret")
                .body(Body::empty())
                .unwrap(),
            StatusCode::METHOD_NOT_ALLOWED,
            "method_not_allowed",
        ),
        (
            post(
                "/v2/models/cells/infer",
                std::slice::from_ref(&auth),
                vec![b' '; 21 * 1024 * 1024],
            ),
            StatusCode::PAYLOAD_TOO_LARGE,
            "payload_too_large",
        ),
    ] {
        let uri = request.uri().to_string();
        let reply = send(&app, request).await;
        assert_eq!(reply.status, status, "{uri}");
        let v = reply.json();
        let fields = v.as_object().unwrap();
        assert_eq!(fields.len(), 1, "{uri}: {v}");
        assert!(!v["error"].as_str().unwrap().is_empty(), "{uri}: {v}");
        assert_eq!(reply.headers["flawscope-error-code"], code, "{uri}");
    }
    let reply = send(
        &app,
        post(
            "/v2/models/nope/infer",
            std::slice::from_ref(&auth),
            b"{}".to_vec(),
        ),
    )
    .await;
    assert_eq!(reply.json()["error"], "no model named \"nope\"");
    // /v1 keeps {"error": {"code", "message"}}.
    let reply = send(&app, post("/v1/models/nope/score", &[auth], b"x".to_vec())).await;
    assert_eq!(reply.json()["error"]["code"], "not_found");
}

#[tokio::test]
async fn versioned_routes_serve_version_1_only() {
    let app = app(state_with(config()));
    for uri in [
        "/v2/models/cells/versions/1/ready",
        "/v2/models/cells/ready",
    ] {
        let reply = send(&app, get(uri)).await;
        assert_eq!(reply.status, StatusCode::OK, "{uri}");
        assert_eq!(reply.json()["ready"], true);
    }
    for uri in ["/v2/models/cells/versions/1", "/v2/models/cells"] {
        let v = send(&app, get(uri)).await.json();
        assert_eq!(v["versions"], json!(["1"]), "{uri}");
        assert_eq!(v["inputs"][0]["datatype"], "BYTES");
    }
    for uri in [
        "/v2/models/cells/versions/2/ready",
        "/v2/models/cells/versions/2",
        "/v2/models/nope/versions/1/ready",
    ] {
        let reply = send(&app, get(uri)).await;
        assert_eq!(reply.status, StatusCode::NOT_FOUND, "{uri}");
        assert!(reply.json()["error"].is_string());
    }
    let png = defect_png();
    let reference = v1_score(&app, &png).await;
    let (body, length) = binary_infer(&png, json!({}), Some(json!([{"name": "score"}])));
    let reply = send(
        &app,
        post(
            "/v2/models/cells/versions/1/infer",
            &[("inference-header-content-length", length.to_string())],
            body.clone(),
        ),
    )
    .await;
    assert_eq!(reply.status, StatusCode::OK);
    assert_eq!(
        reply.json()["outputs"][0]["data"][0].as_f64().unwrap() as f32,
        reference["score"].as_f64().unwrap() as f32
    );
    let reply = send(
        &app,
        post(
            "/v2/models/cells/versions/7/infer",
            &[("inference-header-content-length", length.to_string())],
            body,
        ),
    )
    .await;
    assert_eq!(reply.status, StatusCode::NOT_FOUND);
    let meta = send(&app, get("/v2")).await.json();
    assert_eq!(meta["extensions"], json!(["binary_tensor_data"]));
}

async fn grpc_server(state: AppState) -> String {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(flawscope_server::grpc::serve(
        listener,
        state,
        std::future::pending(),
    ));
    format!("http://{addr}")
}

fn with_token<T>(message: T, token: &str) -> tonic::Request<T> {
    let mut request = tonic::Request::new(message);
    request
        .metadata_mut()
        .insert("authorization", format!("Bearer {token}").parse().unwrap());
    request
}

fn infer_request(model: &str, image: &[u8]) -> proto::ModelInferRequest {
    let mut element = (image.len() as u32).to_le_bytes().to_vec();
    element.extend_from_slice(image);
    proto::ModelInferRequest {
        model_name: model.to_owned(),
        id: "g1".to_owned(),
        inputs: vec![proto::model_infer_request::InferInputTensor {
            name: "image".to_owned(),
            datatype: "BYTES".to_owned(),
            shape: vec![1],
            ..Default::default()
        }],
        raw_input_contents: vec![element],
        ..Default::default()
    }
}

#[tokio::test]
async fn grpc_shares_models_token_slots_and_metrics() {
    let state = state_with(ServerConfig {
        max_queued: 0,
        ..config()
    })
    .with_token(Token::new("s3cret"));
    let http = app(state.clone());
    let url = grpc_server(state.clone()).await;
    let mut client = GrpcInferenceServiceClient::connect(url).await.unwrap();
    let png = defect_png();
    let reference = {
        let request = post(
            "/v1/models/cells/score",
            &[("authorization", "Bearer s3cret".to_owned())],
            png.clone(),
        );
        send(&http, request).await.json()
    };

    // Health is open; the rest needs the token.
    let live = client
        .server_live(proto::ServerLiveRequest {})
        .await
        .unwrap();
    assert!(live.into_inner().live);
    assert!(
        client
            .server_ready(proto::ServerReadyRequest {})
            .await
            .unwrap()
            .into_inner()
            .ready
    );
    let ready = proto::ModelReadyRequest {
        name: "cells".into(),
        version: String::new(),
    };
    let refused = client.model_ready(ready.clone()).await.unwrap_err();
    assert_eq!(refused.code(), Code::Unauthenticated);
    let refused = client
        .model_ready(with_token(ready.clone(), "wrong"))
        .await
        .unwrap_err();
    assert_eq!(refused.code(), Code::Unauthenticated);
    assert!(
        client
            .model_ready(with_token(ready, "s3cret"))
            .await
            .unwrap()
            .into_inner()
            .ready
    );
    for (name, version) in [("nope", ""), ("cells", "2")] {
        let request = proto::ModelReadyRequest {
            name: name.into(),
            version: version.into(),
        };
        let answer = client.model_ready(with_token(request, "s3cret")).await;
        assert!(!answer.unwrap().into_inner().ready, "{name} {version}");
    }
    let meta = client
        .model_metadata(with_token(
            proto::ModelMetadataRequest {
                name: "cells".into(),
                version: "1".into(),
            },
            "s3cret",
        ))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(meta.versions, ["1"]);
    assert_eq!(meta.outputs.len(), 3);
    let server = client
        .server_metadata(with_token(proto::ServerMetadataRequest {}, "s3cret"))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(server.name, "flawscope");

    // Infer with raw_input_contents: every output, raw, equal to /v1.
    let answer = client
        .model_infer(with_token(infer_request("cells", &png), "s3cret"))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(answer.id, "g1");
    assert_eq!(answer.model_version, "1");
    let names: Vec<&str> = answer.outputs.iter().map(|o| o.name.as_str()).collect();
    assert_eq!(names, ["score", "is_anomalous", "anomaly_map"]);
    assert_eq!(answer.raw_output_contents.len(), 3);
    assert_eq!(
        f32s(&answer.raw_output_contents[0]),
        [reference["score"].as_f64().unwrap() as f32]
    );
    assert_eq!(
        answer.raw_output_contents[1],
        [u8::from(reference["is_anomalous"].as_bool().unwrap())]
    );
    assert_eq!(answer.outputs[2].shape, [300, 300]);
    assert_eq!(answer.raw_output_contents[2].len(), 90_000 * 4);

    // Infer with bytes_contents, one output.
    let mut request = infer_request("cells", &png);
    request.raw_input_contents.clear();
    request.inputs[0].contents = Some(proto::InferTensorContents {
        bytes_contents: vec![png.clone()],
        ..Default::default()
    });
    request.outputs = vec![proto::model_infer_request::InferRequestedOutputTensor {
        name: "score".into(),
        ..Default::default()
    }];
    let answer = client
        .model_infer(with_token(request, "s3cret"))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(answer.outputs.len(), 1);
    assert_eq!(
        f32s(&answer.raw_output_contents[0]),
        [reference["score"].as_f64().unwrap() as f32]
    );

    // Errors carry the server's message.
    let error = client
        .model_infer(with_token(infer_request("nope", &png), "s3cret"))
        .await
        .unwrap_err();
    assert_eq!(error.code(), Code::NotFound);
    assert_eq!(error.message(), "no model named \"nope\"");
    let error = client
        .model_infer(with_token(infer_request("cells", b"garbage"), "s3cret"))
        .await
        .unwrap_err();
    assert_eq!(error.code(), Code::InvalidArgument);
    assert!(
        error.message().contains("is not a supported image"),
        "{}",
        error.message()
    );
    // Over the body limit (20 MB): refused by the message size limit.
    let error = client
        .model_infer(with_token(
            infer_request("cells", &vec![0u8; 21 * 1024 * 1024]),
            "s3cret",
        ))
        .await
        .unwrap_err();
    assert_ne!(error.code(), Code::Ok);

    // The slots are the HTTP service's: with both held and no queue, gRPC
    // is shed too.
    let held = [state.try_slot().unwrap(), state.try_slot().unwrap()];
    let error = client
        .model_infer(with_token(infer_request("cells", &png), "s3cret"))
        .await
        .unwrap_err();
    assert_eq!(error.code(), Code::Unavailable);
    drop(held);

    // The metrics are the HTTP service's too.
    let metrics = state.metrics();
    let route = "/inference.GRPCInferenceService/ModelInfer";
    assert_eq!(metrics.requests(route, 200), 2);
    assert_eq!(metrics.requests(route, 404), 1);
    assert_eq!(metrics.requests(route, 503), 1);
    assert_eq!(
        metrics.requests("/inference.GRPCInferenceService/ModelReady", 401),
        2
    );
    let text = send(
        &http,
        Request::get("/metrics")
            .header("authorization", "Bearer s3cret")
            .body(Body::empty())
            .unwrap(),
    )
    .await;
    let text = String::from_utf8_lossy(&text.body).into_owned();
    assert!(
        text.contains(
            "flawscope_http_requests_total{route=\"/inference.GRPCInferenceService/ModelInfer\",status=\"200\"} 2"
        ),
        "{text}"
    );
}

#[tokio::test]
async fn a_batch_of_four_is_answered_per_image_over_rest_and_grpc() {
    let state = state_with(config());
    let app = app(state.clone());
    let files: Vec<Vec<u8>> = images_in("test/defect")
        .iter()
        .chain(images_in("test/good").iter())
        .take(4)
        .map(|p| std::fs::read(p).unwrap())
        .collect();
    assert_eq!(files.len(), 4);
    let mut singles = Vec::new();
    for file in &files {
        singles.push(v1_score(&app, file).await["score"].as_f64().unwrap() as f32);
    }
    // REST, binary extension: shape [4], four length-prefixed elements.
    let binary: Vec<u8> = files
        .iter()
        .flat_map(|f| [&(f.len() as u32).to_le_bytes()[..], f].concat())
        .collect();
    let mut body = serde_json::to_vec(&json!({
        "inputs": [{"name": "image", "shape": [4], "datatype": "BYTES",
                    "parameters": {"binary_data_size": binary.len()}}],
        "outputs": [{"name": "score", "parameters": {"binary_data": false}},
                    {"name": "is_anomalous", "parameters": {"binary_data": false}},
                    {"name": "anomaly_map", "parameters": {"binary_data": true}}],
    }))
    .unwrap();
    let json_length = body.len();
    body.extend_from_slice(&binary);
    let reply = send(
        &app,
        post(
            "/v2/models/cells/infer",
            &[("inference-header-content-length", json_length.to_string())],
            body,
        ),
    )
    .await;
    assert_eq!(reply.status, StatusCode::OK, "{:?}", reply.body);
    let (answer, raw) = split_answer(&reply);
    assert_eq!(answer["outputs"][0]["shape"], json!([4]));
    let scores: Vec<f32> = answer["outputs"][0]["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_f64().unwrap() as f32)
        .collect();
    assert_eq!(scores, singles);
    assert_eq!(answer["outputs"][1]["shape"], json!([4]));
    assert_eq!(answer["outputs"][2]["shape"], json!([4, 300, 300]));
    assert_eq!(raw[0].1.len(), 4 * 300 * 300 * 4);

    // gRPC: the same four in raw_input_contents.
    let url = grpc_server(state).await;
    let mut client = GrpcInferenceServiceClient::connect(url).await.unwrap();
    let mut request = infer_request("cells", &files[0]);
    request.inputs[0].shape = vec![4];
    request.raw_input_contents = vec![binary];
    let answer = client.model_infer(request).await.unwrap().into_inner();
    assert_eq!(answer.outputs[0].shape, [4]);
    assert_eq!(f32s(&answer.raw_output_contents[0]), singles);
    assert_eq!(answer.outputs[2].shape, [4, 300, 300]);
    // Nine is past the stated maximum.
    let mut request = infer_request("cells", &files[0]);
    request.inputs[0].shape = vec![9];
    let status = client.model_infer(request).await.unwrap_err();
    assert_eq!(status.code(), tonic::Code::InvalidArgument);
    assert!(status.message().contains("at most 8"), "{status:?}");
}
