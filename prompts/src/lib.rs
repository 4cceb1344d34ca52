//! Text side of the vision-language path: the prompt ensemble that describes
//! normal and anomalous states of an object, user-typed defect descriptions,
//! and tokenisation with the checkpoint's own tokenizer.
//!
//! - [`PromptSet`] holds the WinCLIP ensemble as data (state phrases ×
//!   sentence templates) plus user defect descriptions, and yields the normal
//!   and anomalous sentences for one object.
//! - [`ClipTokenizer`] turns sentences into fixed-length token ids (77, as
//!   CLIP does) with the checkpoint's `tokenizer.json`.
//! - [`TextEmbeddingCache`] keeps the two averaged class vectors per
//!   (model, object, prompt set) in memory and optionally in a file; the model
//!   that computes them is reached through the small [`SentenceEncoder`] trait,
//!   so this crate never depends on a tensor library.

mod cache;
mod ensemble;
mod error;
mod tokenizer;

pub use cache::{ClassVectors, SentenceEncoder, TextEmbeddingCache, normalised_mean};
pub use ensemble::{
    ANOMALOUS_STATES, NORMAL_STATES, PromptSentences, PromptSet, TEMPLATES, object_phrase,
};
pub use error::PromptError;
pub use tokenizer::{CLIP_CONTEXT_LENGTH, ClipTokenizer, TokenBatch};
