//! The pre-norm transformer both CLIP towers share, and a weights reader
//! that names the file and the tensor in its errors.

use std::path::Path;
use std::sync::Arc;

use candle_core::{DType, Device, IndexOp, Shape, Storage, Tensor};
use candle_nn::{LayerNorm, Module, VarBuilder};
use rayon::prelude::*;

use super::config::Activation;
use crate::ModelError;
use crate::bf16_gemm::{Epilogue, PackedBf16};

/// Arithmetic of a network's matrix products on the CPU: the CLIP vision
/// tower's linear layers, EfficientNet-Lite's 1×1 convolutions.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Precision {
    /// f32 throughout; matches the reference implementation.
    #[default]
    F32,
    /// Weights and activations rounded to bf16 for the products, f32
    /// accumulation and everything else f32: about twice the product's
    /// rate where the CPU has AVX512-BF16, with small drift (see the
    /// README); elsewhere (other CPUs, CUDA) it runs as [`Precision::F32`].
    Bf16,
}

/// Runs `f` on the f32 values of a CPU tensor (made contiguous first).
fn with_cpu_f32<R>(t: &Tensor, f: impl FnOnce(&[f32]) -> R) -> candle_core::Result<R> {
    let t = t.contiguous()?;
    let (storage, layout) = t.storage_and_layout();
    let Storage::Cpu(cpu) = &*storage else {
        return Err(candle_core::Error::Msg("expected a CPU tensor".into()));
    };
    let values = cpu.as_slice::<f32>()?;
    let (start, end) = layout
        .contiguous_offsets()
        .ok_or_else(|| candle_core::Error::Msg("expected a contiguous tensor".into()))?;
    Ok(f(&values[start..end]))
}

/// Weights reader that names the file and the tensor in its errors.
pub(crate) struct Weights<'a> {
    pub(crate) vb: VarBuilder<'a>,
    pub(crate) path: &'a Path,
}

impl<'a> Weights<'a> {
    pub(crate) fn pp(&self, prefix: impl ToString) -> Weights<'a> {
        Weights {
            vb: self.vb.pp(prefix),
            path: self.path,
        }
    }

    fn full_name(&self, name: &str) -> String {
        let prefix = self.vb.prefix();
        if prefix.is_empty() {
            name.to_owned()
        } else {
            format!("{prefix}.{name}")
        }
    }

    fn missing(&self, name: &str) -> ModelError {
        ModelError::Weights {
            path: self.path.to_owned(),
            reason: format!("missing tensor {}", self.full_name(name)),
        }
    }

    pub(crate) fn get(&self, shape: impl Into<Shape>, name: &str) -> Result<Tensor, ModelError> {
        if !self.vb.contains_tensor(name) {
            return Err(self.missing(name));
        }
        self.vb.get(shape, name).map_err(|e| ModelError::Weights {
            path: self.path.to_owned(),
            reason: format!("tensor {}: {e}", self.full_name(name)),
        })
    }

    /// A tensor whose shape is checked by the caller.
    pub(crate) fn get_any(&self, name: &str) -> Result<Tensor, ModelError> {
        if !self.vb.contains_tensor(name) {
            return Err(self.missing(name));
        }
        self.vb
            .get_unchecked(name)
            .map_err(|e| ModelError::Weights {
                path: self.path.to_owned(),
                reason: format!("tensor {}: {e}", self.full_name(name)),
            })
    }

    pub(crate) fn linear(&self, inp: usize, out: usize, name: &str) -> Result<Linear, ModelError> {
        let w = self.pp(name);
        Ok(Linear::new(
            w.get((out, inp), "weight")?,
            Some(w.get(out, "bias")?),
        ))
    }

    pub(crate) fn layer_norm(
        &self,
        dim: usize,
        eps: f64,
        name: &str,
    ) -> Result<LayerNorm, ModelError> {
        let w = self.pp(name);
        Ok(LayerNorm::new(
            w.get(dim, "weight")?,
            w.get(dim, "bias")?,
            eps,
        ))
    }
}

/// `y = x Wᵀ + b` over the last dimension, as one 2-D product.
#[derive(Debug, Clone)]
pub(crate) struct Linear {
    pub(crate) weight: Tensor,
    pub(crate) bias: Option<Tensor>,
    /// The bf16 copy of `weight` and the bias values, where [`Precision::Bf16`] is on.
    pub(crate) bf16: Option<Arc<(PackedBf16, Vec<f32>)>>,
}

impl Linear {
    pub(crate) fn new(weight: Tensor, bias: Option<Tensor>) -> Self {
        Self {
            weight,
            bias,
            bf16: None,
        }
    }

    /// Packs the weight for the bf16 product; a no-op off the CPU or
    /// without AVX512-BF16.
    fn set_precision(&mut self, precision: Precision) -> candle_core::Result<()> {
        self.bf16 = None;
        if precision == Precision::F32 || !matches!(self.weight.device(), Device::Cpu) {
            return Ok(());
        }
        let (n, k) = self.weight.dims2()?;
        let weight = self.weight.to_dtype(DType::F32)?;
        let packed = with_cpu_f32(&weight, |w| PackedBf16::new(w, n, k))?;
        let bias = match &self.bias {
            Some(b) => b.to_dtype(DType::F32)?.to_vec1::<f32>()?,
            None => vec![0.0; n],
        };
        self.bf16 = packed.map(|p| Arc::new((p, bias)));
        Ok(())
    }

    /// `x Wᵀ + b (+ residual)` through the bf16 product, where packed and
    /// `x` is f32 on the CPU.
    fn forward_bf16(
        &self,
        x: &Tensor,
        epilogue: Epilogue,
        residual: Option<&Tensor>,
    ) -> candle_core::Result<Option<Tensor>> {
        let Some(packed) = &self.bf16 else {
            return Ok(None);
        };
        let (w, bias) = (&packed.0, &packed.1);
        if x.dtype() != DType::F32 || !matches!(x.device(), Device::Cpu) {
            return Ok(None);
        }
        let dims = x.dims();
        let (&inp, lead) = dims
            .split_last()
            .ok_or_else(|| candle_core::Error::Msg("linear layer on a scalar".into()))?;
        if inp != w.k() {
            return Err(candle_core::Error::Msg(format!(
                "linear layer takes {} inputs, got {inp}",
                w.k()
            )));
        }
        let rows: usize = lead.iter().product();
        let mut out = lead.to_vec();
        out.push(w.n());
        let y = match residual {
            Some(r) => {
                if r.dims() != out.as_slice() || r.dtype() != DType::F32 {
                    return Ok(None);
                }
                with_cpu_f32(x, |v| {
                    with_cpu_f32(r, |r| w.matmul(v, rows, bias, epilogue, Some(r)))
                })??
            }
            None => with_cpu_f32(x, |v| w.matmul(v, rows, bias, epilogue, None))?,
        };
        Ok(Some(Tensor::from_vec(y, out, &Device::Cpu)?))
    }

    /// `act(x Wᵀ + b)`, fused where the bf16 product runs.
    fn forward_act(&self, x: &Tensor, act: Activation) -> candle_core::Result<Tensor> {
        if act == Activation::QuickGelu
            && let Some(y) = self.forward_bf16(x, Epilogue::BiasQuickGelu, None)?
        {
            return Ok(y);
        }
        act.apply(&self.forward(x)?)
    }

    /// `x Wᵀ + b + residual`, fused where the bf16 product runs.
    fn forward_add(&self, x: &Tensor, residual: &Tensor) -> candle_core::Result<Tensor> {
        if let Some(y) = self.forward_bf16(x, Epilogue::Bias, Some(residual))? {
            return Ok(y);
        }
        residual + self.forward(x)?
    }

    pub(crate) fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        if let Some(y) = self.forward_bf16(x, Epilogue::Bias, None)? {
            return Ok(y);
        }
        let dims = x.dims();
        let (&inp, lead) = dims
            .split_last()
            .ok_or_else(|| candle_core::Error::Msg("linear layer on a scalar".into()))?;
        let rows: usize = lead.iter().product();
        let y = x.reshape((rows, inp))?.matmul(&self.weight.t()?)?;
        let y = match &self.bias {
            Some(b) => y.broadcast_add(b)?,
            None => y,
        };
        let mut out = lead.to_vec();
        out.push(self.weight.dim(0)?);
        y.reshape(out)
    }
}

#[derive(Debug, Clone)]
pub(crate) struct Attention {
    qkv: Linear,
    out: Linear,
    heads: usize,
    head_dim: usize,
    scale: f64,
}

impl Attention {
    fn load(w: &Weights, dim: usize, heads: usize) -> Result<Self, ModelError> {
        let q = w.linear(dim, dim, "q_proj")?;
        let k = w.linear(dim, dim, "k_proj")?;
        let v = w.linear(dim, dim, "v_proj")?;
        Self::from_projections(q, k, v, w.linear(dim, dim, "out_proj")?, dim, heads)
    }

    /// Multi-head self-attention from its four projections (each with a bias).
    pub(crate) fn from_projections(
        q: Linear,
        k: Linear,
        v: Linear,
        out: Linear,
        dim: usize,
        heads: usize,
    ) -> Result<Self, ModelError> {
        let bias = |l: &Linear| {
            l.bias
                .clone()
                .ok_or_else(|| candle_core::Error::Msg("attention projection without bias".into()))
        };
        let qkv = Linear::new(
            Tensor::cat(&[&q.weight, &k.weight, &v.weight], 0)?,
            Some(Tensor::cat(&[bias(&q)?, bias(&k)?, bias(&v)?], 0)?),
        );
        let head_dim = dim / heads;
        Ok(Self {
            qkv,
            out,
            heads,
            head_dim,
            scale: (head_dim as f64).powf(-0.5),
        })
    }

    /// `residual + attention(x)`.
    pub(crate) fn forward(
        &self,
        x: &Tensor,
        mask: Option<&Tensor>,
        residual: &Tensor,
    ) -> candle_core::Result<Tensor> {
        let (b, n, d) = x.dims3()?;
        let (h, hd) = (self.heads, self.head_dim);
        let qkv = self.qkv.forward(x)?;
        if mask.is_none()
            && n <= SHORT_SEQUENCE
            && qkv.dtype() == DType::F32
            && matches!(qkv.device(), Device::Cpu)
        {
            let ctx = with_cpu_f32(&qkv, |v| {
                short_attention(v, (b, n), n, (h, hd), self.scale as f32)
            })?;
            let ctx = Tensor::from_vec(ctx, (b, n, d), &Device::Cpu)?;
            return self.out.forward_add(&ctx, residual);
        }
        let qkv = qkv.reshape((b, n, 3, h, hd))?.permute((2, 0, 3, 1, 4))?;
        let q = (qkv.i(0)? * self.scale)?.reshape((b * h, n, hd))?;
        let k = qkv.i(1)?.contiguous()?.reshape((b * h, n, hd))?;
        let v = qkv.i(2)?.contiguous()?.reshape((b * h, n, hd))?;
        let scores = q.matmul(&k.t()?)?;
        let scores = match mask {
            Some(m) => scores.broadcast_add(m)?,
            None => scores,
        };
        let probs = candle_nn::ops::softmax_last_dim(&scores)?;
        let ctx = probs
            .matmul(&v)?
            .reshape((b, h, n, hd))?
            .transpose(1, 2)?
            .reshape((b, n, d))?;
        self.out.forward_add(&ctx, residual)
    }
}

/// Sequences up to this length (WinCLIP's windows: 5 and 10 tokens) skip the
/// batched products, whose per-call cost dwarfs a 10×10 attention.
const SHORT_SEQUENCE: usize = 32;

/// Unmasked attention over `b` sequences of `n` tokens, from the fused
/// projection `qkv` (`[b·n, 3·h·hd]`: q, k, v, each head-major), for the
/// first `queries` tokens of each sequence (all `n`, or 1 for the class
/// token alone); returns the context `[b·queries, h·hd]`. One sequence per
/// task; plain loops (`n` is small).
fn short_attention(
    qkv: &[f32],
    (b, n): (usize, usize),
    queries: usize,
    (h, hd): (usize, usize),
    scale: f32,
) -> Vec<f32> {
    let d = h * hd;
    let mut ctx = vec![0f32; b * queries * d];
    ctx.par_chunks_mut(queries * d)
        .zip(qkv.par_chunks(n * 3 * d))
        .for_each(|(out, qkv)| {
            let mut p = vec![0f32; n];
            for head in 0..h {
                let q = |i: usize| &qkv[i * 3 * d + head * hd..][..hd];
                let k = |j: usize| &qkv[j * 3 * d + d + head * hd..][..hd];
                let v = |j: usize| &qkv[j * 3 * d + 2 * d + head * hd..][..hd];
                for i in 0..queries {
                    let qi = q(i);
                    for (j, pj) in p.iter_mut().enumerate() {
                        *pj = dot(qi, k(j)) * scale;
                    }
                    let max = p.iter().copied().fold(f32::NEG_INFINITY, f32::max);
                    let mut sum = 0f32;
                    for pj in &mut p {
                        *pj = (*pj - max).exp();
                        sum += *pj;
                    }
                    let o = &mut out[i * d + head * hd..][..hd];
                    for (j, &pj) in p.iter().enumerate() {
                        let w = pj / sum;
                        for (o, &vv) in o.iter_mut().zip(v(j)) {
                            *o += w * vv;
                        }
                    }
                }
            }
        });
    ctx
}

/// Dot product with 8 partial sums (lets the compiler vectorise it).
fn dot(a: &[f32], b: &[f32]) -> f32 {
    let mut acc = [0f32; 8];
    let (ac, ar) = a.as_chunks::<8>();
    let (bc, br) = b.as_chunks::<8>();
    for (x, y) in ac.iter().zip(bc) {
        for l in 0..8 {
            acc[l] += x[l] * y[l];
        }
    }
    let tail: f32 = ar.iter().zip(br).map(|(x, y)| x * y).sum();
    acc.iter().sum::<f32>() + tail
}

#[derive(Debug, Clone)]
pub(crate) struct EncoderLayer {
    ln1: LayerNorm,
    attn: Attention,
    ln2: LayerNorm,
    fc1: Linear,
    fc2: Linear,
    act: Activation,
}

impl EncoderLayer {
    /// A pre-norm layer: `x + attn(ln1(x))`, then `x + fc2(act(fc1(ln2(x))))`.
    pub(crate) fn new(
        ln1: LayerNorm,
        attn: Attention,
        ln2: LayerNorm,
        fc1: Linear,
        fc2: Linear,
        act: Activation,
    ) -> Self {
        Self {
            ln1,
            attn,
            ln2,
            fc1,
            fc2,
            act,
        }
    }

    fn forward(&self, x: &Tensor, mask: Option<&Tensor>) -> candle_core::Result<Tensor> {
        let x = self.attn.forward(&self.ln1.forward(x)?, mask, x)?;
        self.feed_forward(&x)
    }

    /// `x + fc2(act(fc1(ln2(x))))`.
    fn feed_forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        let h = self.fc1.forward_act(&self.ln2.forward(x)?, self.act)?;
        self.fc2.forward_add(&h, x)
    }

    /// The output of the first (class) token of each sequence, `[b, d]`.
    /// Short unmasked sequences on the CPU compute that token alone past
    /// the fused query, key and value projection (a quarter of the layer's
    /// work, which every token's keys and values need); the rest run the
    /// whole layer.
    fn forward_class(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        let (b, n, d) = x.dims3()?;
        // Checked on the input, before the projection: the fallback below
        // computes its own.
        if n > SHORT_SEQUENCE || x.dtype() != DType::F32 || !matches!(x.device(), Device::Cpu) {
            return self.forward(x, None)?.i((.., 0, ..))?.contiguous();
        }
        let attn = &self.attn;
        let qkv = attn.qkv.forward(&self.ln1.forward(x)?)?;
        let (h, hd) = (attn.heads, attn.head_dim);
        let ctx = with_cpu_f32(&qkv, |v| {
            short_attention(v, (b, n), 1, (h, hd), attn.scale as f32)
        })?;
        let ctx = Tensor::from_vec(ctx, (b, d), &Device::Cpu)?;
        let class = x.i((.., 0, ..))?.contiguous()?;
        self.feed_forward(&attn.out.forward_add(&ctx, &class)?)
    }
}

#[derive(Debug, Clone)]
pub(crate) struct Encoder {
    layers: Vec<EncoderLayer>,
}

impl Encoder {
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn load(
        w: &Weights,
        dim: usize,
        mlp: usize,
        layers: usize,
        heads: usize,
        eps: f64,
        act: Activation,
    ) -> Result<Self, ModelError> {
        let w = w.pp("layers");
        let layers = (0..layers)
            .map(|i| {
                let l = w.pp(i);
                Ok(EncoderLayer {
                    ln1: l.layer_norm(dim, eps, "layer_norm1")?,
                    attn: Attention::load(&l.pp("self_attn"), dim, heads)?,
                    ln2: l.layer_norm(dim, eps, "layer_norm2")?,
                    fc1: l.pp("mlp").linear(dim, mlp, "fc1")?,
                    fc2: l.pp("mlp").linear(mlp, dim, "fc2")?,
                    act,
                })
            })
            .collect::<Result<_, ModelError>>()?;
        Ok(Self { layers })
    }

    /// An encoder of the given layers.
    pub(crate) fn from_layers(layers: Vec<EncoderLayer>) -> Self {
        Self { layers }
    }

    /// Number of layers.
    pub(crate) fn depth(&self) -> usize {
        self.layers.len()
    }

    /// Sets the arithmetic of every linear layer (see [`Precision`]).
    pub(crate) fn set_precision(&mut self, precision: Precision) -> candle_core::Result<()> {
        for layer in &mut self.layers {
            for linear in [
                &mut layer.attn.qkv,
                &mut layer.attn.out,
                &mut layer.fc1,
                &mut layer.fc2,
            ] {
                linear.set_precision(precision)?;
            }
        }
        Ok(())
    }

    /// The class token's output of the whole encoder, `[b, d]`: every
    /// layer but the last in full, the last for that token alone.
    pub(crate) fn forward_class(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        let Some((last, first)) = self.layers.split_last() else {
            return x.i((.., 0, ..))?.contiguous();
        };
        let mut x = x.clone();
        for layer in first {
            x = layer.forward(&x, None)?;
        }
        last.forward_class(&x)
    }

    /// Runs the first `upto` layers; `keep(i)` says whether to record
    /// the output of layer `i` (1-based; 0 is the input).
    pub(crate) fn forward(
        &self,
        x: &Tensor,
        mask: Option<&Tensor>,
        upto: usize,
        mut record: impl FnMut(usize, &Tensor),
    ) -> candle_core::Result<Tensor> {
        record(0, x);
        let mut x = x.clone();
        for (i, layer) in self.layers.iter().take(upto).enumerate() {
            x = layer.forward(&x, mask)?;
            record(i + 1, &x);
        }
        Ok(x)
    }
}
