//! Cross-fitting: an out-of-sample score for every normal image, so the
//! threshold and its false-alarm estimate rest on all N normal images, not
//! on a held-back tenth of them.
//!
//! The images are dealt into K folds by a hash of their file names (stable
//! across runs and moves). Each fold is scored by a detector that never saw
//! it, as a new image would be. Memory banks get that detector by dropping
//! the fold's rows from the bank fitted on all images, Gaussians by leaving
//! the fold's sums out ([`Detector::without_fold`]); other detectors are
//! fitted again on the other folds. The model keeps the detector fitted on
//! all images, so its new-image scores are, if anything, slightly lower
//! than the out-of-fold ones (the threshold errs to the safe side).

use std::path::PathBuf;

use image::Rgb32FImage;
use rayon::prelude::*;
use serde::{Deserialize, Serialize};

use crate::Error;
use crate::detector::{Detector, DetectorConfig, FitInputs};
use crate::images::load_image;
use crate::synthetic::{DefectKind, with_defect};
use crate::tiling;

/// Normal images dealt into folds.
#[derive(Debug, Clone)]
pub struct Folds {
    count: usize,
    /// The fold of each image, in the order given.
    of_image: Vec<usize>,
    /// Each image's place in the hash order (0 first).
    rank: Vec<usize>,
}

impl Folds {
    /// Deals `paths` into `count` folds (at most one per image) in the order
    /// of a stable hash of their file names, round robin, so fold sizes
    /// differ by at most one.
    pub fn deal(paths: &[PathBuf], count: usize) -> Result<Self, Error> {
        if paths.len() < 2 {
            return Err(Error::InvalidConfig(format!(
                "need at least 2 normal images (each is scored by a detector fitted on the \
                 others), got {}",
                paths.len()
            )));
        }
        let count = count.clamp(2, paths.len());
        let mut order: Vec<(u64, usize)> = paths
            .iter()
            .enumerate()
            .map(|(i, p)| {
                let name = p.file_name().unwrap_or(p.as_os_str());
                (stable_hash(&name.to_string_lossy()), i)
            })
            .collect();
        order.sort();
        let mut of_image = vec![0; paths.len()];
        let mut rank = vec![0; paths.len()];
        for (place, (_, image)) in order.iter().enumerate() {
            of_image[*image] = place % count;
            rank[*image] = place;
        }
        Ok(Self {
            count,
            of_image,
            rank,
        })
    }

    pub fn count(&self) -> usize {
        self.count
    }

    /// The fold of image `image` (its index in the paths dealt).
    pub fn of(&self, image: usize) -> usize {
        self.of_image[image]
    }

    /// The images of `fold`, in the order given.
    pub fn members(&self, fold: usize) -> Vec<usize> {
        (0..self.of_image.len())
            .filter(|i| self.of_image[*i] == fold)
            .collect()
    }

    /// Whether image `image` is among the first `n` in hash order.
    fn is_among_first(&self, image: usize, n: usize) -> bool {
        self.rank[image] < n
    }
}

/// FNV-1a: stable across platforms and Rust versions.
pub(crate) fn stable_hash(text: &str) -> u64 {
    text.bytes().fold(0xcbf2_9ce4_8422_2325, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
    })
}

/// How many normal images also get synthetic defects pasted in (one per
/// kind): a tenth, at least 30 (or all), at most 300. The missed-alarm
/// estimate needs far fewer images than the false-alarm one, and each costs
/// three more scorings.
pub fn synthetic_images(normal: usize) -> usize {
    normal.div_ceil(10).max(normal.min(30)).min(300)
}

/// How the calibration scores were made, as model files record it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Procedure {
    /// One bank fitted on all images; each fold scored against the bank
    /// without the fold's rows.
    BankFolds,
    /// One pass of sums; each fold scored by the Gaussians of the others.
    GaussianFolds,
    /// The detector fitted again on the other folds for each fold.
    Refit,
    /// A fraction of the images held back (files written before
    /// cross-fitting).
    Holdout,
}

impl Procedure {
    pub fn describe(self, folds: usize) -> String {
        match self {
            Self::BankFolds => format!(
                "{folds}-fold cross-fit: each fold scored against the bank without its rows"
            ),
            Self::GaussianFolds => {
                format!("{folds}-fold cross-fit: each fold scored by the other folds' Gaussians")
            }
            Self::Refit => {
                format!("{folds}-fold cross-fit: the detector fitted again without each fold")
            }
            Self::Holdout => "held-back images (fitted before cross-fitting)".to_owned(),
        }
    }
}

/// Out-of-sample raw scores of the normal images and of synthetic defects
/// pasted into some of them.
#[derive(Debug, Clone)]
pub struct OutOfFold {
    /// One per normal image, in the order given.
    pub normal: Vec<f32>,
    /// Per kind, one per image that got synthetic defects.
    pub synthetic: Vec<(DefectKind, Vec<f32>)>,
    pub procedure: Procedure,
    pub folds: usize,
}

/// Scores every image of `normal` with a detector that did not see it.
/// `fitted` was fitted on all of `normal` with `folds`; `inputs` are the
/// inputs it was fitted with.
pub fn score_out_of_fold(
    config: &DetectorConfig,
    fitted: &dyn Detector,
    inputs: &FitInputs<'_>,
    folds: &Folds,
) -> Result<OutOfFold, Error> {
    let normal = inputs.normal;
    let progress = inputs.progress;
    let with_synthetic = synthetic_images(normal.len());
    let mut normal_scores = vec![0f32; normal.len()];
    let mut synthetic: Vec<(DefectKind, Vec<(usize, f32)>)> =
        DefectKind::ALL.iter().map(|k| (*k, Vec::new())).collect();
    let mut procedure = None;
    for fold in 0..folds.count() {
        let members = folds.members(fold);
        let derived = fitted.without_fold(fold)?;
        let refitted;
        let (scorer, how): (&dyn Detector, Procedure) = match &derived {
            Some((detector, how)) => (detector.as_ref(), *how),
            None => {
                let others: Vec<PathBuf> = (0..normal.len())
                    .filter(|i| folds.of(*i) != fold)
                    .map(|i| normal[i].clone())
                    .collect();
                refitted = config.fit(&FitInputs {
                    normal: &others,
                    folds: None,
                    ..*inputs
                })?;
                (refitted.as_ref(), Procedure::Refit)
            }
        };
        procedure = Some(how);
        progress.start(
            &format!("calibration: fold {} of {}", fold + 1, folds.count()),
            members.len() as u64,
        );
        let inspect = |image: &Rgb32FImage| -> Result<f32, Error> {
            Ok(tiling::inspect_raw(scorer, inputs.tiling.as_ref(), image)?.score)
        };
        // Two images at a time: the detector's own work shares the threads,
        // and each image holds only its decoded pixels and buffers.
        let scored: Vec<(usize, f32, Vec<f32>)> = members
            .par_iter()
            .map(|&i| {
                let image = load_image(&normal[i], inputs.limits)?;
                let own = inspect(&image)?;
                let pasted = if folds.is_among_first(i, with_synthetic) {
                    DefectKind::ALL
                        .iter()
                        .map(|kind| inspect(&with_defect(&image, *kind, folds.rank[i])))
                        .collect::<Result<Vec<_>, _>>()?
                } else {
                    Vec::new()
                };
                progress.advance(1);
                Ok((i, own, pasted))
            })
            .collect::<Result<_, Error>>()?;
        progress.finish();
        for (i, own, pasted) in scored {
            normal_scores[i] = own;
            for ((_, list), score) in synthetic.iter_mut().zip(pasted) {
                list.push((folds.rank[i], score));
            }
        }
    }
    Ok(OutOfFold {
        normal: normal_scores,
        synthetic: synthetic
            .into_iter()
            .map(|(kind, mut list)| {
                list.sort_by_key(|(rank, _)| *rank);
                (kind, list.into_iter().map(|(_, s)| s).collect())
            })
            .collect(),
        procedure: procedure.unwrap_or(Procedure::Refit),
        folds: folds.count(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn folds_are_stable_balanced_and_cover_every_image() {
        let paths: Vec<PathBuf> = (0..53)
            .map(|i| PathBuf::from(format!("d/{i}.png")))
            .collect();
        let folds = Folds::deal(&paths, 10).unwrap();
        let sizes: Vec<usize> = (0..10).map(|f| folds.members(f).len()).collect();
        assert_eq!(sizes.iter().sum::<usize>(), 53);
        assert!(sizes.iter().all(|s| *s == 5 || *s == 6), "{sizes:?}");
        // Moving the folder or reordering the list keeps each image's fold.
        let mut moved: Vec<PathBuf> = (0..53)
            .map(|i| PathBuf::from(format!("elsewhere/{i}.png")))
            .collect();
        moved.reverse();
        let again = Folds::deal(&moved, 10).unwrap();
        for i in 0..53 {
            assert_eq!(folds.of(i), again.of(52 - i));
        }
        assert_eq!(Folds::deal(&paths[..3], 10).unwrap().count(), 3);
        assert!(Folds::deal(&paths[..1], 10).is_err());
    }

    #[test]
    fn synthetic_subset_is_bounded() {
        assert_eq!(synthetic_images(4), 4);
        assert_eq!(synthetic_images(100), 30);
        assert_eq!(synthetic_images(763), 77);
        assert_eq!(synthetic_images(10_000), 300);
    }
}
