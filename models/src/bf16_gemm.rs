//! A bf16 matrix product for linear layers on x86-64 CPUs with AVX512-BF16:
//! `y = act(x Wᵀ + b)` with `W` rounded to bf16 once (packed at load), `x`
//! rounded to bf16 per call, and f32 accumulation (`vdpbf16ps`), about twice
//! the f32 FMA rate. [`PackedBf16::new`] returns `None` where the CPU lacks
//! the instructions, so callers keep their f32 path as the fallback.
//!
//! candle's CPU bf16 matmul widens to f32 and no crate on crates.io offers a
//! `vdpbf16ps` GEMM, hence this compact kernel (tested against a naive product).

// The kernel needs raw pointers and CPU intrinsics; every unsafe block states
// what it relies on, and the workspace denies unsafe code everywhere else.
#![allow(unsafe_code)]

use rayon::prelude::*;

/// What the product's epilogue applies after adding the bias.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Epilogue {
    /// `x Wᵀ + b`.
    Bias,
    /// `g(x Wᵀ + b)` with `g(v) = v · sigmoid(1.702 v)` (CLIP's quick GELU).
    BiasQuickGelu,
}

/// `W` (`[n, k]`, row-major, as a linear layer stores it) in bf16, packed in
/// panels of [`NR`] output columns: for each pair of input positions, the 2
/// bf16 of each of the `NR` columns side by side (what `vdpbf16ps` multiplies).
#[derive(Debug, Clone)]
pub(crate) struct PackedBf16 {
    n: usize,
    k: usize,
    /// `k` rounded up to a pair.
    k_pairs: usize,
    /// `[ceil(n / NR)][k_pairs][NR]` pairs of bf16 as `u32`; columns past `n` are zero.
    panels: Vec<u32>,
}

/// Output columns per panel (3 AVX-512 vectors of 16 f32).
const NR: usize = 48;
/// Rows per micro-tile: 8 × 3 accumulators leave registers for the operands.
const MR: usize = 8;

/// Whether this CPU runs the bf16 kernel.
pub(crate) fn available() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        std::arch::is_x86_feature_detected!("avx512f")
            && std::arch::is_x86_feature_detected!("avx512bf16")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// Round to the nearest bf16, ties to even (as `vcvtneps2bf16`); NaN stays NaN.
fn to_bf16(v: f32) -> u16 {
    let bits = v.to_bits();
    if v.is_nan() {
        return ((bits >> 16) as u16) | 0x40;
    }
    let round = 0x7fff + ((bits >> 16) & 1);
    (bits.wrapping_add(round) >> 16) as u16
}

pub(crate) fn pair(lo: f32, hi: f32) -> u32 {
    u32::from(to_bf16(lo)) | (u32::from(to_bf16(hi)) << 16)
}

impl PackedBf16 {
    /// Packs `weight` (`[n, k]`, row-major); `None` without AVX512-BF16 or
    /// when `weight.len() != n * k`.
    pub(crate) fn new(weight: &[f32], n: usize, k: usize) -> Option<Self> {
        if !available() || weight.len() != n.checked_mul(k)? || n == 0 || k == 0 {
            return None;
        }
        let k_pairs = k.div_ceil(2);
        let n_panels = n.div_ceil(NR);
        let mut panels = vec![0u32; n_panels * k_pairs * NR];
        panels
            .par_chunks_exact_mut(k_pairs * NR)
            .enumerate()
            .for_each(|(p, panel)| {
                for c in 0..NR.min(n - p * NR) {
                    let w = &weight[(p * NR + c) * k..][..k];
                    for (kp, two) in w.chunks(2).enumerate() {
                        panel[kp * NR + c] = pair(two[0], two.get(1).copied().unwrap_or(0.0));
                    }
                }
            });
        Some(Self {
            n,
            k,
            k_pairs,
            panels,
        })
    }

    /// Output width.
    pub(crate) fn n(&self) -> usize {
        self.n
    }

    /// Input width.
    pub(crate) fn k(&self) -> usize {
        self.k
    }

    /// `epilogue(x Wᵀ + bias) + residual` for `x` of `m` rows of `k`
    /// (row-major); returns `m` rows of `n`. `bias` has `n` entries, a
    /// residual `m · n`.
    ///
    /// # Panics
    /// On any other size (callers check shapes).
    pub(crate) fn matmul(
        &self,
        x: &[f32],
        m: usize,
        bias: &[f32],
        epilogue: Epilogue,
        residual: Option<&[f32]>,
    ) -> Vec<f32> {
        assert_eq!(x.len(), m * self.k, "bf16 matmul: input size");
        assert_eq!(bias.len(), self.n, "bf16 matmul: bias size");
        if let Some(r) = residual {
            assert_eq!(r.len(), m * self.n, "bf16 matmul: residual size");
        }
        let mut out = vec![0f32; m * self.n];
        if m == 0 {
            return out;
        }
        #[cfg(target_arch = "x86_64")]
        {
            // SAFETY: `new` only builds a `PackedBf16` where `available()` holds.
            unsafe { x86::matmul(self, x, m, bias, epilogue, residual, &mut out) };
        }
        out
    }
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use std::arch::x86_64::*;

    use rayon::prelude::*;

    use super::{Epilogue, MR, NR, PackedBf16};

    /// Rows of `x` converted to bf16 pairs, `k_pairs` per row (odd `k` padded with 0).
    #[target_feature(enable = "avx512f,avx512bf16")]
    pub(super) fn convert_row(src: &[f32], dst: &mut [u32]) {
        let k = src.len();
        let full = k / 32;
        for i in 0..full {
            // SAFETY: 32 floats at 32·i are in `src`; 16 pairs at 16·i are in `dst`.
            unsafe {
                let lo = _mm512_loadu_ps(src.as_ptr().add(32 * i));
                let hi = _mm512_loadu_ps(src.as_ptr().add(32 * i + 16));
                let packed: __m512i = std::mem::transmute(_mm512_cvtne2ps_pbh(hi, lo));
                _mm512_storeu_si512(dst.as_mut_ptr().add(16 * i).cast(), packed);
            }
        }
        for (j, slot) in dst.iter_mut().enumerate().skip(16 * full) {
            let lo = src[2 * j];
            let hi = src.get(2 * j + 1).copied().unwrap_or(0.0);
            *slot = super::pair(lo, hi);
        }
    }

    /// `exp(v)` to about 1 ulp: 2ⁿ · p(r) with `r = v - n·ln2`, `|r| ≤ ln2/2`,
    /// and a degree-6 Taylor polynomial (error < 2e-7 relative).
    #[target_feature(enable = "avx512f")]
    fn exp(v: __m512) -> __m512 {
        let v = _mm512_max_ps(
            _mm512_min_ps(v, _mm512_set1_ps(88.0)),
            _mm512_set1_ps(-88.0),
        );
        let n = _mm512_roundscale_ps::<{ _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC }>(
            _mm512_mul_ps(v, _mm512_set1_ps(std::f32::consts::LOG2_E)),
        );
        let r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693_145_75), v);
        let r = _mm512_fnmadd_ps(n, _mm512_set1_ps(1.428_606_8e-6), r);
        let mut p = _mm512_set1_ps(1.0 / 720.0);
        for c in [1.0 / 120.0, 1.0 / 24.0, 1.0 / 6.0, 0.5, 1.0, 1.0] {
            p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(c));
        }
        _mm512_scalef_ps(p, n)
    }

    /// 16 sums plus their bias (`bias` points at 16 floats), then the epilogue.
    #[target_feature(enable = "avx512f")]
    unsafe fn finish(v: __m512, bias: *const f32, epilogue: Epilogue) -> __m512 {
        // SAFETY: the caller passes 16 readable floats.
        let v = _mm512_add_ps(v, unsafe { _mm512_loadu_ps(bias) });
        if epilogue == Epilogue::BiasQuickGelu {
            let e = exp(_mm512_mul_ps(v, _mm512_set1_ps(-1.702)));
            _mm512_div_ps(v, _mm512_add_ps(e, _mm512_set1_ps(1.0)))
        } else {
            v
        }
    }

    /// One `rows × NR` tile over all of `k`: `a` points at row 0 of the
    /// converted input (`lda` pairs per row), `b` at the panel.
    #[target_feature(enable = "avx512f,avx512bf16")]
    #[allow(clippy::too_many_arguments)]
    unsafe fn tile<const ROWS: usize>(
        a: *const u32,
        lda: usize,
        b: *const u32,
        k_pairs: usize,
        bias: &[f32; NR],
        epilogue: Epilogue,
        residual: Option<*const f32>,
        c: *mut f32,
        ldc: usize,
        cols: usize,
    ) {
        let mut acc = [[_mm512_setzero_ps(); 3]; ROWS];
        for p in 0..k_pairs {
            // SAFETY (whole block): the caller passes a panel of `k_pairs · NR`
            // pairs and `ROWS` rows of `lda ≥ k_pairs` pairs.
            unsafe {
                let bp = b.add(p * NR);
                let b0: __m512bh = std::mem::transmute(_mm512_loadu_si512(bp.cast()));
                let b1: __m512bh = std::mem::transmute(_mm512_loadu_si512(bp.add(16).cast()));
                let b2: __m512bh = std::mem::transmute(_mm512_loadu_si512(bp.add(32).cast()));
                for (r, acc) in acc.iter_mut().enumerate() {
                    let av: __m512bh =
                        std::mem::transmute(_mm512_set1_epi32(*a.add(r * lda + p) as i32));
                    acc[0] = _mm512_dpbf16_ps(acc[0], av, b0);
                    acc[1] = _mm512_dpbf16_ps(acc[1], av, b1);
                    acc[2] = _mm512_dpbf16_ps(acc[2], av, b2);
                }
            }
        }
        if cols == NR {
            // A whole panel: straight from the registers to the output.
            for (r, acc) in acc.iter().enumerate() {
                for (j, &v) in acc.iter().enumerate() {
                    // SAFETY: 16 floats at 16·j are in `bias`; the caller's
                    // `c` (and the residual, laid out like it) has `ROWS`
                    // rows of `ldc ≥ cols = NR` floats.
                    unsafe {
                        let mut v = finish(v, bias.as_ptr().add(16 * j), epilogue);
                        if let Some(res) = residual {
                            v = _mm512_add_ps(v, _mm512_loadu_ps(res.add(r * ldc + 16 * j)));
                        }
                        _mm512_storeu_ps(c.add(r * ldc + 16 * j), v);
                    }
                }
            }
            return;
        }
        let mut row = [0f32; NR];
        for (r, acc) in acc.iter().enumerate() {
            for (j, &v) in acc.iter().enumerate() {
                // SAFETY: 16 floats at 16·j are in `bias` and `row`.
                unsafe {
                    let v = finish(v, bias.as_ptr().add(16 * j), epilogue);
                    _mm512_storeu_ps(row.as_mut_ptr().add(16 * j), v);
                }
            }
            if let Some(res) = residual {
                // SAFETY: the residual has the layout of `c`.
                let res = unsafe { std::slice::from_raw_parts(res.add(r * ldc), cols) };
                for (o, &v) in row.iter_mut().zip(res) {
                    *o += v;
                }
            }
            // SAFETY: the caller's `c` has `ROWS` rows of `ldc ≥ cols` floats.
            unsafe { std::ptr::copy_nonoverlapping(row.as_ptr(), c.add(r * ldc), cols) };
        }
    }

    #[target_feature(enable = "avx512f,avx512bf16")]
    #[allow(clippy::too_many_arguments)]
    unsafe fn tile_any(
        rows: usize,
        a: *const u32,
        lda: usize,
        b: *const u32,
        k_pairs: usize,
        bias: &[f32; NR],
        epilogue: Epilogue,
        residual: Option<*const f32>,
        c: *mut f32,
        ldc: usize,
        cols: usize,
    ) {
        // SAFETY: forwarded from the caller.
        unsafe {
            match rows {
                8 => tile::<8>(a, lda, b, k_pairs, bias, epilogue, residual, c, ldc, cols),
                7 => tile::<7>(a, lda, b, k_pairs, bias, epilogue, residual, c, ldc, cols),
                6 => tile::<6>(a, lda, b, k_pairs, bias, epilogue, residual, c, ldc, cols),
                5 => tile::<5>(a, lda, b, k_pairs, bias, epilogue, residual, c, ldc, cols),
                4 => tile::<4>(a, lda, b, k_pairs, bias, epilogue, residual, c, ldc, cols),
                3 => tile::<3>(a, lda, b, k_pairs, bias, epilogue, residual, c, ldc, cols),
                2 => tile::<2>(a, lda, b, k_pairs, bias, epilogue, residual, c, ldc, cols),
                _ => tile::<1>(a, lda, b, k_pairs, bias, epilogue, residual, c, ldc, cols),
            }
        }
    }

    /// A block of rows against every panel: `a` holds `rows` converted rows,
    /// `c` the same rows of the output.
    #[target_feature(enable = "avx512f,avx512bf16")]
    pub(super) fn block(
        w: &PackedBf16,
        a: &[u32],
        bias: &[[f32; NR]],
        epilogue: Epilogue,
        residual: Option<&[f32]>,
        c: &mut [f32],
    ) {
        let (n, kp) = (w.n, w.k_pairs);
        let rows = a.len() / kp;
        for (p, panel) in w.panels.chunks_exact(kp * NR).enumerate() {
            let cols = (n - p * NR).min(NR);
            for r0 in (0..rows).step_by(MR) {
                let mr = (rows - r0).min(MR);
                // SAFETY: rows r0..r0+mr exist in `a` (kp pairs each) and in
                // `c` (n floats each, from column p·NR on, `cols` of them).
                unsafe {
                    tile_any(
                        mr,
                        a.as_ptr().add(r0 * kp),
                        kp,
                        panel.as_ptr(),
                        kp,
                        &bias[p],
                        epilogue,
                        residual.map(|res| res.as_ptr().add(r0 * n + p * NR)),
                        c.as_mut_ptr().add(r0 * n + p * NR),
                        n,
                        cols,
                    );
                }
            }
        }
    }

    /// # Safety
    /// The CPU must have AVX512F and AVX512-BF16 (`PackedBf16::new` checks).
    pub(super) unsafe fn matmul(
        w: &PackedBf16,
        x: &[f32],
        m: usize,
        bias: &[f32],
        epilogue: Epilogue,
        residual: Option<&[f32]>,
        out: &mut [f32],
    ) {
        let (n, k, kp) = (w.n, w.k, w.k_pairs);
        let mut a = vec![0u32; m * kp];
        a.par_chunks_mut(kp)
            .zip(x.par_chunks(k))
            // SAFETY: the caller guarantees the features.
            .for_each(|(dst, src)| unsafe { convert_row(src, dst) });
        let mut padded = vec![[0f32; NR]; n.div_ceil(NR)];
        for (i, &b) in bias.iter().enumerate() {
            padded[i / NR][i % NR] = b;
        }
        // Enough blocks to keep every thread busy, few enough to reuse each
        // panel; a block of rows (≤ 256 KiB) and one panel share the L2 cache.
        let threads = rayon::current_num_threads().max(1);
        let fit_l2 = ((256 << 10) / (4 * kp) / MR * MR).clamp(MR, 12 * MR);
        let block_rows = m
            .div_ceil(4 * threads)
            .next_multiple_of(MR)
            .clamp(MR, fit_l2);
        out.par_chunks_mut(block_rows * n)
            .zip(a.par_chunks(block_rows * kp))
            .enumerate()
            .for_each(|(i, (c, a))| {
                let res = residual.map(|r| &r[i * block_rows * n..][..c.len()]);
                // SAFETY: the caller guarantees the features.
                unsafe { block(w, a, &padded, epilogue, res, c) }
            });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn naive(x: &[f32], w: &[f32], bias: &[f32], m: usize, n: usize, k: usize) -> Vec<f32> {
        let mut out = vec![0f32; m * n];
        for i in 0..m {
            for j in 0..n {
                let mut s = f64::from(bias[j]);
                for l in 0..k {
                    s += f64::from(x[i * k + l]) * f64::from(w[j * k + l]);
                }
                out[i * n + j] = s as f32;
            }
        }
        out
    }

    /// Deterministic values in [-1, 1].
    fn values(len: usize, seed: u64) -> Vec<f32> {
        let mut s = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
        (0..len)
            .map(|_| {
                s ^= s << 13;
                s ^= s >> 7;
                s ^= s << 17;
                ((s >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
            })
            .collect()
    }

    fn round_trip(v: f32) -> f32 {
        f32::from_bits(u32::from(to_bf16(v)) << 16)
    }

    #[test]
    fn bf16_rounding_is_nearest_even() {
        assert_eq!(to_bf16(1.0), 0x3f80);
        // 1 + 2⁻⁸ is halfway between 1 and 1 + 2⁻⁷: ties to the even 1.
        assert_eq!(round_trip(1.0 + 1.0 / 256.0), 1.0);
        assert_eq!(round_trip(1.0 + 3.0 / 256.0), 1.0 + 4.0 / 256.0);
        assert!(round_trip(f32::NAN).is_nan());
        assert_eq!(round_trip(f32::INFINITY), f32::INFINITY);
    }

    #[test]
    fn matches_a_naive_product_on_bf16_rounded_inputs() {
        if !available() {
            eprintln!("SKIPPED: this CPU has no AVX512-BF16; the f32 path is used instead");
            return;
        }
        // Odd and edge sizes: partial tiles, partial panels, odd k, k below
        // and above one 32-float conversion chunk.
        for (m, n, k) in [
            (1, 1, 1),
            (3, 5, 7),
            (8, 48, 32),
            (9, 49, 33),
            (17, 100, 65),
            (130, 96, 2),
            (37, 150, 768),
        ] {
            let x = values(m * k, (m * 1000 + k) as u64);
            let w = values(n * k, (n * 7 + k) as u64);
            let bias = values(n, n as u64);
            let packed = PackedBf16::new(&w, n, k).expect("packs");
            assert_eq!((packed.n(), packed.k()), (n, k));
            let xr: Vec<f32> = x.iter().map(|&v| round_trip(v)).collect();
            let wr: Vec<f32> = w.iter().map(|&v| round_trip(v)).collect();
            let want = naive(&xr, &wr, &bias, m, n, k);
            let got = packed.matmul(&x, m, &bias, Epilogue::Bias, None);
            for (i, (g, e)) in got.iter().zip(&want).enumerate() {
                // Only the f32 summation order differs from the exact product.
                let tol = 1e-5 * (k as f32).sqrt() * (1.0 + e.abs());
                assert!((g - e).abs() <= tol, "{m}x{n}x{k} [{i}]: {g} vs {e}");
            }
            let residual = values(m * n, 3);
            let gelu = packed.matmul(&x, m, &bias, Epilogue::BiasQuickGelu, Some(&residual));
            for (i, ((g, e), r)) in gelu.iter().zip(&want).zip(&residual).enumerate() {
                let e = e / (1.0 + (-1.702 * e).exp()) + r;
                let tol = 1e-5 * (k as f32).sqrt() * (1.0 + e.abs());
                assert!((g - e).abs() <= tol, "gelu {m}x{n}x{k} [{i}]: {g} vs {e}");
            }
        }
    }

    #[test]
    fn close_to_the_f32_product() {
        if !available() {
            eprintln!("SKIPPED: this CPU has no AVX512-BF16");
            return;
        }
        let (m, n, k) = (20, 64, 512);
        let x = values(m * k, 1);
        let w = values(n * k, 2);
        let bias = vec![0f32; n];
        let want = naive(&x, &w, &bias, m, n, k);
        let got =
            PackedBf16::new(&w, n, k)
                .expect("packs")
                .matmul(&x, m, &bias, Epilogue::Bias, None);
        let scale = (k as f32 / 9.0).sqrt(); // spread of a sum of k products of U(-1,1)
        let worst = got
            .iter()
            .zip(&want)
            .map(|(g, e)| (g - e).abs() / scale)
            .fold(0f32, f32::max);
        // Two bf16 roundings (8-bit mantissas) per product, averaged over k.
        assert!(worst < 1e-2, "relative drift {worst}");
    }

    #[test]
    fn refuses_a_wrong_weight_size() {
        assert!(PackedBf16::new(&[1.0; 6], 2, 4).is_none());
        assert!(PackedBf16::new(&[], 0, 4).is_none());
    }
}

#[cfg(test)]
mod throughput {
    use super::*;

    /// `cargo test --release -p flawscope-models --lib bf16_gemm::throughput -- --ignored --nocapture`
    /// (run under `perf stat -e task-clock` for the CPU time on a loaded machine).
    #[test]
    #[ignore = "timing, not a check"]
    #[allow(clippy::panic)]
    fn one_shape() {
        if !available() {
            return;
        }
        // BF16_SHAPE=m,n,k picks another shape (fc2: 1440,768,3072).
        let shape: Vec<usize> = std::env::var("BF16_SHAPE")
            .unwrap_or_else(|_| "1440,3072,768".into())
            .split(',')
            .filter_map(|v| v.parse().ok())
            .collect();
        let &[m, n, k] = shape.as_slice() else {
            panic!("BF16_SHAPE=m,n,k");
        };
        let x = vec![0.5f32; m * k];
        let w = vec![0.25f32; n * k];
        let bias = vec![0f32; n];
        let packed = PackedBf16::new(&w, n, k).expect("packs");
        let reps = 20;
        let start = std::time::Instant::now();
        for _ in 0..reps {
            std::hint::black_box(packed.matmul(&x, m, &bias, Epilogue::Bias, None));
        }
        let s = start.elapsed().as_secs_f64();
        let gflop = 2.0 * (m * n * k) as f64 * reps as f64 / 1e9;
        println!(
            "{m}x{n}x{k}: {gflop:.1} GFLOP in {s:.3} s wall: {:.1} GFLOP/s",
            gflop / s
        );
    }
}
