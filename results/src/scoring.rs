//! Resumable batch scoring into the results store.
//!
//! [`run_batch`] walks a list of image files; for each it reads the bytes,
//! hashes them and skips the file when the store already holds a score for
//! the same path, content and model. Otherwise it scores the image and
//! commits the row before moving on, so a run that is stopped (or killed)
//! resumes where it left off. The `flawscope score --db` command and the
//! TUI's background worker both use it.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use flawscope_core::anomaly_map::AnomalyMap;
use flawscope_core::heatmap::blend;
use flawscope_core::images::{ImageLimits, decode_image};
use flawscope_core::model::{Inspection, Model};
use flawscope_core::operating_point::OperatingPoint;
use flawscope_core::prompt_layer::DefectCheck;
use image::Rgb32FImage;

use crate::error::StoreError;
use crate::hash::content_hash;
use crate::rows::{ModelRef, NewScore, StoredResult};
use crate::store::Store;

/// Longest side, in pixels, of the heatmap previews kept for the TUI.
pub const PREVIEW_SIDE: u32 = 128;

/// Why one image could not be scored; the batch goes on with the next.
#[derive(Debug, thiserror::Error)]
pub enum ScoreError {
    #[error(transparent)]
    Core(#[from] flawscope_core::Error),
    #[error(transparent)]
    Image(#[from] flawscope_core::images::ImageError),
    #[error("{0}")]
    Other(String),
}

/// A small heatmap overlay of an image, RGB, row-major.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Preview {
    pub width: u32,
    pub height: u32,
    pub pixels: Vec<[u8; 3]>,
}

impl Preview {
    /// The anomaly map over the image, coloured and outlined against
    /// `threshold`, shrunk so its longest side is at most `max_side` (no
    /// legend: the list row beside it gives the score and verdict).
    pub fn from_map(image: &Rgb32FImage, map: &AnomalyMap, threshold: f32, max_side: u32) -> Self {
        let (w, h) = image.dimensions();
        let side = max_side.max(1);
        let scale = (f64::from(side) / f64::from(w.max(h).max(1))).min(1.0);
        let tw = ((f64::from(w) * scale).round() as u32).max(1);
        let th = ((f64::from(h) * scale).round() as u32).max(1);
        let small = image::imageops::thumbnail(image, tw, th);
        let blended = blend(&small, map, threshold);
        Self {
            width: blended.width(),
            height: blended.height(),
            pixels: blended.pixels().map(|p| p.0).collect(),
        }
    }

    /// The pixel at `(x, y)`, clamped to the edges.
    pub fn get(&self, x: u32, y: u32) -> [u8; 3] {
        let x = x.min(self.width.saturating_sub(1));
        let y = y.min(self.height.saturating_sub(1));
        self.pixels
            .get((y as usize) * (self.width as usize) + x as usize)
            .copied()
            .unwrap_or([0, 0, 0])
    }
}

/// The outcome of scoring one image.
#[derive(Debug, Clone)]
pub struct Scored {
    /// 0–1.
    pub score: f32,
    pub raw_score: f32,
    /// 0–1 threshold of the verdict.
    pub threshold: f32,
    pub preview: Option<Preview>,
    /// Typed defects checked beside the model, when any were asked.
    pub defects: Vec<DefectCheck>,
    /// Core's whole answer (`Inspection` as JSON), kept with the row.
    pub inspection: Option<String>,
}

impl Scored {
    /// Files this score of the image at `path` (content `hash`) under
    /// `model` (batch scoring and `flawscope watch`).
    pub fn record(
        &self,
        store: &Store,
        model: &ModelRef,
        path: &Path,
        hash: &str,
    ) -> Result<StoredResult, StoreError> {
        store.record_score(
            model,
            &NewScore {
                path,
                content_hash: hash,
                score: self.score,
                raw_score: self.raw_score,
                threshold: self.threshold,
                defects: &self.defects,
                inspection: self.inspection.as_deref(),
            },
        )
    }
}

/// Scores an image from its file bytes.
pub trait Scorer: Sync {
    fn score(&self, path: &Path, bytes: &[u8]) -> Result<Scored, ScoreError>;
}

/// A model file of any kind (classical or WinCLIP) as a [`Scorer`],
/// optionally making previews and checking typed defects with the model's
/// text layer.
#[derive(Clone)]
pub struct InspectorScorer {
    pub inspector: Arc<Model>,
    pub limits: ImageLimits,
    /// Longest preview side; `None` makes no preview.
    pub preview_side: Option<u32>,
    /// Typed defects to check on every image (see [`InspectorScorer::with_prompts`]).
    prompts: Vec<String>,
    /// The operating point verdicts are made at (the model's own when
    /// `None`; see [`InspectorScorer::with_operating_point`]).
    operating_point: Option<OperatingPoint>,
}

impl InspectorScorer {
    pub fn new(inspector: Arc<Model>, limits: ImageLimits, preview_side: Option<u32>) -> Self {
        Self {
            inspector,
            limits,
            preview_side,
            prompts: Vec::new(),
            operating_point: None,
        }
    }

    /// Judges every image at `point` instead of the model's own threshold.
    pub fn with_operating_point(mut self, point: OperatingPoint) -> Self {
        self.operating_point = Some(point);
        self
    }

    /// Checks `prompts` on every image with the model's text layer. Refused
    /// up front when the model cannot check them (no text layer, or its
    /// CLIP weights missing), so no stored row claims a check that did not
    /// happen.
    pub fn with_prompts(mut self, prompts: Vec<String>) -> Result<Self, ScoreError> {
        if !prompts.is_empty() {
            text_layer_ready(&self.inspector)?;
            self.inspector.prepare_defects(&prompts)?;
        }
        self.prompts = prompts;
        Ok(self)
    }

    /// Decodes and inspects an image, with the typed defects asked.
    pub fn inspect(
        &self,
        path: &Path,
        bytes: &[u8],
    ) -> Result<(Rgb32FImage, Inspection), ScoreError> {
        let image = decode_image(bytes, &path.display().to_string(), &self.limits)?;
        let point = match &self.operating_point {
            Some(point) => point.clone(),
            None => self.inspector.operating_point(None)?,
        };
        let inspection = self.inspector.inspect_with(&image, &point, &self.prompts)?;
        Ok((image, inspection))
    }

    /// What is stored of an inspected image: the score, the preview if
    /// asked for, and the typed defects checked on it (never a row that
    /// claims a check that did not happen).
    pub fn scored(
        &self,
        image: &Rgb32FImage,
        inspection: &Inspection,
    ) -> Result<Scored, ScoreError> {
        if let Some(reason) = &inspection.defects_unchecked {
            return Err(ScoreError::Other(reason.clone()));
        }
        let preview = self
            .preview_side
            .map(|side| Preview::from_map(image, &inspection.map, inspection.threshold, side));
        Ok(Scored {
            score: inspection.score,
            raw_score: inspection.raw_score,
            threshold: inspection.threshold,
            preview,
            defects: inspection.defects.clone(),
            inspection: serde_json::to_string(inspection).ok(),
        })
    }
}

impl Scorer for InspectorScorer {
    fn score(&self, path: &Path, bytes: &[u8]) -> Result<Scored, ScoreError> {
        let (image, inspection) = self.inspect(path, bytes)?;
        self.scored(&image, &inspection)
    }
}

/// Whether `model` can check typed defects here; when not, why (no text
/// layer, or its CLIP weights missing). A batch asks before it starts, so
/// no stored row claims a check that did not happen.
fn text_layer_ready(model: &Model) -> Result<(), ScoreError> {
    match model.summary().text_layer {
        None => Err(ScoreError::Other(
            "this model has no text layer to check typed defects with (fit it with --object \
             and CLIP weights to add one)"
                .into(),
        )),
        Some(layer) if !layer.available => Err(ScoreError::Other(format!(
            "the model's text layer cannot check typed defects here: {}",
            layer.reason.unwrap_or_default()
        ))),
        Some(_) => Ok(()),
    }
}

/// What happened to one file of a batch.
#[derive(Debug, Clone)]
pub enum BatchItem {
    /// Already in the store with the same content: not scored again.
    Unchanged(StoredResult),
    /// Scored now and committed.
    Scored(StoredResult, Option<Preview>),
    /// Could not be read or scored.
    Failed { path: PathBuf, error: String },
}

/// Counts of a finished (or stopped) batch.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct BatchSummary {
    pub scored: usize,
    pub unchanged: usize,
    pub failed: usize,
    /// Stopped by the cancel flag before the end.
    pub cancelled: bool,
}

/// How a batch treats files already in the store.
pub struct BatchOptions<'a> {
    /// Set to stop after the current image.
    pub cancel: &'a AtomicBool,
    /// Rescore even an unchanged file when this says so (for example when
    /// its heatmap file is missing).
    pub rescore: &'a (dyn Fn(&Path) -> bool + Sync),
}

/// The path under which a file is stored: absolute, symlinks kept.
pub fn store_path(path: &Path) -> PathBuf {
    std::path::absolute(path).unwrap_or_else(|_| path.to_path_buf())
}

/// Scores `files` into `store` for `model`, skipping unchanged ones.
/// `on_item` hears about every file, in order. Only a store failure stops
/// the batch early (with the error); unreadable images are reported as
/// [`BatchItem::Failed`] and the batch goes on.
pub fn run_batch(
    files: &[PathBuf],
    scorer: &dyn Scorer,
    store: &Store,
    model: &ModelRef,
    options: &BatchOptions<'_>,
    mut on_item: impl FnMut(BatchItem),
) -> Result<BatchSummary, StoreError> {
    let mut summary = BatchSummary::default();
    for file in files {
        if options.cancel.load(Ordering::Relaxed) {
            summary.cancelled = true;
            break;
        }
        let path = store_path(file);
        let bytes = match std::fs::read(&path) {
            Ok(bytes) => bytes,
            Err(err) => {
                summary.failed += 1;
                on_item(BatchItem::Failed {
                    error: format!("cannot read {}: {err}", path.display()),
                    path,
                });
                continue;
            }
        };
        let hash = content_hash(&bytes);
        if let Some(stored) = store.lookup(model, &path)?
            && stored.content_hash == hash
            && !(options.rescore)(&path)
        {
            summary.unchanged += 1;
            on_item(BatchItem::Unchanged(stored));
            continue;
        }
        match scorer.score(&path, &bytes) {
            Ok(scored) => {
                let row = scored.record(store, model, &path, &hash)?;
                summary.scored += 1;
                on_item(BatchItem::Scored(row, scored.preview));
            }
            Err(err) => {
                summary.failed += 1;
                on_item(BatchItem::Failed {
                    error: err.to_string(),
                    path,
                });
            }
        }
    }
    Ok(summary)
}

/// Never rescore unchanged files.
pub fn never(_: &Path) -> bool {
    false
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;
    use flawscope_core::Device;
    use flawscope_core::runtime::Runtime;
    use flawscope_core::winclip::WinClip;
    use flawscope_models::clip_weights::{VIT_B_16, WeightsLookup};

    fn root() -> PathBuf {
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..")
    }

    #[test]
    fn batch_scores_with_tiny_clip_zero_shot() {
        let engine = WinClip::from_dir(
            &root().join("models/tests/fixtures/tiny_clip"),
            "tiny",
            None,
            "flag",
            &Device::Cpu,
        )
        .unwrap();
        let lookup = WeightsLookup::from_vars(None, |_| None);
        let runtime =
            Runtime::with_clip(Device::Cpu, lookup, VIT_B_16).with_engine(Arc::new(engine));
        let model = Model::zero_shot(&runtime, "solar cell", &["a crack".into()]).unwrap();
        let scorer =
            InspectorScorer::new(Arc::new(model), ImageLimits::default(), Some(PREVIEW_SIDE));
        let mut files: Vec<PathBuf> = std::fs::read_dir(root().join("demo/solar_cell/test/defect"))
            .unwrap()
            .map(|e| e.unwrap().path())
            .filter(|p| p.extension().is_some_and(|e| e == "png"))
            .collect();
        files.sort();
        files.truncate(2);
        let tmp = tempfile::tempdir().unwrap();
        let store = Store::open(&tmp.path().join("r.sqlite")).unwrap();
        let model_ref = store.model("zero-shot", "winclip:test").unwrap();
        let cancel = AtomicBool::new(false);
        let options = BatchOptions {
            cancel: &cancel,
            rescore: &never,
        };
        let mut items = Vec::new();
        let summary = run_batch(&files, &scorer, &store, &model_ref, &options, |item| {
            items.push(item)
        })
        .unwrap();
        assert_eq!(summary.scored, 2, "{items:?}");
        for item in items {
            let BatchItem::Scored(row, preview) = item else {
                panic!("{item:?}");
            };
            assert!((0.0..=1.0).contains(&row.score));
            assert!(preview.is_some());
        }
    }
}
