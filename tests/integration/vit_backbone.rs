//! `--backbone dinov2|clip` end to end on tiny random checkpoints (the
//! models crate's golden fixtures): fit and score work on generated images,
//! the model refuses other weights, and without weights the command stops
//! with exit code 2 and says how to get them (nothing is downloaded).

use std::path::{Path, PathBuf};
use std::process::Output;

use crate::cli::{flawscope_command, root, stderr, tiny_tile_dataset};

fn fixture(name: &str) -> PathBuf {
    root().join("models/tests/fixtures").join(name)
}

/// A copy of a checkpoint folder's config.json and model.safetensors in `dir`.
fn copy_checkpoint(name: &str, dir: &Path) {
    std::fs::create_dir_all(dir).unwrap();
    for file in ["config.json", "model.safetensors"] {
        std::fs::copy(fixture(name).join(file), dir.join(file)).unwrap();
    }
}

/// `flawscope ARGS` with an empty, offline Hugging Face cache in `home`.
fn run(home: &Path, args: &[&str]) -> Output {
    flawscope_command()
        .env("HOME", home)
        .env("HF_HUB_CACHE", home.join("hub"))
        .env("HF_HUB_OFFLINE", "1")
        .env_remove("HF_HOME")
        .env_remove("XDG_CACHE_HOME")
        .env_remove("FLAWSCOPE_CLIP_WEIGHTS")
        .args(args)
        .output()
        .unwrap()
}

fn json(out: &Output) -> serde_json::Value {
    assert_eq!(out.status.code(), Some(0), "{}", stderr(out));
    serde_json::from_slice(&out.stdout).unwrap()
}

#[test]
fn dinov2_fits_scores_and_refuses_other_weights() {
    let tmp = tempfile::tempdir().unwrap();
    let cat = tmp.path().join("part");
    tiny_tile_dataset(&cat);
    let weights = tmp.path().join("dinov2");
    copy_checkpoint("tiny_dinov2", &weights);
    let train = cat.join("train/good");
    let spot = cat.join("test/spot/0.png");
    let good = cat.join("test/good/0.png");
    for detector in ["patchcore", "padim"] {
        let model = tmp.path().join(format!("{detector}.flawscope"));
        let out = run(
            tmp.path(),
            &[
                "fit",
                "--train",
                train.to_str().unwrap(),
                "--out",
                model.to_str().unwrap(),
                "--detector",
                detector,
                "--backbone",
                "dinov2",
                "--backbone-weights",
                weights.to_str().unwrap(),
                "--size",
                "64",
                "--coarse-size",
                "0",
                "--padim-channels",
                "32",
                "--no-tile",
            ],
        );
        assert_eq!(out.status.code(), Some(0), "{detector}: {}", stderr(&out));
        assert!(stderr(&out).contains("(dinov2)"), "{}", stderr(&out));
        let score = |image: &Path| {
            json(&run(
                tmp.path(),
                &[
                    "score",
                    "--model",
                    model.to_str().unwrap(),
                    "--json",
                    image.to_str().unwrap(),
                ],
            ))
        };
        let answer = score(&spot);
        let text = answer.to_string();
        assert!(text.contains("score"), "{text}");
        let _ = score(&good);
    }

    // Other weights in the same place: every byte counts.
    let file = weights.join("model.safetensors");
    let mut bytes = std::fs::read(&file).unwrap();
    let last = bytes.len() - 1;
    bytes[last] ^= 1;
    std::fs::write(&file, &bytes).unwrap();
    let model = tmp.path().join("patchcore.flawscope");
    let out = run(
        tmp.path(),
        &[
            "score",
            "--model",
            model.to_str().unwrap(),
            spot.to_str().unwrap(),
        ],
    );
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
    let err = stderr(&out);
    assert!(
        err.contains("SHA-256") && err.contains("fit again"),
        "{err}"
    );
}

#[test]
fn without_weights_the_transformers_stop_with_advice() {
    let tmp = tempfile::tempdir().unwrap();
    let cat = tmp.path().join("part");
    tiny_tile_dataset(&cat);
    let train = cat.join("train/good");
    let model = tmp.path().join("m.flawscope");
    let fit = |extra: &[&str]| {
        let mut args = vec![
            "fit",
            "--train",
            train.to_str().unwrap(),
            "--out",
            model.to_str().unwrap(),
        ];
        args.extend_from_slice(extra);
        run(tmp.path(), &args)
    };
    for (backbone, repo) in [
        ("dinov2", "facebook/dinov2-small"),
        ("clip", "openai/clip-vit-base-patch16"),
    ] {
        let out = fit(&["--backbone", backbone]);
        assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
        let err = stderr(&out);
        assert!(err.contains("--backbone-weights DIR"), "{err}");
        assert!(
            err.contains(&format!("huggingface-cli download {repo}")),
            "{err}"
        );
        assert!(err.contains("nothing is downloaded"), "{err}");
    }
    let missing = tmp.path().join("no-such-folder");
    let out = fit(&[
        "--backbone",
        "dinov2",
        "--backbone-weights",
        missing.to_str().unwrap(),
    ]);
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
    assert!(stderr(&out).contains("no such folder"), "{}", stderr(&out));
    // CLIP weights given as DINOv2: the config says so.
    let out = fit(&[
        "--backbone",
        "dinov2",
        "--backbone-weights",
        fixture("tiny_clip").to_str().unwrap(),
    ]);
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
    assert!(stderr(&out).contains("\"clip\""), "{}", stderr(&out));
    // A layer the checkpoint does not have; --stages on a transformer.
    let weights = fixture("tiny_dinov2");
    let weights = weights.to_str().unwrap();
    let out = fit(&[
        "--backbone",
        "dinov2",
        "--backbone-weights",
        weights,
        "--layers",
        "4",
    ]);
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
    assert!(stderr(&out).contains("layers 1..=3"), "{}", stderr(&out));
    let out = fit(&[
        "--backbone",
        "dinov2",
        "--backbone-weights",
        weights,
        "--stages",
        "stage3",
    ]);
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
    assert!(stderr(&out).contains("--layers"), "{}", stderr(&out));
    assert!(!model.exists());
}

#[test]
fn weights_are_found_in_the_hub_cache_and_clip_works_too() {
    let tmp = tempfile::tempdir().unwrap();
    let cat = tmp.path().join("part");
    tiny_tile_dataset(&cat);
    let train = cat.join("train/good");
    // A hub cache laid out as huggingface_hub leaves it.
    let repo = tmp.path().join("hub/models--facebook--dinov2-small");
    copy_checkpoint("tiny_dinov2", &repo.join("snapshots/0123abcd"));
    std::fs::create_dir_all(repo.join("refs")).unwrap();
    std::fs::write(repo.join("refs/main"), "0123abcd").unwrap();
    let clip = tmp.path().join("clip");
    copy_checkpoint("tiny_clip", &clip);
    for extra in [
        vec!["--backbone", "dinov2", "--layers", "1,2,3"],
        vec![
            "--backbone",
            "clip",
            "--backbone-weights",
            clip.to_str().unwrap(),
        ],
    ] {
        let model = tmp.path().join(format!("{}.flawscope", extra[1]));
        let mut args = vec![
            "fit",
            "--train",
            train.to_str().unwrap(),
            "--out",
            model.to_str().unwrap(),
            "--size",
            "64",
            "--coarse-size",
            "0",
            "--no-tile",
        ];
        args.extend_from_slice(&extra);
        let out = run(tmp.path(), &args);
        assert_eq!(out.status.code(), Some(0), "{extra:?}: {}", stderr(&out));
        let image = cat.join("test/spot/1.png");
        let answer = json(&run(
            tmp.path(),
            &[
                "score",
                "--model",
                model.to_str().unwrap(),
                "--json",
                image.to_str().unwrap(),
            ],
        ));
        assert!(answer.to_string().contains("score"), "{answer}");
    }
}
