//! Tiling: scoring images much larger than a detector's input, or far from
//! square, at (near) their native resolution.
//!
//! Without tiling every image is shrunk to the detector's input (about 224²
//! or 256²), so a crack a few pixels thick in a 1 000-px image, or anything
//! in a 4 096 × 256 strip, falls below one grid cell. With a [`Tiling`] of
//! side `T`, an image is cut into overlapping `T × T` tiles (at most 25 %
//! overlap, the last tile flush with the edge; a side shorter than `T` is one
//! tile of that side), every tile is scored by the detector at its own input
//! size, and the tiles' maps are stitched into one map at the image's size,
//! averaged where they overlap. The detector is fitted on the tiles of the
//! normal images, so tile and training statistics match.
//!
//! The image score is the largest tile image score when the detector computes
//! its own (PatchCore's reweighted maximum, WinCLIP), else the peak of the
//! stitched map (PaDiM, flow, recon) — in both cases what the detector would
//! report for the worst tile.
//!
//! Detectors on CNN patch features (PatchCore, PaDiM) do not run the
//! backbone once per tile: with a tile side that is a multiple of
//! [`SHARED_ALIGN`] they cut the tiles' grids from shared passes over whole
//! bands of the image ([`crate::features::FeatureExtractor::tile_grids`]),
//! tiles then start on multiples of [`SHARED_ALIGN`] over the image padded
//! to them ([`Tiling::aligned_tiles`]), so the work follows the image's
//! pixels instead of the tiles' overlap; other detectors cut each tile out.
//!
//! This file cuts images into tiles; scoring and stitching them is
//! [`Detector::inspect_tiled`](crate::detector::Detector::inspect_tiled).
//!
//! Cost: time grows linearly with the image area; the stitched map needs 8
//! bytes per image pixel beside the decoded image (12 bytes per pixel). The
//! tile count per image is bounded by [`MAX_TILES`].

use std::path::PathBuf;

use image::Rgb32FImage;
use serde::{Deserialize, Serialize};

use crate::Error;
use crate::images::{ImageLimits, image_dimensions, load_image};

/// Most tiles one image may be cut into (a 40-megapixel image in 224-px
/// tiles needs about 1 400).
pub const MAX_TILES: usize = 4096;
/// Smallest tile side.
pub const MIN_TILE_SIDE: u32 = 32;
/// Largest tile side (the backbone's largest input).
pub const MAX_TILE_SIDE: u32 = 2048;
/// The automatic rule tiles when the typical normal image's short side is
/// more than this many times the detector's input side…
pub const AUTO_SIDE_FACTOR: f64 = 2.0;
/// …or its long side is more than this many times its short side.
pub const AUTO_ASPECT: f64 = 2.0;

/// The automatic choice tiles only when the tiled view separates synthetic
/// defects from normal images by more than this (mean AUROC), else the
/// untiled view, many times cheaper, is kept.
pub const AUTO_MARGIN: f64 = 0.005;

/// A whole-image separation above this leaves synthetic defects nothing to
/// show: a tie between the views then keeps the whole image alone.
pub const AUTO_SETTLED: f64 = 0.99;

/// Fewest normal images for the evidence to decide: with fewer, each kind
/// of synthetic defect is a handful of scores, and the size rule decides
/// alone (tiles).
pub const AUTO_MIN_IMAGES: usize = 10;

/// Why an automatic fit did or did not tile: how well each view tells
/// out-of-fold normal images from synthetic defects (AUROC; local kinds and
/// global kinds averaged apart, then the two averages). Stored in the model.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct TilingDecision {
    /// The tile side tried.
    pub side: u32,
    pub untiled: ViewSeparation,
    pub tiled: ViewSeparation,
    /// The tiles and the whole image together ([`ViewScales`]); absent in
    /// files written before the two views could be kept together.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub both: Option<ViewSeparation>,
    /// Images are scored in tiles (alone, or beside the whole image).
    pub tiled_chosen: bool,
    /// The whole image is scored beside the tiles.
    #[serde(default)]
    pub whole_kept: bool,
}

/// One view's separation of normal images from synthetic defects.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct ViewSeparation {
    /// Mean AUROC over the local kinds (cut-paste, blotch, scratch).
    pub local: f64,
    /// Mean AUROC over the global kinds (missing piece, moved piece).
    pub global: f64,
}

impl ViewSeparation {
    /// Local and global weigh the same, however many kinds each has.
    pub fn overall(&self) -> f64 {
        (self.local + self.global) / 2.0
    }

    /// The separation of `normal` scores from each kind's `synthetic`
    /// scores; `None` when either is missing.
    pub fn measure(
        normal: &[f32],
        synthetic: &[(crate::synthetic::DefectKind, Vec<f32>)],
    ) -> Option<Self> {
        let mean_auroc = |global: bool| -> Option<f64> {
            let values: Vec<f64> = synthetic
                .iter()
                .filter(|(kind, scores)| kind.is_global() == global && !scores.is_empty())
                .filter_map(|(_, scores)| {
                    let all: Vec<f32> = normal.iter().chain(scores).copied().collect();
                    let labels: Vec<bool> = (0..all.len()).map(|i| i >= normal.len()).collect();
                    crate::metrics::image_auroc(&all, &labels).ok()
                })
                .collect();
            (!values.is_empty()).then(|| values.iter().sum::<f64>() / values.len() as f64)
        };
        Some(Self {
            local: mean_auroc(false)?,
            global: mean_auroc(true)?,
        })
    }
}

/// The views an automatic fit may keep.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum View {
    Whole,
    Tiles,
    Both,
}

impl TilingDecision {
    /// The tiles (with the whole image beside them, `both`) are kept when
    /// they separate better than the whole image alone by more than
    /// [`AUTO_MARGIN`], or tie with it while the whole image's own
    /// separation falls short of [`AUTO_SETTLED`]: synthetic defects the
    /// whole view already separates leave nothing to gain. Of the two
    /// tiled views, `both` is kept unless the tiles alone beat it by more
    /// than the margin: it keeps the part as a whole in view, which tiles
    /// lose.
    pub fn new(
        side: u32,
        untiled: ViewSeparation,
        tiled: ViewSeparation,
        both: Option<ViewSeparation>,
    ) -> Self {
        let best_tiled = both.map_or(tiled.overall(), |b| b.overall().max(tiled.overall()));
        let tiles_win = best_tiled > untiled.overall() + AUTO_MARGIN
            || (best_tiled >= untiled.overall() - AUTO_MARGIN
                && untiled.overall() < AUTO_SETTLED
                && both.is_some());
        // Both views stay when the tiles alone gain nothing over them, or
        // when both together already separate (nearly) every synthetic
        // defect: the whole view then guards against global defects the
        // synthetic ones stand for only roughly, at the cost of one pass.
        let whole_kept = tiles_win
            && both.is_some_and(|b| {
                tiled.overall() <= b.overall() + AUTO_MARGIN || b.overall() >= AUTO_SETTLED
            });
        Self {
            side,
            untiled,
            tiled,
            both,
            tiled_chosen: tiles_win,
            whole_kept,
        }
    }

    /// The view kept.
    pub fn view(&self) -> View {
        match (self.tiled_chosen, self.whole_kept) {
            (false, _) => View::Whole,
            (true, false) => View::Tiles,
            (true, true) => View::Both,
        }
    }

    /// `tiled: …` for the fit's report.
    pub fn describe(&self) -> String {
        let view = |v: &ViewSeparation| {
            format!(
                "AUROC {:.3} (local {:.3}, global {:.3})",
                v.overall(),
                v.local,
                v.global
            )
        };
        let both = self
            .both
            .map(|b| format!(", both together {}", view(&b)))
            .unwrap_or_default();
        format!(
            "{}: on synthetic defects, untiled {} against tiles of {} px {}{both}",
            match self.view() {
                View::Whole => "left untiled",
                View::Tiles => "tiled",
                View::Both => "tiled, with the whole image beside the tiles",
            },
            view(&self.untiled),
            self.side,
            view(&self.tiled)
        )
    }
}

/// Puts the raw scores of two views on one scale and averages them into the
/// image's score (and, pixel by pixel, its map): each view's score is
/// measured in its own calibration's spreads from its own threshold, so both
/// views sit at 0 at their thresholds and at −1 at their medians. The mean,
/// not the larger, because a tile view's rare high score on a normal image
/// (the largest of many tiles) is then damped by an unremarkable whole
/// view, while a part missing as a whole lifts the whole view by many
/// spreads (on the flanges of `demo/parts` the larger of the two lost 0.056
/// image AUROC, the mean none). Stored in the model when both are kept.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct ViewScales {
    pub tiles: Scale,
    pub whole: Scale,
}

/// `(raw − threshold) / spread` of one view.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Scale {
    pub threshold: f32,
    pub spread: f32,
}

impl Scale {
    /// The scale of a view calibrated as `calibration`.
    pub fn of(calibration: &crate::calibration::Calibration) -> Self {
        Self {
            threshold: calibration.threshold,
            spread: calibration.spread,
        }
    }

    pub fn apply(&self, raw: f32) -> f32 {
        (raw - self.threshold) / self.spread.max(f32::EPSILON)
    }
}

impl ViewScales {
    /// One score from the two views' raw scores.
    pub fn fuse(&self, tiles: f32, whole: f32) -> f32 {
        0.5 * (self.tiles.apply(tiles) + self.whole.apply(whole))
    }
}

/// How a model cuts images into tiles; stored in the model file.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Tiling {
    /// Tile side in image pixels.
    pub side: u32,
}

/// What a user asked for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum TileChoice {
    /// Tile by the documented rule ([`TileChoice::resolve`]).
    #[default]
    Auto,
    Off,
    Side(u32),
    /// Tiles of this side with the whole image scored beside them (what
    /// `refit` keeps of an automatic fit that chose both).
    SideAndWhole(u32),
}

/// One tile: its top-left corner and size in image pixels.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TileRect {
    pub x: u32,
    pub y: u32,
    pub width: u32,
    pub height: u32,
}

impl TileRect {
    /// Whether `other` lies inside this rectangle.
    pub fn contains(&self, other: &TileRect) -> bool {
        other.x >= self.x
            && other.y >= self.y
            && other.x + other.width <= self.x + self.width
            && other.y + other.height <= self.y + self.height
    }
}

impl Tiling {
    /// A tiling of side `side`, checked.
    pub fn new(side: u32) -> Result<Self, Error> {
        if !(MIN_TILE_SIDE..=MAX_TILE_SIDE).contains(&side) {
            return Err(Error::InvalidConfig(format!(
                "the tile side must be between {MIN_TILE_SIDE} and {MAX_TILE_SIDE} pixels, got {side}"
            )));
        }
        Ok(Self { side })
    }

    /// The tiles covering a `width × height` image, row by row; an error
    /// when there would be more than [`MAX_TILES`].
    pub fn tiles(&self, width: u32, height: u32) -> Result<Vec<TileRect>, Error> {
        let xs = axis_starts(width, self.side);
        let ys = axis_starts(height, self.side);
        let size = (self.side.min(width), self.side.min(height));
        self.rects((width, height), &xs, &ys, size)
    }

    /// Whether the tiles of a `width × height` image can be cut from shared
    /// backbone passes ([`Tiling::aligned_tiles`]): tiles a multiple of
    /// [`SHARED_ALIGN`] on an image at least one tile in each direction.
    pub fn shareable(&self, width: u32, height: u32) -> bool {
        self.side.is_multiple_of(SHARED_ALIGN) && width >= self.side && height >= self.side
    }

    /// The tiles of a `width × height` image for shared backbone passes:
    /// every start a multiple of [`SHARED_ALIGN`], so each tile's patch grid
    /// is a window of the pass's grid, over the image padded at the right
    /// and bottom to a multiple of [`SHARED_ALIGN`] ([`pad_edges`]); returns
    /// the padded size and the tiles (row by row, overlapping by about a
    /// quarter like [`Tiling::tiles`]).
    pub fn aligned_tiles(
        &self,
        width: u32,
        height: u32,
    ) -> Result<((u32, u32), Vec<TileRect>), Error> {
        let padded = |length: u32| length.div_ceil(SHARED_ALIGN) * SHARED_ALIGN;
        let (pw, ph) = (padded(width), padded(height));
        let aligned = |length: u32| {
            let mut starts: Vec<u32> = axis_starts(length, self.side)
                .into_iter()
                .map(|s| (s + SHARED_ALIGN / 2) / SHARED_ALIGN * SHARED_ALIGN)
                .map(|s| s.min(length.saturating_sub(self.side)))
                .collect();
            starts.dedup();
            starts
        };
        let side = (self.side, self.side);
        let rects = self.rects((width, height), &aligned(pw), &aligned(ph), side)?;
        Ok(((pw, ph), rects))
    }

    /// Tiles of `(tw, th)` at every start pair, for an image of `(width,
    /// height)`; an error when there would be more than [`MAX_TILES`].
    fn rects(
        &self,
        (width, height): (u32, u32),
        xs: &[u32],
        ys: &[u32],
        (tw, th): (u32, u32),
    ) -> Result<Vec<TileRect>, Error> {
        let count = xs.len().saturating_mul(ys.len());
        if count > MAX_TILES {
            return Err(Error::InvalidConfig(format!(
                "a {width}×{height} image would be cut into {count} tiles of {} px, over the \
                 limit of {MAX_TILES}; use a larger tile side",
                self.side
            )));
        }
        Ok(ys
            .iter()
            .flat_map(|&y| {
                xs.iter().map(move |&x| TileRect {
                    x,
                    y,
                    width: tw,
                    height: th,
                })
            })
            .collect())
    }
}

/// Tile starts of shared passes are multiples of this many pixels: the
/// largest stride of the CNN backbones' stages.
pub const SHARED_ALIGN: u32 = 32;

/// `image` grown to `width × height` (never shrunk) by repeating its last
/// column and row.
pub fn pad_edges(image: &Rgb32FImage, width: u32, height: u32) -> Rgb32FImage {
    let (w, h) = image.dimensions();
    if (w, h) == (width, height) || w == 0 || h == 0 {
        return image.clone();
    }
    Rgb32FImage::from_fn(width.max(w), height.max(h), |x, y| {
        *image.get_pixel(x.min(w - 1), y.min(h - 1))
    })
}

/// Tile starts along one axis of `length`: tiles of `side` overlapping by
/// at most 25 %, the first at 0, the last flush with the end.
fn axis_starts(length: u32, side: u32) -> Vec<u32> {
    if length <= side {
        return vec![0];
    }
    let stride = (side - side / 4).max(1);
    let span = length - side;
    let steps = span.div_ceil(stride);
    (0..=steps)
        .map(|i| ((u64::from(span) * u64::from(i)) / u64::from(steps)) as u32)
        .collect()
}

impl TileChoice {
    /// The tiling for a detector whose input side is `input_side`, fitted on
    /// `normal`. `Auto` tiles (with tiles of `input_side`) when the median
    /// normal image's short side exceeds [`AUTO_SIDE_FACTOR`] × `input_side`
    /// or its aspect ratio exceeds [`AUTO_ASPECT`]; only image headers are
    /// read.
    pub fn resolve(
        self,
        normal: &[PathBuf],
        input_side: u32,
        limits: &ImageLimits,
    ) -> Result<Option<Tiling>, Error> {
        match self {
            Self::Off => Ok(None),
            Self::Side(side) | Self::SideAndWhole(side) => Tiling::new(side).map(Some),
            Self::Auto => {
                let mut shorts = Vec::with_capacity(normal.len());
                let mut aspects = Vec::with_capacity(normal.len());
                for path in normal {
                    let (w, h) = image_dimensions(path, limits)?;
                    let (short, long) = (w.min(h).max(1), w.max(h));
                    shorts.push(short);
                    aspects.push(f64::from(long) / f64::from(short));
                }
                if shorts.is_empty() {
                    return Ok(None);
                }
                shorts.sort_unstable();
                aspects.sort_by(f64::total_cmp);
                let short = shorts[shorts.len() / 2];
                let aspect = aspects[aspects.len() / 2];
                let tile = f64::from(short) > AUTO_SIDE_FACTOR * f64::from(input_side)
                    || aspect > AUTO_ASPECT;
                if tile {
                    Tiling::new(input_side.clamp(MIN_TILE_SIDE, MAX_TILE_SIDE)).map(Some)
                } else {
                    Ok(None)
                }
            }
        }
    }
}

/// The images a detector is fitted on: each file whole, or cut into tiles.
#[derive(Debug, Clone, Copy)]
pub struct ImageSource<'a> {
    pub paths: &'a [PathBuf],
    pub limits: &'a ImageLimits,
    pub tiling: Option<Tiling>,
}

impl ImageSource<'_> {
    /// Calls `f` with the file's index on every image (or every tile of
    /// every image), one file at a time, and `per_file` after each file.
    pub fn for_each(
        &self,
        mut f: impl FnMut(usize, &Rgb32FImage) -> Result<(), Error>,
        per_file: impl FnMut(),
    ) -> Result<(), Error> {
        let tiling = self.tiling;
        self.for_each_file(
            |index, image| match tiling {
                None => f(index, image),
                Some(tiling) => {
                    for rect in tiling.tiles(image.width(), image.height())? {
                        f(index, &crop(image, rect))?;
                    }
                    Ok(())
                }
            },
            per_file,
        )
    }

    /// Calls `f` with the file's index and every whole image, decoded one
    /// at a time, and `per_file` after each file.
    pub fn for_each_file(
        &self,
        mut f: impl FnMut(usize, &Rgb32FImage) -> Result<(), Error>,
        mut per_file: impl FnMut(),
    ) -> Result<(), Error> {
        for (index, path) in self.paths.iter().enumerate() {
            f(index, &load_image(path, self.limits)?)?;
            per_file();
        }
        Ok(())
    }
}

/// The part of `image` under `rect`.
pub fn crop(image: &Rgb32FImage, rect: TileRect) -> Rgb32FImage {
    image::imageops::crop_imm(image, rect.x, rect.y, rect.width, rect.height).to_image()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::synthetic::DefectKind;

    #[test]
    fn the_decision_weighs_local_and_global_defects_alike() {
        let normal: Vec<f32> = (0..10).map(|i| i as f32).collect();
        // Local kinds far above every normal score, global ones among them.
        let sharp_but_blind = vec![
            (DefectKind::CutPaste, vec![20.0; 4]),
            (DefectKind::Blotch, vec![20.0; 4]),
            (DefectKind::Scratch, vec![20.0; 4]),
            (DefectKind::MissingPiece, vec![0.5, 2.5, 4.5, 6.5]),
            (DefectKind::MovedPiece, vec![0.5, 2.5, 4.5, 6.5]),
        ];
        let tiled = ViewSeparation::measure(&normal, &sharp_but_blind).unwrap();
        assert_eq!(tiled.local, 1.0);
        // Each global score beats 1, 3, 5 and 7 of the ten normal ones.
        assert!((tiled.global - 0.4).abs() < 1e-12, "{tiled:?}");
        let whole = ViewSeparation {
            local: 0.9,
            global: 0.9,
        };
        // 0.7 overall against 0.9: the whole view stays.
        let decision = TilingDecision::new(224, whole, tiled, None);
        assert!(!decision.tiled_chosen);
        assert!(decision.describe().starts_with("left untiled"));
        // Without the two views together, tiles win only by more than the
        // margin.
        let better = ViewSeparation {
            local: 0.9 + AUTO_MARGIN,
            global: 0.9 + AUTO_MARGIN,
        };
        assert!(!TilingDecision::new(224, whole, better, None).tiled_chosen);
        let clearly = ViewSeparation {
            local: 0.99,
            global: 0.9,
        };
        let d = TilingDecision::new(224, whole, clearly, None);
        assert_eq!(d.view(), View::Tiles);
        // With them, a tie keeps both while the whole view leaves room…
        let d = TilingDecision::new(224, whole, better, Some(better));
        assert_eq!(d.view(), View::Both);
        assert!(d.describe().contains("whole image beside the tiles"));
        // …but not once the whole view already separates every defect.
        let settled = ViewSeparation {
            local: 1.0,
            global: 0.995,
        };
        let d = TilingDecision::new(224, settled, settled, Some(settled));
        assert_eq!(d.view(), View::Whole);
        // Tiles alone only when they beat both together by the margin.
        let d = TilingDecision::new(224, whole, clearly, Some(better));
        assert_eq!(d.view(), View::Tiles);
        let d = TilingDecision::new(224, whole, clearly, Some(clearly));
        assert_eq!(d.view(), View::Both);
        // Nor when both together already separate (nearly) every defect,
        // however perfect the tiles alone look.
        let perfect = ViewSeparation {
            local: 1.0,
            global: 1.0,
        };
        let nearly = ViewSeparation {
            local: 0.995,
            global: 0.99,
        };
        let d = TilingDecision::new(224, whole, perfect, Some(nearly));
        assert_eq!(d.view(), View::Both);
        // No global defects scored: no decision.
        assert!(ViewSeparation::measure(&normal, &sharp_but_blind[..3]).is_none());
    }

    #[test]
    fn two_views_flag_where_either_would() {
        let scales = ViewScales {
            tiles: Scale {
                threshold: 10.0,
                spread: 2.0,
            },
            whole: Scale {
                threshold: 1.0,
                spread: 0.5,
            },
        };
        // At its own threshold each view sits at 0 on the shared scale.
        assert_eq!(scales.tiles.apply(10.0), 0.0);
        assert_eq!(scales.whole.apply(1.0), 0.0);
        assert_eq!(scales.fuse(10.0, 1.0), 0.0);
        // One view far above its threshold outweighs the other at its median…
        assert_eq!(scales.fuse(8.0, 3.0), 1.5);
        // …a little above it does not.
        assert_eq!(scales.fuse(11.0, 0.5), -0.25);
    }

    #[test]
    fn tiles_cover_the_image_with_bounded_overlap() {
        let t = Tiling::new(256).unwrap();
        let tiles = t.tiles(4096, 256).unwrap();
        assert_eq!(tiles.first().map(|r| r.x), Some(0));
        let last = tiles.last().unwrap();
        assert_eq!(last.x + last.width, 4096);
        for pair in tiles.windows(2) {
            let overlap = pair[0].x + pair[0].width - pair[1].x;
            assert!(overlap > 0 && overlap <= 64, "{overlap}");
        }
        // A side shorter than the tile is one tile of that side.
        let small = t.tiles(100, 1000).unwrap();
        assert!(small.iter().all(|r| r.width == 100 && r.height == 256));
        assert_eq!(t.tiles(256, 256).unwrap().len(), 1);
        // The count is bounded.
        let tiny = Tiling::new(32).unwrap();
        assert!(tiny.tiles(6000, 6000).is_err());
        assert!(Tiling::new(8).is_err());
    }

    #[test]
    fn aligned_tiles_start_on_the_grid_and_cover_the_padded_image() {
        let tiling = Tiling::new(224).unwrap();
        for (w, h) in [(500, 1250), (4096, 256), (300, 300), (224, 225)] {
            let ((pw, ph), rects) = tiling.aligned_tiles(w, h).unwrap();
            assert_eq!((pw % 32, ph % 32), (0, 0));
            assert!(pw >= w && pw < w + 32 && ph >= h && ph < h + 32);
            let mut covered = vec![false; (pw * ph) as usize];
            for r in &rects {
                assert_eq!((r.x % 32, r.y % 32), (0, 0), "{w}×{h}: {r:?}");
                assert!(r.x + r.width <= pw && r.y + r.height <= ph);
                for y in r.y..r.y + r.height {
                    for x in r.x..r.x + r.width {
                        covered[(y * pw + x) as usize] = true;
                    }
                }
            }
            assert!(covered.iter().all(|&c| c), "{w}×{h}");
            // No more tiles than the unaligned layout needs, plus a row or
            // column at most.
            let plain = tiling.tiles(w, h).unwrap().len();
            assert!(
                rects.len() <= plain + plain.isqrt() + 2,
                "{w}×{h}: {}",
                rects.len()
            );
        }
        let padded = pad_edges(&Rgb32FImage::from_pixel(3, 2, image::Rgb([0.5; 3])), 5, 4);
        assert_eq!(padded.dimensions(), (5, 4));
        assert_eq!(padded.get_pixel(4, 3).0, [0.5; 3]);
    }

    #[test]
    fn the_automatic_rule_tiles_large_and_elongated_images_only() {
        let dir = tempfile::tempdir().unwrap();
        let write = |name: &str, w: u32, h: u32| {
            let path = dir.path().join(name);
            image::GrayImage::new(w, h).save(&path).unwrap();
            path
        };
        let limits = ImageLimits::default();
        let square = vec![write("a.png", 300, 300), write("b.png", 320, 300)];
        let strip = vec![write("c.png", 1000, 100), write("d.png", 900, 100)];
        let large = vec![write("e.png", 600, 500)];
        let auto = TileChoice::Auto;
        assert_eq!(auto.resolve(&square, 224, &limits).unwrap(), None);
        assert_eq!(
            auto.resolve(&strip, 224, &limits).unwrap(),
            Some(Tiling { side: 224 })
        );
        assert_eq!(
            auto.resolve(&large, 224, &limits).unwrap(),
            Some(Tiling { side: 224 })
        );
        assert_eq!(auto.resolve(&large, 256, &limits).unwrap(), None);
        assert_eq!(TileChoice::Off.resolve(&strip, 224, &limits).unwrap(), None);
        assert_eq!(
            TileChoice::Side(300)
                .resolve(&square, 224, &limits)
                .unwrap(),
            Some(Tiling { side: 300 })
        );
        assert_eq!(auto.resolve(&[], 224, &limits).unwrap(), None);
    }
}
