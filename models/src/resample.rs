//! Shrinking with bounded memory, before a quality resize.
//!
//! A separable filter resizes one axis first, so its intermediate buffer is
//! one side of the source times the other side of the target: a
//! 1 000 000 × 1 image resized to 896 × 64 needs a 1 000 000 × 64 buffer
//! (1 GB in f32 RGBA), however few pixels the image has. [`area_reduce`]
//! averages the source down first, streaming over its rows into a buffer of
//! the reduced size only; the quality filter then works on at most
//! [`PRE_REDUCE_FACTOR`] × the target per side.

use image::{ImageBuffer, Pixel, Rgb};

use crate::error::{ModelError, Result};

/// A side is averaged down first only when it shrinks by more than this
/// factor, and then to this many times its target. Images up to 8× the
/// target per side are resized exactly as before; larger ones lose
/// nothing visible (the filter then shrinks by at most 8 more).
pub const PRE_REDUCE_FACTOR: u32 = 8;

/// The size an image of `source` pixels is averaged down to before it is
/// resized to `target`, or `None` when neither side shrinks by more than
/// [`PRE_REDUCE_FACTOR`].
pub fn pre_reduced_size(source: (u32, u32), target: (u32, u32)) -> Option<(u32, u32)> {
    let side = |s: u32, t: u32| s.min(t.max(1).saturating_mul(PRE_REDUCE_FACTOR));
    let reduced = (side(source.0, target.0), side(source.1, target.1));
    (reduced != source).then_some(reduced)
}

/// A channel value the averaging reads and writes.
pub trait Sample: Copy {
    fn to_f64(self) -> f64;
    fn from_f64(value: f64) -> Self;
}

impl Sample for u8 {
    fn to_f64(self) -> f64 {
        f64::from(self)
    }
    fn from_f64(value: f64) -> Self {
        value.round().clamp(0.0, 255.0) as u8
    }
}

impl Sample for f32 {
    fn to_f64(self) -> f64 {
        f64::from(self)
    }
    fn from_f64(value: f64) -> Self {
        value as f32
    }
}

/// Where source index `i` of a side shrunk from `from` to `to` lands: the
/// output cell, its share, and the share of the next cell when the source
/// pixel straddles a boundary. Shares are in units where each output cell
/// receives `from` in total (exact integer arithmetic, no drift).
fn spread(i: u64, from: u64, to: u64) -> (usize, u64, u64) {
    let start = i * to;
    let end = start + to;
    let cell = start / from;
    let boundary = (cell + 1) * from;
    if end <= boundary {
        (cell as usize, to, 0)
    } else {
        (cell as usize, boundary - start, end - boundary)
    }
}

/// Area averaging (each output pixel is the mean of the source area it
/// covers, fractional pixels weighted) down to `width × height`, each at
/// most the source's side and at least 1. Memory: the output plus one
/// output row; time: one pass over the source.
pub fn area_reduce<S: Sample>(
    image: &ImageBuffer<Rgb<S>, Vec<S>>,
    width: u32,
    height: u32,
) -> Result<ImageBuffer<Rgb<S>, Vec<S>>>
where
    Rgb<S>: Pixel<Subpixel = S>,
{
    let (in_w, in_h) = image.dimensions();
    if width == 0 || height == 0 || width > in_w || height > in_h {
        return Err(ModelError::InvalidInput(format!(
            "cannot area-reduce {in_w}×{in_h} to {width}×{height}"
        )));
    }
    let (w, h) = (width as usize, height as usize);
    let mut sums = vec![0f64; w * h * 3];
    let mut row = vec![0f64; w * 3];
    for (y, source_row) in image.rows().enumerate() {
        row.fill(0.0);
        for (x, px) in source_row.enumerate() {
            let (cell, share, next) = spread(x as u64, u64::from(in_w), u64::from(width));
            for (c, v) in px.channels().iter().enumerate() {
                let v = v.to_f64();
                row[cell * 3 + c] += share as f64 * v;
                if next > 0 {
                    row[(cell + 1) * 3 + c] += next as f64 * v;
                }
            }
        }
        let (cell, share, next) = spread(y as u64, u64::from(in_h), u64::from(height));
        for (out_row, weight) in [(cell, share), (cell + 1, next)] {
            if weight == 0 {
                continue;
            }
            let weight = weight as f64;
            let target = &mut sums[out_row * w * 3..(out_row + 1) * w * 3];
            for (t, r) in target.iter_mut().zip(&row) {
                *t += weight * r;
            }
        }
    }
    let norm = 1.0 / (f64::from(in_w) * f64::from(in_h));
    let data = sums.into_iter().map(|s| S::from_f64(s * norm)).collect();
    ImageBuffer::from_raw(width, height, data)
        .ok_or_else(|| ModelError::InvalidInput("area-reduced buffer has the wrong size".into()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use image::{Rgb32FImage, RgbImage};

    #[test]
    fn only_sides_shrinking_past_the_factor_are_reduced() {
        assert_eq!(pre_reduced_size((1792, 100), (224, 224)), None);
        assert_eq!(pre_reduced_size((1793, 100), (224, 224)), Some((1792, 100)));
        assert_eq!(pre_reduced_size((1_000_000, 1), (896, 64)), Some((7168, 1)));
        assert_eq!(pre_reduced_size((3, 2_000_000), (64, 0)), Some((3, 8)));
    }

    #[test]
    fn averages_are_exact_for_whole_and_fractional_cells() {
        // 1×1 cells: 4 → 2 averages pairs.
        let img = RgbImage::from_fn(4, 1, |x, _| Rgb([(x * 10) as u8, 0, 255]));
        let out = area_reduce(&img, 2, 1).unwrap();
        assert_eq!(out.get_pixel(0, 0).0, [5, 0, 255]);
        assert_eq!(out.get_pixel(1, 0).0, [25, 0, 255]);
        // 3 → 2: the middle pixel is split half and half.
        let img = Rgb32FImage::from_fn(1, 3, |_, y| Rgb([y as f32, 1.0, 0.0]));
        let out = area_reduce(&img, 1, 2).unwrap();
        let want = [(0.0 + 0.5) / 1.5, (0.5 + 2.0) / 1.5];
        for (y, w) in want.iter().enumerate() {
            assert!((out.get_pixel(0, y as u32)[0] - w).abs() < 1e-6);
            assert!((out.get_pixel(0, y as u32)[1] - 1.0).abs() < 1e-6);
        }
    }

    #[test]
    fn the_mean_is_kept_and_bad_sizes_are_refused() {
        let img = Rgb32FImage::from_fn(997, 13, |x, y| {
            Rgb([((x * 7 + y * 3) % 11) as f32 / 10.0, 0.25, 1.0])
        });
        let mean = |i: &Rgb32FImage| {
            i.pixels().map(|p| f64::from(p[0])).sum::<f64>() / i.pixels().count() as f64
        };
        // A reduction to whole cells keeps the mean exactly; any other
        // weights each source pixel equally in total too.
        for (w, h) in [(997, 13), (100, 13), (37, 5), (1, 1)] {
            let out = area_reduce(&img, w, h).unwrap();
            assert_eq!(out.dimensions(), (w, h));
            assert!((mean(&out) - mean(&img)).abs() < 1e-5, "{w}×{h}");
        }
        assert!(area_reduce(&img, 0, 1).is_err());
        assert!(area_reduce(&img, 998, 1).is_err());
    }

    /// A smooth pattern that aliasing or a wrong weight would show.
    fn pattern(w: u32, h: u32) -> Rgb32FImage {
        Rgb32FImage::from_fn(w, h, |x, y| {
            let (fx, fy) = (x as f32 / w as f32, y as f32 / h as f32);
            Rgb([fx, fy, 0.5 + 0.5 * (6.0 * fx + 3.0 * fy).sin()])
        })
    }

    #[test]
    fn efficientnet_input_of_a_very_long_image_is_close_to_the_direct_resize() {
        use image::imageops::{FilterType, resize};
        let pre = crate::Preprocess::new(224, 64);
        for (w, h) in [(20_000, 50), (50, 3_000), (1_000_000, 1)] {
            let img = pattern(w, h);
            let ours = pre.to_chw_rgb32f(&img).unwrap();
            assert_eq!(ours.len(), 3 * 224 * 64);
            if w * h > 100_000 {
                continue; // the direct resize is the memory hog this avoids
            }
            let direct = resize(&img, 224, 64, FilterType::Triangle);
            let plane = 224 * 64;
            let worst = direct
                .pixels()
                .enumerate()
                .flat_map(|(i, p)| (0..3).map(move |c| (i, c, p[c])))
                .map(|(i, c, v)| ((v * 255.0 - 127.0) / 128.0 - ours[c * plane + i]).abs())
                .fold(0f32, f32::max);
            // The inputs span about 2 units; 0.05 is 3 grey levels of 255.
            assert!(worst < 0.05, "{w}×{h}: {worst}");
        }
    }

    #[test]
    fn efficientnet_input_is_unchanged_when_nothing_is_pre_reduced() {
        use image::imageops::{FilterType, resize};
        let pre = crate::Preprocess::new(64, 48);
        let img = pattern(300, 200);
        let direct = resize(&img, 64, 48, FilterType::Triangle);
        let ours = pre.to_chw_rgb32f(&img).unwrap();
        assert_eq!(ours[5], (direct.get_pixel(5, 0)[0] * 255.0 - 127.0) / 128.0);
    }

    /// CLIP's centre crop computed the old way: the whole resize, then the crop.
    fn clip_reference(p: &crate::clip::ClipPreprocessor, img: &RgbImage) -> RgbImage {
        let (w, h) = (img.width() as usize, img.height() as usize);
        let (short, long) = (w.min(h), w.max(h));
        let new_long = ((p.size * long) as f64 / short as f64) as usize;
        let (rw, rh) = if w <= h {
            (p.size, new_long)
        } else {
            (new_long, p.size)
        };
        let full = crate::clip::resize_bicubic(img, rw, rh).unwrap();
        let (left, top) = ((rw - p.size) / 2, (rh - p.size) / 2);
        image::imageops::crop_imm(&full, left as u32, top as u32, p.size as u32, p.size as u32)
            .to_image()
    }

    #[test]
    fn clip_centre_crop_is_computed_exactly_from_a_window() {
        let p = crate::clip::ClipPreprocessor::new(24);
        for (w, h) in [(24, 24), (40, 30), (30, 41), (13, 200), (500, 7), (25, 24)] {
            let img = RgbImage::from_fn(w, h, |x, y| {
                Rgb([(x * 37 + y * 11) as u8, (x * x + y) as u8, (y * 5) as u8])
            });
            let ours = p.rgb(&image::DynamicImage::ImageRgb8(img.clone())).unwrap();
            assert_eq!(ours, clip_reference(&p, &img), "{w}×{h}");
        }
    }

    #[test]
    fn clip_handles_extreme_shapes_in_both_modes() {
        use crate::clip::{ClipPreprocessor, ResizeMode};
        for mode in [ResizeMode::ShortestSideCenterCrop, ResizeMode::Stretch] {
            let p = ClipPreprocessor::new(32).with_mode(mode);
            for (w, h) in [(1_000_000, 1), (1, 1_000_000), (20_000, 20)] {
                let img = Rgb32FImage::from_pixel(w, h, Rgb([0.2, 0.4, 0.8]));
                let out = p.rgb(&image::DynamicImage::ImageRgb32F(img)).unwrap();
                assert_eq!(out.dimensions(), (32, 32));
                assert!(
                    out.pixels().all(|px| px.0 == [51, 102, 204]),
                    "{mode:?} {w}×{h}"
                );
            }
        }
    }
}
