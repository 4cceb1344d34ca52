//! The vision tower: patch embedding with interpolated position embeddings,
//! the transformer, and the forwards built on it (image, patches, chosen
//! layers, WinCLIP's windows).

use candle_core::{DType, Device, IndexOp, Tensor};
use candle_nn::{LayerNorm, Module};

use super::config::ClipVisionConfig;
use super::transformer::{Encoder, Linear, Precision, Weights};
use super::{ClipModel, unsort};
use crate::ModelError;

/// Token budget of one batched pass in [`ClipModel::encode_windows`]: enough
/// to amortise the matrix products, small enough to bound activations.
const WINDOW_BATCH_TOKENS: usize = 4096;

#[derive(Debug, Clone)]
pub(super) struct VisionTower {
    class_embedding: Tensor,
    /// Patch convolution as a matrix: `[hidden, channels * patch * patch]`.
    patch_weight: Tensor,
    /// `[1 + grid², hidden]`.
    position_embedding: Tensor,
    pre_ln: LayerNorm,
    encoder: Encoder,
    post_ln: LayerNorm,
    projection: Linear,
}

impl VisionTower {
    /// Reads `vision_model.*` and `visual_projection` from the checkpoint's root.
    pub(super) fn load(
        w: &Weights,
        v: &ClipVisionConfig,
        projection_dim: usize,
    ) -> Result<Self, ModelError> {
        let p = projection_dim;
        let vw = w.pp("vision_model");
        let grid = v.grid();
        let patch = v.patch_size;
        let emb = vw.pp("embeddings");
        let patch_weight = emb
            .pp("patch_embedding")
            .get((v.hidden_size, v.num_channels, patch, patch), "weight")?
            .reshape((v.hidden_size, v.num_channels * patch * patch))?;
        Ok(Self {
            // transformers would silently draw a random class token here; refuse instead.
            class_embedding: emb.get(v.hidden_size, "class_embedding")?,
            patch_weight,
            position_embedding: emb
                .pp("position_embedding")
                .get((grid * grid + 1, v.hidden_size), "weight")?,
            pre_ln: vw.layer_norm(v.hidden_size, v.layer_norm_eps, "pre_layrnorm")?,
            encoder: Encoder::load(
                &vw.pp("encoder"),
                v.hidden_size,
                v.intermediate_size,
                v.num_hidden_layers,
                v.num_attention_heads,
                v.layer_norm_eps,
                v.hidden_act,
            )?,
            post_ln: vw.layer_norm(v.hidden_size, v.layer_norm_eps, "post_layernorm")?,
            projection: Linear::new(
                w.pp("visual_projection")
                    .get((p, v.hidden_size), "weight")?,
                None,
            ),
        })
    }
}

impl ClipModel {
    /// The arithmetic of the vision transformer's linear layers (f32 by
    /// default; see [`Precision`]). The text tower always runs in f32.
    pub fn with_vision_precision(mut self, precision: Precision) -> Result<Self, ModelError> {
        self.vision.encoder.set_precision(precision)?;
        self.vision_precision = precision;
        Ok(self)
    }

    /// The arithmetic asked for with [`ClipModel::with_vision_precision`].
    pub fn vision_precision(&self) -> Precision {
        self.vision_precision
    }

    /// Whether [`Precision::Bf16`] runs as bf16 here (a CPU model on a CPU
    /// with AVX512-BF16), not as its f32 fallback.
    pub fn bf16_available(&self) -> bool {
        matches!(self.device, Device::Cpu) && crate::bf16_gemm::available()
    }
}

impl ClipModel {
    fn check_pixels(&self, pixels: &Tensor) -> Result<(usize, usize, usize), ModelError> {
        let v = &self.config.vision;
        crate::checkpoint::check_pixels(pixels, v.num_channels, v.patch_size)
    }

    /// Position embeddings for a `rows × cols` grid, `[1 + rows*cols, hidden]`.
    fn position_embeddings(&self, rows: usize, cols: usize) -> Result<Tensor, ModelError> {
        let g = self.config.vision.grid();
        resize_position_embeddings(&self.vision.position_embedding, g, rows, cols, &self.device)
    }

    /// Tokens entering the encoder: class + patches, position embeddings
    /// added, pre-layernormed; `[batch, 1 + rows*cols, hidden]`.
    fn embed(&self, pixels: &Tensor) -> Result<(Tensor, (usize, usize)), ModelError> {
        let (b, h, w) = self.check_pixels(pixels)?;
        let v = &self.config.vision;
        let p = v.patch_size;
        let (rows, cols) = self.grid(h, w);
        let c = v.num_channels;
        let d = v.hidden_size;
        // A stride-p convolution with a p×p kernel is a product of flattened patches.
        let patches = pixels
            .to_device(&self.device)?
            .to_dtype(DType::F32)?
            .narrow(2, 0, rows * p)?
            .narrow(3, 0, cols * p)?
            .reshape(vec![b, c, rows, p, cols, p])?
            .permute(vec![0, 2, 4, 1, 3, 5])?
            .contiguous()?
            .reshape((b * rows * cols, c * p * p))?
            .matmul(&self.vision.patch_weight.t()?)?
            .reshape((b, rows * cols, d))?;
        let cls = self
            .vision
            .class_embedding
            .reshape((1, 1, d))?
            .broadcast_as((b, 1, d))?;
        let tokens = Tensor::cat(&[&cls, &patches], 1)?
            .broadcast_add(&self.position_embeddings(rows, cols)?)?;
        Ok((self.vision.pre_ln.forward(&tokens)?, (rows, cols)))
    }

    /// Post-layernorm then projection of `[.., hidden]` tokens.
    fn project_tokens(&self, tokens: &Tensor) -> Result<Tensor, ModelError> {
        let normed = self.vision.post_ln.forward(&tokens.contiguous()?)?;
        Ok(self.vision.projection.forward(&normed)?)
    }

    /// Projected image embeddings (not normalised), `[batch, embed_dim]`,
    /// from normalised pixels `[batch, 3, H, W]` (see [`ClipModel::preprocessor`]).
    pub fn encode_image(&self, pixels: &Tensor) -> Result<Tensor, ModelError> {
        let (tokens, _) = self.embed(pixels)?;
        let out = self
            .vision
            .encoder
            .forward(&tokens, None, usize::MAX, |_, _| {})?;
        self.project_tokens(&out.i((.., 0, ..))?)
    }

    /// Every patch token of the last layer, post-layernormed and projected
    /// into the joint space, `[batch, rows*cols, embed_dim]` (row-major grid).
    pub fn encode_patches(&self, pixels: &Tensor) -> Result<Tensor, ModelError> {
        Ok(self.encode_image_and_patches(pixels)?.1)
    }

    /// Every token of the last layer, post-layernormed, `[batch, 1 + rows*cols, hidden]`.
    fn last_layer_normed(&self, pixels: &Tensor) -> Result<Tensor, ModelError> {
        let (tokens, _) = self.embed(pixels)?;
        let out = self
            .vision
            .encoder
            .forward(&tokens, None, usize::MAX, |_, _| {})?;
        Ok(self.vision.post_ln.forward(&out.contiguous()?)?)
    }

    /// [`ClipModel::encode_image`] and [`ClipModel::encode_patches`] from one forward pass.
    pub fn encode_image_and_patches(
        &self,
        pixels: &Tensor,
    ) -> Result<(Tensor, Tensor), ModelError> {
        let projected = self
            .vision
            .projection
            .forward(&self.last_layer_normed(pixels)?)?;
        let n = projected.dim(1)?;
        Ok((
            projected.i((.., 0, ..))?.contiguous()?,
            projected.narrow(1, 1, n - 1)?.contiguous()?,
        ))
    }

    /// [`ClipModel::encode_image`] and every patch token of the last layer,
    /// post-layernormed but *not* projected, `[batch, rows*cols, hidden]`:
    /// the patch features WinCLIP's few-shot memory holds (as open_clip's
    /// `output_tokens`, which anomalib uses), from one forward pass.
    pub fn encode_image_and_patch_tokens(
        &self,
        pixels: &Tensor,
    ) -> Result<(Tensor, Tensor), ModelError> {
        let normed = self.last_layer_normed(pixels)?;
        let n = normed.dim(1)?;
        let class = self
            .vision
            .projection
            .forward(&normed.i((.., 0, ..))?.contiguous()?)?;
        Ok((class, normed.narrow(1, 1, n - 1)?.contiguous()?))
    }

    /// Raw tokens of the chosen layers, each `[batch, 1 + rows*cols, hidden]`
    /// (class token first), numbered as `transformers`' `hidden_states`:
    /// 0 is the embeddings after the pre-layernorm, `i` the output of layer
    /// `i`, up to `num_hidden_layers`. Nothing is post-layernormed. Only the
    /// layers up to the deepest one asked for are run.
    pub fn vision_hidden_states(
        &self,
        pixels: &Tensor,
        layers: &[usize],
    ) -> Result<Vec<Tensor>, ModelError> {
        let depth = self.config.vision.num_hidden_layers;
        if let Some(bad) = layers.iter().find(|&&l| l > depth) {
            return Err(ModelError::InvalidInput(format!(
                "layer {bad} asked for; the vision tower has hidden states 0..={depth}"
            )));
        }
        let (tokens, _) = self.embed(pixels)?;
        let upto = layers.iter().copied().max().unwrap_or(0);
        let mut found: Vec<Option<Tensor>> = vec![None; layers.len()];
        self.vision.encoder.forward(&tokens, None, upto, |i, x| {
            for (slot, &l) in found.iter_mut().zip(layers) {
                if l == i {
                    *slot = Some(x.clone());
                }
            }
        })?;
        found
            .into_iter()
            .map(|t| t.ok_or_else(|| ModelError::InvalidInput("hidden state not produced".into())))
            .collect()
    }

    /// WinCLIP's windowed forward for one image (`pixels` is `[1, 3, H, W]`):
    /// for each window — a list of patch indices, row-major in the
    /// [`ClipModel::grid`] — the class token and those patch tokens, with
    /// their position embeddings, go through the whole transformer alone;
    /// the class output is post-layernormed and projected. Returns
    /// `[windows.len(), embed_dim]` (not normalised). Windows of equal size
    /// are batched together; see [`sliding_windows`].
    pub fn encode_windows(
        &self,
        pixels: &Tensor,
        windows: &[Vec<usize>],
    ) -> Result<Tensor, ModelError> {
        let (b, _, _) = self.check_pixels(pixels)?;
        if b != 1 {
            return Err(ModelError::InvalidInput(format!(
                "encode_windows takes one image, got {b}"
            )));
        }
        if windows.is_empty() {
            return Err(ModelError::InvalidInput("no window".into()));
        }
        let (tokens, (rows, cols)) = self.embed(pixels)?;
        let n_patches = rows * cols;
        for (i, w) in windows.iter().enumerate() {
            if w.is_empty() {
                return Err(ModelError::InvalidInput(format!("window {i} is empty")));
            }
            if let Some(p) = w.iter().find(|&&p| p >= n_patches) {
                return Err(ModelError::InvalidInput(format!(
                    "window {i} holds patch {p}; the grid is {rows}x{cols}"
                )));
            }
        }
        let tokens = tokens.squeeze(0)?;
        let d = self.config.vision.hidden_size;
        // Group by window size, keeping the original order within a group.
        let mut order: Vec<usize> = (0..windows.len()).collect();
        order.sort_by_key(|&i| windows[i].len());
        let mut parts = Vec::new();
        let mut start = 0;
        while start < order.len() {
            let len = windows[order[start]].len() + 1;
            let per_batch = (WINDOW_BATCH_TOKENS / len).max(1);
            let mut end = start;
            while end < order.len()
                && end - start < per_batch
                && windows[order[end]].len() + 1 == len
            {
                end += 1;
            }
            let chunk = &order[start..end];
            let index: Vec<u32> = chunk
                .iter()
                .flat_map(|&i| {
                    std::iter::once(0u32).chain(windows[i].iter().map(|&p| p as u32 + 1))
                })
                .collect();
            let index = Tensor::from_vec(index, chunk.len() * len, &self.device)?;
            let x = tokens
                .index_select(&index, 0)?
                .reshape((chunk.len(), len, d))?;
            let class = self.vision.encoder.forward_class(&x)?;
            parts.push(self.project_tokens(&class)?);
            start = end;
        }
        let sorted = Tensor::cat(&parts, 0)?;
        Ok(unsort(&sorted, &order, &self.device)?)
    }
}

/// All `size × size` windows of a `rows × cols` patch grid at `stride`,
/// row-major, each as row-major patch indices (WinCLIP's sliding windows).
pub fn sliding_windows(rows: usize, cols: usize, size: usize, stride: usize) -> Vec<Vec<usize>> {
    if size == 0 || stride == 0 || size > rows || size > cols {
        return Vec::new();
    }
    let mut out = Vec::new();
    for top in (0..=rows - size).step_by(stride) {
        for left in (0..=cols - size).step_by(stride) {
            out.push(
                (0..size)
                    .flat_map(|r| (0..size).map(move |c| (top + r) * cols + left + c))
                    .collect(),
            );
        }
    }
    out
}

/// The `g × g` grid of `d`-wide rows `patches` (row-major) resized to
/// `rows × cols` as PyTorch's `interpolate(mode="bicubic",
/// align_corners=False)` does, row-major, computed in f64.
/// A `[1 + g*g, hidden]` table (class row first, then a `g × g` grid) for a
/// `rows × cols` grid: the class row as is, the grid interpolated
/// ([`interpolate_grid`]); the table itself when the grid is unchanged.
pub(crate) fn resize_position_embeddings(
    table: &Tensor,
    g: usize,
    rows: usize,
    cols: usize,
    device: &Device,
) -> Result<Tensor, ModelError> {
    if (rows, cols) == (g, g) {
        return Ok(table.clone());
    }
    let rows_of_table = table
        .to_device(&Device::Cpu)?
        .to_dtype(DType::F32)?
        .to_vec2::<f32>()?;
    let d = rows_of_table.first().map_or(0, Vec::len);
    let mut out = Vec::with_capacity((1 + rows * cols) * d);
    if let Some(cls) = rows_of_table.first() {
        out.extend_from_slice(cls);
    }
    out.extend(interpolate_grid(&rows_of_table[1..], g, rows, cols, d));
    Ok(Tensor::from_vec(out, (1 + rows * cols, d), device)?)
}

pub(crate) fn interpolate_grid(
    patches: &[Vec<f32>],
    g: usize,
    rows: usize,
    cols: usize,
    d: usize,
) -> Vec<f32> {
    let mut out = Vec::with_capacity(rows * cols * d);
    let wy = cubic_taps(g, rows);
    let wx = cubic_taps(g, cols);
    let mut row_mix = vec![0f64; g * d];
    for (ty, ky) in &wy {
        // Interpolate along y first: one source row per grid column.
        row_mix.iter_mut().for_each(|v| *v = 0.0);
        for (k, &sy) in ty.iter().enumerate() {
            for sx in 0..g {
                let src = &patches[sy * g + sx];
                let dst = &mut row_mix[sx * d..(sx + 1) * d];
                for (o, &s) in dst.iter_mut().zip(src) {
                    *o += ky[k] * f64::from(s);
                }
            }
        }
        for (tx, kx) in &wx {
            let mut acc = vec![0f64; d];
            for (k, &sx) in tx.iter().enumerate() {
                for (a, &s) in acc.iter_mut().zip(&row_mix[sx * d..(sx + 1) * d]) {
                    *a += kx[k] * s;
                }
            }
            out.extend(acc.iter().map(|&v| v as f32));
        }
    }
    out
}

/// PyTorch's bicubic interpolation weights (`align_corners=False`, A = -0.75):
/// for each output index, four clamped source indices and their weights.
fn cubic_taps(in_size: usize, out_size: usize) -> Vec<([usize; 4], [f64; 4])> {
    const A: f64 = -0.75;
    let near = |x: f64| ((A + 2.0) * x - (A + 3.0)) * x * x + 1.0;
    let far = |x: f64| ((A * x - 5.0 * A) * x + 8.0 * A) * x - 4.0 * A;
    let scale = in_size as f64 / out_size as f64;
    let last = in_size as i64 - 1;
    (0..out_size)
        .map(|i| {
            let src = (i as f64 + 0.5) * scale - 0.5;
            let base = src.floor();
            let t = src - base;
            let base = base as i64;
            let idx = [base - 1, base, base + 1, base + 2].map(|j| j.clamp(0, last) as usize);
            (idx, [far(t + 1.0), near(t), near(1.0 - t), far(2.0 - t)])
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sliding_windows_cover_the_grid() {
        let w = sliding_windows(14, 14, 2, 1);
        assert_eq!(w.len(), 169);
        assert_eq!(w[0], vec![0, 1, 14, 15]);
        assert_eq!(sliding_windows(14, 14, 3, 1).len(), 144);
        assert_eq!(
            sliding_windows(4, 6, 2, 2),
            vec![
                vec![0, 1, 6, 7],
                vec![2, 3, 8, 9],
                vec![4, 5, 10, 11],
                vec![12, 13, 18, 19],
                vec![14, 15, 20, 21],
                vec![16, 17, 22, 23],
            ]
        );
        assert!(sliding_windows(2, 2, 3, 1).is_empty());
        assert!(sliding_windows(2, 2, 1, 0).is_empty());
    }

    #[test]
    fn cubic_taps_are_identity_at_the_same_size() {
        for (idx, w) in cubic_taps(5, 5) {
            let sum: f64 = w.iter().sum();
            assert!((sum - 1.0).abs() < 1e-12);
            assert!((w[1] - 1.0).abs() < 1e-12, "{idx:?} {w:?}");
        }
    }
}
