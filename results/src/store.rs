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
//!   applied in order inside transactions ([`crate::schema`]).
//! - Before anything is written, an existing file is read without changing
//!   it (`foreign.rs`): only an empty database, one of ours, or one written
//!   before the mark existed (recognised by its exact schema) is opened.
//!   Another application's database is [`StoreError::Foreign`], a file that
//!   is not a database or a damaged one [`StoreError::Corrupt`]; both leave
//!   the file as it was, and neither is a panic.
//!
//! A row is keyed by `(path, model)`. The model is identified by the SHA-256
//! of its file, so a copied or renamed model file is the same model. A
//! decision belongs to the image (path + content hash), whatever model scored
//! it: it is written to every row of that image, and a new model's row for an
//! unchanged image starts with the decision already made.
//!
//! This module holds the [`Store`] and the SQL that reads and writes its
//! rows. The row types ([`crate::rows`]), [`StoreError`] ([`crate::error`]),
//! the schema and the hashes ([`crate::hash`]) live in their own modules and
//! are re-exported here, so `flawscope_results::store::…` keeps naming them.

use std::path::{Path, PathBuf};

use flawscope_core::prompt_layer::DefectCheck;
use rusqlite::{Connection, OptionalExtension, TransactionBehavior, params};

use crate::error::classify;
use crate::foreign::{Found, inspect, inspect_file};
use crate::schema::{self, BUSY_TIMEOUT};

pub use crate::error::StoreError;
pub use crate::hash::{content_hash, file_hash};
pub use crate::rows::{
    Decision, ModelRef, NewScore, StoredResult, Verdict, flagged_by, layered_model, layered_verdict,
};
pub use crate::schema::{APPLICATION_ID, MIGRATIONS};

/// The store setting holding the threshold a person chose in the TUI
/// (`+` / `-`).
pub const PERSON_THRESHOLD_SETTING: &str = "tui.threshold";

/// UTC time with milliseconds, as SQLite writes it.
pub(crate) const NOW: &str = "strftime('%Y-%m-%dT%H:%M:%fZ', 'now')";

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
    pub(crate) conn: Connection,
    path: PathBuf,
}

const SELECT_RESULTS: &str =
    "SELECT r.path, r.content_hash, m.name, m.identity, r.score, r.raw_score,
        r.threshold, r.verdict, r.decision, r.decided_at, r.scored_at, r.defects, r.inspection
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
        // Only now is the file known to be ours.
        schema::use_wal(&store.conn, &store.path)?;
        Ok(store)
    }

    /// Opens an existing database; a missing file is [`StoreError::Missing`].
    pub fn open_existing(path: &Path) -> Result<Self, StoreError> {
        if !path.is_file() {
            return Err(StoreError::Missing(path.to_path_buf()));
        }
        Self::open(path)
    }

    pub(crate) fn err(&self, cause: rusqlite::Error) -> StoreError {
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
        schema::migrate(&tx, from).map_err(sql)?;
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
                                  verdict, decision, decided_at, scored_at, defects, inspection)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7,
                 COALESCE((SELECT decision FROM results WHERE path = ?1 AND content_hash = ?2
                           AND decision <> 'none' ORDER BY decided_at DESC LIMIT 1), 'none'),
                 (SELECT decided_at FROM results WHERE path = ?1 AND content_hash = ?2
                  AND decision <> 'none' ORDER BY decided_at DESC LIMIT 1),
                 {NOW}, ?8, ?9)
             ON CONFLICT (path, model_id) DO UPDATE SET
                 score = excluded.score,
                 defects = excluded.defects,
                 inspection = excluded.inspection,
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
                    score.inspection,
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
            inspection: score.inspection.map(str::to_owned),
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
                                          verdict, decision, decided_at, scored_at, defects, inspection)
                     VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12)
                     ON CONFLICT (path, model_id) DO UPDATE SET
                         defects = CASE WHEN excluded.scored_at > results.scored_at
                                        THEN excluded.defects ELSE results.defects END,
                         inspection = CASE WHEN excluded.scored_at > results.scored_at
                                       THEN excluded.inspection ELSE results.inspection END,
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
                        row.inspection,
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
    inspection: Option<String>,
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
            inspection: row.get(12)?,
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
            inspection: self.inspection,
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

/// Paths are stored as text; a non-UTF-8 path is stored lossily.
pub(crate) fn path_text(path: &Path) -> String {
    path.to_string_lossy().into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn score<'a>(path: &'a Path, hash: &'a str, score: f32) -> NewScore<'a> {
        NewScore {
            inspection: None,
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
    fn missing_file_is_an_error_for_open_existing() {
        let tmp = tempfile::tempdir().unwrap();
        assert!(matches!(
            Store::open_existing(&tmp.path().join("none.sqlite")),
            Err(StoreError::Missing(_))
        ));
    }
}
