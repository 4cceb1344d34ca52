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

use crate::Error;
use crate::detector::{Detector, FitInputs};
use crate::detectors::DetectorConfig;
use crate::folds::{Folds, Procedure};
use crate::images::load_image;
use crate::synthetic::{DefectKind, with_defect};

/// How many normal images also get synthetic defects pasted in (one per
/// kind): a tenth, at least 30 (or all), at most 300. The missed-alarm
/// estimate needs far fewer images than the false-alarm one, and each costs
/// five more scorings (one per kind).
pub fn synthetic_images(normal: usize) -> usize {
    normal.div_ceil(10).max(normal.min(30)).min(300)
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
                refitted = config
                    .fit(&FitInputs {
                        normal: &others,
                        folds: None,
                        ..*inputs
                    })?
                    .detector;
                (refitted.as_ref(), Procedure::Refit)
            }
        };
        procedure = Some(how);
        progress.start(
            &format!("calibration: fold {} of {}", fold + 1, folds.count()),
            members.len() as u64,
        );
        let inspect = |image: &Rgb32FImage| -> Result<f32, Error> {
            Ok(scorer.inspect_tiled(inputs.tiling.as_ref(), image)?.score)
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
                        .map(|kind| inspect(&with_defect(&image, *kind, folds.rank(i))))
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
                list.push((folds.rank(i), score));
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
    fn synthetic_subset_is_bounded() {
        assert_eq!(synthetic_images(4), 4);
        assert_eq!(synthetic_images(100), 30);
        assert_eq!(synthetic_images(763), 77);
        assert_eq!(synthetic_images(10_000), 300);
    }
}
