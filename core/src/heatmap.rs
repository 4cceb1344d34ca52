//! Heatmap images a person can open: the anomaly map in colour, blended over
//! the image, written as PNG.

use std::io::Cursor;
use std::path::Path;

use image::{ImageFormat, Rgb, Rgb32FImage, RgbImage};

use crate::Error;
use crate::anomaly_map::AnomalyMap;
use crate::model_file::write_atomically;

/// How much of the colour map shows over the image.
const OVERLAY_OPACITY: f32 = 0.5;

/// Colour for a 0–1 value: blue (normal) through green and yellow to red
/// (anomalous), a "jet"-style ramp.
pub fn colour(value: f32) -> [f32; 3] {
    let v = if value.is_finite() {
        value.clamp(0.0, 1.0)
    } else {
        0.0
    };
    let ramp = |centre: f32| (1.5 - (4.0 * v - centre).abs()).clamp(0.0, 1.0);
    [ramp(3.0), ramp(2.0), ramp(1.0)]
}

/// The map (values in `[0, 1]`) in colour over the image. The map is
/// resized to the image if their sizes differ.
pub fn overlay(image: &Rgb32FImage, map: &AnomalyMap) -> RgbImage {
    let (w, h) = image.dimensions();
    let resized;
    let map = if (map.width, map.height) == (w as usize, h as usize) {
        map
    } else {
        resized = map.resized_bilinear(w as usize, h as usize);
        &resized
    };
    RgbImage::from_fn(w, h, |x, y| {
        let p = image.get_pixel(x, y);
        let grey = (p[0] + p[1] + p[2]) / 3.0;
        let c = colour(map.get(x as usize, y as usize));
        let mix = |ch: f32| {
            let v = (1.0 - OVERLAY_OPACITY) * grey + OVERLAY_OPACITY * ch;
            (v * 255.0).round().clamp(0.0, 255.0) as u8
        };
        Rgb([mix(c[0]), mix(c[1]), mix(c[2])])
    })
}

/// PNG bytes of the overlay.
pub fn overlay_png(image: &Rgb32FImage, map: &AnomalyMap) -> Result<Vec<u8>, Error> {
    let mut bytes = Cursor::new(Vec::new());
    overlay(image, map)
        .write_to(&mut bytes, ImageFormat::Png)
        .map_err(|e| Error::Encode(e.to_string()))?;
    Ok(bytes.into_inner())
}

/// Writes the overlay PNG to `path` atomically.
pub fn save_overlay(path: &Path, image: &Rgb32FImage, map: &AnomalyMap) -> Result<(), Error> {
    write_atomically(path, &overlay_png(image, map)?)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ramp_runs_blue_to_red() {
        assert_eq!(colour(0.0), [0.0, 0.0, 0.5]);
        assert_eq!(colour(1.0), [0.5, 0.0, 0.0]);
        assert_eq!(colour(0.5), [0.5, 1.0, 0.5]);
        assert_eq!(colour(f32::NAN), colour(0.0));
    }

    #[test]
    fn overlay_is_a_decodable_png_of_the_image_size() {
        let image = Rgb32FImage::from_pixel(20, 10, Rgb([0.5, 0.5, 0.5]));
        let map = AnomalyMap::new(4, 2, vec![0.0, 0.0, 1.0, 1.0, 0.0, 0.0, 1.0, 1.0]).unwrap();
        let png = overlay_png(&image, &map).unwrap();
        let back = image::load_from_memory(&png).unwrap().to_rgb8();
        assert_eq!(back.dimensions(), (20, 10));
        assert!(back.get_pixel(19, 5)[0] > back.get_pixel(0, 5)[0]);
    }
}
