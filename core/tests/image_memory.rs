//! Memory of preprocessing does not grow with an image's aspect ratio.
//!
//! The allocator of this test binary refuses any allocation that would take
//! the live total more than a fixed budget above what the decoded image
//! already holds; an overrun aborts the binary ("memory allocation of N
//! bytes failed"), which fails the test. One test only, so no other test
//! allocates meanwhile.
#![allow(clippy::unwrap_used)]

use std::alloc::System;
use std::io::Cursor;

use cap::Cap;
use flawscope_core::Device;
use flawscope_core::features::{BackboneKind, FeatureConfig, FeatureExtractor, Resize};
use flawscope_core::images::{ImageLimits, decode_image};
use flawscope_models::clip::{ClipPreprocessor, ResizeMode};
use flawscope_models::{Preprocess, Stage};
use image::{DynamicImage, GrayImage, ImageFormat, Luma, Rgb32FImage};

#[global_allocator]
static ALLOCATOR: Cap<System> = Cap::new(System, usize::MAX);

/// Allowed on top of the decoded image for each step (the backbone's
/// activations at its largest input, 896 × 64, included). Before the
/// pre-reduction, the 400 000 × 40 image below needed 410 MB to resize.
const BUDGET: usize = 96 << 20;

fn within_budget<T>(what: &str, step: impl FnOnce() -> T) -> T {
    let before = ALLOCATOR.allocated();
    ALLOCATOR.set_limit(before + BUDGET).unwrap();
    let out = step();
    ALLOCATOR.set_limit(usize::MAX).unwrap();
    eprintln!("{what}: fine");
    out
}

fn grey_png(width: u32, height: u32) -> Vec<u8> {
    let img = GrayImage::from_fn(width, height, |x, y| Luma([((x * 7 + y * 3) % 256) as u8]));
    let mut out = Cursor::new(Vec::new());
    img.write_to(&mut out, ImageFormat::Png).unwrap();
    out.into_inner()
}

#[test]
fn preprocessing_memory_does_not_grow_with_the_aspect_ratio() {
    let extractor = FeatureExtractor::new(
        FeatureConfig {
            backbone: BackboneKind::Lite0,
            stages: vec![Stage::Stage4, Stage::Stage5],
            resize: Resize::KeepAspect { side: 224 },
            weights: None,
            layers: Vec::new(),
            precision: Default::default(),
        },
        &Device::Cpu,
    )
    .unwrap();
    // At the aspect bound (10 000 : 1), 16 MP, both orientations, through
    // the decoder; then a 1 000 000 × 1 line handed to the preprocessing
    // directly (the decoder refuses it, a library caller may not).
    let mut images: Vec<(String, Rgb32FImage)> = [(400_000, 40), (40, 400_000)]
        .into_iter()
        .map(|(w, h)| {
            let img = decode_image(&grey_png(w, h), "x", &ImageLimits::default()).unwrap();
            (format!("{w}×{h}"), img)
        })
        .collect();
    images.push((
        "1000000×1".into(),
        Rgb32FImage::from_pixel(1_000_000, 1, image::Rgb([0.5, 0.5, 0.5])),
    ));
    for (name, img) in images {
        let (w, h) = Resize::KeepAspect { side: 224 }.input_size(img.width(), img.height());
        let chw = within_budget(&format!("{name} EfficientNet {w}×{h}"), || {
            Preprocess::new(w, h).to_chw_rgb32f(&img).unwrap()
        });
        assert_eq!(chw.len(), 3 * (w * h) as usize);
        let grid = within_budget(&format!("{name} features"), || {
            extractor.extract(&img).unwrap()
        });
        assert!(grid.grid_width * grid.grid_height > 0);
        let dynamic = DynamicImage::ImageRgb32F(img);
        for mode in [ResizeMode::ShortestSideCenterCrop, ResizeMode::Stretch] {
            let pixels = within_budget(&format!("{name} CLIP {mode:?}"), || {
                ClipPreprocessor::new(224)
                    .with_mode(mode)
                    .pixels(&dynamic)
                    .unwrap()
            });
            assert_eq!(pixels.len(), 3 * 224 * 224);
        }
    }
}
