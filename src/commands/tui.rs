//! `flawscope tui`: triage a folder in the terminal; scores and decisions go
//! to a results store that the next session resumes from.

use std::path::PathBuf;
use std::time::Instant;

use anyhow::Context;

use super::Outcome;
use super::options::DeviceChoice;

/// Environment variable naming a file for timing lines (first row shown,
/// key-to-redraw latency).
pub const TRACE_ENV: &str = "FLAWSCOPE_TUI_TRACE";

#[derive(clap::Args)]
pub struct Args {
    /// Folder of images to triage.
    pub path: PathBuf,
    /// Also triage the images in its subfolders (hidden ones skipped).
    #[arg(long, short = 'r')]
    pub recursive: bool,
    /// Model file written by `flawscope fit` (classical or WinCLIP).
    #[arg(
        long,
        required_unless_present = "detector",
        conflicts_with = "detector"
    )]
    pub model: Option<PathBuf>,
    /// No model file and no normal images: `musc` scores the folder's
    /// images as one batch, each against the others (at least 8 images;
    /// uncalibrated: it ranks the batch and flags its outliers), as `score
    /// --detector musc` does.
    #[arg(long, value_enum, conflicts_with = "prompts")]
    pub detector: Option<super::score::BatchDetector>,
    /// CLIP checkpoint folder for WinCLIP model files (also
    /// FLAWSCOPE_CLIP_WEIGHTS).
    #[arg(long, value_name = "DIR")]
    pub clip_weights: Option<PathBuf>,
    /// CLIP preset looked up in the Hugging Face cache (vit-b-16, vit-l-14,
    /// vit-l-14-336).
    #[arg(long, default_value = "vit-b-16")]
    pub clip_model: String,
    /// A typed defect for the model's text layer to check on every image
    /// (repeatable; the model must have been fitted with --object and CLIP
    /// weights). The list shows which layer flagged each image.
    #[arg(long = "defect", visible_alias = "prompt", value_name = "TEXT")]
    pub prompts: Vec<String>,
    /// Results database [default: PATH/.flawscope-results.sqlite].
    #[arg(long)]
    pub db: Option<PathBuf>,
    /// Where the networks run.
    #[arg(long, value_enum, default_value = "auto")]
    pub device: DeviceChoice,
}

pub fn run(args: &Args) -> anyhow::Result<Outcome> {
    let started = Instant::now();
    super::clip::check_typed_defects(&args.prompts)?;
    let options = flawscope_tui::Options {
        folder: args.path.clone(),
        recursive: args.recursive,
        model: args.model.clone(),
        prompts: args.prompts.clone(),
        db: args.db.clone(),
        runtime: std::sync::Arc::new(super::clip::runtime(
            args.clip_weights.clone(),
            &args.clip_model,
            args.device.device()?,
        )?),
        trace: std::env::var_os(TRACE_ENV).map(PathBuf::from),
        started,
    };
    flawscope_tui::run(options).with_context(|| format!("triaging {}", args.path.display()))?;
    Ok(Outcome::Success)
}
