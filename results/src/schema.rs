//! The file format of a results database and how a file is brought to it:
//! the versioned schema ([`MIGRATIONS`], counted by `PRAGMA user_version`),
//! the mark that says the file is flawscope's ([`APPLICATION_ID`]), the
//! connection settings a store runs with (WAL), and the schema's layout as
//! compared when a file is recognised.

use std::path::Path;
use std::time::Duration;

use rusqlite::Connection;

use crate::error::{StoreError, classify};

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
    // 3: the whole answer core gave for the image (`Inspection`, JSON), so
    // a stored row shows what a fresh one does; NULL in older rows.
    "ALTER TABLE results ADD COLUMN inspection TEXT;",
    // 4: `flawscope watch`'s outbox: every result it made (failed ones too),
    // keyed by its idempotency key, and which sink acknowledged which.
    "CREATE TABLE outbox (
        id INTEGER PRIMARY KEY,
        key TEXT NOT NULL UNIQUE,
        path TEXT NOT NULL,
        content_hash TEXT NOT NULL,
        model_id INTEGER NOT NULL REFERENCES models(id),
        failed INTEGER NOT NULL CHECK (failed IN (0, 1)),
        payload TEXT NOT NULL,
        created_at TEXT NOT NULL
    );
    CREATE TABLE deliveries (
        outbox_id INTEGER NOT NULL REFERENCES outbox(id),
        sink TEXT NOT NULL,
        outcome TEXT NOT NULL CHECK (outcome IN ('delivered', 'rejected')),
        detail TEXT,
        at TEXT NOT NULL,
        PRIMARY KEY (outbox_id, sink)
    );",
];

/// `PRAGMA application_id` of a results database: the bytes "FLWS".
pub const APPLICATION_ID: i32 = i32::from_be_bytes(*b"FLWS");

/// The first bytes of every SQLite database file.
pub(crate) const SQLITE_MAGIC: &[u8; 16] = b"SQLite format 3\0";

/// How long a connection waits for another's write lock before failing.
pub(crate) const BUSY_TIMEOUT: Duration = Duration::from_secs(10);

/// Stamps the database open on `conn` with [`APPLICATION_ID`] and applies
/// [`MIGRATIONS`] from schema version `from` to the latest, each step
/// followed by its `user_version`. Run inside the caller's transaction.
pub(crate) fn migrate(conn: &Connection, from: i64) -> rusqlite::Result<()> {
    conn.pragma_update(None, "application_id", APPLICATION_ID)?;
    for (step, migration) in MIGRATIONS.iter().enumerate().skip(from as usize) {
        conn.execute_batch(migration)?;
        conn.pragma_update(None, "user_version", step as i64 + 1)?;
    }
    Ok(())
}

/// Switches the database at `path`, open on `conn`, to WAL mode and sets
/// the pragmas a store writes with. Only for a file known to be ours:
/// switching to WAL rewrites its header.
pub(crate) fn use_wal(conn: &Connection, path: &Path) -> Result<(), StoreError> {
    let sql = |e| classify(path, e);
    // Switching to WAL needs the file to itself, and SQLite answers "busy"
    // at once instead of calling the busy handler when another connection
    // holds it (processes opening one fresh file together), so retry here
    // for as long as the busy timeout would have waited.
    let started = std::time::Instant::now();
    let mode: String = loop {
        match conn.pragma_update_and_check(None, "journal_mode", "WAL", |row| row.get(0)) {
            Err(rusqlite::Error::SqliteFailure(e, _))
                if e.code == rusqlite::ErrorCode::DatabaseBusy
                    && started.elapsed() < BUSY_TIMEOUT =>
            {
                std::thread::sleep(Duration::from_millis(5));
            }
            other => break other.map_err(sql)?,
        }
    };
    if !mode.eq_ignore_ascii_case("wal") {
        return Err(StoreError::Corrupt {
            path: path.to_path_buf(),
            detail: format!("cannot switch to WAL mode (journal mode is {mode})"),
        });
    }
    // In WAL mode NORMAL keeps every committed row across a crash of the
    // program; only a power cut can lose the last commits.
    conn.pragma_update(None, "synchronous", "NORMAL")
        .map_err(sql)?;
    conn.pragma_update(None, "foreign_keys", "ON")
        .map_err(sql)?;
    Ok(())
}

/// The database's schema as sorted lines: `table T`, `column T.C TYPE`,
/// `index I ON T`, `view V`, `trigger R` (SQLite's own objects left out).
pub(crate) fn schema_layout(conn: &Connection) -> rusqlite::Result<Vec<String>> {
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
pub(crate) fn schema_of_version(version: i64) -> rusqlite::Result<Vec<String>> {
    let conn = Connection::open_in_memory()?;
    for migration in MIGRATIONS.iter().take(version.max(0) as usize) {
        conn.execute_batch(migration)?;
    }
    schema_layout(&conn)
}
