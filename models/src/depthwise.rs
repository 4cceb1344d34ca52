//! Fast CPU kernels for MobileNet-style layers, as candle custom ops.
//!
//! candle runs a grouped convolution as one convolution per group, so a
//! depthwise layer (one group per channel) is an order of magnitude slower
//! than it needs to be. [`depthwise_conv2d_same`] computes it directly: one
//! task per (image, channel) plane, parallelised with rayon, with the bias
//! and an optional ReLU6 fused in. [`bias_act`] is the matching epilogue for
//! the 1×1 convolutions, which run as matrix products: bias, optional ReLU6
//! and optional residual add in one pass.
//!
//! Both take TensorFlow "SAME" semantics where padding matters and fall back
//! to stock candle operations on non-CPU devices or non-f32 tensors.

use candle_core::{CpuStorage, CustomOp2, CustomOp3, DType, Layout, Shape, Tensor, bail};
use rayon::prelude::*;

/// Output size and padding of TensorFlow "SAME" padding along one axis.
///
/// Returns `(output, pad_before, pad_after)` with `output = ceil(input /
/// stride)`; when the total padding is odd the extra row/column goes after
/// (bottom/right), as in TensorFlow.
pub fn same_padding(input: usize, kernel: usize, stride: usize) -> (usize, usize, usize) {
    let stride = stride.max(1);
    let out = input.div_ceil(stride);
    let needed = (out.saturating_sub(1) * stride + kernel).saturating_sub(input);
    let before = needed / 2;
    (out, before, needed - before)
}

/// Depthwise 2-D convolution with TF "SAME" padding, bias and optional ReLU6.
///
/// `x` is `[N, C, H, W]`, `weight` is `[C, 1, K, K]`, `bias` is `[C]`; the
/// result is `[N, C, ceil(H/stride), ceil(W/stride)]`.
pub fn depthwise_conv2d_same(
    x: &Tensor,
    weight: &Tensor,
    bias: &Tensor,
    stride: usize,
    relu6: bool,
) -> candle_core::Result<Tensor> {
    let c = x.dims4()?.1;
    conv2d_same(x, weight, bias, stride, relu6, c, DepthwiseOp)
}

/// The geometry of a "SAME" convolution, shared by both kernels here.
#[derive(Debug, Clone, Copy)]
pub(crate) struct SameConv {
    kernel: usize,
    stride: usize,
    pad_top: usize,
    pad_left: usize,
    out_h: usize,
    out_w: usize,
    relu6: bool,
}

/// Checks the shapes of a convolution with `groups` groups (1: dense, `C`:
/// depthwise), then runs `op` where the data is f32 on the CPU, or candle's
/// grouped convolution elsewhere.
fn conv2d_same<Op: CustomOp3>(
    x: &Tensor,
    weight: &Tensor,
    bias: &Tensor,
    stride: usize,
    relu6: bool,
    groups: usize,
    op: impl FnOnce(SameConv) -> Op,
) -> candle_core::Result<Tensor> {
    let (_n, c, h, w) = x.dims4()?;
    let (o, wc, kh, kw) = weight.dims4()?;
    if wc * groups != c || kh != kw || (groups > 1 && o != c) {
        bail!(
            "convolution weight {:?} does not fit input {:?}",
            weight.dims(),
            x.dims()
        );
    }
    if bias.dims() != [o] {
        bail!(
            "convolution bias {:?} does not fit {o} channels",
            bias.dims()
        );
    }
    if stride == 0 {
        bail!("convolution stride must be at least 1");
    }
    let (out_h, pad_top, pad_bottom) = same_padding(h, kh, stride);
    let (out_w, pad_left, pad_right) = same_padding(w, kw, stride);
    let all_f32 = [x, weight, bias].iter().all(|t| t.dtype() == DType::F32);
    if x.device().is_cpu() && all_f32 {
        let op = op(SameConv {
            kernel: kh,
            stride,
            pad_top,
            pad_left,
            out_h,
            out_w,
            relu6,
        });
        x.contiguous()?
            .apply_op3_no_bwd(&weight.contiguous()?, &bias.contiguous()?, &op)
    } else {
        let padded = x
            .pad_with_zeros(2, pad_top, pad_bottom)?
            .pad_with_zeros(3, pad_left, pad_right)?;
        let y = padded.conv2d(weight, 0, stride, 1, groups)?;
        let y = y.broadcast_add(&bias.reshape((1, o, 1, 1))?)?;
        if relu6 { y.clamp(0f32, 6f32) } else { Ok(y) }
    }
}

/// Dense 2-D convolution with TF "SAME" padding, bias and optional ReLU6,
/// for the few-input-channel stem: `x` `[N, C, H, W]`, `weight`
/// `[O, C, K, K]`, `bias` `[O]`. Each output is its `C·K·K` products summed
/// in f64 and rounded once (candle's tiled convolution took a tenth of a
/// PatchCore score; this is also closer to the exact sum than any f32 order).
pub fn dense_conv2d_same(
    x: &Tensor,
    weight: &Tensor,
    bias: &Tensor,
    stride: usize,
    relu6: bool,
) -> candle_core::Result<Tensor> {
    conv2d_same(x, weight, bias, stride, relu6, 1, DenseConvOp)
}

struct DenseConvOp(SameConv);

/// Outputs of one stem row summed together in registers (four AVX-512
/// vectors of f64).
const STEM_BLOCK: usize = 32;

/// One block of stem outputs before the bias: `Σ tap · phases[at + x0 + l]`
/// over `taps` in their order, each product and sum rounded (no fused
/// multiply-add), so every CPU gives the same sums.
fn stem_block(phases: &[f64], taps: &[(f64, usize)], x0: usize) -> [f64; STEM_BLOCK] {
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx512f") {
        return avx512::stem_block(phases, taps, x0);
    }
    let mut acc = [0f64; STEM_BLOCK];
    for &(tap, at) in taps {
        let src = &phases[at + x0..][..STEM_BLOCK];
        for (a, &v) in acc.iter_mut().zip(src) {
            *a += tap * v;
        }
    }
    acc
}

impl std::ops::Deref for DenseConvOp {
    type Target = SameConv;
    fn deref(&self) -> &SameConv {
        &self.0
    }
}

impl CustomOp3 for DenseConvOp {
    fn name(&self) -> &'static str {
        "flawscope-dense-conv2d-same"
    }

    fn cpu_fwd(
        &self,
        xs: &CpuStorage,
        xl: &Layout,
        ws: &CpuStorage,
        wl: &Layout,
        bs: &CpuStorage,
        bl: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let (n, c, h, w) = xl.shape().dims4()?;
        let (o, _, _, _) = wl.shape().dims4()?;
        let x = f32_slice(xs, xl, "convolution input")?;
        let weight = f32_slice(ws, wl, "convolution weight")?;
        let bias = f32_slice(bs, bl, "convolution bias")?;
        let (k, s) = (self.kernel, self.stride);
        if weight.len() != o * c * k * k || bias.len() != o || x.len() != n * c * h * w {
            bail!("convolution: tensor sizes do not agree");
        }
        let (out_h, out_w) = (self.out_h, self.out_w);
        // Each input row split into its `s` column phases, zero-padded, so a
        // tap reads contiguous memory: phase `kx % s` from column `kx / s`.
        // Each phase is long enough for whole blocks of outputs.
        let phase_len = out_w.next_multiple_of(STEM_BLOCK) + k.div_ceil(s);
        let row_len = s * phase_len;
        // Held in f64, so the taps' loop does not widen every value again.
        let mut phases = vec![0f64; n * c * h * row_len];
        phases
            .par_chunks_mut(row_len)
            .zip(x.par_chunks(w.max(1)))
            .for_each(|(dst, src)| {
                for (phase, dst) in dst.chunks_exact_mut(phase_len).enumerate() {
                    // Slot `j` of phase `phase` is padded column `j·s + phase`.
                    for (j, slot) in dst.iter_mut().enumerate() {
                        if let Some(col) = (j * s + phase).checked_sub(self.pad_left)
                            && let Some(&v) = src.get(col)
                        {
                            *slot = f64::from(v);
                        }
                    }
                }
            });
        // Where tap `kx` of a kernel row starts in a phased row.
        let tap_start: Vec<usize> = (0..k).map(|kx| (kx % s) * phase_len + kx / s).collect();
        let plane_out = out_h * out_w;
        let mut out = vec![0f32; n * o * plane_out];
        if plane_out > 0 && h * w > 0 {
            out.par_chunks_mut(plane_out).enumerate().for_each_init(
                Vec::new,
                |row_taps: &mut Vec<(f64, usize)>, (plane, dst)| {
                    let (image, ch) = (plane / o, plane % o);
                    let wk = &weight[ch * c * k * k..(ch + 1) * c * k * k];
                    let b = f64::from(bias[ch]);
                    for (y, dst_row) in dst.chunks_exact_mut(out_w).enumerate() {
                        // Each tap's weight and where its inputs start, in
                        // `(ci, ky, kx)` order, rows outside the input left out.
                        row_taps.clear();
                        for (ci, taps) in wk.chunks_exact(k * k).enumerate() {
                            for (ky, taps) in taps.chunks_exact(k).enumerate() {
                                let Some(iy) =
                                    (y * s + ky).checked_sub(self.pad_top).filter(|&iy| iy < h)
                                else {
                                    continue;
                                };
                                let row = ((image * c + ci) * h + iy) * row_len;
                                for (&tap, &start) in taps.iter().zip(&tap_start) {
                                    row_taps.push((f64::from(tap), row + start));
                                }
                            }
                        }
                        for x0 in (0..out_w).step_by(STEM_BLOCK) {
                            let acc = stem_block(&phases, row_taps, x0);
                            let end = out_w.min(x0 + STEM_BLOCK);
                            for (d, &a) in dst_row[x0..end].iter_mut().zip(&acc) {
                                let v = a + b;
                                *d = if self.relu6 { v.clamp(0.0, 6.0) } else { v } as f32;
                            }
                        }
                    }
                },
            );
        }
        Ok((CpuStorage::F32(out), Shape::from((n, o, out_h, out_w))))
    }
}

/// `y = act(x + bias[c]) (+ residual)` over `[N, C, ...]` in one pass.
///
/// `act` is ReLU6 when `relu6` is set, the identity otherwise; the residual,
/// when given, must have the shape of `x` and is added after the activation.
pub fn bias_act(
    x: &Tensor,
    bias: &Tensor,
    relu6: bool,
    residual: Option<&Tensor>,
) -> candle_core::Result<Tensor> {
    let dims = x.dims();
    if dims.len() < 2 {
        bail!("bias_act needs at least [N, C], got {dims:?}");
    }
    let c = dims[1];
    if bias.dims() != [c] {
        bail!("bias {:?} does not fit {c} channels", bias.dims());
    }
    if let Some(r) = residual
        && r.dims() != dims
    {
        bail!("residual {:?} does not match {:?}", r.dims(), dims);
    }
    let all_f32 = x.dtype() == DType::F32
        && bias.dtype() == DType::F32
        && residual.is_none_or(|r| r.dtype() == DType::F32);
    if x.device().is_cpu() && all_f32 {
        let op = BiasActOp { relu6 };
        let x = x.contiguous()?;
        let bias = bias.contiguous()?;
        match residual {
            None => x.apply_op2_no_bwd(&bias, &op),
            Some(r) => x.apply_op3_no_bwd(&bias, &r.contiguous()?, &op),
        }
    } else {
        let mut bshape = vec![1usize; dims.len()];
        bshape[1] = c;
        let mut y = x.broadcast_add(&bias.reshape(bshape)?)?;
        if relu6 {
            y = y.clamp(0f32, 6f32)?;
        }
        match residual {
            None => Ok(y),
            Some(r) => y + r,
        }
    }
}

/// The contiguous f32 data of a CPU storage, or an error.
pub(crate) fn f32_slice<'a>(
    storage: &'a CpuStorage,
    layout: &Layout,
    what: &str,
) -> candle_core::Result<&'a [f32]> {
    let CpuStorage::F32(data) = storage else {
        bail!("{what}: expected f32 data");
    };
    let Some((start, end)) = layout.contiguous_offsets() else {
        bail!("{what}: expected a contiguous tensor");
    };
    match data.get(start..end) {
        Some(s) => Ok(s),
        None => bail!("{what}: layout exceeds storage"),
    }
}

pub(crate) struct DepthwiseOp(SameConv);

impl std::ops::Deref for DepthwiseOp {
    type Target = SameConv;
    fn deref(&self) -> &SameConv {
        &self.0
    }
}

impl CustomOp3 for DepthwiseOp {
    fn name(&self) -> &'static str {
        "flawscope-depthwise-conv2d-same"
    }

    fn cpu_fwd(
        &self,
        xs: &CpuStorage,
        xl: &Layout,
        ws: &CpuStorage,
        wl: &Layout,
        bs: &CpuStorage,
        bl: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let (n, c, h, w) = xl.shape().dims4()?;
        let x = f32_slice(xs, xl, "depthwise input")?;
        let weight = f32_slice(ws, wl, "depthwise weight")?;
        let bias = f32_slice(bs, bl, "depthwise bias")?;
        let k = self.kernel;
        if weight.len() != c * k * k || bias.len() != c || x.len() != n * c * h * w {
            bail!("depthwise: tensor sizes do not agree");
        }
        let plane_out = self.out_h * self.out_w;
        let mut out = vec![0f32; n * c * plane_out];
        if plane_out > 0 && h * w > 0 {
            out.par_chunks_mut(plane_out)
                .zip(x.par_chunks(h * w))
                .enumerate()
                .for_each_init(Vec::new, |padded, (plane, (o, inp))| {
                    let ch = plane % c;
                    let wk = &weight[ch * k * k..(ch + 1) * k * k];
                    let band = InputBand {
                        rows: inp,
                        first_row: 0,
                        h,
                        w,
                    };
                    crate::simd::widest(
                        #[inline(always)]
                        || self.plane(&band, 0, wk, bias[ch], o, padded),
                    );
                });
        }
        Ok((
            CpuStorage::F32(out),
            Shape::from((n, c, self.out_h, self.out_w)),
        ))
    }
}

/// Consecutive rows of one channel of an `h × w` input, from row
/// `first_row` on.
pub(crate) struct InputBand<'a> {
    pub(crate) rows: &'a [f32],
    pub(crate) first_row: usize,
    pub(crate) h: usize,
    pub(crate) w: usize,
}

/// One input plane as [`DepthwiseOp::plane`] lays it out: zero-padded rows,
/// each split into its column phases of `phase_len`, read `group` blocks of
/// [`LANES`] at a time.
struct Padded<'a> {
    values: &'a [f32],
    phase_len: usize,
    group: usize,
}

/// Output columns computed together in registers by [`DepthwiseOp::plane`].
const LANES: usize = 16;
/// Blocks of [`LANES`] outputs summed side by side.
const GROUP: usize = 4;

impl DepthwiseOp {
    /// A `kernel × kernel` depthwise layer with TF "SAME" padding over an
    /// `h × w` input.
    pub(crate) fn same(h: usize, w: usize, kernel: usize, stride: usize, relu6: bool) -> Self {
        let (out_h, pad_top, _) = same_padding(h, kernel, stride);
        let (out_w, pad_left, _) = same_padding(w, kernel, stride);
        Self(SameConv {
            kernel,
            stride: stride.max(1),
            pad_top,
            pad_left,
            out_h,
            out_w,
            relu6,
        })
    }

    /// Output rows and columns.
    pub(crate) fn out_size(&self) -> (usize, usize) {
        (self.out_h, self.out_w)
    }

    /// The input rows that output rows `rows` read: `first..end`, clipped
    /// to the `h` rows that exist.
    pub(crate) fn input_rows(
        &self,
        rows: std::ops::Range<usize>,
        h: usize,
    ) -> std::ops::Range<usize> {
        let first = (rows.start * self.stride).saturating_sub(self.pad_top);
        let end = ((rows.end.max(1) - 1) * self.stride + self.kernel)
            .saturating_sub(self.pad_top)
            .min(h);
        first.min(end)..end
    }

    /// Output rows `first_out..first_out + out.len() / out_w` of one channel
    /// of one image: `out[oy, ox] = b + Σ w[ky, kx] · in[iy, ix]` with `iy =
    /// oy·s + ky − pad_top`, `ix = ox·s + kx − pad_left`, zero outside the
    /// input, the taps added in `(ky, kx)` order. `inp` must hold every input
    /// row those outputs read (the whole plane, or a fused block's band).
    ///
    /// The input is first copied into `padded`: zero-padded, and each row
    /// split into its `s` column phases (`phase p` holds columns `p, p + s,
    /// …`), so every tap reads a contiguous run of `LANES` inputs for
    /// `LANES` outputs at any stride; the sums stay in registers until all
    /// taps are added.
    #[inline(always)]
    pub(crate) fn plane(
        &self,
        inp: &InputBand<'_>,
        first_out: usize,
        wk: &[f32],
        b: f32,
        out: &mut [f32],
        padded: &mut Vec<f32>,
    ) {
        let (k, s, w) = (self.kernel, self.stride, inp.w);
        let out_rows = out.len() / self.out_w;
        if out_rows == 0 {
            return;
        }
        let (phase_len, group) = self.layout();
        let rows = (out_rows - 1) * s + k;
        // Every value of the buffer is written below (input or zero), so the
        // buffer kept from the previous plane is not cleared first.
        padded.resize(rows * s * phase_len, 0.0);
        for r in 0..rows {
            let prow = &mut padded[r * s * phase_len..(r + 1) * s * phase_len];
            let Some(iy) = (first_out * s + r)
                .checked_sub(self.pad_top)
                .filter(|&iy| iy < inp.h)
            else {
                prow.fill(0.0);
                continue;
            };
            let irow = &inp.rows[(iy - inp.first_row) * w..][..w];
            for (p, phase) in prow.chunks_exact_mut(phase_len).enumerate() {
                // Padded column `p + i·s` is input column `p + i·s − pad_left`.
                let first = self.pad_left.saturating_sub(p).div_ceil(s);
                let Some(ix0) = (p + first * s).checked_sub(self.pad_left) else {
                    phase.fill(0.0);
                    continue;
                };
                let count = w.saturating_sub(ix0).div_ceil(s).min(phase_len - first);
                phase[..first].fill(0.0);
                phase[first + count..].fill(0.0);
                if s == 1 {
                    phase[first..first + count].copy_from_slice(&irow[ix0..ix0 + count]);
                } else if s == 2 {
                    // Pairs of a fixed size let LLVM vectorise the gather
                    // (`step_by` copies one value per iteration).
                    let dst = &mut phase[first..first + count];
                    let (pairs, rest) = irow[ix0..].as_chunks::<2>();
                    for (slot, pair) in dst.iter_mut().zip(pairs) {
                        *slot = pair[0];
                    }
                    if let (Some(slot), [v]) = (dst.get_mut(pairs.len()), rest) {
                        *slot = *v;
                    }
                } else {
                    for (slot, &v) in phase[first..first + count]
                        .iter_mut()
                        .zip(irow[ix0..].iter().step_by(s))
                    {
                        *slot = v;
                    }
                }
            }
        }
        let padded = Padded {
            values: &padded[..],
            phase_len,
            group,
        };
        #[cfg(target_arch = "x86_64")]
        if avx512::rows(self, &padded, wk, b, out) {
            return;
        }
        self.rows_portable(&padded, wk, b, out);
    }

    /// The length of one column phase of a padded row, and how many blocks
    /// of [`LANES`] outputs are summed side by side.
    fn layout(&self) -> (usize, usize) {
        let blocks = self.out_w.div_ceil(LANES);
        let group = match blocks {
            1 => 1,
            2 | 3 => 2,
            _ => GROUP,
        };
        // Every tap reads `phase[ox + kx / s]` for `ox` up to a whole group.
        let phase_len = blocks.div_ceil(group) * group * LANES + (self.kernel - 1) / self.stride;
        (phase_len, group)
    }

    /// [`Self::rows`] for `group` blocks at a time (1, 2 or [`GROUP`]).
    #[inline(always)]
    fn rows_portable(&self, padded: &Padded<'_>, wk: &[f32], b: f32, out: &mut [f32]) {
        // Independent sums for several blocks at once: one block's taps form
        // a chain of dependent additions that would stall the core.
        let Padded {
            values, phase_len, ..
        } = *padded;
        match padded.group {
            1 => self.rows::<1>(values, phase_len, wk, b, out),
            2 => self.rows::<2>(values, phase_len, wk, b, out),
            _ => self.rows::<GROUP>(values, phase_len, wk, b, out),
        }
    }

    /// The output rows of [`Self::plane`] from its padded input, `G` blocks
    /// of [`LANES`] columns at a time.
    #[inline(always)]
    fn rows<const G: usize>(
        &self,
        padded: &[f32],
        phase_len: usize,
        wk: &[f32],
        b: f32,
        out: &mut [f32],
    ) {
        let (k, s, ow) = (self.kernel, self.stride, self.out_w);
        for (oy, row) in out.chunks_exact_mut(ow).enumerate() {
            let band = &padded[oy * s * s * phase_len..];
            for (g, dst) in row.chunks_mut(G * LANES).enumerate() {
                let x0 = g * G * LANES;
                let mut acc = [[b; LANES]; G];
                for ky in 0..k {
                    let prow = &band[ky * s * phase_len..][..s * phase_len];
                    for kx in 0..k {
                        let wv = wk[ky * k + kx];
                        let start = (kx % s) * phase_len + x0 + kx / s;
                        for (j, a) in acc.iter_mut().enumerate() {
                            if let Some(src) = prow[start + j * LANES..].first_chunk::<LANES>() {
                                for l in 0..LANES {
                                    a[l] += wv * src[l];
                                }
                            }
                        }
                    }
                }
                for (a, dst) in acc.iter_mut().zip(dst.chunks_mut(LANES)) {
                    if self.relu6 {
                        for v in a.iter_mut() {
                            *v = v.clamp(0.0, 6.0);
                        }
                    }
                    dst.copy_from_slice(&a[..dst.len()]);
                }
            }
        }
    }
}

/// [`DepthwiseOp::rows`] written with AVX-512 intrinsics: the portable loop
/// does not always keep its sums in registers.
#[cfg(target_arch = "x86_64")]
#[allow(unsafe_code)]
mod avx512 {
    use std::arch::x86_64::{
        __m512, _mm512_add_pd, _mm512_add_ps, _mm512_loadu_pd, _mm512_loadu_ps, _mm512_max_ps,
        _mm512_min_ps, _mm512_mul_pd, _mm512_mul_ps, _mm512_set1_pd, _mm512_set1_ps,
        _mm512_setzero_pd, _mm512_storeu_pd, _mm512_storeu_ps,
    };

    use super::{DepthwiseOp, LANES, Padded, STEM_BLOCK};

    /// [`super::stem_block`] with its sums in four registers (LLVM keeps
    /// the portable loop's sums on the stack), when the CPU has AVX-512F.
    pub(super) fn stem_block(
        phases: &[f64],
        taps: &[(f64, usize)],
        x0: usize,
    ) -> [f64; STEM_BLOCK] {
        // SAFETY: the caller checked that the CPU has AVX-512F.
        unsafe { stem_block_avx512(phases, taps, x0) }
    }

    #[target_feature(enable = "avx512f")]
    fn stem_block_avx512(phases: &[f64], taps: &[(f64, usize)], x0: usize) -> [f64; STEM_BLOCK] {
        let mut acc = [_mm512_setzero_pd(); STEM_BLOCK / 8];
        for &(tap, at) in taps {
            let src = &phases[at + x0..][..STEM_BLOCK];
            let t = _mm512_set1_pd(tap);
            for (j, a) in acc.iter_mut().enumerate() {
                // SAFETY: `src` holds `STEM_BLOCK` values.
                let v = unsafe { _mm512_loadu_pd(src.as_ptr().add(j * 8)) };
                *a = _mm512_add_pd(*a, _mm512_mul_pd(t, v));
            }
        }
        let mut out = [0f64; STEM_BLOCK];
        for (a, dst) in acc.iter().zip(out.chunks_exact_mut(8)) {
            // SAFETY: `dst` holds 8 values.
            unsafe { _mm512_storeu_pd(dst.as_mut_ptr(), *a) };
        }
        out
    }

    /// The output rows, when the CPU has AVX-512 (`false`: it has not, and
    /// nothing was written). Same operations, in the same order, as the
    /// portable loop.
    pub(super) fn rows(
        op: &DepthwiseOp,
        padded: &Padded<'_>,
        wk: &[f32],
        b: f32,
        out: &mut [f32],
    ) -> bool {
        if !std::arch::is_x86_feature_detected!("avx512f") {
            return false;
        }
        let (k, s, phase_len) = (op.kernel, op.stride, padded.phase_len);
        // Each tap's offset from the start of an output row's band (on the
        // stack for kernels up to 7 × 7: this runs once per channel plane).
        let offset = |t: usize| (t / k) * s * phase_len + ((t % k) % s) * phase_len + (t % k) / s;
        let mut on_stack = [0usize; 49];
        let on_heap: Vec<usize>;
        let taps: &[usize] = if k * k <= on_stack.len() {
            for (t, slot) in on_stack.iter_mut().enumerate().take(k * k) {
                *slot = offset(t);
            }
            &on_stack[..k * k]
        } else {
            on_heap = (0..k * k).map(offset).collect();
            &on_heap
        };
        // SAFETY (all three): the CPU has AVX-512F, checked above.
        unsafe {
            let values = padded.values;
            match padded.group {
                1 => rows_g::<1>(op, values, phase_len, taps, wk, b, out),
                2 => rows_g::<2>(op, values, phase_len, taps, wk, b, out),
                _ => rows_g::<{ super::GROUP }>(op, values, phase_len, taps, wk, b, out),
            }
        }
        true
    }

    #[target_feature(enable = "avx512f")]
    #[allow(clippy::too_many_arguments)]
    fn rows_g<const G: usize>(
        op: &DepthwiseOp,
        padded: &[f32],
        phase_len: usize,
        taps: &[usize],
        wk: &[f32],
        b: f32,
        out: &mut [f32],
    ) {
        let (s, ow) = (op.stride, op.out_w);
        let (zero, six) = (_mm512_set1_ps(0.0), _mm512_set1_ps(6.0));
        let mut block = [[0f32; LANES]; G];
        for (oy, row) in out.chunks_exact_mut(ow).enumerate() {
            let band = &padded[oy * s * s * phase_len..];
            for (g, dst) in row.chunks_mut(G * LANES).enumerate() {
                let base = &band[g * G * LANES..];
                let mut acc: [__m512; G] = [_mm512_set1_ps(b); G];
                for (&tap, &w) in taps.iter().zip(wk) {
                    let wv = _mm512_set1_ps(w);
                    let src = &base[tap..tap + G * LANES];
                    for (j, a) in acc.iter_mut().enumerate() {
                        // SAFETY: `src` holds `G · LANES` floats.
                        let v = unsafe { _mm512_loadu_ps(src.as_ptr().add(j * LANES)) };
                        *a = _mm512_add_ps(*a, _mm512_mul_ps(wv, v));
                    }
                }
                for (a, out) in acc.iter().zip(block.iter_mut()) {
                    let v = if op.relu6 {
                        _mm512_min_ps(_mm512_max_ps(*a, zero), six)
                    } else {
                        *a
                    };
                    // SAFETY: `out` holds `LANES` floats.
                    unsafe { _mm512_storeu_ps(out.as_mut_ptr(), v) };
                }
                dst.copy_from_slice(&block.as_flattened()[..dst.len()]);
            }
        }
    }
}

struct BiasActOp {
    relu6: bool,
}

impl BiasActOp {
    fn run(
        &self,
        shape: &Shape,
        x: &[f32],
        bias: &[f32],
        residual: Option<&[f32]>,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let dims = shape.dims();
        let (n, c) = match dims {
            [n, c, ..] => (*n, *c),
            _ => bail!("bias_act: expected [N, C, ...]"),
        };
        let inner: usize = dims[2..].iter().product();
        if x.len() != n * c * inner
            || bias.len() != c
            || residual.is_some_and(|r| r.len() != x.len())
        {
            bail!("bias_act: tensor sizes do not agree");
        }
        let mut out = vec![0f32; x.len()];
        if inner > 0 {
            let relu6 = self.relu6;
            out.par_chunks_mut(inner)
                .zip(x.par_chunks(inner))
                .enumerate()
                .for_each(|(plane, (o, xi))| {
                    let b = bias[plane % c];
                    if relu6 {
                        for (o, &v) in o.iter_mut().zip(xi) {
                            *o = (v + b).clamp(0.0, 6.0);
                        }
                    } else {
                        for (o, &v) in o.iter_mut().zip(xi) {
                            *o = v + b;
                        }
                    }
                    if let Some(r) = residual {
                        let r = &r[plane * inner..(plane + 1) * inner];
                        for (o, &v) in o.iter_mut().zip(r) {
                            *o += v;
                        }
                    }
                });
        }
        Ok((CpuStorage::F32(out), shape.clone()))
    }
}

impl CustomOp2 for BiasActOp {
    fn name(&self) -> &'static str {
        "flawscope-bias-act"
    }

    fn cpu_fwd(
        &self,
        xs: &CpuStorage,
        xl: &Layout,
        bs: &CpuStorage,
        bl: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let x = f32_slice(xs, xl, "bias_act input")?;
        let b = f32_slice(bs, bl, "bias_act bias")?;
        self.run(xl.shape(), x, b, None)
    }
}

impl CustomOp3 for BiasActOp {
    fn name(&self) -> &'static str {
        "flawscope-bias-act-residual"
    }

    fn cpu_fwd(
        &self,
        xs: &CpuStorage,
        xl: &Layout,
        bs: &CpuStorage,
        bl: &Layout,
        rs: &CpuStorage,
        rl: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let x = f32_slice(xs, xl, "bias_act input")?;
        let b = f32_slice(bs, bl, "bias_act bias")?;
        let r = f32_slice(rs, rl, "bias_act residual")?;
        self.run(xl.shape(), x, b, Some(r))
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use candle_core::Device;

    /// Reference: pad explicitly, grouped conv2d, bias, clamp.
    fn reference(x: &Tensor, w: &Tensor, b: &Tensor, stride: usize, relu6: bool) -> Tensor {
        let (_, c, h, wd) = x.dims4().unwrap();
        let k = w.dim(2).unwrap();
        let (_, pt, pb) = same_padding(h, k, stride);
        let (_, pl, pr) = same_padding(wd, k, stride);
        let p = x
            .pad_with_zeros(2, pt, pb)
            .unwrap()
            .pad_with_zeros(3, pl, pr)
            .unwrap();
        let y = p.conv2d(w, 0, stride, 1, c).unwrap();
        let y = y.broadcast_add(&b.reshape((1, c, 1, 1)).unwrap()).unwrap();
        if relu6 {
            y.clamp(0f32, 6f32).unwrap()
        } else {
            y
        }
    }

    fn max_diff(a: &Tensor, b: &Tensor) -> f32 {
        assert_eq!(a.dims(), b.dims());
        (a - b)
            .unwrap()
            .abs()
            .unwrap()
            .flatten_all()
            .unwrap()
            .max(0)
            .unwrap()
            .to_scalar::<f32>()
            .unwrap()
    }

    #[test]
    fn same_padding_matches_tensorflow() {
        assert_eq!(same_padding(224, 3, 2), (112, 0, 1));
        assert_eq!(same_padding(225, 3, 2), (113, 1, 1));
        assert_eq!(same_padding(112, 5, 2), (56, 1, 2));
        assert_eq!(same_padding(14, 5, 1), (14, 2, 2));
        assert_eq!(same_padding(7, 3, 1), (7, 1, 1));
        assert_eq!(same_padding(1, 5, 2), (1, 2, 2));
        assert_eq!(same_padding(1, 1, 1), (1, 0, 0));
    }

    #[test]
    fn depthwise_matches_grouped_conv() {
        let dev = Device::Cpu;
        for &(h, w, k, s, relu6) in &[
            (9, 7, 3, 1, true),
            (9, 7, 3, 2, false),
            (10, 13, 5, 2, true),
            (6, 6, 5, 1, false),
            (1, 1, 5, 2, false),
            (2, 3, 3, 2, true),
            (17, 4, 5, 1, true),
            // Rows of 2, 3, 4 and 5 blocks of 16 outputs (grouped sums).
            (5, 33, 3, 1, false),
            (4, 47, 5, 1, true),
            (3, 64, 3, 1, false),
            (6, 77, 5, 1, false),
            (7, 150, 5, 2, true),
            (5, 129, 3, 2, false),
        ] {
            let x = Tensor::randn(0f32, 2.0, (2, 3, h, w), &dev).unwrap();
            let wt = Tensor::randn(0f32, 1.0, (3, 1, k, k), &dev).unwrap();
            let b = Tensor::randn(0f32, 1.0, 3, &dev).unwrap();
            let got = depthwise_conv2d_same(&x, &wt, &b, s, relu6).unwrap();
            let want = reference(&x, &wt, &b, s, relu6);
            // Relative to the largest output: candle adds the taps in
            // another order, and sums of 25 random taps reach 30 or more,
            // where one f32 rounding step is 2e-6.
            let scale = want
                .abs()
                .unwrap()
                .max_all()
                .unwrap()
                .to_scalar::<f32>()
                .unwrap();
            let d = max_diff(&got, &want);
            assert!(
                d < 1e-5 * scale.max(1.0),
                "h={h} w={w} k={k} s={s}: diff {d} of {scale}"
            );
        }
    }

    #[test]
    fn dense_conv_matches_an_f64_reference() {
        let dev = Device::Cpu;
        for &(h, w, k, s, relu6) in &[
            (9, 7, 3, 2, true),
            (10, 13, 5, 2, false),
            (8, 8, 3, 1, false),
            (1, 1, 3, 2, true),
            (2, 3, 3, 2, false),
            (33, 64, 3, 2, true),
            (7, 5, 3, 3, false),
        ] {
            let x = Tensor::randn(0f32, 2.0, (2, 3, h, w), &dev).unwrap();
            let wt = Tensor::randn(0f32, 1.0, (4, 3, k, k), &dev).unwrap();
            let b = Tensor::randn(0f32, 1.0, 4, &dev).unwrap();
            let got = dense_conv2d_same(&x, &wt, &b, s, relu6).unwrap();
            let (oh, top, bottom) = same_padding(h, k, s);
            let (ow, left, right) = same_padding(w, k, s);
            assert_eq!(got.dims(), [2, 4, oh, ow]);
            // The reference in f64: the kernel's sum is rounded once.
            let f64_of = |t: &Tensor| t.to_dtype(DType::F64).unwrap();
            let want = f64_of(&x)
                .pad_with_zeros(2, top, bottom)
                .unwrap()
                .pad_with_zeros(3, left, right)
                .unwrap()
                .conv2d(&f64_of(&wt), 0, s, 1, 1)
                .unwrap()
                .broadcast_add(&f64_of(&b).reshape((1, 4, 1, 1)).unwrap())
                .unwrap();
            let want = if relu6 {
                want.clamp(0f64, 6f64).unwrap()
            } else {
                want
            };
            let want: Vec<f64> = want.flatten_all().unwrap().to_vec1().unwrap();
            let got: Vec<f32> = got.flatten_all().unwrap().to_vec1().unwrap();
            for (g, e) in got.iter().zip(&want) {
                let d = (f64::from(*g) - e).abs();
                assert!(
                    d <= 1e-7 * (1.0 + e.abs()),
                    "h={h} w={w} k={k} s={s}: {g} vs {e}"
                );
            }
        }
        let x = Tensor::zeros((1, 3, 4, 4), DType::F32, &dev).unwrap();
        let wrong = Tensor::zeros((4, 2, 3, 3), DType::F32, &dev).unwrap();
        let b = Tensor::zeros(4, DType::F32, &dev).unwrap();
        assert!(dense_conv2d_same(&x, &wrong, &b, 2, true).is_err());
    }

    /// The AVX-512 kernel (used by every other test on such a CPU) and the
    /// portable loop give the same bits.
    #[cfg(target_arch = "x86_64")]
    #[test]
    fn avx512_and_portable_rows_agree() {
        if !std::arch::is_x86_feature_detected!("avx512f") {
            return;
        }
        let noise = |n: usize, seed: f32| -> Vec<f32> {
            (0..n)
                .map(|i| (i as f32 * 0.731 + seed).sin() * 3.0)
                .collect()
        };
        for &(h, w, k, s) in &[(9, 7, 3, 1), (10, 40, 5, 2), (6, 77, 5, 1), (7, 150, 3, 2)] {
            let (out_h, pad_top, _) = same_padding(h, k, s);
            let (out_w, pad_left, _) = same_padding(w, k, s);
            for relu6 in [false, true] {
                let op = DepthwiseOp(SameConv {
                    kernel: k,
                    stride: s,
                    pad_top,
                    pad_left,
                    out_h,
                    out_w,
                    relu6,
                });
                let (inp, wk) = (noise(h * w, 0.3), noise(k * k, 1.7));
                let mut padded = Vec::new();
                let mut fast = vec![0f32; out_h * out_w];
                let band = InputBand {
                    rows: &inp,
                    first_row: 0,
                    h,
                    w,
                };
                op.plane(&band, 0, &wk, 0.5, &mut fast, &mut padded);
                let (phase_len, group) = op.layout();
                let mut portable = vec![0f32; out_h * out_w];
                let padded = Padded {
                    values: &padded,
                    phase_len,
                    group,
                };
                op.rows_portable(&padded, &wk, 0.5, &mut portable);
                let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
                assert_eq!(bits(&fast), bits(&portable), "h={h} w={w} k={k} s={s}");
            }
        }
    }

    #[test]
    fn depthwise_rejects_bad_shapes() {
        let dev = Device::Cpu;
        let x = Tensor::zeros((1, 3, 5, 5), DType::F32, &dev).unwrap();
        let w = Tensor::zeros((4, 1, 3, 3), DType::F32, &dev).unwrap();
        let b = Tensor::zeros(4, DType::F32, &dev).unwrap();
        assert!(depthwise_conv2d_same(&x, &w, &b, 1, false).is_err());
        let w = Tensor::zeros((3, 1, 3, 3), DType::F32, &dev).unwrap();
        assert!(depthwise_conv2d_same(&x, &w, &b, 1, false).is_err());
    }

    #[test]
    fn bias_act_matches_candle_ops() {
        let dev = Device::Cpu;
        let x = Tensor::randn(0f32, 4.0, (2, 5, 3, 4), &dev).unwrap();
        let r = Tensor::randn(0f32, 1.0, (2, 5, 3, 4), &dev).unwrap();
        let b = Tensor::randn(0f32, 1.0, 5, &dev).unwrap();
        let plus_b = x.broadcast_add(&b.reshape((1, 5, 1, 1)).unwrap()).unwrap();
        let got = bias_act(&x, &b, true, None).unwrap();
        assert!(max_diff(&got, &plus_b.clamp(0f32, 6f32).unwrap()) < 1e-6);
        let got = bias_act(&x, &b, false, Some(&r)).unwrap();
        assert!(max_diff(&got, &(&plus_b + &r).unwrap()) < 1e-6);
        assert!(bias_act(&x, &r, false, None).is_err());
    }
}
