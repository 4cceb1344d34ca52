//! PatchCore (Roth et al., CVPR 2022): a memory bank of normal patch
//! features; a test patch is as anomalous as it is far from its nearest bank
//! vector.
//!
//! Fitting thins all training patches with a greedy k-center coreset (see
//! [`crate::coreset`]). Scoring finds each patch's exact nearest bank row
//! with [`crate::nearest::BankIndex`] on the CPU (a bound on the bank's
//! principal axes skips most rows), and elsewhere computes every distance as
//! `‖q‖² − 2 q·b + ‖b‖²` in matrix products over chunks of the bank. The
//! image score is the largest patch score, reweighted by how isolated its
//! nearest bank vector is among that vector's own nearest neighbours.

use std::collections::{BTreeMap, HashMap};
use std::path::Path;

use candle_core::{DType, Device, Tensor};
use flawscope_models::Stage;
use image::Rgb32FImage;
use rayon::prelude::*;
use serde::{Deserialize, Serialize};

use crate::Error;
use crate::coreset::greedy_coreset;
use crate::detector::{
    Detector, DetectorOutput, FitInputs, FoldDetector, ImageScore, ScoreGrid, TileOutputs,
    score_tiles_with,
};
use crate::features::{
    BorderAveraging, FeatureConfig, FeatureExtractor, PatchGrid, Resize, for_each_grid,
};
use crate::folds::Procedure;
use crate::model_file::take;
use crate::nearest::BankIndex;
use crate::progress::Progress;
use crate::tiling::Tiling;

/// Each bank's cap on tiled fits when no `max_bank` is set: the variety of
/// normal texture does not grow with the number of tiles an image is cut
/// into, but a bank of 10 % of every tile's patches does, and with it the
/// coreset's and every query's cost (an untiled fit on 800 images keeps
/// about this many rows).
pub const TILED_MAX_BANK: usize = 16_384;

/// Bank rows compared with the queries in one matrix product.
const BANK_CHUNK: usize = 8_192;

#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct PatchCoreConfig {
    /// Fraction of training patches kept in the bank.
    pub coreset_ratio: f64,
    /// Hard cap on the bank size, whatever the ratio.
    pub max_bank: Option<usize>,
    /// Dimension of the random projection used for coreset distances.
    pub projection_dim: usize,
    /// Neighbourhood size of the image-score reweighting.
    pub neighbours: usize,
    pub seed: u64,
    /// Input side of a second, coarse scale with a bank of its own; its
    /// image score and map are averaged with the fine ones (it sees broad
    /// defects the fine grid marks only in places; see
    /// [`CoarsePatchCore`]). `None`: one scale. Model files
    /// from before this setting load as `None`.
    #[serde(default)]
    pub coarse_side: Option<u32>,
}

impl Default for PatchCoreConfig {
    fn default() -> Self {
        Self {
            coreset_ratio: 0.1,
            max_bank: None,
            projection_dim: 128,
            neighbours: 9,
            seed: 0,
            coarse_side: Some(128),
        }
    }
}

/// A fitted PatchCore memory bank.
#[derive(Debug, Clone)]
pub struct PatchCore {
    /// `[bank_size, channels]`.
    bank: Tensor,
    /// `[1, bank_size]`: squared norms of the bank rows.
    bank_norms: Tensor,
    /// The exact search index, for a bank on the CPU.
    index: Option<BankIndex>,
    neighbours: usize,
}

/// Patch scores of one image and its image-level score.
#[derive(Debug, Clone, PartialEq)]
pub struct PatchScores {
    /// One score per query row, in query order.
    pub patches: Vec<f32>,
    pub image: f32,
}

impl PatchCore {
    /// Builds the bank from training patches `[n, channels]`.
    pub fn fit(
        patches: &Tensor,
        config: &PatchCoreConfig,
        progress: &dyn Progress,
    ) -> Result<Self, Error> {
        Ok(Self::fit_keeping(patches, config, progress)?.0)
    }

    /// [`PatchCore::fit`], also returning which rows of `patches` the bank
    /// kept, in bank order.
    pub fn fit_keeping(
        patches: &Tensor,
        config: &PatchCoreConfig,
        progress: &dyn Progress,
    ) -> Result<(Self, Vec<usize>), Error> {
        let (n, dim) = patches.dims2()?;
        if n == 0 {
            return Err(Error::InvalidConfig("no training patches".into()));
        }
        if !(config.coreset_ratio > 0.0 && config.coreset_ratio <= 1.0) {
            return Err(Error::InvalidConfig(format!(
                "coreset ratio must be in (0, 1], got {}",
                config.coreset_ratio
            )));
        }
        let mut k = ((n as f64) * config.coreset_ratio).ceil() as usize;
        if let Some(cap) = config.max_bank {
            k = k.min(cap.max(1));
        }
        let (bank, kept) = if k >= n {
            (patches.clone(), (0..n).collect())
        } else {
            let host: Vec<f32> = patches.to_dtype(DType::F32)?.flatten_all()?.to_vec1()?;
            let chosen =
                greedy_coreset(&host, dim, k, config.projection_dim, config.seed, progress);
            let ids: Vec<u32> = chosen.iter().map(|&i| i as u32).collect();
            let ids = Tensor::from_vec(ids, k, patches.device())?;
            (patches.index_select(&ids, 0)?, chosen)
        };
        Ok((Self::from_bank(bank, config.neighbours)?, kept))
    }

    /// The bank of the rows `keep` only; `None` when none is kept.
    pub fn with_rows(&self, keep: &[u32]) -> Result<Option<Self>, Error> {
        if keep.is_empty() {
            return Ok(None);
        }
        let ids = Tensor::from_vec(keep.to_vec(), keep.len(), self.bank.device())?;
        Ok(Some(Self::from_bank(
            self.bank.index_select(&ids, 0)?,
            self.neighbours,
        )?))
    }

    /// Wraps an existing bank `[bank_size, channels]` (as loaded from a file).
    pub fn from_bank(bank: Tensor, neighbours: usize) -> Result<Self, Error> {
        let bank = bank.to_dtype(DType::F32)?.contiguous()?;
        let (size, _) = bank.dims2()?;
        if size == 0 {
            return Err(Error::InvalidConfig("empty memory bank".into()));
        }
        let bank_norms = bank.sqr()?.sum_keepdim(1)?.t()?.contiguous()?;
        let index = if bank.device().is_cpu() {
            Some(BankIndex::new(&bank)?)
        } else {
            None
        };
        Ok(Self {
            bank,
            bank_norms,
            index,
            neighbours: neighbours.max(1),
        })
    }

    pub fn bank(&self) -> &Tensor {
        &self.bank
    }

    pub fn bank_size(&self) -> usize {
        self.bank.dims()[0]
    }

    /// The exact search index (a bank on the CPU has one).
    pub fn index(&self) -> Option<&BankIndex> {
        self.index.as_ref()
    }

    pub fn neighbours(&self) -> usize {
        self.neighbours
    }

    pub fn device(&self) -> &Device {
        self.bank.device()
    }

    /// Scores query patches `[p, channels]`.
    pub fn score(&self, queries: &Tensor) -> Result<PatchScores, Error> {
        let queries = queries.to_dtype(DType::F32)?.contiguous()?;
        let (nearest_dist, nearest_index) = self.nearest(&queries)?;
        let patches: Vec<f32> = nearest_dist.iter().map(|d| d.max(0.0).sqrt()).collect();

        // Reweight the most anomalous patch (PatchCore eq. 7): its score is
        // multiplied by 1 − softmax weight of its nearest bank vector among
        // that vector's own neighbourhood, measured from the test patch.
        let (star, &star_score) = patches
            .iter()
            .enumerate()
            .max_by(|a, b| a.1.total_cmp(b.1))
            .ok_or_else(|| Error::InvalidConfig("no query patches".into()))?;
        let image = star_score * self.isolation_weight(&queries, star, nearest_index[star])?;
        Ok(PatchScores { patches, image })
    }

    /// Squared distance to, and index of, the nearest bank row per query.
    ///
    /// `‖q − b‖² = ‖q‖² − 2 q·b + ‖b‖²`: the products come from one matrix
    /// multiplication per bank chunk, and the rest is one pass over them.
    pub fn nearest(&self, queries: &Tensor) -> Result<(Vec<f32>, Vec<u32>), Error> {
        if let Some(index) = &self.index {
            let found = index.nearest(queries)?;
            return Ok((found.distances, found.indices));
        }
        self.nearest_by_products(queries)
    }

    /// [`Self::nearest`] from all query–bank products (any device).
    pub fn nearest_by_products(&self, queries: &Tensor) -> Result<(Vec<f32>, Vec<u32>), Error> {
        let (p, _) = queries.dims2()?;
        let query_norms: Vec<f32> = queries.sqr()?.sum(1)?.to_vec1()?;
        let bank_norms: Vec<f32> = self.bank_norms.flatten_all()?.to_vec1()?;
        let mut best = vec![(f32::INFINITY, 0u32); p];
        let size = self.bank_size();
        let mut start = 0;
        while start < size {
            let len = BANK_CHUNK.min(size - start);
            let bank = self.bank.narrow(0, start, len)?;
            let dots: Vec<f32> = queries.matmul(&bank.t()?)?.flatten_all()?.to_vec1()?;
            let norms = &bank_norms[start..start + len];
            best.par_iter_mut()
                .zip(dots.par_chunks(len))
                .for_each(|(best, row)| {
                    for (j, (dot, norm)) in row.iter().zip(norms).enumerate() {
                        let partial = norm - 2.0 * dot;
                        if partial < best.0 {
                            *best = (partial, (start + j) as u32);
                        }
                    }
                });
            start += len;
        }
        Ok(best
            .into_iter()
            .zip(query_norms)
            .map(|((partial, index), qn)| (partial + qn, index))
            .unzip())
    }

    fn isolation_weight(&self, queries: &Tensor, star: usize, nearest: u32) -> Result<f32, Error> {
        let k = self.neighbours.min(self.bank_size());
        if k < 2 {
            return Ok(1.0);
        }
        let anchor_d2 = match &self.index {
            Some(index) => index.distances_from_row(nearest as usize),
            None => self.distances_to_bank(&self.bank.narrow(0, nearest as usize, 1)?)?,
        };
        // The k bank rows closest to the anchor (the anchor itself first).
        let mut order: Vec<usize> = (0..anchor_d2.len()).collect();
        order.select_nth_unstable_by(k - 1, |&a, &b| anchor_d2[a].total_cmp(&anchor_d2[b]));
        order.truncate(k);
        if !order.contains(&(nearest as usize)) {
            order[k - 1] = nearest as usize;
        }
        let query = queries.narrow(0, star, 1)?;
        let query_d2 = match &self.index {
            Some(index) => index.distances_from_query(&query, &order)?,
            None => {
                let all = self.distances_to_bank(&query)?;
                order.iter().map(|&i| all[i]).collect()
            }
        };
        let dists: Vec<f32> = query_d2.iter().map(|d| d.max(0.0).sqrt()).collect();
        let anchor_pos = order
            .iter()
            .position(|&i| i == nearest as usize)
            .unwrap_or(0);
        let top = dists.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        let exps: Vec<f32> = dists.iter().map(|d| (d - top).exp()).collect();
        let total: f32 = exps.iter().sum();
        Ok(1.0 - exps[anchor_pos] / total)
    }

    /// Squared distances from one row `[1, c]` to every bank row.
    fn distances_to_bank(&self, row: &Tensor) -> Result<Vec<f32>, Error> {
        let norm = row.sqr()?.sum_all()?.to_scalar::<f32>()?;
        let d2 = row
            .matmul(&self.bank.t()?)?
            .affine(-2.0, f64::from(norm))?
            .broadcast_add(&self.bank_norms)?
            .flatten_all()?
            .to_vec1::<f32>()?;
        Ok(d2)
    }
}

/// PatchCore on the backbone: the fine scale at the configured input size
/// and, when configured, a coarse scale with a bank of its own; the two
/// image scores and the two maps are averaged.
pub struct PatchCoreDetector {
    extractor: FeatureExtractor,
    fine: PatchCore,
    coarse: Option<CoarsePatchCore>,
    /// The fold of the image each fine and coarse bank row came from, when
    /// fitted with folds (until [`Detector::forget_folds`]).
    row_folds: Option<(Vec<u8>, Vec<u8>)>,
}

/// A PatchCore detector's banks without one fold's rows: the detector that
/// scores that fold's images in cross-fitting.
struct PatchCoreWithout<'a> {
    extractor: &'a FeatureExtractor,
    fine: PatchCore,
    coarse: Option<(PatchCore, Resize)>,
}

/// PatchCore's second, coarse scale: a bank built from features at `resize`
/// with inside-only border averaging (see [`crate::features`]).
pub struct CoarsePatchCore {
    bank: PatchCore,
    resize: Resize,
}

impl CoarsePatchCore {
    const BORDER: BorderAveraging = BorderAveraging::InsideOnly;

    /// The coarse scale `config` asks for, if any, for features resized by
    /// `fine` (a square fine input gives a square coarse one).
    fn resize(config: &PatchCoreConfig, fine: Resize) -> Option<Resize> {
        let side = config.coarse_side?;
        Some(match fine {
            Resize::Fixed { .. } => Resize::Fixed {
                width: side,
                height: side,
            },
            Resize::KeepAspect { .. } => Resize::KeepAspect { side },
        })
    }
}

impl PatchCoreConfig {
    /// Stages 4 + 5 at about 224², aspect kept.
    pub fn default_features() -> FeatureConfig {
        FeatureConfig::lite0(
            &[Stage::Stage4, Stage::Stage5],
            Resize::KeepAspect { side: 224 },
        )
    }
}

impl PatchCoreDetector {
    pub fn fit(
        config: &PatchCoreConfig,
        features: &FeatureConfig,
        inputs: &FitInputs<'_>,
    ) -> Result<Self, Error> {
        let extractor = FeatureExtractor::new(features.clone(), inputs.runtime.device())?;
        let coarse_resize = CoarsePatchCore::resize(config, features.resize);
        let config = &PatchCoreConfig {
            max_bank: config.max_bank.or(inputs.tiling.map(|_| TILED_MAX_BANK)),
            ..*config
        };
        let progress = inputs.progress;
        progress.start("features", inputs.normal.len() as u64);
        let mut grids = Vec::with_capacity(inputs.normal.len());
        let mut coarse_grids = Vec::new();
        // The fold of each patch row's image, for cross-fitting.
        let fold_of = |index: usize| inputs.folds.map_or(0, |f| f.of(index) as u8);
        let (mut fine_folds, mut coarse_folds) = (Vec::new(), Vec::new());
        for_each_grid(
            &extractor,
            &inputs.images(),
            |index, image, grid| {
                let features = grid.features;
                fine_folds.extend(std::iter::repeat_n(fold_of(index), features.dims()[0]));
                grids.push(features);
                if let Some(resize) = coarse_resize {
                    let grid = extractor.extract_at(image, resize, CoarsePatchCore::BORDER)?;
                    coarse_folds
                        .extend(std::iter::repeat_n(fold_of(index), grid.features.dims()[0]));
                    coarse_grids.push(grid.features);
                }
                Ok(())
            },
            || progress.advance(1),
        )?;
        progress.finish();
        let all = Tensor::cat(&grids, 0)?;
        drop(grids);
        let (fine, fine_kept) = PatchCore::fit_keeping(&all, config, progress)?;
        drop(all);
        let (coarse, coarse_kept) = match coarse_resize {
            Some(resize) => {
                let (bank, kept) =
                    PatchCore::fit_keeping(&Tensor::cat(&coarse_grids, 0)?, config, progress)?;
                (Some(CoarsePatchCore { bank, resize }), kept)
            }
            None => (None, Vec::new()),
        };
        let row_folds = inputs.folds.map(|_| {
            (
                fine_kept.iter().map(|&i| fine_folds[i]).collect(),
                coarse_kept.iter().map(|&i| coarse_folds[i]).collect(),
            )
        });
        Ok(Self {
            extractor,
            fine,
            coarse,
            row_folds,
        })
    }

    pub fn load(
        config: &PatchCoreConfig,
        features: &FeatureConfig,
        tensors: &mut HashMap<String, Tensor>,
        path: &Path,
        device: &Device,
    ) -> Result<Self, Error> {
        let fine = PatchCore::from_bank(take(tensors, FINE_BANK, path)?, config.neighbours)?;
        let coarse = match CoarsePatchCore::resize(config, features.resize) {
            Some(resize) => Some(CoarsePatchCore {
                bank: PatchCore::from_bank(take(tensors, COARSE_BANK, path)?, config.neighbours)?,
                resize,
            }),
            None => None,
        };
        Ok(Self {
            extractor: FeatureExtractor::new(features.clone(), device)?,
            fine,
            coarse,
            row_folds: None,
        })
    }
}

const FINE_BANK: &str = "patchcore.bank";
const COARSE_BANK: &str = "patchcore.coarse_bank";

/// The fine bank's score and map of `image`, whose fine patch features are
/// `grid`, averaged with the coarse bank's when there is one.
fn score_banks(
    extractor: &FeatureExtractor,
    fine: &PatchCore,
    coarse: Option<(&PatchCore, Resize)>,
    image: &Rgb32FImage,
    grid: PatchGrid,
) -> Result<DetectorOutput, Error> {
    let scores = fine.score(&grid.features)?;
    let mut grids = vec![ScoreGrid::of(&grid, scores.patches)];
    let Some((coarse, resize)) = coarse else {
        return Ok(DetectorOutput {
            image_score: ImageScore::Given(scores.image),
            grids,
        });
    };
    let coarse_grid = extractor.extract_at(image, resize, CoarsePatchCore::BORDER)?;
    let coarse_scores = coarse.score(&coarse_grid.features)?;
    grids.push(ScoreGrid::of(&coarse_grid, coarse_scores.patches));
    Ok(DetectorOutput {
        image_score: ImageScore::Given(0.5 * (scores.image + coarse_scores.image)),
        grids,
    })
}

/// The rows whose fold is not `fold`.
fn rows_outside(folds: &[u8], fold: usize) -> Vec<u32> {
    (0..folds.len() as u32)
        .filter(|&i| usize::from(folds[i as usize]) != fold)
        .collect()
}

impl Detector for PatchCoreWithout<'_> {
    fn score(&self, image: &Rgb32FImage) -> Result<DetectorOutput, Error> {
        let grid = self.extractor.extract(image)?;
        let coarse = self.coarse.as_ref().map(|(bank, resize)| (bank, *resize));
        score_banks(self.extractor, &self.fine, coarse, image, grid)
    }

    fn score_tiles(&self, tiling: &Tiling, image: &Rgb32FImage) -> TileOutputs {
        let coarse = self.coarse.as_ref().map(|(bank, resize)| (bank, *resize));
        score_tiles_with(self.extractor, tiling, image, |tile, grid| {
            score_banks(self.extractor, &self.fine, coarse, tile, grid)
        })
    }

    fn tensors(&self) -> BTreeMap<String, Tensor> {
        BTreeMap::new()
    }
}

impl Detector for PatchCoreDetector {
    fn score(&self, image: &Rgb32FImage) -> Result<DetectorOutput, Error> {
        let grid = self.extractor.extract(image)?;
        let coarse = self.coarse.as_ref().map(|c| (&c.bank, c.resize));
        score_banks(&self.extractor, &self.fine, coarse, image, grid)
    }

    fn score_tiles(&self, tiling: &Tiling, image: &Rgb32FImage) -> TileOutputs {
        let coarse = self.coarse.as_ref().map(|c| (&c.bank, c.resize));
        score_tiles_with(&self.extractor, tiling, image, |tile, grid| {
            score_banks(&self.extractor, &self.fine, coarse, tile, grid)
        })
    }

    fn without_fold(&self, fold: usize) -> Result<Option<FoldDetector<'_>>, Error> {
        let Some((fine_folds, coarse_folds)) = &self.row_folds else {
            return Ok(None);
        };
        let Some(fine) = self.fine.with_rows(&rows_outside(fine_folds, fold))? else {
            return Ok(None);
        };
        let coarse = match &self.coarse {
            Some(c) => match c.bank.with_rows(&rows_outside(coarse_folds, fold))? {
                Some(bank) => Some((bank, c.resize)),
                None => return Ok(None),
            },
            None => None,
        };
        Ok(Some((
            Box::new(PatchCoreWithout {
                extractor: &self.extractor,
                fine,
                coarse,
            }),
            Procedure::BankFolds,
        )))
    }

    fn forget_folds(&mut self) {
        self.row_folds = None;
    }

    fn tensors(&self) -> BTreeMap<String, Tensor> {
        let mut tensors = BTreeMap::from([(FINE_BANK.into(), self.fine.bank().clone())]);
        if let Some(coarse) = &self.coarse {
            tensors.insert(COARSE_BANK.into(), coarse.bank.bank().clone());
        }
        tensors
    }

    fn memory_bank_size(&self) -> Option<usize> {
        Some(self.fine.bank_size() + self.coarse.as_ref().map_or(0, |c| c.bank.bank_size()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::progress::NoProgress;

    #[test]
    fn far_patches_score_high_and_known_patches_score_zero() {
        let dev = Device::Cpu;
        let train: Vec<f32> = (0..400).map(|i| ((i * 37) % 11) as f32 * 0.1).collect();
        let train = Tensor::from_vec(train, (100, 4), &dev).unwrap();
        let config = PatchCoreConfig {
            coreset_ratio: 1.0,
            ..Default::default()
        };
        let model = PatchCore::fit(&train, &config, &NoProgress).unwrap();
        let known = train.narrow(0, 10, 3).unwrap();
        let scores = model.score(&known).unwrap();
        assert!(scores.patches.iter().all(|s| *s < 1e-3), "{scores:?}");

        let far = Tensor::from_vec(vec![5.0f32, 5.0, 5.0, 5.0], (1, 4), &dev).unwrap();
        let both = Tensor::cat(&[&known, &far], 0).unwrap();
        let scores = model.score(&both).unwrap();
        assert!(scores.patches[3] > 5.0);
        assert!(scores.image > 0.0 && scores.image <= scores.patches[3]);
    }

    #[test]
    fn index_search_equals_all_products() {
        let dev = Device::Cpu;
        let train = Tensor::randn(0f32, 1.0, (700, 24), &dev).unwrap();
        let scale = Tensor::from_vec(
            (0..24).map(|i| 4.0 / (1.0 + i as f32)).collect(),
            (1, 24),
            &dev,
        );
        let train = train.broadcast_mul(&scale.unwrap()).unwrap();
        let config = PatchCoreConfig {
            coreset_ratio: 1.0,
            ..Default::default()
        };
        let model = PatchCore::fit(&train, &config, &NoProgress).unwrap();
        assert!(model.index.is_some());
        let queries = Tensor::randn(0f32, 1.0, (300, 24), &dev).unwrap();
        let (d_index, i_index) = model.nearest(&queries).unwrap();
        let (d_all, i_all) = model.nearest_by_products(&queries).unwrap();
        for q in 0..300 {
            assert!(
                (d_index[q] - d_all[q]).abs() <= 1e-3 * (1.0 + d_all[q]),
                "query {q}"
            );
            assert_eq!(i_index[q], i_all[q], "query {q}");
        }
    }

    #[test]
    fn settings_saved_before_the_coarse_scale_load_as_one_scale() {
        let old =
            r#"{"coreset_ratio":0.1,"max_bank":null,"projection_dim":128,"neighbours":9,"seed":0}"#;
        let config: PatchCoreConfig = serde_json::from_str(old).unwrap();
        assert_eq!(config.coarse_side, None);
        assert_eq!(PatchCoreConfig::default().coarse_side, Some(128));
    }

    #[test]
    fn bank_respects_ratio_and_cap() {
        let dev = Device::Cpu;
        let train = Tensor::randn(0f32, 1.0, (1000, 8), &dev).unwrap();
        let model = PatchCore::fit(&train, &PatchCoreConfig::default(), &NoProgress).unwrap();
        assert_eq!(model.bank_size(), 100);
        let capped = PatchCoreConfig {
            max_bank: Some(40),
            ..Default::default()
        };
        let model = PatchCore::fit(&train, &capped, &NoProgress).unwrap();
        assert_eq!(model.bank_size(), 40);
    }
}
