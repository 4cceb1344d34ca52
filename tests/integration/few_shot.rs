//! `fit --shots K` and `eval --shots K` end to end on the demo cells: the
//! first K normal images by path, the rotated and flipped views for the
//! memory bank, a threshold that says K images cannot confirm it, and a
//! clear error below a detector's minimum.

use std::path::PathBuf;

use crate::cli::flawscope;
use crate::pipeline::demo_dir;

fn train() -> PathBuf {
    demo_dir().join("train/good")
}

#[test]
fn patchcore_fits_on_one_shot_with_its_views_and_says_the_limit_is_unconfirmed() {
    let tmp = tempfile::tempdir().unwrap();
    let model = tmp.path().join("one.fsm");
    let out = flawscope(&[
        "fit",
        "--train",
        train().to_str().unwrap(),
        "--out",
        model.to_str().unwrap(),
        "--shots",
        "1",
    ]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(0), "{stderr}");
    assert!(stderr.contains("on 1 images"), "{stderr}");
    assert!(
        stderr.contains("the first 1 normal images by path, 8 rotated/flipped views"),
        "{stderr}"
    );
    assert!(
        stderr.contains("1 normal images cannot confirm a false-alarm limit of 0.01"),
        "{stderr}"
    );
    // The answer for an image says so too, for the one image, not its views.
    let image = demo_dir().join("test/defect/cell0001.png");
    let out = flawscope(&[
        "score",
        "--model",
        model.to_str().unwrap(),
        image.to_str().unwrap(),
        "--json",
    ]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(matches!(out.status.code(), Some(0 | 1)), "{stdout}");
    let answer: serde_json::Value = serde_json::from_str(stdout.lines().next().unwrap()).unwrap();
    let point = &answer["operating_point"];
    assert_eq!(point["normal_images"], 1, "{point}");
    let warning = point["warning"].as_str().unwrap();
    assert!(
        warning.starts_with("few-shot: the threshold rests on 8 views of 1 normal images"),
        "{warning}"
    );
    assert!(
        warning.contains("views were left out instead of images"),
        "{warning}"
    );
}

#[test]
fn eval_with_shots_fits_on_the_first_k_and_trained_detectors_state_their_minimum() {
    let out = flawscope(&[
        "eval",
        "--dataset",
        demo_dir().to_str().unwrap(),
        "--detector",
        "padim",
        "--shots",
        "2",
        "--json",
    ]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(0), "{stderr}");
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(report["train_images"], 2);
    assert!(report["image_auroc"].as_f64().unwrap() > 0.5, "{report}");

    let out = flawscope(&[
        "eval",
        "--dataset",
        demo_dir().to_str().unwrap(),
        "--detector",
        "flow",
        "--shots",
        "1",
    ]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(
        stderr.contains("fits on 2 to 1024 shots, got 1"),
        "{stderr}"
    );

    let out = flawscope(&[
        "eval",
        "--dataset",
        demo_dir().to_str().unwrap(),
        "--detector",
        "musc",
        "--shots",
        "4",
    ]);
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("k = 0"));
}
