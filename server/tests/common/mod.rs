//! What the server's test binaries share: the shipped solar-cell sample and
//! a small PatchCore model fitted on it.
#![allow(clippy::unwrap_used, dead_code)]

use std::path::PathBuf;

use flawscope_core::features::{BackboneKind, FeatureConfig, Resize, parse_stage};
use flawscope_core::model::{FitOptions, Model};
use flawscope_core::progress::NoProgress;
use flawscope_core::runtime::Runtime;

/// The demo's solar cells (`demo/solar_cell`).
pub fn demo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../demo/solar_cell")
}

/// The PNG files of `demo()/split`, sorted.
pub fn images_in(split: &str) -> Vec<PathBuf> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(demo().join(split))
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "png"))
        .collect();
    files.sort();
    files
}

/// PatchCore on stages 4 and 5 at `side`, fitted on the first `train` good
/// cells, each scored out of sample for the threshold.
pub fn small_patchcore(train: usize, side: u32, runtime: &Runtime) -> Model {
    let images: Vec<PathBuf> = images_in("train/good").into_iter().take(train).collect();
    let options = FitOptions {
        features: Some(FeatureConfig {
            backbone: BackboneKind::Lite0,
            stages: vec![
                parse_stage("stage4").unwrap(),
                parse_stage("stage5").unwrap(),
            ],
            resize: Resize::KeepAspect { side },
            weights: None,
            layers: Vec::new(),
            precision: Default::default(),
        }),
        // PatchCore with its default settings, at most 1 % false alarms.
        ..FitOptions::default()
    };
    Model::fit(&images, &options, runtime, &NoProgress).unwrap()
}
