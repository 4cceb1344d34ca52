//! Exact nearest-neighbour search over a fixed bank of vectors (CPU).
//!
//! The bank is rotated into its principal axes once. In that basis the
//! squared distance splits into the leading `lead` axes and the rest, and
//! `‖q − b‖² ≥ ‖q_lead − b_lead‖² + (‖q_rest‖ − ‖b_rest‖)²` (the second
//! term by the triangle inequality). Expanded, that bound is
//! `‖q‖² − 2 s` with `s = q_lead·b_lead + ‖q_rest‖ ‖b_rest‖ − ‖b‖²/2`: one
//! dot product of `lead + 2` numbers per pair, so one small matrix product
//! per run of queries gives every bound. Only bank rows whose bound is below
//! the best distance found so far get their full distance computed. Every
//! row that could be nearest is checked, so the result is the brute-force
//! one: the nearest row, the lowest index among exact ties.
//!
//! Where the CPU has AVX512-VNNI the bound's product runs in 8-bit integers
//! (four times the f32 rate) with the bank quantised once, and each query's
//! rounding bound is added to its slack, so the search stays exact.

use candle_core::{DType, Device, Tensor};
use flawscope_models::i8_product::FixedI8Product;
use flawscope_models::simd::widest;
use nalgebra::{DMatrix, DMatrixView, DMatrixViewMut, SymmetricEigen};
use rayon::prelude::*;

use crate::Error;

/// Queries handled by one thread in a row: one matrix product gives their
/// bounds against the whole bank (measured on MTD, 64 beat 16 and 32; 128
/// gained nothing), scanned while still in cache, and neighbouring patches
/// usually share their nearest bank row, which seeds the next query's search.
const QUERY_RUN: usize = 64;
/// The same for the 8-bit product: its bank is packed once, so short runs
/// cost nothing extra, and a run's products (`16 · n` floats) stay in the
/// L2 cache for the scan.
const QUERY_RUN_I8: usize = 16;
/// Bound products tested together: a block is looked at row by row only
/// when one of them can beat the best distance (rarely).
const SCAN_BLOCK: usize = 32;
/// Share of the bank's variance the leading axes must hold. Measured on MTD
/// (152 channels, anomalib's settings): 85 % (48 axes) was fastest; fewer
/// axes leave more rows to check in full, more make the bound's product
/// dearer (README, "Nearest-neighbour search").
const LEAD_VARIANCE: f64 = 0.85;
/// The same where the bound's product runs in 8-bit integers (a quarter of
/// the f32 cost per axis, and its rounding slack lets more rows through):
/// 95.5 % (88 axes) was fastest on the same bank, against 72 axes (the
/// bf16 product's best, which this replaced) and 96, 112 axes.
const LEAD_VARIANCE_I8: f64 = 0.955;
/// Relative slack on the bound against rounding in its matrix product
/// (scaled by `‖q‖² + max ‖b‖²`, which bounds every term of the product).
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
    /// `[lead + 2][n]`: per bank row its leading coordinates, the norm of
    /// the rest and `−‖b‖²/2`, one axis after another (the bound's f32
    /// product); empty where the 8-bit product holds the same numbers.
    bound_rows: Vec<f32>,
    /// Largest squared norm of a rotated bank row.
    max_square_norm: f32,
    /// The bound's product in 8-bit integers (bank rows: leading coordinates
    /// and the norm of the rest; bias `−‖b‖²/2`), where the CPU has
    /// AVX512-VNNI.
    i8: Option<FixedI8Product>,
}

thread_local! {
    /// Each thread's buffer for a run's bound products.
    static PRODUCTS: std::cell::Cell<Vec<f32>> = const { std::cell::Cell::new(Vec::new()) };
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
        Self::build(bank, lead_wanted, true)
    }

    /// [`Self::with_lead`] with the bound's product in f32 even where the
    /// CPU has the 8-bit one (to test and time the f32 path).
    pub fn with_lead_f32(bank: &Tensor, lead_wanted: Option<usize>) -> Result<Self, Error> {
        Self::build(bank, lead_wanted, false)
    }

    /// Whether the bound's product runs in 8-bit integers.
    pub fn uses_i8(&self) -> bool {
        self.i8.is_some()
    }

    fn build(bank: &Tensor, lead_wanted: Option<usize>, prefer_i8: bool) -> Result<Self, Error> {
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
        let i8 = prefer_i8 && flawscope_models::i8_product::available();
        let share = if i8 { LEAD_VARIANCE_I8 } else { LEAD_VARIANCE };
        let mut lead = dim;
        let mut held = 0.0;
        for (i, &axis) in order.iter().enumerate() {
            held += eigen.eigenvalues[axis].max(0.0);
            if held >= share * total {
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
        let rotated: Vec<f32> = centred.matmul(&rotation)?.flatten_all()?.to_vec1()?;
        let width = lead + 2;
        let mut bound_rows = vec![0f32; width * n];
        let mut max_square_norm = 0f32;
        for (j, row) in rotated.chunks_exact(dim).enumerate() {
            let (head, tail) = row.split_at(lead);
            let rest = tail.iter().map(|v| v * v).sum::<f32>();
            let square_norm = head.iter().map(|v| v * v).sum::<f32>() + rest;
            for (axis, v) in head.iter().enumerate() {
                bound_rows[axis * n + j] = *v;
            }
            bound_rows[lead * n + j] = rest.sqrt();
            bound_rows[(lead + 1) * n + j] = -0.5 * square_norm;
            max_square_norm = max_square_norm.max(square_norm);
        }
        let i8 = if i8 {
            let mut rows = vec![0f32; n * (lead + 1)];
            let mut bias = vec![0f32; n];
            for (j, (row, b)) in rows.chunks_exact_mut(lead + 1).zip(&mut bias).enumerate() {
                for (axis, v) in row.iter_mut().enumerate() {
                    *v = bound_rows[axis * n + j];
                }
                *b = bound_rows[(lead + 1) * n + j];
            }
            FixedI8Product::new(&rows, n, lead + 1, &bias)
        } else {
            None
        };
        let bound_rows = if i8.is_some() { Vec::new() } else { bound_rows };
        Ok(Self {
            dim,
            lead,
            lead_share,
            mean,
            rotation,
            rotated,
            bound_rows,
            max_square_norm,
            i8,
        })
    }

    pub fn len(&self) -> usize {
        self.rotated.len() / self.dim
    }

    pub fn is_empty(&self) -> bool {
        self.rotated.is_empty()
    }

    /// Leading axes used for the bound.
    pub fn lead(&self) -> usize {
        self.lead
    }

    /// Share of the bank's variance along the leading axes.
    pub fn lead_share(&self) -> f64 {
        self.lead_share
    }

    /// Query rows `[p, dim]` centred and rotated like the bank, row-major.
    fn rotate(&self, queries: &Tensor) -> Result<Vec<f32>, Error> {
        let (_, dim) = queries.dims2()?;
        if dim != self.dim {
            return Err(Error::InvalidConfig(format!(
                "queries have {dim} channels, the bank {}",
                self.dim
            )));
        }
        Ok(queries
            .to_device(&Device::Cpu)?
            .to_dtype(DType::F32)?
            .broadcast_sub(&self.mean)?
            .matmul(&self.rotation)?
            .flatten_all()?
            .to_vec1()?)
    }

    /// The nearest bank row of every query row `[p, dim]`.
    pub fn nearest(&self, queries: &Tensor) -> Result<Nearest, Error> {
        let rotated = self.rotate(queries)?;
        let (dim, lead, n) = (self.dim, self.lead, self.len());
        let width = lead + 2;
        let p = rotated.len() / dim;
        // Each query as the bound's left factor: leading coordinates, the
        // norm of the rest and 1; and its squared norm.
        let mut factors = vec![0f32; p * width];
        let mut square_norms = vec![0f32; p];
        for ((row, factor), square_norm) in rotated
            .chunks_exact(dim)
            .zip(factors.chunks_exact_mut(width))
            .zip(&mut square_norms)
        {
            let (head, tail) = row.split_at(lead);
            let rest = tail.iter().map(|v| v * v).sum::<f32>();
            *square_norm = head.iter().map(|v| v * v).sum::<f32>() + rest;
            factor[..lead].copy_from_slice(head);
            factor[lead] = rest.sqrt();
            factor[lead + 1] = 1.0;
        }
        let (run_len, quantized) = match &self.i8 {
            Some(product) => {
                // The integer product's left factor has no trailing 1: the
                // bank's `−‖b‖²/2` is its bias.
                let narrow: Vec<f32> = factors
                    .chunks_exact(width)
                    .flat_map(|f| f[..width - 1].iter().copied())
                    .collect();
                (QUERY_RUN_I8, product.quantize(&narrow))
            }
            None => (QUERY_RUN, Default::default()),
        };

        let mut distances = vec![0f32; p];
        let mut indices = vec![0u32; p];
        let computed = rotated
            .par_chunks(run_len * dim)
            .zip(factors.par_chunks(run_len * width))
            .zip(square_norms.par_chunks(run_len))
            .zip(distances.par_chunks_mut(run_len))
            .zip(indices.par_chunks_mut(run_len))
            .enumerate()
            .map(
                |(r, ((((coords, factors), square_norms), distances), indices))| {
                    let run = square_norms.len();
                    // One buffer per thread, kept between calls: rayon may
                    // split the runs into many jobs, and zeroing a fresh
                    // megabyte for each cost more than the scan.
                    let mut buffer = PRODUCTS.with(std::cell::Cell::take);
                    if buffer.len() < run * n {
                        buffer.resize(run * n, 0.0);
                    }
                    let products = &mut buffer[..run * n];
                    let i8 = match &self.i8 {
                        Some(product) => {
                            let start = r * run_len;
                            product.product(&quantized, start..start + run, products);
                            true
                        }
                        None => {
                            // Column-major views: the product's column `k` is
                            // query `k`'s `s` against every bank row.
                            let mut out = DMatrixViewMut::from_slice(products, n, run);
                            out.gemm(
                                1.0,
                                &DMatrixView::from_slice(&self.bound_rows, n, width),
                                &DMatrixView::from_slice(factors, width, run),
                                0.0,
                            );
                            false
                        }
                    };
                    let products = &products[..];
                    let computed = widest(
                        #[inline(always)]
                        || {
                            let mut seed = None;
                            let mut computed = 0u64;
                            for (k, products) in products.chunks_exact(n).enumerate() {
                                let square_norm = square_norms[k];
                                let query = Query {
                                    coords: &coords[k * dim..(k + 1) * dim],
                                    square_norm,
                                    slack: BOUND_SLACK * (square_norm + self.max_square_norm),
                                    product_slack: if i8 {
                                        quantized.error[r * run_len + k] + 1e-30
                                    } else {
                                        0.0
                                    },
                                };
                                let (d, j, c) = self.search(&query, products, seed);
                                distances[k] = d;
                                indices[k] = j as u32;
                                computed += c;
                                seed = Some(j);
                            }
                            computed
                        },
                    );
                    PRODUCTS.with(|cell| cell.set(buffer));
                    computed
                },
            )
            .sum::<u64>();
        Ok(Nearest {
            distances,
            indices,
            full_distances_computed: computed,
        })
    }

    /// Squared distances from bank row `j` to every bank row.
    pub fn distances_from_row(&self, j: usize) -> Vec<f32> {
        let row = &self.rotated[j * self.dim..(j + 1) * self.dim];
        widest(
            #[inline(always)]
            || {
                (0..self.len())
                    .map(|i| self.distance(row, i, f32::INFINITY))
                    .collect()
            },
        )
    }

    /// Squared distances from one query `[1, dim]` (or `[dim]`) to the bank
    /// rows listed.
    pub fn distances_from_query(&self, query: &Tensor, rows: &[usize]) -> Result<Vec<f32>, Error> {
        let coords = self.rotate(&query.reshape((1, self.dim))?)?;
        Ok(rows
            .iter()
            .map(|&j| self.distance(&coords, j, f32::INFINITY))
            .collect())
    }

    /// One query: `products` holds its `s` with every bank row (its bound
    /// is `‖q‖² − 2 s`); `seed` is a row likely to be near (the previous
    /// query's).
    #[inline(always)]
    fn search(
        &self,
        query: &Query<'_>,
        products: &[f32],
        seed: Option<usize>,
    ) -> (f32, usize, u64) {
        // Without a neighbour's row, the row of the largest `s` (the
        // lowest bound): any seed gives the same answer, so two passes that
        // vectorise beat an ordered comparison of every row.
        let seed = seed.unwrap_or_else(|| {
            let mut lanes = [f32::NEG_INFINITY; 16];
            for chunk in products.chunks(16) {
                for (m, &s) in lanes.iter_mut().zip(chunk) {
                    *m = if s > *m { s } else { *m };
                }
            }
            let top = lanes.iter().fold(f32::NEG_INFINITY, |m, &s| m.max(s));
            products.iter().position(|&s| s == top).unwrap_or(0)
        });
        let mut best = (self.distance(query.coords, seed, f32::INFINITY), seed);
        let mut computed = 1;
        // A row can be nearest only if its bound is at most the best
        // distance (plus rounding slack): `s ≥ (‖q‖² − best − slack) / 2`.
        // With the product's own rounding `e`, the computed `s` may lie `e`
        // below the exact one.
        let floor =
            |best: f32| 0.5 * (query.square_norm - best - query.slack) - query.product_slack;
        let mut wanted = floor(best.0);
        for (block, values) in products.chunks(SCAN_BLOCK).enumerate() {
            // Branch-free over the block (it vectorises); most blocks stop here.
            if !values.iter().fold(false, |any, &s| any | (s >= wanted)) {
                continue;
            }
            for (offset, &s) in values.iter().enumerate() {
                let j = block * SCAN_BLOCK + offset;
                if s >= wanted && j != seed {
                    computed += 1;
                    let d = self.distance(query.coords, j, best.0);
                    if d < best.0 || (d == best.0 && j < best.1) {
                        best = (d, j);
                        wanted = floor(d);
                    }
                }
            }
        }
        (best.0, best.1, computed)
    }

    /// Squared distance from rotated query coordinates to bank row `j`;
    /// stops early (returning something above `limit`) once the partial
    /// sum exceeds `limit`.
    #[inline(always)]
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
    square_norm: f32,
    /// Rounding slack on the bound (its squared-distance units).
    slack: f32,
    /// How far below the exact `s` the computed one can lie (8-bit
    /// product), 0 for f32.
    product_slack: f32,
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

    /// Both products for the bound: 8-bit (where the CPU has it) and f32.
    fn indexes(bank: &[f32], n: usize, dim: usize) -> Vec<BankIndex> {
        let bank = Tensor::from_slice(bank, (n, dim), &Device::Cpu).unwrap();
        let f32_index = BankIndex::with_lead_f32(&bank, None).unwrap();
        assert!(!f32_index.uses_i8());
        let index = BankIndex::new(&bank).unwrap();
        if !index.uses_i8() {
            eprintln!("this CPU has no AVX512-VNNI: only the f32 bound is tested");
        }
        vec![index, f32_index]
    }

    fn check(bank: &[f32], queries: &[f32], dim: usize) {
        let n = bank.len() / dim;
        for index in indexes(bank, n, dim) {
            check_with(&index, bank, queries, dim);
        }
    }

    fn check_with(index: &BankIndex, bank: &[f32], queries: &[f32], dim: usize) {
        let p = queries.len() / dim;
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

    /// Queries far from the bank's mean among near-ties: the 8-bit
    /// product's rounding (about `‖q‖ ‖b‖ / 127`) is far larger than the
    /// gaps between the candidates' distances, so the search is exact only
    /// if its bound allows for that rounding.
    #[test]
    fn near_ties_far_from_the_mean_survive_the_integer_rounding() {
        let mut rng = StdRng::seed_from_u64(5);
        let dim = 8;
        let offset = 100.0f32;
        let mut cluster = |count: usize, sign: f32| -> Vec<f32> {
            (0..count * dim)
                .map(|i| {
                    let noise = rng.random_range(-1.0f32..1.0);
                    if i % dim == 0 {
                        sign * offset + noise
                    } else {
                        noise
                    }
                })
                .collect()
        };
        let mut bank = cluster(300, 1.0);
        bank.extend(cluster(300, -1.0));
        let queries = cluster(100, 1.0);
        check(&bank, &queries, dim);
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
        for index in indexes(&bank, 400, dim) {
            let got = index
                .nearest(&Tensor::from_slice(&queries, (6, dim), &Device::Cpu).unwrap())
                .unwrap();
            assert_eq!(got.indices, vec![5, 5, 5, 0, 398, 5]);
            assert!(got.distances.iter().all(|d| *d < 1e-4), "{got:?}");
        }
        // A constant bank: every row ties.
        let constant = vec![0.5f32; 20 * 4];
        for index in indexes(&constant, 20, 4) {
            let got = index
                .nearest(&Tensor::from_slice(&[1f32, 0.0, 0.5, 2.0], (1, 4), &Device::Cpu).unwrap())
                .unwrap();
            assert_eq!(got.indices, vec![0]);
            assert!((got.distances[0] - (0.25 + 0.25 + 2.25)).abs() < 1e-5);
        }
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
        for index in indexes(&bank, 4000, dim) {
            let got = index
                .nearest(&Tensor::from_slice(&queries, (256, dim), &Device::Cpu).unwrap())
                .unwrap();
            assert!(index.lead() < dim);
            assert!(
                got.full_distances_computed < 256 * 4000 / 10,
                "{} full distances (8-bit: {})",
                got.full_distances_computed,
                index.uses_i8()
            );
            check_with(&index, &bank, &queries, dim);
        }
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
