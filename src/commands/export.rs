//! `flawscope export`: write the results store out as CSV or JSON lines.

use std::path::PathBuf;

use anyhow::Context;
use clap::ValueEnum;
use flawscope_core::model_file::write_atomically;
use flawscope_tui::store::{Store, StoredResult};

use super::Outcome;

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Format {
    /// Comma-separated values with a header line.
    Csv,
    /// One JSON object per line.
    Jsonl,
}

#[derive(clap::Args)]
pub struct Args {
    /// Results database written by `flawscope score --db` or `flawscope tui`.
    #[arg(long)]
    pub db: PathBuf,
    #[arg(long, value_enum, default_value = "csv")]
    pub format: Format,
    /// Write here (atomically: a temporary file renamed into place) instead
    /// of standard output.
    #[arg(long)]
    pub out: Option<PathBuf>,
}

/// CSV columns, in order.
pub const CSV_HEADER: &str = "path,content_hash,model,model_identity,score,raw_score,threshold,verdict,decision,decided_at,scored_at";

pub fn run(args: &Args) -> anyhow::Result<Outcome> {
    let store = Store::open_existing(&args.db)?;
    let rows = store.all_results()?;
    let text = match args.format {
        Format::Csv => to_csv(&rows),
        Format::Jsonl => to_jsonl(&rows)?,
    };
    match &args.out {
        Some(out) => {
            write_atomically(out, text.as_bytes())
                .with_context(|| format!("writing {}", out.display()))?;
            eprintln!("wrote {} rows to {}", rows.len(), out.display());
        }
        None => {
            use std::io::Write;
            let mut stdout = std::io::stdout().lock();
            stdout.write_all(text.as_bytes())?;
            stdout.flush()?;
        }
    }
    Ok(Outcome::Success)
}

pub fn to_jsonl(rows: &[StoredResult]) -> anyhow::Result<String> {
    let mut out = String::new();
    for row in rows {
        out.push_str(&serde_json::to_string(row)?);
        out.push('\n');
    }
    Ok(out)
}

pub fn to_csv(rows: &[StoredResult]) -> String {
    let mut out = String::from(CSV_HEADER);
    out.push('\n');
    for row in rows {
        let fields = [
            row.path.to_string_lossy().into_owned(),
            row.content_hash.clone(),
            row.model.clone(),
            row.model_identity.clone(),
            row.score.to_string(),
            row.raw_score.to_string(),
            row.threshold.to_string(),
            row.verdict.as_str().to_string(),
            row.decision.as_str().to_string(),
            row.decided_at.clone().unwrap_or_default(),
            row.scored_at.clone(),
        ];
        let line: Vec<String> = fields.iter().map(|f| csv_field(f)).collect();
        out.push_str(&line.join(","));
        out.push('\n');
    }
    out
}

/// Quotes a field when it holds a comma, quote or line break (RFC 4180).
fn csv_field(text: &str) -> String {
    if text.contains([',', '"', '\n', '\r']) {
        format!("\"{}\"", text.replace('"', "\"\""))
    } else {
        text.to_string()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn csv_fields_are_quoted_when_needed() {
        assert_eq!(csv_field("plain.png"), "plain.png");
        assert_eq!(csv_field("a,b.png"), "\"a,b.png\"");
        assert_eq!(csv_field("say \"hi\""), "\"say \"\"hi\"\"\"");
    }
}
