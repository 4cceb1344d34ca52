//! Verdicts a user can act on: `eval` reports them at the model's own
//! threshold, and `score --max-far` moves the threshold without a refit.

use std::path::Path;

use crate::cli::{flawscope, tiny_tile_dataset};
use crate::pipeline::{demo_dir, json_lines};

#[test]
fn eval_reports_verdicts_at_the_threshold_for_every_calibrated_detector() {
    let tmp = tempfile::tempdir().unwrap();
    tiny_tile_dataset(&tmp.path().join("tile"));
    for detector in ["patchcore", "padim", "recon", "patchcore+padim", "auto"] {
        let out = flawscope(&[
            "eval",
            "--dataset",
            tmp.path().to_str().unwrap(),
            "--detector",
            detector,
            "--size",
            "64",
            "--json",
        ]);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(0), "{detector}: {stderr}");
        let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        if detector == "auto" {
            // One of the three candidates, with the evidence that chose it.
            let kept = report["detector"].as_str().unwrap();
            assert!(
                ["patchcore", "padim", "patchcore+padim"].contains(&kept),
                "{report}"
            );
            let candidates = report["detector_choice"]["candidates"].as_array().unwrap();
            assert_eq!(candidates.len(), 3, "{report}");
        } else {
            assert_eq!(report["detector"], detector);
        }
        let at = &report["at_threshold"];
        assert_eq!(at["good_images"], 3, "{detector}: {report}");
        assert_eq!(at["defective_images"], 3, "{detector}: {report}");
        assert_eq!(at["calibration_images"], 6, "{detector}: {report}");
        assert_eq!(at["max_far"], 0.01, "{detector}");
        let detected = at["detected"].as_u64().unwrap();
        assert_eq!(at["recall"].as_f64().unwrap(), detected as f64 / 3.0);
        assert_eq!(at["per_type"]["spot"]["detected"], detected);
        let far = at["false_alarms"].as_u64().unwrap() as f64 / 3.0;
        assert_eq!(at["false_alarm_rate"].as_f64().unwrap(), far);
        assert!(at["threshold"].is_number(), "{detector}");
        let best = at["best_recall_at_this_false_alarm_rate"].as_f64().unwrap();
        assert!(
            best >= at["recall"].as_f64().unwrap(),
            "{detector}: {report}"
        );
        let reference = report["recall_at_far"].as_object().unwrap();
        let keys: Vec<&str> = reference.keys().map(String::as_str).collect();
        assert_eq!(keys, ["0.01", "0.05"], "{detector}");
    }
}

/// Scores the demo's test cells as JSON lines, with `extra` arguments.
fn score(model: &Path, extra: &[&str]) -> (Vec<serde_json::Value>, String) {
    let test = demo_dir().join("test");
    let mut args = vec![
        "score",
        "--model",
        model.to_str().unwrap(),
        "--recursive",
        "--json",
        test.to_str().unwrap(),
    ];
    args.extend_from_slice(extra);
    let out = flawscope(&args);
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(matches!(out.status.code(), Some(0 | 1)), "{stderr}");
    (json_lines(&out.stdout), stderr)
}

#[test]
fn score_moves_the_operating_point_per_run_without_refitting() {
    let tmp = tempfile::tempdir().unwrap();
    let model = tmp.path().join("cells.flawscope");
    let out = crate::cli::fit(&demo_dir().join("train/good"), &model, &[]);
    let fit_log = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(0), "{fit_log}");
    assert!(
        fit_log.contains("on 100 normal images, 10-fold cross-fit"),
        "{fit_log}"
    );
    let before = std::fs::read(&model).unwrap();

    let (own, own_log) = score(&model, &[]);
    let (loose, loose_log) = score(&model, &["--max-far", "0.5"]);
    assert_eq!(
        std::fs::read(&model).unwrap(),
        before,
        "the model file changed"
    );
    assert!(
        own_log.contains("operating point: threshold 0.500"),
        "{own_log}"
    );
    assert!(
        loose_log.contains("operating point: threshold 0."),
        "{loose_log}"
    );
    assert!(loose_log.contains("false alarms"), "{loose_log}");
    assert_eq!(own.len(), 16);
    let mut changed = 0;
    for (a, b) in own.iter().zip(&loose) {
        assert_eq!(a["path"], b["path"]);
        assert_eq!(a["score"], b["score"]);
        let point = &b["operating_point"];
        assert_eq!(point["target"], serde_json::json!({"max_far": 0.5}));
        let threshold = b["threshold"].as_f64().unwrap();
        assert!(threshold < 0.5, "{b}");
        let far = point["estimated_false_alarm_rate"].as_f64().unwrap();
        assert!((0.4..=0.5).contains(&far), "{b}");
        assert!(
            point["synthetic_missed_alarm_rate"].as_f64().unwrap()
                <= a["operating_point"]["synthetic_missed_alarm_rate"]
                    .as_f64()
                    .unwrap()
        );
        // A lower threshold keeps every flag and may add some.
        if a["is_anomalous"] == true {
            assert_eq!(b["is_anomalous"], true, "{b}");
        } else if b["is_anomalous"] == true {
            changed += 1;
        }
    }
    assert!(changed > 0, "no verdict moved at --max-far 0.5");
    let bad = flawscope(&[
        "score",
        "--model",
        model.to_str().unwrap(),
        "--max-far",
        "0.1",
        "--max-mar",
        "0.1",
        demo_dir().join("test").to_str().unwrap(),
    ]);
    assert_eq!(bad.status.code(), Some(2));
}

/// `refit` learns from decisions: good images marked OK that the model
/// flagged stop being flagged, other good images are not flagged more, and
/// NG marks give a labelled missed-alarm rate with its bound.
#[test]
fn refit_learns_from_ok_and_ng_marks() {
    use flawscope_results::store::{Decision, Store, file_hash};
    let tmp = tempfile::tempdir().unwrap();
    let model = tmp.path().join("cells.flawscope");
    let out = crate::cli::fit(&demo_dir().join("train/good"), &model, &[]);
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let db = tmp.path().join("results.sqlite");
    let (scored, _) = score(&model, &["--db", db.to_str().unwrap()]);
    let is_good = |line: &serde_json::Value| line["path"].as_str().unwrap().contains("/good/");
    let false_alarms: Vec<&serde_json::Value> = scored
        .iter()
        .filter(|l| is_good(l) && l["is_anomalous"] == true)
        .collect();
    assert!(
        !false_alarms.is_empty(),
        "the test needs a false alarm to mark"
    );
    let other_good_flagged = |lines: &[serde_json::Value], marked: &[String]| {
        lines
            .iter()
            .filter(|l| is_good(l) && l["is_anomalous"] == true)
            .filter(|l| !marked.contains(&l["path"].as_str().unwrap().to_owned()))
            .count()
    };
    let marked: Vec<String> = false_alarms
        .iter()
        .map(|l| l["path"].as_str().unwrap().to_owned())
        .collect();
    {
        let store = Store::open_existing(&db).unwrap();
        for path in &marked {
            let path = Path::new(path);
            store
                .set_decision(path, &file_hash(path).unwrap(), Decision::Ok)
                .unwrap();
        }
        for line in scored.iter().filter(|l| !is_good(l)) {
            let path = Path::new(line["path"].as_str().unwrap());
            store
                .set_decision(path, &file_hash(path).unwrap(), Decision::Ng)
                .unwrap();
        }
    }
    let refitted = tmp.path().join("cells-2.flawscope");
    let out = flawscope(&[
        "refit",
        "--model",
        model.to_str().unwrap(),
        "--db",
        db.to_str().unwrap(),
        "--out",
        refitted.to_str().unwrap(),
    ]);
    let log = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(0), "{log}");
    assert!(
        log.contains(&format!(
            "{} of {} images marked OK",
            marked.len(),
            marked.len()
        )),
        "{log}"
    );
    assert!(
        log.contains("before: threshold") && log.contains("after:  threshold"),
        "{log}"
    );
    assert!(log.contains("missed marked defects"), "{log}");

    let (after, _) = score(&refitted, &[]);
    for line in &after {
        if marked.contains(&line["path"].as_str().unwrap().to_owned()) {
            assert_eq!(
                line["is_anomalous"], false,
                "still flagged after refit: {line}"
            );
        }
    }
    assert!(other_good_flagged(&after, &marked) <= other_good_flagged(&scored, &marked));
    let labelled = &after[0]["operating_point"]["labelled_missed_alarm_rate"];
    assert_eq!(labelled["images"], 8, "{labelled}");
    let (missed, bound) = (
        labelled["missed"].as_u64().unwrap(),
        labelled["upper_95"].as_f64().unwrap(),
    );
    assert!(bound > missed as f64 / 8.0 && bound <= 1.0, "{labelled}");
    // The model records what it was refitted from.
    let bytes = std::fs::read(&refitted).unwrap();
    let header = String::from_utf8_lossy(&bytes[..bytes.len().min(1 << 20)]);
    assert!(
        header.contains("refitted_from"),
        "no refit record in the file"
    );
}

#[test]
fn two_detectors_refuse_a_few_shots_before_fitting() {
    let train = demo_dir().join("train/good");
    for detector in ["patchcore+padim", "auto"] {
        let out = flawscope(&[
            "fit",
            "--train",
            train.to_str().unwrap(),
            "--detector",
            detector,
            "--shots",
            "2",
            "--out",
            "/nonexistent/never-written.flawscope",
        ]);
        assert_eq!(out.status.code(), Some(2), "{detector}");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(
            stderr.contains("fit two on all of them"),
            "{detector}: {stderr}"
        );
    }
}
