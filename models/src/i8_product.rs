//! A fixed matrix product in 8-bit integers for bounds that may be off by a
//! known amount: `x Wᵀ + bias` with `W` (`[n, k]`) quantised once with one
//! scale (its largest value to ±127), each row of `x` quantised with its own
//! scale, and exact 32-bit integer sums (`vpdpbusd`, AVX512-VNNI:
//! four products per lane per instruction, twice the bf16 rate on this
//! project's CPU). [`FixedI8Product::quantize`] returns, per row, a bound on
//! how far every output of that row can lie from the exact f32 product, so
//! a caller that only needs a lower or upper bound (PatchCore's exact
//! search) widens it by that much and stays exact.
//!
//! No crate on crates.io offers a `vpdpbusd` product with a stated error,
//! hence this compact kernel (tested against an f64 product).

// The kernel needs raw pointers and CPU intrinsics; every unsafe block states
// what it relies on, and the workspace denies unsafe code everywhere else.
#![allow(unsafe_code)]

/// Output columns per panel (3 AVX-512 vectors of 16 lanes).
const NR: usize = 48;
/// Rows per micro-tile: 8 × 3 accumulators leave registers for the operands.
const MR: usize = 8;
/// Largest quantised magnitude (symmetric, so -128 never occurs).
const LEVELS: f32 = 127.0;
/// Largest input width: keeps every integer sum far inside `i32` and exact
/// in `f32` (`k · 255 · 127 < 2²⁴`).
const MAX_K: usize = 512;

/// Whether this CPU runs the kernel (AVX512-VNNI).
pub fn available() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        std::arch::is_x86_feature_detected!("avx512f")
            && std::arch::is_x86_feature_detected!("avx512bw")
            && std::arch::is_x86_feature_detected!("avx512vnni")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// `x Wᵀ + bias` for a fixed `W`, computed on the caller's thread.
#[derive(Debug, Clone)]
pub struct FixedI8Product {
    n: usize,
    k: usize,
    /// `k` rounded up to a quad.
    k_quads: usize,
    /// `W`'s scale, one for every axis (`max |w| / 127`, 1 where zero; see
    /// [`Self::new`]).
    scale: f32,
    /// `[ceil(n / NR)][k_quads][NR]` quads of `i8` as `u32`; columns past `n` are zero.
    panels: Vec<u32>,
    /// Per panel, what each column adds to its integer sums.
    columns: Vec<Columns>,
}

/// A panel's per-column terms.
#[derive(Debug, Clone)]
struct Columns {
    /// `128 · Σ_l w̃_jl`: what the unsigned shift of `x` adds (subtracted).
    shift: [i32; NR],
    /// `0.501 · Σ_l |w̃_jl|`: column `j`'s share of the rounding error, in
    /// units of the row's scale (added, so the output errs upwards by it).
    slack: [f32; NR],
    bias: [f32; NR],
}

/// Rows of `x` quantised for [`FixedI8Product::product`].
#[derive(Debug, Clone, Default)]
pub struct QuantizedRows {
    /// `k_quads` quads of `u8` (`x̃ + 128`) per row.
    quads: Vec<u32>,
    /// Per row: the scale that turns integer sums back into products.
    scale: Vec<f32>,
    /// Per row: how far below the exact product any of its outputs can lie
    /// (before the f32 rounding of the result, which callers bound
    /// themselves).
    pub error: Vec<f32>,
}

impl FixedI8Product {
    /// `None` without AVX512-VNNI, or when the sizes do not match
    /// (`weight.len() == n · k`, `bias.len() == n`, `1 ≤ k ≤ 512`), or when
    /// a weight is not finite.
    pub fn new(weight: &[f32], n: usize, k: usize, bias: &[f32]) -> Option<Self> {
        if !available() || n == 0 || k == 0 || k > MAX_K {
            return None;
        }
        if weight.len() != n.checked_mul(k)? || bias.len() != n {
            return None;
        }
        if weight.iter().any(|w| !w.is_finite()) {
            return None;
        }
        // One scale for every axis: the error sums one rounding step per
        // axis on each side, so equal steps cost least (scaling the small
        // axes up gave a bound ten times wider on PatchCore's rotated bank).
        let top = weight.iter().fold(0f32, |m, w| m.max(w.abs()));
        let scale = if top > 0.0 { top / LEVELS } else { 1.0 };
        let k_quads = k.div_ceil(4);
        let panels_n = n.div_ceil(NR);
        let mut panels = vec![0u32; panels_n * k_quads * NR];
        let mut columns = vec![
            Columns {
                shift: [0; NR],
                slack: [0.0; NR],
                bias: [0.0; NR],
            };
            panels_n
        ];
        // The row's bytes, padded with zeros to whole quads.
        let mut bytes = vec![0i8; k_quads * 4];
        for (j, row) in weight.chunks_exact(k).enumerate() {
            let (p, c) = (j / NR, j % NR);
            for (b, &w) in bytes.iter_mut().zip(row) {
                *b = (w / scale).round().clamp(-LEVELS, LEVELS) as i8;
            }
            let sum: i32 = bytes.iter().map(|&b| i32::from(b)).sum();
            let abs_sum: i32 = bytes.iter().map(|&b| i32::from(b).abs()).sum();
            columns[p].shift[c] = 128 * sum;
            columns[p].slack[c] = 0.501 * abs_sum as f32;
            columns[p].bias[c] = bias[j];
            for (q, quad) in bytes.chunks_exact(4).enumerate() {
                panels[(p * k_quads + q) * NR + c] = u32::from_le_bytes([
                    quad[0] as u8,
                    quad[1] as u8,
                    quad[2] as u8,
                    quad[3] as u8,
                ]);
            }
        }
        Some(Self {
            n,
            k,
            k_quads,
            scale,
            panels,
            columns,
        })
    }

    /// Output width.
    pub fn n(&self) -> usize {
        self.n
    }

    /// Input width.
    pub fn k(&self) -> usize {
        self.k
    }

    /// Rows of `x` (`k` floats each, finite) quantised, with each row's
    /// error bound: the row is scaled by `W`'s scale, then by
    /// `α = max |x'| / 127`; with `x̃`, `w̃` the rounded integers,
    /// `|x·w − α x̃·w̃| ≤ α (Σ|x̃|/2 + Σ|w̃|/2 + k/4)` (a little more for
    /// the f32 scalings). [`Self::product`] adds each column's `α Σ|w̃|/2`,
    /// so the row's `error` is the rest: how far *below* the exact product
    /// an output can lie.
    ///
    /// # Panics
    /// When `x.len()` is not a multiple of `k`.
    pub fn quantize(&self, x: &[f32]) -> QuantizedRows {
        let (k, kq) = (self.k, self.k_quads);
        assert_eq!(x.len() % k, 0, "i8 product: input size");
        let m = x.len() / k;
        let mut out = QuantizedRows {
            quads: vec![0u32; m * kq],
            scale: vec![0f32; m],
            error: vec![0f32; m],
        };
        let mut scaled = vec![0f32; k];
        let mut bytes = vec![128u8; kq * 4];
        for (i, row) in x.chunks_exact(k).enumerate() {
            let mut top = 0f32;
            for (s, &v) in scaled.iter_mut().zip(row) {
                *s = v * self.scale;
                top = top.max(s.abs());
            }
            let alpha = if top > 0.0 && top.is_finite() {
                top / LEVELS
            } else {
                1.0
            };
            let mut abs_sum = 0f32;
            for (b, &s) in bytes.iter_mut().zip(&scaled) {
                let q = (s / alpha).round().clamp(-LEVELS, LEVELS);
                abs_sum += q.abs();
                *b = (q as i32 + 128) as u8;
            }
            for (dst, quad) in out.quads[i * kq..][..kq]
                .iter_mut()
                .zip(bytes.chunks_exact(4))
            {
                *dst = u32::from_le_bytes([quad[0], quad[1], quad[2], quad[3]]);
            }
            out.scale[i] = alpha;
            // 0.501, not 0.5: the f32 scalings before rounding add a
            // little (each off by at most 2⁻²³ of ≤ 127). The weights' half
            // of the error is added per column by the product.
            out.error[i] = alpha * (0.501 * abs_sum + 0.251 * k as f32);
        }
        out
    }

    /// `out` (`m × n`, row-major) `= α (x̃ w̃ᵀ + Σ|w̃|/2) + bias` for rows
    /// `rows` of `x` as [`Self::quantize`] made them, on this thread: at
    /// least `x Wᵀ + bias` minus the row's `error`, and at most that plus
    /// the row's error and `α Σ|w̃|` (the bound a search prunes with).
    ///
    /// # Panics
    /// When `rows` is out of range or `out` is not `rows.len() · n` floats.
    pub fn product(&self, x: &QuantizedRows, rows: std::ops::Range<usize>, out: &mut [f32]) {
        let kq = self.k_quads;
        let quads = &x.quads[rows.start * kq..rows.end * kq];
        let scale = &x.scale[rows.clone()];
        assert_eq!(out.len(), rows.len() * self.n, "i8 product: output size");
        if out.is_empty() {
            return;
        }
        #[cfg(target_arch = "x86_64")]
        // SAFETY: `new` only builds a `FixedI8Product` where `available()` holds.
        unsafe {
            x86::block(self, quads, scale, out)
        };
        #[cfg(not(target_arch = "x86_64"))]
        let _ = (quads, scale);
    }
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use std::arch::x86_64::*;

    use super::{Columns, FixedI8Product, MR, NR};

    /// One `ROWS × NR` tile over all of `k`: `a` points at row 0's quads
    /// (`k_quads` per row), `b` at the panel.
    #[target_feature(enable = "avx512f,avx512bw,avx512vnni")]
    #[allow(clippy::too_many_arguments)]
    unsafe fn tile<const ROWS: usize>(
        a: *const u32,
        b: *const u32,
        k_quads: usize,
        scale: *const f32,
        columns: &Columns,
        c: *mut f32,
        ldc: usize,
        cols: usize,
    ) {
        let mut acc = [[_mm512_setzero_si512(); 3]; ROWS];
        for q in 0..k_quads {
            // SAFETY (whole block): the caller passes a panel of
            // `k_quads · NR` quads and `ROWS` rows of `k_quads` quads.
            unsafe {
                let bq = b.add(q * NR);
                let b0 = _mm512_loadu_si512(bq.cast());
                let b1 = _mm512_loadu_si512(bq.add(16).cast());
                let b2 = _mm512_loadu_si512(bq.add(32).cast());
                for (r, acc) in acc.iter_mut().enumerate() {
                    let av = _mm512_set1_epi32(*a.add(r * k_quads + q) as i32);
                    acc[0] = _mm512_dpbusd_epi32(acc[0], av, b0);
                    acc[1] = _mm512_dpbusd_epi32(acc[1], av, b1);
                    acc[2] = _mm512_dpbusd_epi32(acc[2], av, b2);
                }
            }
        }
        let mut row = [0f32; NR];
        for (r, acc) in acc.iter().enumerate() {
            // SAFETY: `scale` has `ROWS` values; 16 values at 16·j are in
            // each of `columns`' arrays and in `row`; the caller's `c` has `ROWS` rows of
            // `ldc ≥ cols` floats.
            unsafe {
                let alpha = _mm512_set1_ps(*scale.add(r));
                for (j, &v) in acc.iter().enumerate() {
                    let shift = _mm512_loadu_si512(columns.shift.as_ptr().add(16 * j).cast());
                    let sum = _mm512_add_ps(
                        _mm512_cvtepi32_ps(_mm512_sub_epi32(v, shift)),
                        _mm512_loadu_ps(columns.slack.as_ptr().add(16 * j)),
                    );
                    let bias = _mm512_loadu_ps(columns.bias.as_ptr().add(16 * j));
                    let v = _mm512_fmadd_ps(sum, alpha, bias);
                    if cols == NR {
                        _mm512_storeu_ps(c.add(r * ldc + 16 * j), v);
                    } else {
                        _mm512_storeu_ps(row.as_mut_ptr().add(16 * j), v);
                    }
                }
                if cols < NR {
                    std::ptr::copy_nonoverlapping(row.as_ptr(), c.add(r * ldc), cols);
                }
            }
        }
    }

    /// Every row of `a` against every panel.
    #[target_feature(enable = "avx512f,avx512bw,avx512vnni")]
    pub(super) fn block(w: &FixedI8Product, a: &[u32], scale: &[f32], c: &mut [f32]) {
        let (n, kq) = (w.n, w.k_quads);
        let rows = scale.len();
        for (p, panel) in w.panels.chunks_exact(kq * NR).enumerate() {
            let cols = (n - p * NR).min(NR);
            for r0 in (0..rows).step_by(MR) {
                let mr = (rows - r0).min(MR);
                // SAFETY: rows r0..r0+mr exist in `a` (kq quads each), in
                // `scale` and in `c` (n floats each, from column p·NR on,
                // `cols` of them).
                unsafe {
                    tile_rows(
                        mr,
                        a.as_ptr().add(r0 * kq),
                        panel.as_ptr(),
                        kq,
                        scale.as_ptr().add(r0),
                        &w.columns[p],
                        c.as_mut_ptr().add(r0 * n + p * NR),
                        n,
                        cols,
                    );
                }
            }
        }
    }

    /// [`tile`] for `rows` rows: 8 or 4 at once, odd leftovers one at a time.
    #[target_feature(enable = "avx512f,avx512bw,avx512vnni")]
    #[allow(clippy::too_many_arguments)]
    unsafe fn tile_rows(
        rows: usize,
        a: *const u32,
        b: *const u32,
        k_quads: usize,
        scale: *const f32,
        columns: &Columns,
        c: *mut f32,
        ldc: usize,
        cols: usize,
    ) {
        // SAFETY: forwarded from the caller, row by row for the leftovers.
        unsafe {
            match rows {
                8 => tile::<8>(a, b, k_quads, scale, columns, c, ldc, cols),
                4 => tile::<4>(a, b, k_quads, scale, columns, c, ldc, cols),
                _ => {
                    for r in 0..rows {
                        tile::<1>(
                            a.add(r * k_quads),
                            b,
                            k_quads,
                            scale.add(r),
                            columns,
                            c.add(r * ldc),
                            ldc,
                            cols,
                        );
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn values(count: usize, seed: u64) -> Vec<f32> {
        let mut state = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
        (0..count)
            .map(|_| {
                state ^= state << 13;
                state ^= state >> 7;
                state ^= state << 17;
                (state >> 40) as f32 / (1u64 << 24) as f32 * 2.0 - 1.0
            })
            .collect()
    }

    #[test]
    fn product_stays_within_its_stated_error() {
        if !available() {
            assert!(FixedI8Product::new(&[1.0], 1, 1, &[0.0]).is_none());
            eprintln!("SKIPPED: this CPU has no AVX512-VNNI");
            return;
        }
        assert!(
            FixedI8Product::new(&[1.0; 6], 3, 2, &[0.0; 2]).is_none(),
            "bias size"
        );
        assert!(
            FixedI8Product::new(&[f32::NAN], 1, 1, &[0.0]).is_none(),
            "not finite"
        );
        // Axes of falling spread, as principal axes have; odd sizes reach
        // every tail of the kernel (rows past a panel, quads, row tiles).
        for (m, n, k) in [
            (1, 1, 1),
            (16, 96, 74),
            (13, 100, 73),
            (16, 48, 64),
            (3, 7, 5),
        ] {
            let spread = |l: usize| 40.0 / (1.0 + l as f32);
            let x: Vec<f32> = values(m * k, k as u64)
                .iter()
                .enumerate()
                .map(|(i, v)| v * spread(i % k))
                .collect();
            let w: Vec<f32> = values(n * k, n as u64)
                .iter()
                .enumerate()
                .map(|(i, v)| v * spread(i % k))
                .collect();
            let bias: Vec<f32> = values(n, 9).iter().map(|v| v * 500.0).collect();
            let product = FixedI8Product::new(&w, n, k, &bias).expect("packs");
            assert_eq!((product.n(), product.k()), (n, k));
            let rows = product.quantize(&x);
            let mut got = vec![f32::NAN; m * n];
            product.product(&rows, 0..m, &mut got);
            let mut worst = 0f64;
            for i in 0..m {
                for j in 0..n {
                    let exact: f64 = (0..k)
                        .map(|l| f64::from(x[i * k + l]) * f64::from(w[j * k + l]))
                        .sum::<f64>()
                        + f64::from(bias[j]);
                    let g = f64::from(got[i * n + j]);
                    // The stated bound plus the f32 rounding of the result.
                    let below = f64::from(rows.error[i]) + 1e-6 * (exact.abs() + 1.0);
                    let column = f64::from(product.columns[j / NR].slack[j % NR]);
                    let above = below + 2.0 * f64::from(rows.scale[i]) * column;
                    assert!(
                        g >= exact - below && g <= exact + above,
                        "{m}x{n}x{k} [{i}, {j}]: {g} vs {exact} (-{below}, +{above})"
                    );
                    worst = worst.max((exact - g) / below);
                }
            }
            // The bound is not vacuous: the worst error uses some of it.
            assert!(k < 8 || worst > 0.02, "{m}x{n}x{k}: worst {worst}");
            // A sub-range of rows gives the same outputs.
            if m > 2 {
                let mut part = vec![f32::NAN; 2 * n];
                product.product(&rows, 1..3, &mut part);
                assert_eq!(part, got[n..3 * n]);
            }
        }
    }

    #[test]
    fn rounding_that_adds_up_in_one_direction_stays_within_each_half_of_the_bound() {
        if !available() {
            return;
        }
        // Every weight on a level (exact) and every input but the largest
        // just under half a step above one: each product rounds down by
        // almost half a step of `x` times a full-scale weight, the case the
        // per-column half of the bound is for.
        let k = 16;
        let w = vec![1f32; 48 * k];
        let product = FixedI8Product::new(&w, 48, k, &[0.0; 48]).expect("packs");
        let mut x = vec![0.4999f32; k];
        x[0] = 1.0;
        let rows = product.quantize(&x);
        let mut got = vec![f32::NAN; 48];
        product.product(&rows, 0..1, &mut got);
        let exact: f32 = x.iter().sum();
        for &g in &got {
            assert!(
                g >= exact - rows.error[0],
                "{g} vs {exact} (error {})",
                rows.error[0]
            );
            assert!(g - exact < 4.0 * rows.error[0], "{g} vs {exact}");
        }
        // The mirror case: every input on a level and every weight but one
        // just under half a step above one, the row's half of the bound.
        let mut w = vec![0.4999f32; 48 * k];
        for row in w.chunks_exact_mut(k) {
            row[0] = 1.0;
        }
        let product = FixedI8Product::new(&w, 48, k, &[0.0; 48]).expect("packs");
        let x = vec![1f32; k];
        let rows = product.quantize(&x);
        product.product(&rows, 0..1, &mut got);
        let exact: f32 = w[..k].iter().sum();
        for g in got {
            assert!(
                g >= exact - rows.error[0],
                "{g} vs {exact} (error {})",
                rows.error[0]
            );
        }
    }
}
