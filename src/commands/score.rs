//! `flawscope score`: score images or folders with a fitted model.

use std::collections::HashMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use anyhow::Context;
use flawscope_core::dataset::{DatasetError, scan_image_folder, scan_image_tree};
use flawscope_core::heatmap::{Legend, save_overlay};
use flawscope_core::images::{ImageLimits, load_image};
use flawscope_core::model::{Inspection, Model};
use flawscope_core::musc::{self, MuscConfig};
use flawscope_core::operating_point::{OperatingPoint, Target};
use flawscope_core::progress::Progress;
use flawscope_core::prompt_layer::DefectCheck;
use flawscope_core::runtime::Runtime;
use flawscope_results::scoring::{
    BatchItem, BatchOptions, InspectorScorer, ScoreError, Scored, Scorer, run_batch, store_path,
};
use flawscope_results::shard::Shard;
use flawscope_results::store::{Store, StoredResult, Verdict, file_hash, layered_model};
use image::Rgb32FImage;
use serde::Serialize;

use super::clip::{ClipArgs, load_model, setup_error, zero_shot_model};
use super::options::{DeviceChoice, parse_rate};
use super::{Outcome, UsageError};
use crate::progress::Bars;

/// Detectors that score a batch against itself, with no model file.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum BatchDetector {
    /// Mutual scoring (MuSc): each image's patches against the others'.
    Musc,
}

#[derive(clap::Args)]
pub struct Args {
    /// Model file written by `flawscope fit` (any detector, WinCLIP included).
    #[arg(
        long,
        required_unless_present_any = ["zero_shot", "detector"],
        conflicts_with_all = ["zero_shot", "detector"]
    )]
    pub model: Option<PathBuf>,
    /// No model file and no normal images: `musc` scores the given images
    /// as one batch, each against the others (mutual scoring; at least 8
    /// images, batches over 200 are split). Uncalibrated: it ranks the
    /// batch and flags its outliers.
    #[arg(long, value_enum, conflicts_with_all = ["zero_shot", "db", "shard", "max_far", "max_mar"])]
    pub detector: Option<BatchDetector>,
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
    /// Also read the subfolders of folders (hidden ones skipped). Without
    /// it, only the images directly inside a folder are scored.
    #[arg(long, short = 'r')]
    pub recursive: bool,
    /// Write an overlay PNG per image into this folder, under the image's
    /// path relative to the folder it was found in (`crack/000.png` →
    /// `crack/000_heatmap.png`), so no two inputs share a map.
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
    /// Score only shard I of N (0-based, e.g. a Kubernetes Indexed Job's
    /// JOB_COMPLETION_INDEX): the images whose path, relative to the folder
    /// it was found in, hashes to I modulo N. N workers given the same
    /// paths cover every image exactly once; `flawscope results merge`
    /// combines their --db files.
    #[arg(long, value_name = "I/N")]
    pub shard: Option<Shard>,
    /// With --model: a typed defect ("a crack") for the model's text layer
    /// to check on every image with its own calibrated threshold
    /// (repeatable; the model must be fitted with --object and CLIP
    /// weights). `--prompt` with --model means the same, as before.
    #[arg(long = "defect", value_name = "TEXT", requires = "model")]
    pub defects: Vec<String>,
    /// Judge at another false-alarm limit than the model was fitted for:
    /// the threshold that flags at most this fraction of the model's
    /// normal images (its kept out-of-sample scores; no refit).
    #[arg(long, value_parser = parse_rate, conflicts_with = "max_mar")]
    pub max_far: Option<f64>,
    /// Or: the threshold that misses at most this fraction of the model's
    /// synthetic defects.
    #[arg(long, value_parser = parse_rate)]
    pub max_mar: Option<f64>,
}

/// One line of `score --json` output: the image's path and heatmap beside
/// core's answer (fresh), or the row a results store keeps (`--db`).
#[derive(Serialize)]
pub struct ScoreLine<'a> {
    pub path: &'a Path,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub heatmap: Option<&'a Path>,
    #[serde(flatten)]
    pub answer: Answer<'a>,
}

/// What a line says of its image: core's answer, fresh or as the store
/// kept it; rows written before the store kept answers say what they hold.
#[derive(Serialize)]
#[serde(untagged)]
pub enum Answer<'a> {
    Fresh(&'a Inspection),
    Kept {
        #[serde(flatten)]
        answer: serde_json::Value,
        #[serde(skip)]
        row: Stored<'a>,
    },
    Stored(Stored<'a>),
}

/// A results store's row with the operating point it was scored at; its
/// typed defects are the same objects a fresh answer has.
#[derive(Serialize)]
pub struct Stored<'a> {
    pub score: f32,
    pub is_anomalous: bool,
    pub threshold: f32,
    pub model_is_anomalous: bool,
    pub flagged_by: Vec<String>,
    #[serde(skip_serializing_if = "<[_]>::is_empty")]
    pub defects: &'a [DefectCheck],
    pub operating_point: &'a OperatingPoint,
}

/// The parts of a line the table shows.
struct Shown<'a> {
    score: f32,
    is_anomalous: bool,
    defects: &'a [DefectCheck],
    unchecked: Option<&'a str>,
}

impl ScoreLine<'_> {
    fn shown(&self) -> Shown<'_> {
        match &self.answer {
            Answer::Fresh(i) => Shown {
                score: i.score,
                is_anomalous: i.is_anomalous,
                defects: &i.defects,
                unchecked: i.defects_unchecked.as_deref(),
            },
            Answer::Stored(s) | Answer::Kept { row: s, .. } => Shown {
                score: s.score,
                is_anomalous: s.is_anomalous,
                defects: s.defects,
                unchecked: None,
            },
        }
    }
}

/// An image to score and where its heatmap goes, relative to `--heatmaps`.
#[derive(Debug, Clone, PartialEq)]
pub struct Input {
    pub path: PathBuf,
    pub heatmap: PathBuf,
    /// The path relative to the folder it was found in (the shard key).
    pub key: PathBuf,
}

/// The images behind `paths` with distinct heatmap names: an image found in
/// a folder keeps its path inside that folder; a file named directly keeps
/// the path it was given (without its root or `..` parts).
pub fn inputs(paths: &[PathBuf], recursive: bool) -> anyhow::Result<Vec<Input>> {
    let mut found = Vec::new();
    for arg in paths {
        if arg.is_dir() {
            let images = if recursive {
                scan_image_tree(arg)?
            } else {
                scan_image_folder(arg).map_err(|err| suggest_recursive(arg, err))?
            };
            for path in images {
                let relative = path.strip_prefix(arg).unwrap_or(&path).to_path_buf();
                found.push((path, relative));
            }
        } else {
            found.push((arg.clone(), plain_relative(arg)));
        }
    }
    let mut seen_paths = std::collections::HashSet::new();
    let mut taken = std::collections::HashSet::new();
    let mut inputs = Vec::with_capacity(found.len());
    for (path, relative) in found {
        if !seen_paths.insert(path.clone()) {
            continue;
        }
        let mut heatmap = heatmap_name(&relative, 1);
        let mut n = 2;
        while !taken.insert(heatmap.clone()) {
            heatmap = heatmap_name(&relative, n);
            n += 1;
        }
        inputs.push(Input {
            path,
            heatmap,
            key: relative,
        });
    }
    Ok(inputs)
}

/// A folder with no images of its own but some in its subfolders (an
/// MVTec category, a folder per day) is a usage slip: say `--recursive`.
fn suggest_recursive(dir: &Path, err: DatasetError) -> anyhow::Error {
    if matches!(err, DatasetError::NoImages(_))
        && let Ok(below) = scan_image_tree(dir)
    {
        return UsageError(format!(
            "{} holds no images of its own, but {} in its subfolders: add --recursive to score them",
            dir.display(),
            below.len()
        ))
        .into();
    }
    err.into()
}

/// `path` without its root, prefix or `.` parts, `..` kept as `_up`.
fn plain_relative(path: &Path) -> PathBuf {
    use std::path::Component;
    path.components()
        .filter_map(|c| match c {
            Component::Normal(part) => Some(PathBuf::from(part)),
            Component::ParentDir => Some(PathBuf::from("_up")),
            Component::RootDir | Component::Prefix(_) | Component::CurDir => None,
        })
        .collect()
}

/// `dir/stem.ext` → `dir/stem_heatmap.png` (`_heatmap-N` for the N-th
/// image that would otherwise share it).
fn heatmap_name(relative: &Path, n: usize) -> PathBuf {
    let stem = relative
        .file_stem()
        .map_or_else(|| "image".into(), |s| s.to_string_lossy());
    let name = if n == 1 {
        format!("{stem}_heatmap.png")
    } else {
        format!("{stem}_heatmap-{n}.png")
    };
    relative.with_file_name(name)
}

/// The typed defects the model's text layer checks: `--defect`, and with a
/// model file the older spelling `--prompt` (zero-shot models took their
/// `--prompt`s, WinCLIP's ensemble, when they were made).
pub(crate) fn typed_defects(args: &Args) -> Vec<String> {
    if args.model.is_none() {
        return Vec::new();
    }
    args.defects
        .iter()
        .chain(&args.clip.prompts)
        .cloned()
        .collect()
}

pub fn run(args: &Args) -> anyhow::Result<Outcome> {
    if let Some(path) = &args.model {
        args.clip.refuse_object_for_model(path)?;
    }
    args.clip.check_prompts()?;
    super::clip::check_typed_defects(&args.defects)?;
    let asked = typed_defects(args);
    let asked: &[String] = &asked;
    let runtime = args.clip.runtime(args.device.device()?)?;
    if args.detector == Some(BatchDetector::Musc) {
        return run_mutual(args, &runtime);
    }
    let inspector = match &args.model {
        Some(path) => load_model(path, &runtime)?,
        None => zero_shot_model(&args.clip, &runtime)?,
    };
    // A description the text layer cannot read (too long) stops the run
    // before the first image, not once per image.
    inspector.prepare_defects(asked).map_err(setup_error)?;
    let target =
        Target::from_request(args.max_far, args.max_mar).map_err(|e| UsageError(e.to_string()))?;
    let point = inspector
        .operating_point(target)
        .map_err(|e| UsageError(e.to_string()))?;
    eprintln!("operating point: {}", point.describe());
    if let Some(warning) = &point.warning {
        eprintln!("warning: {warning}");
    }
    let mut inputs = inputs(&args.paths, args.recursive)?;
    if let Some(shard) = &args.shard {
        let all = inputs.len();
        inputs.retain(|input| shard.contains(&input.key));
        eprintln!("shard {shard}: {} of {all} images", inputs.len());
    }
    if let Some(dir) = &args.heatmaps {
        std::fs::create_dir_all(dir)
            .with_context(|| format!("creating heatmap folder {}", dir.display()))?;
    }
    if let Some(db) = &args.db {
        return run_with_store(args, inspector, &inputs, db, &point, asked);
    }
    let limits = ImageLimits::default();
    let bars = Bars::new(inputs.len() < 2);
    bars.start("scoring", inputs.len() as u64);
    let mut failures = 0usize;
    for input in &inputs {
        let path = &input.path;
        let heatmap = args.heatmaps.as_ref().map(|dir| dir.join(&input.heatmap));
        match score_one(&inspector, &point, path, heatmap.as_deref(), &limits, asked) {
            Ok(inspection) => {
                let printed = bars.suspend(|| {
                    print_line(
                        args.json,
                        &ScoreLine {
                            path,
                            heatmap: heatmap.as_deref(),
                            answer: Answer::Fresh(&inspection),
                        },
                    )
                });
                match printed {
                    Ok(()) => {}
                    // The reader went away (`| head`): stop quietly.
                    Err(err) if err.kind() == std::io::ErrorKind::BrokenPipe => break,
                    Err(err) => return Err(err).context("writing the results"),
                }
            }
            Err(err) => {
                failures += 1;
                bars.suspend(|| eprintln!("error: {}", super::describe(&err)));
            }
        }
        bars.advance(1);
    }
    bars.finish();
    if failures > 0 {
        eprintln!(
            "{failures} of {} images could not be scored (see the errors above)",
            inputs.len()
        );
        return Ok(failed_outcome(failures, inputs.len()));
    }
    Ok(Outcome::Success)
}

/// `score --detector musc`: every image scored against the others, then
/// printed in the order given.
fn run_mutual(args: &Args, runtime: &Runtime) -> anyhow::Result<Outcome> {
    let inputs = inputs(&args.paths, args.recursive)?;
    // Too few images given is a usage error (exit 2), found before any is read.
    musc::check_batch_size(inputs.len(), inputs.len()).map_err(|e| UsageError(e.to_string()))?;
    if let Some(dir) = &args.heatmaps {
        std::fs::create_dir_all(dir)
            .with_context(|| format!("creating heatmap folder {}", dir.display()))?;
    }
    let limits = ImageLimits::default();
    let paths: Vec<PathBuf> = inputs.iter().map(|i| i.path.clone()).collect();
    let bars = Bars::new(false);
    let scored = musc::score_batch(&paths, &MuscConfig::default(), runtime, &limits, &bars)
        .map_err(setup_error)?;
    let answers = musc::answers(&scored.iter().map(|r| r.as_ref().ok()).collect::<Vec<_>>());
    if let Some(point) = answers.iter().flatten().next().map(|a| &a.operating_point)
        && let Some(warning) = &point.warning
    {
        eprintln!("warning: {warning}");
    }
    let mut failures = 0usize;
    for ((input, result), answer) in inputs.iter().zip(&scored).zip(&answers) {
        let (Ok(_), Some(inspection)) = (result, answer) else {
            failures += 1;
            if let Err(err) = result {
                eprintln!("error: {}: {err}", input.path.display());
            }
            continue;
        };
        let heatmap = args.heatmaps.as_ref().map(|dir| dir.join(&input.heatmap));
        if let Some(out) = &heatmap {
            let image = load_image(&input.path, &limits)?;
            write_heatmap(out, &image, inspection)?;
        }
        let line = ScoreLine {
            path: &input.path,
            heatmap: heatmap.as_deref(),
            answer: Answer::Fresh(inspection),
        };
        match print_line(args.json, &line) {
            Ok(()) => {}
            Err(err) if err.kind() == std::io::ErrorKind::BrokenPipe => break,
            Err(err) => return Err(err).context("writing the results"),
        }
    }
    if failures > 0 {
        eprintln!(
            "{failures} of {} images could not be scored (see the errors above)",
            inputs.len()
        );
        return Ok(failed_outcome(failures, inputs.len()));
    }
    Ok(Outcome::Success)
}

fn score_one(
    inspector: &Model,
    point: &OperatingPoint,
    path: &Path,
    heatmap: Option<&Path>,
    limits: &ImageLimits,
    asked: &[String],
) -> anyhow::Result<Inspection> {
    let image = load_image(path, limits)?;
    let inspection = inspector
        .inspect_with(&image, point, asked)
        .with_context(|| format!("scoring {}", path.display()))?;
    if let Some(out) = heatmap {
        write_heatmap(out, &image, &inspection)?;
    }
    Ok(inspection)
}

/// Writes the overlay, making its subfolder first.
fn write_heatmap(out: &Path, image: &Rgb32FImage, inspection: &Inspection) -> anyhow::Result<()> {
    if let Some(parent) = out.parent() {
        std::fs::create_dir_all(parent)
            .with_context(|| format!("creating heatmap folder {}", parent.display()))?;
    }
    save_overlay(out, image, &inspection.map, &Legend::of(inspection))
        .with_context(|| format!("writing heatmap {}", out.display()))
}

/// Prints one result as a table row or a JSON line (the one printer of
/// both loops).
fn print_line(json: bool, line: &ScoreLine<'_>) -> std::io::Result<()> {
    let mut out = std::io::stdout().lock();
    if json {
        writeln!(out, "{}", serde_json::to_string(line)?)?;
    } else {
        let shown = line.shown();
        let verdict = if shown.is_anomalous {
            "ANOMALOUS"
        } else {
            "ok"
        };
        write!(
            out,
            "{:.3}  {verdict:<9}  {}",
            shown.score,
            line.path.display()
        )?;
        for d in shown.defects {
            write!(
                out,
                "  [{}: {:.3} {}, false alarms ≤ {:.3} on {} normal images]",
                d.description,
                d.score,
                if d.is_anomalous { "FLAGGED" } else { "ok" },
                d.false_alarm_upper_bound_95,
                d.normal_images
            )?;
        }
        if let Some(reason) = shown.unchecked {
            write!(out, "  ({reason})")?;
        }
        writeln!(out)?;
    }
    out.flush()
}

/// A store row as a line's answer: core's answer as the store kept it, else
/// (rows from before answers were kept) what the row holds.
pub(crate) fn stored_answer<'a>(row: &'a StoredResult, point: &'a OperatingPoint) -> Answer<'a> {
    let summary = Stored {
        score: row.score,
        is_anomalous: row.verdict == Verdict::Anomalous,
        threshold: row.threshold,
        model_is_anomalous: Verdict::at(row.score, row.threshold) == Verdict::Anomalous,
        flagged_by: row.flagged_by(row.threshold),
        defects: &row.defects,
        operating_point: point,
    };
    match row
        .inspection
        .as_deref()
        .and_then(|text| serde_json::from_str::<serde_json::Value>(text).ok())
    {
        Some(answer @ serde_json::Value::Object(_)) => Answer::Kept {
            answer,
            row: summary,
        },
        _ => Answer::Stored(summary),
    }
}

/// Scores into the results store, skipping unchanged images (`--db`).
fn run_with_store(
    args: &Args,
    inspector: Model,
    inputs: &[Input],
    db: &Path,
    point: &OperatingPoint,
    asked: &[String],
) -> anyhow::Result<Outcome> {
    let store = Store::open(db)?;
    let files: Vec<PathBuf> = inputs.iter().map(|i| i.path.clone()).collect();
    // Keyed as the batch names files (absolute): keyed by the paths as
    // typed, a relative path found no heatmap and none was written.
    let heatmaps: Arc<HashMap<PathBuf, PathBuf>> = Arc::new(match &args.heatmaps {
        Some(dir) => inputs
            .iter()
            .map(|i| (store_path(&i.path), dir.join(&i.heatmap)))
            .collect(),
        None => HashMap::new(),
    });
    let (name, identity) = store_model_entry(args.model.as_deref(), &inspector, asked, point)?;
    let scorer = StoreScorer {
        scorer: InspectorScorer::new(Arc::new(inspector), ImageLimits::default(), None)
            .with_prompts(asked.to_vec())
            .map_err(|e| UsageError(format!("--prompt: {e}")))?
            .with_operating_point(point.clone()),
        heatmaps: Arc::clone(&heatmaps),
    };
    let model = store.model(&name, &identity)?;
    // An unchanged image is scored again only when its heatmap is missing.
    let wanted = Arc::clone(&heatmaps);
    let rescore = move |path: &Path| wanted.get(path).is_some_and(|out| !out.is_file());
    let cancel = AtomicBool::new(false);
    let options = BatchOptions {
        cancel: &cancel,
        rescore: &rescore,
    };
    let bars = Bars::new(files.len() < 2);
    bars.start("scoring", files.len() as u64);
    let mut print_error = None;
    let summary = run_batch(&files, &scorer, &store, &model, &options, |item| {
        let printed = bars.suspend(|| match &item {
            BatchItem::Scored(row, _) | BatchItem::Unchanged(row) => print_line(
                args.json,
                &ScoreLine {
                    path: &row.path,
                    heatmap: heatmaps.get(&row.path).map(PathBuf::as_path),
                    answer: stored_answer(row, point),
                },
            ),
            BatchItem::Failed { error, .. } => {
                eprintln!("error: {error}");
                Ok(())
            }
        });
        if let Err(err) = printed {
            // Standard output is gone (a closed pipe): stop after this image.
            cancel.store(true, Ordering::Relaxed);
            print_error.get_or_insert(err);
        }
        bars.advance(1);
    })?;
    bars.finish();
    if let Some(err) = print_error {
        return Err(err.into());
    }
    eprintln!(
        "{} scored, {} unchanged (not rescored), {} failed; results in {}",
        summary.scored,
        summary.unchanged,
        summary.failed,
        db.display()
    );
    if summary.failed > 0 {
        return Ok(failed_outcome(
            summary.failed,
            summary.scored + summary.unchanged + summary.failed,
        ));
    }
    Ok(Outcome::Success)
}

/// The name and identity the store files a model's rows under: a model
/// file by its bytes, a zero-shot model by what it computes; typed defects
/// and another operating point make other rows (`score --db`, `watch`).
pub(crate) fn store_model_entry(
    model: Option<&Path>,
    inspector: &Model,
    asked: &[String],
    point: &OperatingPoint,
) -> anyhow::Result<(String, String)> {
    // A model file is known by its bytes; a zero-shot model by what it computes.
    let (mut name, mut identity) = match model {
        // With --prompt the rows are the model's and its text layer's:
        // another entry, apart from the model's plain rows.
        Some(path) => layered_model(&path.display().to_string(), &file_hash(path)?, asked),
        None => (
            format!(
                "zero-shot {}",
                inspector.summary().object.unwrap_or_default()
            ),
            inspector.identity()?,
        ),
    };
    // Verdicts at another operating point are other rows: a rerun at the
    // model's own threshold must not reuse them.
    if let Some(target) = point.target {
        let suffix = match target {
            Target::MaxFar(far) => format!(" @max_far={far}"),
            Target::MaxMar(mar) => format!(" @max_mar={mar}"),
            Target::Threshold(t) => format!(" @threshold={t}"),
        };
        name.push_str(&suffix);
        identity.push_str(&suffix);
    }
    Ok((name, identity))
}

/// As the README's table says: 3 when some inputs failed while the rest
/// were processed, 1 when every one failed (nothing was scored).
fn failed_outcome(failed: usize, all: usize) -> Outcome {
    if failed >= all {
        Outcome::Failure
    } else {
        Outcome::PartialFailure
    }
}

/// The results crate's scorer (with `--prompt`, the typed defects too),
/// which also writes the overlay (`--heatmaps`).
struct StoreScorer {
    scorer: InspectorScorer,
    heatmaps: Arc<HashMap<PathBuf, PathBuf>>,
}

impl Scorer for StoreScorer {
    fn score(&self, path: &Path, bytes: &[u8]) -> Result<Scored, ScoreError> {
        let (image, inspection) = self.scorer.inspect(path, bytes)?;
        if let Some(out) = self.heatmaps.get(path) {
            write_heatmap(out, &image, &inspection)
                .map_err(|e| ScoreError::Other(super::describe(&e)))?;
        }
        self.scorer.scored(&image, &inspection)
    }
}
