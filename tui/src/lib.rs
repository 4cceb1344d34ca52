//! Terminal triage interface: score a folder, look at the worst images first,
//! and record OK / NG decisions in a results store.
//!
//! - [`store`]: the SQLite results store (WAL, versioned schema): per image
//!   and model the score and verdict, per image the person's decision.
//! - [`scoring`]: resumable batch scoring into the store, shared by
//!   `flawscope score --db` and the TUI's background worker.
//! - [`app`] (state and events, no I/O), [`ui`] (drawing) and [`runtime`]
//!   (terminal, threads) make up `flawscope tui`.

pub mod app;
pub mod runtime;
pub mod scoring;
pub mod store;
pub mod ui;

pub use runtime::{Options, TuiError, default_db, run};
