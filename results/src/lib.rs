//! The results store and what reads or fills it: one SQLite file per
//! folder or run holding every image's score, verdict and a person's
//! decision, shared by `flawscope score --db`, `flawscope tui`,
//! `flawscope export` and the web page of `flawscope serve --db`.
//!
//! - [`store`]: the store itself (WAL, one commit per row, decisions shared
//!   by every model's row of an image) and the SQL behind it; re-exports
//!   the types below under `store::` too.
//! - [`rows`]: the values it holds and hands out (`Decision`, `Verdict`,
//!   `ModelRef`, `NewScore`, `StoredResult`) and how a row's verdict is
//!   taken.
//! - [`schema`]: the file format: versioned schema, migrations, the mark
//!   saying the file is flawscope's, WAL settings.
//! - `foreign`: recognising a file before anything is written, so another
//!   application's database or a damaged file is refused untouched.
//! - [`error`]: `StoreError`, every way the store fails.
//! - [`hash`]: `sha256:` identities of images and model files.
//! - [`scoring`]: resumable batch scoring into the store.
//! - [`export`]: the rows as CSV or JSON lines, with the verdict at the
//!   model's threshold and at the person's.
//! - [`outbox`]: `flawscope watch`'s ledger: each result it made, keyed by
//!   an idempotency key, and which sink acknowledged it.
//! - [`report`]: the store as one self-contained HTML file to hand on.
//! - [`shard`] and [`merge`]: batches split between workers
//!   (`score --shard I/N`) and their stores combined again.

pub mod error;
pub mod export;
mod foreign;
pub mod hash;
pub mod merge;
pub mod outbox;
pub mod report;
pub mod rows;
pub mod schema;
pub mod scoring;
pub mod shard;
pub mod store;
