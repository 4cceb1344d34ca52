//! [`StoreError`]: every way opening, reading or writing a results database
//! fails, and `classify`, which sorts SQLite's errors into them (a file
//! that is not a database, or a damaged one, is [`StoreError::Corrupt`]).

use std::path::{Path, PathBuf};

use rusqlite::ErrorCode;

/// Why the store could not open, read or write a results database.
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

/// Maps SQLite's "not a database" and "corrupt" codes to
/// [`StoreError::Corrupt`].
pub(crate) fn classify(path: &Path, cause: rusqlite::Error) -> StoreError {
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
