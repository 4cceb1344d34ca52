//! Few-shot fitting: a detector fitted on the first K normal images (by
//! path), with the eight rotations and flips of each image for the methods
//! that call for them, and a threshold that says how little K images can
//! confirm.
//!
//! A memory bank (PatchCore) only holds what it was shown, so every view of
//! the dihedral group (rotations by 90°, and the same after a flip) joins
//! it: a part that lies turned or mirrored still finds its texture there.
//! PaDiM's per-position Gaussians need many samples per position; the views
//! give it eight per image, and its existing covariance shrinkage keeps the
//! rest well-posed (the views also blur its position-specific statistics,
//! which matters for aligned parts). Trained detectors (flow, recon,
//! SuperSimpleNet) fit on the images as given: they need at least
//! [`MIN_TRAINED_SHOTS`] (two halves to cross-fit), and few images leave
//! them little to learn.
//!
//! Calibration: with two or more images, the views of one image are kept in
//! one fold ([`Folds::grouped`]), so each image is scored by a detector that
//! saw no view of it. With one image that is impossible, and the folds
//! leave out views instead: the other views of the same image stay in the
//! bank, so those scores are optimistic. Either way the false-alarm
//! estimate rests on K images, and the model says that K cannot confirm the
//! limit asked (the usual warning, stated for K, not for the views).

use std::path::{Path, PathBuf};

use image::{DynamicImage, imageops};
use serde::{Deserialize, Serialize};

use crate::Error;
use crate::detectors::DetectorConfig;
use crate::images::{ImageLimits, load_image};

/// Views made of each image when the method augments: the eight
/// symmetries of a rectangle's pixel grid.
pub const VIEWS: usize = 8;
/// Fewest images a trained detector is fitted on (cross-fitting needs two).
pub const MIN_TRAINED_SHOTS: usize = 2;
/// Most shots: beyond this, fit on the images as usual.
pub const MAX_SHOTS: usize = 1024;

/// What a few-shot fit did, as the model file records it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FewShot {
    /// Normal images fitted on (the first by path).
    pub shots: usize,
    /// Views of each image the detector saw (1: none added).
    pub views_per_image: usize,
    /// How the calibration folds were dealt: by image or by view.
    pub folds_by_image: bool,
}

impl FewShot {
    /// One line for `fit` and reports.
    pub fn describe(&self) -> String {
        let views = if self.views_per_image > 1 {
            format!(
                ", {} rotated/flipped views of each ({} in all)",
                self.views_per_image,
                self.views_per_image * self.shots
            )
        } else {
            String::new()
        };
        let folds = if self.folds_by_image {
            "each image scored by a detector that saw no view of it"
        } else {
            "one image: views left out, not images (optimistic)"
        };
        format!(
            "few-shot: the first {} normal images by path{views}; calibration: {folds}",
            self.shots
        )
    }
}

/// Whether `config` is fitted on the rotated and flipped views.
pub fn augments(config: &DetectorConfig) -> bool {
    matches!(
        config,
        DetectorConfig::PatchCore(_) | DetectorConfig::Padim(_)
    )
}

/// The fewest shots `config` can fit on.
pub fn min_shots(config: &DetectorConfig) -> usize {
    match config {
        DetectorConfig::PatchCore(_) | DetectorConfig::Padim(_) => 1,
        DetectorConfig::WinClip(_) => 0,
        _ => MIN_TRAINED_SHOTS,
    }
}

/// Whether `config` can fit on `shots` images; the error states the range.
pub fn check_shots(shots: usize, config: &DetectorConfig) -> Result<(), Error> {
    let least = min_shots(config);
    if shots < least || shots > MAX_SHOTS {
        return Err(Error::InvalidConfig(format!(
            "the {} detector fits on {least} to {MAX_SHOTS} shots, got {shots}{}",
            config.name(),
            if least == MIN_TRAINED_SHOTS {
                " (it is fitted again on each half of them to calibrate)"
            } else {
                ""
            }
        )));
    }
    Ok(())
}

/// The first `shots` of `paths` in a stable order (sorted by path), after
/// checking that `config` can fit on that many.
pub fn first_shots(
    paths: &[PathBuf],
    shots: usize,
    config: &DetectorConfig,
) -> Result<Vec<PathBuf>, Error> {
    check_shots(shots, config)?;
    if paths.len() < shots {
        return Err(Error::InvalidConfig(format!(
            "{shots} shots asked for, but only {} normal images are readable",
            paths.len()
        )));
    }
    let mut sorted = paths.to_vec();
    sorted.sort();
    sorted.truncate(shots);
    Ok(sorted)
}

/// Writes the [`VIEWS`] views of every image of `paths` into `dir` as
/// 16-bit PNG files; returns them with the index of the image each came
/// from.
pub fn write_views(
    paths: &[PathBuf],
    limits: &ImageLimits,
    dir: &Path,
) -> Result<(Vec<PathBuf>, Vec<usize>), Error> {
    let mut views = Vec::with_capacity(paths.len() * VIEWS);
    let mut groups = Vec::with_capacity(paths.len() * VIEWS);
    for (index, path) in paths.iter().enumerate() {
        let image = DynamicImage::ImageRgb32F(load_image(path, limits)?).to_rgb16();
        for (v, view) in dihedral_views(&image).into_iter().enumerate() {
            let out = dir.join(format!("shot{index:04}-view{v}.png"));
            view.save(&out).map_err(|e| {
                Error::InvalidConfig(format!("writing a view to {}: {e}", out.display()))
            })?;
            views.push(out);
            groups.push(index);
        }
    }
    Ok((views, groups))
}

/// The image, turned by 90°, 180° and 270°, and the same four mirrored.
pub fn dihedral_views<P: image::Pixel + 'static>(
    image: &image::ImageBuffer<P, Vec<P::Subpixel>>,
) -> Vec<image::ImageBuffer<P, Vec<P::Subpixel>>> {
    let mirrored = imageops::flip_horizontal(image);
    let mut views = Vec::with_capacity(VIEWS);
    for base in [image.clone(), mirrored] {
        views.push(imageops::rotate90(&base));
        views.push(imageops::rotate180(&base));
        views.push(imageops::rotate270(&base));
        views.push(base);
    }
    views
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::detectors::patchcore::PatchCoreConfig;

    #[test]
    fn the_eight_views_are_distinct_and_keep_the_pixels() {
        let image = image::GrayImage::from_fn(3, 2, |x, y| image::Luma([(x + 3 * y) as u8]));
        let views = dihedral_views(&image);
        assert_eq!(views.len(), VIEWS);
        for (i, a) in views.iter().enumerate() {
            let mut pixels: Vec<u8> = a.as_raw().clone();
            pixels.sort_unstable();
            assert_eq!(pixels, [0, 1, 2, 3, 4, 5]);
            for b in &views[i + 1..] {
                assert_ne!(a, b);
            }
        }
        assert_eq!(views[3], image);
        assert_eq!(views[0].dimensions(), (2, 3));
    }

    #[test]
    fn shots_are_the_first_by_path_and_bounded() {
        let patchcore = DetectorConfig::PatchCore(PatchCoreConfig::default());
        let paths: Vec<PathBuf> = ["c.png", "a.png", "b.png"]
            .iter()
            .map(PathBuf::from)
            .collect();
        assert_eq!(
            first_shots(&paths, 2, &patchcore).unwrap(),
            [PathBuf::from("a.png"), PathBuf::from("b.png")]
        );
        let too_many = first_shots(&paths, 4, &patchcore).unwrap_err();
        assert!(too_many.to_string().contains("only 3"), "{too_many}");
        let none = first_shots(&paths, 0, &patchcore).unwrap_err();
        assert!(none.to_string().contains("1 to"), "{none}");
        let flow = DetectorConfig::Flow(Default::default());
        let one = first_shots(&paths, 1, &flow).unwrap_err();
        assert!(one.to_string().contains("2 to"), "{one}");
    }
}
