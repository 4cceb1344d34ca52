//! WinCLIP zero-shot and few-shot scoring, end to end, on the tiny random
//! CLIP checkpoint of `models/tests/fixtures/tiny_clip` (real weights cannot be
//! downloaded in tests): shapes, ranges, heatmaps and model files, not
//! accuracy. The `shared_mtd_winclip_*` tests do the same on real MTD
//! images.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::Arc;
use std::time::{Duration, Instant};

use flawscope_core::Device;
use flawscope_core::detectors::DetectorConfig;
use flawscope_core::images::{ImageLimits, load_image};
use flawscope_core::model::Model;
use flawscope_core::runtime::Runtime;
use flawscope_core::winclip::engine::WinClip;
use flawscope_core::winclip::scoring::{harmonic_window_aggregation, zero_shot_grid};
use flawscope_models::clip::sliding_windows;
use flawscope_models::clip_weights::{VIT_B_16, WeightsLookup};

use crate::cli::{flawscope, root, stderr};
use crate::shared_data::shared_data;

fn tiny_clip() -> String {
    root()
        .join("models/tests/fixtures/tiny_clip")
        .display()
        .to_string()
}

fn demo(rel: &str) -> String {
    root()
        .join("demo/solar_cell")
        .join(rel)
        .display()
        .to_string()
}

/// The `score --json` lines.
fn json_lines(out: &Output) -> Vec<serde_json::Value> {
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

/// Every line is in range, and its heatmap is a PNG of the image's width
/// (the legend strip below it).
fn check_scored(lines: &[serde_json::Value], images: &[String]) {
    assert_eq!(lines.len(), images.len(), "{lines:?}");
    for (line, image) in lines.iter().zip(images) {
        assert_eq!(line["path"].as_str().unwrap(), image);
        let score = line["score"].as_f64().unwrap();
        assert!((0.0..=1.0).contains(&score), "{line}");
        assert_eq!(line["threshold"].as_f64().unwrap(), 0.5);
        assert_eq!(
            line["is_anomalous"].as_bool().unwrap(),
            score >= 0.5,
            "{line}"
        );
        let heatmap = Path::new(line["heatmap"].as_str().unwrap());
        let png = image::open(heatmap).unwrap();
        let original = image::open(image).unwrap();
        assert_eq!(png.width(), original.width());
        assert!(png.height() > original.height());
    }
}

/// A model's maps on `images`: the image's size, finite, in [0, 1].
fn check_maps(model: &Model, images: &[String]) {
    for path in images {
        let image = load_image(Path::new(path), &ImageLimits::default()).unwrap();
        let inspection = model.inspect(&image).unwrap();
        assert_eq!(
            (inspection.map.width, inspection.map.height),
            (image.width() as usize, image.height() as usize)
        );
        assert!(
            inspection
                .map
                .values
                .iter()
                .all(|v| v.is_finite() && (0.0..=1.0).contains(v))
        );
        assert!((0.0..=1.0).contains(&inspection.score));
        assert_eq!(inspection.threshold, 0.5);
    }
}

fn zero_shot_cli(images: &[String]) {
    let tmp = tempfile::tempdir().unwrap();
    let heatmaps = tmp.path().join("maps");
    let clip = tiny_clip();
    score_cli(
        &[
            "--zero-shot",
            "--object",
            "solar cell",
            "--prompt",
            "a crack",
            "--prompt",
            "a dark inactive area",
            "--clip-weights",
            &clip,
            "--device",
            "cpu",
        ],
        &heatmaps,
        images,
    );
}

/// `flawscope score OPTIONS --json --heatmaps DIR IMAGES…` succeeds and
/// scores every image.
fn score_cli(options: &[&str], heatmaps: &Path, images: &[String]) {
    let mut args = vec!["score"];
    args.extend_from_slice(options);
    args.extend(["--json", "--heatmaps", heatmaps.to_str().unwrap()]);
    args.extend(images.iter().map(String::as_str));
    let out = flawscope(&args);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    check_scored(&json_lines(&out), images);
}

fn few_shot_cli(train: &str, shots: &str, images: &[String]) {
    let tmp = tempfile::tempdir().unwrap();
    let model = tmp.path().join("few.flawscope");
    let model = model.to_str().unwrap();
    let clip = tiny_clip();
    let out = flawscope(&[
        "fit",
        "--detector",
        "winclip",
        "--shots",
        shots,
        "--train",
        train,
        "--object",
        "tile",
        "--prompt",
        "a crack",
        "--clip-weights",
        &clip,
        "--out",
        model,
    ]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));

    // The model file finds its CLIP folder again without --clip-weights.
    score_cli(&["--model", model], &tmp.path().join("maps"), images);

    // The library's one call for any model file.
    let lookup = WeightsLookup::from_vars(None, |_| None);
    let runtime = Runtime::with_clip(Device::Cpu, lookup, VIT_B_16);
    let loaded = Model::load(Path::new(model), &runtime).unwrap();
    assert_eq!(loaded.detector_name(), "winclip");
    let DetectorConfig::WinClip(config) = &loaded.info().detector else {
        panic!("a winclip file loaded as another detector");
    };
    assert_eq!(config.shots, shots.parse::<usize>().unwrap());
    assert_eq!(config.shot_images.len(), config.shots);
    assert_eq!(config.object, "tile");
    assert_eq!(config.prompts, vec!["a crack".to_string()]);
    assert_eq!(loaded.summary().object.as_deref(), Some("tile"));
    check_maps(&loaded, images);
}

#[test]
fn winclip_zero_shot_scores_demo_images() {
    let images = vec![
        demo("test/defect/cell0001.png"),
        demo("test/good/cell0060.png"),
    ];
    zero_shot_cli(&images);

    // The same through the library: a zero-shot model, made from text.
    let engine =
        WinClip::from_dir(Path::new(&tiny_clip()), "tiny", None, "flag", &Device::Cpu).unwrap();
    let lookup = WeightsLookup::from_vars(None, |_| None);
    let runtime = Runtime::with_clip(Device::Cpu, lookup, VIT_B_16).with_engine(Arc::new(engine));
    let image = load_image(Path::new(&images[0]), &ImageLimits::default()).unwrap();
    let prompts = vec!["a crack".to_string()];
    let zero_shot = |object: &str| {
        Model::zero_shot(&runtime, object, &prompts)
            .unwrap()
            .inspect(&image)
            .unwrap()
    };
    let first = zero_shot("solar cell");
    assert_eq!((first.map.width, first.map.height), (300, 300));
    assert!(first.map.values.iter().all(|v| v.is_finite()));
    let again = zero_shot("solar_cell");
    assert_eq!(first.raw_score, again.raw_score);
}

#[test]
fn winclip_few_shot_fits_and_scores_demo_images() {
    let images = vec![
        demo("test/defect/cell0002.png"),
        demo("test/good/cell0397.png"),
    ];
    few_shot_cli(&demo("train/good"), "2", &images);
}

#[test]
fn winclip_eval_runs_zero_and_few_shot() {
    for shots in ["0", "2"] {
        let out = flawscope(&[
            "eval",
            "--dataset",
            &root().join("demo/solar_cell").display().to_string(),
            "--detector",
            "winclip",
            "--shots",
            shots,
            "--clip-weights",
            &tiny_clip(),
            "--json",
        ]);
        assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
        let report = &json_lines(&out)[0];
        assert_eq!(report["test_images"], 16);
        assert_eq!(report["train_images"], shots.parse::<u64>().unwrap());
        let auroc = report["image_auroc"].as_f64().unwrap();
        assert!((0.0..=1.0).contains(&auroc), "{report}");
    }
}

/// `score --zero-shot` with no weights anywhere and no network.
#[test]
fn winclip_without_weights_exits_2_with_one_line() {
    let hub = tempfile::tempdir().unwrap();
    let started = Instant::now();
    let out = Command::new(env!("CARGO_BIN_EXE_flawscope"))
        .args([
            "score",
            "--zero-shot",
            "--object",
            "metal nut",
            &demo("test/good/cell0060.png"),
        ])
        .env_remove("FLAWSCOPE_CLIP_WEIGHTS")
        .env("HF_HUB_OFFLINE", "1")
        .env("HF_HOME", hub.path())
        .env("HF_HUB_CACHE", hub.path())
        .output()
        .unwrap();
    assert!(
        started.elapsed() < Duration::from_secs(60),
        "took {:?}",
        started.elapsed()
    );
    let err = stderr(&out);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert_eq!(err.lines().count(), 1, "{err}");
    assert!(err.contains("--clip-weights DIR"), "{err}");
    assert!(err.contains("FLAWSCOPE_CLIP_WEIGHTS"), "{err}");
    assert!(out.stdout.is_empty());
}

#[test]
fn winclip_usage_errors_exit_2() {
    let image = demo("test/good/cell0060.png");
    // No object.
    let out = flawscope(&[
        "score",
        "--zero-shot",
        "--clip-weights",
        &tiny_clip(),
        &image,
    ]);
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
    assert!(stderr(&out).contains("--object"));
    // Neither a model nor --zero-shot.
    let out = flawscope(&["score", &image]);
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
    // Few-shot without --shots.
    let tmp = tempfile::tempdir().unwrap();
    let model = tmp.path().join("m.flawscope");
    let out = flawscope(&[
        "fit",
        "--detector",
        "winclip",
        "--train",
        &demo("train/good"),
        "--object",
        "cell",
        "--clip-weights",
        &tiny_clip(),
        "--out",
        model.to_str().unwrap(),
    ]);
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
    assert!(stderr(&out).contains("--shots"));
    // CUDA asked for on a build without it.
    if !flawscope_models::candle_core::utils::cuda_is_available() {
        let out = flawscope(&[
            "score",
            "--zero-shot",
            "--object",
            "cell",
            "--device",
            "cuda",
            "--clip-weights",
            &tiny_clip(),
            &image,
        ]);
        assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
        assert!(stderr(&out).contains("without CUDA"), "{}", stderr(&out));
    }
}

#[test]
fn winclip_harmonic_aggregation_on_hand_made_windows() {
    // 3x3 grid, the four 2x2 windows; the centre patch sees all four.
    let windows = sliding_windows(3, 3, 2, 1);
    let scores = [0.5, 0.25, 1.0, 0.5];
    let patches = harmonic_window_aggregation(&scores, &windows, 9).unwrap();
    let want_centre = 4.0 / (2.0 + 4.0 + 1.0 + 2.0);
    assert!((patches[4] - want_centre).abs() < 1e-12);
    assert!((patches[0] - 0.5).abs() < 1e-12);
    assert!((patches[2] - 0.25).abs() < 1e-12);
    // Top middle: windows 0 and 1.
    assert!((patches[1] - 2.0 / (2.0 + 4.0)).abs() < 1e-12);
    // With the image score and a second scale, all by harmonic mean.
    let combined = zero_shot_grid(0.5, &[patches.clone(), vec![1.0; 9]]).unwrap();
    let expected = 3.0 / (2.0 + 1.0 / want_centre + 1.0);
    assert!((combined[4] - expected).abs() < 1e-12);
}

/// A few MTD images (the first of each test folder), as strings.
fn mtd_images() -> Vec<String> {
    let tile = shared_data().join("mtd/magnetic_tile/test");
    ["good", "crack", "blowhole"]
        .iter()
        .map(|folder| {
            let mut files: Vec<PathBuf> = std::fs::read_dir(tile.join(folder))
                .unwrap()
                .map(|e| e.unwrap().path())
                .collect();
            files.sort();
            files[0].display().to_string()
        })
        .collect()
}

#[test]
#[ignore = "needs ../shared/data; run by .ci/run"]
fn shared_mtd_winclip_zero_shot() {
    let images = mtd_images();
    zero_shot_cli(&images);
}

#[test]
#[ignore = "needs ../shared/data; run by .ci/run"]
fn shared_mtd_winclip_few_shot() {
    let train = shared_data().join("mtd/magnetic_tile/train/good");
    few_shot_cli(&train.display().to_string(), "2", &mtd_images());
}

#[test]
fn winclip_engine_is_shareable() {
    fn send_sync<T: Send + Sync>() {}
    send_sync::<Arc<WinClip>>();
    send_sync::<Model>();
}

/// The text side is kept on disk: a second run reads the entry the first
/// one wrote and encodes nothing (the entry file is not rewritten).
#[test]
fn winclip_text_side_is_cached_on_disk_across_runs() {
    use std::os::unix::fs::MetadataExt;
    let cache = tempfile::tempdir().unwrap();
    let image = demo("test/good/cell0060.png");
    let clip = tiny_clip();
    let run = || {
        let out = crate::cli::flawscope_command()
            .env("FLAWSCOPE_CACHE_DIR", cache.path())
            .args([
                "score",
                "--zero-shot",
                "--object",
                "solar cell",
                "--prompt",
                "a crack",
                "--clip-weights",
                &clip,
                "--json",
                &image,
            ])
            .output()
            .unwrap();
        assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
        json_lines(&out)
    };
    let entries = || -> Vec<(PathBuf, u64, i64)> {
        let dir = cache.path().join("text-embeddings");
        let mut found: Vec<_> = std::fs::read_dir(dir)
            .unwrap()
            .map(|e| {
                let e = e.unwrap();
                let m = e.metadata().unwrap();
                (e.path(), m.ino(), m.mtime_nsec())
            })
            .collect();
        found.sort();
        found
    };
    let first = run();
    let written = entries();
    assert_eq!(written.len(), 1, "one entry for one object and prompt set");
    let second = run();
    assert_eq!(
        entries(),
        written,
        "the second run rewrote or added entries"
    );
    assert_eq!(first[0]["score"], second[0]["score"]);
}

/// Text options that cannot be used are refused, with the reason.
#[test]
fn winclip_bad_text_options_exit_2() {
    let clip = tiny_clip();
    let image = demo("test/good/cell0060.png");
    let long = "a very long and winding description of a scratch ".repeat(8);
    for (prompt, expected) in [
        ("  ", "defect description is empty"),
        (long.as_str(), "tokens long; CLIP reads at most 77"),
    ] {
        let out = flawscope(&[
            "score",
            "--zero-shot",
            "--object",
            "solar cell",
            "--prompt",
            prompt,
            "--clip-weights",
            &clip,
            &image,
        ]);
        assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
        assert!(stderr(&out).contains(expected), "{}", stderr(&out));
    }

    // --object with a model file would be ignored: refused instead.
    let tmp = tempfile::tempdir().unwrap();
    let model = tmp.path().join("m.flawscope");
    let out = flawscope(&[
        "fit",
        "--train",
        &demo("train/good"),
        "--out",
        model.to_str().unwrap(),
    ]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    let out = flawscope(&[
        "score",
        "--model",
        model.to_str().unwrap(),
        "--object",
        "solar cell",
        &image,
    ]);
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
    assert!(
        stderr(&out).contains("applies to --zero-shot"),
        "{}",
        stderr(&out)
    );

    // --prompt with a model that has no text layer: the classical verdict,
    // and the reason the defect was not checked.
    let out = flawscope(&[
        "score",
        "--model",
        model.to_str().unwrap(),
        "--prompt",
        "a crack",
        "--json",
        &image,
    ]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    let line = &json_lines(&out)[0];
    assert!(line.get("defects").is_none(), "{line}");
    let why = line["defects_unchecked"].as_str().unwrap();
    assert!(why.contains("no text layer"), "{line}");
    assert_eq!(line["is_anomalous"], line["model_is_anomalous"]);
}

/// A classical model with a text layer: each typed defect gets its own
/// score, threshold and false-alarm estimate from the normal images; without the CLIP weights the model still scores and says why the
/// defects were not checked.
#[test]
fn text_layer_checks_each_typed_defect_with_a_calibrated_threshold() {
    let tmp = tempfile::tempdir().unwrap();
    // The weights in a folder of their own, to take them away later.
    let clip = tmp.path().join("clip");
    std::fs::create_dir(&clip).unwrap();
    for name in ["config.json", "tokenizer.json", "model.safetensors"] {
        std::fs::copy(Path::new(&tiny_clip()).join(name), clip.join(name)).unwrap();
    }
    let model = tmp.path().join("cells.flawscope");
    let out = flawscope(&[
        "fit",
        "--train",
        &demo("train/good"),
        "--object",
        "solar cell",
        "--clip-weights",
        clip.to_str().unwrap(),
        "--out",
        model.to_str().unwrap(),
    ]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    assert!(stderr(&out).contains("text layer"), "{}", stderr(&out));

    let images = [
        demo("test/defect/cell0001.png"),
        demo("test/good/cell0060.png"),
    ];
    // No CLIP weights but the folder given at fit time (and no hub).
    let offline = |args: &[&str]| {
        crate::cli::flawscope_command()
            .args(args)
            .env_remove("FLAWSCOPE_CLIP_WEIGHTS")
            .env("HF_HUB_OFFLINE", "1")
            .env("HF_HOME", tmp.path())
            .env("HF_HUB_CACHE", tmp.path())
            .output()
            .unwrap()
    };
    let score = |extra: &[&str]| {
        let mut args = vec!["score", "--model", model.to_str().unwrap(), "--json"];
        args.extend_from_slice(extra);
        args.extend(images.iter().map(String::as_str));
        let out = offline(&args);
        assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
        json_lines(&out)
    };
    // `--defect` and its older spelling `--prompt` (with a model file).
    let asked = ["--defect", "a crack", "--prompt", "a dark inactive area"];
    let lines = score(&asked);
    assert_eq!(lines.len(), 2);
    for line in &lines {
        let defects = line["defects"].as_array().unwrap();
        assert_eq!(defects.len(), 2, "{line}");
        assert_eq!(defects[0]["description"], "a crack");
        assert_eq!(defects[1]["description"], "a dark inactive area");
        for d in defects {
            // The text layer embeds all 100 normal images (up to 300).
            assert_eq!(d["normal_images"], 100, "{d}");
            let far = d["estimated_false_alarm_rate"].as_f64().unwrap();
            let bound = d["false_alarm_upper_bound_95"].as_f64().unwrap();
            assert!(
                (0.0..=1.0).contains(&far) && far <= bound && bound <= 1.0,
                "{d}"
            );
            let score = d["score"].as_f64().unwrap();
            assert_eq!(d["is_anomalous"], score >= 0.5, "{d}");
            let threshold = d["raw_threshold"].as_f64().unwrap();
            let probability = d["probability"].as_f64().unwrap();
            assert_eq!(probability >= threshold, score >= 0.5, "{d}");
        }
        // The overall verdict: any layer over its threshold, named.
        let flagged: Vec<&str> = line["flagged_by"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_str().unwrap())
            .collect();
        assert_eq!(line["is_anomalous"], !flagged.is_empty(), "{line}");
        assert_eq!(
            line["model_is_anomalous"],
            flagged.first() == Some(&"model"),
            "{line}"
        );
    }
    // Into a results store: the same checks are recorded, a rerun scores
    // nothing again, and the rows stay apart from the model's plain rows.
    let db = tmp.path().join("results.sqlite");
    let db_arg = ["--db", db.to_str().unwrap()];
    let stored = score(&[&asked[..], &db_arg[..]].concat());
    assert_eq!(stored.len(), 2);
    for (line, direct) in stored.iter().zip(&lines) {
        assert_eq!(line["is_anomalous"], direct["is_anomalous"], "{line}");
        assert_eq!(line["flagged_by"], direct["flagged_by"], "{line}");
        // One answer per image: the store keeps core's answer, so a stored
        // line is the fresh one (typed defects, operating point, regions).
        assert_eq!(line["defects"], direct["defects"], "{line}");
        assert_eq!(line["operating_point"], direct["operating_point"], "{line}");
        assert_eq!(line["regions"], direct["regions"], "{line}");
        assert_eq!(line["raw_score"], direct["raw_score"], "{line}");
    }
    assert_eq!(score(&[&asked[..], &db_arg[..]].concat()), stored);
    let plain = score(&db_arg);
    assert!(
        plain.iter().all(|l| l.get("defects").is_none()),
        "{plain:?}"
    );
    let store = flawscope_results::store::Store::open_existing(&db).unwrap();
    let rows = store.all_results().unwrap();
    assert_eq!(rows.len(), 4, "{rows:?}");
    assert_eq!(rows.iter().filter(|r| !r.defects.is_empty()).count(), 2);
    drop(store);

    // Without the CLIP weights: still scored, classical verdict, and why.
    std::fs::remove_dir_all(&clip).unwrap();
    let lines = score(&asked);
    for line in &lines {
        assert!(line.get("defects").is_none(), "{line}");
        let why = line["defects_unchecked"].as_str().unwrap();
        assert!(why.contains("could not be checked"), "{line}");
        assert_eq!(line["is_anomalous"], line["model_is_anomalous"]);
    }
    // A store never records a check that did not happen: refused up front.
    let mut args = vec!["score", "--model", model.to_str().unwrap(), "--db"];
    args.push(db.to_str().unwrap());
    args.extend(asked);
    args.push(&images[0]);
    let out = offline(&args);
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
    assert!(
        stderr(&out).contains("--prompt: the model's text layer cannot check"),
        "{}",
        stderr(&out)
    );
}
