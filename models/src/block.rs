//! One inverted-residual block (1×1 expand → k×k depthwise → 1×1 project,
//! plus the identity) computed band by band of output rows.
//!
//! Run layer by layer, a block writes its expanded planes (six times the
//! input's channels) out of the cache and reads them back twice. Here each
//! task expands only the input rows one band of output rows needs, runs the
//! depthwise layer and the projection on them while they are still in the
//! core's cache, and writes just the block's output. The kernels and the
//! order of every sum are those of the layer-by-layer path, so the result
//! is the same to the bit; the price is the halo, the few input rows that
//! two bands both expand.

// The output of each task is a set of row ranges of every channel plane,
// written through one shared pointer; the unsafe blocks say why they are
// disjoint.
#![allow(unsafe_code)]

use std::ops::Range;

use candle_core::{CpuStorage, CustomOp3, Layout, Shape, Tensor, bail};
use rayon::prelude::*;

use crate::depthwise::{DepthwiseOp, InputBand, f32_slice};
use crate::pointwise::{Band, Packed1x1, PackedPointwise, SharedOut};

/// Scratch bytes one task may use for its expanded rows and depthwise
/// output: half of this CPU's 1 MiB of L2 per core, so the projection
/// still finds them there.
const BAND_BYTES: usize = 512 * 1024;
/// Largest share of input rows expanded twice (by two bands) for which
/// fusing still pays; above it the block runs layer by layer.
const MAX_HALO: f64 = 0.5;
/// Expanded planes (all images of a batch) up to this size run layer by
/// layer: they stay in the last-level cache (32 MiB here), and fusing
/// measured no faster there (Lite0 at 224², batch 1), but 15–25 % faster
/// at 768² and 1 024², where they do not.
const LAYERED_BYTES: usize = 32 * 1024 * 1024;

/// The packed 1×1 layers of one block and its depthwise geometry.
pub(crate) struct FusedBlock<'a> {
    /// Absent where the block has no expansion (expand ratio 1).
    pub(crate) expand: Option<&'a PackedPointwise>,
    pub(crate) project: &'a PackedPointwise,
    pub(crate) kernel: usize,
    pub(crate) stride: usize,
    /// Adds the block's input to its output (stride 1, same channels).
    pub(crate) residual: bool,
}

impl FusedBlock<'_> {
    /// Runs the block on `x` (`[N, C, H, W]`, f32 on the CPU) with the
    /// depthwise layer's `weight` (`[E, 1, k, k]`) and `bias` (`[E]`), or
    /// returns `None` where layer by layer is the better way (the bands
    /// would expand too many rows twice).
    pub(crate) fn forward(
        &self,
        x: &Tensor,
        weight: &Tensor,
        bias: &Tensor,
    ) -> candle_core::Result<Option<Tensor>> {
        let (n, _, h, w) = x.dims4()?;
        let Some(rows) = self.band_rows(n, h, w, rayon::current_num_threads()) else {
            return Ok(None);
        };
        let op = FusedBlockOp { block: self, rows };
        x.contiguous()?
            .apply_op3_no_bwd(&weight.contiguous()?, &bias.contiguous()?, &op)
            .map(Some)
    }

    /// Channels of the expanded planes.
    fn expanded(&self) -> usize {
        self.expand
            .map_or(self.project.input_channels(), Packed1x1::output_channels)
    }

    fn depthwise(&self, h: usize, w: usize) -> DepthwiseOp {
        DepthwiseOp::same(h, w, self.kernel, self.stride, true)
    }

    /// Output rows per band for `n` images of `h × w` on `threads` threads:
    /// as many as fit [`BAND_BYTES`], few enough that every thread gets
    /// work; `None` when the expanded planes fit [`LAYERED_BYTES`] or the
    /// bands would expand more than [`MAX_HALO`] of the input rows twice.
    fn band_rows(&self, n: usize, h: usize, w: usize, threads: usize) -> Option<usize> {
        let dw = self.depthwise(h, w);
        let (oh, ow) = dw.out_size();
        if n == 0 || oh == 0 || ow == 0 {
            return None;
        }
        let e = self.expanded();
        let planes = n.saturating_mul(e).saturating_mul(h).saturating_mul(w);
        if planes.saturating_mul(4) <= LAYERED_BYTES {
            return None;
        }
        // One band of `r` output rows holds about `r·s + k` expanded rows
        // and `r` depthwise output rows.
        let fixed = e * self.kernel * w * 4;
        let per_row = e * (self.stride * w + ow) * 4;
        let by_cache = (BAND_BYTES.saturating_sub(fixed) / per_row.max(1)).max(1);
        let bands_wanted = (2 * threads).div_ceil(n);
        let by_tasks = oh.div_ceil(bands_wanted).max(1);
        let rows = by_cache.min(by_tasks).min(oh);
        if self.expand.is_some() {
            let expanded: usize = (0..oh)
                .step_by(rows)
                .map(|r| dw.input_rows(r..oh.min(r + rows), h).len())
                .sum();
            if expanded as f64 > (1.0 + MAX_HALO) * h as f64 {
                return None;
            }
        }
        Some(rows)
    }
}

/// [`FusedBlock`] as a candle op on (input, depthwise weight, depthwise
/// bias), `rows` output rows per band.
struct FusedBlockOp<'a> {
    block: &'a FusedBlock<'a>,
    rows: usize,
}

/// Each task's buffers, kept between the bands a thread runs.
#[derive(Default)]
struct Scratch {
    expanded: Vec<f32>,
    depthwise: Vec<f32>,
    padded: Vec<f32>,
}

impl FusedBlockOp<'_> {
    /// One band: output rows `out_rows` of one image (`x`, `C × h × w`),
    /// written to that image's output planes at `out`.
    ///
    /// # Safety
    /// `out` must be valid for writes of the image's `cout · oh · ow`
    /// values, and no other task may write rows `out_rows` of them.
    #[allow(clippy::too_many_arguments)]
    unsafe fn band(
        &self,
        dw: &DepthwiseOp,
        x: &[f32],
        (h, w): (usize, usize),
        weight: &[f32],
        bias: &[f32],
        out_rows: Range<usize>,
        scratch: &mut Scratch,
        out: SharedOut,
    ) {
        let block = self.block;
        let (k, e) = (block.kernel, block.expanded());
        let (oh, ow) = dw.out_size();
        let in_rows = dw.input_rows(out_rows.clone(), h);
        let in_cols = in_rows.len() * w;
        // The expanded rows (or the input's own, without an expansion),
        // channel planes `stride` apart from the band's first row.
        let (expanded, stride) = match block.expand {
            Some(expand) => {
                scratch.expanded.resize(e * in_cols, 0.0);
                let band = Band {
                    x: &x[in_rows.start * w..],
                    x_stride: h * w,
                    out_stride: in_cols,
                    relu6: true,
                    residual: None,
                };
                expand.forward_band(&band, in_cols, &mut scratch.expanded);
                (&scratch.expanded[..], in_cols)
            }
            None => (&x[in_rows.start * w..], h * w),
        };
        let out_cols = out_rows.len() * ow;
        if out_cols == 0 {
            return;
        }
        scratch.depthwise.resize(e * out_cols, 0.0);
        let padded = &mut scratch.padded;
        crate::simd::widest(
            #[inline(always)]
            || {
                for (ch, dst) in scratch.depthwise.chunks_exact_mut(out_cols).enumerate() {
                    let input = InputBand {
                        rows: &expanded[ch * stride..][..in_cols],
                        first_row: in_rows.start,
                        h,
                        w,
                    };
                    let wk = &weight[ch * k * k..][..k * k];
                    dw.plane(&input, out_rows.start, wk, bias[ch], dst, padded);
                }
            },
        );
        let band = Band {
            x: &scratch.depthwise,
            x_stride: out_cols,
            out_stride: oh * ow,
            relu6: false,
            // Stride 1 and equal channels: the input's planes have the
            // output's layout.
            residual: block.residual.then(|| &x[out_rows.start * ow..]),
        };
        // SAFETY: the image's output starts at `out`; the product writes
        // values `o · oh·ow + out_rows.start·ow + j` for `j < out_cols`,
        // which are rows `out_rows` of each plane (the caller's to write).
        unsafe {
            block
                .project
                .forward_band_raw(&band, out_cols, out.at(out_rows.start * ow));
        }
    }
}

impl CustomOp3 for FusedBlockOp<'_> {
    fn name(&self) -> &'static str {
        "flawscope-fused-inverted-residual"
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
        let block = self.block;
        let (n, c, h, w) = xl.shape().dims4()?;
        let x = f32_slice(xs, xl, "block input")?;
        let weight = f32_slice(ws, wl, "block depthwise weight")?;
        let bias = f32_slice(bs, bl, "block depthwise bias")?;
        let (k, e, cout) = (
            block.kernel,
            block.expanded(),
            block.project.output_channels(),
        );
        let cin = block.expand.map_or(e, Packed1x1::input_channels);
        if c != cin || block.project.input_channels() != e {
            bail!("block: input has {c} channels, the weights expect {cin}");
        }
        if weight.len() != e * k * k || bias.len() != e || x.len() != n * c * h * w {
            bail!("block: tensor sizes do not agree");
        }
        let dw = block.depthwise(h, w);
        let (oh, ow) = dw.out_size();
        if block.residual && (cout != c || (oh, ow) != (h, w)) {
            bail!("block: a residual needs stride 1 and equal channels");
        }
        let total = n * cout * oh * ow;
        let mut out: Vec<f32> = Vec::with_capacity(total);
        let rows = self.rows.max(1);
        let bands = oh.div_ceil(rows);
        let dst = SharedOut(out.as_mut_ptr());
        (0..n * bands)
            .into_par_iter()
            .for_each_init(Scratch::default, |scratch, task| {
                let (image, b) = (task / bands, task % bands);
                let out_rows = b * rows..oh.min((b + 1) * rows);
                let xi = &x[image * c * h * w..][..c * h * w];
                // SAFETY: `out` has room for `total` values; this task
                // writes rows `out_rows` of image `image`'s planes, which
                // no other task writes, and every value is written once
                // before `set_len` below.
                unsafe {
                    let at = dst.at(image * cout * oh * ow);
                    self.band(
                        &dw,
                        xi,
                        (h, w),
                        weight,
                        bias,
                        out_rows,
                        scratch,
                        SharedOut(at),
                    );
                }
            });
        // SAFETY: the bands cover every row of every image.
        unsafe { out.set_len(total) };
        Ok((CpuStorage::F32(out), Shape::from((n, cout, oh, ow))))
    }
}

#[cfg(test)]
mod tests {
    use candle_core::Device;

    use super::*;
    use crate::depthwise::depthwise_conv2d_same;
    use crate::pointwise::PointwiseOp;

    fn values(len: usize, seed: f32) -> Vec<f32> {
        (0..len)
            .map(|i| (i as f32 * 0.618 + seed).sin() * 1.5)
            .collect()
    }

    /// The block layer by layer, with the same kernels.
    fn layered(block: &FusedBlock<'_>, x: &Tensor, weight: &Tensor, bias: &Tensor) -> Vec<f32> {
        let h = match block.expand {
            Some(packed) => x
                .apply_op1_no_bwd(&PointwiseOp {
                    packed,
                    relu6: true,
                })
                .unwrap(),
            None => x.clone(),
        };
        let h = depthwise_conv2d_same(&h, weight, bias, block.stride, true).unwrap();
        let op = PointwiseOp {
            packed: block.project,
            relu6: false,
        };
        let y = if block.residual {
            h.apply_op2_no_bwd(x, &op).unwrap()
        } else {
            h.apply_op1_no_bwd(&op).unwrap()
        };
        y.flatten_all().unwrap().to_vec1().unwrap()
    }

    #[test]
    fn every_band_size_gives_the_layered_result_to_the_bit() {
        if !crate::pointwise::available() {
            eprintln!("no AVX-512: blocks run layer by layer on this CPU");
            return;
        }
        // Kernels 3 and 5, strides 1 and 2, with and without an expansion
        // and a residual; odd sizes and bands of 1 row up to the whole
        // image, so every halo and every last, short band is met.
        for &(n, c, e, cout, k, s, h, w) in &[
            (1, 8, 48, 8, 3, 1, 13, 17),
            (2, 16, 16, 24, 3, 2, 15, 9),
            (1, 24, 144, 24, 5, 1, 11, 30),
            (3, 40, 240, 80, 5, 2, 14, 14),
            (1, 5, 30, 7, 3, 2, 1, 1),
        ] {
            let dev = Device::Cpu;
            let expand = (e != c)
                .then(|| PackedPointwise::new(&values(e * c, 0.3), &values(e, 0.9), e, c).unwrap());
            let project =
                PackedPointwise::new(&values(cout * e, 1.7), &values(cout, 2.3), cout, e).unwrap();
            let block = FusedBlock {
                expand: expand.as_ref(),
                project: &project,
                kernel: k,
                stride: s,
                residual: s == 1 && c == cout,
            };
            let x = Tensor::from_vec(values(n * c * h * w, 0.1), (n, c, h, w), &dev).unwrap();
            let weight = Tensor::from_vec(values(e * k * k, 4.1), (e, 1, k, k), &dev).unwrap();
            let bias = Tensor::from_vec(values(e, 5.3), e, &dev).unwrap();
            let want = layered(&block, &x, &weight, &bias);
            let oh = h.div_ceil(s);
            for rows in 1..=oh {
                let op = FusedBlockOp {
                    block: &block,
                    rows,
                };
                let got: Vec<f32> = x
                    .apply_op3_no_bwd(&weight, &bias, &op)
                    .unwrap()
                    .flatten_all()
                    .unwrap()
                    .to_vec1()
                    .unwrap();
                assert_eq!(got.len(), want.len());
                for (i, (g, w)) in got.iter().zip(&want).enumerate() {
                    assert_eq!(
                        g.to_bits(),
                        w.to_bits(),
                        "c {c} e {e} k {k} s {s} {h}×{w}, {rows} rows per band: value {i}"
                    );
                }
            }
        }
    }

    #[test]
    fn bands_fit_the_cache_and_feed_every_thread() {
        let Some(expand) = PackedPointwise::new(&values(96 * 16, 0.1), &values(96, 0.2), 96, 16)
        else {
            return;
        };
        let project =
            PackedPointwise::new(&values(24 * 96, 0.3), &values(24, 0.4), 24, 96).unwrap();
        let block = FusedBlock {
            expand: Some(&expand),
            project: &project,
            kernel: 3,
            stride: 2,
            residual: false,
        };
        // Lite0's second group at 224², batch 1: 4.8 MB of expanded planes
        // stay in cache, so the block runs layer by layer.
        assert!(block.band_rows(1, 112, 112, 2).is_none());
        // Two 1 024 × 256 images: 96 expanded channels of 512 × 128.
        let rows = block.band_rows(2, 512, 128, 2).unwrap();
        let bytes = 96 * ((2 * rows + 3) * 128 + rows * 64) * 4;
        assert!(bytes <= BAND_BYTES, "{rows} rows take {bytes} bytes");
        assert!(rows >= 2, "{rows} rows per band: more would fit");
        // At 1 024²: one output row's inputs already fill the budget.
        assert_eq!(block.band_rows(1, 512, 512, 2), Some(1));
        // Bands of one row of a 4-row output with a 5 × 5 kernel (one row
        // is all the cache takes at this width) would expand most rows
        // several times.
        let wide = FusedBlock {
            kernel: 5,
            stride: 1,
            ..block
        };
        assert!(wide.band_rows(1, 4, 30_000, 2).is_none());
        // Many small images: whole images per band.
        assert_eq!(wide.band_rows(10_000, 4, 4, 2), Some(4));
    }
}
