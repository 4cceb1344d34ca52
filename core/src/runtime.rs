//! Where models run and where their networks come from: the compute device
//! and the CLIP weights, shared by every model a process loads.
//!
//! One CLIP engine is loaded at most once per checkpoint and shared (behind
//! an [`Arc`]) by all WinCLIP layers, so a server with many models, or a
//! zero-shot request per HTTP call, costs one copy of the weights.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, PoisonError};

use candle_core::Device;
// Re-exported so faces find CLIP weights and presets through core, never
// importing the backbone crate themselves.
pub use flawscope_models::clip_weights::{ClipPreset, PRESETS, VIT_B_16, WeightsLookup};
use flawscope_prompts::TextEmbeddingCache;

use crate::Error;
use crate::winclip::{ClipCheckpoint, WinClip};

/// Whether this build can run on a CUDA GPU here.
pub fn cuda_is_available() -> bool {
    candle_core::utils::cuda_is_available()
}

/// The device plus the CLIP weights lookup, with the engines loaded so far.
pub struct Runtime {
    device: Device,
    lookup: WeightsLookup,
    preset: ClipPreset,
    /// Folder of the on-disk text-embedding cache, if any.
    text_cache: Option<PathBuf>,
    /// The engine of `preset` (or the one given), once loaded.
    default: Mutex<Option<Arc<WinClip>>>,
    /// Every engine loaded for model files.
    engines: Mutex<Vec<Arc<WinClip>>>,
}

impl std::fmt::Debug for Runtime {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Runtime")
            .field("device", &self.device)
            .field("preset", &self.preset.name)
            .finish_non_exhaustive()
    }
}

impl Runtime {
    /// `device`, with CLIP weights looked up as [`WeightsLookup::from_env`]
    /// says for the ViT-B/16 preset.
    pub fn new(device: Device) -> Self {
        Self::with_clip(device, WeightsLookup::from_env(None), VIT_B_16)
    }

    /// `device`, with CLIP weights found through `lookup` for `preset`.
    pub fn with_clip(device: Device, lookup: WeightsLookup, preset: ClipPreset) -> Self {
        Self {
            device,
            lookup,
            preset,
            text_cache: None,
            default: Mutex::new(None),
            engines: Mutex::new(Vec::new()),
        }
    }

    /// Keeps the CLIP text side (class vectors) of the engines loaded from
    /// now on in the folder `dir`, shared with other processes (see
    /// [`TextEmbeddingCache::in_dir`]).
    pub fn with_text_cache_dir(mut self, dir: Option<PathBuf>) -> Self {
        self.text_cache = dir;
        self
    }

    /// The text cache folder in use, if any.
    pub fn text_cache_dir(&self) -> Option<&Path> {
        self.text_cache.as_deref()
    }

    fn prepared(&self, engine: WinClip) -> Result<Arc<WinClip>, Error> {
        Ok(Arc::new(match &self.text_cache {
            Some(dir) => engine.with_text_cache(TextEmbeddingCache::in_dir(dir)?),
            None => engine,
        }))
    }

    /// Uses an engine already loaded (tests, benchmarks): later lookups of
    /// its checkpoint return it.
    pub fn with_engine(self, engine: Arc<WinClip>) -> Self {
        self.engines
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .push(Arc::clone(&engine));
        *self.default.lock().unwrap_or_else(PoisonError::into_inner) = Some(engine);
        self
    }

    pub fn device(&self) -> &Device {
        &self.device
    }

    pub fn lookup(&self) -> &WeightsLookup {
        &self.lookup
    }

    /// The CLIP engine of the configured preset (loaded on first use).
    pub fn clip(&self) -> Result<Arc<WinClip>, Error> {
        let mut default = self.default.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(engine) = default.as_ref() {
            return Ok(Arc::clone(engine));
        }
        let engine = self.prepared(WinClip::resolve(&self.lookup, &self.preset, &self.device)?)?;
        *default = Some(Arc::clone(&engine));
        self.engines
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .push(Arc::clone(&engine));
        Ok(engine)
    }

    /// The CLIP engine a model file made with `stored` needs (see
    /// [`WinClip::for_checkpoint`] for the lookup order).
    pub fn clip_for(
        &self,
        stored: &ClipCheckpoint,
        model_path: &Path,
    ) -> Result<Arc<WinClip>, Error> {
        let mut engines = self.engines.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(engine) = engines
            .iter()
            .find(|e| e.checkpoint().config_sha256 == stored.config_sha256)
        {
            return Ok(Arc::clone(engine));
        }
        let engine = self.prepared(WinClip::for_checkpoint(
            stored,
            &self.lookup,
            &self.device,
            model_path,
        )?)?;
        engines.push(Arc::clone(&engine));
        Ok(engine)
    }
}

/// Where the CLIP text side is cached by default: `FLAWSCOPE_CACHE_DIR`,
/// else the user's cache folder (`$XDG_CACHE_HOME` or `~/.cache` on Linux),
/// under `flawscope/text-embeddings`. `None` when neither is known.
pub fn default_text_cache_dir() -> Option<PathBuf> {
    let base = std::env::var_os("FLAWSCOPE_CACHE_DIR")
        .filter(|v| !v.is_empty())
        .map(PathBuf::from)
        .or_else(|| dirs::cache_dir().map(|d| d.join("flawscope")))?;
    Some(base.join("text-embeddings"))
}
