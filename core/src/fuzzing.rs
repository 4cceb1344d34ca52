//! Entry point of the image fuzz target (`fuzz/fuzz_targets/decode.rs`) and
//! of the test that replays its regression corpus: what every door does to
//! an uploaded file before a model sees it.

use flawscope_models::Preprocess;
use flawscope_models::clip::{ClipPreprocessor, ResizeMode};
use image::DynamicImage;

use crate::Error;
use crate::features::Resize;
use crate::images::{ImageLimits, decode_image};

/// Decodes `bytes` with the default limits, then prepares the result for
/// the EfficientNet backbone (at the PatchCore and PaDiM input sizes) and
/// for CLIP (both resize modes). Any input must give `Ok` or a typed error,
/// never a panic or an allocation the limits do not bound.
pub fn decode_and_preprocess(bytes: &[u8]) -> Result<(u32, u32), Error> {
    let image = decode_image(bytes, "fuzz input", &ImageLimits::default())?;
    let size = image.dimensions();
    for resize in [
        Resize::KeepAspect { side: 224 },
        Resize::Fixed {
            width: 256,
            height: 256,
        },
    ] {
        let (w, h) = resize.input_size(size.0, size.1);
        let chw = Preprocess::new(w, h).to_chw_rgb32f(&image)?;
        debug_assert_eq!(chw.len(), 3 * w as usize * h as usize);
    }
    let image = DynamicImage::ImageRgb32F(image);
    for mode in [ResizeMode::ShortestSideCenterCrop, ResizeMode::Stretch] {
        let pixels = ClipPreprocessor::new(224).with_mode(mode).pixels(&image)?;
        debug_assert_eq!(pixels.len(), 3 * 224 * 224);
    }
    Ok(size)
}
