//! CLIP towers, tokenizer and weights resolution against Hugging Face
//! `transformers`: golden values from `scripts/make_tiny_clip.py` (a tiny
//! random `CLIPModel` with a real CLIP BPE cut to 2000 merges, reference
//! computed in float64). Every embedding must be within 1e-4 (absolute) of
//! the reference; token ids and preprocessed pixels must match exactly (up to
//! float rounding).
#![allow(clippy::unwrap_used)]

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use flawscope_models::ModelError;
use flawscope_models::candle_core::{DType, Device, Tensor, safetensors};
use flawscope_models::clip::{ClipModel, ClipPreprocessor, ResizeMode, sliding_windows};
use flawscope_models::clip_weights::{VIT_B_16, WeightsLookup, WeightsSource};
use flawscope_prompts::{
    ClipTokenizer, PromptError, PromptSet, SentenceEncoder, TextEmbeddingCache,
};

const TOL: f32 = 1e-4;

fn fixture_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/tiny_clip")
}

fn reference() -> HashMap<String, Tensor> {
    safetensors::load(fixture_dir().join("reference.safetensors"), &Device::Cpu).unwrap()
}

fn meta() -> serde_json::Value {
    let text = std::fs::read_to_string(fixture_dir().join("reference.json")).unwrap();
    serde_json::from_str(&text).unwrap()
}

fn model() -> ClipModel {
    ClipModel::load(&fixture_dir(), &Device::Cpu).unwrap()
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

fn prompts() -> Vec<String> {
    meta()["prompts"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p.as_str().unwrap().to_owned())
        .collect()
}

fn reference_ids() -> Vec<Vec<u32>> {
    meta()["token_ids"]
        .as_array()
        .unwrap()
        .iter()
        .map(|row| {
            row.as_array()
                .unwrap()
                .iter()
                .map(|v| v.as_u64().unwrap() as u32)
                .collect()
        })
        .collect()
}

#[test]
fn clip_tokenizer_matches_transformers() {
    let tok = ClipTokenizer::from_dir(&fixture_dir()).unwrap();
    assert_eq!(tok.context_length(), 77);
    assert_eq!(tok.eos_id(), 2513);
    assert_eq!(tok.bos_id(), 2512);
    let expected = reference_ids();
    let prompts = prompts();
    assert_eq!(prompts.len(), 30);
    for (prompt, want) in prompts.iter().zip(&expected) {
        assert_eq!(&tok.encode(prompt).unwrap(), want, "prompt {prompt:?}");
    }
    let batch = tok.encode_batch(&prompts).unwrap();
    assert_eq!((batch.rows, batch.len), (30, 77));
    assert_eq!(batch.row(29).unwrap(), expected[29].as_slice());
    assert!(batch.row(30).is_none());
}

#[test]
fn clip_text_embeddings_match_transformers() {
    let model = model();
    let reference = reference();
    let ids: Vec<u32> = reference_ids().into_iter().flatten().collect();
    let ids = Tensor::from_vec(ids, (30, 77), &Device::Cpu).unwrap();
    let ours = model.encode_text(&ids).unwrap();
    assert_close("text embeddings", &ours, &reference["text_embeds"]);
    // i64 ids and a sub-batch give the same rows.
    let ids64 = ids.narrow(0, 3, 5).unwrap().to_dtype(DType::I64).unwrap();
    let part = model.encode_text(&ids64).unwrap();
    assert_close(
        "text embeddings (i64, rows 3..8)",
        &part,
        &reference["text_embeds"].narrow(0, 3, 5).unwrap(),
    );
    // Out-of-vocabulary ids and bad shapes are refused, not a panic.
    let bad = Tensor::from_vec(vec![2512u32, 9999, 2513], (1, 3), &Device::Cpu).unwrap();
    assert!(matches!(
        model.encode_text(&bad),
        Err(ModelError::InvalidInput(_))
    ));
    let flat = Tensor::from_vec(vec![2512u32, 2513], 2, &Device::Cpu).unwrap();
    assert!(matches!(
        model.encode_text(&flat),
        Err(ModelError::InvalidInput(_))
    ));
    let long = Tensor::zeros((1, 78), DType::U32, &Device::Cpu).unwrap();
    assert!(matches!(
        model.encode_text(&long),
        Err(ModelError::InvalidInput(_))
    ));
}

#[test]
fn clip_preprocessing_matches_transformers_pil() {
    let reference = reference();
    let a = image::open(fixture_dir().join("image_a.png")).unwrap();
    let b = image::open(fixture_dir().join("image_b.png")).unwrap();
    let c = image::open(fixture_dir().join("image_c.png")).unwrap();
    assert_eq!(b.color(), image::ColorType::L8, "image b tests grey → RGB");
    let crop = ClipPreprocessor::new(32);
    let ours = crop.tensor(&[a, b], &Device::Cpu).unwrap();
    let d = max_diff(&ours, &reference["pixels_ab"]);
    println!("pixels (resize + centre crop): max |diff| = {d:.2e}");
    assert!(d < 1e-5, "pixels differ by {d}");
    let stretch = ClipPreprocessor::new(32).with_mode(ResizeMode::Stretch);
    let ours = stretch.tensor(&[c], &Device::Cpu).unwrap();
    let d = max_diff(&ours, &reference["pixels_c"]);
    println!("pixels (stretch): max |diff| = {d:.2e}");
    assert!(d < 1e-5, "pixels differ by {d}");
}

#[test]
fn clip_image_embeddings_match_transformers() {
    let model = model();
    let reference = reference();
    let ours = model.encode_image(&reference["pixels_ab"]).unwrap();
    assert_close("image embeddings", &ours, &reference["image_embeds_ab"]);
    let ours = model.encode_image(&reference["pixels_c"]).unwrap();
    assert_close(
        "image embeddings (stretched)",
        &ours,
        &reference["image_embeds_c"],
    );
    // From the image files through our preprocessing.
    let images = [
        image::open(fixture_dir().join("image_a.png")).unwrap(),
        image::open(fixture_dir().join("image_b.png")).unwrap(),
    ];
    let pixels = model.preprocessor().tensor(&images, &Device::Cpu).unwrap();
    let ours = model.encode_image(&pixels).unwrap();
    assert_close(
        "image embeddings (from files)",
        &ours,
        &reference["image_embeds_ab"],
    );
}

#[test]
fn clip_position_interpolation_matches_transformers() {
    let model = model();
    let reference = reference();
    for name in ["rect", "square48"] {
        let ours = model
            .encode_image(&reference[&format!("pixels_{name}")])
            .unwrap();
        assert_close(
            &format!("interpolated ({name})"),
            &ours,
            &reference[&format!("image_embeds_{name}")],
        );
    }
}

#[test]
fn clip_hidden_states_match_transformers() {
    let model = model();
    let reference = reference();
    let meta = meta();
    assert_eq!(meta["num_hidden_states"], 4);
    assert_eq!(meta["hidden_state_0_is_pre_layernorm_embeddings"], true);
    let pixels = reference["pixels_ab"].narrow(0, 0, 1).unwrap();
    let states = model.vision_hidden_states(&pixels, &[3, 0, 2, 1]).unwrap();
    for (state, layer) in states.iter().zip([3, 0, 2, 1]) {
        assert_eq!(state.dims(), &[1, 65, 48]);
        assert_close(
            &format!("hidden state {layer}"),
            &state.squeeze(0).unwrap(),
            &reference[&format!("hidden_state_{layer}")],
        );
    }
    assert!(matches!(
        model.vision_hidden_states(&pixels, &[4]),
        Err(ModelError::InvalidInput(_))
    ));
}

#[test]
fn clip_patch_embeddings_match_transformers() {
    let model = model();
    let reference = reference();
    let pixels = reference["pixels_ab"].narrow(0, 0, 1).unwrap();
    let patches = model.encode_patches(&pixels).unwrap();
    assert_eq!(patches.dims(), &[1, 64, 24]);
    assert_close(
        "patch embeddings",
        &patches.squeeze(0).unwrap(),
        &reference["patch_embeds_a"],
    );
    let (image, patches2) = model.encode_image_and_patches(&pixels).unwrap();
    assert_close(
        "image embedding (with patches)",
        &image,
        &reference["image_embeds_ab"].narrow(0, 0, 1).unwrap(),
    );
    assert!(max_diff(&patches, &patches2) == 0.0);
    // The unprojected tokens WinCLIP's few-shot memory holds: the same class
    // embedding and hidden-sized rows (their values are checked end to end
    // against anomalib in core/tests/winclip_reference.rs).
    let (image3, tokens) = model.encode_image_and_patch_tokens(&pixels).unwrap();
    assert!(max_diff(&image, &image3) < 1e-6);
    assert_eq!(tokens.dims(), &[1, 64, 48]);
}

#[test]
fn clip_windowed_forward_matches_transformers() {
    let model = model();
    let reference = reference();
    let windows: Vec<Vec<usize>> = meta()["windows"]
        .as_array()
        .unwrap()
        .iter()
        .map(|w| {
            w.as_array()
                .unwrap()
                .iter()
                .map(|p| p.as_u64().unwrap() as usize)
                .collect()
        })
        .collect();
    let mut ours_windows = sliding_windows(8, 8, 2, 1);
    ours_windows.extend(sliding_windows(8, 8, 3, 1));
    assert_eq!(ours_windows, windows);
    let pixels = reference["pixels_ab"].narrow(0, 0, 1).unwrap();
    let ours = model.encode_windows(&pixels, &windows).unwrap();
    assert_eq!(ours.dims(), &[85, 24]);
    assert_close("window embeddings", &ours, &reference["window_embeds_a"]);
    // Order is kept when sizes are interleaved.
    let mixed = vec![windows[60].clone(), windows[0].clone(), windows[84].clone()];
    let ours = model.encode_windows(&pixels, &mixed).unwrap();
    let want = Tensor::cat(
        &[60, 0, 84].map(|i| reference["window_embeds_a"].narrow(0, i, 1).unwrap()),
        0,
    )
    .unwrap();
    assert_close("window embeddings (mixed order)", &ours, &want);
    // Bad windows are refused.
    for bad in [vec![vec![64]], vec![vec![]], vec![]] {
        assert!(matches!(
            model.encode_windows(&pixels, &bad),
            Err(ModelError::InvalidInput(_))
        ));
    }
    assert!(matches!(
        model.encode_windows(&reference["pixels_ab"], &windows),
        Err(ModelError::InvalidInput(_))
    ));
}

/// A copy of the fixture with `edit` applied to its parsed config.json.
fn edited_copy(edit: impl Fn(&mut serde_json::Value)) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    for f in ["model.safetensors", "tokenizer.json"] {
        std::fs::copy(fixture_dir().join(f), dir.path().join(f)).unwrap();
    }
    let text = std::fs::read_to_string(fixture_dir().join("config.json")).unwrap();
    let mut config: serde_json::Value = serde_json::from_str(&text).unwrap();
    edit(&mut config);
    std::fs::write(dir.path().join("config.json"), config.to_string()).unwrap();
    dir
}

#[test]
fn clip_exact_gelu_matches_transformers() {
    let dir = edited_copy(|c| {
        c["text_config"]["hidden_act"] = "gelu".into();
        c["vision_config"]["hidden_act"] = "gelu".into();
    });
    let model = ClipModel::load(dir.path(), &Device::Cpu).unwrap();
    let reference = reference();
    let ours = model.encode_image(&reference["pixels_ab"]).unwrap();
    assert_close(
        "gelu image embeddings",
        &ours,
        &reference["gelu_image_embeds_ab"],
    );
    let ids: Vec<u32> = reference_ids().into_iter().take(4).flatten().collect();
    let ids = Tensor::from_vec(ids, (4, 77), &Device::Cpu).unwrap();
    let ours = model.encode_text(&ids).unwrap();
    assert_close(
        "gelu text embeddings",
        &ours,
        &reference["gelu_text_embeds"],
    );
}

#[test]
fn clip_loads_pytorch_bin_fallback() {
    // Only pytorch_model.bin (float16 pickle from torch.save): the same
    // network up to half-precision rounding of the weights.
    let dir = tempfile::tempdir().unwrap();
    for f in ["config.json", "tokenizer.json"] {
        std::fs::copy(fixture_dir().join(f), dir.path().join(f)).unwrap();
    }
    std::fs::copy(
        fixture_dir().join("pytorch_model_f16.bin"),
        dir.path().join("pytorch_model.bin"),
    )
    .unwrap();
    let model = ClipModel::load(dir.path(), &Device::Cpu).unwrap();
    let reference = reference();
    let ours = model.encode_image(&reference["pixels_ab"]).unwrap();
    let d = max_diff(&ours, &reference["image_embeds_ab"]);
    println!("image embeddings from f16 pytorch_model.bin: max |diff| = {d:.2e}");
    assert!(d < 2e-2, "{d}");
    let ids: Vec<u32> = reference_ids().into_iter().take(3).flatten().collect();
    let ids = Tensor::from_vec(ids, (3, 77), &Device::Cpu).unwrap();
    let ours = model.encode_text(&ids).unwrap();
    let d = max_diff(&ours, &reference["text_embeds"].narrow(0, 0, 3).unwrap());
    assert!(d < 2e-2, "{d}");
}

#[test]
fn clip_load_errors_are_specific() {
    let missing = tempfile::tempdir().unwrap();
    let err = ClipModel::load(missing.path(), &Device::Cpu).unwrap_err();
    assert!(
        matches!(&err, ModelError::MissingFile { what, .. } if what == "config.json"),
        "{err}"
    );

    let dir = edited_copy(|_| {});
    std::fs::remove_file(dir.path().join("model.safetensors")).unwrap();
    let err = ClipModel::load(dir.path(), &Device::Cpu).unwrap_err();
    assert!(err.to_string().contains("model.safetensors"), "{err}");

    let dir = edited_copy(|c| c["vision_config"]["hidden_size"] = 64.into());
    let err = ClipModel::load(dir.path(), &Device::Cpu).unwrap_err();
    assert!(matches!(err, ModelError::Weights { .. }), "{err}");

    let dir = edited_copy(|_| {});
    std::fs::write(dir.path().join("config.json"), "{ nope").unwrap();
    let err = ClipModel::load(dir.path(), &Device::Cpu).unwrap_err();
    assert!(matches!(err, ModelError::Config { .. }), "{err}");

    // A checkpoint without class_embedding is refused (transformers would
    // silently draw a random one).
    let dir = edited_copy(|_| {});
    let weights = dir.path().join("model.safetensors");
    let mut tensors = safetensors::load(&weights, &Device::Cpu).unwrap();
    tensors.remove("vision_model.embeddings.class_embedding");
    safetensors::save(&tensors, &weights).unwrap();
    let err = ClipModel::load(dir.path(), &Device::Cpu).unwrap_err();
    assert!(
        err.to_string()
            .contains("missing tensor vision_model.embeddings.class_embedding"),
        "{err}"
    );

    // Truncated weights.
    let dir = edited_copy(|_| {});
    let weights = dir.path().join("model.safetensors");
    let bytes = std::fs::read(&weights).unwrap();
    std::fs::write(&weights, &bytes[..bytes.len() / 2]).unwrap();
    let err = ClipModel::load(dir.path(), &Device::Cpu).unwrap_err();
    assert!(matches!(err, ModelError::Weights { .. }), "{err}");
}

fn offline_lookup(cache: &Path) -> WeightsLookup {
    WeightsLookup {
        flag_dir: None,
        env_dir: None,
        hub_cache: Some(cache.to_owned()),
        offline: true,
        endpoint: None,
        connect_timeout: Duration::from_secs(1),
    }
}

#[test]
fn clip_weights_missing_offline_fail_fast_with_advice() {
    let cache = tempfile::tempdir().unwrap();
    let start = Instant::now();
    let err = offline_lookup(cache.path()).resolve(&VIT_B_16).unwrap_err();
    assert!(
        start.elapsed() < Duration::from_secs(2),
        "took {:?}",
        start.elapsed()
    );
    assert!(matches!(err, ModelError::NoClipWeights { .. }), "{err}");
    let msg = err.to_string();
    assert!(msg.contains("--clip-weights DIR"), "{msg}");
    assert!(msg.contains("FLAWSCOPE_CLIP_WEIGHTS"), "{msg}");
    assert!(msg.contains("openai/clip-vit-base-patch16"), "{msg}");
}

#[test]
fn clip_weights_found_in_order() {
    let cache = tempfile::tempdir().unwrap();
    // Explicit folders win and must be complete.
    let lookup = WeightsLookup {
        flag_dir: Some(fixture_dir()),
        ..offline_lookup(cache.path())
    };
    let found = lookup.resolve(&VIT_B_16).unwrap();
    assert_eq!(
        (found.dir, found.source),
        (fixture_dir(), WeightsSource::Flag)
    );
    let broken = tempfile::tempdir().unwrap();
    let lookup = WeightsLookup {
        env_dir: Some(broken.path().to_owned()),
        ..offline_lookup(cache.path())
    };
    assert!(matches!(
        lookup.resolve(&VIT_B_16),
        Err(ModelError::MissingFile { .. })
    ));
    // The hub cache layout, at the pinned revision.
    let snapshot = cache
        .path()
        .join("models--openai--clip-vit-base-patch16/snapshots")
        .join(VIT_B_16.revision);
    std::fs::create_dir_all(&snapshot).unwrap();
    for f in ["config.json", "tokenizer.json"] {
        std::fs::copy(fixture_dir().join(f), snapshot.join(f)).unwrap();
    }
    // Incomplete snapshot: still not found.
    assert!(offline_lookup(cache.path()).resolve(&VIT_B_16).is_err());
    std::fs::copy(
        fixture_dir().join("model.safetensors"),
        snapshot.join("model.safetensors"),
    )
    .unwrap();
    let found = offline_lookup(cache.path()).resolve(&VIT_B_16).unwrap();
    assert_eq!(
        (found.dir.clone(), found.source),
        (snapshot, WeightsSource::HubCache)
    );
    assert!(found.model_id().contains(VIT_B_16.revision));
    assert_eq!(found.model_id(), found.clone().model_id());
    ClipModel::load(&found.dir, &Device::Cpu).unwrap();
}

/// The text tower plus its tokenizer, as the WinCLIP scorer would wire them.
struct TextSide<'a> {
    model: &'a ClipModel,
    tokenizer: &'a ClipTokenizer,
}

#[derive(Debug)]
enum TextError {
    Prompt(#[allow(dead_code)] PromptError),
    Model(#[allow(dead_code)] ModelError),
}

impl From<PromptError> for TextError {
    fn from(e: PromptError) -> Self {
        Self::Prompt(e)
    }
}

impl From<ModelError> for TextError {
    fn from(e: ModelError) -> Self {
        Self::Model(e)
    }
}

impl SentenceEncoder for TextSide<'_> {
    type Error = TextError;

    fn model_id(&self) -> String {
        "tiny_clip".into()
    }

    fn encode_sentences(&self, sentences: &[String]) -> Result<Vec<Vec<f32>>, TextError> {
        let batch = self.tokenizer.encode_batch(sentences)?;
        let ids = Tensor::from_vec(batch.ids, (batch.rows, batch.len), self.model.device())
            .map_err(ModelError::from)?;
        let emb = self.model.encode_text(&ids)?;
        Ok(emb.to_vec2::<f32>().map_err(ModelError::from)?)
    }
}

#[test]
fn clip_class_vectors_through_the_cache() {
    let model = model();
    let tokenizer = ClipTokenizer::from_dir(&fixture_dir()).unwrap();
    let side = TextSide {
        model: &model,
        tokenizer: &tokenizer,
    };
    let prompts = PromptSet::winclip()
        .with_defect("scratch on the thread")
        .unwrap();
    let mut cache = TextEmbeddingCache::in_memory();
    let start = Instant::now();
    let v = cache.class_vectors(&side, "screw", &prompts).unwrap();
    let cold = start.elapsed();
    let start = Instant::now();
    let again = cache.class_vectors(&side, "screw", &prompts).unwrap();
    let warm = start.elapsed();
    println!("class vectors: cold {cold:?}, cached {warm:?}");
    assert_eq!(v, again);
    for vector in [&v.normal, &v.anomalous] {
        assert_eq!(vector.len(), 24);
        let norm: f32 = vector.iter().map(|x| x * x).sum::<f32>().sqrt();
        assert!((norm - 1.0).abs() < 1e-5);
    }
    // The mean of the normal sentences, checked against a direct computation.
    let sentences = prompts.sentences("screw");
    let rows = side.encode_sentences(&sentences.normal).unwrap();
    let direct = flawscope_prompts::normalised_mean(&rows).unwrap();
    let d = direct
        .iter()
        .zip(&v.normal)
        .map(|(a, b)| (a - b).abs())
        .fold(0f32, f32::max);
    assert!(d < 1e-6);
}

#[test]
fn vision_patch_tokens_match_transformers_at_an_interpolated_size() {
    // reference_patch_tokens.safetensors: transformers' vision tower at the
    // 40x48 input (10x12 grid from the trained 8x8), class token dropped.
    let reference = safetensors::load(
        fixture_dir().join("reference_patch_tokens.safetensors"),
        &Device::Cpu,
    )
    .unwrap();
    let model = model();
    let pixels = &reference["pixels_rect"];
    let depth = model.config().vision.num_hidden_layers;
    let layers: Vec<usize> = (0..=depth).collect();
    let states = model.vision_hidden_states(pixels, &layers).unwrap();
    for (i, state) in states.iter().enumerate() {
        let n = state.dim(1).unwrap();
        assert_eq!(n, 1 + 10 * 12);
        let patches = state.narrow(1, 1, n - 1).unwrap().squeeze(0).unwrap();
        assert_close(
            &format!("patch tokens of hidden state {i}"),
            &patches,
            &reference[&format!("rect_patch_tokens_{i}")],
        );
    }
    let (_, normed) = model.encode_image_and_patch_tokens(pixels).unwrap();
    assert_close(
        "post-layernormed patch tokens",
        &normed.squeeze(0).unwrap(),
        &reference["rect_patch_tokens_normed"],
    );
}
