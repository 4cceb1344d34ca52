//! The one integration-test binary: fixture-driven checks of each crate and
//! end-to-end runs of the `flawscope` command.
#![allow(clippy::unwrap_used)]

mod answers;
mod backbone;
mod batch;
mod cli;
mod deploy;
mod few_shot;
mod hostile;
mod hostile_images;
mod import_cycles;
mod musc;
mod operating_point;
mod pipeline;
mod serve;
mod shard;
mod shared_data;
mod tui;
mod verdicts;
mod vit_backbone;
mod watch;
mod web;
mod winclip;
