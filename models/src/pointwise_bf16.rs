//! The 1×1 layers of [`crate::pointwise`] in bf16, for
//! [`Precision::Bf16`](crate::Precision::Bf16): the weights rounded to bf16
//! once at load, each input plane rounded per call, and every product
//! summed in f32 by `vdpbf16ps` (twice the f32 FMA rate on CPUs with
//! AVX512-BF16). Features then drift from the f32 path by that rounding;
//! `models/src/efficientnet.rs` bounds the drift in a test.
//! [`PackedPointwiseBf16::new`] returns `None` where the CPU lacks the
//! instructions, so the f32 kernel runs there.

// The kernel needs raw pointers and CPU intrinsics; every unsafe block states
// what it relies on, and the workspace denies unsafe code everywhere else.
#![allow(unsafe_code)]

use rayon::prelude::*;

use crate::bf16_gemm::{available, pair};
// The f32 kernel's tile shape and task split.
use crate::pointwise::{MR, NR, Packed1x1, SharedOut, in_tasks};

/// A 1×1 convolution's weight (`[cout, cin]`) in bf16, packed as
/// `[ceil(cout / MR)][ceil(cin / 2)][MR]` pairs of input channels (what
/// `vdpbf16ps` multiplies; rows past `cout` and an odd last channel are
/// zero), and its f32 bias.
#[derive(Debug, Clone)]
pub(crate) struct PackedPointwiseBf16 {
    cout: usize,
    cin: usize,
    k_pairs: usize,
    panels: Vec<u32>,
    bias: Vec<f32>,
}

impl PackedPointwiseBf16 {
    /// Packs `weight` (`[cout, cin]`, row-major) and `bias` (`[cout]`);
    /// `None` without AVX512-BF16 or when the sizes do not agree.
    pub(crate) fn new(weight: &[f32], bias: &[f32], cout: usize, cin: usize) -> Option<Self> {
        if !available() || cout == 0 || cin == 0 {
            return None;
        }
        if weight.len() != cout.checked_mul(cin)? || bias.len() != cout {
            return None;
        }
        let k_pairs = cin.div_ceil(2);
        let mut panels = vec![0u32; cout.div_ceil(MR) * k_pairs * MR];
        for (o, row) in weight.chunks_exact(cin).enumerate() {
            let panel = &mut panels[(o / MR) * k_pairs * MR..][..k_pairs * MR];
            for (kp, two) in row.chunks(2).enumerate() {
                panel[kp * MR + o % MR] = pair(two[0], two.get(1).copied().unwrap_or(0.0));
            }
        }
        Some(Self {
            cout,
            cin,
            k_pairs,
            panels,
            bias: bias.to_vec(),
        })
    }
}

/// One micro-tile's operands: up to `MR` output channels × `width ≤ NR`
/// pixels.
struct Tile<'a> {
    /// The panel of the tile's `MR` channels, `[k_pairs][MR]`.
    w: &'a [u32],
    /// The bias of the channels that exist (1 to `MR`).
    bias: &'a [f32],
    /// The input pairs from the tile's first pixel on, rows `p` apart.
    x: &'a [u32],
    p: usize,
    width: usize,
    relu6: bool,
    /// The residual from the tile's first value on, rows `p` apart.
    residual: Option<&'a [f32]>,
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use std::arch::x86_64::*;

    use super::{MR, Tile};
    use crate::pointwise::NV;
    use crate::pointwise::x86::mask;

    /// `dst[j]` = the bf16 pair (`lo[j]`, `hi[j]`) (`hi` zero when absent),
    /// rounded to nearest even as [`crate::bf16_gemm`] rounds.
    ///
    /// # Safety
    /// The CPU must have AVX-512F and AVX512-BF16.
    #[target_feature(enable = "avx512f,avx512bf16")]
    pub(super) unsafe fn interleave(lo: &[f32], hi: Option<&[f32]>, dst: &mut [u32]) {
        let n = dst.len().min(lo.len());
        let full = n / 16;
        for i in 0..full {
            // SAFETY: 16 values at 16·i are in `lo`, `hi` (same length) and
            // `dst`.
            unsafe {
                let l = _mm512_cvtneps_pbh(_mm512_loadu_ps(lo.as_ptr().add(16 * i)));
                let l: __m512i = _mm512_cvtepu16_epi32(std::mem::transmute::<__m256bh, __m256i>(l));
                let both = match hi {
                    Some(hi) => {
                        let h = _mm512_cvtneps_pbh(_mm512_loadu_ps(hi.as_ptr().add(16 * i)));
                        let h = _mm512_cvtepu16_epi32(std::mem::transmute::<__m256bh, __m256i>(h));
                        _mm512_or_si512(l, _mm512_slli_epi32::<16>(h))
                    }
                    None => l,
                };
                _mm512_storeu_si512(dst.as_mut_ptr().add(16 * i).cast(), both);
            }
        }
        for j in 16 * full..n {
            dst[j] = super::pair(lo[j], hi.map_or(0.0, |h| h[j]));
        }
    }

    /// Writes the tile's `bias.len() × width` outputs at `out` (rows `p`
    /// apart).
    ///
    /// # Safety
    /// The CPU must have AVX-512F and AVX512-BF16; `out` must be valid for
    /// those writes.
    #[target_feature(enable = "avx512f,avx512bf16")]
    pub(super) unsafe fn tile(t: &Tile<'_>, out: *mut f32) {
        match t.width.div_ceil(16) {
            1 => unsafe { tile_v::<1>(t, out) },
            2 => unsafe { tile_v::<2>(t, out) },
            _ => unsafe { tile_v::<NV>(t, out) },
        }
    }

    #[target_feature(enable = "avx512f,avx512bf16")]
    unsafe fn tile_v<const V: usize>(t: &Tile<'_>, out: *mut f32) {
        let k_pairs = t.w.len() / MR;
        let rows = t.bias.len();
        assert!(
            t.x.len() >= (k_pairs - 1) * t.p + t.width,
            "pointwise bf16: input tile"
        );
        if let Some(res) = t.residual {
            assert!(
                res.len() >= (rows - 1) * t.p + t.width,
                "pointwise bf16: residual tile"
            );
        }
        let mut masks = [0 as __mmask16; V];
        for (v, m) in masks.iter_mut().enumerate() {
            *m = mask(t.width, v);
        }
        let mut acc = [[_mm512_setzero_ps(); V]; MR];
        for (r, a) in acc.iter_mut().enumerate().take(rows) {
            *a = [_mm512_set1_ps(t.bias[r]); V];
        }
        let (x, w) = (t.x.as_ptr(), t.w.as_ptr());
        for k in 0..k_pairs {
            let mut xv = [_mm512_setzero_si512(); V];
            for (v, xv) in xv.iter_mut().enumerate() {
                // SAFETY: row `k` holds `width` pairs from `x + k·p`
                // (asserted above); masked lanes are not read.
                *xv = unsafe { _mm512_maskz_loadu_epi32(masks[v], x.add(k * t.p + v * 16).cast()) };
            }
            for (r, a) in acc.iter_mut().enumerate() {
                // SAFETY: the panel holds `k_pairs · MR` pairs.
                let wv = _mm512_set1_epi32(unsafe { *w.add(k * MR + r) } as i32);
                // SAFETY: plain bit casts between 512-bit vectors.
                let wv: __m512bh = unsafe { std::mem::transmute(wv) };
                for (av, &xv) in a.iter_mut().zip(&xv) {
                    // SAFETY: as above.
                    let xv: __m512bh = unsafe { std::mem::transmute(xv) };
                    *av = _mm512_dpbf16_ps(*av, wv, xv);
                }
            }
        }
        let (zero, six) = (_mm512_setzero_ps(), _mm512_set1_ps(6.0));
        for (r, a) in acc.iter().enumerate().take(rows) {
            for (v, &av) in a.iter().enumerate() {
                let mut y = av;
                if t.relu6 {
                    y = _mm512_min_ps(_mm512_max_ps(y, zero), six);
                }
                let at = r * t.p + v * 16;
                if let Some(res) = t.residual {
                    // SAFETY: the residual holds this row's `width` values
                    // (asserted); masked lanes are not read.
                    y = _mm512_add_ps(y, unsafe {
                        _mm512_maskz_loadu_ps(masks[v], res.as_ptr().add(at))
                    });
                }
                // SAFETY: the caller gives room for this row's `width` values.
                unsafe { _mm512_mask_storeu_ps(out.add(at), masks[v], y) };
            }
        }
    }
}

impl Packed1x1 for PackedPointwiseBf16 {
    fn input_channels(&self) -> usize {
        self.cin
    }

    fn output_channels(&self) -> usize {
        self.cout
    }

    fn kernel(
        &self,
        x: &[f32],
        n: usize,
        p: usize,
        relu6: bool,
        residual: Option<&[f32]>,
    ) -> Vec<f32> {
        let (cin, cout, kp) = (self.cin, self.cout, self.k_pairs);
        // The input as pairs of channels, `[n][k_pairs][p]`.
        let mut pairs = vec![0u32; n * kp * p];
        pairs.par_chunks_mut(p).enumerate().for_each(|(row, dst)| {
            let (image, k2) = (row / kp, 2 * (row % kp));
            let plane = |k: usize| &x[(image * cin + k) * p..][..p];
            let hi = (k2 + 1 < cin).then(|| plane(k2 + 1));
            // SAFETY: `new` only builds the type where AVX512-BF16 exists.
            #[cfg(target_arch = "x86_64")]
            unsafe {
                x86::interleave(plane(k2), hi, dst)
            };
        });
        let task = |image: usize,
                    rows: std::ops::Range<usize>,
                    cols: std::ops::Range<usize>,
                    out: SharedOut| {
            let xi = &pairs[image * kp * p..][..kp * p];
            let ri = residual.map(|r| &r[image * cout * p..][..cout * p]);
            let mut j = cols.start;
            while j < cols.end {
                let width = NR.min(cols.end - j);
                for o in rows.clone().step_by(MR) {
                    let tile = Tile {
                        w: &self.panels[(o / MR) * kp * MR..][..kp * MR],
                        bias: &self.bias[o..cout.min(o + MR)],
                        x: &xi[j..],
                        p,
                        width,
                        relu6,
                        residual: ri.map(|r| &r[o * p + j..]),
                    };
                    // SAFETY: `in_tasks` gives room for the image's `cout ×
                    // p` values at `out`; `new` only builds the type where
                    // AVX512-BF16 exists.
                    #[cfg(target_arch = "x86_64")]
                    unsafe {
                        x86::tile(&tile, out.0.add(o * p + j))
                    };
                }
                j += width;
            }
        };
        // SAFETY: `task` writes every value of its rows × columns (whole
        // tiles of them), nothing else.
        unsafe { in_tasks(n, cout, p, task) }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn values(len: usize, seed: f32) -> Vec<f32> {
        (0..len)
            .map(|i| (i as f32 * 0.618 + seed).sin() * 3.0)
            .collect()
    }

    /// bf16 rounding of one value (nearest, ties to even).
    fn round(v: f32) -> f64 {
        let bits = v.to_bits();
        let r = bits.wrapping_add(0x7fff + ((bits >> 16) & 1)) & 0xffff_0000;
        f64::from(f32::from_bits(r))
    }

    #[test]
    fn matches_an_f64_product_of_the_rounded_values_at_every_edge() {
        if !available() {
            eprintln!("no AVX512-BF16: the f32 kernel runs on this CPU");
            return;
        }
        // Odd input channels (the zero half of the last pair), channels not
        // a multiple of MR, pixel counts around every tile and task edge.
        for &(n, cin, cout, p) in &[
            (1, 1, 1, 1),
            (1, 3, 5, 15),
            (2, 7, 13, 17),
            (1, 24, 144, 47),
            (2, 33, 70, 49),
            (1, 12, 130, 200),
        ] {
            let w = values(cout * cin, 0.1);
            let b = values(cout, 0.7);
            let x = values(n * cin * p, 1.3);
            let res = values(n * cout * p, 2.9);
            let packed = PackedPointwiseBf16::new(&w, &b, cout, cin).unwrap();
            for relu6 in [false, true] {
                for r in [None, Some(&res[..])] {
                    let got = packed.apply(&x, n, p, relu6, r);
                    for i in 0..n {
                        for o in 0..cout {
                            for j in 0..p {
                                let mut s = f64::from(b[o]);
                                for k in 0..cin {
                                    s += round(w[o * cin + k]) * round(x[(i * cin + k) * p + j]);
                                }
                                let mut y = s as f32;
                                if relu6 {
                                    y = y.clamp(0.0, 6.0);
                                }
                                let at = (i * cout + o) * p + j;
                                let want = y + r.map_or(0.0, |r| r[at]);
                                // Only the f32 sums' rounding remains.
                                let tol = 1e-5 * (1.0 + cin as f32) * 9.0;
                                assert!(
                                    (got[at] - want).abs() <= tol,
                                    "cin {cin} cout {cout} p {p}: {} vs {want}",
                                    got[at]
                                );
                            }
                        }
                    }
                }
            }
        }
    }
}
