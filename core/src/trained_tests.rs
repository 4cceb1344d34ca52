//! Tests of the trained detectors ([`crate::detectors::flow`], [`crate::detectors::recon`],
//! [`crate::detectors::supersimplenet`]) on a
//! tiny synthetic set: training lowers the loss, a pasted defect scores
//! above normal images, and a saved model scores exactly as the fitted one.

use std::path::{Path, PathBuf};
use std::time::Instant;

use candle_core::Device;
use flawscope_models::Stage;
use image::{Rgb, RgbImage};
use rand::{Rng, SeedableRng, rngs::StdRng};

use crate::detector::Detector;
use crate::detectors::DetectorConfig;
use crate::detectors::flow::{Flow, FlowConfig, FlowDetector};
use crate::detectors::recon::{Recon, ReconConfig, ReconDetector};
use crate::detectors::supersimplenet::{
    SuperSimpleNet, SuperSimpleNetConfig, SuperSimpleNetDetector,
};
use crate::features::{BackboneKind, FeatureConfig, FeatureExtractor, Resize};
use crate::images::{ImageLimits, load_image};
use crate::model_file;
use crate::progress::NoProgress;
use crate::runtime::Runtime;
use crate::train::{TrainingConfig, TrainingReport};

const SIDE: u32 = 64;
const TRAIN_IMAGES: u64 = 32;

/// A smooth striped texture with a little pixel noise; `phase` and `seed`
/// vary it between images.
fn texture(phase: f32, seed: u64) -> RgbImage {
    let mut rng = StdRng::seed_from_u64(seed);
    RgbImage::from_fn(SIDE, SIDE, |x, y| {
        let stripes = (x as f32 * 0.35 + phase).sin() * (y as f32 * 0.2 + 0.5 * phase).cos();
        let v = 0.45 + 0.15 * stripes + rng.random_range(-0.03f32..0.03);
        let g = (v * 255.0).round() as u8;
        Rgb([g, g, (v * 0.9 * 255.0) as u8])
    })
}

fn with_square(mut image: RgbImage) -> RgbImage {
    for y in 24..40 {
        for x in 20..36 {
            image.put_pixel(x, y, Rgb([255, 255, 255]));
        }
    }
    image
}

struct Fixture {
    _dir: tempfile::TempDir,
    train: Vec<PathBuf>,
    normal_tests: Vec<PathBuf>,
    defect: PathBuf,
    extractor: FeatureExtractor,
}

fn fixture() -> Fixture {
    let dir = tempfile::tempdir().unwrap();
    let save = |name: &str, image: RgbImage| -> PathBuf {
        let path = dir.path().join(name);
        image.save(&path).unwrap();
        path
    };
    let train = (0..TRAIN_IMAGES)
        .map(|i| save(&format!("train{i}.png"), texture(i as f32 * 0.1, i)))
        .collect();
    let normal_tests = (0..2)
        .map(|i| save(&format!("normal{i}.png"), texture(0.25 + i as f32, 100 + i)))
        .collect();
    let defect = save("defect.png", with_square(texture(0.6, 200)));
    let extractor = FeatureExtractor::new(
        FeatureConfig {
            backbone: BackboneKind::Lite0,
            // 16 and 24 channels on 32×32 and 16×16 grids: few enough
            // channels for per-position statistics from a small set.
            stages: vec![Stage::Stage1, Stage::Stage2],
            resize: Resize::Fixed {
                width: SIDE,
                height: SIDE,
            },
            weights: None,
            layers: Vec::new(),
            precision: Default::default(),
        },
        &Device::Cpu,
    )
    .unwrap();
    Fixture {
        _dir: dir,
        train,
        normal_tests,
        defect,
        extractor,
    }
}

fn training(epochs: usize, batch_size: usize, learning_rate: f64) -> TrainingConfig {
    TrainingConfig {
        epochs,
        max_minutes: None,
        seed: 7,
        learning_rate,
        weight_decay: 0.0,
        batch_size,
        validation_fraction: 0.25,
        // No early stop: the test wants every epoch.
        patience: epochs,
    }
}

fn score(detector: &dyn Detector, path: &Path) -> f32 {
    let image = load_image(path, &ImageLimits::default()).unwrap();
    raw(detector, &image).score
}

fn raw(detector: &dyn Detector, image: &image::Rgb32FImage) -> crate::detector::RawInspection {
    detector.inspect_raw(image).unwrap()
}

/// A second extractor with the fixture's recipe, for a detector to own.
fn extractor(fx: &Fixture) -> FeatureExtractor {
    FeatureExtractor::new(fx.extractor.config().clone(), &Device::Cpu).unwrap()
}

/// Loss falls, the defect outscores the normals, and a saved-and-loaded
/// model gives bit-identical scores and maps.
fn check(fx: &Fixture, config: DetectorConfig, detector: &dyn Detector, report: &TrainingReport) {
    let first = report.history.first().unwrap();
    let last = report.history.last().unwrap();
    assert!(
        last.train < first.train,
        "training loss did not fall: {:?}",
        report.history
    );

    let defect = score(detector, &fx.defect);
    for normal in &fx.normal_tests {
        let s = score(detector, normal);
        assert!(defect > s, "defect {defect} vs normal {s}");
    }

    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("model.flawscope");
    model_file::save(&path, &config, &detector.tensors()).unwrap();
    let (loaded_config, mut tensors): (DetectorConfig, _) =
        model_file::load(&path, &Device::Cpu).unwrap();
    assert_eq!(loaded_config, config);
    let runtime = Runtime::new(Device::Cpu);
    let loaded = loaded_config
        .load(Some(fx.extractor.config()), &mut tensors, &path, &runtime)
        .unwrap();
    for path in fx.normal_tests.iter().chain([&fx.defect]) {
        let image = load_image(path, &ImageLimits::default()).unwrap();
        let a = raw(detector, &image);
        let b = raw(loaded.as_ref(), &image);
        assert_eq!(a.score.to_bits(), b.score.to_bits());
        assert_eq!(a.map, b.map);
    }
}

#[test]
fn flow_learns_normal_texture_and_survives_a_model_file() {
    let fx = fixture();
    let config = FlowConfig {
        blocks: 4,
        hidden_ratio: 0.5,
        training: training(12, 2, 2e-3),
        ..Default::default()
    };
    let (flow, report) = Flow::fit(
        &fx.extractor,
        &source(&fx.train),
        &config,
        Instant::now(),
        &NoProgress,
    )
    .unwrap();
    check(
        &fx,
        DetectorConfig::Flow(config),
        &FlowDetector::new(extractor(&fx), flow),
        &report,
    );
}

#[test]
fn recon_learns_normal_texture_and_survives_a_model_file() {
    let fx = fixture();
    let config = ReconConfig {
        hidden: 32,
        latent: 8,
        training: training(15, 64, 3e-3),
    };
    let (recon, report) = Recon::fit(
        &fx.extractor,
        &source(&fx.train),
        &config,
        Instant::now(),
        &NoProgress,
    )
    .unwrap();
    check(
        &fx,
        DetectorConfig::Recon(config),
        &ReconDetector::new(extractor(&fx), recon),
        &report,
    );
}

#[test]
fn supersimplenet_learns_from_noise_and_survives_a_model_file() {
    let fx = fixture();
    let config = SuperSimpleNetConfig {
        hidden: 32,
        head_kernel: 3,
        noise_std: 0.5,
        noise_after_adaptor: false,
        training: training(6, 4, 3e-3),
    };
    let (net, report) = SuperSimpleNet::fit(
        &fx.extractor,
        &source(&fx.train),
        &config,
        Instant::now(),
        &NoProgress,
    )
    .unwrap();
    // 8 held-back images and their 24 synthetic-defect copies judged every epoch.
    assert_eq!(report.synthetic_auroc.len(), report.training.history.len());
    assert!(
        report
            .synthetic_auroc
            .iter()
            .all(|a| (0.0..=1.0).contains(a))
    );
    check(
        &fx,
        DetectorConfig::SuperSimpleNet(config),
        &SuperSimpleNetDetector::new(extractor(&fx), net),
        &report.training,
    );
}

#[test]
fn training_is_reproducible_from_the_seed() {
    let fx = fixture();
    let config = ReconConfig {
        hidden: 16,
        latent: 4,
        training: training(3, 64, 3e-3),
    };
    let fit = || {
        Recon::fit(
            &fx.extractor,
            &source(&fx.train),
            &config,
            Instant::now(),
            &NoProgress,
        )
        .unwrap()
    };
    let (a, report_a) = fit();
    let (b, report_b) = fit();
    assert_eq!(report_a, report_b);
    let da = ReconDetector::new(extractor(&fx), a);
    let db = ReconDetector::new(extractor(&fx), b);
    assert_eq!(
        score(&da, &fx.defect).to_bits(),
        score(&db, &fx.defect).to_bits()
    );
}

fn source(paths: &[std::path::PathBuf]) -> crate::tiling::ImageSource<'_> {
    const LIMITS: ImageLimits = ImageLimits {
        max_pixels: crate::images::DEFAULT_MAX_PIXELS,
        max_aspect_ratio: crate::images::DEFAULT_MAX_ASPECT_RATIO,
    };
    crate::tiling::ImageSource {
        paths,
        limits: &LIMITS,
        tiling: None,
    }
}
