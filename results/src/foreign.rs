//! Recognising a file before anything is written to it: only an empty
//! database, one of ours, or one written before the mark existed
//! (recognised by its exact schema) may be opened. Another application's
//! database is [`StoreError::Foreign`], a file that is not a database or a
//! damaged one [`StoreError::Corrupt`], one from a newer flawscope
//! [`StoreError::TooNew`]; every check here only reads, and leaves no side
//! file behind.

use std::io::Read;
use std::path::{Path, PathBuf};

use rusqlite::Connection;

use crate::error::{StoreError, classify};
use crate::schema::{
    APPLICATION_ID, BUSY_TIMEOUT, MIGRATIONS, SQLITE_MAGIC, schema_layout, schema_of_version,
};

/// What an existing database holds, as far as opening it is concerned.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Found {
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
pub(crate) fn inspect_file(path: &Path) -> Result<Found, StoreError> {
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
pub(crate) fn inspect(conn: &Connection, path: &Path) -> Result<Found, StoreError> {
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
