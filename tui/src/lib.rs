//! Terminal triage interface: score a folder, look at the worst images first,
//! and record OK / NG decisions in the results store
//! ([`flawscope_results`]).
//!
//! [`app`] (state and events, no I/O), [`ui`] (drawing) and [`runtime`]
//! (terminal, threads) make up `flawscope tui`.

pub mod app;
pub mod runtime;
pub mod ui;

pub use runtime::{Options, TuiError, default_db, run};
