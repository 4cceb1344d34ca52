//! The `flawscope` command as a user runs it.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

/// The CLIP text cache of test runs: under target/, never the user's.
pub const TEST_CACHE_DIR: &str = concat!(env!("CARGO_TARGET_TMPDIR"), "/flawscope-cache");

/// The built `flawscope` binary, with the test text cache.
pub fn flawscope_command() -> Command {
    let mut command = Command::new(env!("CARGO_BIN_EXE_flawscope"));
    command.env("FLAWSCOPE_CACHE_DIR", TEST_CACHE_DIR);
    command
}

/// Runs the built `flawscope` binary with `args`.
pub fn flawscope(args: &[&str]) -> Output {
    flawscope_command()
        .args(args)
        .output()
        .expect("the flawscope binary runs")
}

/// `flawscope fit --train TRAIN --out MODEL EXTRA…`.
pub fn fit(train: &Path, model: &Path, extra: &[&str]) -> Output {
    let mut args = vec![
        "fit",
        "--train",
        train.to_str().unwrap(),
        "--out",
        model.to_str().unwrap(),
    ];
    args.extend_from_slice(extra);
    flawscope(&args)
}

/// The repository's root folder (demo images, embedded weights, fixtures).
pub fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// What a run wrote to standard error.
pub fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

#[test]
fn dataset_info_reads_a_small_mvtec_tree() {
    let tmp = tempfile::tempdir().unwrap();
    let cat = tmp.path().join("bolt");
    for rel in [
        "train/good/1.png",
        "train/good/2.png",
        "test/good/3.png",
        "test/crack/4.png",
    ] {
        let path = cat.join(rel);
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        image::GrayImage::new(4, 3).save(&path).unwrap();
    }
    std::fs::create_dir_all(cat.join("ground_truth/crack")).unwrap();
    image::GrayImage::new(4, 3)
        .save(cat.join("ground_truth/crack/4_mask.png"))
        .unwrap();

    let out = flawscope(&["dataset-info", tmp.path().to_str().unwrap(), "--json"]);
    assert_eq!(out.status.code(), Some(0));
    let info: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let bolt = &info["categories"][0];
    assert_eq!(bolt["category"], "bolt");
    assert_eq!(bolt["train_good"], 2);
    assert_eq!(bolt["test_good"], 1);
    assert_eq!(bolt["test_defects"]["crack"], 1);
    assert_eq!(bolt["masks"], 1);

    let table = flawscope(&["dataset-info", cat.to_str().unwrap()]);
    assert!(String::from_utf8_lossy(&table.stdout).contains("bolt"));
}

#[test]
fn dataset_info_on_an_empty_folder_fails_clearly() {
    let tmp = tempfile::tempdir().unwrap();
    let out = flawscope(&["dataset-info", tmp.path().to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("holds no dataset"), "{stderr}");
}

#[test]
fn every_subcommand_has_help() {
    let out = flawscope(&["--help"]);
    assert_eq!(out.status.code(), Some(0));
    let help = String::from_utf8_lossy(&out.stdout).to_string();
    let subcommands: Vec<&str> = help
        .lines()
        .skip_while(|l| !l.starts_with("Commands:"))
        .skip(1)
        .take_while(|l| l.starts_with("  "))
        .filter_map(|l| l.split_whitespace().next())
        .filter(|name| *name != "help")
        .collect();
    assert!(subcommands.contains(&"dataset-info"), "{help}");
    for sub in subcommands {
        let out = flawscope(&[sub, "--help"]);
        assert_eq!(out.status.code(), Some(0), "{sub} --help");
        assert!(
            String::from_utf8_lossy(&out.stdout).contains("Usage"),
            "{sub}"
        );
    }
}

/// An input side the backbone cannot take is refused when the arguments
/// are read (exit 2), not met by a panic inside the network.
#[test]
fn bench_refuses_input_sides_out_of_range() {
    for args in [
        &["bench", "backbone", "--size", "0"][..],
        &["bench", "backbone", "--size", "4096"][..],
        &[
            "bench", "nearest", "--train", ".", "--test", ".", "--size", "0",
        ][..],
    ] {
        let out = flawscope(args);
        assert_eq!(out.status.code(), Some(2), "{args:?}");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(stderr.contains("--size"), "{args:?}: {stderr}");
        assert!(!stderr.contains("panicked"), "{args:?}: {stderr}");
    }
}

/// `eval --batch N` scores N test images at once: the same scores, metrics
/// and maps as one after another, only the timing differs; out-of-range
/// batches are refused before any work.
#[test]
fn eval_in_batches_equals_eval_one_by_one() {
    let tmp = tempfile::tempdir().unwrap();
    tiny_tile_dataset(&tmp.path().join("tile"));
    let dataset = tmp.path().to_str().unwrap();
    let run = |batch: &str| {
        let out = flawscope(&[
            "eval",
            "--dataset",
            dataset,
            "--detector",
            "patchcore",
            "--size",
            "64",
            "--json",
            "--batch",
            batch,
        ]);
        assert_eq!(
            out.status.code(),
            Some(0),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        serde_json::from_slice::<serde_json::Value>(&out.stdout).unwrap()
    };
    let (one, four) = (run("1"), run("4"));
    assert_eq!(one["batch"], 1);
    assert_eq!(four["batch"], 4);
    for field in [
        "image_auroc",
        "pixel_auroc",
        "aupro",
        "f1_max",
        "f1_threshold",
    ] {
        assert_eq!(one[field], four[field], "{field}");
    }
    assert!(one["image_auroc"].as_f64().unwrap() > 0.9, "{one}");
    for bad in ["0", "65"] {
        let out = flawscope(&["eval", "--dataset", dataset, "--batch", bad]);
        assert_eq!(out.status.code(), Some(2), "--batch {bad}");
    }
}

/// A tiny MVTec-style category at `cat`: six smooth 64² training textures,
/// three good test images and three with a bright square (with masks).
pub fn tiny_tile_dataset(cat: &Path) {
    // A smooth texture; defects are a bright square with its mask.
    let texture = |seed: u32, defect: bool| {
        image::RgbImage::from_fn(64, 64, |x, y| {
            let v = 100.0 + 20.0 * ((x as f32 * 0.3 + seed as f32).sin() + (y as f32 * 0.2).cos());
            let v = if defect && (20..34).contains(&x) && (24..38).contains(&y) {
                250.0
            } else {
                v
            };
            image::Rgb([v as u8; 3])
        })
    };
    let save = |rel: &str, img: &image::RgbImage| {
        let path = cat.join(rel);
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        img.save(path).unwrap();
    };
    for i in 0..6 {
        save(&format!("train/good/{i}.png"), &texture(i, false));
    }
    for i in 0..3 {
        save(&format!("test/good/{i}.png"), &texture(10 + i, false));
        save(&format!("test/spot/{i}.png"), &texture(20 + i, true));
        let mask = image::GrayImage::from_fn(64, 64, |x, y| {
            image::Luma([if (20..34).contains(&x) && (24..38).contains(&y) {
                255
            } else {
                0
            }])
        });
        let path = cat.join(format!("ground_truth/spot/{i}_mask.png"));
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        mask.save(path).unwrap();
    }
}

/// Exit codes as the README's table says: a missing model file is missing
/// setup (2); a run where every input failed scored nothing (1, not 3);
/// a folder whose images are all in subfolders points to `--recursive` (2).
#[test]
fn score_exit_codes_follow_the_readme_table() {
    let tmp = tempfile::tempdir().unwrap();
    let missing_model = tmp.path().join("no-such-model.flawscope");
    let image = crate::pipeline::demo_dir().join("test/good");
    let out = flawscope(&[
        "score",
        "--model",
        missing_model.to_str().unwrap(),
        image.to_str().unwrap(),
    ]);
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
    assert!(stderr(&out).contains("not found"), "{}", stderr(&out));

    let model = crate::web::model_dir().join("cells.flawscope");
    let missing_input = tmp.path().join("missing.png");
    let out = flawscope(&[
        "score",
        "--model",
        model.to_str().unwrap(),
        missing_input.to_str().unwrap(),
    ]);
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));

    // Images only in subfolders (an MVTec category's layout).
    let nested = tmp.path().join("category");
    std::fs::create_dir_all(nested.join("test/crack")).unwrap();
    let first = std::fs::read_dir(&image).unwrap().next().unwrap().unwrap();
    std::fs::copy(first.path(), nested.join("test/crack/000.png")).unwrap();
    let out = flawscope(&[
        "score",
        "--model",
        model.to_str().unwrap(),
        nested.to_str().unwrap(),
    ]);
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
    assert!(
        stderr(&out).contains("add --recursive") && stderr(&out).contains("1 in its subfolders"),
        "{}",
        stderr(&out)
    );
    let out = flawscope(&[
        "score",
        "--model",
        model.to_str().unwrap(),
        nested.to_str().unwrap(),
        "--recursive",
    ]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
}
