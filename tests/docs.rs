//! The documentation's examples, run: every ```console block of README.md
//! and docs/*.md is a sequence of `$ flawscope …` commands whose shown output
//! must match what the built binary prints (`[..]` elides part of a line,
//! `...` whole lines; timings are elided so). The commands run from the
//! repository root, so they find `demo/` and write under `work/` (ignored
//! by git). Blocks tagged `sh` or `text` are not run: HTTP examples and
//! measurements on data sets too large for CI.
//!
//! After changing the program's output, `TRYCMD=overwrite cargo test
//! --release --test docs` rewrites the blocks; put the elisions back.

#[test]
fn documentation_examples() {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
    // The examples write model files and heatmaps here, never into a source folder.
    std::fs::create_dir_all(root.join("work")).expect("creating work/");
    let cases = trycmd::TestCases::new();
    cases
        .register_bin(
            "flawscope",
            std::path::Path::new(env!("CARGO_BIN_EXE_flawscope")),
        )
        .case("README.md")
        .case("docs/*.md");
    cases.run();
}
