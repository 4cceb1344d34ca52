//! `flawscope watch`'s ledger, kept in the results store beside the rows:
//! every result the watch made for an image (a failed one too) with the
//! message it sends, keyed by an idempotency key, and each sink's
//! acknowledgement. An image whose key is already here is not scored again
//! after a restart; a message a sink has not acknowledged is sent again.

use std::path::Path;

use rusqlite::{OptionalExtension, params};
use sha2::{Digest, Sha256};

use crate::error::StoreError;
use crate::rows::ModelRef;
use crate::store::{NOW, Store, path_text};

/// The idempotency key of the result of `model` on the image at `path` with
/// content `content_hash`: the same image, unchanged, always gets the same
/// key, so a receiver drops a repeat by it.
pub fn idempotency_key(model: &ModelRef, path: &Path, content_hash: &str) -> String {
    let mut hash = Sha256::new();
    for part in [
        model.identity.as_bytes(),
        path_text(path).as_bytes(),
        content_hash.as_bytes(),
    ] {
        hash.update((part.len() as u64).to_le_bytes());
        hash.update(part);
    }
    let digest = hash.finalize();
    digest.iter().map(|b| format!("{b:02x}")).collect()
}

/// A result to keep before it is sent.
#[derive(Debug, Clone, Copy)]
pub struct NewMessage<'a> {
    pub key: &'a str,
    pub path: &'a Path,
    pub content_hash: &'a str,
    /// The image could not be scored; the payload says why.
    pub failed: bool,
    /// The JSON sent to every sink.
    pub payload: &'a str,
}

/// A kept result, as sinks read it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Message {
    /// Its place in the outbox (increasing).
    pub id: i64,
    pub key: String,
    pub payload: String,
    /// UTC, ISO 8601.
    pub created_at: String,
}

/// How a sink answered a message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// Acknowledged (an HTTP 2xx, an MQTT PUBACK).
    Delivered,
    /// Refused for good (an HTTP 4xx), with why: not sent again.
    Rejected(String),
}

impl Store {
    /// The outbox's message with `key`, if the watch already made it.
    pub fn message_by_key(&self, key: &str) -> Result<Option<Message>, StoreError> {
        self.conn
            .query_row(
                "SELECT id, key, payload, created_at FROM outbox WHERE key = ?1",
                params![key],
                read_message,
            )
            .optional()
            .map_err(|e| self.err(e))
    }

    /// Keeps a result in the outbox for `model`, committed at once; a key
    /// already there keeps its first message (returned).
    pub fn add_message(
        &self,
        model: &ModelRef,
        message: &NewMessage<'_>,
    ) -> Result<Message, StoreError> {
        let sql = format!(
            "INSERT INTO outbox (key, path, content_hash, model_id, failed, payload, created_at)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, {NOW})
             ON CONFLICT (key) DO NOTHING"
        );
        self.conn
            .execute(
                &sql,
                params![
                    message.key,
                    path_text(message.path),
                    message.content_hash,
                    model.id,
                    message.failed,
                    message.payload,
                ],
            )
            .map_err(|e| self.err(e))?;
        self.message_by_key(message.key)?
            .ok_or_else(|| StoreError::BadValue {
                path: self.path().to_path_buf(),
                field: "outbox key",
                value: message.key.to_owned(),
            })
    }

    /// Up to `limit` messages `sink` has not answered, oldest first, after
    /// outbox place `after`.
    pub fn pending_messages(
        &self,
        sink: &str,
        after: i64,
        limit: usize,
    ) -> Result<Vec<Message>, StoreError> {
        let mut statement = self
            .conn
            .prepare_cached(
                "SELECT o.id, o.key, o.payload, o.created_at FROM outbox o
                 WHERE o.id > ?2 AND NOT EXISTS
                     (SELECT 1 FROM deliveries d WHERE d.outbox_id = o.id AND d.sink = ?1)
                 ORDER BY o.id LIMIT ?3",
            )
            .map_err(|e| self.err(e))?;
        let limit = i64::try_from(limit).unwrap_or(i64::MAX);
        statement
            .query_map(params![sink, after, limit], read_message)
            .map_err(|e| self.err(e))?
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| self.err(e))
    }

    /// How many messages after outbox place `after` `sink` has not
    /// answered, and the age in seconds of the oldest.
    pub fn sink_lag(&self, sink: &str, after: i64) -> Result<(u64, f64), StoreError> {
        self.conn
            .query_row(
                "SELECT COUNT(*),
                        COALESCE((julianday('now') - julianday(MIN(o.created_at))) * 86400.0, 0.0)
                 FROM outbox o WHERE o.id > ?2 AND NOT EXISTS
                     (SELECT 1 FROM deliveries d WHERE d.outbox_id = o.id AND d.sink = ?1)",
                params![sink, after],
                |row| Ok((row.get::<_, i64>(0)?, row.get::<_, f64>(1)?)),
            )
            .map(|(n, age)| (n.max(0) as u64, age.max(0.0)))
            .map_err(|e| self.err(e))
    }

    /// The outbox place of the newest message (0 when empty): a sink added
    /// later starts after it rather than receiving the whole history.
    pub fn newest_message(&self) -> Result<i64, StoreError> {
        self.conn
            .query_row("SELECT COALESCE(MAX(id), 0) FROM outbox", [], |row| {
                row.get(0)
            })
            .map_err(|e| self.err(e))
    }

    /// Records `sink`'s answer to message `id`, committed at once (a second
    /// answer keeps the first).
    pub fn record_delivery(
        &self,
        id: i64,
        sink: &str,
        outcome: &Outcome,
    ) -> Result<(), StoreError> {
        let (kind, detail) = match outcome {
            Outcome::Delivered => ("delivered", None),
            Outcome::Rejected(why) => ("rejected", Some(why.as_str())),
        };
        let sql = format!(
            "INSERT INTO deliveries (outbox_id, sink, outcome, detail, at)
             VALUES (?1, ?2, ?3, ?4, {NOW})
             ON CONFLICT (outbox_id, sink) DO NOTHING"
        );
        self.conn
            .execute(&sql, params![id, sink, kind, detail])
            .map_err(|e| self.err(e))?;
        Ok(())
    }
}

fn read_message(row: &rusqlite::Row<'_>) -> rusqlite::Result<Message> {
    Ok(Message {
        id: row.get(0)?,
        key: row.get(1)?,
        payload: row.get(2)?,
        created_at: row.get(3)?,
    })
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    #[test]
    fn messages_wait_per_sink_until_answered_and_keys_are_kept_once() {
        let tmp = tempfile::tempdir().unwrap();
        let store = Store::open(&tmp.path().join("r.sqlite")).unwrap();
        let model = store.model("m", "sha256:m").unwrap();
        let path = Path::new("/line/a.png");
        let key = idempotency_key(&model, path, "sha256:aa");
        assert_eq!(key, idempotency_key(&model, path, "sha256:aa"));
        assert_ne!(key, idempotency_key(&model, path, "sha256:ab"));
        let first = store
            .add_message(
                &model,
                &NewMessage {
                    key: &key,
                    path,
                    content_hash: "sha256:aa",
                    failed: false,
                    payload: "{\"n\":1}",
                },
            )
            .unwrap();
        let again = store
            .add_message(
                &model,
                &NewMessage {
                    key: &key,
                    path,
                    content_hash: "sha256:aa",
                    failed: false,
                    payload: "{\"n\":2}",
                },
            )
            .unwrap();
        assert_eq!(first, again, "a key keeps its first message");
        assert_eq!(store.sink_lag("hook", 0).unwrap().0, 1);
        assert_eq!(store.newest_message().unwrap(), first.id);
        assert_eq!(store.sink_lag("hook", first.id).unwrap().0, 0);
        assert_eq!(
            store.pending_messages("hook", 0, 10).unwrap(),
            vec![first.clone()]
        );
        store
            .record_delivery(first.id, "hook", &Outcome::Delivered)
            .unwrap();
        assert!(store.pending_messages("hook", 0, 10).unwrap().is_empty());
        assert_eq!(store.sink_lag("hook", 0).unwrap().0, 0);
        assert_eq!(store.sink_lag("mqtt", 0).unwrap().0, 1, "each sink apart");
        store
            .record_delivery(first.id, "mqtt", &Outcome::Rejected("400".into()))
            .unwrap();
        assert_eq!(store.sink_lag("mqtt", 0).unwrap().0, 0);
        // Kept across a reopen.
        drop(store);
        let store = Store::open(&tmp.path().join("r.sqlite")).unwrap();
        assert!(store.message_by_key(&key).unwrap().is_some());
        assert_eq!(store.sink_lag("hook", 0).unwrap().0, 0);
    }
}
