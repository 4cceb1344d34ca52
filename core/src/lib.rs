//! The anomaly-detection engine.
//!
//! Data flows one way: an image is read ([`images`]), a backbone from
//! `flawscope-models` turns it into patch features ([`features`]), a detector
//! (one file each in [`detectors`], which also lists them: PatchCore, PaDiM,
//! the trained flow, recon and SuperSimpleNet, behind the [`detector`]
//! interface; [`train`] holds their shared training loop) scores the
//! features into an [`anomaly_map`], and [`calibration`] turns scores into a
//! verdict, its threshold set on out-of-fold scores ([`crossfit`] over
//! [`folds`]).
//! [`winclip`] is a detector too: it scores with CLIP and text prompts
//! (zero-shot, or few-shot with a handful of normal images).
//! [`tiling`] lets any detector score large or elongated images in tiles at
//! native resolution; [`synthetic`] pastes defects into normal images so
//! calibration can estimate the missed-alarm rate, and [`choice`] weighs two
//! detectors and their pair (a [`model::Partner`]) on those defects.
//! [`model`] ties detector and calibration into one fitted model stored in
//! one file ([`model_file`]), optionally with a [`prompt_layer`] that checks
//! typed defect descriptions with CLIP, calibrated on the normal images; the
//! [`verdict`] rule is in one place, and [`model::Inspection`] is the one
//! answer per image every face shows.
//! [`musc`] scores an unlabeled batch with no model at all: each image's
//! patches against the other images' (mutual scoring).
//! [`runtime`] holds the device and the CLIP weights models run on.
//! [`dataset`] reads folders of images, [`evaluation`] and [`metrics`]
//! measure how well a detector separates good from bad.

pub mod anomaly_map;
pub mod calibration;
pub mod choice;
pub mod coreset;
pub mod crossfit;
pub mod dataset;
pub mod detector;
pub mod detectors;
pub mod evaluation;
pub mod features;
pub mod fewshot;
pub mod folds;
#[doc(hidden)]
pub mod fuzzing;
pub mod gaussian;
pub mod heatmap;
pub mod images;
pub mod metrics;
pub mod model;
pub mod model_file;
pub mod musc;
pub mod nearest;
pub mod operating_point;
pub mod progress;
pub mod prompt_layer;
pub mod regions;
pub mod runtime;
pub mod synthetic;
pub mod tiling;
pub mod train;
#[cfg(test)]
mod trained_tests;
pub mod verdict;
pub mod winclip;

pub use candle_core::{Device, Tensor};

/// Everything that can go wrong in the engine.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Image(#[from] images::ImageError),
    #[error(transparent)]
    Dataset(#[from] dataset::DatasetError),
    #[error(transparent)]
    Model(#[from] flawscope_models::ModelError),
    #[error(transparent)]
    ModelFile(#[from] model_file::ModelFileError),
    #[error(transparent)]
    Calibration(#[from] calibration::CalibrationError),
    #[error(transparent)]
    Prompt(#[from] flawscope_prompts::PromptError),
    #[error(transparent)]
    WinClip(#[from] winclip::config::WinClipError),
    #[error(transparent)]
    Metric(#[from] metrics::MetricError),
    #[error("tensor computation failed: {0}")]
    Tensor(#[from] candle_core::Error),
    #[error("invalid configuration: {0}")]
    InvalidConfig(String),
    /// The backbone's weight file is missing, unreadable, of another variant
    /// or not the file the model was fitted with.
    #[error("backbone weights: {0}")]
    BackboneWeights(String),
    #[error("training failed: {0}")]
    Training(String),
    #[error("cannot encode image: {0}")]
    Encode(String),
    /// The caller stopped the work (a request that timed out).
    #[error("stopped: the caller no longer waits for the answer")]
    Cancelled,
}

impl Error {
    /// Whether the user fixes this by changing the setup rather than the
    /// input: missing or mismatched network weights, an empty object name.
    pub fn is_setup_problem(&self) -> bool {
        use flawscope_models::ModelError as M;
        use winclip::config::WinClipError as W;
        matches!(
            self,
            Self::Model(M::NoClipWeights { .. } | M::MissingFile { .. })
                | Self::BackboneWeights(_)
                | Self::WinClip(W::CheckpointMismatch { .. } | W::EmptyObject)
                | Self::Prompt(
                    flawscope_prompts::PromptError::EmptyDescription
                        | flawscope_prompts::PromptError::TooLong { .. }
                        | flawscope_prompts::PromptError::Placeholder { .. }
                )
        )
    }
}
