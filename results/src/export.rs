//! The store's rows as CSV or JSON lines, for spreadsheets and scripts.
//!
//! Each row states which threshold each verdict used: `threshold` /
//! `verdict` are the model's, as scored; `person_threshold` /
//! `person_verdict` are at the threshold a person set in the TUI (empty or
//! `null` while none was set). Both are anomalous too when a typed defect
//! checked beside the model was over its own threshold
//! ([`crate::rows::layered_verdict`]; `flagged_by` says which).

use std::io::Write;

use serde::{Deserialize, Serialize};

use crate::error::StoreError;
use crate::rows::{Decision, StoredResult, Verdict};
use crate::store::Store;

/// One exported row; its field names are the CSV header and JSON keys.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ExportRow {
    pub path: String,
    pub content_hash: String,
    pub model: String,
    pub model_identity: String,
    /// 0–1.
    pub score: f32,
    pub raw_score: f32,
    /// The model's threshold, at which the image was scored.
    pub threshold: f32,
    /// At `threshold`.
    pub verdict: Verdict,
    /// The threshold a person chose in the TUI, if any.
    pub person_threshold: Option<f32>,
    /// At `person_threshold`.
    pub person_verdict: Option<Verdict>,
    pub decision: Decision,
    /// UTC, ISO 8601; empty while undecided.
    pub decided_at: Option<String>,
    /// UTC, ISO 8601.
    pub scored_at: String,
    /// What flagged the image at the model's threshold: `model`, then each
    /// flagged typed defect, joined by "; " (empty when nothing did).
    pub flagged_by: String,
    /// The typed defects checked beside the model, as a JSON array
    /// (empty when none were asked about).
    pub defects: String,
    /// Core's whole answer for the image (score, verdicts, typed defects,
    /// operating point, regions), as JSON; empty for rows stored before it
    /// was kept.
    #[serde(default)]
    pub inspection: String,
}

impl ExportRow {
    pub fn new(row: StoredResult, person_threshold: Option<f32>) -> Self {
        let flagged_by = row.flagged_by(row.threshold).join("; ");
        let person_verdict = person_threshold.map(|t| row.verdict_at(t));
        let defects = if row.defects.is_empty() {
            String::new()
        } else {
            serde_json::to_string(&row.defects).unwrap_or_default()
        };
        Self {
            path: row.path.to_string_lossy().into_owned(),
            content_hash: row.content_hash,
            model: row.model,
            model_identity: row.model_identity,
            score: row.score,
            raw_score: row.raw_score,
            threshold: row.threshold,
            verdict: row.verdict,
            person_threshold,
            person_verdict,
            decision: row.decision,
            decided_at: row.decided_at,
            scored_at: row.scored_at,
            flagged_by,
            defects,
            inspection: row.inspection.unwrap_or_default(),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ExportError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("writing CSV: {0}")]
    Csv(#[from] csv::Error),
    #[error("writing JSON: {0}")]
    Json(#[from] serde_json::Error),
    #[error("writing the export: {0}")]
    Io(#[from] std::io::Error),
}

/// Every row of the store, by path then model, with the person's threshold.
pub fn rows(store: &Store) -> Result<Vec<ExportRow>, ExportError> {
    let person_threshold = store.person_threshold()?;
    Ok(store
        .all_results()?
        .into_iter()
        .map(|row| ExportRow::new(row, person_threshold))
        .collect())
}

/// CSV with a header line (also when there are no rows).
pub fn write_csv(rows: &[ExportRow], out: impl Write) -> Result<(), ExportError> {
    let mut writer = csv::Writer::from_writer(out);
    if rows.is_empty() {
        writer.write_record(serde_aux::serde_introspection::serde_introspect::<ExportRow>())?;
    }
    for row in rows {
        writer.serialize(row)?;
    }
    writer.flush()?;
    Ok(())
}

/// One JSON object per line.
pub fn write_jsonl(rows: &[ExportRow], mut out: impl Write) -> Result<(), ExportError> {
    for row in rows {
        serde_json::to_writer(&mut out, row)?;
        out.write_all(b"\n")?;
    }
    out.flush()?;
    Ok(())
}
