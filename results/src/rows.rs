//! The values the store holds and hands out, free of SQL: a person's
//! [`Decision`], the [`Verdict`], a [`ModelRef`], a [`NewScore`] to record
//! and a [`StoredResult`] read back, with the rules that derive a row's
//! verdict ([`layered_verdict`], [`flagged_by`]) and a layered model's
//! identity ([`layered_model`]).

use std::path::{Path, PathBuf};

use flawscope_core::prompt_layer::DefectCheck;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

pub use flawscope_core::verdict::Verdict;

/// A person's call on an image.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Decision {
    None,
    Ok,
    Ng,
}

impl Decision {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::None => "none",
            Self::Ok => "ok",
            Self::Ng => "ng",
        }
    }

    pub fn parse(text: &str) -> Option<Self> {
        match text {
            "none" => Some(Self::None),
            "ok" => Some(Self::Ok),
            "ng" => Some(Self::Ng),
            _ => None,
        }
    }
}

/// A model as the store knows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ModelRef {
    pub id: i64,
    /// How the user named it (the path given).
    pub name: String,
    /// `sha256:<hex>` of the model file.
    pub identity: String,
}

/// A score to record.
#[derive(Debug, Clone, Copy)]
pub struct NewScore<'a> {
    pub path: &'a Path,
    pub content_hash: &'a str,
    /// 0–1.
    pub score: f32,
    pub raw_score: f32,
    /// The 0–1 threshold the verdict was taken at.
    pub threshold: f32,
    /// Typed defects checked beside the model (empty when none were asked).
    pub defects: &'a [DefectCheck],
    /// Core's whole answer for the image (`Inspection` as JSON), if known.
    pub inspection: Option<&'a str>,
}

/// The verdict of a row: anomalous when the model's score is at or over
/// `threshold`, or any typed defect is over its own calibrated threshold.
pub fn layered_verdict(score: f32, threshold: f32, defects: &[DefectCheck]) -> Verdict {
    if flagged_by(score, threshold, defects).is_empty() {
        Verdict::Ok
    } else {
        Verdict::Anomalous
    }
}

/// One stored row.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct StoredResult {
    pub path: PathBuf,
    pub content_hash: String,
    pub model: String,
    pub model_identity: String,
    pub score: f32,
    pub raw_score: f32,
    pub threshold: f32,
    pub verdict: Verdict,
    pub decision: Decision,
    /// UTC, ISO 8601; `None` while undecided.
    pub decided_at: Option<String>,
    /// UTC, ISO 8601.
    pub scored_at: String,
    /// Typed defects checked beside the model, when any were asked.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub defects: Vec<DefectCheck>,
    /// Core's whole answer for the image (`Inspection` as JSON); `None` in
    /// rows written before it was kept.
    #[serde(skip)]
    pub inspection: Option<String>,
}

impl StoredResult {
    /// The verdict at another model threshold (a person's), the typed
    /// defects' verdicts unchanged ([`layered_verdict`]).
    pub fn verdict_at(&self, threshold: f32) -> Verdict {
        layered_verdict(self.score, threshold, &self.defects)
    }

    /// What flagged the image at `threshold` ([`flagged_by`]).
    pub fn flagged_by(&self, threshold: f32) -> Vec<String> {
        flagged_by(self.score, threshold, &self.defects)
    }
}

/// What flagged an image scored `score` at `threshold`: `model`, then each
/// flagged typed defect.
pub fn flagged_by(score: f32, threshold: f32, defects: &[DefectCheck]) -> Vec<String> {
    let model = Verdict::at(score, threshold) == Verdict::Anomalous;
    let checks = defects
        .iter()
        .map(|d| (d.is_anomalous, d.description.as_str()));
    flawscope_core::verdict::flagged_by(model, checks)
}

/// A model entry for a model asked about typed defects: its rows are not
/// the model's plain rows, so they are kept apart (same file, other
/// identity: the descriptions' hash appended).
pub fn layered_model(name: &str, identity: &str, prompts: &[String]) -> (String, String) {
    if prompts.is_empty() {
        return (name.to_owned(), identity.to_owned());
    }
    let mut hash = Sha256::new();
    for p in prompts {
        hash.update((p.len() as u64).to_le_bytes());
        hash.update(p.as_bytes());
    }
    let quoted: Vec<String> = prompts.iter().map(|p| format!("\"{p}\"")).collect();
    (
        format!("{name} + {}", quoted.join(", ")),
        format!("{identity}+prompts:{:x}", hash.finalize()),
    )
}
