//! Replays the committed regression corpus of the `decode` fuzz target
//! (`fuzz/regressions/decode/`) through the same function the target runs.
//! A file's name says what it must give: `ok_*` an image, `truncated_*`,
//! `extreme_*` and `too_large_*` that refusal; anything else (`any_*`, or a
//! crash the fuzzer found) just an answer, no panic.
#![allow(clippy::unwrap_used)]

use std::path::PathBuf;

use flawscope_core::Error;
use flawscope_core::fuzzing::decode_and_preprocess;
use flawscope_core::images::{DEFAULT_MAX_PIXELS, ImageError};

#[test]
fn the_decode_regression_corpus_gives_the_named_answers() {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../fuzz/regressions/decode");
    let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    files.sort();
    assert!(
        files.len() >= 20,
        "only {} files in {}",
        files.len(),
        dir.display()
    );
    for path in files {
        let name = path.file_name().unwrap().to_string_lossy().into_owned();
        let bytes = std::fs::read(&path).unwrap();
        let result = decode_and_preprocess(&bytes);
        let image_error = match &result {
            Err(Error::Image(err)) => Some(err),
            _ => None,
        };
        if name.starts_with("ok_") {
            let (w, h) = result.unwrap_or_else(|e| panic!("{name}: {e}"));
            assert!(u64::from(w) * u64::from(h) <= DEFAULT_MAX_PIXELS, "{name}");
        } else if name.starts_with("truncated_") {
            assert!(
                matches!(image_error, Some(ImageError::Truncated { .. })),
                "{name}: {result:?}"
            );
        } else if name.starts_with("extreme_") {
            assert!(
                matches!(image_error, Some(ImageError::ExtremeAspect { .. })),
                "{name}: {result:?}"
            );
        } else if name.starts_with("too_large_") {
            assert!(
                matches!(image_error, Some(ImageError::TooLarge { .. })),
                "{name}: {result:?}"
            );
        } else if let Err(err) = &result {
            assert!(!err.to_string().is_empty(), "{name}");
        }
    }
}
