//! Vision-transformer backbones (DINOv2, CLIP's vision tower) as patch
//! features: the tokens of chosen layers, class token dropped, laid out on
//! the patch grid so every patch detector and anomaly map works unchanged.
//!
//! Weights come from a Hugging Face folder (`config.json` and
//! `model.safetensors`) named on the command line or found in the local hub
//! cache; they are never downloaded. The SHA-256 of the weight file is
//! recorded in the model file and checked when the model is loaded.

use std::io::Read;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use flawscope_models::Preprocess;
use flawscope_models::clip::{CLIP_MEAN, CLIP_STD, ClipConfig, ClipModel};
use flawscope_models::clip_weights::{PRESETS, WEIGHTS_ENV, WeightsLookup, find_cached};
use flawscope_models::dinov2::{DINOV2_MEAN, DINOV2_STD, Dinov2Config, Dinov2Model, weights_path};
use image::Rgb32FImage;

use super::backbone::{BackboneKind, BackboneWeights};
use crate::Error;

/// Most patch tokens one image may give a transformer: attention holds
/// `heads × tokens²` scores, 255 MB for ViT-B at this bound (a 48 × 48 grid).
pub const MAX_VIT_TOKENS: usize = 48 * 48;

/// Most layers whose tokens are concatenated.
const MAX_LAYERS: usize = 8;

/// DINOv2 checkpoints looked for in the hub cache, in order.
const DINOV2_REPOS: [&str; 3] = [
    "facebook/dinov2-small",
    "facebook/dinov2-base",
    "facebook/dinov2-large",
];

// One network per extractor: boxing the larger variant would buy nothing.
#[allow(clippy::large_enum_variant)]
enum Model {
    Dinov2(Dinov2Model),
    Clip(ClipModel),
}

/// A loaded transformer and its input normalisation.
pub(super) struct VitNet {
    model: Model,
    patch: usize,
    mean: [f32; 3],
    std: [f32; 3],
}

impl VitNet {
    pub(super) fn device(&self) -> &Device {
        match &self.model {
            Model::Dinov2(m) => m.device(),
            Model::Clip(m) => m.device(),
        }
    }

    pub(super) fn hidden_size(&self) -> usize {
        match &self.model {
            Model::Dinov2(m) => m.hidden_size(),
            Model::Clip(m) => m.config().vision.hidden_size,
        }
    }

    /// The image resized to about `width × height`, each side rounded to a
    /// multiple of the patch, normalised as the checkpoint was trained:
    /// `[1, 3, H, W]`.
    pub(super) fn input_tensor(
        &self,
        image: &Rgb32FImage,
        width: u32,
        height: u32,
    ) -> Result<Tensor, Error> {
        let p = self.patch as u32;
        let snap = |v: u32| (((v + p / 2) / p) * p).max(p);
        let (w, h) = (snap(width), snap(height));
        let tokens = (w / p) as usize * (h / p) as usize;
        if tokens > MAX_VIT_TOKENS {
            return Err(Error::InvalidConfig(format!(
                "a {w}×{h} input gives {tokens} patch tokens; the transformer backbones take at \
                 most {MAX_VIT_TOKENS} (use a smaller --size)"
            )));
        }
        // Pixels in [0, 1] first, then each channel's mean and deviation.
        let unit = Preprocess {
            width: w,
            height: h,
            mean: 0.0,
            std: 255.0,
        };
        let mut data = unit.to_chw_rgb32f(image)?;
        let plane = (w * h) as usize;
        for (c, values) in data.chunks_mut(plane).enumerate() {
            let (m, s) = (self.mean[c], self.std[c]);
            values.iter_mut().for_each(|v| *v = (*v - m) / s);
        }
        Ok(Tensor::from_vec(
            data,
            (1, 3, h as usize, w as usize),
            self.device(),
        )?)
    }

    /// Tokens of `layers` (each `[N, D]`, class token dropped) and the grid.
    fn layer_tokens(
        &self,
        input: &Tensor,
        layers: &[usize],
    ) -> Result<(Vec<Tensor>, (usize, usize)), Error> {
        let (_, _, h, w) = input.dims4()?;
        let (states, grid) = match &self.model {
            Model::Dinov2(m) => m.hidden_states(input, layers)?,
            Model::Clip(m) => (m.vision_hidden_states(input, layers)?, m.grid(h, w)),
        };
        let tokens = states
            .iter()
            .map(|s| {
                let n = s.dim(1)?;
                s.squeeze(0)?.narrow(0, 1, n - 1)?.to_dtype(DType::F32)
            })
            .collect::<Result<Vec<_>, _>>()?;
        Ok((tokens, grid))
    }

    /// `[rows·cols, D·layers]` patch features, row-major over the grid.
    pub(super) fn patch_features(
        &self,
        input: &Tensor,
        layers: &[usize],
    ) -> Result<(Tensor, (usize, usize)), Error> {
        let (tokens, grid) = self.layer_tokens(input, layers)?;
        Ok((Tensor::cat(&tokens, 1)?.contiguous()?, grid))
    }

    /// Each layer's tokens as a `[1, D, rows, cols]` map.
    pub(super) fn layer_maps(
        &self,
        input: &Tensor,
        layers: &[usize],
    ) -> Result<Vec<Tensor>, Error> {
        let (tokens, (rows, cols)) = self.layer_tokens(input, layers)?;
        tokens
            .into_iter()
            .map(|t| {
                let d = t.dim(1)?;
                Ok(t.t()?.contiguous()?.reshape((1, d, rows, cols))?)
            })
            .collect()
    }
}

/// Loads the transformer `kind` from `weights` (after checking the file's
/// hash), to give the patch tokens of `layers`.
pub(super) fn load(
    kind: BackboneKind,
    weights: Option<&BackboneWeights>,
    layers: &[usize],
    device: &Device,
) -> Result<VitNet, Error> {
    let weights = weights.ok_or_else(|| {
        Error::BackboneWeights(format!(
            "backbone {} needs its weights (--backbone-weights DIR)",
            kind.name()
        ))
    })?;
    let found = sha256_file(&weights.path)?;
    if found != weights.sha256 {
        return Err(Error::BackboneWeights(format!(
            "{} has SHA-256 {found}, but the model was fitted with {} weights of SHA-256 {}: \
             these are other weights; use the file it was fitted with or fit again",
            weights.path.display(),
            kind.name(),
            weights.sha256
        )));
    }
    let dir = checkpoint_dir(&weights.path)?;
    let unusable = |e: flawscope_models::ModelError| {
        Error::BackboneWeights(format!(
            "{} is not usable as {} weights: {e}",
            dir.display(),
            kind.name()
        ))
    };
    let (model, patch, mean, std) = match kind {
        BackboneKind::Clip => {
            let m = ClipModel::load(&dir, device).map_err(unusable)?;
            let p = m.config().vision.patch_size;
            (Model::Clip(m), p, CLIP_MEAN, CLIP_STD)
        }
        _ => {
            let m = Dinov2Model::load(&dir, device).map_err(unusable)?;
            let p = m.config().patch_size;
            (Model::Dinov2(m), p, DINOV2_MEAN, DINOV2_STD)
        }
    };
    let net = VitNet {
        model,
        patch,
        mean,
        std,
    };
    check_layers(kind, depth_of(&net), layers)?;
    Ok(net)
}

fn depth_of(net: &VitNet) -> usize {
    match &net.model {
        Model::Dinov2(m) => m.depth(),
        Model::Clip(m) => m.config().vision.num_hidden_layers,
    }
}

fn check_layers(kind: BackboneKind, depth: usize, layers: &[usize]) -> Result<(), Error> {
    if layers.is_empty() || layers.len() > MAX_LAYERS {
        return Err(Error::InvalidConfig(format!(
            "choose 1 to {MAX_LAYERS} {} layers, got {}",
            kind.name(),
            layers.len()
        )));
    }
    if let Some(bad) = layers.iter().find(|&&l| l == 0 || l > depth) {
        return Err(Error::InvalidConfig(format!(
            "{} layer {bad} does not exist: these weights have layers 1..={depth}",
            kind.name()
        )));
    }
    Ok(())
}

/// The folder a weight file lies in, which must hold its `config.json`, and
/// the file must be the one the loader picks there.
fn checkpoint_dir(weights: &Path) -> Result<PathBuf, Error> {
    let dir = weights.parent().unwrap_or(Path::new(".")).to_path_buf();
    let picked = weights_path(&dir).map_err(|e| Error::BackboneWeights(e.to_string()))?;
    if picked.file_name() != weights.file_name() {
        return Err(Error::BackboneWeights(format!(
            "{} holds {}, which would be loaded instead of {}",
            dir.display(),
            picked.display(),
            weights.display()
        )));
    }
    if !dir.join("config.json").is_file() {
        return Err(Error::BackboneWeights(format!(
            "{}: missing config.json next to the weights",
            dir.display()
        )));
    }
    Ok(dir)
}

/// SHA-256 of a weight file, read in pieces (transformer checkpoints are
/// hundreds of MB).
fn sha256_file(path: &Path) -> Result<String, Error> {
    use sha2::{Digest, Sha256};
    let cannot =
        |e: std::io::Error| Error::BackboneWeights(format!("cannot read {}: {e}", path.display()));
    let meta = std::fs::metadata(path).map_err(cannot)?;
    if !meta.is_file() {
        return Err(Error::BackboneWeights(format!(
            "{} is not a regular file",
            path.display()
        )));
    }
    let mut file = std::fs::File::open(path).map_err(cannot)?;
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = file.read(&mut buf).map_err(cannot)?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
    }
    Ok(format!("{:x}", hasher.finalize()))
}

/// The weights of a transformer backbone: `given` (a checkpoint folder, its
/// weight file, or a hub id such as `facebook/dinov2-base` found in the
/// local hub cache), else the hub cache (`facebook/dinov2-small`, `-base`,
/// `-large`; for CLIP `FLAWSCOPE_CLIP_WEIGHTS`, then OpenAI's CLIP
/// checkpoints). Nothing is downloaded; when nothing is found the error
/// says how to get the weights ([`Error::is_setup_problem`]).
pub fn resolve_vit_weights(
    kind: BackboneKind,
    given: Option<&Path>,
) -> Result<BackboneWeights, Error> {
    let lookup = WeightsLookup::from_env(None);
    let dir = match given {
        Some(p) if p.is_dir() => p.to_path_buf(),
        Some(p) if p.is_file() => p.parent().unwrap_or(Path::new(".")).to_path_buf(),
        Some(p) => {
            let id = p.to_string_lossy();
            let looks_like_id =
                id.matches('/').count() == 1 && !id.starts_with(['/', '.']) && !id.ends_with('/');
            let cached = looks_like_id
                .then_some(lookup.hub_cache.as_deref())
                .flatten()
                .and_then(|cache| find_cached(cache, &id, None, &["config.json"], &WEIGHT_FILES));
            match cached {
                Some(dir) => dir,
                None => {
                    return Err(Error::BackboneWeights(format!(
                        "--backbone-weights {}: no such folder{}. {}",
                        p.display(),
                        if looks_like_id {
                            " (nor a complete snapshot of it in the hub cache)"
                        } else {
                            ""
                        },
                        advice(kind)
                    )));
                }
            }
        }
        None => default_dir(kind, &lookup)?,
    };
    let missing = |what: &str| {
        Error::BackboneWeights(format!(
            "{}: missing {what}. {}",
            dir.display(),
            advice(kind)
        ))
    };
    if !dir.join("config.json").is_file() {
        return Err(missing("config.json"));
    }
    let file = weights_path(&dir).map_err(|_| missing("model.safetensors"))?;
    let path = std::path::absolute(&file).unwrap_or(file);
    Ok(BackboneWeights {
        sha256: sha256_file(&path)?,
        path,
    })
}

const WEIGHT_FILES: [&str; 2] = ["model.safetensors", "pytorch_model.bin"];

fn default_dir(kind: BackboneKind, lookup: &WeightsLookup) -> Result<PathBuf, Error> {
    let mut searched = vec!["--backbone-weights (not given)".to_owned()];
    if kind == BackboneKind::Clip {
        if let Some(dir) = &lookup.env_dir {
            return Ok(dir.clone());
        }
        searched.push(format!("{WEIGHTS_ENV} (unset)"));
    }
    match &lookup.hub_cache {
        Some(cache) => {
            let found = if kind == BackboneKind::Clip {
                PRESETS.iter().find_map(|p| {
                    find_cached(
                        cache,
                        p.repo,
                        Some(p.revision),
                        &["config.json"],
                        &WEIGHT_FILES,
                    )
                })
            } else {
                DINOV2_REPOS
                    .iter()
                    .find_map(|r| find_cached(cache, r, None, &["config.json"], &WEIGHT_FILES))
            };
            if let Some(dir) = found {
                return Ok(dir);
            }
            searched.push(format!("the hub cache {}", cache.display()));
        }
        None => searched.push("the hub cache (HOME unset)".into()),
    }
    Err(Error::BackboneWeights(format!(
        "no {} weights found (searched: {}; nothing is downloaded). {}",
        kind.name(),
        searched.join(", "),
        advice(kind)
    )))
}

fn advice(kind: BackboneKind) -> String {
    let repo = if kind == BackboneKind::Clip {
        "openai/clip-vit-base-patch16"
    } else {
        "facebook/dinov2-small"
    };
    format!(
        "Pass --backbone-weights DIR, a Hugging Face folder holding config.json and \
         model.safetensors: on a machine that reaches the hub run `huggingface-cli download \
         {repo}` and copy its snapshot folder (or the whole hub cache) here"
    )
}

/// The layers whose tokens a transformer backbone gives: `asked`, checked
/// against the depth in the checkpoint's `config.json`, or by default a
/// middle and the last layer (`depth / 2` and `depth`).
pub fn default_vit_layers(
    kind: BackboneKind,
    weights: &BackboneWeights,
    asked: Option<&[usize]>,
) -> Result<Vec<usize>, Error> {
    let dir = checkpoint_dir(&weights.path)?;
    let config = dir.join("config.json");
    let unusable = |e: flawscope_models::ModelError| {
        Error::BackboneWeights(format!(
            "{} is not a {} checkpoint: {e}",
            dir.display(),
            kind.name()
        ))
    };
    let depth = match kind {
        BackboneKind::Clip => {
            ClipConfig::from_file(&config)
                .map_err(unusable)?
                .vision
                .num_hidden_layers
        }
        _ => {
            Dinov2Config::from_file(&config)
                .map_err(unusable)?
                .num_hidden_layers
        }
    };
    let layers = match asked {
        Some(layers) => layers.to_vec(),
        None => {
            let mut layers = vec![(depth / 2).max(1), depth];
            layers.dedup();
            layers
        }
    };
    check_layers(kind, depth, &layers)?;
    Ok(layers)
}
