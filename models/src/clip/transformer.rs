//! The pre-norm transformer both CLIP towers share, and a weights reader
//! that names the file and the tensor in its errors.

use std::path::Path;

use candle_core::{IndexOp, Shape, Tensor};
use candle_nn::{LayerNorm, Module, VarBuilder};

use super::config::Activation;
use crate::ModelError;

/// Weights reader that names the file and the tensor in its errors.
pub(super) struct Weights<'a> {
    pub(super) vb: VarBuilder<'a>,
    pub(super) path: &'a Path,
}

impl<'a> Weights<'a> {
    pub(super) fn pp(&self, prefix: impl ToString) -> Weights<'a> {
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

    pub(super) fn get(&self, shape: impl Into<Shape>, name: &str) -> Result<Tensor, ModelError> {
        if !self.vb.contains_tensor(name) {
            return Err(self.missing(name));
        }
        self.vb.get(shape, name).map_err(|e| ModelError::Weights {
            path: self.path.to_owned(),
            reason: format!("tensor {}: {e}", self.full_name(name)),
        })
    }

    /// A tensor whose shape is checked by the caller.
    pub(super) fn get_any(&self, name: &str) -> Result<Tensor, ModelError> {
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

    pub(super) fn linear(&self, inp: usize, out: usize, name: &str) -> Result<Linear, ModelError> {
        let w = self.pp(name);
        Ok(Linear {
            weight: w.get((out, inp), "weight")?,
            bias: Some(w.get(out, "bias")?),
        })
    }

    pub(super) fn layer_norm(
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
pub(super) struct Linear {
    pub(super) weight: Tensor,
    pub(super) bias: Option<Tensor>,
}

impl Linear {
    pub(super) fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
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
struct Attention {
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
        let bias = |l: &Linear| {
            l.bias
                .clone()
                .ok_or_else(|| candle_core::Error::Msg("attention projection without bias".into()))
        };
        let qkv = Linear {
            weight: Tensor::cat(&[&q.weight, &k.weight, &v.weight], 0)?,
            bias: Some(Tensor::cat(&[bias(&q)?, bias(&k)?, bias(&v)?], 0)?),
        };
        let head_dim = dim / heads;
        Ok(Self {
            qkv,
            out: w.linear(dim, dim, "out_proj")?,
            heads,
            head_dim,
            scale: (head_dim as f64).powf(-0.5),
        })
    }

    fn forward(&self, x: &Tensor, mask: Option<&Tensor>) -> candle_core::Result<Tensor> {
        let (b, n, d) = x.dims3()?;
        let (h, hd) = (self.heads, self.head_dim);
        let qkv = self
            .qkv
            .forward(x)?
            .reshape((b, n, 3, h, hd))?
            .permute((2, 0, 3, 1, 4))?;
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
        self.out.forward(&ctx)
    }
}

#[derive(Debug, Clone)]
struct EncoderLayer {
    ln1: LayerNorm,
    attn: Attention,
    ln2: LayerNorm,
    fc1: Linear,
    fc2: Linear,
    act: Activation,
}

impl EncoderLayer {
    fn forward(&self, x: &Tensor, mask: Option<&Tensor>) -> candle_core::Result<Tensor> {
        let h = self.attn.forward(&self.ln1.forward(x)?, mask)?;
        let x = (x + h)?;
        let h = self.fc1.forward(&self.ln2.forward(&x)?)?;
        let h = self.fc2.forward(&self.act.apply(&h)?)?;
        x + h
    }
}

#[derive(Debug, Clone)]
pub(super) struct Encoder {
    layers: Vec<EncoderLayer>,
}

impl Encoder {
    #[allow(clippy::too_many_arguments)]
    pub(super) fn load(
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

    /// Runs the first `upto` layers; `keep(i)` says whether to record
    /// the output of layer `i` (1-based; 0 is the input).
    pub(super) fn forward(
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
