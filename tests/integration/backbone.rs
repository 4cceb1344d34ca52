//! `--backbone` and `--backbone-weights` at the command line: a backbone
//! without embedded weights needs a file, and a model refuses any other
//! weight file than the one it was fitted with.

use crate::cli::{flawscope, root, stderr};

#[test]
fn lite1_and_lite2_need_a_weight_file_of_their_variant() {
    let tmp = tempfile::tempdir().unwrap();
    let train = root().join("demo/solar_cell/train/good");
    let model = tmp.path().join("m.flawscope");
    let fit = |extra: &[&str]| crate::cli::fit(&train, &model, extra);
    let out = fit(&["--backbone", "lite2"]);
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
    assert!(
        stderr(&out).contains("--backbone-weights"),
        "{}",
        stderr(&out)
    );
    let out = fit(&["--backbone", "lite9"]);
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
    assert!(
        stderr(&out).contains("lite0, lite1, lite2"),
        "{}",
        stderr(&out)
    );
    let missing = tmp.path().join("nope.safetensors");
    let out = fit(&[
        "--backbone",
        "lite1",
        "--backbone-weights",
        missing.to_str().unwrap(),
    ]);
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
    assert!(stderr(&out).contains("cannot read"), "{}", stderr(&out));
    // Lite0's file given as Lite1: the network does not fit it.
    let lite0 = root().join("models/weights/efficientnet_lite0.safetensors");
    let out = fit(&[
        "--backbone",
        "lite1",
        "--backbone-weights",
        lite0.to_str().unwrap(),
    ]);
    assert_ne!(out.status.code(), Some(0), "{}", stderr(&out));
    assert!(
        stderr(&out).contains("not usable as efficientnet-lite1 weights"),
        "{}",
        stderr(&out)
    );
    assert!(!model.exists());
}

#[test]
fn a_model_refuses_other_backbone_weights() {
    let tmp = tempfile::tempdir().unwrap();
    let train = root().join("demo/solar_cell/train/good");
    let image = root().join("demo/solar_cell/test/good/cell0060.png");
    let model = tmp.path().join("m.flawscope");
    // The embedded Lite0 weights as a file: the path Lite1 and Lite2 take.
    let weights = tmp.path().join("lite0.safetensors");
    let bytes =
        std::fs::read(root().join("models/weights/efficientnet_lite0.safetensors")).unwrap();
    std::fs::write(&weights, &bytes).unwrap();
    let out = crate::cli::fit(
        &train,
        &model,
        &[
            "--backbone-weights",
            weights.to_str().unwrap(),
            "--size",
            "96",
            "--coarse-size",
            "0",
        ],
    );
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    let score = || {
        flawscope(&[
            "score",
            "--model",
            model.to_str().unwrap(),
            "--json",
            image.to_str().unwrap(),
        ])
    };
    let out = score();
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));

    let mut other = bytes;
    let last = other.len() - 1;
    other[last] ^= 1;
    std::fs::write(&weights, &other).unwrap();
    let out = score();
    assert_ne!(out.status.code(), Some(0));
    let err = stderr(&out);
    assert!(
        err.contains("SHA-256") && err.contains("fit again"),
        "{err}"
    );
}
