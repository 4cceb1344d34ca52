//! Replays the committed regression corpora of the `upload` and `oip_infer`
//! fuzz targets (`fuzz/regressions/`) through the functions the targets
//! run. `ok_*` files must parse, `err_*` files must be refused with a 4xx
//! answer; any other file (a crash the fuzzer found) just must not panic.
#![allow(clippy::unwrap_used)]

use std::path::PathBuf;

use flawscope_server::ApiError;
use flawscope_server::fuzzing::{infer_request, upload};

fn corpus(target: &str) -> Vec<(String, Vec<u8>)> {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../fuzz/regressions")
        .join(target);
    let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    files.sort();
    assert!(
        files.len() >= 8,
        "only {} files in {}",
        files.len(),
        dir.display()
    );
    files
        .into_iter()
        .map(|p| {
            let name = p.file_name().unwrap().to_string_lossy().into_owned();
            (name, std::fs::read(&p).unwrap())
        })
        .collect()
}

fn check<T: std::fmt::Debug>(name: &str, result: Result<T, ApiError>) {
    if name.starts_with("ok_") {
        result.unwrap_or_else(|e| panic!("{name}: {e}"));
    } else if name.starts_with("err_") {
        let err = result.expect_err(name);
        assert!(err.status().is_client_error(), "{name}: {err}");
    }
}

#[test]
fn the_upload_regression_corpus_gives_the_named_answers() {
    for (name, bytes) in corpus("upload") {
        check(&name, upload(&bytes));
    }
}

#[test]
fn the_oip_infer_regression_corpus_gives_the_named_answers() {
    for (name, bytes) in corpus("oip_infer") {
        check(&name, infer_request(&bytes));
    }
}
