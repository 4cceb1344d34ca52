//! The normal images dealt into folds for cross-fitted calibration, and how
//! each fold's scores were made: plain data that detectors keep and model
//! files record. Scoring the folds is [`crate::crossfit`].

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use crate::Error;

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
        let mut of_image = vec![0; paths.len()];
        let mut rank = vec![0; paths.len()];
        for (place, image) in hash_order(paths).into_iter().enumerate() {
            of_image[image] = place % count;
            rank[image] = place;
        }
        Ok(Self {
            count,
            of_image,
            rank,
        })
    }

    /// Deals images into folds by group: every image of a group lands in
    /// the same fold (the augmented views of one few-shot image, so a fold
    /// is scored by a detector that saw no view of it). Groups are dealt
    /// round robin in the hash order of their first image. With fewer than
    /// 2 groups there is nothing to leave out by group, and the images are
    /// dealt one by one as [`Folds::deal`] does (leave-views-out).
    pub fn grouped(paths: &[PathBuf], groups: &[usize], count: usize) -> Result<Self, Error> {
        let mut folds = Self::deal(paths, count)?;
        if groups.len() != paths.len() {
            return Err(Error::InvalidConfig(format!(
                "{} groups given for {} images",
                groups.len(),
                paths.len()
            )));
        }
        let mut order: Vec<usize> = Vec::new();
        for image in hash_order(paths) {
            if !order.contains(&groups[image]) {
                order.push(groups[image]);
            }
        }
        if order.len() < 2 {
            return Ok(folds);
        }
        folds.count = count.clamp(2, order.len());
        for (image, group) in groups.iter().enumerate() {
            let place = order.iter().position(|g| g == group).unwrap_or(0);
            folds.of_image[image] = place % folds.count;
        }
        Ok(folds)
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

    /// Image `image`'s place in the hash order (0 first).
    pub fn rank(&self, image: usize) -> usize {
        self.rank[image]
    }

    /// Whether image `image` is among the first `n` in hash order.
    pub fn is_among_first(&self, image: usize, n: usize) -> bool {
        self.rank[image] < n
    }
}

/// The indices of `paths` in the order of a stable hash of their file names
/// (the same whatever folder they are in or the order they are listed).
pub fn hash_order(paths: &[PathBuf]) -> Vec<usize> {
    let mut keyed: Vec<(u64, usize)> = paths
        .iter()
        .enumerate()
        .map(|(i, p)| {
            let name = p.file_name().unwrap_or(p.as_os_str());
            (stable_hash(&name.to_string_lossy()), i)
        })
        .collect();
    keyed.sort();
    keyed.into_iter().map(|(_, i)| i).collect()
}

/// FNV-1a: stable across platforms and Rust versions.
pub(crate) fn stable_hash(text: &str) -> u64 {
    text.bytes().fold(0xcbf2_9ce4_8422_2325, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
    })
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
    fn grouped_folds_keep_each_group_together() {
        let paths: Vec<PathBuf> = (0..24)
            .map(|i| PathBuf::from(format!("d/{i}.png")))
            .collect();
        let groups: Vec<usize> = (0..24).map(|i| i / 8).collect();
        let folds = Folds::grouped(&paths, &groups, 10).unwrap();
        assert_eq!(folds.count(), 3);
        for (i, group) in groups.iter().enumerate() {
            assert_eq!(folds.of(i), folds.of(group * 8));
        }
        // One group: nothing to leave out by group, so view by view.
        let one = Folds::grouped(&paths[..8], &groups[..8], 10).unwrap();
        assert_eq!(one.count(), 8);
        assert!(Folds::grouped(&paths, &groups[..3], 10).is_err());
    }
}
