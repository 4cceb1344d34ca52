//! The text tower: token and position embeddings, a causally masked
//! transformer, pooling at the end token, and the text projection.

use candle_core::{DType, Device, Tensor};
use candle_nn::{LayerNorm, Module};

use super::config::ClipTextConfig;
use super::transformer::{Encoder, Linear, Weights};
use super::{ClipModel, unsort};
use crate::ModelError;

/// Sentences per pass in [`ClipModel::encode_text`].
const TEXT_BATCH: usize = 128;

#[derive(Debug, Clone)]
pub(super) struct TextTower {
    token_embedding: Tensor,
    position_embedding: Tensor,
    encoder: Encoder,
    final_ln: LayerNorm,
    projection: Linear,
}

impl TextTower {
    /// Reads `text_model.*` and `text_projection` from the checkpoint's root.
    pub(super) fn load(
        w: &Weights,
        t: &ClipTextConfig,
        projection_dim: usize,
    ) -> Result<Self, ModelError> {
        let p = projection_dim;
        let tw = w.pp("text_model");
        Ok(Self {
            token_embedding: tw
                .pp("embeddings.token_embedding")
                .get((t.vocab_size, t.hidden_size), "weight")?,
            position_embedding: tw
                .pp("embeddings.position_embedding")
                .get((t.max_position_embeddings, t.hidden_size), "weight")?,
            encoder: Encoder::load(
                &tw.pp("encoder"),
                t.hidden_size,
                t.intermediate_size,
                t.num_hidden_layers,
                t.num_attention_heads,
                t.layer_norm_eps,
                t.hidden_act,
            )?,
            final_ln: tw.layer_norm(t.hidden_size, t.layer_norm_eps, "final_layer_norm")?,
            projection: Linear::new(
                w.pp("text_projection").get((p, t.hidden_size), "weight")?,
                None,
            ),
        })
    }
}

impl ClipModel {
    /// Projected text embeddings (not normalised), `[n, embed_dim]`.
    ///
    /// `token_ids` is `[n, len]` (`u32` or `i64`, `len` ≤ 77) as produced by
    /// the checkpoint's tokenizer. Each row is pooled at its end token. The
    /// padding after the end token cannot change the result (causal
    /// attention), so it is not computed.
    pub fn encode_text(&self, token_ids: &Tensor) -> Result<Tensor, ModelError> {
        let (n, len) = token_ids.dims2().map_err(|_| {
            ModelError::InvalidInput(format!(
                "token ids must be [n, len], got {:?}",
                token_ids.dims()
            ))
        })?;
        let t = &self.config.text;
        if n == 0 || len == 0 {
            return Err(ModelError::InvalidInput("no token ids".into()));
        }
        if len > t.max_position_embeddings {
            return Err(ModelError::InvalidInput(format!(
                "{len} tokens per sentence, the model takes at most {}",
                t.max_position_embeddings
            )));
        }
        let ids: Vec<Vec<i64>> = token_ids
            .to_device(&Device::Cpu)?
            .to_dtype(DType::I64)?
            .to_vec2::<i64>()?;
        if let Some(bad) = ids
            .iter()
            .flatten()
            .find(|&&id| id < 0 || id as usize >= t.vocab_size)
        {
            return Err(ModelError::InvalidInput(format!(
                "token id {bad} is outside the vocabulary of {}",
                t.vocab_size
            )));
        }
        let pools: Vec<usize> = ids.iter().map(|row| self.pool_index(row)).collect();
        // Short sentences together, each chunk cut after its longest one.
        let mut order: Vec<usize> = (0..n).collect();
        order.sort_by_key(|&i| pools[i]);
        let mut parts = Vec::new();
        for chunk in order.chunks(TEXT_BATCH) {
            let keep = chunk.iter().map(|&i| pools[i]).max().unwrap_or(0) + 1;
            let flat: Vec<u32> = chunk
                .iter()
                .flat_map(|&i| ids[i][..keep].iter().map(|&id| id as u32))
                .collect();
            let chunk_pools: Vec<usize> = chunk.iter().map(|&i| pools[i]).collect();
            parts.push(self.text_chunk(&flat, chunk.len(), keep, &chunk_pools)?);
        }
        let sorted = Tensor::cat(&parts, 0)?;
        Ok(unsort(&sorted, &order, &self.device)?)
    }

    /// Row position transformers pools the text at.
    fn pool_index(&self, row: &[i64]) -> usize {
        if self.config.text.eos_token_id == 2 {
            // Legacy OpenAI configs: the end token has the largest id (first one wins).
            let mut best = 0;
            for (i, &id) in row.iter().enumerate() {
                if id > row[best] {
                    best = i;
                }
            }
            best
        } else {
            row.iter()
                .position(|&id| id == self.config.text.eos_token_id)
                .unwrap_or(0)
        }
    }

    fn text_chunk(
        &self,
        ids: &[u32],
        n: usize,
        len: usize,
        pools: &[usize],
    ) -> Result<Tensor, ModelError> {
        let tt = &self.text;
        let d = self.config.text.hidden_size;
        let ids = Tensor::from_slice(ids, n * len, &self.device)?;
        let x = tt
            .token_embedding
            .index_select(&ids, 0)?
            .reshape((n, len, d))?
            .broadcast_add(&tt.position_embedding.narrow(0, 0, len)?)?;
        let mask = causal_mask(len, &self.device)?;
        let x = tt.encoder.forward(&x, Some(&mask), usize::MAX, |_, _| {})?;
        let rows: Vec<u32> = pools
            .iter()
            .enumerate()
            .map(|(b, &p)| (b * len + p) as u32)
            .collect();
        let rows = Tensor::from_vec(rows, n, &self.device)?;
        let pooled = x.reshape((n * len, d))?.index_select(&rows, 0)?;
        let pooled = tt.final_ln.forward(&pooled)?;
        Ok(tt.projection.forward(&pooled)?)
    }
}

fn causal_mask(len: usize, device: &Device) -> candle_core::Result<Tensor> {
    let mask: Vec<f32> = (0..len)
        .flat_map(|i| (0..len).map(move |j| if j > i { f32::NEG_INFINITY } else { 0.0 }))
        .collect();
    Tensor::from_vec(mask, (len, len), device)
}
