//! The results store and what reads or fills it: one SQLite file per
//! folder or run holding every image's score, verdict and a person's
//! decision, shared by `flawscope score --db`, `flawscope tui`,
//! `flawscope export` and the web page of `flawscope serve --db`.
//!
//! - [`store`]: the store itself (WAL, versioned schema, marked as
//!   flawscope's; another application's database is refused untouched).
//! - [`scoring`]: resumable batch scoring into the store.
//! - [`export`]: the rows as CSV or JSON lines, with the verdict at the
//!   model's threshold and at the person's.
//! - [`shard`] and [`merge`]: batches split between workers
//!   (`score --shard I/N`) and their stores combined again.

pub mod export;
pub mod merge;
pub mod scoring;
pub mod shard;
pub mod store;
