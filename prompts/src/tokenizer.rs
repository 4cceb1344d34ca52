//! CLIP tokenisation with the checkpoint's own `tokenizer.json`.

use std::path::{Path, PathBuf};

use tokenizers::{
    PaddingDirection, PaddingParams, PaddingStrategy, Tokenizer, TruncationDirection,
    TruncationParams, TruncationStrategy,
};

use crate::PromptError;

/// CLIP's text context: every sentence becomes exactly this many token ids.
pub const CLIP_CONTEXT_LENGTH: usize = 77;

const BOS: &str = "<|startoftext|>";
const EOS: &str = "<|endoftext|>";

/// Token ids of several sentences, row-major, all of the same length.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TokenBatch {
    /// `rows * len` ids.
    pub ids: Vec<u32>,
    /// Number of sentences.
    pub rows: usize,
    /// Ids per sentence (the context length).
    pub len: usize,
}

impl TokenBatch {
    /// The ids of sentence `row`, or `None` past the end.
    pub fn row(&self, row: usize) -> Option<&[u32]> {
        let start = row.checked_mul(self.len)?;
        self.ids.get(start..start.checked_add(self.len)?)
    }
}

/// A CLIP tokenizer: `<|startoftext|>` + BPE tokens + `<|endoftext|>`,
/// truncated and padded (with `<|endoftext|>`) to a fixed context length,
/// exactly as Hugging Face's `CLIPTokenizer(..., padding="max_length",
/// max_length=77, truncation=True)` does.
#[derive(Debug, Clone)]
pub struct ClipTokenizer {
    inner: Tokenizer,
    /// The same tokenizer without truncation or padding, to count tokens.
    counting: Tokenizer,
    path: PathBuf,
    context_length: usize,
    bos_id: u32,
    eos_id: u32,
}

impl ClipTokenizer {
    /// Loads `tokenizer.json` from a checkpoint folder.
    pub fn from_dir(dir: &Path) -> Result<Self, PromptError> {
        Self::from_file(&dir.join("tokenizer.json"))
    }

    /// Loads a `tokenizer.json` file; the context length is 77.
    pub fn from_file(path: &Path) -> Result<Self, PromptError> {
        let bytes = std::fs::read(path).map_err(|e| PromptError::TokenizerLoad {
            path: path.to_owned(),
            reason: e.to_string(),
        })?;
        let inner = Tokenizer::from_bytes(&bytes).map_err(|e| PromptError::TokenizerLoad {
            path: path.to_owned(),
            reason: e.to_string(),
        })?;
        let id = |token: &str| {
            inner
                .token_to_id(token)
                .ok_or_else(|| PromptError::NotClipTokenizer {
                    path: path.to_owned(),
                    reason: format!("no {token} token"),
                })
        };
        let bos_id = id(BOS)?;
        let eos_id = id(EOS)?;
        let mut counting = inner.clone();
        counting
            .with_truncation(None)
            .map_err(|e| PromptError::NotClipTokenizer {
                path: path.to_owned(),
                reason: e.to_string(),
            })?;
        counting.with_padding(None);
        Self {
            inner,
            counting,
            path: path.to_owned(),
            context_length: CLIP_CONTEXT_LENGTH,
            bos_id,
            eos_id,
        }
        .with_context_length(CLIP_CONTEXT_LENGTH)
    }

    /// Changes the context length (at least 2: start and end tokens).
    pub fn with_context_length(mut self, context_length: usize) -> Result<Self, PromptError> {
        if context_length < 2 {
            return Err(PromptError::NotClipTokenizer {
                path: self.path.clone(),
                reason: format!(
                    "context length {context_length} leaves no room for start and end tokens"
                ),
            });
        }
        let truncation = TruncationParams {
            direction: TruncationDirection::Right,
            max_length: context_length,
            strategy: TruncationStrategy::LongestFirst,
            stride: 0,
        };
        self.inner.with_truncation(Some(truncation)).map_err(|e| {
            PromptError::NotClipTokenizer {
                path: self.path.clone(),
                reason: e.to_string(),
            }
        })?;
        self.inner.with_padding(Some(PaddingParams {
            strategy: PaddingStrategy::Fixed(context_length),
            direction: PaddingDirection::Right,
            pad_to_multiple_of: None,
            pad_id: self.eos_id,
            pad_type_id: 0,
            pad_token: EOS.to_owned(),
        }));
        self.context_length = context_length;
        Ok(self)
    }

    /// Ids per sentence.
    pub fn context_length(&self) -> usize {
        self.context_length
    }

    /// Id of `<|startoftext|>`.
    pub fn bos_id(&self) -> u32 {
        self.bos_id
    }

    /// Id of `<|endoftext|>`, which also pads.
    pub fn eos_id(&self) -> u32 {
        self.eos_id
    }

    /// Number of ids the tokenizer can produce (the model's vocabulary must be at least this big).
    pub fn vocab_size(&self) -> usize {
        self.inner.get_vocab_size(true)
    }

    /// Number of tokens of `text`, start and end tokens included, before
    /// any truncation ([`ClipTokenizer::encode`] cuts at the context length).
    pub fn token_count(&self, text: &str) -> Result<usize, PromptError> {
        let encoding = self
            .counting
            .encode(text, true)
            .map_err(|e| PromptError::Encode {
                text: text.to_owned(),
                reason: e.to_string(),
            })?;
        Ok(encoding.get_ids().len())
    }

    /// Token ids of one sentence, exactly [`ClipTokenizer::context_length`] long.
    pub fn encode(&self, text: &str) -> Result<Vec<u32>, PromptError> {
        let encoding = self
            .inner
            .encode(text, true)
            .map_err(|e| PromptError::Encode {
                text: text.to_owned(),
                reason: e.to_string(),
            })?;
        let ids = encoding.get_ids();
        if ids.len() != self.context_length {
            return Err(PromptError::Encode {
                text: text.to_owned(),
                reason: format!("got {} ids instead of {}", ids.len(), self.context_length),
            });
        }
        Ok(ids.to_vec())
    }

    /// Token ids of several sentences, one row each.
    pub fn encode_batch<S: AsRef<str>>(&self, texts: &[S]) -> Result<TokenBatch, PromptError> {
        let mut ids = Vec::with_capacity(texts.len() * self.context_length);
        for text in texts {
            ids.extend(self.encode(text.as_ref())?);
        }
        Ok(TokenBatch {
            ids,
            rows: texts.len(),
            len: self.context_length,
        })
    }
}
