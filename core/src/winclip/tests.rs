//! Unit tests of the WinCLIP maths and of the detector on a tiny random
//! checkpoint.

use std::path::PathBuf;
use std::sync::Arc;

use candle_core::Device;
use flawscope_models::clip_weights::{VIT_B_16, WeightsLookup};
use image::Rgb32FImage;

use flawscope_models::clip::sliding_windows;

use super::scoring::{anomalous_probability, harmonic_mean, mean_grid};
use super::*;
use crate::calibration::Calibration;
use crate::detectors::DetectorConfig;
use crate::images::{ImageLimits, load_image};
use crate::model::{FitOptions, Model};
use crate::progress::NoProgress;
use crate::runtime::Runtime;

fn close(a: f64, b: f64) -> bool {
    (a - b).abs() < 1e-12
}

#[test]
fn harmonic_mean_of_hand_values() {
    assert!(close(harmonic_mean(&[0.5]), 0.5));
    // 2 / (1/0.2 + 1/0.8) = 2 / 6.25
    assert!(close(harmonic_mean(&[0.2, 0.8]), 0.32));
    // 3 / (1 + 2 + 4)
    assert!(close(harmonic_mean(&[1.0, 0.5, 0.25]), 3.0 / 7.0));
    assert_eq!(harmonic_mean(&[0.9, 0.0]), 0.0);
    assert!(harmonic_mean(&[]).is_nan());
}

#[test]
fn windows_are_aggregated_per_patch_by_harmonic_mean() {
    // A 2x3 grid, 2x2 windows at stride 1: w0 = {0,1,3,4}, w1 = {1,2,4,5}.
    let windows = sliding_windows(2, 3, 2, 1);
    assert_eq!(windows, vec![vec![0, 1, 3, 4], vec![1, 2, 4, 5]]);
    let scores = [0.2, 0.8];
    let patches = harmonic_window_aggregation(&scores, &windows, 6).unwrap();
    // Patches 0 and 3 see only w0, 2 and 5 only w1, 1 and 4 both.
    let expected = [0.2, 0.32, 0.8, 0.2, 0.32, 0.8];
    for (got, want) in patches.iter().zip(expected) {
        assert!(close(*got, want), "{patches:?}");
    }

    // 3x3 grid, 2x2 windows: the centre is covered by all four.
    let windows = sliding_windows(3, 3, 2, 1);
    let scores = [0.1, 0.2, 0.4, 0.8];
    let patches = harmonic_window_aggregation(&scores, &windows, 9).unwrap();
    assert!(close(patches[4], 4.0 / (10.0 + 5.0 + 2.5 + 1.25)));
    assert!(close(patches[0], 0.1));
    assert!(close(patches[8], 0.8));
    // Edge patch 1 is in windows 0 and 1.
    assert!(close(patches[1], 2.0 / (10.0 + 5.0)));

    // Errors: count mismatch, an uncovered patch, a window off the grid.
    assert!(harmonic_window_aggregation(&[0.5], &windows, 9).is_err());
    assert!(harmonic_window_aggregation(&[0.5], &[vec![0]], 2).is_err());
    assert!(harmonic_window_aggregation(&[0.5], &[vec![7]], 2).is_err());
    assert!(harmonic_window_aggregation(&[f64::NAN], &[vec![0]], 1).is_err());
}

#[test]
fn scales_and_image_score_combine_by_harmonic_mean() {
    let small = vec![0.5, 0.25];
    let mid = vec![0.5, 1.0];
    let z = zero_shot_grid(0.5, &[small, mid]).unwrap();
    assert!(close(z[0], 0.5));
    // 3 / (2 + 4 + 1)
    assert!(close(z[1], 3.0 / 7.0));
    assert!(zero_shot_grid(0.5, &[vec![0.1], vec![0.1, 0.2]]).is_err());
    let m = mean_grid(&[vec![0.0, 0.3], vec![0.6, 0.3]]).unwrap();
    assert!(close(m[0], 0.3) && close(m[1], 0.3));
}

#[test]
fn probability_is_the_two_class_softmax() {
    assert!(close(anomalous_probability(0.3, 0.3, 100.0), 0.5));
    let p = anomalous_probability(0.20, 0.25, 100.0);
    let softmax = (100.0f64 * 0.25).exp() / ((100.0f64 * 0.2).exp() + (100.0f64 * 0.25).exp());
    assert!((p - softmax).abs() < 1e-12);
    // Never exactly 0 at CLIP's scale.
    assert!(anomalous_probability(1.0, -1.0, 100.0) > 0.0);
}

#[test]
fn identity_calibration_keeps_probabilities() {
    let c = Calibration::probability();
    for v in [0.0f32, 0.1, 0.5, 0.77, 1.0] {
        assert!((c.normalise(v) - v).abs() < 1e-6);
    }
    assert!(c.is_anomalous(0.5) && !c.is_anomalous(0.49));
}

#[test]
fn first_shots_are_stable() {
    let paths: Vec<PathBuf> = ["c.png", "a.png", "b.png"].map(PathBuf::from).to_vec();
    assert_eq!(
        first_shots(&paths, 2).unwrap(),
        vec![PathBuf::from("a.png"), PathBuf::from("b.png")]
    );
    assert!(matches!(
        first_shots(&paths, 4),
        Err(WinClipError::NotEnoughShots { shots: 4, found: 3 })
    ));
}

fn tiny() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../models/tests/fixtures/tiny_clip")
}

fn engine() -> Arc<WinClip> {
    Arc::new(WinClip::from_dir(&tiny(), "tiny", None, "flag", &Device::Cpu).unwrap())
}

fn runtime(engine: &Arc<WinClip>) -> Runtime {
    let lookup = WeightsLookup::from_vars(None, |_| None);
    Runtime::with_clip(Device::Cpu, lookup, VIT_B_16).with_engine(Arc::clone(engine))
}

fn image(seed: u32, w: u32, h: u32) -> Rgb32FImage {
    Rgb32FImage::from_fn(w, h, |x, y| {
        let v = ((x * 7 + y * 13 + seed * 31) % 17) as f32 / 16.0;
        image::Rgb([v, 1.0 - v, (v * 3.0) % 1.0])
    })
}

#[test]
fn zero_shot_and_few_shot_on_the_tiny_checkpoint() {
    let engine = engine();
    let runtime = runtime(&engine);
    let prompts = vec!["scratch".to_owned()];
    let z = Model::zero_shot(&runtime, "metal_nut", &prompts)
        .unwrap()
        .inspect(&image(0, 50, 30))
        .unwrap();
    assert_eq!((z.map.width, z.map.height), (50, 30));
    assert!((0.0..=1.0).contains(&z.score));
    assert!(
        z.map
            .values
            .iter()
            .all(|v| v.is_finite() && (0.0..=1.0).contains(v))
    );
    assert_eq!(z.is_anomalous, z.raw_score >= 0.5);

    let model = Model::zero_shot(&runtime, "metal nut", &prompts).unwrap();
    let again = model.inspect(&image(0, 50, 30)).unwrap();
    assert_eq!(again.raw_score, z.raw_score);
    assert!(Model::zero_shot(&runtime, "  ", &prompts).is_err());

    let dir = tempfile::tempdir().unwrap();
    let shots: Vec<PathBuf> = (0..2)
        .map(|i| {
            let p = dir.path().join(format!("{i}.png"));
            image::DynamicImage::ImageRgb32F(image(i, 40, 40))
                .to_rgb8()
                .save(&p)
                .unwrap();
            p
        })
        .collect();
    let limits = ImageLimits::default();
    let options = FitOptions {
        features: None,
        detector: DetectorConfig::WinClip(WinClipConfig {
            shots: 2,
            ..WinClipConfig::zero_shot("metal nut", &prompts)
        }),
        limits,
        ..FitOptions::default()
    };
    let few = Model::fit(&shots, &options, &runtime, &NoProgress).unwrap();
    // 8x8 grid: 64 patches + 49 + 36 windows per shot.
    assert_eq!(few.info().memory_bank_size, Some(2 * (64 + 49 + 36)));
    // A shot image matches its own memory: the few-shot part is ~0.
    let shot = load_image(&shots[0], &limits).unwrap();
    let own = few.inspect(&shot).unwrap();
    let zero = model.inspect(&shot).unwrap();
    assert!(
        (own.raw_score - 0.5 * zero.raw_score).abs() < 1e-4,
        "{own:?}"
    );

    let path = dir.path().join("m.flawscope");
    few.save(&path).unwrap();
    // A fresh runtime finds the weights again from the model file.
    let lookup = WeightsLookup::from_vars(None, |_| None);
    let fresh = Runtime::with_clip(Device::Cpu, lookup, VIT_B_16);
    let back = Model::load(&path, &fresh).unwrap();
    assert_eq!(back.info(), few.info());
    let probe = image(5, 33, 21);
    let a = few.inspect(&probe).unwrap();
    let b = back.inspect(&probe).unwrap();
    assert_eq!(a.raw_score, b.raw_score);
    assert_eq!(a.map, b.map);
    let shared = Model::load(&path, &runtime).unwrap();
    assert_eq!(shared.inspect(&probe).unwrap().raw_score, a.raw_score);
}

#[test]
fn text_side_is_cached() {
    let engine = engine();
    let set = prompt_set(&[]).unwrap();
    let a = engine.class_vectors("screw", &set).unwrap();
    let b = engine.class_vectors("screw", &set).unwrap();
    assert!(Arc::ptr_eq(&a, &b));
}
