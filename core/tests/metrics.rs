//! `flawscope_core::metrics` against the scikit-learn / numpy references in
//! `core/tests/fixtures/metrics/` (written by `scripts/make_metric_fixtures.py`).
#![allow(clippy::unwrap_used)]

use std::collections::BTreeMap;
use std::path::PathBuf;

use flawscope_core::metrics::{MetricError, PixelMetrics, f1_max, image_auroc};
use serde::Deserialize;

#[derive(Deserialize)]
struct ImageCases {
    cases: Vec<ImageCase>,
}

#[derive(Deserialize)]
struct ImageCase {
    name: String,
    scores: Vec<f32>,
    labels: Vec<bool>,
    expected: ImageExpected,
}

#[derive(Deserialize)]
#[serde(untagged)]
enum ImageExpected {
    Values { auroc: f64, f1_max: F1Expected },
    Error { error: String },
}

#[derive(Deserialize)]
struct F1Expected {
    f1: f64,
}

#[derive(Deserialize)]
struct PixelCase {
    name: String,
    images: Vec<PixelImage>,
    expected: PixelExpected,
}

#[derive(Deserialize)]
struct PixelImage {
    width: usize,
    height: usize,
    scores: Vec<f32>,
    mask: Option<Vec<u8>>,
}

#[derive(Deserialize)]
#[serde(untagged)]
enum PixelExpected {
    Values {
        pixel_auroc: f64,
        /// FPR limit (as written by Python, e.g. "0.3") to AUPRO.
        aupro: BTreeMap<String, f64>,
    },
    Error {
        error: String,
    },
}

fn fixture(name: &str) -> String {
    let path: PathBuf = [
        env!("CARGO_MANIFEST_DIR"),
        "tests",
        "fixtures",
        "metrics",
        name,
    ]
    .iter()
    .collect();
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// F1 of "score >= threshold is anomalous", counted directly.
fn f1_at(scores: &[f32], labels: &[bool], threshold: f32) -> f64 {
    let (mut tp, mut fp, mut fn_) = (0.0, 0.0, 0.0);
    for (&s, &l) in scores.iter().zip(labels) {
        match (s >= threshold, l) {
            (true, true) => tp += 1.0,
            (true, false) => fp += 1.0,
            (false, true) => fn_ += 1.0,
            (false, false) => {}
        }
    }
    2.0 * tp / (2.0 * tp + fp + fn_)
}

#[test]
fn metrics_image_level_matches_sklearn() {
    let cases: ImageCases = serde_json::from_str(&fixture("image_cases.json")).unwrap();
    assert!(cases.cases.len() >= 5);
    for case in &cases.cases {
        let name = &case.name;
        match &case.expected {
            ImageExpected::Values { auroc, f1_max: f1 } => {
                let got = image_auroc(&case.scores, &case.labels).unwrap();
                assert!((got - auroc).abs() < 1e-6, "{name}: AUROC {got} vs {auroc}");
                let best = f1_max(&case.scores, &case.labels).unwrap();
                assert!(
                    (best.f1 - f1.f1).abs() < 1e-6,
                    "{name}: F1 {} vs {}",
                    best.f1,
                    f1.f1
                );
                // the threshold is a real score and reaches the reported F1
                assert!(case.scores.contains(&best.threshold), "{name}");
                let at = f1_at(&case.scores, &case.labels, best.threshold);
                assert!((at - best.f1).abs() < 1e-12, "{name}: {at} at threshold");
            }
            ImageExpected::Error { error } => {
                assert_eq!(error, "single_class");
                let err = image_auroc(&case.scores, &case.labels).unwrap_err();
                assert!(
                    matches!(err, MetricError::NoAnomalous | MetricError::NoNormal),
                    "{name}: {err}"
                );
                if case.labels.iter().all(|&l| l) {
                    // F1 needs only anomalous samples
                    assert!(f1_max(&case.scores, &case.labels).is_ok());
                } else {
                    assert_eq!(
                        f1_max(&case.scores, &case.labels),
                        Err(MetricError::NoAnomalous)
                    );
                }
            }
        }
    }
}

fn accumulate(case: &PixelCase) -> PixelMetrics {
    let mut metrics = PixelMetrics::new();
    for image in &case.images {
        let mask: Option<Vec<bool>> = image
            .mask
            .as_ref()
            .map(|m| m.iter().map(|&v| v != 0).collect());
        metrics
            .add_image(&image.scores, mask.as_deref(), image.width, image.height)
            .unwrap();
    }
    metrics
}

fn check_pixel_fixture(file: &str) {
    let case: PixelCase = serde_json::from_str(&fixture(file)).unwrap();
    let name = &case.name;
    let metrics = accumulate(&case);
    match &case.expected {
        PixelExpected::Values { pixel_auroc, aupro } => {
            let report = metrics.finish().unwrap();
            let err = (report.pixel_auroc - pixel_auroc).abs();
            assert!(
                err < 1e-3,
                "{name}: pixel AUROC {report:?} vs {pixel_auroc}"
            );
            // the stated bound holds and is well inside the tolerance
            assert!(
                err <= report.pixel_auroc_error_bound + 1e-9,
                "{name}: {report:?}"
            );
            assert!(report.pixel_auroc_error_bound < 1e-4, "{name}: {report:?}");
            assert!(!aupro.is_empty());
            for (limit, expected) in aupro {
                let limit: f64 = limit.parse().unwrap();
                let r = metrics.finish_with_limit(limit).unwrap();
                let err = (r.aupro - expected).abs();
                assert!(
                    err < 1e-3,
                    "{name} limit {limit}: AUPRO {r:?} vs {expected}"
                );
                assert!(
                    err <= r.aupro_error_bound + 1e-9,
                    "{name}: {r:?} vs {expected}"
                );
                assert!(r.aupro_error_bound < 1e-4, "{name}: {r:?}");
                assert_eq!(metrics.aupro_with_limit(limit).unwrap(), r.aupro);
            }
            let at_03 = aupro["0.3"];
            assert!((report.aupro - at_03).abs() < 1e-3, "{name}: default limit");
        }
        PixelExpected::Error { error } => {
            assert_eq!(error, "no_anomalous");
            assert_eq!(metrics.finish(), Err(MetricError::NoAnomalous));
        }
    }
}

#[test]
fn metrics_pixel_blobs_match_reference() {
    check_pixel_fixture("pixel_blobs.json");
}

#[test]
fn metrics_pixel_ties_match_reference() {
    check_pixel_fixture("pixel_ties.json");
}

#[test]
fn metrics_pixel_all_equal_matches_reference() {
    check_pixel_fixture("pixel_all_equal.json");
}

#[test]
fn metrics_pixel_without_anomalies_is_an_error() {
    check_pixel_fixture("pixel_no_anomalous.json");
}
