//! Exact nearest-neighbour search over a fixed bank of vectors (CPU).
//!
//! The bank is rotated into its principal axes once. In that basis the
//! squared distance splits into the leading `lead` axes and the rest, and
//! `‖q − b‖² ≥ ‖q_lead − b_lead‖² + (‖q_rest‖ − ‖b_rest‖)²` (the second
//! term by the triangle inequality). That lower bound costs one matrix
//! product over `lead` axes instead of all of them; only bank rows whose
//! bound is below the best distance found so far get their full distance
//! computed. Every row that could be nearest is checked, so the result is
//! the brute-force one: the nearest row, the lowest index among exact ties.

use candle_core::{DType, Device, Storage, Tensor};
use nalgebra::{DMatrix, SymmetricEigen};
use rayon::prelude::*;

use crate::Error;

/// Queries whose bound products are held in memory at once (× bank rows).
const QUERY_BLOCK: usize = 64;
/// Queries handled by one thread in a row; neighbouring patches usually
/// share their nearest bank row, which seeds the next query's search.
const QUERY_RUN: usize = 16;
/// Share of the bank's variance the leading axes must hold. Measured on MTD
/// (152 channels): 75 % (32 axes) was fastest; 90 % (64) checks fewer rows
/// but its bound product costs more (README, "Nearest-neighbour search").
const LEAD_VARIANCE: f64 = 0.75;
/// Relative slack on the bound against rounding in its matrix product.
const BOUND_SLACK: f32 = 1e-4;

/// A bank prepared for exact nearest-neighbour queries.
#[derive(Debug, Clone)]
pub struct BankIndex {
    dim: usize,
    lead: usize,
    /// Share of the bank's variance along the leading axes.
    lead_share: f64,
    /// `[1, dim]`: the bank mean.
    mean: Tensor,
    /// `[dim, dim]`: principal axes as columns, by decreasing variance.
    rotation: Tensor,
    /// `[n, dim]` row-major: centred, rotated bank rows.
    rotated: Vec<f32>,
    /// `[lead, n]`: the leading coordinates, transposed for the product.
    lead_t: Tensor,
    lead_norms: Vec<f32>,
    /// Euclidean norm of the remaining coordinates (not squared).
    rest_norms: Vec<f32>,
}

/// Nearest bank row per query: squared distance and index.
#[derive(Debug, Clone, PartialEq)]
pub struct Nearest {
    pub distances: Vec<f32>,
    pub indices: Vec<u32>,
    /// Full distances computed, over all queries (for measuring the pruning).
    pub full_distances_computed: u64,
}

impl BankIndex {
    /// Prepares `bank` `[n, dim]` (f32, CPU), with as many leading axes as
    /// hold [`LEAD_VARIANCE`] of its variance.
    pub fn new(bank: &Tensor) -> Result<Self, Error> {
        Self::with_lead(bank, None)
    }

    /// [`Self::new`] with `lead` leading axes (clamped to `1..=dim`) when
    /// given.
    pub fn with_lead(bank: &Tensor, lead_wanted: Option<usize>) -> Result<Self, Error> {
        let (n, dim) = bank.dims2()?;
        if n == 0 || dim == 0 {
            return Err(Error::InvalidConfig("empty memory bank".into()));
        }
        let bank = bank
            .to_device(&Device::Cpu)?
            .to_dtype(DType::F32)?
            .contiguous()?;
        let mean = bank.mean_keepdim(0)?;
        let centred = bank.broadcast_sub(&mean)?;
        // Covariance in f64: the eigenvectors only need to be orthonormal
        // (any orthonormal basis gives a valid bound), but f64 keeps them so.
        let gram: Vec<f64> = centred
            .t()?
            .matmul(&centred)?
            .to_dtype(DType::F64)?
            .flatten_all()?
            .to_vec1()?;
        let eigen = SymmetricEigen::new(DMatrix::from_row_slice(dim, dim, &gram));
        let mut order: Vec<usize> = (0..dim).collect();
        order.sort_by(|&a, &b| eigen.eigenvalues[b].total_cmp(&eigen.eigenvalues[a]));
        let total: f64 = eigen.eigenvalues.iter().map(|v| v.max(0.0)).sum();
        let mut lead = dim;
        let mut held = 0.0;
        for (i, &axis) in order.iter().enumerate() {
            held += eigen.eigenvalues[axis].max(0.0);
            if held >= LEAD_VARIANCE * total {
                lead = i + 1;
                break;
            }
        }
        // Whole SIMD lanes cost the same as partial ones.
        let lead = match lead_wanted {
            Some(wanted) => wanted.clamp(1, dim),
            None => lead.div_ceil(8).saturating_mul(8).clamp(1, dim),
        };
        let mut rotation = vec![0f32; dim * dim];
        for (column, &axis) in order.iter().enumerate() {
            for row in 0..dim {
                rotation[row * dim + column] = eigen.eigenvectors[(row, axis)] as f32;
            }
        }
        let rotation = Tensor::from_vec(rotation, (dim, dim), &Device::Cpu)?;
        let lead_share = if total > 0.0 {
            order[..lead]
                .iter()
                .map(|&axis| eigen.eigenvalues[axis].max(0.0))
                .sum::<f64>()
                / total
        } else {
            1.0
        };
        let rotated_t = centred.matmul(&rotation)?;
        let lead_t = rotated_t.narrow(1, 0, lead)?.t()?.contiguous()?;
        let rotated: Vec<f32> = rotated_t.flatten_all()?.to_vec1()?;
        let (lead_norms, rest_norms) = split_norms(&rotated, dim, lead);
        Ok(Self {
            dim,
            lead,
            lead_share,
            mean,
            rotation,
            rotated,
            lead_t,
            lead_norms,
            rest_norms,
        })
    }

    pub fn len(&self) -> usize {
        self.lead_norms.len()
    }

    pub fn is_empty(&self) -> bool {
        self.lead_norms.is_empty()
    }

    /// Leading axes used for the bound.
    pub fn lead(&self) -> usize {
        self.lead
    }

    /// Share of the bank's variance along the leading axes.
    pub fn lead_share(&self) -> f64 {
        self.lead_share
    }

    /// The nearest bank row of every query row `[p, dim]`.
    pub fn nearest(&self, queries: &Tensor) -> Result<Nearest, Error> {
        let (p, dim) = queries.dims2()?;
        if dim != self.dim {
            return Err(Error::InvalidConfig(format!(
                "queries have {dim} channels, the bank {}",
                self.dim
            )));
        }
        let rotated = queries
            .to_device(&Device::Cpu)?
            .to_dtype(DType::F32)?
            .broadcast_sub(&self.mean)?
            .matmul(&self.rotation)?
            .contiguous()?;
        let lead_q = rotated.narrow(1, 0, self.lead)?.contiguous()?;
        let rotated: Vec<f32> = rotated.flatten_all()?.to_vec1()?;
        let (q_lead_norms, q_rest_norms) = split_norms(&rotated, dim, self.lead);
        let max_lead_norm = self.lead_norms.iter().copied().fold(0f32, f32::max);
        let n = self.len();

        let mut distances = vec![0f32; p];
        let mut indices = vec![0u32; p];
        let mut computed = 0u64;
        let mut start = 0;
        while start < p {
            let len = QUERY_BLOCK.min(p - start);
            let products = lead_q.narrow(0, start, len)?.matmul(&self.lead_t)?;
            let (storage, layout) = products.storage_and_layout();
            let Storage::Cpu(cpu) = &*storage else {
                return Err(Error::InvalidConfig("bank products not on the CPU".into()));
            };
            let products = &cpu.as_slice::<f32>()?[layout.start_offset()..][..len * n];
            computed += products
                .par_chunks(QUERY_RUN * n)
                .zip(distances[start..start + len].par_chunks_mut(QUERY_RUN))
                .zip(indices[start..start + len].par_chunks_mut(QUERY_RUN))
                .enumerate()
                .map(|(run, ((products, distances), indices))| {
                    let first = start + run * QUERY_RUN;
                    let mut seed = None;
                    let mut bounds = Vec::with_capacity(n);
                    let mut computed = 0u64;
                    for (k, row) in products.chunks_exact(n).enumerate() {
                        let q = first + k;
                        let query = Query {
                            coords: &rotated[q * dim..(q + 1) * dim],
                            lead_norm: q_lead_norms[q],
                            rest_norm: q_rest_norms[q],
                            slack: BOUND_SLACK * (q_lead_norms[q] + max_lead_norm),
                        };
                        let (d, j, c) = self.search(&query, row, seed, &mut bounds);
                        distances[k] = d;
                        indices[k] = j as u32;
                        computed += c;
                        seed = Some(j);
                    }
                    computed
                })
                .sum::<u64>();
            start += len;
        }
        Ok(Nearest {
            distances,
            indices,
            full_distances_computed: computed,
        })
    }

    /// One query: `products` holds its lead-axis dot product with every
    /// bank row; `seed` is a row likely to be near (the previous query's).
    fn search(
        &self,
        query: &Query<'_>,
        products: &[f32],
        seed: Option<usize>,
        bounds: &mut Vec<f32>,
    ) -> (f32, usize, u64) {
        // One branch-free pass (it vectorises), then a scan that rarely hits.
        bounds.clear();
        bounds.extend(
            products
                .iter()
                .zip(&self.lead_norms)
                .zip(&self.rest_norms)
                .map(|((product, lead), rest)| {
                    let r = query.rest_norm - rest;
                    query.lead_norm + lead - 2.0 * product + r * r
                }),
        );
        let seed = seed.unwrap_or_else(|| {
            bounds
                .iter()
                .enumerate()
                .min_by(|a, b| a.1.total_cmp(b.1))
                .map_or(0, |(j, _)| j)
        });
        let mut best = (self.distance(query.coords, seed, f32::INFINITY), seed);
        let mut computed = 1;
        for (j, &bound) in bounds.iter().enumerate() {
            // A row whose bound exceeds the best distance (beyond rounding)
            // is farther than a row already found; ties still get checked.
            if bound > best.0 + query.slack || j == seed {
                continue;
            }
            computed += 1;
            let d = self.distance(query.coords, j, best.0);
            if d < best.0 || (d == best.0 && j < best.1) {
                best = (d, j);
            }
        }
        (best.0, best.1, computed)
    }

    /// Squared distance from rotated query coordinates to bank row `j`;
    /// stops early (returning something above `limit`) once the partial
    /// sum exceeds `limit`.
    fn distance(&self, coords: &[f32], j: usize, limit: f32) -> f32 {
        const LANES: usize = 16;
        let row = &self.rotated[j * self.dim..(j + 1) * self.dim];
        // Independent partial sums, so the compiler can use SIMD (one float
        // sum in order cannot be reassociated).
        let mut lanes = [0f32; LANES];
        let mut q_chunks = coords.chunks_exact(LANES);
        let mut b_chunks = row.chunks_exact(LANES);
        for (k, (q, b)) in (&mut q_chunks).zip(&mut b_chunks).enumerate() {
            for ((acc, x), y) in lanes.iter_mut().zip(q).zip(b) {
                let d = x - y;
                *acc += d * d;
            }
            // The leading axes carry most of the distance, so a sum past
            // the limit usually shows after the first few blocks.
            if k % 2 == 1 {
                let sum: f32 = lanes.iter().sum();
                if sum > limit {
                    return sum;
                }
            }
        }
        for ((acc, x), y) in lanes
            .iter_mut()
            .zip(q_chunks.remainder())
            .zip(b_chunks.remainder())
        {
            let d = x - y;
            *acc += d * d;
        }
        lanes.iter().sum()
    }
}

struct Query<'a> {
    coords: &'a [f32],
    lead_norm: f32,
    rest_norm: f32,
    slack: f32,
}

/// Squared norm of the first `lead` coordinates and norm of the rest, per row.
fn split_norms(rows: &[f32], dim: usize, lead: usize) -> (Vec<f32>, Vec<f32>) {
    rows.chunks_exact(dim)
        .map(|row| {
            let (head, tail) = row.split_at(lead);
            (
                head.iter().map(|v| v * v).sum::<f32>(),
                tail.iter().map(|v| v * v).sum::<f32>().sqrt(),
            )
        })
        .unzip()
}

/// Brute force over every pair, as `Σ (q − b)²` in the original axes: the
/// reference [`BankIndex::nearest`] is checked against.
pub fn brute_force(bank: &[f32], queries: &[f32], dim: usize) -> (Vec<f32>, Vec<u32>) {
    queries
        .chunks_exact(dim)
        .map(|q| {
            let mut best = (f32::INFINITY, 0u32);
            for (j, b) in bank.chunks_exact(dim).enumerate() {
                let d: f32 = q.iter().zip(b).map(|(x, y)| (x - y) * (x - y)).sum();
                if d < best.0 {
                    best = (d, j as u32);
                }
            }
            best
        })
        .unzip()
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{Rng, SeedableRng, rngs::StdRng};

    /// Rows with a decaying spectrum, like backbone features.
    fn features(rng: &mut StdRng, n: usize, dim: usize) -> Vec<f32> {
        (0..n * dim)
            .map(|i| {
                let axis = (i % dim) as f32;
                rng.random_range(-1.0f32..1.0) * (-axis / 8.0).exp() * 3.0
            })
            .collect()
    }

    fn check(bank: &[f32], queries: &[f32], dim: usize) {
        let n = bank.len() / dim;
        let p = queries.len() / dim;
        let index =
            BankIndex::new(&Tensor::from_slice(bank, (n, dim), &Device::Cpu).unwrap()).unwrap();
        let got = index
            .nearest(&Tensor::from_slice(queries, (p, dim), &Device::Cpu).unwrap())
            .unwrap();
        let (want_d, want_i) = brute_force(bank, queries, dim);
        for q in 0..p {
            let (d, i) = (got.distances[q], got.indices[q] as usize);
            let tolerance = 1e-4 * (1.0 + want_d[q]);
            assert!(
                (d - want_d[q]).abs() <= tolerance,
                "query {q}: {d} vs {}",
                want_d[q]
            );
            if i != want_i[q] as usize {
                // Only a tie within rounding may pick another row.
                let row = &bank[i * dim..(i + 1) * dim];
                let exact: f32 = queries[q * dim..(q + 1) * dim]
                    .iter()
                    .zip(row)
                    .map(|(x, y)| (x - y) * (x - y))
                    .sum();
                assert!(
                    (exact - want_d[q]).abs() <= tolerance,
                    "query {q}: row {i} at {exact}, brute force row {} at {}",
                    want_i[q],
                    want_d[q]
                );
            }
        }
    }

    #[test]
    fn equals_brute_force_on_structured_and_random_data() {
        let mut rng = StdRng::seed_from_u64(7);
        for &(n, p, dim) in &[
            (1000, 300, 152),
            (777, 129, 40),
            (1, 5, 3),
            (3, 1, 1),
            (50, 17, 8),
            (300, 16, 9),
        ] {
            let bank = features(&mut rng, n, dim);
            let queries = features(&mut rng, p, dim);
            check(&bank, &queries, dim);
        }
        // Isotropic noise: the bound prunes little, the answer must not change.
        let bank: Vec<f32> = (0..500 * 32).map(|_| rng.random_range(-1.0..1.0)).collect();
        let queries: Vec<f32> = (0..200 * 32).map(|_| rng.random_range(-1.0..1.0)).collect();
        check(&bank, &queries, 32);
    }

    #[test]
    fn queries_on_bank_rows_and_duplicates_find_the_lowest_index() {
        let mut rng = StdRng::seed_from_u64(3);
        let dim = 24;
        let mut bank = features(&mut rng, 400, dim);
        // Rows 10, 200 and 399 are copies of row 5.
        for copy in [10, 200, 399] {
            let row: Vec<f32> = bank[5 * dim..6 * dim].to_vec();
            bank[copy * dim..(copy + 1) * dim].copy_from_slice(&row);
        }
        let mut queries = Vec::new();
        for j in [399, 5, 10, 0, 398, 200] {
            queries.extend_from_slice(&bank[j * dim..(j + 1) * dim]);
        }
        let index =
            BankIndex::new(&Tensor::from_slice(&bank, (400, dim), &Device::Cpu).unwrap()).unwrap();
        let got = index
            .nearest(&Tensor::from_slice(&queries, (6, dim), &Device::Cpu).unwrap())
            .unwrap();
        assert_eq!(got.indices, vec![5, 5, 5, 0, 398, 5]);
        assert!(got.distances.iter().all(|d| *d < 1e-4), "{got:?}");
        // A constant bank: every row ties.
        let constant = vec![0.5f32; 20 * 4];
        let index =
            BankIndex::new(&Tensor::from_slice(&constant, (20, 4), &Device::Cpu).unwrap()).unwrap();
        let got = index
            .nearest(&Tensor::from_slice(&[1f32, 0.0, 0.5, 2.0], (1, 4), &Device::Cpu).unwrap())
            .unwrap();
        assert_eq!(got.indices, vec![0]);
        assert!((got.distances[0] - (0.25 + 0.25 + 2.25)).abs() < 1e-5);
    }

    #[test]
    fn pruning_skips_most_rows_on_structured_data() {
        let mut rng = StdRng::seed_from_u64(11);
        let dim = 64;
        let bank = features(&mut rng, 4000, dim);
        // Queries near bank rows, as test patches are near normal ones.
        let queries: Vec<f32> = bank[..256 * dim]
            .iter()
            .map(|v| v + rng.random_range(-0.05..0.05))
            .collect();
        let index =
            BankIndex::new(&Tensor::from_slice(&bank, (4000, dim), &Device::Cpu).unwrap()).unwrap();
        let got = index
            .nearest(&Tensor::from_slice(&queries, (256, dim), &Device::Cpu).unwrap())
            .unwrap();
        assert!(index.lead() < dim);
        assert!(
            got.full_distances_computed < 256 * 4000 / 10,
            "{} full distances",
            got.full_distances_computed
        );
        check(&bank, &queries, dim);
    }

    #[test]
    fn wrong_width_is_an_error() {
        let index =
            BankIndex::new(&Tensor::zeros((4, 3), DType::F32, &Device::Cpu).unwrap()).unwrap();
        assert!(
            index
                .nearest(&Tensor::zeros((2, 5), DType::F32, &Device::Cpu).unwrap())
                .is_err()
        );
    }
}
