//! Router tests: every route through `app(state).oneshot(request)`, with a
//! PatchCore model fitted once on the shipped solar-cell sample; slow and
//! invalid uploads on a real loopback socket at the end.
#![allow(clippy::unwrap_used)]

use std::path::{Path, PathBuf};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use axum::Router;
use axum::body::{Body, Bytes, to_bytes};
use axum::http::{HeaderMap, Request, StatusCode, header};
use base64::Engine as _;
use flawscope_core::Device;
use flawscope_core::model::{Inspection, Model};
use flawscope_core::operating_point::OperatingPoint;
use flawscope_core::runtime::Runtime;
use flawscope_core::runtime::{VIT_B_16, WeightsLookup};
use flawscope_core::winclip::WinClip;
use flawscope_server::{
    AppState, ServedModel, ServerConfig, Token, ZeroShotScorer, app, load_models,
};
use serde_json::{Value, json};
use tower::ServiceExt;

mod common;
use common::images_in;

/// One model per test binary: fitted on 12 good cells.
fn model() -> Arc<Model> {
    static MODEL: OnceLock<Arc<Model>> = OnceLock::new();
    MODEL
        .get_or_init(|| {
            let runtime = Runtime::with_clip(Device::Cpu, no_clip(), VIT_B_16);
            Arc::new(common::small_patchcore(12, 256, &runtime))
        })
        .clone()
}

/// Saves the shared classical model to `path`.
fn save_model(path: &Path) {
    model().save(path).unwrap();
}

/// The committed tiny CLIP checkpoint.
fn tiny_clip() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../models/tests/fixtures/tiny_clip")
}

fn config() -> ServerConfig {
    ServerConfig {
        max_concurrent: 4,
        ..ServerConfig::default()
    }
}

fn state_with(names: &[&str], config: ServerConfig) -> AppState {
    let models = names
        .iter()
        .map(|n| ServedModel {
            name: (*n).to_owned(),
            model: model(),
        })
        .collect();
    AppState::new(models, config).unwrap()
}

fn state() -> AppState {
    state_with(&["cells"], config())
}

fn good_png() -> Vec<u8> {
    std::fs::read(&images_in("test/good")[0]).unwrap()
}

fn defect_png() -> Vec<u8> {
    std::fs::read(&images_in("test/defect")[0]).unwrap()
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

    /// Asserts the uniform error body and returns its code: `{"error":
    /// {"code", "message"}}`, or on `/v2` KServe's `{"error": "<message>"}`
    /// with the code in the `Flawscope-Error-Code` header.
    fn error_code(&self) -> String {
        let v = self.json();
        if let Some(message) = v["error"].as_str() {
            assert_eq!(v.as_object().unwrap().len(), 1, "{v}");
            assert!(!message.is_empty());
            return self.headers["flawscope-error-code"]
                .to_str()
                .unwrap()
                .to_owned();
        }
        let error = v["error"].as_object().unwrap_or_else(|| panic!("{v}"));
        assert_eq!(error.len(), 2, "{v}");
        assert!(!error["message"].as_str().unwrap().is_empty());
        assert_eq!(
            self.headers[header::CONTENT_TYPE],
            "application/json",
            "{v}"
        );
        error["code"].as_str().unwrap().to_owned()
    }
}

async fn send(app: Router, request: Request<Body>) -> Reply {
    let response = app.oneshot(request).await.unwrap();
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

fn post_bytes(uri: &str, bytes: Vec<u8>) -> Request<Body> {
    Request::post(uri)
        .header(header::CONTENT_TYPE, "application/octet-stream")
        .header(header::CONTENT_LENGTH, bytes.len())
        .body(Body::from(bytes))
        .unwrap()
}

const BOUNDARY: &str = "flawscope-test-boundary";

enum Part<'a> {
    Text(&'a str, &'a str),
    File(&'a str, &'a [u8]),
}

/// `/v1/zero-shot` for a solar cell, prompt "a crack".
fn zero_shot_crack(png: &[u8]) -> Request<Body> {
    multipart(
        "/v1/zero-shot",
        &[
            Part::File("image", png),
            Part::Text("object", "solar cell"),
            Part::Text("prompt", "a crack"),
        ],
    )
}

fn multipart(uri: &str, parts: &[Part]) -> Request<Body> {
    let mut body = Vec::new();
    for part in parts {
        body.extend_from_slice(format!("--{BOUNDARY}\r\n").as_bytes());
        match part {
            Part::Text(name, value) => {
                body.extend_from_slice(
                    format!("Content-Disposition: form-data; name=\"{name}\"\r\n\r\n{value}\r\n")
                        .as_bytes(),
                );
            }
            Part::File(name, bytes) => {
                body.extend_from_slice(
                    format!(
                        "Content-Disposition: form-data; name=\"{name}\"; filename=\"x.png\"\r\n\
                         Content-Type: image/png\r\n\r\n"
                    )
                    .as_bytes(),
                );
                body.extend_from_slice(bytes);
                body.extend_from_slice(b"\r\n");
            }
        }
    }
    body.extend_from_slice(format!("--{BOUNDARY}--\r\n").as_bytes());
    Request::post(uri)
        .header(
            header::CONTENT_TYPE,
            format!("multipart/form-data; boundary={BOUNDARY}"),
        )
        .header(header::CONTENT_LENGTH, body.len())
        .body(Body::from(body))
        .unwrap()
}

fn json_request(uri: &str, value: &Value) -> Request<Body> {
    let body = serde_json::to_vec(value).unwrap();
    Request::post(uri)
        .header(header::CONTENT_TYPE, "application/json")
        .header(header::CONTENT_LENGTH, body.len())
        .body(Body::from(body))
        .unwrap()
}

/// Checks the invariants of a score result against its image size.
fn check_result(v: &Value) {
    let score = v["score"].as_f64().unwrap();
    assert!((0.0..=1.0).contains(&score), "{v}");
    assert_eq!(v["threshold"], 0.5);
    assert_eq!(v["is_anomalous"].as_bool().unwrap(), score >= 0.5, "{v}");
    let (w, h) = (v["width"].as_u64().unwrap(), v["height"].as_u64().unwrap());
    let regions = v["regions"].as_array().unwrap();
    assert!(regions.len() <= 20);
    let mut last = f64::INFINITY;
    for r in regions {
        let peak = r["peak"].as_f64().unwrap();
        assert!(peak >= 0.5 && peak <= last, "{v}");
        last = peak;
        assert!(r["x"].as_u64().unwrap() + r["w"].as_u64().unwrap() <= w);
        assert!(r["y"].as_u64().unwrap() + r["h"].as_u64().unwrap() <= h);
    }
    assert!(v["latency_ms"].as_f64().unwrap() > 0.0);
}

#[tokio::test]
async fn health_routes_answer() {
    let app = app(state());
    for uri in ["/healthz", "/readyz", "/v2/health/live", "/v2/health/ready"] {
        let reply = send(app.clone(), get(uri)).await;
        assert_eq!(reply.status, StatusCode::OK, "{uri}");
    }
    assert_eq!(send(app.clone(), get("/readyz")).await.json()["models"], 1);
    assert_eq!(
        send(app.clone(), get("/v2/health/live")).await.json()["live"],
        true
    );
    let meta = send(app, get("/v2")).await.json();
    assert_eq!(meta["name"], "flawscope");
}

#[tokio::test]
async fn readiness_turns_503_while_draining() {
    let state = state();
    state.set_draining();
    let app = app(state);
    assert_eq!(
        send(app.clone(), get("/healthz")).await.status,
        StatusCode::OK
    );
    for uri in ["/readyz", "/v2/health/ready", "/v2/models/cells/ready"] {
        let reply = send(app.clone(), get(uri)).await;
        assert_eq!(reply.status, StatusCode::SERVICE_UNAVAILABLE, "{uri}");
        assert_eq!(reply.error_code(), "shutting_down");
    }
}

#[tokio::test]
async fn models_are_listed() {
    let reply = send(app(state_with(&["a", "b"], config())), get("/v1/models")).await;
    assert_eq!(reply.status, StatusCode::OK);
    let v = reply.json();
    let models = v["models"].as_array().unwrap();
    assert_eq!(models.len(), 2);
    assert_eq!(models[0]["name"], "a");
    assert_eq!(models[0]["detector"], "patchcore");
    assert_eq!(models[0]["backbone"], "lite0");
    assert_eq!(models[0]["threshold"], 0.5);
    assert!(models[0]["raw_threshold"].as_f64().unwrap() > 0.0);
}

#[tokio::test]
async fn score_raw_and_multipart_with_heatmap() {
    let app = app(state());
    let reply = send(
        app.clone(),
        post_bytes("/v1/models/cells/score", good_png()),
    )
    .await;
    assert_eq!(reply.status, StatusCode::OK);
    let v = reply.json();
    assert_eq!(v["model"], "cells");
    assert_eq!(
        (v["width"].as_u64(), v["height"].as_u64()),
        (Some(300), Some(300))
    );
    assert!(v.get("heatmap_png").is_none());
    check_result(&v);

    let defect = defect_png();
    let reply = send(
        app,
        multipart(
            "/v1/models/cells/score?heatmap=png",
            &[Part::File("image", &defect)],
        ),
    )
    .await;
    assert_eq!(reply.status, StatusCode::OK);
    let v = reply.json();
    check_result(&v);
    let png = base64::engine::general_purpose::STANDARD
        .decode(v["heatmap_png"].as_str().unwrap())
        .unwrap();
    let overlay = image::load_from_memory(&png).unwrap();
    // The image, with the legend strip below it.
    assert_eq!(overlay.width(), 300);
    assert!(overlay.height() > 300);
}

#[tokio::test]
async fn a_defect_is_flagged_with_a_region() {
    let app = app(state());
    let mut flagged = 0;
    for path in images_in("test/defect") {
        let bytes = std::fs::read(path).unwrap();
        let v = send(app.clone(), post_bytes("/v1/models/cells/score", bytes))
            .await
            .json();
        check_result(&v);
        if v["is_anomalous"] == true && !v["regions"].as_array().unwrap().is_empty() {
            flagged += 1;
        }
    }
    assert!(flagged > 0, "no defective cell was flagged with a region");
}

/// A valid PNG whose IHDR claims `width × height`, CRC fixed.
fn png_claiming(width: u32, height: u32) -> Vec<u8> {
    let mut png = good_png();
    png[16..20].copy_from_slice(&width.to_be_bytes());
    png[20..24].copy_from_slice(&height.to_be_bytes());
    let crc = crc32(&png[12..29]);
    png[29..33].copy_from_slice(&crc.to_be_bytes());
    png
}

fn crc32(bytes: &[u8]) -> u32 {
    let mut crc = 0xffff_ffffu32;
    for b in bytes {
        crc ^= u32::from(*b);
        for _ in 0..8 {
            crc = if crc & 1 == 1 {
                (crc >> 1) ^ 0xedb8_8320
            } else {
                crc >> 1
            };
        }
    }
    !crc
}

#[tokio::test]
async fn bad_images_are_400_and_huge_ones_413() {
    let app = app(state());
    let uri = "/v1/models/cells/score";
    let good = good_png();
    for (bytes, code) in [
        (Vec::new(), "empty_image"),
        (b"definitely not an image".to_vec(), "unsupported_image"),
        (good[..good.len() / 2].to_vec(), "truncated_image"),
    ] {
        let reply = send(app.clone(), post_bytes(uri, bytes)).await;
        assert_eq!(reply.status, StatusCode::BAD_REQUEST);
        assert_eq!(reply.error_code(), code);
    }
    // The CRC is right, so only the size check stops it.
    let same = png_claiming(300, 300);
    assert_eq!(same, good, "the CRC recomputation matches the original");

    let started = std::time::Instant::now();
    let reply = send(app.clone(), post_bytes(uri, png_claiming(60_000, 60_000))).await;
    assert_eq!(reply.status, StatusCode::PAYLOAD_TOO_LARGE);
    assert_eq!(reply.error_code(), "payload_too_large");
    assert!(
        reply.json()["error"]["message"]
            .as_str()
            .unwrap()
            .contains("60000×60000")
    );
    assert!(started.elapsed() < Duration::from_secs(5));

    // An image field that is empty or missing.
    let reply = send(app.clone(), multipart(uri, &[Part::Text("note", "hi")])).await;
    assert_eq!(reply.status, StatusCode::BAD_REQUEST);
    assert_eq!(reply.error_code(), "missing_image");
    let reply = send(app, multipart(uri, &[Part::File("image", b"")])).await;
    assert_eq!(reply.error_code(), "empty_image");
}

#[tokio::test]
async fn bodies_over_the_limit_are_413() {
    let app = app(state());
    let big = vec![0u8; 25 * 1024 * 1024];
    // Declared length: refused before reading.
    let reply = send(
        app.clone(),
        post_bytes("/v1/models/cells/score", big.clone()),
    )
    .await;
    assert_eq!(reply.status, StatusCode::PAYLOAD_TOO_LARGE);
    assert_eq!(reply.error_code(), "payload_too_large");
    // No declared length: cut off while reading.
    for uri in ["/v1/models/cells/score", "/v2/models/cells/infer"] {
        let request = Request::post(uri).body(Body::from(big.clone())).unwrap();
        let reply = send(app.clone(), request).await;
        assert_eq!(reply.status, StatusCode::PAYLOAD_TOO_LARGE, "{uri}");
        assert_eq!(reply.error_code(), "payload_too_large");
    }
    let mut form = multipart("/v1/ask", &[Part::File("image", &big)]);
    form.headers_mut().remove(header::CONTENT_LENGTH);
    let reply = send(app, form).await;
    assert_eq!(reply.status, StatusCode::PAYLOAD_TOO_LARGE);
    assert_eq!(reply.error_code(), "payload_too_large");
}

#[tokio::test]
async fn unknown_and_hostile_model_names_are_404() {
    let app = app(state());
    for name in [
        "nope",
        "..",
        "%2e%2e",
        "..%2Fcells",
        "..%2F..%2F..%2Fetc%2Fpasswd",
        "a%2Fb",
        "%FF",
        "cells%00",
    ] {
        for (uri, body) in [
            (format!("/v1/models/{name}/score"), good_png()),
            (format!("/v2/models/{name}/infer"), b"{}".to_vec()),
        ] {
            let reply = send(app.clone(), post_bytes(&uri, body)).await;
            assert_eq!(reply.status, StatusCode::NOT_FOUND, "{uri}");
            assert_eq!(reply.error_code(), "not_found");
        }
        let reply = send(app.clone(), get(&format!("/v2/models/{name}"))).await;
        assert_eq!(reply.status, StatusCode::NOT_FOUND, "{name}");
    }
    // A raw '/' or '..' segment does not even match the route.
    for uri in ["/v1/models/a/b/score", "/v1/models/../score", "/nothing"] {
        let reply = send(app.clone(), post_bytes(uri, good_png())).await;
        assert_eq!(reply.status, StatusCode::NOT_FOUND, "{uri}");
        assert_eq!(reply.error_code(), "not_found");
    }
    let reply = send(app, get("/v1/models/cells/score")).await;
    assert_eq!(reply.status, StatusCode::METHOD_NOT_ALLOWED);
    assert_eq!(reply.error_code(), "method_not_allowed");
}

#[tokio::test]
async fn models_come_from_their_folder_only() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("models");
    std::fs::create_dir(&dir).unwrap();
    save_model(&dir.join("cells.flawscope"));
    // A model next to the folder, reachable with '..' if names touched files.
    save_model(&tmp.path().join("secret.flawscope"));
    std::fs::write(dir.join("notes.txt"), "not a model").unwrap();

    let models = load_models(&dir, &Runtime::new(Device::Cpu)).unwrap();
    assert_eq!(models.len(), 1);
    let app = app(AppState::new(models, config()).unwrap());
    let ok = send(
        app.clone(),
        post_bytes("/v1/models/cells/score", good_png()),
    )
    .await;
    assert_eq!(ok.status, StatusCode::OK);
    for name in ["secret", "..%2Fsecret", "%2E%2E%2Fsecret", "..%5Csecret"] {
        let reply = send(
            app.clone(),
            post_bytes(&format!("/v1/models/{name}/score"), good_png()),
        )
        .await;
        assert_eq!(reply.status, StatusCode::NOT_FOUND, "{name}");
    }

    let empty = tmp.path().join("empty");
    std::fs::create_dir(&empty).unwrap();
    assert!(load_models(&empty, &Runtime::new(Device::Cpu)).is_err());
    assert!(
        load_models(
            Path::new("/definitely/not/here"),
            &Runtime::new(Device::Cpu)
        )
        .is_err()
    );
}

#[tokio::test]
async fn token_guards_all_but_health() {
    let app = app(state().with_token(Token::new("s3cret-token")));
    for uri in ["/healthz", "/readyz", "/v2/health/live", "/v2/health/ready"] {
        assert_eq!(
            send(app.clone(), get(uri)).await.status,
            StatusCode::OK,
            "{uri}"
        );
    }
    let guarded = [
        get("/v1/models"),
        get("/metrics"),
        get("/v2/models/cells"),
        get("/v2/models/cells/ready"),
        get("/no/such/route"),
        post_bytes("/v1/models/cells/score", good_png()),
        post_bytes("/v1/zero-shot", Vec::new()),
        post_bytes("/v1/ask", Vec::new()),
        post_bytes("/v2/models/cells/infer", Vec::new()),
    ];
    for request in guarded {
        let uri = request.uri().to_string();
        let reply = send(app.clone(), request).await;
        assert_eq!(reply.status, StatusCode::UNAUTHORIZED, "{uri}");
        assert_eq!(reply.error_code(), "unauthorized");
        assert_eq!(reply.headers[header::WWW_AUTHENTICATE], "Bearer");
    }
    for value in [
        "Bearer wrong",
        "Bearer s3cret-toke",
        "Basic s3cret-token",
        "s3cret-token",
    ] {
        let request = Request::get("/v1/models")
            .header(header::AUTHORIZATION, value)
            .body(Body::empty())
            .unwrap();
        assert_eq!(
            send(app.clone(), request).await.status,
            StatusCode::UNAUTHORIZED,
            "{value}"
        );
    }
    let request = Request::get("/v1/models")
        .header(header::AUTHORIZATION, "bearer s3cret-token")
        .body(Body::empty())
        .unwrap();
    assert_eq!(send(app, request).await.status, StatusCode::OK);
}

#[tokio::test]
async fn zero_shot_is_503_without_an_engine() {
    let app = app(state());
    let png = good_png();
    let reply = send(app, zero_shot_crack(&png)).await;
    assert_eq!(reply.status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(reply.error_code(), "zero_shot_unavailable");
    let message = reply.json()["error"]["message"]
        .as_str()
        .unwrap()
        .to_owned();
    assert!(message.contains("--clip-weights"), "{message}");
    assert!(message.contains("FLAWSCOPE_CLIP_WEIGHTS"), "{message}");
    assert!(reply.headers.get(header::RETRY_AFTER).is_none());
}

/// A stand-in engine that checks the plumbing only.
struct Stub;

impl ZeroShotScorer for Stub {
    fn inspect(
        &self,
        image: &image::Rgb32FImage,
        object: &str,
        prompts: &[String],
    ) -> Result<Inspection, flawscope_core::Error> {
        assert_eq!(object, "solar cell");
        assert_eq!(prompts, ["a crack", "a dark spot"]);
        let (w, h) = (image.width() as usize, image.height() as usize);
        let mut values = vec![0.0; w * h];
        values[0] = 0.9;
        let map = flawscope_core::anomaly_map::AnomalyMap::new(w, h, values)
            .expect("the map fills the image");
        Ok(Inspection::of_map(
            0.7,
            0.7,
            true,
            map,
            OperatingPoint::probability(),
        ))
    }
}

#[tokio::test]
async fn zero_shot_engine_plugs_in() {
    let app = app(state().with_zero_shot(Arc::new(Stub)));
    let png = good_png();
    let reply = send(
        app.clone(),
        multipart(
            "/v1/zero-shot",
            &[
                Part::File("image", &png),
                Part::Text("object", "solar cell"),
                Part::Text("prompt", "a crack"),
                Part::Text("prompt", "a dark spot"),
            ],
        ),
    )
    .await;
    assert_eq!(reply.status, StatusCode::OK);
    let v = reply.json();
    assert_eq!(v["is_anomalous"], true);
    assert_eq!(v["regions"][0]["area"], 1);
    let reply = send(
        app,
        multipart(
            "/v1/zero-shot",
            &[
                Part::File("image", &png),
                Part::Text("object", "solar cell"),
            ],
        ),
    )
    .await;
    assert_eq!(reply.status, StatusCode::BAD_REQUEST);
    assert_eq!(reply.error_code(), "missing_prompt");
}

/// No CLIP weights anywhere (the environment is ignored).
fn no_clip() -> WeightsLookup {
    WeightsLookup::from_vars(None, |_| None)
}

fn tiny_engine() -> Arc<WinClip> {
    Arc::new(WinClip::from_dir(&tiny_clip(), "tiny", None, "flag", &Device::Cpu).unwrap())
}

/// A runtime whose CLIP is the tiny checkpoint.
fn tiny_runtime() -> Arc<Runtime> {
    Arc::new(Runtime::with_clip(Device::Cpu, no_clip(), VIT_B_16).with_engine(tiny_engine()))
}

#[tokio::test]
async fn zero_shot_with_the_tiny_clip_checkpoint() {
    let app = app(state().with_zero_shot(tiny_runtime()));
    let png = defect_png();
    let reply = send(app.clone(), zero_shot_crack(&png)).await;
    assert_eq!(reply.status, StatusCode::OK);
    let v = reply.json();
    // The same response as /v1/models/{name}/score.
    assert_eq!(
        (v["width"].as_u64(), v["height"].as_u64()),
        (Some(300), Some(300)),
        "{v}"
    );
    assert!(v["anomalous_fraction"].is_number(), "{v}");
    let score = v["score"].as_f64().unwrap();
    assert!((0.0..=1.0).contains(&score), "{v}");
    assert!(v["regions"].is_array(), "{v}");
    assert_eq!(v["object"], "solar cell");
    assert_eq!(v["prompts"], json!(["a crack"]));
    assert_eq!(v["is_anomalous"], score >= 0.5);
    // ?heatmap=png works as on the score route.
    let mut request = zero_shot_crack(&png);
    *request.uri_mut() = "/v1/zero-shot?heatmap=png".parse().unwrap();
    let v = send(app, request).await.json();
    let png_bytes = base64::engine::general_purpose::STANDARD
        .decode(v["heatmap_png"].as_str().unwrap())
        .unwrap();
    let overlay = image::load_from_memory(&png_bytes).unwrap();
    // The image, with the legend strip below it.
    assert_eq!(overlay.width(), 300);
    assert!(overlay.height() > 300);
}

#[tokio::test]
async fn winclip_model_files_are_served() {
    let tmp = tempfile::tempdir().unwrap();
    let winclip = Model::zero_shot(&tiny_runtime(), "solar cell", &[]).unwrap();
    winclip.save(&tmp.path().join("zs.flawscope")).unwrap();
    save_model(&tmp.path().join("cells.flawscope"));
    // The model file names the folder it was made with.
    let runtime = Runtime::with_clip(Device::Cpu, no_clip(), VIT_B_16);
    let models = load_models(tmp.path(), &runtime).unwrap();
    let app = app(AppState::new(models, config()).unwrap());
    let v = send(app.clone(), get("/v1/models")).await.json();
    let detectors: Vec<&str> = v["models"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["detector"].as_str().unwrap())
        .collect();
    assert_eq!(detectors, ["patchcore", "winclip"], "{v}");
    let reply = send(app, post_bytes("/v1/models/zs/score", defect_png())).await;
    assert_eq!(reply.status, StatusCode::OK);
    let score = reply.json()["score"].as_f64().unwrap();
    assert!((0.0..=1.0).contains(&score));
}

#[tokio::test]
async fn ask_answers_in_words() {
    let app1 = app(state());
    let png = defect_png();
    let reply = send(
        app1,
        multipart(
            "/v1/ask",
            &[
                Part::Text("text", "is this cell ok?"),
                Part::File("image", &png),
            ],
        ),
    )
    .await;
    assert_eq!(reply.status, StatusCode::OK);
    let v = reply.json();
    let answer = v["answer"].as_str().unwrap();
    assert!(answer.starts_with("cells: "), "{answer}");
    assert!(answer.contains("score"), "{answer}");
    if v["result"]["is_anomalous"] == true && !v["result"]["regions"].as_array().unwrap().is_empty()
    {
        assert!(answer.contains("% of the image"), "{answer}");
    }
    assert_eq!(v["question"], "is this cell ok?");
    check_result(&v["result"]);

    // Two models: the field or a mention in the text picks one.
    let app2 = app(state_with(&["cells", "tiles"], config()));
    let reply = send(
        app2.clone(),
        multipart(
            "/v1/ask",
            &[
                Part::Text("text", "anything wrong?"),
                Part::File("image", &png),
            ],
        ),
    )
    .await;
    assert_eq!(reply.status, StatusCode::BAD_REQUEST);
    assert_eq!(reply.error_code(), "model_required");
    let reply = send(
        app2.clone(),
        multipart(
            "/v1/ask",
            &[
                Part::Text("text", "check this with tiles please"),
                Part::File("image", &png),
            ],
        ),
    )
    .await;
    assert_eq!(reply.json()["model"], "tiles");
    // "cell" finds "cells" (a plural is not another word), and the answer
    // names the defects asked about, saying they were not checked one by one.
    let reply = send(
        app2.clone(),
        multipart(
            "/v1/ask",
            &[
                Part::Text("text", "any chips or scratches on this cell?"),
                Part::File("image", &png),
            ],
        ),
    )
    .await;
    assert_eq!(reply.status, StatusCode::OK);
    let v = reply.json();
    assert_eq!(v["model"], "cells");
    assert_eq!(
        v["defects_asked"],
        json!(["chips", "scratches on this cell"])
    );
    assert_eq!(v["defects_checked"], false);
    let answer = v["answer"].as_str().unwrap();
    assert!(answer.contains("\"chips\""), "{answer}");
    assert!(answer.contains("could not be checked"), "{answer}");
    // Why (no text layer, and how to add one) is for whoever runs the
    // server: the JSON note says it, the answer does not.
    assert!(!answer.contains("no text layer"), "{answer}");
    assert!(v["note"].as_str().unwrap().contains("no text layer"), "{v}");
    let reply = send(
        app2.clone(),
        multipart(
            "/v1/ask",
            &[Part::Text("model", "nope"), Part::File("image", &png)],
        ),
    )
    .await;
    assert_eq!(reply.status, StatusCode::NOT_FOUND);
    // A raw body is not a form.
    let reply = send(app2, post_bytes("/v1/ask", png.clone())).await;
    assert_eq!(reply.status, StatusCode::BAD_REQUEST);
    assert_eq!(reply.error_code(), "expected_multipart");
}

#[tokio::test]
async fn oip_metadata_and_infer() {
    let app = app(state());
    let meta = send(app.clone(), get("/v2/models/cells")).await;
    assert_eq!(meta.status, StatusCode::OK);
    let meta = meta.json();
    assert_eq!(meta["name"], "cells");
    assert_eq!(meta["inputs"][0]["datatype"], "BYTES");
    assert_eq!(meta["outputs"][2]["name"], "anomaly_map");
    let ready = send(app.clone(), get("/v2/models/cells/ready")).await;
    assert_eq!(ready.json()["ready"], true);

    let b64 = base64::engine::general_purpose::STANDARD.encode(good_png());
    let request = json!({
        "id": "req-1",
        "inputs": [{"name": "image", "shape": [1], "datatype": "BYTES", "parameters": {"content_type": "base64"}, "data": [b64]}],
    });
    let reply = send(
        app.clone(),
        json_request("/v2/models/cells/infer", &request),
    )
    .await;
    assert_eq!(reply.status, StatusCode::OK);
    let v = reply.json();
    assert_eq!(v["model_name"], "cells");
    assert_eq!(v["id"], "req-1");
    assert_eq!(v["outputs"][0]["name"], "score");
    assert_eq!(v["outputs"][0]["datatype"], "FP32");
    assert_eq!(v["outputs"][0]["shape"], json!([1]));
    let score = v["outputs"][0]["data"][0].as_f64().unwrap();
    assert!((0.0..=1.0).contains(&score));
    assert_eq!(v["outputs"][1]["name"], "is_anomalous");

    let request = json!({
        "inputs": [{"name": "image", "shape": [1], "datatype": "BYTES", "parameters": {"content_type": "base64"}, "data": [b64]}],
        "outputs": [{"name": "score"}, {"name": "anomaly_map"}],
    });
    let v = send(
        app.clone(),
        json_request("/v2/models/cells/infer", &request),
    )
    .await
    .json();
    assert_eq!(v["outputs"].as_array().unwrap().len(), 2);
    let map = &v["outputs"][1];
    assert_eq!(map["name"], "anomaly_map");
    assert_eq!(map["shape"], json!([300, 300]));
    assert_eq!(map["data"].as_array().unwrap().len(), 90_000);
    assert!(v.get("id").is_none());

    for bad in [
        json!({"inputs": [{"name": "image", "shape": [1], "datatype": "BYTES", "parameters": {"content_type": "base64"}, "data": ["%%%"]}]}),
        json!({"inputs": [{"name": "image", "shape": [1], "datatype": "FP32", "data": [1.0]}]}),
        json!({"inputs": [{"name": "image", "shape": [1], "datatype": "BYTES", "parameters": {"content_type": "base64"}, "data": [b64]}],
               "outputs": [{"name": "logits"}]}),
        json!({"inputs": []}),
        json!({"nothing": true}),
    ] {
        let reply = send(app.clone(), json_request("/v2/models/cells/infer", &bad)).await;
        assert_eq!(reply.status, StatusCode::BAD_REQUEST, "{bad}");
    }
    let not_png = base64::engine::general_purpose::STANDARD.encode(b"not an image");
    let request = json!({"inputs": [{"name": "image", "shape": [1], "datatype": "BYTES", "parameters": {"content_type": "base64"}, "data": [not_png]}]});
    let reply = send(app, json_request("/v2/models/cells/infer", &request)).await;
    assert_eq!(reply.status, StatusCode::BAD_REQUEST);
    assert_eq!(reply.error_code(), "unsupported_image");
}

#[tokio::test]
async fn metrics_count_routes_statuses_and_latency() {
    let app = app(state());
    send(
        app.clone(),
        post_bytes("/v1/models/cells/score", good_png()),
    )
    .await;
    send(app.clone(), post_bytes("/v1/models/nope/score", good_png())).await;
    send(app.clone(), get("/nowhere")).await;
    let reply = send(app, get("/metrics")).await;
    assert_eq!(reply.status, StatusCode::OK);
    assert!(
        reply.headers[header::CONTENT_TYPE]
            .to_str()
            .unwrap()
            .starts_with("text/plain; version=0.0.4")
    );
    let text = String::from_utf8(reply.body.to_vec()).unwrap();
    for line in [
        "flawscope_http_requests_total{route=\"/v1/models/{name}/score\",status=\"200\"} 1",
        "flawscope_http_requests_total{route=\"/v1/models/{name}/score\",status=\"404\"} 1",
        "flawscope_http_requests_total{route=\"unmatched\",status=\"404\"} 1",
        "flawscope_http_request_duration_seconds_bucket{route=\"/v1/models/{name}/score\",le=\"+Inf\"} 2",
        "flawscope_http_request_duration_seconds_count{route=\"/v1/models/{name}/score\"} 2",
        "flawscope_http_requests_in_flight 1",
        "flawscope_models_loaded 1",
        "flawscope_inference_slots 4",
    ] {
        assert!(text.contains(line), "missing {line} in\n{text}");
    }
    // The raw model name never becomes a label.
    assert!(!text.contains("nope"));
}

#[tokio::test]
async fn excess_load_is_shed_with_retry_after() {
    let state = state_with(
        &["cells"],
        ServerConfig {
            max_concurrent: 1,
            max_queued: 0,
            ..config()
        },
    );
    let app = app(state.clone());
    let held = state.try_slot().unwrap();
    let b64 = base64::engine::general_purpose::STANDARD.encode(good_png());
    let png = good_png();
    for request in [
        post_bytes("/v1/models/cells/score", good_png()),
        multipart("/v1/ask", &[Part::File("image", &png)]),
        json_request(
            "/v2/models/cells/infer",
            &json!({"inputs": [{"name": "image", "shape": [1], "datatype": "BYTES", "parameters": {"content_type": "base64"}, "data": [b64]}]}),
        ),
    ] {
        let uri = request.uri().to_string();
        let reply = send(app.clone(), request).await;
        assert_eq!(reply.status, StatusCode::SERVICE_UNAVAILABLE, "{uri}");
        assert_eq!(reply.error_code(), "overloaded");
        assert_eq!(reply.headers[header::RETRY_AFTER], "1");
        // Errors after a body close the connection (the middleware cannot
        // tell whether the body was read to its end).
        assert_eq!(reply.headers[header::CONNECTION], "close");
    }
    // Health and metadata are never shed.
    assert_eq!(
        send(app.clone(), get("/v1/models")).await.status,
        StatusCode::OK
    );
    drop(held);
    let reply = send(app, post_bytes("/v1/models/cells/score", good_png())).await;
    assert_eq!(reply.status, StatusCode::OK);
}

#[tokio::test]
async fn busy_slots_queue_a_few_requests_and_shed_the_rest() {
    let state = state_with(
        &["cells"],
        ServerConfig {
            max_concurrent: 1,
            max_queued: 1,
            queue_wait: Duration::from_secs(60),
            ..config()
        },
    );
    let app = app(state.clone());
    let held = state.try_slot().unwrap();
    // The first extra request waits in the queue …
    let waiting = tokio::spawn(send(
        app.clone(),
        post_bytes("/v1/models/cells/score", good_png()),
    ));
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    while state.queued() == 0 {
        assert!(std::time::Instant::now() < deadline, "never queued");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    // … the next finds the queue full and is shed at once …
    let shed = send(
        app.clone(),
        post_bytes("/v1/models/cells/score", good_png()),
    )
    .await;
    assert_eq!(shed.status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(shed.error_code(), "overloaded");
    // … and the waiting one is answered once the slot frees.
    drop(held);
    let reply = waiting.await.unwrap();
    assert_eq!(reply.status, StatusCode::OK);
    assert_eq!(state.queued(), 0);
}

#[tokio::test]
async fn a_queued_request_is_shed_when_its_wait_runs_out() {
    let state = state_with(
        &["cells"],
        ServerConfig {
            max_concurrent: 1,
            max_queued: 4,
            queue_wait: Duration::from_millis(50),
            ..config()
        },
    );
    let app = app(state.clone());
    let _held = state.try_slot().unwrap();
    let reply = send(app, post_bytes("/v1/models/cells/score", good_png())).await;
    assert_eq!(reply.status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(reply.headers[header::RETRY_AFTER], "1");
    assert_eq!(state.queued(), 0, "the queue place is given back");
}

/// A zero-shot engine that sleeps before it answers.
struct Sleepy(Duration);

impl ZeroShotScorer for Sleepy {
    fn inspect(
        &self,
        image: &image::Rgb32FImage,
        _object: &str,
        _prompts: &[String],
    ) -> Result<Inspection, flawscope_core::Error> {
        std::thread::sleep(self.0);
        let (w, h) = (image.width() as usize, image.height() as usize);
        let map = flawscope_core::anomaly_map::AnomalyMap::new(w, h, vec![0.0; w * h])
            .expect("the map fills the image");
        Ok(Inspection::of_map(
            0.0,
            0.0,
            false,
            map,
            OperatingPoint::probability(),
        ))
    }
}

#[tokio::test]
async fn slow_requests_time_out_and_keep_their_slot_until_done() {
    let state = state_with(
        &["cells"],
        ServerConfig {
            max_concurrent: 1,
            timeout: Duration::from_millis(500),
            ..config()
        },
    )
    .with_zero_shot(Arc::new(Sleepy(Duration::from_secs(2))));
    let app = app(state.clone());
    let png = good_png();
    let reply = send(app.clone(), zero_shot_crack(&png)).await;
    assert_eq!(reply.status, StatusCode::GATEWAY_TIMEOUT);
    assert_eq!(reply.error_code(), "timeout");
    // The abandoned inference still holds the only slot, then frees it.
    assert_eq!(state.busy_slots(), 1);
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    while state.busy_slots() > 0 {
        assert!(std::time::Instant::now() < deadline, "slot never freed");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

#[test]
fn invalid_settings_are_refused() {
    for config in [
        ServerConfig {
            max_concurrent: 0,
            ..ServerConfig::default()
        },
        ServerConfig {
            timeout: Duration::ZERO,
            ..ServerConfig::default()
        },
        ServerConfig {
            body_timeout: Duration::ZERO,
            ..ServerConfig::default()
        },
        ServerConfig {
            body_limit: 0,
            ..ServerConfig::default()
        },
    ] {
        assert!(AppState::new(Vec::new(), config).is_err());
    }
    let bad_name = ServedModel {
        name: "../x".into(),
        model: model(),
    };
    assert!(AppState::new(vec![bad_name], ServerConfig::default()).is_err());
}

// ---- The service on a real loopback socket: slow and invalid uploads. ----

/// Serves `state` on a free loopback port for the rest of the test.
async fn serve_on_loopback(state: AppState) -> std::net::SocketAddr {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(flawscope_server::serve(
        listener,
        state,
        std::future::pending(),
    ));
    addr
}

/// Reads a whole `Connection: close` response: status and body. A reset
/// after the response (the server closing with upload bytes unread) is
/// not an error here.
async fn read_response(stream: &mut (impl tokio::io::AsyncRead + Unpin)) -> (u16, Value) {
    use tokio::io::AsyncReadExt;
    let mut raw = Vec::new();
    let read = async {
        let mut chunk = [0u8; 8192];
        while let Ok(n @ 1..) = stream.read(&mut chunk).await {
            raw.extend_from_slice(&chunk[..n]);
        }
    };
    tokio::time::timeout(Duration::from_secs(60), read)
        .await
        .expect("no response within 60 s");
    let split = raw
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .unwrap_or_else(|| panic!("no header end in {:?}", String::from_utf8_lossy(&raw)));
    let head = String::from_utf8_lossy(&raw[..split]).to_string();
    let status = head.split(' ').nth(1).unwrap().parse().unwrap();
    let body = serde_json::from_slice(&raw[split + 4..]).unwrap_or(Value::Null);
    (
        status,
        uniform_error(body, |name| {
            head.lines().find_map(|l| {
                let (key, value) = l.split_once(':')?;
                key.eq_ignore_ascii_case(name)
                    .then(|| value.trim().to_owned())
            })
        }),
    )
}

/// A `/v2` error (`{"error": "<message>"}` plus the code header) in the
/// `/v1` shape, so the checks below read both alike.
fn uniform_error(body: Value, header: impl Fn(&str) -> Option<String>) -> Value {
    match body["error"].as_str() {
        Some(message) => json!({"error": {
            "code": header("flawscope-error-code").expect("a /v2 error names its code"),
            "message": message,
        }}),
        None => body,
    }
}

/// Request head for `POST uri` with `Connection: close` and `extra` headers.
fn post_head(uri: &str, extra: &str) -> String {
    format!(
        "POST {uri} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: image/png\r\n\
         Connection: close\r\n{extra}\r\n"
    )
}

/// One whole request over a fresh connection: status, body and time taken.
async fn exchange(addr: std::net::SocketAddr, uri: &str, body: &[u8]) -> (u16, Value, Duration) {
    use tokio::io::AsyncWriteExt;
    let started = std::time::Instant::now();
    let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
    let head = post_head(uri, &format!("Content-Length: {}\r\n", body.len()));
    stream.write_all(head.as_bytes()).await.unwrap();
    stream.write_all(body).await.unwrap();
    let (status, v) = read_response(&mut stream).await;
    (status, v, started.elapsed())
}

/// A client that sends the head of a 1000-byte upload, then one body byte
/// every 0.5 s until the server answers or closes; returns what it got.
fn slow_upload(addr: std::net::SocketAddr, uri: &'static str) -> tokio::task::JoinHandle<u16> {
    tokio::spawn(async move {
        use tokio::io::AsyncWriteExt;
        let stream = tokio::net::TcpStream::connect(addr).await.unwrap();
        let (mut reader, mut writer) = stream.into_split();
        let head = post_head(uri, "Content-Length: 1000\r\n");
        writer.write_all(head.as_bytes()).await.unwrap();
        let drip = async move {
            for _ in 0..1000 {
                if writer.write_all(b"x").await.is_err() {
                    break;
                }
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
            std::future::pending::<()>().await;
        };
        let answer = async move {
            use tokio::io::AsyncReadExt;
            let mut raw = Vec::new();
            let _ = reader.read_to_end(&mut raw).await;
            String::from_utf8_lossy(&raw)
                .split(' ')
                .nth(1)
                .and_then(|s| s.parse().ok())
                .unwrap_or(0)
        };
        tokio::select! {
            status = answer => status,
            () = drip => unreachable!("the drip never ends"),
        }
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn slow_uploads_do_not_hold_inference_slots() {
    let state = state_with(&["cells"], config().with_slots(2));
    let addr = serve_on_loopback(state.clone()).await;
    let uri = "/v1/models/cells/score";
    let png = good_png();
    // The normal latency, unloaded (the slowest of three, after a warm-up).
    exchange(addr, uri, &png).await;
    let mut normal = Duration::ZERO;
    for _ in 0..3 {
        let (status, v, took) = exchange(addr, uri, &png).await;
        assert_eq!(status, 200, "{v}");
        normal = normal.max(took);
    }
    // As many slow uploads as there are slots, well under way.
    let slow = [slow_upload(addr, uri), slow_upload(addr, uri)];
    tokio::time::sleep(Duration::from_millis(1200)).await;
    for i in 0..10 {
        let (status, v, took) = exchange(addr, uri, &png).await;
        assert_eq!(status, 200, "request {i}: {v}");
        check_result(&v);
        assert!(
            took <= Duration::from_secs(2) + normal,
            "request {i} took {took:?} (unloaded: {normal:?})"
        );
    }
    for upload in &slow {
        assert!(!upload.is_finished(), "a slow upload was cut off early");
    }
    slow.iter().for_each(tokio::task::JoinHandle::abort);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn invalid_uploads_are_refused_at_once_while_all_slots_are_busy() {
    use tokio::io::AsyncWriteExt;
    let state = state_with(&["cells"], config().with_slots(2));
    let queue_wait = state.config().queue_wait;
    let held = [state.try_slot().unwrap(), state.try_slot().unwrap()];
    let addr = serve_on_loopback(state.clone()).await;
    let uri = "/v1/models/cells/score";
    let fast = queue_wait / 5;

    let not_png = base64::engine::general_purpose::STANDARD.encode(b"not an image");
    let oip = json!({"inputs": [{"name": "image", "shape": [1], "datatype": "BYTES", "parameters": {"content_type": "base64"}, "data": [not_png]}]});
    for (route, body, code) in [
        (uri, Vec::new(), "empty_image"),
        (
            uri,
            b"definitely not an image".to_vec(),
            "unsupported_image",
        ),
        ("/v1/ask", good_png(), "expected_multipart"),
        (
            "/v2/models/cells/infer",
            b"{}".to_vec(),
            "invalid_inference_request",
        ),
        (
            "/v2/models/cells/infer",
            oip.to_string().into_bytes(),
            "unsupported_image",
        ),
    ] {
        let (status, v, took) = exchange(addr, route, &body).await;
        assert_eq!(status, 400, "{route}: {v}");
        assert_eq!(v["error"]["code"], code, "{route}");
        assert!(took < fast, "{route} {code} took {took:?}");
    }

    // 22 MB declared: refused from the head.
    let started = std::time::Instant::now();
    let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
    let head = post_head(uri, &format!("Content-Length: {}\r\n", 22 * 1024 * 1024));
    stream.write_all(head.as_bytes()).await.unwrap();
    let (status, v) = read_response(&mut stream).await;
    assert_eq!(status, 413, "{v}");
    assert_eq!(v["error"]["code"], "payload_too_large");
    assert!(started.elapsed() < fast, "took {:?}", started.elapsed());

    // 22 MB chunked, no declared length: cut off at the limit.
    let started = std::time::Instant::now();
    let stream = tokio::net::TcpStream::connect(addr).await.unwrap();
    let (mut reader, mut writer) = stream.into_split();
    let sender = tokio::spawn(async move {
        let head = post_head(uri, "Transfer-Encoding: chunked\r\n");
        writer.write_all(head.as_bytes()).await?;
        let chunk = vec![7u8; 64 * 1024];
        for _ in 0..(22 * 16) {
            writer.write_all(b"10000\r\n").await?;
            writer.write_all(&chunk).await?;
            writer.write_all(b"\r\n").await?;
        }
        writer.write_all(b"0\r\n\r\n").await
    });
    let (status, v) = read_response(&mut reader).await;
    assert_eq!(status, 413, "{v}");
    assert_eq!(v["error"]["code"], "payload_too_large");
    assert!(
        started.elapsed() < queue_wait / 2,
        "took {:?}",
        started.elapsed()
    );
    sender.abort();

    // A valid image still waits for a slot.
    assert_eq!(state.busy_slots(), 2);
    drop(held);
    let (status, v, _) = exchange(addr, uri, &good_png()).await;
    assert_eq!(status, 200, "{v}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_upload_slower_than_the_body_timeout_gets_408() {
    let body_timeout = Duration::from_secs(1);
    let state = state_with(
        &["cells"],
        ServerConfig {
            body_timeout,
            ..config().with_slots(1)
        },
    );
    let addr = serve_on_loopback(state.clone()).await;
    let started = std::time::Instant::now();
    let uploads = [
        slow_upload(addr, "/v1/models/cells/score"),
        slow_upload(addr, "/v2/models/cells/infer"),
    ];
    for upload in uploads {
        let status = tokio::time::timeout(Duration::from_secs(20), upload)
            .await
            .expect("the slow upload was never answered")
            .unwrap();
        assert_eq!(status, 408);
    }
    let took = started.elapsed();
    assert!(
        took >= body_timeout && took < body_timeout * 5,
        "answered after {took:?}"
    );
    assert_eq!(state.busy_slots(), 0);
    // Not the request timeout (504): the body deadline is its own.
    assert_eq!(state.metrics().requests("/v1/models/{name}/score", 408), 1);
    let (status, v, _) = exchange(addr, "/v1/models/cells/score", &good_png()).await;
    assert_eq!(status, 200, "{v}");
}

/// A connection that sends the head of a 1000-byte upload and 10 body
/// bytes, then nothing.
async fn stalled_upload(addr: std::net::SocketAddr, uri: &str) -> tokio::net::TcpStream {
    use tokio::io::AsyncWriteExt;
    let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
    let head = post_head(uri, "Content-Length: 1000\r\n");
    stream.write_all(head.as_bytes()).await.unwrap();
    stream.write_all(&[b'x'; 10]).await.unwrap();
    stream
}

/// `GET path` on a fresh connection: status and time taken.
async fn get_timed(addr: std::net::SocketAddr, path: &str) -> (u16, Duration) {
    use tokio::io::AsyncWriteExt;
    let started = std::time::Instant::now();
    let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
    let head = format!("GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n");
    stream.write_all(head.as_bytes()).await.unwrap();
    let (status, _) = read_response(&mut stream).await;
    (status, started.elapsed())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn idle_sockets_and_stalled_uploads_leave_health_and_scoring_on_the_air() {
    use tokio::io::AsyncReadExt;
    // Client and server sockets share this process's descriptors.
    let _ = rlimit::increase_nofile_limit(4096);
    // The reporter's setting: 2 slots, so 68 body permits; 70 stalled
    // uploads took them all and everyone else got 503 for 10 s.
    let state = state_with(
        &["cells"],
        ServerConfig {
            header_timeout: Duration::from_secs(3),
            ..config().with_slots(2)
        },
    );
    assert_eq!(state.config().max_buffered(), 68);
    let addr = serve_on_loopback(state.clone()).await;
    let uri = "/v1/models/cells/score";
    let png = good_png();
    exchange(addr, uri, &png).await;
    let (_, _, normal) = exchange(addr, uri, &png).await;

    let mut idle = Vec::new();
    for _ in 0..300 {
        idle.push(tokio::net::TcpStream::connect(addr).await.unwrap());
    }
    let mut stalled = Vec::new();
    for _ in 0..70 {
        stalled.push(stalled_upload(addr, uri).await);
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    let mut worst_health = Duration::ZERO;
    for _ in 0..5 {
        let (status, took) = get_timed(addr, "/healthz").await;
        assert_eq!(status, 200);
        worst_health = worst_health.max(took);
    }
    let (status, v, took) = exchange(addr, uri, &png).await;
    eprintln!(
        "300 idle + 70 stalled: /healthz worst of 5 {worst_health:?}, score {took:?} \
         (unloaded {normal:?})"
    );
    assert!(worst_health < Duration::from_secs(1), "{worst_health:?}");
    assert_eq!(status, 200, "{v}");
    check_result(&v);
    assert!(
        took < Duration::from_secs(1) + normal,
        "score took {took:?}"
    );
    // The stalled uploads hold no body permit: only their bytes.
    assert_eq!(state.buffered(), 0);
    assert!(
        state.body_bytes_held() <= 70 * 10,
        "{}",
        state.body_bytes_held()
    );

    // The header timeout closes the idle sockets (and idle keep-alive).
    tokio::time::sleep(Duration::from_secs(4)).await;
    let mut closed = 0;
    for socket in idle.iter_mut().take(20) {
        let mut byte = [0u8; 1];
        let read = tokio::time::timeout(Duration::from_millis(200), socket.read(&mut byte)).await;
        if matches!(read, Ok(Ok(0) | Err(_))) {
            closed += 1;
        }
    }
    assert_eq!(
        closed, 20,
        "idle sockets still open past the header timeout"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn body_bytes_held_at_once_are_bounded() {
    use tokio::io::AsyncWriteExt;
    // One slot: room for 256 KiB × (1 + 4) of bodies at once.
    let state = state_with(
        &["cells"],
        ServerConfig {
            max_queued: 0,
            body_limit: 256 << 10,
            ..config().with_slots(1)
        },
    );
    assert_eq!(state.config().max_body_bytes(), 5 * (256 << 10));
    let addr = serve_on_loopback(state.clone()).await;
    let uri = "/v1/models/cells/score";
    // Five uploads that send all but the last bytes, then stall.
    let mut held = Vec::new();
    for _ in 0..5 {
        let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
        let head = post_head(uri, &format!("Content-Length: {}\r\n", 256 << 10));
        stream.write_all(head.as_bytes()).await.unwrap();
        stream
            .write_all(&vec![b'x'; (256 << 10) - 16])
            .await
            .unwrap();
        held.push(stream);
    }
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while state.body_bytes_held() < 5 * ((256 << 10) - 16) - 64 * 1024 {
        assert!(
            std::time::Instant::now() < deadline,
            "uploads never arrived"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let (status, v, took) = exchange(addr, uri, &good_png()).await;
    assert_eq!(status, 503, "{v}");
    assert_eq!(v["error"]["code"], "overloaded");
    assert!(took < Duration::from_secs(1), "took {took:?}");
    // Hanging up frees the bytes.
    drop(held);
    while state.body_bytes_held() > 0 {
        assert!(std::time::Instant::now() < deadline, "bytes never freed");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let (status, v, _) = exchange(addr, uri, &good_png()).await;
    assert_eq!(status, 200, "{v}");
}

#[tokio::test]
async fn the_page_is_open_and_the_api_behind_it_is_not() {
    let app = app(state().with_token(Token::new("s3cret-token")));
    for (uri, kind) in [
        ("/", "text/html"),
        ("/web/app.js", "text/javascript"),
        ("/web/style.css", "text/css"),
    ] {
        let reply = send(app.clone(), get(uri)).await;
        assert_eq!(reply.status, StatusCode::OK, "{uri}");
        let content_type = reply.headers[header::CONTENT_TYPE].to_str().unwrap();
        assert!(content_type.starts_with(kind), "{uri}: {content_type}");
        let csp = reply.headers[header::CONTENT_SECURITY_POLICY]
            .to_str()
            .unwrap();
        assert!(csp.contains("default-src 'none'"), "{csp}");
        assert!(!reply.body.is_empty());
    }
    let page = send(app.clone(), get("/")).await;
    let html = String::from_utf8_lossy(&page.body);
    assert!(html.contains("<title>flawscope"), "{html}");
    for request in [
        get("/v1/capabilities"),
        multipart("/v1/decisions", &[Part::Text("decision", "ok")]),
    ] {
        let uri = request.uri().to_string();
        let reply = send(app.clone(), request).await;
        assert_eq!(reply.status, StatusCode::UNAUTHORIZED, "{uri}");
    }
}

#[tokio::test]
async fn capabilities_say_what_the_page_can_do() {
    let v = send(app(state()), get("/v1/capabilities")).await.json();
    assert_eq!(v["zero_shot"]["available"], false, "{v}");
    assert!(
        v["zero_shot"]["reason"]
            .as_str()
            .unwrap()
            .contains("--clip-weights"),
        "{v}"
    );
    assert_eq!(v["zero_shot"]["max_prompts"], 32);
    assert_eq!(v["results_store"], false);
    assert_eq!(v["body_limit_bytes"], config().body_limit);
    assert_eq!(v["batch"]["min_images"], 8, "{v}");
    assert_eq!(v["batch"]["max_images"], 200, "{v}");
    assert_eq!(v["batch"]["max_pixels"], config().image_limits.max_pixels);
    let engine: Arc<dyn ZeroShotScorer> = tiny_runtime();
    let v = send(app(state().with_zero_shot(engine)), get("/v1/capabilities"))
        .await
        .json();
    assert_eq!(v["zero_shot"]["available"], true, "{v}");
    assert!(v["zero_shot"].get("reason").is_none(), "{v}");
}

fn decision(png: &[u8], model: &str, name: &str, decision: &str) -> Request<Body> {
    multipart(
        "/v1/decisions",
        &[
            Part::File("image", png),
            Part::Text("model", model),
            Part::Text("name", name),
            Part::Text("decision", decision),
        ],
    )
}

#[tokio::test]
async fn decisions_go_to_the_results_store() {
    use flawscope_results::store::{Decision, Store};
    use flawscope_server::{ResultsStore, StoredModel};

    // Without a store: said plainly.
    let reply = send(
        app(state()),
        decision(&defect_png(), "cells", "d.png", "ng"),
    )
    .await;
    assert_eq!(reply.status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(reply.error_code(), "no_results_store");

    let tmp = tempfile::tempdir().unwrap();
    let db = tmp.path().join("results.sqlite");
    let entry = StoredModel {
        name: "models/cells.flawscope".into(),
        identity: "sha256:0123".into(),
    };
    let results = ResultsStore::new(
        Store::open(&db).unwrap(),
        [("cells".to_owned(), entry)].into_iter().collect(),
    );
    let app = app(state().with_results(results));
    let scored = send(
        app.clone(),
        post_bytes("/v1/models/cells/score", defect_png()),
    )
    .await
    .json();

    let reply = send(
        app.clone(),
        decision(&defect_png(), "cells", "../elsewhere/d.png", "ng"),
    )
    .await;
    assert_eq!(reply.status, StatusCode::OK, "{}", reply.json());
    let v = reply.json();
    assert_eq!(v["path"], "upload:d.png");
    assert_eq!(v["decision"], "ng");
    assert_eq!(v["model"], "models/cells.flawscope");
    assert!(v["decided_at"].is_string());
    let rows = Store::open_existing(&db).unwrap().all_results().unwrap();
    assert_eq!(rows.len(), 1);
    assert_eq!(rows[0].decision, Decision::Ng);
    assert_eq!(rows[0].model_identity, "sha256:0123");
    // The stored score is the server's own, the same as the API's.
    // (JSON carries the f32 in its shortest decimal form; compare as f32.)
    assert_eq!(rows[0].score, scored["score"].as_f64().unwrap() as f32);

    // Undo, as the TUI's `u` does.
    let reply = send(
        app.clone(),
        decision(&defect_png(), "cells", "d.png", "none"),
    )
    .await;
    assert_eq!(reply.status, StatusCode::OK);
    let rows = Store::open_existing(&db).unwrap().all_results().unwrap();
    assert_eq!(rows[0].decision, Decision::None);
    assert!(rows[0].decided_at.is_none());

    // Bad requests change nothing.
    for (request, status, code) in [
        (
            decision(&defect_png(), "cells", "d.png", "maybe"),
            StatusCode::BAD_REQUEST,
            "invalid_decision",
        ),
        (
            decision(b"not an image", "cells", "d.png", "ok"),
            StatusCode::BAD_REQUEST,
            "unsupported_image",
        ),
        (
            decision(&defect_png(), "nope", "d.png", "ok"),
            StatusCode::NOT_FOUND,
            "not_found",
        ),
        (
            decision(&defect_png(), "cells", "/", "ok"),
            StatusCode::BAD_REQUEST,
            "missing_name",
        ),
        (
            post_bytes("/v1/decisions", defect_png()),
            StatusCode::BAD_REQUEST,
            "expected_multipart",
        ),
    ] {
        let reply = send(app.clone(), request).await;
        assert_eq!(reply.status, status, "{}", reply.json());
        assert_eq!(reply.error_code(), code);
    }
    let rows = Store::open_existing(&db).unwrap().all_results().unwrap();
    assert_eq!(rows.len(), 1);
    assert_eq!(rows[0].decision, Decision::None);
}

#[tokio::test]
async fn score_responses_carry_the_answer_sentence() {
    let v = send(
        app(state()),
        post_bytes("/v1/models/cells/score", defect_png()),
    )
    .await
    .json();
    let answer = v["answer"].as_str().unwrap();
    assert!(answer.starts_with("cells: "), "{answer}");
    assert!(answer.contains(&format!("score {:.2}", v["score"].as_f64().unwrap())));
}

/// A model with a text layer answers `/v1/ask` about each asked defect, with
/// its own calibrated threshold and false-alarm estimate.
#[tokio::test]
async fn ask_checks_each_asked_defect_with_the_text_layer() {
    let runtime = tiny_runtime();
    let train: Vec<PathBuf> = images_in("train/good").into_iter().take(12).collect();
    let mut model = common::small_patchcore(12, 256, &runtime);
    model
        .add_prompt_layer(
            &runtime,
            "solar cell",
            &train,
            &flawscope_core::images::ImageLimits::default(),
            &flawscope_core::progress::NoProgress,
        )
        .unwrap();
    let state = AppState::new(
        vec![ServedModel {
            name: "cells".into(),
            model: Arc::new(model),
        }],
        config(),
    )
    .unwrap();
    let png = defect_png();
    let reply = send(
        app(state.clone()),
        multipart(
            "/v1/ask",
            &[
                Part::Text("text", "any cracks or dark spots on this part?"),
                Part::File("image", &png),
            ],
        ),
    )
    .await;
    assert_eq!(reply.status, StatusCode::OK);
    let v = reply.json();
    assert_eq!(v["defects_asked"], json!(["cracks", "dark spots"]));
    assert_eq!(v["defects_checked"], true);
    let defects = v["defects"].as_array().unwrap();
    assert_eq!(defects.len(), 2, "{v}");
    for (d, asked) in defects.iter().zip(["cracks", "dark spots"]) {
        assert_eq!(d["description"], asked);
        // 12 images, all of them (fewer than 300) set each threshold.
        assert_eq!(d["normal_images"], 12, "{d}");
        let bound = d["false_alarm_upper_bound_95"].as_f64().unwrap();
        assert!(
            d["estimated_false_alarm_rate"].as_f64().unwrap() <= bound,
            "{d}"
        );
        assert_eq!(
            d["is_anomalous"],
            d["score"].as_f64().unwrap() >= 0.5,
            "{d}"
        );
    }
    let answer = v["answer"].as_str().unwrap();
    assert!(answer.contains("\"cracks\": "), "{answer}");
    assert!(answer.contains("\"dark spots\": "), "{answer}");
    let flagged = v["flagged_by"].as_array().unwrap();
    assert_eq!(v["is_anomalous"], !flagged.is_empty(), "{v}");
    let any_defect = defects.iter().any(|d| d["is_anomalous"] == true);
    assert!(
        answer.starts_with(if any_defect { "Yes: " } else { "No: " }),
        "{answer}"
    );
    assert!(answer.contains(" Overall, cells: "), "{answer}");
    let asked_json = v.clone();

    // The chat style: the same paragraph alone, as plain text.
    let app = app(state);
    let reply = send(
        app.clone(),
        multipart(
            "/v1/ask",
            &[
                Part::Text("text", "any cracks or dark spots on this part?"),
                Part::Text("style", "chat"),
                Part::File("image", &png),
            ],
        ),
    )
    .await;
    assert_eq!(reply.status, StatusCode::OK);
    assert_eq!(
        reply.headers[header::CONTENT_TYPE],
        "text/plain; charset=utf-8"
    );
    assert_eq!(
        std::str::from_utf8(&reply.body).unwrap(),
        asked_json["answer"].as_str().unwrap()
    );
    let reply = send(
        app.clone(),
        multipart(
            "/v1/ask",
            &[
                Part::Text("text", "cracks?"),
                Part::Text("style", "poem"),
                Part::File("image", &png),
            ],
        ),
    )
    .await;
    assert_eq!(reply.status, StatusCode::BAD_REQUEST);
    assert_eq!(reply.error_code(), "bad_style");

    // The score route takes the same defects as `defect` fields (or their
    // older spelling `prompt`) and gives the same checks, beside the
    // model's own verdict.
    let reply = send(
        app.clone(),
        multipart(
            "/v1/models/cells/score",
            &[
                Part::Text("defect", "cracks"),
                Part::Text("prompt", "dark spots"),
                Part::File("image", &png),
            ],
        ),
    )
    .await;
    assert_eq!(reply.status, StatusCode::OK);
    let v = reply.json();
    assert_eq!(v["prompts"], json!(["cracks", "dark spots"]));
    assert_eq!(v["defects"], asked_json["defects"], "{v}");
    assert_eq!(
        v["model_is_anomalous"],
        asked_json["result"]["is_anomalous"]
    );
    assert_eq!(v["flagged_by"], asked_json["flagged_by"]);
    assert_eq!(v["is_anomalous"], asked_json["is_anomalous"]);
    assert!(v.get("defects_unchecked").is_none(), "{v}");
    let answer = v["answer"].as_str().unwrap();
    assert!(answer.starts_with("cells: "), "{answer}");
    assert!(answer.contains("\"dark spots\": "), "{answer}");
    // Without prompts: no typed defects, and only the model can flag.
    let v = send(
        app.clone(),
        multipart("/v1/models/cells/score", &[Part::File("image", &png)]),
    )
    .await
    .json();
    assert!(v.get("defects").is_none(), "{v}");
    let only_model = if v["is_anomalous"] == true {
        json!(["model"])
    } else {
        json!([])
    };
    assert_eq!(v["flagged_by"], only_model, "{v}");
    assert_eq!(v["is_anomalous"], asked_json["result"]["is_anomalous"]);
    // An empty or over-long description is the asker's to fix.
    for (prompt, code) in [
        ("  ", "bad_prompt"),
        (&"very ".repeat(80) as &str, "bad_prompt"),
    ] {
        let reply = send(
            app.clone(),
            multipart(
                "/v1/models/cells/score",
                &[Part::Text("prompt", prompt), Part::File("image", &png)],
            ),
        )
        .await;
        assert_eq!(reply.status, StatusCode::BAD_REQUEST, "{}", reply.json());
        assert_eq!(reply.error_code(), code);
    }
    // `/v1/models` says the model has a text layer, and for what object.
    let v = send(app, get("/v1/models")).await.json();
    let listed = &v["models"][0];
    assert_eq!(listed["object"], "solar cell", "{v}");
    assert_eq!(listed["text_layer"]["available"], true, "{v}");
    assert_eq!(listed["text_layer"]["normal_images"], 12, "{v}");
}

/// Typed defects on the score route of a model without a text layer: the
/// classical verdict stands, and the response says why they were not checked.
#[tokio::test]
async fn score_with_prompts_but_no_text_layer_keeps_the_classical_verdict() {
    let app = app(state());
    let png = defect_png();
    let plain = send(
        app.clone(),
        multipart("/v1/models/cells/score", &[Part::File("image", &png)]),
    )
    .await
    .json();
    let reply = send(
        app,
        multipart(
            "/v1/models/cells/score",
            &[Part::Text("prompt", "crack"), Part::File("image", &png)],
        ),
    )
    .await;
    assert_eq!(reply.status, StatusCode::OK);
    let v = reply.json();
    assert_eq!(v["is_anomalous"], plain["is_anomalous"]);
    assert_eq!(v["model_is_anomalous"], plain["is_anomalous"]);
    assert_eq!(v["score"], plain["score"]);
    assert!(v.get("defects").is_none(), "{v}");
    let reason = v["defects_unchecked"].as_str().unwrap();
    assert!(reason.contains("no text layer"), "{reason}");
    let answer = v["answer"].as_str().unwrap();
    assert!(
        answer.ends_with(
            ". The typed defects could not be checked here; the verdict is the model's own."
        ),
        "{answer}"
    );
    assert!(!answer.contains("no text layer"), "{answer}");
}

/// `?max_far=` moves the threshold per request (no refit) and the response
/// states it with both estimates; bad or double targets are 400.
#[tokio::test]
async fn a_request_chooses_its_operating_point() {
    let app = app(state());
    let bytes = std::fs::read(&images_in("test/good")[0]).unwrap();
    let own = send(
        app.clone(),
        post_bytes("/v1/models/cells/score", bytes.clone()),
    )
    .await
    .json();
    check_result(&own);
    let point = &own["operating_point"];
    assert_eq!(point["threshold"], 0.5, "{own}");
    assert_eq!(point["normal_images"], 12, "{own}");
    assert!(point["synthetic_missed_alarm_rate"].is_number(), "{own}");
    let loose = send(
        app.clone(),
        post_bytes("/v1/models/cells/score?max_far=0.5", bytes.clone()),
    )
    .await
    .json();
    let point = &loose["operating_point"];
    assert_eq!(point["target"], json!({"max_far": 0.5}), "{loose}");
    let threshold = loose["threshold"].as_f64().unwrap();
    assert!(threshold < 0.5, "{loose}");
    assert_eq!(point["threshold"].as_f64().unwrap(), threshold);
    assert!(point["estimated_false_alarm_rate"].as_f64().unwrap() <= 0.5);
    assert_eq!(loose["score"], own["score"]);
    assert_eq!(
        loose["is_anomalous"].as_bool().unwrap(),
        loose["score"].as_f64().unwrap() >= threshold
    );
    for bad in ["max_far=abc", "max_far=1.5", "max_far=0.1&max_mar=0.1"] {
        let reply = send(
            app.clone(),
            post_bytes(&format!("/v1/models/cells/score?{bad}"), bytes.clone()),
        )
        .await;
        assert_eq!(reply.status, StatusCode::BAD_REQUEST, "{bad}");
        assert_eq!(
            reply.json()["error"]["code"],
            "invalid_operating_point",
            "{bad}"
        );
    }
}

#[tokio::test]
async fn a_zero_shot_prompt_too_long_for_clip_is_400_like_the_score_route() {
    let app = app(state().with_zero_shot(tiny_runtime()));
    let long = "crack ".repeat(683); // 4 098 bytes, far past CLIP's 77 tokens.
    let long = &long[..4096];
    let png = defect_png();
    let reply = send(
        app.clone(),
        multipart(
            "/v1/zero-shot",
            &[
                Part::File("image", &png),
                Part::Text("object", "solar cell"),
                Part::Text("prompt", long),
            ],
        ),
    )
    .await;
    assert_eq!(reply.status, StatusCode::BAD_REQUEST, "{}", reply.json());
    assert_eq!(reply.error_code(), "bad_prompt");
}

#[tokio::test]
async fn ask_refuses_more_defects_than_the_score_route_takes() {
    let app = app(state());
    // The reporter's 4 KB of comma-separated text: 842 phrases before.
    let text: String = (0..842).map(|i| format!("d{i},")).collect();
    let text = &text[..text.len().min(4096)];
    let png = good_png();
    let ask = |text: &str| {
        multipart(
            "/v1/ask",
            &[Part::File("image", &png), Part::Text("text", text)],
        )
    };
    let reply = send(app.clone(), ask(text)).await;
    assert_eq!(reply.status, StatusCode::BAD_REQUEST, "{}", reply.json());
    assert_eq!(reply.error_code(), "too_many_prompts");
    assert!(
        reply.json()["error"]["message"]
            .as_str()
            .unwrap()
            .contains("at most 32"),
        "{}",
        reply.json()
    );
    // 32 is still a question.
    let text: String = (0..32).map(|i| format!("defect{i},")).collect();
    let reply = send(app, ask(&text)).await;
    assert_eq!(reply.status, StatusCode::OK, "{}", reply.json());
    assert_eq!(reply.json()["defects_asked"].as_array().unwrap().len(), 32);
}

#[tokio::test]
async fn a_cross_site_form_post_writes_no_decision_and_foreign_hosts_are_refused() {
    use flawscope_results::store::Store;
    use flawscope_server::{ResultsStore, StoredModel};

    let tmp = tempfile::tempdir().unwrap();
    let db = tmp.path().join("results.sqlite");
    let entry = StoredModel {
        name: "models/cells.flawscope".into(),
        identity: "sha256:0123".into(),
    };
    let results = ResultsStore::new(
        Store::open(&db).unwrap(),
        [("cells".to_owned(), entry)].into_iter().collect(),
    );
    let app = app(state().with_results(results));
    let png = defect_png();
    let with = |mut request: Request<Body>, headers: &[(&'static str, &'static str)]| {
        for (k, v) in headers {
            request.headers_mut().insert(*k, v.parse().unwrap());
        }
        request
    };
    // The reporter's request: a form posted by a page on another site.
    for headers in [
        &[
            ("origin", "http://evil.example"),
            ("sec-fetch-site", "cross-site"),
            ("host", "127.0.0.1:8080"),
        ][..],
        &[
            ("origin", "http://evil.example"),
            ("host", "127.0.0.1:8080"),
        ],
        &[("sec-fetch-site", "same-site"), ("host", "127.0.0.1:8080")],
        &[("origin", "null"), ("host", "localhost:8080")],
        // DNS rebinding: the attacker's name resolved to this server.
        &[
            ("origin", "http://evil.example:8080"),
            ("host", "evil.example:8080"),
        ],
    ] {
        let reply = send(
            app.clone(),
            with(decision(&png, "cells", "d.png", "ng"), headers),
        )
        .await;
        assert_eq!(reply.status, StatusCode::FORBIDDEN, "{headers:?}");
        assert!(
            ["cross_site", "host_not_allowed"].contains(&reply.error_code().as_str()),
            "{headers:?}"
        );
    }
    assert!(
        Store::open_existing(&db)
            .unwrap()
            .all_results()
            .unwrap()
            .is_empty(),
        "a refused write reached the store"
    );
    // A rebound name cannot read either; health stays open to any host.
    let reply = send(
        app.clone(),
        with(get("/v1/models"), &[("host", "evil.example:8080")]),
    )
    .await;
    assert_eq!(reply.status, StatusCode::FORBIDDEN);
    assert_eq!(reply.error_code(), "host_not_allowed");
    let reply = send(
        app.clone(),
        with(get("/healthz"), &[("host", "evil.example:8080")]),
    )
    .await;
    assert_eq!(reply.status, StatusCode::OK);
    // The page's own write (same origin) and a program's (no Origin) pass.
    for headers in [
        &[
            ("origin", "http://127.0.0.1:8080"),
            ("sec-fetch-site", "same-origin"),
            ("host", "127.0.0.1:8080"),
        ][..],
        &[("host", "localhost:8080")],
    ] {
        let reply = send(
            app.clone(),
            with(decision(&png, "cells", "d.png", "ng"), headers),
        )
        .await;
        assert_eq!(
            reply.status,
            StatusCode::OK,
            "{headers:?}: {}",
            reply.json()
        );
    }
    // A configured name is served.
    let allowed = state_with(
        &["cells"],
        ServerConfig {
            allowed_hosts: vec!["inspect.factory.example".into()],
            ..config()
        },
    );
    let reply = send(
        app_of(allowed),
        with(
            get("/v1/models"),
            &[("host", "inspect.factory.example:8080")],
        ),
    )
    .await;
    assert_eq!(reply.status, StatusCode::OK);
}

fn app_of(state: AppState) -> Router {
    app(state)
}

/// The work a timed-out request started stops at its next check: a model
/// with a text layer asked about 32 defects gives up when told to, where
/// the reporter's 842-defect question held its slot 48 s past its 504.
#[tokio::test]
async fn inspection_stops_between_defects_when_its_request_is_gone() {
    use std::sync::atomic::{AtomicBool, Ordering};
    let runtime = tiny_runtime();
    let train: Vec<PathBuf> = images_in("train/good").into_iter().take(12).collect();
    let mut model = common::small_patchcore(12, 256, &runtime);
    model
        .add_prompt_layer(
            &runtime,
            "solar cell",
            &train,
            &flawscope_core::images::ImageLimits::default(),
            &flawscope_core::progress::NoProgress,
        )
        .unwrap();
    let image = flawscope_core::images::decode_image(
        &defect_png(),
        "d.png",
        &flawscope_core::images::ImageLimits::default(),
    )
    .unwrap();
    let point = model.operating_point(None).unwrap();
    let defects: Vec<String> = (0..32).map(|i| format!("defect number {i}")).collect();
    let stop = AtomicBool::new(false);
    let whole = model
        .inspect_until(&image, &point, &defects, &stop)
        .unwrap();
    assert_eq!(whole.defects.len(), 32);
    stop.store(true, Ordering::SeqCst);
    let stopped = model.inspect_until(&image, &point, &defects, &stop);
    assert!(
        matches!(stopped, Err(flawscope_core::Error::Cancelled)),
        "{stopped:?}"
    );
}
