//! Mutual scoring (`--detector musc`) end to end: a batch of demo cells
//! scored against itself, with no model and no training image.

use std::path::{Path, PathBuf};

use crate::cli::flawscope;
use crate::pipeline::demo_dir;

/// A category whose `test/` holds 20 normal cells and 4 cracked ones, and
/// whose `train/good/` holds only files that are not images: reading any of
/// them would fail the run.
fn batch_category(root: &Path) -> PathBuf {
    let category = root.join("cells");
    let good = category.join("test/good");
    let defect = category.join("test/defect");
    let train = category.join("train/good");
    for dir in [&good, &defect, &train] {
        std::fs::create_dir_all(dir).unwrap();
    }
    let mut normal: Vec<PathBuf> = std::fs::read_dir(demo_dir().join("train/good"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    normal.sort();
    for path in normal.iter().take(20) {
        std::fs::copy(path, good.join(path.file_name().unwrap())).unwrap();
    }
    let mut cracked: Vec<PathBuf> = std::fs::read_dir(demo_dir().join("test/defect"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    cracked.sort();
    for path in cracked.iter().take(4) {
        std::fs::copy(path, defect.join(path.file_name().unwrap())).unwrap();
    }
    for i in 0..3 {
        std::fs::write(train.join(format!("{i}.png")), b"not a png").unwrap();
    }
    category
}

#[test]
fn eval_scores_the_test_set_as_one_batch_without_reading_train() {
    let tmp = tempfile::tempdir().unwrap();
    let category = batch_category(tmp.path());
    let out = flawscope(&[
        "eval",
        "--dataset",
        tmp.path().to_str().unwrap(),
        "--detector",
        "musc",
        "--json",
    ]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(0), "{stderr}");
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(report["detector"], "musc");
    assert_eq!(report["train_images"], 0);
    assert_eq!(report["test_images"], 24);
    let auroc = report["image_auroc"].as_f64().unwrap();
    assert!(auroc >= 0.9, "image AUROC {auroc}");
    // The same folder with a detector that fits reads train/ and fails.
    let out = flawscope(&[
        "eval",
        "--dataset",
        tmp.path().to_str().unwrap(),
        "--detector",
        "padim",
    ]);
    assert_ne!(out.status.code(), Some(0));
    assert!(category.join("train/good/0.png").exists());
}

#[test]
fn score_ranks_a_folder_and_says_the_verdict_is_uncalibrated() {
    let tmp = tempfile::tempdir().unwrap();
    let category = batch_category(tmp.path());
    let heatmaps = tmp.path().join("maps");
    let out = flawscope(&[
        "score",
        "--detector",
        "musc",
        "--recursive",
        category.join("test").to_str().unwrap(),
        "--heatmaps",
        heatmaps.to_str().unwrap(),
        "--json",
    ]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(matches!(out.status.code(), Some(0 | 1)), "{stderr}");
    assert!(
        stderr.contains("warning: uncalibrated: mutual scoring of a batch of 24 images"),
        "{stderr}"
    );
    let lines: Vec<serde_json::Value> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines.len(), 24);
    // The four cracked cells are the four highest scores.
    let mut ranked: Vec<(f64, bool)> = lines
        .iter()
        .map(|l| {
            (
                l["score"].as_f64().unwrap(),
                l["path"].as_str().unwrap().contains("defect"),
            )
        })
        .collect();
    ranked.sort_by(|a, b| b.0.total_cmp(&a.0));
    let top: Vec<bool> = ranked.iter().take(4).map(|r| r.1).collect();
    assert_eq!(top, [true; 4], "{ranked:?}");
    for line in &lines {
        assert!(
            line["operating_point"]["warning"]
                .as_str()
                .unwrap()
                .starts_with("uncalibrated")
        );
        assert!(Path::new(line["heatmap"].as_str().unwrap()).is_file());
    }
}

#[test]
fn a_batch_too_small_is_refused_with_the_minimum() {
    let tmp = tempfile::tempdir().unwrap();
    let category = batch_category(tmp.path());
    let out = flawscope(&[
        "score",
        "--detector",
        "musc",
        category.join("test/defect").to_str().unwrap(),
    ]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(stderr.contains("at least 8 readable images"), "{stderr}");
    // And musc fits nothing.
    let out = flawscope(&[
        "fit",
        "--detector",
        "musc",
        "--train",
        category.join("test/good").to_str().unwrap(),
        "--out",
        tmp.path().join("m.flawscope").to_str().unwrap(),
    ]);
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("fits nothing"));
    // Another backbone is refused, not silently ignored.
    let out = flawscope(&[
        "eval",
        "--dataset",
        tmp.path().to_str().unwrap(),
        "--detector",
        "musc",
        "--backbone",
        "dinov2",
    ]);
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("do not apply to it yet"));
}
