use std::path::PathBuf;

/// Everything that can go wrong on the text side.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum PromptError {
    /// A tokenizer file could not be read or parsed.
    #[error("{}: cannot load tokenizer: {reason}", path.display())]
    TokenizerLoad {
        /// The `tokenizer.json` file.
        path: PathBuf,
        /// Why it failed.
        reason: String,
    },

    /// The tokenizer file loads but is not a CLIP tokenizer.
    #[error("{}: not a CLIP tokenizer: {reason}", path.display())]
    NotClipTokenizer {
        /// The `tokenizer.json` file.
        path: PathBuf,
        /// What is missing.
        reason: String,
    },

    /// Tokenising a sentence failed.
    #[error("cannot tokenise {text:?}: {reason}")]
    Encode {
        /// The sentence.
        text: String,
        /// The tokenizer's message.
        reason: String,
    },

    /// A template or state phrase lacks the `{}` placeholder, or has several.
    #[error("prompt pattern {pattern:?} must contain exactly one {{}} placeholder")]
    Placeholder {
        /// The offending pattern.
        pattern: String,
    },

    /// A prompt set would produce no sentence for a class.
    #[error("the prompt set has no {class} sentences")]
    EmptyClass {
        /// `normal` or `anomalous`.
        class: &'static str,
    },

    /// A defect description is empty (or only whitespace and underscores).
    #[error(
        "a defect description is empty: type what the defect looks like (for example \"scratch on the thread\")"
    )]
    EmptyDescription,

    /// A sentence is longer than the text encoder reads.
    #[error(
        "the prompt {sentence:?} is {tokens} tokens long; CLIP reads at most {limit} \
         (start and end included): shorten the defect description or the object name"
    )]
    TooLong {
        /// The longest sentence the description or object makes.
        sentence: String,
        /// Its length in tokens, start and end tokens included.
        tokens: usize,
        /// The encoder's context length.
        limit: usize,
    },

    /// Embeddings handed back by an encoder are unusable.
    #[error("invalid embeddings: {0}")]
    Embeddings(String),

    /// The on-disk embedding cache could not be read or written.
    #[error("{}: embedding cache: {reason}", path.display())]
    CacheFile {
        /// The cache file.
        path: PathBuf,
        /// Why it failed.
        reason: String,
    },
}
