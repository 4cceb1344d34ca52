//! `Store::open` on files it did not write: another application's database
//! is refused without a byte changed; empty files, fresh paths and
//! databases of the previous (unmarked) format are taken.
#![allow(clippy::unwrap_used)]

use std::path::{Path, PathBuf};

use flawscope_results::error::StoreError;
use flawscope_results::rows::{Decision, NewScore};
use flawscope_results::schema::{APPLICATION_ID, MIGRATIONS};
use flawscope_results::store::Store;
use rusqlite::Connection;

/// The file's bytes and every name in its folder.
fn snapshot(db: &Path) -> (Vec<u8>, Vec<String>) {
    let mut names: Vec<String> = std::fs::read_dir(db.parent().unwrap())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    (std::fs::read(db).unwrap(), names)
}

/// Opens `db`, expects [`StoreError::Foreign`] naming it, and checks that
/// neither the file nor its folder changed.
fn assert_refused_unchanged(db: &Path) -> String {
    let before = snapshot(db);
    let err = Store::open(db).unwrap_err();
    let message = err.to_string();
    assert!(matches!(err, StoreError::Foreign { .. }), "{err:?}");
    assert!(
        message.contains(&db.display().to_string())
            && message.contains("is not a flawscope results database (application_id"),
        "{message}"
    );
    let after = snapshot(db);
    assert_eq!(after.1, before.1, "files beside the database changed");
    assert!(after.0 == before.0, "the database's bytes changed");
    // Refused again the same way (nothing was half-done the first time).
    assert!(matches!(Store::open(db), Err(StoreError::Foreign { .. })));
    assert_eq!(snapshot(db), before);
    message
}

fn foreign(dir: &Path, name: &str, sql: &str, wal: bool) -> PathBuf {
    let db = dir.join(name);
    let conn = Connection::open(&db).unwrap();
    if wal {
        let _: String = conn
            .pragma_update_and_check(None, "journal_mode", "WAL", |r| r.get(0))
            .unwrap();
    }
    conn.execute_batch(sql).unwrap();
    drop(conn);
    assert!(!dir.join(format!("{name}-wal")).exists());
    db
}

fn application_id(db: &Path) -> i32 {
    Connection::open(db)
        .unwrap()
        .pragma_query_value(None, "application_id", |r| r.get(0))
        .unwrap()
}

#[test]
fn a_database_with_an_unrelated_table_is_refused_unchanged() {
    let tmp = tempfile::tempdir().unwrap();
    let db = foreign(
        tmp.path(),
        "invoices.db",
        "CREATE TABLE invoices (id INTEGER PRIMARY KEY, total REAL);
         INSERT INTO invoices (total) VALUES (12.5), (99.0);",
        false,
    );
    let message = assert_refused_unchanged(&db);
    assert!(message.contains("tables: invoices"), "{message}");
}

#[test]
fn a_database_with_its_own_results_table_is_refused_unchanged() {
    let tmp = tempfile::tempdir().unwrap();
    let db = foreign(
        tmp.path(),
        "lab.db",
        "CREATE TABLE results (sample TEXT, value REAL);
         INSERT INTO results VALUES ('a', 1.0);",
        false,
    );
    let message = assert_refused_unchanged(&db);
    assert!(!message.contains("CREATE TABLE"), "{message}");
}

#[test]
fn a_wal_mode_database_is_read_without_leaving_side_files() {
    let tmp = tempfile::tempdir().unwrap();
    let db = foreign(
        tmp.path(),
        "app.db",
        "CREATE TABLE notes (body TEXT); INSERT INTO notes VALUES ('hello');",
        true,
    );
    assert_refused_unchanged(&db);
}

#[test]
fn another_applications_id_or_a_bare_version_is_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let marked = foreign(
        tmp.path(),
        "marked.db",
        "PRAGMA application_id = 42;",
        false,
    );
    let message = assert_refused_unchanged(&marked);
    assert!(message.contains("0x0000002a"), "{message}");
    let versioned = foreign(
        tmp.path(),
        "versioned.db",
        "PRAGMA user_version = 3;",
        false,
    );
    assert_refused_unchanged(&versioned);
}

/// A results database as the previous flawscope left it: no application
/// id, the version-1 schema, WAL mode.
fn previous_format(db: &Path) {
    let conn = Connection::open(db).unwrap();
    let _: String = conn
        .pragma_update_and_check(None, "journal_mode", "WAL", |r| r.get(0))
        .unwrap();
    conn.execute_batch(MIGRATIONS[0]).unwrap();
    conn.pragma_update(None, "user_version", 1).unwrap();
    conn.execute_batch(
        "INSERT INTO models (name, identity) VALUES ('old.flawscope', 'sha256:old');
         INSERT INTO results (path, content_hash, model_id, score, raw_score, threshold,
                              verdict, decision, decided_at, scored_at)
         VALUES ('/img/a.png', 'sha256:a', 1, 0.7, 7.0, 0.5, 'anomalous', 'ng',
                 '2025-01-01T00:00:00.000Z', '2025-01-01T00:00:00.000Z');
         INSERT INTO settings (key, value) VALUES ('tui.threshold', '0.6');",
    )
    .unwrap();
}

#[test]
fn a_database_of_the_previous_format_is_taken_and_marked() {
    let tmp = tempfile::tempdir().unwrap();
    let db = tmp.path().join("old.sqlite");
    previous_format(&db);
    assert_eq!(application_id(&db), 0);

    let store = Store::open(&db).unwrap();
    let rows = store.all_results().unwrap();
    assert_eq!(rows.len(), 1);
    assert_eq!(rows[0].decision, Decision::Ng);
    assert_eq!(store.person_threshold().unwrap(), Some(0.6));
    assert_eq!(store.schema_version().unwrap(), MIGRATIONS.len() as i64);
    drop(store);
    assert_eq!(application_id(&db), APPLICATION_ID);
}

#[test]
fn the_previous_format_with_an_extra_table_is_not_taken() {
    let tmp = tempfile::tempdir().unwrap();
    let db = tmp.path().join("old.sqlite");
    previous_format(&db);
    Connection::open(&db)
        .unwrap()
        .execute_batch("CREATE TABLE extra (x)")
        .unwrap();
    assert_refused_unchanged(&db);
}

#[test]
fn a_fresh_path_and_an_empty_file_are_created_marked() {
    let tmp = tempfile::tempdir().unwrap();
    let fresh = tmp.path().join("fresh.sqlite");
    let empty = tmp.path().join("empty.sqlite");
    std::fs::write(&empty, b"").unwrap();
    for db in [&fresh, &empty] {
        let store = Store::open(db).unwrap();
        assert_eq!(store.schema_version().unwrap(), MIGRATIONS.len() as i64);
        drop(store);
        assert_eq!(application_id(db), APPLICATION_ID);
        // The file header says so too (bytes 68..72, big-endian).
        let bytes = std::fs::read(db).unwrap();
        assert_eq!(&bytes[68..72], b"FLWS");
        Store::open(db).unwrap();
    }
}

#[test]
fn a_newer_results_database_is_refused_unchanged() {
    let tmp = tempfile::tempdir().unwrap();
    let db = tmp.path().join("new.sqlite");
    drop(Store::open(&db).unwrap());
    Connection::open(&db)
        .unwrap()
        .pragma_update(None, "user_version", 99)
        .unwrap();
    let before = snapshot(&db);
    let err = Store::open(&db).unwrap_err();
    assert!(matches!(err, StoreError::TooNew { found: 99, .. }), "{err}");
    assert_eq!(snapshot(&db), before);
}

#[test]
fn processes_opening_one_fresh_path_at_once_all_succeed() {
    let tmp = tempfile::tempdir().unwrap();
    let db = tmp.path().join("shared.sqlite");
    std::thread::scope(|scope| {
        let openers: Vec<_> = (0..6)
            .map(|i| {
                let db = &db;
                scope.spawn(move || {
                    let store = Store::open(db)?;
                    let model = store.model("m", "sha256:m")?;
                    let path = PathBuf::from(format!("/img/{i}.png"));
                    store.record_score(
                        &model,
                        &NewScore {
                            inspection: None,
                            path: &path,
                            content_hash: "h",
                            score: 0.5,
                            raw_score: 1.0,
                            threshold: 0.5,
                            defects: &[],
                        },
                    )?;
                    Ok::<_, StoreError>(())
                })
            })
            .collect();
        for opener in openers {
            opener.join().unwrap().unwrap();
        }
    });
    assert_eq!(Store::open(&db).unwrap().all_results().unwrap().len(), 6);
}
