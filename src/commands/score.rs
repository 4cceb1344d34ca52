//! `flawscope score`: score images or folders with a fitted model.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};

use anyhow::Context;
use flawscope_core::any_model::AnyModel;
use flawscope_core::dataset::scan_image_folder;
use flawscope_core::heatmap::save_overlay;
use flawscope_core::images::{ImageLimits, decode_image, load_image};
use flawscope_core::inspector::Inspection;
use flawscope_core::progress::Progress;
use flawscope_results::scoring::{BatchItem, BatchOptions, ScoreError, Scored, Scorer, run_batch};
use flawscope_results::store::{Store, StoredResult, Verdict, file_hash};
use serde::Serialize;

use super::Outcome;
use super::options::DeviceChoice;
use super::winclip::{ClipArgs, load_model, zero_shot_model};
use crate::progress::Bars;

#[derive(clap::Args)]
pub struct Args {
    /// Model file written by `flawscope fit` (any detector, WinCLIP included).
    #[arg(
        long,
        required_unless_present = "zero_shot",
        conflicts_with = "zero_shot"
    )]
    pub model: Option<PathBuf>,
    /// No model file: WinCLIP zero-shot scoring of --object with CLIP and
    /// text prompts (needs CLIP weights: --clip-weights DIR or
    /// FLAWSCOPE_CLIP_WEIGHTS).
    #[arg(long)]
    pub zero_shot: bool,
    #[command(flatten)]
    pub clip: ClipArgs,
    /// Where the networks run.
    #[arg(long, value_enum, default_value = "auto")]
    pub device: DeviceChoice,
    /// Images or folders of images.
    #[arg(required = true)]
    pub paths: Vec<PathBuf>,
    /// Write an overlay PNG per image into this folder.
    #[arg(long)]
    pub heatmaps: Option<PathBuf>,
    /// One JSON object per line instead of a table.
    #[arg(long)]
    pub json: bool,
    /// Record results in this SQLite database as each image is scored; a
    /// rerun skips images already there with the same path, content and
    /// model.
    #[arg(long)]
    pub db: Option<PathBuf>,
}

/// One line of `score --json` output.
#[derive(Serialize)]
pub struct ScoreLine<'a> {
    pub path: &'a Path,
    pub score: f32,
    pub is_anomalous: bool,
    pub threshold: f32,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub heatmap: Option<&'a Path>,
}

/// Expands folders into their images; plain files are kept as given.
pub fn expand_paths(paths: &[PathBuf]) -> anyhow::Result<Vec<PathBuf>> {
    let mut files = Vec::new();
    for path in paths {
        if path.is_dir() {
            files.extend(scan_image_folder(path)?);
        } else {
            files.push(path.clone());
        }
    }
    Ok(files)
}

pub fn run(args: &Args) -> anyhow::Result<Outcome> {
    let device = args.device.device()?;
    let inspector = match &args.model {
        Some(path) => load_model(path, &args.clip, &device)?,
        None => zero_shot_model(&args.clip, &device)?,
    };
    let files = expand_paths(&args.paths)?;
    if let Some(dir) = &args.heatmaps {
        std::fs::create_dir_all(dir)
            .with_context(|| format!("creating heatmap folder {}", dir.display()))?;
    }
    if let Some(db) = &args.db {
        return run_with_store(args, inspector, &files, db);
    }
    let limits = ImageLimits::default();
    let bars = Bars::new(files.len() < 2);
    bars.start("scoring", files.len() as u64);
    let mut failures = 0usize;
    for path in &files {
        match score_one(&inspector, path, args.heatmaps.as_deref(), &limits) {
            Ok((inspection, heatmap)) => {
                match print_line(args.json, path, &inspection, heatmap.as_deref()) {
                    Ok(()) => {}
                    // The reader went away (`| head`): stop quietly.
                    Err(err) if err.kind() == std::io::ErrorKind::BrokenPipe => break,
                    Err(err) => return Err(err).context("writing the results"),
                }
            }
            Err(err) => {
                failures += 1;
                eprintln!("error: {err:#}");
            }
        }
        bars.advance(1);
    }
    bars.finish();
    if failures > 0 {
        eprintln!(
            "{failures} of {} images could not be scored (see the errors above)",
            files.len()
        );
        return Ok(Outcome::PartialFailure);
    }
    Ok(Outcome::Success)
}

fn score_one(
    inspector: &AnyModel,
    path: &Path,
    heatmaps: Option<&Path>,
    limits: &ImageLimits,
) -> anyhow::Result<(Inspection, Option<PathBuf>)> {
    let image = load_image(path, limits)?;
    let inspection = inspector
        .inspect(&image)
        .with_context(|| format!("scoring {}", path.display()))?;
    let heatmap = match heatmaps {
        Some(dir) => {
            let out = heatmap_path(dir, path);
            save_overlay(&out, &image, &inspection.map)
                .with_context(|| format!("writing heatmap {}", out.display()))?;
            Some(out)
        }
        None => None,
    };
    Ok((inspection, heatmap))
}

fn print_line(
    json: bool,
    path: &Path,
    inspection: &Inspection,
    heatmap: Option<&Path>,
) -> std::io::Result<()> {
    let mut out = std::io::stdout().lock();
    if json {
        let line = ScoreLine {
            path,
            score: inspection.score,
            is_anomalous: inspection.is_anomalous,
            threshold: inspection.threshold,
            heatmap,
        };
        writeln!(out, "{}", serde_json::to_string(&line)?)?;
    } else {
        writeln!(
            out,
            "{:.3}  {:<9}  {}",
            inspection.score,
            if inspection.is_anomalous {
                "ANOMALOUS"
            } else {
                "ok"
            },
            path.display()
        )?;
    }
    out.flush()
}

/// Where the heatmap of `path` goes in `dir`.
fn heatmap_path(dir: &Path, path: &Path) -> PathBuf {
    let stem = path
        .file_stem()
        .map_or_else(|| "image".into(), |s| s.to_string_lossy());
    dir.join(format!("{stem}_heatmap.png"))
}

/// Scores into the results store, skipping unchanged images (`--db`).
fn run_with_store(
    args: &Args,
    inspector: AnyModel,
    files: &[PathBuf],
    db: &Path,
) -> anyhow::Result<Outcome> {
    let store = Store::open(db)?;
    let (name, identity) = match (&args.model, &inspector) {
        (Some(path), _) => (path.display().to_string(), file_hash(path)?),
        (None, AnyModel::WinClip(m)) => (format!("zero-shot {}", m.info().object), m.identity()),
        (None, AnyModel::Classical(_)) => anyhow::bail!("no model file to record"),
    };
    let model = store.model(&name, &identity)?;
    let scorer = StoreScorer {
        inspector,
        heatmaps: args.heatmaps.clone(),
        limits: ImageLimits::default(),
    };
    // An unchanged image is scored again only when its heatmap is missing.
    let heatmaps = args.heatmaps.clone();
    let rescore = move |path: &Path| {
        heatmaps
            .as_deref()
            .is_some_and(|dir| !heatmap_path(dir, path).is_file())
    };
    let cancel = AtomicBool::new(false);
    let options = BatchOptions {
        cancel: &cancel,
        rescore: &rescore,
    };
    let bars = Bars::new(files.len() < 2);
    bars.start("scoring", files.len() as u64);
    let mut print_error = None;
    let summary = run_batch(files, &scorer, &store, &model, &options, |item| {
        let printed = match &item {
            BatchItem::Scored(row, _) | BatchItem::Unchanged(row) => {
                let heatmap = args.heatmaps.as_deref().map(|d| heatmap_path(d, &row.path));
                print_stored(args.json, row, heatmap.as_deref())
            }
            BatchItem::Failed { error, .. } => {
                eprintln!("error: {error}");
                Ok(())
            }
        };
        if let Err(err) = printed {
            // Standard output is gone (a closed pipe): stop after this image.
            cancel.store(true, Ordering::Relaxed);
            print_error.get_or_insert(err);
        }
        bars.advance(1);
    })?;
    bars.finish();
    if let Some(err) = print_error {
        return Err(err);
    }
    eprintln!(
        "{} scored, {} unchanged (not rescored), {} failed; results in {}",
        summary.scored,
        summary.unchanged,
        summary.failed,
        db.display()
    );
    if summary.failed > 0 {
        return Ok(Outcome::PartialFailure);
    }
    Ok(Outcome::Success)
}

/// Decodes, inspects and (with `--heatmaps`) writes the overlay.
struct StoreScorer {
    inspector: AnyModel,
    heatmaps: Option<PathBuf>,
    limits: ImageLimits,
}

impl Scorer for StoreScorer {
    fn score(&self, path: &Path, bytes: &[u8]) -> Result<Scored, ScoreError> {
        let image = decode_image(bytes, &path.display().to_string(), &self.limits)?;
        let inspection = self.inspector.inspect(&image)?;
        if let Some(dir) = &self.heatmaps {
            save_overlay(&heatmap_path(dir, path), &image, &inspection.map)?;
        }
        Ok(Scored {
            score: inspection.score,
            raw_score: inspection.raw_score,
            threshold: inspection.threshold,
            preview: None,
        })
    }
}

fn print_stored(json: bool, row: &StoredResult, heatmap: Option<&Path>) -> anyhow::Result<()> {
    let is_anomalous = row.verdict == Verdict::Anomalous;
    let mut stdout = std::io::stdout().lock();
    if json {
        let line = ScoreLine {
            path: &row.path,
            score: row.score,
            is_anomalous,
            threshold: row.threshold,
            heatmap,
        };
        writeln!(stdout, "{}", serde_json::to_string(&line)?)?;
    } else {
        writeln!(
            stdout,
            "{:.3}  {:<9}  {}",
            row.score,
            if is_anomalous { "ANOMALOUS" } else { "ok" },
            row.path.display()
        )?;
    }
    Ok(())
}
