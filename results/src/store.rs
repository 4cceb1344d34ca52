//! The results store: one SQLite file holding, per image and model, the
//! score, the verdict and the person's decision.
//!
//! - The file runs in WAL mode, so a reader (the TUI, `flawscope export`)
//!   sees a consistent snapshot while a writer (a scoring run) commits rows.
//! - Every row is committed on its own as soon as it is written: a run that
//!   is killed loses nothing it had already stored.
//! - The file is marked as flawscope's with `PRAGMA application_id`
//!   ([`APPLICATION_ID`]); the schema is versioned with `PRAGMA
//!   user_version`, and [`MIGRATIONS`] lists the steps from an empty file,
//!   applied in order inside transactions.
//! - Before anything is written, an existing file is read without changing
//!   it: only an empty database, one of ours, or one written before the mark
//!   existed (recognised by its exact schema) is opened. Another
//!   application's database is [`StoreError::Foreign`], a file that is not a
//!   database or a damaged one [`StoreError::Corrupt`]; both leave the file
//!   as it was, and neither is a panic.
//!
//! A row is keyed by `(path, model)`. The model is identified by the SHA-256
//! of its file, so a copied or renamed model file is the same model. A
//! decision belongs to the image (path + content hash), whatever model scored
//! it: it is written to every row of that image, and a new model's row for an
//! unchanged image starts with the decision already made.

use std::io::Read;
use std::path::{Path, PathBuf};
use std::time::Duration;

use flawscope_core::prompt_layer::DefectCheck;
use rusqlite::{Connection, ErrorCode, OptionalExtension, TransactionBehavior, params};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

/// Schema steps; step `i` takes `user_version` from `i` to `i + 1`.
pub const MIGRATIONS: &[&str] = &[
    // 1: models, results, settings.
    "CREATE TABLE models (
        id INTEGER PRIMARY KEY,
        name TEXT NOT NULL,
        identity TEXT NOT NULL UNIQUE
    );
    CREATE TABLE results (
        id INTEGER PRIMARY KEY,
        path TEXT NOT NULL,
        content_hash TEXT NOT NULL,
        model_id INTEGER NOT NULL REFERENCES models(id),
        score REAL NOT NULL,
        raw_score REAL NOT NULL,
        threshold REAL NOT NULL,
        verdict TEXT NOT NULL CHECK (verdict IN ('ok', 'anomalous')),
        decision TEXT NOT NULL DEFAULT 'none' CHECK (decision IN ('none', 'ok', 'ng')),
        decided_at TEXT,
        scored_at TEXT NOT NULL,
        UNIQUE (path, model_id)
    );
    CREATE INDEX results_by_image ON results (path, content_hash);
    CREATE TABLE settings (
        key TEXT PRIMARY KEY,
        value TEXT NOT NULL
    );",
    // 2: the typed defects checked beside the model (its text layer), as a
    // JSON array of [`DefectCheck`]; NULL when none were asked about.
    "ALTER TABLE results ADD COLUMN defects TEXT;",
];

/// `PRAGMA application_id` of a results database: the bytes "FLWS".
pub const APPLICATION_ID: i32 = i32::from_be_bytes(*b"FLWS");

/// The store setting holding the threshold a person chose in the TUI
/// (`+` / `-`).
pub const PERSON_THRESHOLD_SETTING: &str = "tui.threshold";

/// The first bytes of every SQLite database file.
const SQLITE_MAGIC: &[u8; 16] = b"SQLite format 3\0";

/// UTC time with milliseconds, as SQLite writes it.
const NOW: &str = "strftime('%Y-%m-%dT%H:%M:%fZ', 'now')";

/// How long a connection waits for another's write lock before failing.
const BUSY_TIMEOUT: Duration = Duration::from_secs(10);

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("threshold {0} is not within 0–1")]
    BadThreshold(f32),
    #[error(
        "{path} is not a flawscope results database or it is damaged ({detail}); move it away or pass another --db"
    )]
    Corrupt { path: PathBuf, detail: String },
    #[error(
        "{path} was written by a newer flawscope (schema version {found}; this one knows up to {supported})"
    )]
    TooNew {
        path: PathBuf,
        found: i64,
        supported: i64,
    },
    #[error(
        "{path} is not a flawscope results database (application_id {application_id:#010x}, {contents}); it was left unchanged: pass another --db"
    )]
    Foreign {
        path: PathBuf,
        application_id: u32,
        /// What the file holds, e.g. `tables: a, b`.
        contents: String,
    },
    #[error("results database {0} does not exist")]
    Missing(PathBuf),
    #[error("{0} already exists; a merge writes a new file (remove it or choose another --out)")]
    Exists(PathBuf),
    #[error("results database {path}: {cause}")]
    Sqlite {
        path: PathBuf,
        #[source]
        cause: rusqlite::Error,
    },
    #[error("cannot read {path}: {cause}")]
    Io {
        path: PathBuf,
        #[source]
        cause: std::io::Error,
    },
    #[error("results database {path} holds an unknown {field} value {value:?}")]
    BadValue {
        path: PathBuf,
        field: &'static str,
        value: String,
    },
}

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

pub use flawscope_core::verdict::Verdict;

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

fn defects_json(db: &Path, defects: &[DefectCheck]) -> Result<Option<String>, StoreError> {
    if defects.is_empty() {
        return Ok(None);
    }
    serde_json::to_string(defects)
        .map(Some)
        .map_err(|e| StoreError::BadValue {
            path: db.to_path_buf(),
            field: "defects",
            value: e.to_string(),
        })
}

/// An open results database.
#[derive(Debug)]
pub struct Store {
    conn: Connection,
    path: PathBuf,
}

const SELECT_RESULTS: &str =
    "SELECT r.path, r.content_hash, m.name, m.identity, r.score, r.raw_score,
        r.threshold, r.verdict, r.decision, r.decided_at, r.scored_at, r.defects
     FROM results r JOIN models m ON m.id = r.model_id";

impl Store {
    /// Opens the database at `path`, creating it (and its schema) if needed.
    /// An existing file is first read without changing it, and refused
    /// unless it is empty or a results database.
    pub fn open(path: &Path) -> Result<Self, StoreError> {
        let found = inspect_file(path)?;
        let conn = Connection::open(path).map_err(|cause| classify(path, cause))?;
        let mut store = Self {
            conn,
            path: path.to_path_buf(),
        };
        store
            .conn
            .busy_timeout(BUSY_TIMEOUT)
            .map_err(|e| store.err(e))?;
        if found != Found::Ours(MIGRATIONS.len() as i64) {
            store.initialise()?;
        }
        // Only now is the file known to be ours: switching to WAL rewrites
        // its header.
        let mode: String = store
            .conn
            .pragma_update_and_check(None, "journal_mode", "WAL", |row| row.get(0))
            .map_err(|e| store.err(e))?;
        if !mode.eq_ignore_ascii_case("wal") {
            return Err(StoreError::Corrupt {
                path: store.path.clone(),
                detail: format!("cannot switch to WAL mode (journal mode is {mode})"),
            });
        }
        // In WAL mode NORMAL keeps every committed row across a crash of the
        // program; only a power cut can lose the last commits.
        store
            .conn
            .pragma_update(None, "synchronous", "NORMAL")
            .map_err(|e| store.err(e))?;
        store
            .conn
            .pragma_update(None, "foreign_keys", "ON")
            .map_err(|e| store.err(e))?;
        Ok(store)
    }

    /// Opens an existing database; a missing file is [`StoreError::Missing`].
    pub fn open_existing(path: &Path) -> Result<Self, StoreError> {
        if !path.is_file() {
            return Err(StoreError::Missing(path.to_path_buf()));
        }
        Self::open(path)
    }

    fn err(&self, cause: rusqlite::Error) -> StoreError {
        classify(&self.path, cause)
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The schema version of the open file.
    pub fn schema_version(&self) -> Result<i64, StoreError> {
        self.conn
            .pragma_query_value(None, "user_version", |row| row.get(0))
            .map_err(|e| self.err(e))
    }

    /// Stamps and migrates the file to the latest schema, in one
    /// transaction that first looks at the file again under the write lock
    /// (another process may have changed it since [`inspect_file`]).
    fn initialise(&mut self) -> Result<(), StoreError> {
        let path = self.path.clone();
        let sql = |e| classify(&path, e);
        let tx = self
            .conn
            .transaction_with_behavior(TransactionBehavior::Immediate)
            .map_err(sql)?;
        let from = match inspect(&tx, &path)? {
            Found::Ours(version) if version == MIGRATIONS.len() as i64 => return Ok(()),
            Found::Empty => 0,
            Found::Ours(version) | Found::Unstamped(version) => version,
        };
        tx.pragma_update(None, "application_id", APPLICATION_ID)
            .map_err(sql)?;
        for (step, migration) in MIGRATIONS.iter().enumerate().skip(from as usize) {
            tx.execute_batch(migration).map_err(sql)?;
            tx.pragma_update(None, "user_version", step as i64 + 1)
                .map_err(sql)?;
        }
        tx.commit().map_err(sql)
    }

    /// The store's entry for a model, created on first use.
    pub fn model(&self, name: &str, identity: &str) -> Result<ModelRef, StoreError> {
        let id = self
            .conn
            .query_row(
                "INSERT INTO models (name, identity) VALUES (?1, ?2)
                 ON CONFLICT (identity) DO UPDATE SET name = excluded.name
                 RETURNING id",
                params![name, identity],
                |row| row.get(0),
            )
            .map_err(|e| self.err(e))?;
        Ok(ModelRef {
            id,
            name: name.to_string(),
            identity: identity.to_string(),
        })
    }

    /// The stored row of `path` for `model`, if any.
    pub fn lookup(
        &self,
        model: &ModelRef,
        path: &Path,
    ) -> Result<Option<StoredResult>, StoreError> {
        let sql = format!("{SELECT_RESULTS} WHERE r.model_id = ?1 AND r.path = ?2");
        let raw = self
            .conn
            .query_row(&sql, params![model.id, path_text(path)], RawRow::read)
            .optional()
            .map_err(|e| self.err(e))?;
        raw.map(|r| r.into_result(&self.path)).transpose()
    }

    /// Writes (or replaces) the score of an image for a model, committed at
    /// once. When the image's content changed since its last score, its
    /// decision is reset; a new row inherits the decision already made on
    /// the same content under another model.
    pub fn record_score(
        &self,
        model: &ModelRef,
        score: &NewScore<'_>,
    ) -> Result<StoredResult, StoreError> {
        let verdict = layered_verdict(score.score, score.threshold, score.defects);
        let defects = defects_json(&self.path, score.defects)?;
        let sql = format!(
            "INSERT INTO results (path, content_hash, model_id, score, raw_score, threshold,
                                  verdict, decision, decided_at, scored_at, defects)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7,
                 COALESCE((SELECT decision FROM results WHERE path = ?1 AND content_hash = ?2
                           AND decision <> 'none' ORDER BY decided_at DESC LIMIT 1), 'none'),
                 (SELECT decided_at FROM results WHERE path = ?1 AND content_hash = ?2
                  AND decision <> 'none' ORDER BY decided_at DESC LIMIT 1),
                 {NOW}, ?8)
             ON CONFLICT (path, model_id) DO UPDATE SET
                 score = excluded.score,
                 defects = excluded.defects,
                 raw_score = excluded.raw_score,
                 threshold = excluded.threshold,
                 verdict = excluded.verdict,
                 scored_at = excluded.scored_at,
                 decision = CASE WHEN results.content_hash = excluded.content_hash
                                 THEN results.decision ELSE excluded.decision END,
                 decided_at = CASE WHEN results.content_hash = excluded.content_hash
                                   THEN results.decided_at ELSE excluded.decided_at END,
                 content_hash = excluded.content_hash
             RETURNING decision, decided_at, scored_at"
        );
        let (decision, decided_at, scored_at): (String, Option<String>, String) = self
            .conn
            .query_row(
                &sql,
                params![
                    path_text(score.path),
                    score.content_hash,
                    model.id,
                    f64::from(score.score),
                    f64::from(score.raw_score),
                    f64::from(score.threshold),
                    verdict.as_str(),
                    defects,
                ],
                |row| Ok((row.get(0)?, row.get(1)?, row.get(2)?)),
            )
            .map_err(|e| self.err(e))?;
        Ok(StoredResult {
            path: score.path.to_path_buf(),
            content_hash: score.content_hash.to_string(),
            model: model.name.clone(),
            model_identity: model.identity.clone(),
            score: score.score,
            raw_score: score.raw_score,
            threshold: score.threshold,
            verdict,
            decision: parse_decision(&self.path, &decision)?,
            decided_at,
            scored_at,
            defects: score.defects.to_vec(),
        })
    }

    /// Records a decision on an image (every model's row of this path and
    /// content), committed at once. Returns how many rows changed.
    pub fn set_decision(
        &self,
        path: &Path,
        content_hash: &str,
        decision: Decision,
    ) -> Result<usize, StoreError> {
        let sql = format!(
            "UPDATE results
             SET decision = ?1,
                 decided_at = CASE WHEN ?1 = 'none' THEN NULL ELSE {NOW} END
             WHERE path = ?2 AND content_hash = ?3"
        );
        self.conn
            .execute(
                &sql,
                params![decision.as_str(), path_text(path), content_hash],
            )
            .map_err(|e| self.err(e))
    }

    /// Every row scored by `model`, by path.
    pub fn results_for_model(&self, model: &ModelRef) -> Result<Vec<StoredResult>, StoreError> {
        let sql = format!("{SELECT_RESULTS} WHERE r.model_id = ?1 ORDER BY r.path");
        self.query(&sql, params![model.id])
    }

    /// Every row, by path then model.
    pub fn all_results(&self) -> Result<Vec<StoredResult>, StoreError> {
        let sql = format!("{SELECT_RESULTS} ORDER BY r.path, m.name, m.identity");
        self.query(&sql, [])
    }

    fn query(
        &self,
        sql: &str,
        params: impl rusqlite::Params,
    ) -> Result<Vec<StoredResult>, StoreError> {
        let mut statement = self.conn.prepare(sql).map_err(|e| self.err(e))?;
        let raw = statement
            .query_map(params, RawRow::read)
            .map_err(|e| self.err(e))?
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| self.err(e))?;
        raw.into_iter().map(|r| r.into_result(&self.path)).collect()
    }

    /// Every setting, by key.
    pub fn settings(&self) -> Result<Vec<(String, String)>, StoreError> {
        let mut statement = self
            .conn
            .prepare("SELECT key, value FROM settings ORDER BY key")
            .map_err(|e| self.err(e))?;
        let rows = statement
            .query_map([], |row| Ok((row.get(0)?, row.get(1)?)))
            .map_err(|e| self.err(e))?
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| self.err(e))?;
        Ok(rows)
    }

    /// Adds rows read from another store, in one transaction. A row whose
    /// image (path) a model already scored here is merged with the one
    /// stored: the later score wins; on the same content the later
    /// decision (a made one over none) is kept, else the decision goes with
    /// the score that won.
    pub fn import(&mut self, rows: &[StoredResult]) -> Result<(), StoreError> {
        let path = self.path.clone();
        let sql = |e| classify(&path, e);
        let tx = self.conn.transaction().map_err(sql)?;
        {
            let mut model = tx
                .prepare_cached(
                    "INSERT INTO models (name, identity) VALUES (?1, ?2)
                     ON CONFLICT (identity) DO UPDATE SET name = models.name
                     RETURNING id",
                )
                .map_err(sql)?;
            let mut insert = tx
                .prepare_cached(
                    "INSERT INTO results (path, content_hash, model_id, score, raw_score, threshold,
                                          verdict, decision, decided_at, scored_at, defects)
                     VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11)
                     ON CONFLICT (path, model_id) DO UPDATE SET
                         defects = CASE WHEN excluded.scored_at > results.scored_at
                                        THEN excluded.defects ELSE results.defects END,
                         score = CASE WHEN excluded.scored_at > results.scored_at
                                      THEN excluded.score ELSE results.score END,
                         raw_score = CASE WHEN excluded.scored_at > results.scored_at
                                          THEN excluded.raw_score ELSE results.raw_score END,
                         threshold = CASE WHEN excluded.scored_at > results.scored_at
                                          THEN excluded.threshold ELSE results.threshold END,
                         verdict = CASE WHEN excluded.scored_at > results.scored_at
                                        THEN excluded.verdict ELSE results.verdict END,
                         content_hash = CASE WHEN excluded.scored_at > results.scored_at
                                             THEN excluded.content_hash ELSE results.content_hash END,
                         scored_at = MAX(excluded.scored_at, results.scored_at),
                         decision = CASE
                             WHEN excluded.content_hash = results.content_hash THEN
                                 CASE WHEN excluded.decision <> 'none' AND (results.decision = 'none'
                                           OR excluded.decided_at > results.decided_at)
                                      THEN excluded.decision ELSE results.decision END
                             WHEN excluded.scored_at > results.scored_at THEN excluded.decision
                             ELSE results.decision END,
                         decided_at = CASE
                             WHEN excluded.content_hash = results.content_hash THEN
                                 CASE WHEN excluded.decision <> 'none' AND (results.decision = 'none'
                                           OR excluded.decided_at > results.decided_at)
                                      THEN excluded.decided_at ELSE results.decided_at END
                             WHEN excluded.scored_at > results.scored_at THEN excluded.decided_at
                             ELSE results.decided_at END",
                )
                .map_err(sql)?;
            let mut ids = std::collections::HashMap::new();
            for row in rows {
                let id: i64 = match ids.get(&row.model_identity) {
                    Some(id) => *id,
                    None => {
                        let id = model
                            .query_row(params![row.model, row.model_identity], |r| r.get(0))
                            .map_err(sql)?;
                        ids.insert(row.model_identity.clone(), id);
                        id
                    }
                };
                insert
                    .execute(params![
                        path_text(&row.path),
                        row.content_hash,
                        id,
                        f64::from(row.score),
                        f64::from(row.raw_score),
                        f64::from(row.threshold),
                        row.verdict.as_str(),
                        row.decision.as_str(),
                        row.decided_at,
                        row.scored_at,
                        defects_json(&path, &row.defects)?,
                    ])
                    .map_err(sql)?;
            }
        }
        tx.commit().map_err(sql)
    }

    /// Leaves WAL mode, so the file holds everything by itself (before it
    /// is renamed into place).
    pub(crate) fn into_single_file(self) -> Result<(), StoreError> {
        let _: String = self
            .conn
            .pragma_update_and_check(None, "journal_mode", "DELETE", |row| row.get(0))
            .map_err(|e| self.err(e))?;
        let path = self.path.clone();
        self.conn
            .close()
            .map_err(|(_, cause)| classify(&path, cause))
    }

    /// A stored setting.
    pub fn setting(&self, key: &str) -> Result<Option<String>, StoreError> {
        self.conn
            .query_row(
                "SELECT value FROM settings WHERE key = ?1",
                params![key],
                |row| row.get(0),
            )
            .optional()
            .map_err(|e| self.err(e))
    }

    pub fn set_setting(&self, key: &str, value: &str) -> Result<(), StoreError> {
        self.conn
            .execute(
                "INSERT INTO settings (key, value) VALUES (?1, ?2)
                 ON CONFLICT (key) DO UPDATE SET value = excluded.value",
                params![key, value],
            )
            .map_err(|e| self.err(e))?;
        Ok(())
    }

    /// The threshold a person chose in the TUI, if one was ever set.
    pub fn person_threshold(&self) -> Result<Option<f32>, StoreError> {
        let Some(text) = self.setting(PERSON_THRESHOLD_SETTING)? else {
            return Ok(None);
        };
        match text.parse::<f32>() {
            Ok(threshold) if (0.0..=1.0).contains(&threshold) => Ok(Some(threshold)),
            _ => Err(StoreError::BadValue {
                path: self.path.clone(),
                field: "person threshold",
                value: text,
            }),
        }
    }

    /// Remembers the threshold a person chose (0–1).
    pub fn set_person_threshold(&self, threshold: f32) -> Result<(), StoreError> {
        if !(0.0..=1.0).contains(&threshold) {
            return Err(StoreError::BadThreshold(threshold));
        }
        self.set_setting(PERSON_THRESHOLD_SETTING, &threshold.to_string())
    }
}

/// A row as SQLite returns it, checked by [`RawRow::into_result`].
struct RawRow {
    path: String,
    content_hash: String,
    model: String,
    model_identity: String,
    score: f64,
    raw_score: f64,
    threshold: f64,
    verdict: String,
    decision: String,
    decided_at: Option<String>,
    scored_at: String,
    defects: Option<String>,
}

impl RawRow {
    fn read(row: &rusqlite::Row<'_>) -> rusqlite::Result<Self> {
        Ok(Self {
            path: row.get(0)?,
            content_hash: row.get(1)?,
            model: row.get(2)?,
            model_identity: row.get(3)?,
            score: row.get(4)?,
            raw_score: row.get(5)?,
            threshold: row.get(6)?,
            verdict: row.get(7)?,
            decision: row.get(8)?,
            decided_at: row.get(9)?,
            scored_at: row.get(10)?,
            defects: row.get(11)?,
        })
    }

    fn into_result(self, db: &Path) -> Result<StoredResult, StoreError> {
        let verdict = Verdict::parse(&self.verdict).ok_or_else(|| StoreError::BadValue {
            path: db.to_path_buf(),
            field: "verdict",
            value: self.verdict.clone(),
        })?;
        let defects = match &self.defects {
            None => Vec::new(),
            Some(text) => serde_json::from_str(text).map_err(|_| StoreError::BadValue {
                path: db.to_path_buf(),
                field: "defects",
                value: text.chars().take(200).collect(),
            })?,
        };
        Ok(StoredResult {
            defects,
            path: PathBuf::from(self.path),
            content_hash: self.content_hash,
            model: self.model,
            model_identity: self.model_identity,
            score: self.score as f32,
            raw_score: self.raw_score as f32,
            threshold: self.threshold as f32,
            verdict,
            decision: parse_decision(db, &self.decision)?,
            decided_at: self.decided_at,
            scored_at: self.scored_at,
        })
    }
}

fn parse_decision(db: &Path, text: &str) -> Result<Decision, StoreError> {
    Decision::parse(text).ok_or_else(|| StoreError::BadValue {
        path: db.to_path_buf(),
        field: "decision",
        value: text.to_string(),
    })
}

/// Maps SQLite's "not a database" and "corrupt" codes to
/// [`StoreError::Corrupt`].
fn classify(path: &Path, cause: rusqlite::Error) -> StoreError {
    match cause.sqlite_error_code() {
        Some(ErrorCode::NotADatabase | ErrorCode::DatabaseCorrupt) => StoreError::Corrupt {
            path: path.to_path_buf(),
            detail: cause.to_string(),
        },
        _ => StoreError::Sqlite {
            path: path.to_path_buf(),
            cause,
        },
    }
}

/// What an existing database holds, as far as opening it is concerned.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Found {
    /// No schema and no marks: ours to initialise.
    Empty,
    /// Marked with [`APPLICATION_ID`], at this schema version.
    Ours(i64),
    /// Not marked, but exactly the schema of this version: written by a
    /// flawscope from before the mark.
    Unstamped(i64),
}

/// Looks at the file at `path` without changing a byte of it (nor creating
/// `-wal` / `-shm` files beside it) and says whether it may be opened.
fn inspect_file(path: &Path) -> Result<Found, StoreError> {
    let metadata = match std::fs::metadata(path) {
        Ok(metadata) => metadata,
        Err(err) if err.kind() == std::io::ErrorKind::NotFound => return Ok(Found::Empty),
        Err(cause) => {
            return Err(StoreError::Io {
                path: path.to_path_buf(),
                cause,
            });
        }
    };
    let corrupt = |detail: &str| StoreError::Corrupt {
        path: path.to_path_buf(),
        detail: detail.to_string(),
    };
    if !metadata.is_file() {
        return Err(corrupt("not a regular file"));
    }
    if metadata.len() == 0 {
        return Ok(Found::Empty);
    }
    let mut header = [0u8; 100];
    std::fs::File::open(path)
        .and_then(|mut file| file.read_exact(&mut header))
        .map_err(|cause| match cause.kind() {
            std::io::ErrorKind::UnexpectedEof => corrupt("file is not a database"),
            _ => StoreError::Io {
                path: path.to_path_buf(),
                cause,
            },
        })?;
    if &header[..16] != SQLITE_MAGIC {
        return Err(corrupt("file is not a database"));
    }
    // A read-only connection to a WAL-mode file creates `-wal` and `-shm`
    // files and leaves them; without a `-wal` file the main file holds
    // everything, so it is read as immutable (no locks, no side files).
    let wal_mode = header[18] == 2 || header[19] == 2;
    let immutable = wal_mode && !side_file(path, "-wal").exists();
    let flags = rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY
        | rusqlite::OpenFlags::SQLITE_OPEN_URI
        | rusqlite::OpenFlags::SQLITE_OPEN_NO_MUTEX;
    let sql = |e| classify(path, e);
    let conn = Connection::open_with_flags(file_uri(path, immutable), flags).map_err(sql)?;
    conn.busy_timeout(BUSY_TIMEOUT).map_err(sql)?;
    let found = inspect(&conn, path)?;
    if found != Found::Empty {
        check_integrity(&conn, path)?;
    }
    Ok(found)
}

/// Classifies the database open on `conn`; only reads.
fn inspect(conn: &Connection, path: &Path) -> Result<Found, StoreError> {
    let sql = |e| classify(path, e);
    let application_id: i32 = conn
        .pragma_query_value(None, "application_id", |row| row.get(0))
        .map_err(sql)?;
    let version: i64 = conn
        .pragma_query_value(None, "user_version", |row| row.get(0))
        .map_err(sql)?;
    let layout = schema_layout(conn).map_err(sql)?;
    let supported = MIGRATIONS.len() as i64;
    if application_id == APPLICATION_ID {
        if version > supported {
            return Err(StoreError::TooNew {
                path: path.to_path_buf(),
                found: version,
                supported,
            });
        }
        if version < 0 {
            return Err(StoreError::Corrupt {
                path: path.to_path_buf(),
                detail: format!("schema version {version}"),
            });
        }
        return Ok(Found::Ours(version));
    }
    if application_id == 0 {
        if layout.is_empty() && version == 0 {
            return Ok(Found::Empty);
        }
        if (1..=supported).contains(&version)
            && layout == schema_of_version(version).map_err(sql)?
        {
            return Ok(Found::Unstamped(version));
        }
    }
    let tables: Vec<&str> = layout
        .iter()
        .filter_map(|entry| entry.strip_prefix("table "))
        .collect();
    let contents = if tables.is_empty() {
        format!("no tables, user_version {version}")
    } else {
        format!("tables: {}", tables.join(", "))
    };
    Err(StoreError::Foreign {
        path: path.to_path_buf(),
        // The id is a 32-bit tag: shown as its bits.
        application_id: application_id as u32,
        contents,
    })
}

/// The database's schema as sorted lines: `table T`, `column T.C TYPE`,
/// `index I ON T`, `view V`, `trigger R` (SQLite's own objects left out).
fn schema_layout(conn: &Connection) -> rusqlite::Result<Vec<String>> {
    let mut layout = Vec::new();
    let mut objects = conn.prepare(
        "SELECT type, name, tbl_name FROM sqlite_master
         WHERE name NOT LIKE 'sqlite\\_%' ESCAPE '\\' ORDER BY type, name",
    )?;
    let mut rows = objects.query([])?;
    while let Some(row) = rows.next()? {
        let (kind, name, table): (String, String, String) = (row.get(0)?, row.get(1)?, row.get(2)?);
        match kind.as_str() {
            "table" => layout.push(format!("table {name}")),
            "index" => layout.push(format!("index {name} ON {table}")),
            _ => layout.push(format!("{kind} {name}")),
        }
    }
    let mut columns = conn.prepare(
        "SELECT m.name, c.name, c.type, c.\"notnull\", c.pk
         FROM sqlite_master m, pragma_table_info(m.name) c
         WHERE m.type = 'table' AND m.name NOT LIKE 'sqlite\\_%' ESCAPE '\\'",
    )?;
    let mut rows = columns.query([])?;
    while let Some(row) = rows.next()? {
        let (table, column, kind, not_null, pk): (String, String, String, bool, i64) = (
            row.get(0)?,
            row.get(1)?,
            row.get(2)?,
            row.get(3)?,
            row.get(4)?,
        );
        layout.push(format!(
            "column {table}.{column} {kind} not_null={not_null} pk={pk}"
        ));
    }
    layout.sort();
    Ok(layout)
}

/// The layout [`MIGRATIONS`] up to `version` create, built in memory.
fn schema_of_version(version: i64) -> rusqlite::Result<Vec<String>> {
    let conn = Connection::open_in_memory()?;
    for migration in MIGRATIONS.iter().take(version.max(0) as usize) {
        conn.execute_batch(migration)?;
    }
    schema_layout(&conn)
}

fn check_integrity(conn: &Connection, path: &Path) -> Result<(), StoreError> {
    let mut problems = Vec::new();
    conn.pragma_query(None, "quick_check", |row| {
        problems.push(row.get::<_, String>(0)?);
        Ok(())
    })
    .map_err(|e| classify(path, e))?;
    if problems.len() == 1 && problems[0] == "ok" {
        return Ok(());
    }
    Err(StoreError::Corrupt {
        path: path.to_path_buf(),
        detail: problems.into_iter().take(3).collect::<Vec<_>>().join("; "),
    })
}

/// `path` with `suffix` appended to its file name (SQLite's side files).
fn side_file(path: &Path, suffix: &str) -> PathBuf {
    let mut name = path.as_os_str().to_os_string();
    name.push(suffix);
    PathBuf::from(name)
}

/// A read-only `file:` URI for `path`, every byte outside the unreserved
/// set percent-encoded (SQLite decodes them back to the same bytes).
fn file_uri(path: &Path, immutable: bool) -> String {
    use std::fmt::Write;
    let absolute = std::path::absolute(path).unwrap_or_else(|_| path.to_path_buf());
    let mut uri = String::from("file:");
    if !absolute.as_os_str().as_encoded_bytes().starts_with(b"/") {
        uri.push('/');
    }
    for &byte in absolute.as_os_str().as_encoded_bytes() {
        if byte.is_ascii_alphanumeric() || b"/-._~".contains(&byte) {
            uri.push(char::from(byte));
        } else {
            // Writing to a String cannot fail.
            let _ = write!(uri, "%{byte:02X}");
        }
    }
    uri.push_str("?mode=ro");
    if immutable {
        uri.push_str("&immutable=1");
    }
    uri
}

/// Paths are stored as text; a non-UTF-8 path is stored lossily.
fn path_text(path: &Path) -> String {
    path.to_string_lossy().into_owned()
}

/// `sha256:<hex>` of bytes.
pub fn content_hash(bytes: &[u8]) -> String {
    hex_digest(Sha256::digest(bytes).as_slice())
}

/// `sha256:<hex>` of a file, read in chunks (model files can be large).
pub fn file_hash(path: &Path) -> Result<String, StoreError> {
    let io = |cause| StoreError::Io {
        path: path.to_path_buf(),
        cause,
    };
    let mut file = std::fs::File::open(path).map_err(io)?;
    let mut hasher = Sha256::new();
    let mut buffer = vec![0u8; 1 << 20];
    loop {
        let n = file.read(&mut buffer).map_err(io)?;
        if n == 0 {
            break;
        }
        hasher.update(&buffer[..n]);
    }
    Ok(hex_digest(hasher.finalize().as_slice()))
}

fn hex_digest(digest: &[u8]) -> String {
    use std::fmt::Write;
    let mut out = String::with_capacity(7 + digest.len() * 2);
    out.push_str("sha256:");
    for byte in digest {
        // Writing to a String cannot fail.
        let _ = write!(out, "{byte:02x}");
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn score<'a>(path: &'a Path, hash: &'a str, score: f32) -> NewScore<'a> {
        NewScore {
            path,
            content_hash: hash,
            score,
            raw_score: score * 10.0,
            threshold: 0.5,
            defects: &[],
        }
    }

    #[test]
    fn fresh_file_gets_the_latest_schema_in_wal_mode() {
        let tmp = tempfile::tempdir().unwrap();
        let db = tmp.path().join("r.sqlite");
        let store = Store::open(&db).unwrap();
        assert_eq!(store.schema_version().unwrap(), MIGRATIONS.len() as i64);
        let mode: String = store
            .conn
            .pragma_query_value(None, "journal_mode", |r| r.get(0))
            .unwrap();
        assert_eq!(mode, "wal");
        drop(store);
        // Reopening migrates nothing and keeps the version.
        assert_eq!(
            Store::open(&db).unwrap().schema_version().unwrap(),
            MIGRATIONS.len() as i64
        );
    }

    /// A file written before typed defects were stored (schema 1) keeps its
    /// rows and gains the column when opened.
    #[test]
    fn a_version_1_file_is_migrated_with_its_rows() {
        let tmp = tempfile::tempdir().unwrap();
        let db = tmp.path().join("r.sqlite");
        let conn = Connection::open(&db).unwrap();
        conn.pragma_update(None, "application_id", APPLICATION_ID)
            .unwrap();
        conn.execute_batch(MIGRATIONS[0]).unwrap();
        conn.pragma_update(None, "user_version", 1).unwrap();
        conn.execute_batch(
            "INSERT INTO models (id, name, identity) VALUES (1, 'm', 'sha256:m');
             INSERT INTO results (path, content_hash, model_id, score, raw_score, threshold,
                                  verdict, scored_at)
             VALUES ('/a.png', 'h', 1, 0.7, 7.0, 0.5, 'anomalous', '2026-01-01T00:00:00.000Z');",
        )
        .unwrap();
        drop(conn);
        let store = Store::open(&db).unwrap();
        assert_eq!(store.schema_version().unwrap(), MIGRATIONS.len() as i64);
        let rows = store.all_results().unwrap();
        assert_eq!(rows.len(), 1);
        assert_eq!(rows[0].verdict, Verdict::Anomalous);
        assert!(rows[0].defects.is_empty());
    }

    #[test]
    fn newer_schema_is_refused() {
        let tmp = tempfile::tempdir().unwrap();
        let db = tmp.path().join("r.sqlite");
        drop(Store::open(&db).unwrap());
        let conn = Connection::open(&db).unwrap();
        conn.pragma_update(None, "user_version", 99).unwrap();
        drop(conn);
        let err = Store::open(&db).unwrap_err();
        assert!(matches!(err, StoreError::TooNew { found: 99, .. }), "{err}");
    }

    #[test]
    fn scores_decisions_and_rescoring() {
        let tmp = tempfile::tempdir().unwrap();
        let store = Store::open(&tmp.path().join("r.sqlite")).unwrap();
        let a = store.model("a.flawscope", "sha256:aa").unwrap();
        let b = store.model("b.flawscope", "sha256:bb").unwrap();
        assert_eq!(store.model("renamed", "sha256:aa").unwrap().id, a.id);
        let img = Path::new("/x/1.png");

        let row = store.record_score(&a, &score(img, "h1", 0.7)).unwrap();
        assert_eq!(
            (row.verdict, row.decision),
            (Verdict::Anomalous, Decision::None)
        );
        assert_eq!(store.set_decision(img, "h1", Decision::Ng).unwrap(), 1);
        // Another model inherits the decision on the same content.
        let row_b = store.record_score(&b, &score(img, "h1", 0.2)).unwrap();
        assert_eq!((row_b.verdict, row_b.decision), (Verdict::Ok, Decision::Ng));
        assert!(row_b.decided_at.is_some());
        // Rescoring unchanged content keeps the decision ...
        let again = store.record_score(&a, &score(img, "h1", 0.8)).unwrap();
        assert_eq!(again.decision, Decision::Ng);
        // ... changed content resets it.
        let changed = store.record_score(&a, &score(img, "h2", 0.1)).unwrap();
        assert_eq!(
            (changed.decision, changed.decided_at),
            (Decision::None, None)
        );
        let found = store.lookup(&a, img).unwrap().unwrap();
        assert_eq!(found.content_hash, "h2");
        assert_eq!(found.model, "renamed");
        assert_eq!(store.results_for_model(&b).unwrap().len(), 1);
        assert_eq!(store.all_results().unwrap().len(), 2);
        // Undoing to none clears the time.
        store.set_decision(img, "h1", Decision::None).unwrap();
        let b_row = store.lookup(&b, img).unwrap().unwrap();
        assert_eq!((b_row.decision, b_row.decided_at), (Decision::None, None));
    }

    #[test]
    fn settings_round_trip() {
        let tmp = tempfile::tempdir().unwrap();
        let store = Store::open(&tmp.path().join("r.sqlite")).unwrap();
        assert_eq!(store.setting("threshold").unwrap(), None);
        store.set_setting("threshold", "0.42").unwrap();
        store.set_setting("threshold", "0.43").unwrap();
        assert_eq!(store.setting("threshold").unwrap().as_deref(), Some("0.43"));
    }

    #[test]
    fn hashes_are_tagged_sha256() {
        let h = content_hash(b"abc");
        assert_eq!(
            h,
            "sha256:ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
        let tmp = tempfile::tempdir().unwrap();
        let f = tmp.path().join("f");
        std::fs::write(&f, b"abc").unwrap();
        assert_eq!(file_hash(&f).unwrap(), h);
        assert!(matches!(
            file_hash(&tmp.path().join("missing")),
            Err(StoreError::Io { .. })
        ));
    }

    #[test]
    fn missing_file_is_an_error_for_open_existing() {
        let tmp = tempfile::tempdir().unwrap();
        assert!(matches!(
            Store::open_existing(&tmp.path().join("none.sqlite")),
            Err(StoreError::Missing(_))
        ));
    }
}
