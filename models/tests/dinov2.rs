//! DINOv2 against Hugging Face `transformers`: golden values from
//! `scripts/make_tiny_dinov2.py` (a tiny random `Dinov2Model`, reference
//! computed in float64) at non-square inputs that need the position
//! embeddings interpolated. Every hidden state and the patch tokens must be
//! within 1e-4 (absolute) of the reference.
#![allow(clippy::unwrap_used)]

use std::collections::HashMap;
use std::path::PathBuf;

use flawscope_models::ModelError;
use flawscope_models::candle_core::{Device, IndexOp, Tensor, safetensors};
use flawscope_models::dinov2::Dinov2Model;

const TOL: f32 = 1e-4;

fn fixture_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/tiny_dinov2")
}

fn reference() -> HashMap<String, Tensor> {
    safetensors::load(fixture_dir().join("reference.safetensors"), &Device::Cpu).unwrap()
}

fn meta() -> serde_json::Value {
    let text = std::fs::read_to_string(fixture_dir().join("reference.json")).unwrap();
    serde_json::from_str(&text).unwrap()
}

fn max_diff(a: &Tensor, b: &Tensor) -> f32 {
    assert_eq!(a.dims(), b.dims(), "shapes differ");
    (a - b)
        .unwrap()
        .abs()
        .unwrap()
        .flatten_all()
        .unwrap()
        .max(0)
        .unwrap()
        .to_scalar::<f32>()
        .unwrap()
}

fn assert_close(name: &str, ours: &Tensor, reference: &Tensor) {
    let d = max_diff(ours, reference);
    println!("{name}: max |diff| = {d:.2e}");
    assert!(d <= TOL, "{name}: max |diff| {d} > {TOL}");
}

#[test]
fn hidden_states_and_patch_tokens_match_transformers() {
    let model = Dinov2Model::load(&fixture_dir(), &Device::Cpu).unwrap();
    let reference = reference();
    let meta = meta();
    let inputs = meta["inputs"].as_object().unwrap();
    assert_eq!(inputs.len(), 3);
    for (name, info) in inputs {
        let pixels = &reference[&format!("{name}_pixels")];
        let n_states = info["num_hidden_states"].as_u64().unwrap() as usize;
        assert_eq!(n_states, model.depth() + 1);
        let layers: Vec<usize> = (0..n_states).collect();
        let (states, grid) = model.hidden_states(pixels, &layers).unwrap();
        let expected_grid = info["grid"].as_array().unwrap();
        assert_eq!(
            [grid.0, grid.1],
            [
                expected_grid[0].as_u64().unwrap() as usize,
                expected_grid[1].as_u64().unwrap() as usize
            ]
        );
        for (i, state) in states.iter().enumerate() {
            assert_close(
                &format!("{name} hidden state {i}"),
                &state.i(0).unwrap(),
                &reference[&format!("{name}_hidden_state_{i}")],
            );
        }
        let tokens = model.patch_tokens(pixels).unwrap();
        assert_eq!(tokens.dims(), &[1, grid.0 * grid.1, model.hidden_size()]);
        assert_close(
            &format!("{name} patch tokens"),
            &tokens.i(0).unwrap(),
            &reference[&format!("{name}_patch_tokens")],
        );
    }
}

#[test]
fn chosen_layers_come_back_in_the_order_asked() {
    let model = Dinov2Model::load(&fixture_dir(), &Device::Cpu).unwrap();
    let reference = reference();
    let pixels = &reference["rect_pixels"];
    let (states, _) = model.hidden_states(pixels, &[3, 1]).unwrap();
    assert_close(
        "layer 3",
        &states[0].i(0).unwrap(),
        &reference["rect_hidden_state_3"],
    );
    assert_close(
        "layer 1",
        &states[1].i(0).unwrap(),
        &reference["rect_hidden_state_1"],
    );
    let err = model.hidden_states(pixels, &[4]).unwrap_err();
    assert!(err.to_string().contains("0..=3"), "{err}");
}

#[test]
fn bad_inputs_and_folders_are_clear_errors() {
    let model = Dinov2Model::load(&fixture_dir(), &Device::Cpu).unwrap();
    let tiny = Tensor::zeros(
        (1, 3, 3, 8),
        flawscope_models::candle_core::DType::F32,
        &Device::Cpu,
    )
    .unwrap();
    assert!(matches!(
        model.patch_tokens(&tiny),
        Err(ModelError::InvalidInput(_))
    ));
    let grey = Tensor::zeros(
        (1, 1, 8, 8),
        flawscope_models::candle_core::DType::F32,
        &Device::Cpu,
    )
    .unwrap();
    assert!(
        model
            .patch_tokens(&grey)
            .unwrap_err()
            .to_string()
            .contains("channels")
    );

    let empty = tempfile::tempdir().unwrap();
    let err = Dinov2Model::load(empty.path(), &Device::Cpu).unwrap_err();
    assert!(err.to_string().contains("config.json"), "{err}");
    std::fs::copy(
        fixture_dir().join("config.json"),
        empty.path().join("config.json"),
    )
    .unwrap();
    let err = Dinov2Model::load(empty.path(), &Device::Cpu).unwrap_err();
    assert!(err.to_string().contains("model.safetensors"), "{err}");
    // CLIP's weights under a DINOv2 config: the missing tensor is named.
    let clip = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/tiny_clip");
    std::fs::copy(
        clip.join("model.safetensors"),
        empty.path().join("model.safetensors"),
    )
    .unwrap();
    let err = Dinov2Model::load(empty.path(), &Device::Cpu).unwrap_err();
    assert!(err.to_string().contains("embeddings"), "{err}");
}

/// A checkpoint of a released shape (e.g. a random ViT-S/14 with the
/// trained 37 × 37 grid) and `check.safetensors` beside it, made with
/// transformers (`pixels`, `hidden_state_6`, `hidden_state_12`,
/// `patch_tokens`): `FLAWSCOPE_DINOV2_CHECK=DIR cargo test --release -p
/// flawscope-models --test dinov2 -- --ignored`.
#[test]
#[ignore = "needs FLAWSCOPE_DINOV2_CHECK=DIR (a full-size checkpoint and its reference)"]
fn full_size_checkpoint_matches_transformers() {
    let Some(dir) = std::env::var_os("FLAWSCOPE_DINOV2_CHECK") else {
        println!("FLAWSCOPE_DINOV2_CHECK is not set: nothing checked");
        return;
    };
    let dir = PathBuf::from(dir);
    let model = Dinov2Model::load(&dir, &Device::Cpu).unwrap();
    let reference = safetensors::load(dir.join("check.safetensors"), &Device::Cpu).unwrap();
    let pixels = &reference["pixels"];
    let (states, _) = model.hidden_states(pixels, &[6, 12]).unwrap();
    assert_close(
        "hidden state 6",
        &states[0].i(0).unwrap(),
        &reference["hidden_state_6"],
    );
    assert_close(
        "hidden state 12",
        &states[1].i(0).unwrap(),
        &reference["hidden_state_12"],
    );
    let tokens = model.patch_tokens(pixels).unwrap();
    assert_close(
        "patch tokens",
        &tokens.i(0).unwrap(),
        &reference["patch_tokens"],
    );
}
