//! One interface for every detector: fit on normal images → a fitted
//! [`Detector`]; score an image → a raw image score plus patch-score grids
//! ([`DetectorOutput`]). Turning grids into a map at the image's size is
//! shared code here ([`DetectorOutput::into_raw`], and
//! [`Detector::inspect_tiled`] for images scored in tiles); calibration into
//! a verdict is shared code in [`crate::model`].
//!
//! This file knows no detector: the detectors implement [`Detector`], and
//! [`crate::detectors`], the one place that lists them, picks one by its
//! settings.

use std::collections::BTreeMap;
use std::path::PathBuf;

use candle_core::Tensor;
use image::Rgb32FImage;

use crate::Error;
use crate::anomaly_map::{AnomalyMap, DEFAULT_BLUR_SIGMA};
use crate::features::{FeatureConfig, FeatureExtractor, PatchGrid, for_each_tile_of};
use crate::folds::{Folds, Procedure};
use crate::images::ImageLimits;
use crate::progress::Progress;
use crate::runtime::Runtime;
use crate::tiling::{ImageSource, TileRect, Tiling, crop};

/// Every tile's place and output ([`Detector::score_tiles`]).
pub type TileOutputs = Result<Vec<(TileRect, DetectorOutput)>, Error>;

/// A detector that never saw one fold's images, and how it was derived
/// ([`Detector::without_fold`]).
pub type FoldDetector<'a> = (Box<dyn Detector + 'a>, Procedure);

/// A fitted detector, whatever its kind.
pub trait Detector: Send + Sync {
    /// Raw image score and patch-score grids of one image.
    fn score(&self, image: &Rgb32FImage) -> Result<DetectorOutput, Error>;

    /// The tensors a model file stores.
    fn tensors(&self) -> BTreeMap<String, Tensor>;

    /// Rows of the memory bank, for detectors that keep one.
    fn memory_bank_size(&self) -> Option<usize> {
        None
    }

    /// This detector as fitted without the images of `fold` (see
    /// [`crate::crossfit`]), when it can derive one from its own fit
    /// (memory banks drop rows, Gaussians leave sums out) and was fitted
    /// with folds. `None`: it is fitted again on the other folds.
    fn without_fold(&self, _fold: usize) -> Result<Option<FoldDetector<'_>>, Error> {
        Ok(None)
    }

    /// Drops what fitting kept only for [`Detector::without_fold`].
    fn forget_folds(&mut self) {}

    /// The raw score and the map at the image's own size.
    fn inspect_raw(&self, image: &Rgb32FImage) -> Result<RawInspection, Error> {
        self.score(image)?.into_raw(image.dimensions())
    }

    /// The place and output of every tile of `image` under `tiling`. By
    /// default each tile is cut out and [`Detector::score`]d; detectors on
    /// CNN patch features cut them from shared backbone passes instead
    /// ([`crate::features::FeatureExtractor::tile_grids`]), where a tile
    /// may reach past the image's right and bottom edge.
    fn score_tiles(&self, tiling: &Tiling, image: &Rgb32FImage) -> TileOutputs {
        let (width, height) = image.dimensions();
        tiling
            .tiles(width, height)?
            .into_iter()
            .map(|rect| Ok((rect, self.score(&crop(image, rect))?)))
            .collect()
    }

    /// The raw score and map of `image`, whole or cut into the tiles of
    /// `tiling` (see [`crate::tiling`]): each tile scored at the detector's
    /// own input size, the tiles' maps stitched at the image's size and
    /// averaged where they overlap. The image score is the largest tile
    /// score when the detector computes its own ([`ImageScore::Given`]),
    /// else the peak of the stitched map.
    fn inspect_tiled(
        &self,
        tiling: Option<&Tiling>,
        image: &Rgb32FImage,
    ) -> Result<RawInspection, Error> {
        let Some(tiling) = tiling else {
            return self.inspect_raw(image);
        };
        let (width, height) = image.dimensions();
        let (w, h) = (width as usize, height as usize);
        let mut sum = vec![0f32; w * h];
        let mut count = vec![0f32; w * h];
        let mut given: Option<f32> = None;
        let mut every_given = true;
        for (rect, output) in self.score_tiles(tiling, image)? {
            match output.image_score {
                ImageScore::Given(s) => given = Some(given.map_or(s, |g| g.max(s))),
                ImageScore::MapPeak => every_given = false,
            }
            let raw = output.into_raw((rect.width, rect.height))?;
            // A tile cut from a shared pass may reach past the image's
            // right and bottom edge: only its part inside is stitched.
            let tw = rect.width as usize;
            let inside_w = tw.min(w.saturating_sub(rect.x as usize));
            let inside_h = (rect.height as usize).min(h.saturating_sub(rect.y as usize));
            for ty in 0..inside_h {
                let row = (rect.y as usize + ty) * w + rect.x as usize;
                let src = &raw.map.values[ty * tw..ty * tw + inside_w];
                for (i, v) in src.iter().enumerate() {
                    sum[row + i] += v;
                    count[row + i] += 1.0;
                }
            }
        }
        for (s, c) in sum.iter_mut().zip(&count) {
            *s /= c.max(1.0);
        }
        let map = AnomalyMap::new(w, h, sum)
            .ok_or_else(|| Error::InvalidConfig("an empty image cannot be tiled".into()))?;
        let score = match given {
            Some(g) if every_given => g,
            _ => map.max(),
        };
        Ok(RawInspection { score, map })
    }
}

/// [`Detector::score_tiles`] for a detector that scores the fine patch
/// features of `extractor` with `score` (given the tile and its features).
pub fn score_tiles_with(
    extractor: &FeatureExtractor,
    tiling: &Tiling,
    image: &Rgb32FImage,
    score: impl Fn(&Rgb32FImage, PatchGrid) -> Result<DetectorOutput, Error>,
) -> TileOutputs {
    let mut outputs = Vec::new();
    for_each_tile_of(extractor, Some(tiling), image, |rect, tile, grid| {
        outputs.push((rect, score(tile, grid)?));
        Ok(())
    })?;
    Ok(outputs)
}

/// What a detector computes for one image, before any map is built.
#[derive(Debug, Clone)]
pub struct DetectorOutput {
    pub image_score: ImageScore,
    /// One grid per scale; their maps are averaged.
    pub grids: Vec<ScoreGrid>,
}

/// Where the raw image score comes from.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum ImageScore {
    /// The detector computed it (PatchCore's reweighted maximum, WinCLIP).
    Given(f32),
    /// The peak of the finished map (PaDiM, flow, recon).
    MapPeak,
}

/// Patch scores on a `width × height` grid computed at the network input
/// size `input_size`, row-major.
#[derive(Debug, Clone)]
pub struct ScoreGrid {
    pub width: usize,
    pub height: usize,
    pub values: Vec<f32>,
    pub input_size: (u32, u32),
    /// Blur of the map at the input size.
    pub blur_sigma: f32,
}

impl ScoreGrid {
    /// Scores of the patches of `grid`, blurred with the default σ.
    pub fn of(grid: &PatchGrid, values: Vec<f32>) -> Self {
        Self {
            width: grid.grid_width,
            height: grid.grid_height,
            values,
            input_size: grid.input_size,
            blur_sigma: DEFAULT_BLUR_SIGMA,
        }
    }

    /// Grid → map at the input size (bilinear, blurred there) → map at
    /// `image_size`.
    pub fn to_map(&self, image_size: (u32, u32)) -> Result<AnomalyMap, Error> {
        let coarse = AnomalyMap::new(self.width, self.height, self.values.clone())
            .ok_or_else(|| Error::InvalidConfig("patch scores do not fill the grid".into()))?;
        let (iw, ih) = (self.input_size.0 as usize, self.input_size.1 as usize);
        let at_input = AnomalyMap::from_grid(&coarse, iw, ih, self.blur_sigma);
        let (w, h) = (image_size.0 as usize, image_size.1 as usize);
        Ok(if (w, h) == (iw, ih) {
            at_input
        } else {
            at_input.resized_bilinear(w, h)
        })
    }
}

/// A raw image score and a raw map at the image's own size.
#[derive(Debug, Clone)]
pub struct RawInspection {
    pub score: f32,
    pub map: AnomalyMap,
}

impl DetectorOutput {
    /// One grid of patch scores whose map's peak is the image score (PaDiM,
    /// recon).
    pub fn peak_of(grid: &PatchGrid, scores: Vec<f32>) -> Self {
        Self {
            image_score: ImageScore::MapPeak,
            grids: vec![ScoreGrid::of(grid, scores)],
        }
    }

    /// The map of every grid at `image_size`, averaged, and the image score.
    /// The maps are summed one at a time (as [`AnomalyMap::mean`] sums,
    /// so the result is the same): at 40 megapixels each map is 160 MB,
    /// and holding every grid's at once cost the server 0.5 GB more.
    pub fn into_raw(self, image_size: (u32, u32)) -> Result<RawInspection, Error> {
        let differ = || Error::InvalidConfig("a detector gave no map, or maps differ".into());
        let mut grids = self.grids.iter();
        let mut map = grids.next().ok_or_else(differ)?.to_map(image_size)?;
        let mut count = 1usize;
        for grid in grids {
            let next = grid.to_map(image_size)?;
            if (next.width, next.height) != (map.width, map.height) {
                return Err(differ());
            }
            for (sum, v) in map.values.iter_mut().zip(&next.values) {
                *sum += v;
            }
            count += 1;
        }
        if count > 1 {
            let inverse = 1.0 / count as f32;
            map.values.iter_mut().for_each(|v| *v *= inverse);
        }
        let score = match self.image_score {
            ImageScore::Given(score) => score,
            ImageScore::MapPeak => map.max(),
        };
        Ok(RawInspection { score, map })
    }
}

/// Everything a detector may need to fit.
pub struct FitInputs<'a> {
    /// The normal images to fit on (held-back ones excluded).
    pub normal: &'a [PathBuf],
    /// The feature recipe, for detectors on the CNN backbone.
    pub features: Option<&'a FeatureConfig>,
    pub runtime: &'a Runtime,
    pub limits: &'a ImageLimits,
    pub progress: &'a dyn Progress,
    /// Fit on tiles of the normal images instead of whole images.
    pub tiling: Option<Tiling>,
    /// The folds of `normal` for cross-fitted calibration: detectors that
    /// can, keep what [`Detector::without_fold`] needs.
    pub folds: Option<&'a Folds>,
}

impl FitInputs<'_> {
    /// The normal images as the detector is fitted on them.
    pub fn images(&self) -> ImageSource<'_> {
        ImageSource {
            paths: self.normal,
            limits: self.limits,
            tiling: self.tiling,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Scores each 8 × 8 block by its brightness.
    struct Brightness {
        given: bool,
    }

    impl Detector for Brightness {
        fn score(&self, image: &Rgb32FImage) -> Result<DetectorOutput, Error> {
            let (w, h) = image.dimensions();
            let (gw, gh) = (w.div_ceil(8) as usize, h.div_ceil(8) as usize);
            let mut values = vec![0f32; gw * gh];
            for (x, y, p) in image.enumerate_pixels() {
                let cell = (y / 8) as usize * gw + (x / 8) as usize;
                values[cell] = values[cell].max(p.0[0]);
            }
            let peak = values.iter().copied().fold(0.0, f32::max);
            Ok(DetectorOutput {
                image_score: if self.given {
                    ImageScore::Given(peak + 10.0)
                } else {
                    ImageScore::MapPeak
                },
                grids: vec![ScoreGrid {
                    width: gw,
                    height: gh,
                    values,
                    input_size: (w, h),
                    blur_sigma: 0.0,
                }],
            })
        }

        fn tensors(&self) -> std::collections::BTreeMap<String, candle_core::Tensor> {
            Default::default()
        }
    }

    #[test]
    fn tiles_are_stitched_at_the_image_size_where_they_belong() {
        let mut image = Rgb32FImage::new(1000, 120);
        for y in 50..54 {
            for x in 700..760 {
                image.put_pixel(x, y, image::Rgb([0.8; 3]));
            }
        }
        let tiling = Tiling::new(96).unwrap();
        let raw = Brightness { given: false }
            .inspect_tiled(Some(&tiling), &image)
            .unwrap();
        assert_eq!((raw.map.width, raw.map.height), (1000, 120));
        // Overlapping tiles are averaged, so the peak may sit a little lower.
        assert!(raw.score > 0.7 && raw.score <= 0.8 + 1e-6, "{}", raw.score);
        let (peak_at, _) = raw
            .map
            .values
            .iter()
            .enumerate()
            .fold(
                (0, f32::MIN),
                |b, (i, v)| if *v > b.1 { (i, *v) } else { b },
            );
        let (x, y) = (peak_at % 1000, peak_at / 1000);
        assert!((690..770).contains(&x) && (40..64).contains(&y), "{x}, {y}");
        assert!(raw.map.get(100, 100) < 1e-6);
        // A detector's own image score: the largest over the tiles.
        let given = Brightness { given: true }
            .inspect_tiled(Some(&tiling), &image)
            .unwrap();
        assert!((given.score - 10.8).abs() < 1e-6);
    }
}
