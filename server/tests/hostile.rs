//! Hostile images over HTTP: files cut short and absurd shapes are refused
//! with 400 before any model runs, on the own API and on OIP v2.
#![allow(clippy::unwrap_used)]

use std::io::Cursor;
use std::sync::Arc;

use axum::Router;
use axum::body::{Body, to_bytes};
use axum::http::{Request, StatusCode, header};
use base64::Engine as _;
use flawscope_core::Device;
use flawscope_core::runtime::Runtime;
use flawscope_server::{AppState, ServedModel, ServerConfig, app};
use image::ImageFormat;
use serde_json::{Value, json};
use tower::ServiceExt;

mod common;

/// A small PatchCore model on 8 good cells, served as `cells`.
fn router() -> Router {
    let model = common::small_patchcore(8, 128, &Runtime::new(Device::Cpu));
    let served = ServedModel {
        name: "cells".into(),
        model: Arc::new(model),
    };
    app(AppState::new(vec![served], ServerConfig::default().with_slots(2)).unwrap())
}

async fn post(app: &Router, uri: &str, content_type: &str, body: Vec<u8>) -> (StatusCode, Value) {
    let request = Request::post(uri)
        .header(header::CONTENT_TYPE, content_type)
        .header(header::CONTENT_LENGTH, body.len())
        .body(Body::from(body))
        .unwrap();
    let response = app.clone().oneshot(request).await.unwrap();
    let status = response.status();
    let code = response
        .headers()
        .get("flawscope-error-code")
        .map(|v| v.to_str().unwrap().to_owned());
    let body = to_bytes(response.into_body(), usize::MAX).await.unwrap();
    let mut v: Value = serde_json::from_slice(&body).unwrap();
    // `/v2` errors are KServe's `{"error": "<message>"}`, the code in a header.
    if let Some(message) = v["error"].as_str() {
        v = json!({"error": {"code": code.unwrap(), "message": message}});
    }
    (status, v)
}

fn infer_body(image: &[u8]) -> Vec<u8> {
    let data = base64::engine::general_purpose::STANDARD.encode(image);
    serde_json::to_vec(&json!({
        "inputs": [{"name": "image", "shape": [1], "datatype": "BYTES", "parameters": {"content_type": "base64"}, "data": [data]}]
    }))
    .unwrap()
}

fn encoded(image: &image::DynamicImage, format: ImageFormat) -> Vec<u8> {
    let mut out = Cursor::new(Vec::new());
    image.write_to(&mut out, format).unwrap();
    out.into_inner()
}

#[tokio::test]
async fn cut_and_line_images_are_400_on_every_scoring_route() {
    let app = router();
    let cell = image::open(&common::images_in("test/defect")[0]).unwrap();
    let jpeg = encoded(&cell, ImageFormat::Jpeg);
    let png = encoded(&cell, ImageFormat::Png);

    // The whole JPEG is scored (so the route works and refusals below are
    // the image's doing).
    let (status, v) = post(&app, "/v1/models/cells/score", "image/jpeg", jpeg.clone()).await;
    assert_eq!(status, StatusCode::OK, "{v}");
    let (status, v) = post(
        &app,
        "/v2/models/cells/infer",
        "application/json",
        infer_body(&jpeg),
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{v}");

    // The reporter's cuts: 30–90 % of a JPEG used to score 1.0 with 200.
    let line = image::GrayImage::from_pixel(40_000_000, 1, image::Luma([128]));
    let line = encoded(&image::DynamicImage::ImageLuma8(line), ImageFormat::Png);
    let mut cases: Vec<(Vec<u8>, &str)> = [30, 60, 90]
        .iter()
        .map(|pct| (jpeg[..jpeg.len() * pct / 100].to_vec(), "truncated_image"))
        .collect();
    cases.push((png[..png.len() - 2].to_vec(), "truncated_image"));
    // 40 000 000 × 1 used to abort the server process.
    cases.push((line, "unsupported_image_shape"));
    for (bytes, code) in cases {
        let (status, v) = post(&app, "/v1/models/cells/score", "image/jpeg", bytes.clone()).await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{v}");
        assert_eq!(v["error"]["code"], code, "{v}");
        let (status, v) = post(
            &app,
            "/v2/models/cells/infer",
            "application/json",
            infer_body(&bytes),
        )
        .await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{v}");
        assert_eq!(v["error"]["code"], code, "{v}");
    }
}
