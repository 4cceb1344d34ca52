//! 1×1 convolutions (the expand, project and head layers of
//! EfficientNet-Lite) as an AVX-512 f32 matrix product with the bias, ReLU6
//! and residual add fused into the product's last pass.
//!
//! candle's CPU matrix product (the `gemm` crate) runs 8-lane AVX2 kernels on
//! stable Rust and needs a separate pass for the bias and activation; a
//! profile of a Lite0 forward put a third of its time there. This kernel
//! works on the channel-major `[C, H·W]` planes directly: the weights are
//! packed once at load into panels of [`MR`] output channels, and each
//! micro-tile keeps `MR × 48` sums in registers over the whole input depth.
//! [`PackedPointwise::new`] returns `None` where the CPU lacks AVX-512, so
//! callers keep candle's product there.

// The kernel needs raw pointers and CPU intrinsics; every unsafe block states
// what it relies on, and the workspace denies unsafe code everywhere else.
#![allow(unsafe_code)]

use crate::depthwise::f32_slice;
use candle_core::{CpuStorage, CustomOp1, CustomOp2, Layout, Shape, bail};
use rayon::prelude::*;

/// Output channels per micro-tile (of this kernel and the bf16 one).
pub(crate) const MR: usize = 8;
/// 16-lane vectors of pixels per micro-tile.
pub(crate) const NV: usize = 3;
/// Pixels per micro-tile.
pub(crate) const NR: usize = NV * 16;
/// Output channels per task (a multiple of [`MR`]).
const ROW_CHUNK: usize = 64;
/// Pixels per task (a multiple of [`NR`]).
const COL_CHUNK: usize = 4 * NR;

/// Whether this CPU runs the kernel.
pub(crate) fn available() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        std::arch::is_x86_feature_detected!("avx512f")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// A 1×1 convolution's weight (`[cout, cin]`) packed as
/// `[ceil(cout / MR)][cin][MR]` (rows past `cout` are zero), and its bias.
#[derive(Debug, Clone)]
pub(crate) struct PackedPointwise {
    cout: usize,
    cin: usize,
    panels: Vec<f32>,
    bias: Vec<f32>,
}

impl PackedPointwise {
    /// Packs `weight` (`[cout, cin]`, row-major) and `bias` (`[cout]`);
    /// `None` without AVX-512 or when the sizes do not agree.
    pub(crate) fn new(weight: &[f32], bias: &[f32], cout: usize, cin: usize) -> Option<Self> {
        if !available() || cout == 0 || cin == 0 {
            return None;
        }
        if weight.len() != cout.checked_mul(cin)? || bias.len() != cout {
            return None;
        }
        let blocks = cout.div_ceil(MR);
        let mut panels = vec![0f32; blocks * cin * MR];
        for (o, row) in weight.chunks_exact(cin).enumerate() {
            let panel = &mut panels[(o / MR) * cin * MR..][..cin * MR];
            for (k, &w) in row.iter().enumerate() {
                panel[k * MR + o % MR] = w;
            }
        }
        Some(Self {
            cout,
            cin,
            panels,
            bias: bias.to_vec(),
        })
    }

    /// The first `cols` pixels of every output channel, on the calling
    /// thread: `out[o · out_stride + j]` for `o < cout`, `j < cols`, from
    /// `band.x[k · x_stride + j]` (the fused block's row bands).
    ///
    /// # Panics
    /// When `out`, the input or the residual is too short for those reads
    /// and writes.
    pub(crate) fn forward_band(&self, band: &Band<'_>, cols: usize, out: &mut [f32]) {
        if cols == 0 {
            return;
        }
        let span = (self.cout - 1) * band.out_stride + cols;
        assert!(out.len() >= span, "pointwise: output band");
        // SAFETY: `out` holds every value written (asserted above).
        unsafe { self.forward_band_raw(band, cols, out.as_mut_ptr()) }
    }

    /// [`Self::forward_band`] through a pointer, for outputs that tasks
    /// share row by row.
    ///
    /// # Safety
    /// `out` must be valid for writes of `(cout − 1) · out_stride + cols`
    /// values.
    pub(crate) unsafe fn forward_band_raw(&self, band: &Band<'_>, cols: usize, out: *mut f32) {
        if cols == 0 {
            return;
        }
        assert!(
            band.x.len() >= (self.cin - 1) * band.x_stride + cols,
            "pointwise: input band"
        );
        // SAFETY: forwarded from the caller; the type exists only where the
        // CPU has AVX-512F (`new`).
        unsafe { self.task(band, 0..self.cout, 0..cols, out) }
    }

    /// One task: output rows `rows` (a multiple of `MR` from its start) and
    /// columns `cols` of one image, written to `out` (rows
    /// `band.out_stride` apart).
    ///
    /// # Safety
    /// `out` must be valid for writes of `(cout − 1) · out_stride + cols.end`
    /// values and the CPU must have AVX-512F.
    unsafe fn task(
        &self,
        band: &Band<'_>,
        rows: std::ops::Range<usize>,
        cols: std::ops::Range<usize>,
        out: *mut f32,
    ) {
        #[cfg(target_arch = "x86_64")]
        {
            let op = band.out_stride;
            let mut j = cols.start;
            while j < cols.end {
                let width = NR.min(cols.end - j);
                for o in rows.clone().step_by(MR) {
                    let tile = Tile {
                        w: &self.panels[(o / MR) * self.cin * MR..][..self.cin * MR],
                        bias: &self.bias[o..self.cout.min(o + MR)],
                        x: &band.x[j..],
                        x_stride: band.x_stride,
                        out_stride: op,
                        width,
                        relu6: band.relu6,
                        residual: band.residual.map(|r| &r[o * op + j..]),
                    };
                    // SAFETY: forwarded from the caller; `o · op + j` stays
                    // inside the values it may write.
                    unsafe { x86::tile(&tile, out.add(o * op + j)) };
                }
                j += width;
            }
        }
        #[cfg(not(target_arch = "x86_64"))]
        {
            let _ = (band, rows, cols, out);
            unreachable!("PackedPointwise is only built on x86-64");
        }
    }
}

/// The operands of one product over a band of pixels: input rows
/// `x_stride` apart; output and residual rows `out_stride` apart.
pub(crate) struct Band<'a> {
    pub(crate) x: &'a [f32],
    pub(crate) x_stride: usize,
    pub(crate) out_stride: usize,
    pub(crate) relu6: bool,
    /// Added after the activation, laid out as the output.
    pub(crate) residual: Option<&'a [f32]>,
}

/// The output of a 1×1 layer over `n` images of `cout × p` values, computed
/// in parallel tasks of [`ROW_CHUNK`] channels × [`COL_CHUNK`] pixels:
/// `task(image, rows, cols, out)`, with `out` the image's first value and
/// its rows `p` apart.
///
/// # Safety
/// Each call of `task` must write every value of rows `rows` × columns
/// `cols` of its image, and nothing else.
pub(crate) unsafe fn in_tasks<F>(n: usize, cout: usize, p: usize, task: F) -> Vec<f32>
where
    F: Fn(usize, std::ops::Range<usize>, std::ops::Range<usize>, SharedOut) + Sync,
{
    let total = n * cout * p;
    let mut out: Vec<f32> = Vec::with_capacity(total);
    if total == 0 {
        return out;
    }
    let col_chunks = p.div_ceil(COL_CHUNK);
    let row_chunks = cout.div_ceil(ROW_CHUNK);
    let dst = SharedOut(out.as_mut_ptr());
    (0..n * col_chunks * row_chunks)
        .into_par_iter()
        .for_each(|t| {
            let image = t / (col_chunks * row_chunks);
            let rest = t % (col_chunks * row_chunks);
            let (cc, rc) = (rest / row_chunks, rest % row_chunks);
            let cols = cc * COL_CHUNK..p.min((cc + 1) * COL_CHUNK);
            let rows = rc * ROW_CHUNK..cout.min((rc + 1) * ROW_CHUNK);
            // SAFETY: `out` has room for `total` values, so the image's
            // first value is inside it.
            task(
                image,
                rows,
                cols,
                SharedOut(unsafe { dst.at(image * cout * p) }),
            );
        });
    // SAFETY: the tasks cover every image, row and column, and each writes
    // all of its values (the caller's promise).
    unsafe { out.set_len(total) };
    out
}

/// The output pointer, shared by tasks that write disjoint parts of it
/// (here, in the bf16 kernel and in the fused blocks).
#[derive(Clone, Copy)]
pub(crate) struct SharedOut(pub(crate) *mut f32);
// SAFETY: each task writes a disjoint set of values (see `forward`).
unsafe impl Send for SharedOut {}
// SAFETY: as above.
unsafe impl Sync for SharedOut {}

impl SharedOut {
    /// The pointer `offset` values on (a method, so closures capture the
    /// whole `Sync` wrapper rather than its raw field).
    ///
    /// # Safety
    /// `offset` must stay inside the allocation.
    pub(crate) unsafe fn at(self, offset: usize) -> *mut f32 {
        // SAFETY: forwarded from the caller.
        unsafe { self.0.add(offset) }
    }
}

/// One micro-tile's operands: up to `MR` output channels × `width ≤ NR`
/// pixels.
struct Tile<'a> {
    /// The panel of the tile's `MR` channels, `[cin][MR]`.
    w: &'a [f32],
    /// The bias of the channels that exist (1 to `MR`).
    bias: &'a [f32],
    /// The input from the tile's first pixel on, rows `x_stride` apart.
    x: &'a [f32],
    x_stride: usize,
    /// How far apart the output's (and the residual's) rows are.
    out_stride: usize,
    width: usize,
    relu6: bool,
    /// The residual from the tile's first value on, rows `out_stride` apart.
    residual: Option<&'a [f32]>,
}

#[cfg(target_arch = "x86_64")]
pub(crate) mod x86 {
    use std::arch::x86_64::{
        __mmask16, _mm512_add_ps, _mm512_fmadd_ps, _mm512_mask_storeu_ps, _mm512_maskz_loadu_ps,
        _mm512_max_ps, _mm512_min_ps, _mm512_set1_ps, _mm512_setzero_ps,
    };

    use super::{MR, NV, Tile};

    /// Writes the tile's `bias.len() × width` outputs at `out` (rows
    /// `out_stride` apart).
    ///
    /// # Safety
    /// The CPU must have AVX-512F; `out` must be valid for those writes.
    #[target_feature(enable = "avx512f")]
    pub(super) unsafe fn tile(t: &Tile<'_>, out: *mut f32) {
        match t.width.div_ceil(16) {
            1 => unsafe { tile_v::<1>(t, out) },
            2 => unsafe { tile_v::<2>(t, out) },
            _ => unsafe { tile_v::<NV>(t, out) },
        }
    }

    /// Lane mask of vector `v` of a tile `width` pixels wide.
    #[inline(always)]
    pub(crate) fn mask(width: usize, v: usize) -> __mmask16 {
        let lanes = width.saturating_sub(v * 16).min(16);
        ((1u32 << lanes) - 1) as __mmask16
    }

    #[target_feature(enable = "avx512f")]
    unsafe fn tile_v<const V: usize>(t: &Tile<'_>, out: *mut f32) {
        let cin = t.w.len() / MR;
        let rows = t.bias.len();
        // The last row read is `(cin − 1)·x_stride + width` values from `x`'s
        // start.
        assert!(
            t.x.len() >= (cin - 1) * t.x_stride + t.width,
            "pointwise: input tile"
        );
        let mut masks = [0 as __mmask16; V];
        for (v, m) in masks.iter_mut().enumerate() {
            *m = mask(t.width, v);
        }
        if let Some(res) = t.residual {
            assert!(
                res.len() >= (rows - 1) * t.out_stride + t.width,
                "pointwise: residual tile"
            );
        }
        let mut acc = [[_mm512_setzero_ps(); V]; MR];
        for (r, a) in acc.iter_mut().enumerate().take(rows) {
            *a = [_mm512_set1_ps(t.bias[r]); V];
        }
        let (x, w) = (t.x.as_ptr(), t.w.as_ptr());
        for k in 0..cin {
            let mut xv = [_mm512_setzero_ps(); V];
            for (v, xv) in xv.iter_mut().enumerate() {
                // SAFETY: row `k` of the input holds `width` values from
                // `x + k·x_stride` (asserted above); masked lanes are not read.
                *xv = unsafe { _mm512_maskz_loadu_ps(masks[v], x.add(k * t.x_stride + v * 16)) };
            }
            for (r, a) in acc.iter_mut().enumerate() {
                // SAFETY: the panel holds `cin · MR` weights.
                let wv = _mm512_set1_ps(unsafe { *w.add(k * MR + r) });
                for (av, &xv) in a.iter_mut().zip(&xv) {
                    *av = _mm512_fmadd_ps(wv, xv, *av);
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
                let at = r * t.out_stride + v * 16;
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

/// A 1×1 layer packed for one of the kernels: f32 ([`PackedPointwise`]) or
/// bf16 ([`crate::pointwise_bf16::PackedPointwiseBf16`]).
pub(crate) trait Packed1x1: Sync {
    fn input_channels(&self) -> usize;
    fn output_channels(&self) -> usize;
    /// `out[i, o, j] = act(bias[o] + Σ_k w[o, k] · x[i, k, j]) + residual[i, o, j]`
    /// for `n` images of `cin × p` values; returns `n · cout · p` values.
    /// `act` is ReLU6 when `relu6` is set; the bf16 kernel rounds `w` and
    /// `x` to bf16 first.
    ///
    /// # Panics
    /// When `x` or `residual` does not have the sizes above (callers check).
    fn apply(
        &self,
        x: &[f32],
        n: usize,
        p: usize,
        relu6: bool,
        residual: Option<&[f32]>,
    ) -> Vec<f32> {
        let (cin, cout) = (self.input_channels(), self.output_channels());
        assert_eq!(x.len(), n * cin * p, "pointwise: input size");
        if let Some(r) = residual {
            assert_eq!(r.len(), n * cout * p, "pointwise: residual size");
        }
        self.kernel(x, n, p, relu6, residual)
    }

    /// [`Packed1x1::apply`] once its sizes are checked.
    fn kernel(
        &self,
        x: &[f32],
        n: usize,
        p: usize,
        relu6: bool,
        residual: Option<&[f32]>,
    ) -> Vec<f32>;
}

impl Packed1x1 for PackedPointwise {
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
        let (cin, cout) = (self.cin, self.cout);
        let task = |image: usize, rows, cols, out: SharedOut| {
            let band = Band {
                x: &x[image * cin * p..][..cin * p],
                x_stride: p,
                out_stride: p,
                relu6,
                residual: residual.map(|r| &r[image * cout * p..][..cout * p]),
            };
            // SAFETY: `in_tasks` gives room for the image's `cout × p`
            // values at `out`; the CPU has AVX-512F (`new`).
            unsafe { self.task(&band, rows, cols, out.0) };
        };
        // SAFETY: `task` writes every value of its rows × columns, nothing
        // else.
        unsafe { in_tasks(n, cout, p, task) }
    }
}

/// A packed 1×1 layer as a candle op on `[N, cin, H, W]`, with the
/// residual (`[N, cout, H, W]`) as the second operand of the two-operand
/// form.
pub(crate) struct PointwiseOp<'a, K: Packed1x1> {
    pub(crate) packed: &'a K,
    pub(crate) relu6: bool,
}

impl<K: Packed1x1> PointwiseOp<'_, K> {
    fn run(
        &self,
        xs: &CpuStorage,
        xl: &Layout,
        residual: Option<(&CpuStorage, &Layout)>,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let (n, cin, h, w) = xl.shape().dims4()?;
        let (want, cout) = (self.packed.input_channels(), self.packed.output_channels());
        if cin != want {
            bail!("pointwise: input has {cin} channels, the weights {want}");
        }
        let x = f32_slice(xs, xl, "pointwise input")?;
        let shape = Shape::from((n, cout, h, w));
        let residual = match residual {
            Some((rs, rl)) => {
                if rl.shape() != &shape {
                    bail!("pointwise: residual {:?} is not {:?}", rl.shape(), shape);
                }
                Some(f32_slice(rs, rl, "pointwise residual")?)
            }
            None => None,
        };
        let out = self.packed.apply(x, n, h * w, self.relu6, residual);
        Ok((CpuStorage::F32(out), shape))
    }
}

impl<K: Packed1x1> CustomOp1 for PointwiseOp<'_, K> {
    fn name(&self) -> &'static str {
        "flawscope-pointwise"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        self.run(s, l, None)
    }
}

impl<K: Packed1x1> CustomOp2 for PointwiseOp<'_, K> {
    fn name(&self) -> &'static str {
        "flawscope-pointwise-residual"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        self.run(s1, l1, Some((s2, l2)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The same sums in f64, one output at a time.
    #[allow(clippy::too_many_arguments)]
    fn naive(
        w: &[f32],
        b: &[f32],
        x: &[f32],
        n: usize,
        cin: usize,
        p: usize,
        relu6: bool,
        res: Option<&[f32]>,
    ) -> Vec<f32> {
        let cout = b.len();
        let mut out = vec![0f32; n * cout * p];
        for i in 0..n {
            for o in 0..cout {
                for j in 0..p {
                    let mut s = f64::from(b[o]);
                    for k in 0..cin {
                        s += f64::from(w[o * cin + k]) * f64::from(x[(i * cin + k) * p + j]);
                    }
                    let mut y = s as f32;
                    if relu6 {
                        y = y.clamp(0.0, 6.0);
                    }
                    let at = (i * cout + o) * p + j;
                    out[at] = y + res.map_or(0.0, |r| r[at]);
                }
            }
        }
        out
    }

    fn values(len: usize, seed: f32) -> Vec<f32> {
        (0..len)
            .map(|i| (i as f32 * 0.618 + seed).sin() * 3.0)
            .collect()
    }

    #[test]
    fn matches_a_naive_product_at_every_edge() {
        if !available() {
            eprintln!("no AVX-512: the kernel is not used on this CPU");
            return;
        }
        // Channels not a multiple of MR, pixel counts around the tile and task
        // widths (1, 15, 16, 17, 47, 48, 49, 193, 200), batches of 1 and 2.
        for &(n, cin, cout, p) in &[
            (1, 1, 1, 1),
            (1, 3, 5, 15),
            (1, 16, 8, 16),
            (2, 7, 13, 17),
            (1, 24, 144, 47),
            (1, 40, 64, 48),
            (2, 33, 70, 49),
            (1, 5, 9, 193),
            (1, 12, 130, 200),
        ] {
            let w = values(cout * cin, 0.1);
            let b = values(cout, 0.7);
            let x = values(n * cin * p, 1.3);
            let res = values(n * cout * p, 2.9);
            let packed = PackedPointwise::new(&w, &b, cout, cin).unwrap();
            for relu6 in [false, true] {
                for r in [None, Some(&res[..])] {
                    let got = packed.apply(&x, n, p, relu6, r);
                    let want = naive(&w, &b, &x, n, cin, p, relu6, r);
                    for (g, e) in got.iter().zip(&want) {
                        let tol = 1e-5 * (1.0 + cin as f32) * 9.0;
                        assert!(
                            (g - e).abs() <= tol,
                            "n {n} cin {cin} cout {cout} p {p} relu6 {relu6}: {g} vs {e}"
                        );
                    }
                }
            }
        }
    }

    #[test]
    fn wrong_sizes_are_refused_when_packing() {
        assert!(PackedPointwise::new(&[1.0; 6], &[0.0; 2], 2, 4).is_none());
        assert!(PackedPointwise::new(&[1.0; 6], &[0.0; 3], 2, 3).is_none());
        assert!(PackedPointwise::new(&[], &[], 0, 3).is_none());
    }
}
