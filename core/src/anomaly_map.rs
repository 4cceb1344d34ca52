//! Anomaly maps: per-pixel scores at image resolution.
//!
//! A detector scores a coarse grid of patches; [`AnomalyMap::from_grid`]
//! upsamples that grid bilinearly to the image size and smooths it with a
//! Gaussian blur, as PatchCore and PaDiM do.

use rayon::prelude::*;
use serde::Serialize;

/// The blur PatchCore and PaDiM apply to their maps, in output pixels.
pub const DEFAULT_BLUR_SIGMA: f32 = 4.0;

/// Scores on a grid, row-major.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct AnomalyMap {
    pub width: usize,
    pub height: usize,
    pub values: Vec<f32>,
}

impl AnomalyMap {
    /// A map from row-major values; `values.len()` must be `width × height`.
    pub fn new(width: usize, height: usize, values: Vec<f32>) -> Option<Self> {
        (values.len() == width * height && width > 0 && height > 0).then_some(Self {
            width,
            height,
            values,
        })
    }

    /// Upsamples a patch grid to `out_width × out_height` (bilinear, corners
    /// aligned as PyTorch's `align_corners=False`) and blurs it with `sigma`
    /// (no blur when `sigma <= 0`).
    pub fn from_grid(grid: &AnomalyMap, out_width: usize, out_height: usize, sigma: f32) -> Self {
        let up = grid.resized_bilinear(out_width, out_height);
        if sigma > 0.0 { up.blurred(sigma) } else { up }
    }

    /// The pixel-wise mean of maps of one size (`None` when there are none
    /// or their sizes differ).
    pub fn mean(maps: &[AnomalyMap]) -> Option<Self> {
        let first = maps.first()?;
        if maps
            .iter()
            .any(|m| (m.width, m.height) != (first.width, first.height))
        {
            return None;
        }
        let mut values = first.values.clone();
        for map in &maps[1..] {
            for (sum, v) in values.iter_mut().zip(&map.values) {
                *sum += v;
            }
        }
        if maps.len() > 1 {
            let inverse = 1.0 / maps.len() as f32;
            values.iter_mut().for_each(|v| *v *= inverse);
        }
        Some(Self {
            width: first.width,
            height: first.height,
            values,
        })
    }

    pub fn max(&self) -> f32 {
        self.values
            .iter()
            .copied()
            .fold(f32::NEG_INFINITY, f32::max)
    }

    pub fn get(&self, x: usize, y: usize) -> f32 {
        self.values[y * self.width + x]
    }

    /// Bilinear resize with half-pixel centres.
    pub fn resized_bilinear(&self, out_width: usize, out_height: usize) -> Self {
        let sx = self.width as f32 / out_width as f32;
        let sy = self.height as f32 / out_height as f32;
        let source_coordinate = |i: usize, scale: f32, len: usize| {
            let c = ((i as f32 + 0.5) * scale - 0.5).max(0.0);
            let lo = (c.floor() as usize).min(len - 1);
            let hi = (lo + 1).min(len - 1);
            (lo, hi, c - lo as f32)
        };
        let xs: Vec<_> = (0..out_width)
            .map(|x| source_coordinate(x, sx, self.width))
            .collect();
        let mut values = vec![0.0; out_width * out_height];
        values
            .par_chunks_mut(out_width)
            .enumerate()
            .for_each(|(y, row)| {
                let (y0, y1, fy) = source_coordinate(y, sy, self.height);
                for (x, out) in row.iter_mut().enumerate() {
                    let (x0, x1, fx) = xs[x];
                    let top = self.get(x0, y0) * (1.0 - fx) + self.get(x1, y0) * fx;
                    let bottom = self.get(x0, y1) * (1.0 - fx) + self.get(x1, y1) * fx;
                    *out = top * (1.0 - fy) + bottom * fy;
                }
            });
        Self {
            width: out_width,
            height: out_height,
            values,
        }
    }

    /// Separable Gaussian blur, kernel radius `4σ`, edges reflected.
    pub fn blurred(&self, sigma: f32) -> Self {
        let kernel = gaussian_kernel(sigma);
        let radius = kernel.len() / 2;
        let (w, h) = (self.width, self.height);
        let reflect = |i: isize, len: usize| -> usize {
            let len = len as isize;
            let mut i = i;
            // Reflect about the edges (…2 1 0 | 0 1 2… excluded: "reflect" mode, d c b | a b c d).
            while i < 0 || i >= len {
                i = if i < 0 { -i - 1 } else { 2 * len - i - 1 };
            }
            i as usize
        };
        // Each row is padded once by reflection; then every tap is one pass
        // over the row (it vectorises), in the same order per pixel.
        let mut horizontal = vec![0.0; w * h];
        horizontal
            .par_chunks_mut(w)
            .enumerate()
            .for_each(|(y, row)| {
                let padded: Vec<f32> = (0..w + 2 * radius)
                    .map(|i| self.get(reflect(i as isize - radius as isize, w), y))
                    .collect();
                for (k, wt) in kernel.iter().enumerate() {
                    for (out, v) in row.iter_mut().zip(&padded[k..k + w]) {
                        *out += wt * v;
                    }
                }
            });
        let mut values = vec![0.0; w * h];
        values.par_chunks_mut(w).enumerate().for_each(|(y, row)| {
            for (k, wt) in kernel.iter().enumerate() {
                let src = reflect(y as isize + k as isize - radius as isize, h);
                let src_row = &horizontal[src * w..(src + 1) * w];
                for (out, v) in row.iter_mut().zip(src_row) {
                    *out += wt * v;
                }
            }
        });
        Self {
            width: w,
            height: h,
            values,
        }
    }
}

fn gaussian_kernel(sigma: f32) -> Vec<f32> {
    let radius = (4.0 * sigma).round().max(1.0) as isize;
    let mut kernel: Vec<f32> = (-radius..=radius)
        .map(|i| (-(i * i) as f32 / (2.0 * sigma * sigma)).exp())
        .collect();
    let sum: f32 = kernel.iter().sum();
    kernel.iter_mut().for_each(|k| *k /= sum);
    kernel
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn upsampling_a_constant_stays_constant_and_blur_keeps_mass() {
        let grid = AnomalyMap::new(3, 2, vec![2.0; 6]).unwrap();
        let map = AnomalyMap::from_grid(&grid, 30, 20, 4.0);
        assert_eq!((map.width, map.height), (30, 20));
        assert!(map.values.iter().all(|v| (v - 2.0).abs() < 1e-5));

        let mut spike = vec![0.0; 41 * 41];
        spike[20 * 41 + 20] = 1.0;
        let blurred = AnomalyMap::new(41, 41, spike).unwrap().blurred(4.0);
        let total: f32 = blurred.values.iter().sum();
        assert!((total - 1.0).abs() < 1e-4);
        assert_eq!(blurred.max(), blurred.get(20, 20));
    }

    #[test]
    fn blur_equals_the_direct_reflected_convolution() {
        let (w, h) = (7, 5);
        let values: Vec<f32> = (0..w * h).map(|i| ((i * 13) % 7) as f32 * 0.3).collect();
        let map = AnomalyMap::new(w, h, values).unwrap();
        let sigma = 2.0;
        let kernel = gaussian_kernel(sigma);
        let r = (kernel.len() / 2) as isize;
        // Reflection ("d c b | a b c d") by folding until inside.
        let fold = |mut i: isize, len: isize| {
            while i < 0 || i >= len {
                i = if i < 0 { -i - 1 } else { 2 * len - i - 1 };
            }
            i as usize
        };
        let blurred = map.blurred(sigma);
        for y in 0..h {
            for x in 0..w {
                let mut want = 0.0f64;
                for (ky, wy) in kernel.iter().enumerate() {
                    for (kx, wx) in kernel.iter().enumerate() {
                        let sx = fold(x as isize + kx as isize - r, w as isize);
                        let sy = fold(y as isize + ky as isize - r, h as isize);
                        want += f64::from(wy * wx) * f64::from(map.get(sx, sy));
                    }
                }
                let got = f64::from(blurred.get(x, y));
                assert!((got - want).abs() < 1e-5, "({x}, {y}): {got} vs {want}");
            }
        }
    }

    #[test]
    fn bilinear_matches_half_pixel_convention() {
        // [0, 1] upsampled ×2 with half-pixel centres: 0, 0.25, 0.75, 1.
        let grid = AnomalyMap::new(2, 1, vec![0.0, 1.0]).unwrap();
        let up = grid.resized_bilinear(4, 1);
        let expected = [0.0, 0.25, 0.75, 1.0];
        for (a, b) in up.values.iter().zip(expected) {
            assert!((a - b).abs() < 1e-6, "{:?}", up.values);
        }
    }
}
