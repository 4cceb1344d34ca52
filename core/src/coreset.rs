//! Greedy k-center coreset selection (PatchCore's memory-bank thinning).
//!
//! The greedy rule: start from one point, then repeatedly add the point
//! farthest from everything chosen so far. It keeps rare normal patterns that
//! random sampling would drop. Distances are computed on a random Gaussian
//! projection of the features (default 128 dimensions), as PatchCore does.
//!
//! Exact greedy selection over all training patches costs
//! `O(k · n · d)` with a full pass over memory per chosen point, which for a
//! few hundred thousand patches takes hours on a CPU. We therefore run the
//! greedy rule independently inside groups of at most [`GROUP_SIZE`]
//! consecutive patches (groups run in parallel and fit in cache) and keep the
//! union. Every training patch is then within its group's covering radius of
//! the bank, which is the guarantee the bank needs.

use rand::{Rng, SeedableRng, rngs::StdRng};
use rayon::prelude::*;

use crate::progress::Progress;

/// Largest number of patches one greedy run sees.
pub const GROUP_SIZE: usize = 16_384;

/// Chooses `k` rows of `points` (`n × dim`, row-major). Returns sorted row
/// indices. `k >= n` returns every row.
pub fn greedy_coreset(
    points: &[f32],
    dim: usize,
    k: usize,
    projection_dim: usize,
    seed: u64,
    progress: &dyn Progress,
) -> Vec<usize> {
    let n = points.len().checked_div(dim).unwrap_or(0);
    if k >= n {
        return (0..n).collect();
    }
    if k == 0 {
        return Vec::new();
    }
    let mut rng = StdRng::seed_from_u64(seed);
    let projected = if projection_dim > 0 && projection_dim < dim {
        project(points, dim, projection_dim, &mut rng)
    } else {
        points.to_vec()
    };
    let pdim = if projection_dim > 0 && projection_dim < dim {
        projection_dim
    } else {
        dim
    };

    // Split the rows into near-equal groups and give each a share of k
    // proportional to its size.
    let groups = n.div_ceil(GROUP_SIZE);
    let base = n / groups;
    let extra = n % groups;
    let mut bounds = Vec::with_capacity(groups);
    let mut start = 0;
    for g in 0..groups {
        let len = base + usize::from(g < extra);
        bounds.push((start, start + len));
        start += len;
    }
    let mut shares: Vec<usize> = bounds
        .iter()
        .map(|(s, e)| ((e - s) as f64 * k as f64 / n as f64).floor() as usize)
        .collect();
    let mut missing = k - shares.iter().sum::<usize>();
    for share in shares.iter_mut() {
        if missing == 0 {
            break;
        }
        *share += 1;
        missing -= 1;
    }
    let seeds: Vec<u64> = (0..groups).map(|_| rng.random()).collect();

    progress.start("coreset", k as u64);
    let mut chosen: Vec<usize> = bounds
        .par_iter()
        .zip(shares.par_iter())
        .zip(seeds.par_iter())
        .flat_map_iter(|((&(s, e), &share), &group_seed)| {
            let rows = &projected[s * pdim..e * pdim];
            greedy_in_group(rows, pdim, share, group_seed, progress)
                .into_iter()
                .map(move |i| i + s)
        })
        .collect();
    progress.finish();
    chosen.sort_unstable();
    chosen
}

fn project(points: &[f32], dim: usize, out_dim: usize, rng: &mut StdRng) -> Vec<f32> {
    let scale = 1.0 / (out_dim as f32).sqrt();
    let matrix: Vec<f32> = (0..dim * out_dim)
        .map(|_| standard_normal(rng) * scale)
        .collect();
    let mut out = vec![0.0; points.len() / dim * out_dim];
    out.par_chunks_mut(out_dim)
        .zip(points.par_chunks(dim))
        .for_each(|(dst, row)| {
            for (x, weights) in row.iter().zip(matrix.chunks_exact(out_dim)) {
                for (d, w) in dst.iter_mut().zip(weights) {
                    *d += x * w;
                }
            }
        });
    out
}

/// One draw from N(0, 1) by the Box–Muller transform.
fn standard_normal(rng: &mut StdRng) -> f32 {
    let u1: f64 = rng.random::<f64>().max(f64::MIN_POSITIVE);
    let u2: f64 = rng.random();
    ((-2.0 * u1.ln()).sqrt() * (std::f64::consts::TAU * u2).cos()) as f32
}

/// Exact greedy k-center on one group.
fn greedy_in_group(
    rows: &[f32],
    dim: usize,
    k: usize,
    seed: u64,
    progress: &dyn Progress,
) -> Vec<usize> {
    let n = rows.len() / dim;
    if k >= n {
        progress.advance(n as u64);
        return (0..n).collect();
    }
    let mut rng = StdRng::seed_from_u64(seed);
    let mut min_dist = vec![f32::INFINITY; n];
    let mut chosen = Vec::with_capacity(k);
    let mut next = rng.random_range(0..n);
    let step = (k / 100).max(1);
    for i in 0..k {
        chosen.push(next);
        let center = &rows[next * dim..(next + 1) * dim];
        let mut best = (0usize, f32::NEG_INFINITY);
        for (j, (row, current)) in rows.chunks_exact(dim).zip(min_dist.iter_mut()).enumerate() {
            let d = squared_distance(row, center);
            if d < *current {
                *current = d;
            }
            if *current > best.1 {
                best = (j, *current);
            }
        }
        next = best.0;
        if (i + 1) % step == 0 {
            progress.advance(step as u64);
        }
    }
    progress.advance((k % step) as u64);
    chosen
}

fn squared_distance(a: &[f32], b: &[f32]) -> f32 {
    // Eight independent accumulators let the compiler vectorise the loop.
    let mut acc = [0.0f32; 8];
    let chunks = a.len() / 8;
    for c in 0..chunks {
        for l in 0..8 {
            let d = a[c * 8 + l] - b[c * 8 + l];
            acc[l] += d * d;
        }
    }
    let mut total: f32 = acc.iter().sum();
    for i in chunks * 8..a.len() {
        let d = a[i] - b[i];
        total += d * d;
    }
    total
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::progress::NoProgress;

    #[test]
    fn greedy_picks_the_outliers_first() {
        // 200 points near the origin and 3 far away: a 5-point coreset must
        // contain all three outliers.
        let mut rng = StdRng::seed_from_u64(1);
        let dim = 4;
        let mut points: Vec<f32> = (0..200 * dim).map(|_| rng.random::<f32>() * 0.1).collect();
        for far in [
            [10.0, 0.0, 0.0, 0.0],
            [0.0, -10.0, 0.0, 0.0],
            [0.0, 0.0, 0.0, 10.0],
        ] {
            points.extend(far);
        }
        let chosen = greedy_coreset(&points, dim, 5, 0, 7, &NoProgress);
        assert_eq!(chosen.len(), 5);
        for outlier in [200, 201, 202] {
            assert!(chosen.contains(&outlier), "{chosen:?}");
        }
    }

    #[test]
    fn sizes_and_groups_add_up() {
        let dim = 3;
        let n = GROUP_SIZE * 2 + 5;
        let points: Vec<f32> = (0..n * dim).map(|i| (i % 97) as f32).collect();
        let chosen = greedy_coreset(&points, dim, 100, 0, 1, &NoProgress);
        assert_eq!(chosen.len(), 100);
        assert!(chosen.windows(2).all(|w| w[0] < w[1]));
        assert_eq!(
            greedy_coreset(&points[..30], dim, 50, 0, 1, &NoProgress).len(),
            10
        );
    }
}
