//! CLIP image preprocessing: RGB conversion, bicubic resize, optional centre
//! crop, and per-channel normalisation, matching Hugging Face's
//! `CLIPImageProcessor` (PIL backend) value for value.
//!
//! The resize reproduces Pillow's 8-bit bicubic resampling (a = -0.5, support
//! widened when shrinking, 22-bit fixed-point weights, horizontal pass then
//! vertical pass, each rounded to `u8`), so the pixels fed to the network are
//! the ones the Python reference implementations see.
//!
//! Only the pixels the network sees are computed: after a shortest-side
//! resize just the centre crop (from just the source rows and columns its
//! filter taps read), so a 1 000 000 × 1 image does not become a
//! 224 000 000 × 224 intermediate. A stretched side that shrinks by more
//! than [`PRE_REDUCE_FACTOR`](crate::resample::PRE_REDUCE_FACTOR) is area-averaged down first (there the result
//! is close to Pillow's, no longer equal).

use std::ops::Range;

use candle_core::{Device, Tensor};
use image::{DynamicImage, GenericImageView, RgbImage};

use crate::ModelError;
use crate::resample::{area_reduce, pre_reduced_size};

/// CLIP's per-channel mean (RGB, on the 0..1 scale).
pub const CLIP_MEAN: [f32; 3] = [0.481_454_66, 0.457_827_5, 0.408_210_73];
/// CLIP's per-channel standard deviation (RGB, on the 0..1 scale).
pub const CLIP_STD: [f32; 3] = [0.268_629_54, 0.261_302_6, 0.275_777_1];

/// How an image is brought to the network's square input.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum ResizeMode {
    /// Resize the shortest side to the input size, keep the aspect ratio, and
    /// cut the centre square (CLIP's own preprocessing; loses the borders of
    /// non-square images).
    #[default]
    ShortestSideCenterCrop,
    /// Resize straight to the square input size, distorting the aspect ratio
    /// but keeping the whole image (what WinCLIP does for inspection images).
    Stretch,
}

/// The part of the original image that ends up in the network input, in
/// original pixel coordinates (fractional when the crop falls between
/// pixels of the original).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct CropBox {
    /// Left edge.
    pub x: f64,
    /// Top edge.
    pub y: f64,
    /// Width.
    pub width: f64,
    /// Height.
    pub height: f64,
}

/// Turns images into normalised `[batch, 3, size, size]` tensors.
#[derive(Debug, Clone, PartialEq)]
pub struct ClipPreprocessor {
    /// Side of the square network input.
    pub size: usize,
    /// Resize policy.
    pub mode: ResizeMode,
    /// Per-channel mean subtracted after scaling to 0..1.
    pub mean: [f32; 3],
    /// Per-channel standard deviation divided by after subtracting the mean.
    pub std: [f32; 3],
}

impl ClipPreprocessor {
    /// CLIP's preprocessing at `size` (shortest side + centre crop, CLIP mean/std).
    pub fn new(size: usize) -> Self {
        Self {
            size,
            mode: ResizeMode::ShortestSideCenterCrop,
            mean: CLIP_MEAN,
            std: CLIP_STD,
        }
    }

    /// The same with another resize policy.
    pub fn with_mode(mut self, mode: ResizeMode) -> Self {
        self.mode = mode;
        self
    }

    fn resized_size(&self, width: usize, height: usize) -> (usize, usize) {
        match self.mode {
            ResizeMode::Stretch => (self.size, self.size),
            ResizeMode::ShortestSideCenterCrop => {
                let (short, long) = if width <= height {
                    (width, height)
                } else {
                    (height, width)
                };
                // Python: int(size * long / short), a true division then a truncation.
                let new_long = (self.size.saturating_mul(long) as f64 / short as f64) as usize;
                if width <= height {
                    (self.size, new_long)
                } else {
                    (new_long, self.size)
                }
            }
        }
    }

    /// Which part of a `width × height` image the network sees.
    pub fn crop_box(&self, width: u32, height: u32) -> CropBox {
        let (w, h) = (width as usize, height as usize);
        let (rw, rh) = self.resized_size(w, h);
        let (left, top) = center_crop_origin(rw, rh, self.size);
        let sx = w as f64 / rw.max(1) as f64;
        let sy = h as f64 / rh.max(1) as f64;
        CropBox {
            x: left as f64 * sx,
            y: top as f64 * sy,
            width: self.size.min(rw) as f64 * sx,
            height: self.size.min(rh) as f64 * sy,
        }
    }

    /// The resized (and cropped) RGB image the network sees, before normalisation.
    pub fn rgb(&self, image: &DynamicImage) -> Result<RgbImage, ModelError> {
        if image.width() == 0 || image.height() == 0 {
            return Err(ModelError::InvalidInput("empty image".into()));
        }
        if self.size == 0 {
            return Err(ModelError::InvalidInput("preprocessing size is 0".into()));
        }
        let (w, h) = (image.width() as usize, image.height() as usize);
        let (rw, rh) = self.resized_size(w, h);
        if self.mode == ResizeMode::Stretch {
            let side =
                u32::try_from(self.size).map_err(|e| ModelError::InvalidInput(e.to_string()))?;
            let rgb = match (pre_reduced_size(image.dimensions(), (side, side)), image) {
                (None, _) => image.to_rgb8(),
                // Averaged in f32 without an 8-bit copy of the whole image.
                (Some((sw, sh)), DynamicImage::ImageRgb32F(f)) => {
                    DynamicImage::ImageRgb32F(area_reduce(f, sw, sh)?).to_rgb8()
                }
                (Some((sw, sh)), other) => area_reduce(&other.to_rgb8(), sw, sh)?,
            };
            return resize_bicubic(&rgb, rw, rh);
        }
        let (left, top) = center_crop_origin(rw, rh, self.size);
        let cols = left..(left + self.size).min(rw);
        let rows = top..(top + self.size).min(rh);
        let crop = resize_window(image, (rw, rh), cols, rows)?;
        if crop.dimensions() == (self.size as u32, self.size as u32) {
            return Ok(crop);
        }
        let side = u32::try_from(self.size).map_err(|e| ModelError::InvalidInput(e.to_string()))?;
        let mut out = RgbImage::new(side, side);
        for (x, y, px) in crop.enumerate_pixels() {
            out.put_pixel(x, y, *px);
        }
        Ok(out)
    }

    /// Normalised pixels of one image, channel-major (`3 × size × size` values).
    pub fn pixels(&self, image: &DynamicImage) -> Result<Vec<f32>, ModelError> {
        let rgb = self.rgb(image)?;
        let plane = self.size * self.size;
        let mut out = vec![0f32; 3 * plane];
        for (i, px) in rgb.pixels().enumerate() {
            for c in 0..3 {
                // Same order of operations as the reference: scale, then normalise.
                let v = f32::from(px.0[c]) * (1.0 / 255.0);
                out[c * plane + i] = (v - self.mean[c]) / self.std[c];
            }
        }
        Ok(out)
    }

    /// A `[images.len(), 3, size, size]` tensor on `device`.
    pub fn tensor(&self, images: &[DynamicImage], device: &Device) -> Result<Tensor, ModelError> {
        if images.is_empty() {
            return Err(ModelError::InvalidInput("no image to preprocess".into()));
        }
        let mut data = Vec::with_capacity(images.len() * 3 * self.size * self.size);
        for image in images {
            data.extend(self.pixels(image)?);
        }
        Ok(Tensor::from_vec(
            data,
            (images.len(), 3, self.size, self.size),
            device,
        )?)
    }
}

/// Top-left corner of the centred `size × size` crop (Hugging Face rounds down).
fn center_crop_origin(width: usize, height: usize, size: usize) -> (usize, usize) {
    (
        width.saturating_sub(size) / 2,
        height.saturating_sub(size) / 2,
    )
}

const PRECISION_BITS: u32 = 32 - 8 - 2;

fn bicubic(x: f64) -> f64 {
    const A: f64 = -0.5;
    let x = x.abs();
    if x < 1.0 {
        ((A + 2.0) * x - (A + 3.0)) * x * x + 1.0
    } else if x < 2.0 {
        (((x - 5.0) * x + 8.0) * x - 4.0) * A
    } else {
        0.0
    }
}

/// Fixed-point weights of one output pixel: first input index and weights.
struct Taps {
    first: usize,
    weights: Vec<i64>,
}

/// The taps of output pixels `outputs` of a resize from `in_size` to
/// `out_size` (each computed as in the full resize).
fn taps(in_size: usize, out_size: usize, outputs: Range<usize>) -> Vec<Taps> {
    let scale = in_size as f64 / out_size as f64;
    let filterscale = scale.max(1.0);
    let support = 2.0 * filterscale;
    outputs
        .map(|xx| {
            let center = (xx as f64 + 0.5) * scale;
            // C's (int) cast truncates toward zero, then negatives are clamped.
            let xmin = ((center - support + 0.5) as i64).max(0) as usize;
            let xmax = ((center + support + 0.5) as i64).clamp(0, in_size as i64) as usize;
            let count = xmax.saturating_sub(xmin);
            let raw: Vec<f64> = (0..count)
                .map(|x| bicubic(((x + xmin) as f64 - center + 0.5) / filterscale))
                .collect();
            let total: f64 = raw.iter().sum();
            let weights = raw
                .iter()
                .map(|&w| {
                    let w = if total == 0.0 { w } else { w / total };
                    let fixed = w * f64::from(1u32 << PRECISION_BITS);
                    if fixed < 0.0 {
                        (fixed - 0.5) as i64
                    } else {
                        (fixed + 0.5) as i64
                    }
                })
                .collect();
            Taps {
                first: xmin,
                weights,
            }
        })
        .collect()
}

fn clip8(acc: i64) -> u8 {
    (acc >> PRECISION_BITS).clamp(0, 255) as u8
}

/// The source range the taps read (`None` when there are no taps).
fn reach(taps: &[Taps]) -> Option<Range<usize>> {
    let start = taps.iter().map(|t| t.first).min()?;
    let end = taps.iter().map(|t| t.first + t.weights.len()).max()?;
    Some(start..end.max(start))
}

/// Pillow-exact 8-bit bicubic resize of an RGB image.
pub fn resize_bicubic(
    image: &RgbImage,
    width: usize,
    height: usize,
) -> Result<RgbImage, ModelError> {
    let (in_w, in_h) = (image.width() as usize, image.height() as usize);
    if width == 0 || height == 0 || in_w == 0 || in_h == 0 {
        return Err(ModelError::InvalidInput(format!(
            "cannot resize {in_w}x{in_h} to {width}x{height}"
        )));
    }
    if (width, height) == (in_w, in_h) {
        return Ok(image.clone());
    }
    let region = Region {
        pixels: image.as_raw(),
        width: in_w,
        origin: (0, 0),
    };
    bicubic_passes(&region, (in_w, in_h), (width, height), 0..width, 0..height)
}

/// Columns `cols` and rows `rows` of the Pillow-exact bicubic resize of
/// `image` to `size`; only the source pixels their taps read are converted
/// to RGB and filtered.
fn resize_window(
    image: &DynamicImage,
    size: (usize, usize),
    cols: Range<usize>,
    rows: Range<usize>,
) -> Result<RgbImage, ModelError> {
    let full = (image.width() as usize, image.height() as usize);
    if size.0 == 0 || size.1 == 0 || full.0 == 0 || full.1 == 0 {
        return Err(ModelError::InvalidInput(format!(
            "cannot resize {}x{} to {}x{}",
            full.0, full.1, size.0, size.1
        )));
    }
    // A side that keeps its length is not filtered: its window is read as is.
    let span = |input: usize, output: usize, range: &Range<usize>| {
        if input == output {
            Some(range.clone())
        } else {
            reach(&taps(input, output, range.clone()))
        }
    };
    let (Some(xs), Some(ys)) = (span(full.0, size.0, &cols), span(full.1, size.1, &rows)) else {
        return Err(ModelError::InvalidInput("empty resize window".into()));
    };
    let as_u32 = |v: usize| u32::try_from(v).map_err(|e| ModelError::InvalidInput(e.to_string()));
    let crop = if (xs.clone(), ys.clone()) == (0..full.0, 0..full.1) {
        image.to_rgb8()
    } else {
        image
            .crop_imm(
                as_u32(xs.start)?,
                as_u32(ys.start)?,
                as_u32(xs.len())?,
                as_u32(ys.len())?,
            )
            .to_rgb8()
    };
    let region = Region {
        pixels: crop.as_raw(),
        width: xs.len(),
        origin: (xs.start, ys.start),
    };
    bicubic_passes(&region, full, size, cols, rows)
}

/// Part of an RGB image: its pixels, its width, and where its top-left
/// pixel lies in the whole image.
struct Region<'a> {
    pixels: &'a [u8],
    width: usize,
    origin: (usize, usize),
}

/// The horizontal then the vertical pass of a resize from `full` to `size`
/// (each skipped when its side does not change), computing only output
/// columns `cols` and rows `rows`; `region` holds every source pixel their
/// taps read.
fn bicubic_passes(
    region: &Region<'_>,
    full: (usize, usize),
    size: (usize, usize),
    cols: Range<usize>,
    rows: Range<usize>,
) -> Result<RgbImage, ModelError> {
    let (ox, oy) = region.origin;
    let region_h = region.pixels.len() / (region.width * 3).max(1);
    let round = 1i64 << (PRECISION_BITS - 1);
    let out_w = cols.len();
    // Horizontal pass over every row of the region.
    let mid = if size.0 != full.0 {
        let taps = taps(full.0, size.0, cols.clone());
        let mut mid = vec![0u8; out_w * region_h * 3];
        for (y, row) in region.pixels.chunks_exact(region.width * 3).enumerate() {
            for (x, t) in taps.iter().enumerate() {
                for c in 0..3 {
                    let acc = t.weights.iter().enumerate().fold(round, |acc, (k, &w)| {
                        acc + i64::from(row[(t.first - ox + k) * 3 + c]) * w
                    });
                    mid[(y * out_w + x) * 3 + c] = clip8(acc);
                }
            }
        }
        mid
    } else {
        let skip = (cols.start - ox) * 3;
        region
            .pixels
            .chunks_exact(region.width * 3)
            .flat_map(|row| &row[skip..skip + out_w * 3])
            .copied()
            .collect()
    };
    // Vertical pass.
    let out = if size.1 != full.1 {
        let taps = taps(full.1, size.1, rows.clone());
        let mut out = vec![0u8; out_w * rows.len() * 3];
        for (y, t) in taps.iter().enumerate() {
            for x in 0..out_w {
                for c in 0..3 {
                    let acc = t.weights.iter().enumerate().fold(round, |acc, (k, &w)| {
                        acc + i64::from(mid[((t.first - oy + k) * out_w + x) * 3 + c]) * w
                    });
                    out[(y * out_w + x) * 3 + c] = clip8(acc);
                }
            }
        }
        out
    } else {
        let start = (rows.start - oy) * out_w * 3;
        mid[start..start + rows.len() * out_w * 3].to_vec()
    };
    let (w, h) = (
        u32::try_from(out_w).map_err(|e| ModelError::InvalidInput(e.to_string()))?,
        u32::try_from(rows.len()).map_err(|e| ModelError::InvalidInput(e.to_string()))?,
    );
    RgbImage::from_raw(w, h, out)
        .ok_or_else(|| ModelError::InvalidInput("resized buffer has the wrong size".into()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shortest_side_sizes_follow_transformers() {
        let p = ClipPreprocessor::new(224);
        assert_eq!(p.resized_size(640, 480), (298, 224));
        assert_eq!(p.resized_size(480, 640), (224, 298));
        assert_eq!(p.resized_size(100, 100), (224, 224));
        let s = p.clone().with_mode(ResizeMode::Stretch);
        assert_eq!(s.resized_size(640, 480), (224, 224));
    }

    #[test]
    fn crop_box_maps_back_to_the_original() {
        let p = ClipPreprocessor::new(224);
        let b = p.crop_box(640, 480);
        assert!((b.height - 480.0).abs() < 1e-9);
        assert!((b.width - 224.0 * 640.0 / 298.0).abs() < 1e-9);
        assert!((b.x - 37.0 * 640.0 / 298.0).abs() < 1e-9);
        let s = p.with_mode(ResizeMode::Stretch).crop_box(640, 480);
        assert_eq!(
            s,
            CropBox {
                x: 0.0,
                y: 0.0,
                width: 640.0,
                height: 480.0
            }
        );
    }

    #[test]
    fn resize_keeps_a_constant_image_constant() {
        let img = RgbImage::from_pixel(37, 23, image::Rgb([10, 128, 250]));
        for (w, h) in [(5, 3), (80, 41), (37, 50)] {
            let out = resize_bicubic(&img, w, h).unwrap();
            assert!(out.pixels().all(|p| p.0 == [10, 128, 250]), "{w}x{h}");
        }
        assert!(resize_bicubic(&img, 0, 3).is_err());
    }

    #[test]
    fn empty_images_are_refused() {
        let p = ClipPreprocessor::new(8);
        assert!(p.pixels(&DynamicImage::new_rgb8(0, 4)).is_err());
        assert!(p.tensor(&[], &Device::Cpu).is_err());
    }
}
