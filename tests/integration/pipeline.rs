//! Fit → save → load → score on the real ELPV sample committed in `demo/`.

use std::path::{Path, PathBuf};

use crate::cli::flawscope;

pub fn demo_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("demo/solar_cell")
}

fn fit(detector: &str, out: &Path) {
    let train = demo_dir().join("train/good");
    let result = flawscope(&[
        "fit",
        "--train",
        train.to_str().unwrap(),
        "--detector",
        detector,
        "--out",
        out.to_str().unwrap(),
    ]);
    assert_eq!(
        result.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&result.stderr)
    );
}

pub fn json_lines(stdout: &[u8]) -> Vec<serde_json::Value> {
    String::from_utf8_lossy(stdout)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l}")))
        .collect()
}

#[test]
fn fit_then_score_a_folder_with_one_corrupt_file() {
    let tmp = tempfile::tempdir().unwrap();
    let model = tmp.path().join("cells.flawscope");
    fit("patchcore", &model);

    // A folder with the 8 good and 8 defective test cells and one broken file.
    let batch = tmp.path().join("batch");
    std::fs::create_dir(&batch).unwrap();
    for (split, take) in [("test/good", 8), ("test/defect", 8)] {
        let mut files: Vec<_> = std::fs::read_dir(demo_dir().join(split))
            .unwrap()
            .map(|e| e.unwrap().path())
            .collect();
        files.sort();
        for f in files.into_iter().take(take) {
            let name = format!(
                "{}_{}",
                split.replace('/', "_"),
                f.file_name().unwrap().to_string_lossy()
            );
            std::fs::copy(&f, batch.join(name)).unwrap();
        }
    }
    let good = std::fs::read(
        demo_dir()
            .join("train/good")
            .read_dir()
            .unwrap()
            .next()
            .unwrap()
            .unwrap()
            .path(),
    )
    .unwrap();
    std::fs::write(batch.join("zz_broken.png"), &good[..good.len() / 3]).unwrap();

    let heatmaps = tmp.path().join("maps");
    let out = flawscope(&[
        "score",
        "--model",
        model.to_str().unwrap(),
        batch.to_str().unwrap(),
        "--heatmaps",
        heatmaps.to_str().unwrap(),
        "--json",
    ]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(3), "{stderr}");
    assert!(stderr.contains("zz_broken.png"), "{stderr}");
    let lines = json_lines(&out.stdout);
    assert_eq!(lines.len(), 16, "every readable image is scored");
    for line in &lines {
        let score = line["score"].as_f64().unwrap();
        assert!((0.0..=1.0).contains(&score));
        assert_eq!(line["threshold"], 0.5);
        assert_eq!(line["is_anomalous"].as_bool().unwrap(), score >= 0.5);
        let map = line["heatmap"].as_str().unwrap();
        let png = image::open(map).unwrap();
        assert!(png.width() > 0);
    }
    // Defective cells score above normal ones on average.
    let mean = |prefix: &str| {
        let s: Vec<f64> = lines
            .iter()
            .filter(|l| l["path"].as_str().unwrap().contains(prefix))
            .map(|l| l["score"].as_f64().unwrap())
            .collect();
        s.iter().sum::<f64>() / s.len() as f64
    };
    assert!(mean("test_defect") > mean("test_good"));

    // Scoring again with the saved model gives identical results.
    let again = flawscope(&[
        "score",
        "--model",
        model.to_str().unwrap(),
        batch.to_str().unwrap(),
        "--json",
    ]);
    let again = json_lines(&again.stdout);
    for (a, b) in lines.iter().zip(&again) {
        assert_eq!(a["score"], b["score"]);
    }
}

#[test]
fn padim_fits_and_scores_too() {
    let tmp = tempfile::tempdir().unwrap();
    let model = tmp.path().join("padim.flawscope");
    fit("padim", &model);
    let image = demo_dir()
        .join("test/defect")
        .read_dir()
        .unwrap()
        .next()
        .unwrap()
        .unwrap()
        .path();
    let out = flawscope(&[
        "score",
        "--model",
        model.to_str().unwrap(),
        image.to_str().unwrap(),
        "--json",
    ]);
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(json_lines(&out.stdout).len(), 1);
}

#[test]
fn supersimplenet_fits_scores_and_refuses_bad_settings() {
    let tmp = tempfile::tempdir().unwrap();
    let model = tmp.path().join("ssn.flawscope");
    let train = demo_dir().join("train/good");
    let fit_with = |extra: &[&str]| {
        let args = [&["--detector", "ssn"][..], extra].concat();
        crate::cli::fit(&train, &model, &args)
    };
    for bad in [
        &["--head-kernel", "2"][..],
        &["--noise-std", "0"],
        &["--noise-std", "nan"],
        &["--learning-rate", "-1"],
    ] {
        let out = fit_with(bad);
        assert_eq!(out.status.code(), Some(2), "{bad:?}");
        assert!(!model.exists());
    }
    let out = fit_with(&["--epochs", "2"]);
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let scored = flawscope(&[
        "score",
        "--model",
        model.to_str().unwrap(),
        demo_dir().join("test/defect").to_str().unwrap(),
        demo_dir().join("test/good").to_str().unwrap(),
        "--json",
    ]);
    assert_eq!(
        scored.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&scored.stderr)
    );
    let lines = json_lines(&scored.stdout);
    let images = ["test/defect", "test/good"]
        .iter()
        .map(|d| demo_dir().join(d).read_dir().unwrap().count())
        .sum::<usize>();
    assert_eq!(lines.len(), images);
    assert!(lines.iter().all(|l| l["score"].as_f64().is_some()));
}

#[test]
fn wrong_model_files_are_clear_errors() {
    let tmp = tempfile::tempdir().unwrap();
    let image = demo_dir()
        .join("test/good")
        .read_dir()
        .unwrap()
        .next()
        .unwrap()
        .unwrap()
        .path();
    let bogus = tmp.path().join("bogus.flawscope");
    std::fs::write(&bogus, b"not a model at all").unwrap();
    // A file that is no model fails (1); a missing one is missing setup
    // (2), as the README's table of exit codes says.
    for (model, code, said) in [
        (bogus.clone(), 1, "loading model"),
        (tmp.path().join("missing.flawscope"), 2, "not found"),
    ] {
        let out = flawscope(&[
            "score",
            "--model",
            model.to_str().unwrap(),
            image.to_str().unwrap(),
        ]);
        assert_eq!(out.status.code(), Some(code));
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(stderr.contains(said), "{stderr}");
        assert!(!stderr.contains("panicked"), "{stderr}");
    }
}

#[test]
fn demo_runs_offline_and_writes_heatmaps() {
    let tmp = tempfile::tempdir().unwrap();
    let out_dir = tmp.path().join("maps");
    let out = flawscope(&["demo", "--out", out_dir.to_str().unwrap()]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(
        out.status.code(),
        Some(0),
        "{stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout.contains("image AUROC"), "{stdout}");
    assert_eq!(std::fs::read_dir(&out_dir).unwrap().count(), 16);
}
