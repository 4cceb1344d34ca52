//! CPU speed of CLIP ViT-B/16 with random weights of the real shape.
//!
//! Writes a random-weights `openai/clip-vit-base-patch16`-shaped checkpoint
//! into a temporary folder (about 600 MB, deleted on exit), loads it, and
//! reports medians of:
//! - one 224² image embedding,
//! - one zero-shot WinCLIP image: full forward (image + patch tokens) plus
//!   every 2×2 and 3×3 window of the 14×14 grid (169 + 144 windows),
//! - the text embeddings of the whole prompt ensemble of one object, without
//!   and with the class-vector cache.
//!
//! ```text
//! cargo run --release -p flawscope-models --example clip_speed -- [--runs N] [--tokenizer FILE]
//! ```
//! The tokenizer defaults to the tiny test fixture's (a real CLIP BPE cut to
//! 2000 merges, so sentences come out a little longer than with the full one).

use std::collections::HashMap;
use std::error::Error;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use candle_core::{DType, Device, Tensor};
use flawscope_models::ModelError;
use flawscope_models::clip::{ClipModel, sliding_windows};
use flawscope_prompts::{
    ClipTokenizer, PromptError, PromptSet, SentenceEncoder, TextEmbeddingCache,
};

const CONFIG: &str = r#"{
  "model_type": "clip", "projection_dim": 512,
  "text_config": {"vocab_size": 49408, "hidden_size": 512, "intermediate_size": 2048,
    "num_hidden_layers": 12, "num_attention_heads": 8, "max_position_embeddings": 77,
    "hidden_act": "quick_gelu", "layer_norm_eps": 1e-05, "eos_token_id": 2},
  "vision_config": {"hidden_size": 768, "intermediate_size": 3072, "num_hidden_layers": 12,
    "num_attention_heads": 12, "image_size": 224, "patch_size": 16, "num_channels": 3,
    "hidden_act": "quick_gelu", "layer_norm_eps": 1e-05}
}"#;

fn random_checkpoint(dir: &Path) -> Result<(), Box<dyn Error>> {
    std::fs::write(dir.join("config.json"), CONFIG)?;
    let dev = Device::Cpu;
    let mut t: HashMap<String, Tensor> = HashMap::new();
    let mut randn = |name: String, shape: &[usize]| -> candle_core::Result<()> {
        t.insert(name, Tensor::randn(0f32, 0.02, shape, &dev)?);
        Ok(())
    };
    let towers = [
        ("text_model", 512usize, 2048usize),
        ("vision_model", 768, 3072),
    ];
    for (tower, d, mlp) in towers {
        for i in 0..12 {
            let p = format!("{tower}.encoder.layers.{i}");
            for proj in ["q_proj", "k_proj", "v_proj", "out_proj"] {
                randn(format!("{p}.self_attn.{proj}.weight"), &[d, d])?;
                randn(format!("{p}.self_attn.{proj}.bias"), &[d])?;
            }
            randn(format!("{p}.mlp.fc1.weight"), &[mlp, d])?;
            randn(format!("{p}.mlp.fc1.bias"), &[mlp])?;
            randn(format!("{p}.mlp.fc2.weight"), &[d, mlp])?;
            randn(format!("{p}.mlp.fc2.bias"), &[d])?;
        }
    }
    randn(
        "text_model.embeddings.token_embedding.weight".into(),
        &[49408, 512],
    )?;
    randn(
        "text_model.embeddings.position_embedding.weight".into(),
        &[77, 512],
    )?;
    randn("text_projection.weight".into(), &[512, 512])?;
    randn("vision_model.embeddings.class_embedding".into(), &[768])?;
    randn(
        "vision_model.embeddings.patch_embedding.weight".into(),
        &[768, 3, 16, 16],
    )?;
    randn(
        "vision_model.embeddings.position_embedding.weight".into(),
        &[197, 768],
    )?;
    randn("visual_projection.weight".into(), &[512, 768])?;
    let mut norms = vec![
        ("text_model.final_layer_norm".to_owned(), 512),
        ("vision_model.pre_layrnorm".to_owned(), 768),
        ("vision_model.post_layernorm".to_owned(), 768),
    ];
    for (tower, d) in [("text_model", 512), ("vision_model", 768)] {
        for i in 0..12 {
            for ln in ["layer_norm1", "layer_norm2"] {
                norms.push((format!("{tower}.encoder.layers.{i}.{ln}"), d));
            }
        }
    }
    for (name, d) in norms {
        t.insert(format!("{name}.weight"), Tensor::ones(d, DType::F32, &dev)?);
        t.insert(format!("{name}.bias"), Tensor::zeros(d, DType::F32, &dev)?);
    }
    t.insert("logit_scale".into(), Tensor::new(&[4.6052f32], &dev)?);
    candle_core::safetensors::save(&t, dir.join("model.safetensors"))?;
    Ok(())
}

fn median(mut xs: Vec<Duration>) -> Duration {
    xs.sort();
    xs[xs.len() / 2]
}

/// CPU time (user + system) of this process, on Linux; `None` elsewhere.
/// On a busy machine, CPU time / cores estimates the wall time on an idle one.
fn cpu_time() -> Option<Duration> {
    let stat = std::fs::read_to_string("/proc/self/stat").ok()?;
    // Fields after the command name, which is in parentheses.
    let rest = stat.rsplit_once(')')?.1;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let ticks: u64 = fields.get(11)?.parse::<u64>().ok()? + fields.get(12)?.parse::<u64>().ok()?;
    Some(Duration::from_millis(ticks * 10)) // USER_HZ is 100 on Linux
}

fn time<T>(
    runs: usize,
    mut f: impl FnMut() -> Result<T, Box<dyn Error>>,
) -> Result<Duration, Box<dyn Error>> {
    f()?; // warm-up
    let mut times = Vec::with_capacity(runs);
    let cpu_start = cpu_time();
    for _ in 0..runs {
        let start = Instant::now();
        f()?;
        times.push(start.elapsed());
    }
    if let (Some(a), Some(b)) = (cpu_start, cpu_time()) {
        print!(
            "[cpu {:>7.1} ms/run] ",
            (b - a).as_secs_f64() * 1e3 / runs as f64
        );
    }
    Ok(median(times))
}

struct TextSide<'a> {
    model: &'a ClipModel,
    tokenizer: &'a ClipTokenizer,
}

#[derive(Debug)]
struct TextError(String);

impl From<PromptError> for TextError {
    fn from(e: PromptError) -> Self {
        Self(e.to_string())
    }
}

impl From<ModelError> for TextError {
    fn from(e: ModelError) -> Self {
        Self(e.to_string())
    }
}

impl SentenceEncoder for TextSide<'_> {
    type Error = TextError;

    fn model_id(&self) -> String {
        "random-vit-b-16".into()
    }

    fn encode_sentences(&self, sentences: &[String]) -> Result<Vec<Vec<f32>>, TextError> {
        let batch = self.tokenizer.encode_batch(sentences)?;
        let ids = Tensor::from_vec(batch.ids, (batch.rows, batch.len), self.model.device())
            .map_err(ModelError::from)?;
        let emb = self.model.encode_text(&ids)?;
        Ok(emb.to_vec2::<f32>().map_err(ModelError::from)?)
    }
}

fn main() -> Result<(), Box<dyn Error>> {
    let mut runs = 5usize;
    let mut tokenizer_path =
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/tiny_clip/tokenizer.json");
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        match arg.as_str() {
            "--runs" => runs = args.next().ok_or("--runs needs a value")?.parse()?,
            "--tokenizer" => tokenizer_path = args.next().ok_or("--tokenizer needs a file")?.into(),
            other => return Err(format!("unknown argument {other}").into()),
        }
    }

    let dir = tempfile::tempdir()?;
    let start = Instant::now();
    random_checkpoint(dir.path())?;
    println!(
        "random ViT-B/16 checkpoint written in {:.1?}",
        start.elapsed()
    );
    let start = Instant::now();
    let model = ClipModel::load(dir.path(), &Device::Cpu)?;
    println!("loaded in {:.1?}", start.elapsed());
    let tokenizer = ClipTokenizer::from_file(&tokenizer_path)?;

    // Machine reference: a ViT-B/16 MLP-sized product, weight used transposed
    // (as the model does) and pre-transposed.
    let x = Tensor::randn(0f32, 1.0, (197, 768), &Device::Cpu)?;
    let w = Tensor::randn(0f32, 1.0, (3072, 768), &Device::Cpu)?;
    let wt = w.t()?.contiguous()?;
    let flops = 2.0 * 197.0 * 768.0 * 3072.0;
    let gemm_t = time(runs * 4, || Ok(x.matmul(&w.t()?)?))?;
    let gemm_c = time(runs * 4, || Ok(x.matmul(&wt)?))?;
    println!(
        "gemm 197x768 · 768x3072: {:.1} GFLOP/s (transposed view), {:.1} GFLOP/s (contiguous)",
        flops / gemm_t.as_secs_f64() / 1e9,
        flops / gemm_c.as_secs_f64() / 1e9
    );

    let pixels = Tensor::randn(0f32, 1.0, (1, 3, 224, 224), &Device::Cpu)?;
    let one = time(runs, || Ok(model.encode_image(&pixels)?))?;
    println!(
        "image embedding, 1 × 224²:             {:>8.1} ms",
        one.as_secs_f64() * 1e3
    );

    let batch = Tensor::randn(0f32, 1.0, (8, 3, 224, 224), &Device::Cpu)?;
    let eight = time(runs.min(3), || Ok(model.encode_image(&batch)?))?;
    println!(
        "image embedding, batch of 8:            {:>8.1} ms ({:.1} ms/image)",
        eight.as_secs_f64() * 1e3,
        eight.as_secs_f64() * 1e3 / 8.0
    );

    let mut windows = sliding_windows(14, 14, 2, 1);
    windows.extend(sliding_windows(14, 14, 3, 1));
    let only_windows = time(runs, || Ok(model.encode_windows(&pixels, &windows)?))?;
    println!(
        "{} windows (2×2 + 3×3), batched:       {:>8.1} ms",
        windows.len(),
        only_windows.as_secs_f64() * 1e3
    );
    let zero_shot = time(runs, || {
        let (image, patches) = model.encode_image_and_patches(&pixels)?;
        let w = model.encode_windows(&pixels, &windows)?;
        Ok((image, patches, w))
    })?;
    println!(
        "zero-shot image (full + patches + windows): {:>4.1} ms",
        zero_shot.as_secs_f64() * 1e3
    );

    let prompts = PromptSet::winclip();
    let sentences = prompts.sentences("metal nut");
    let n = sentences.normal.len() + sentences.anomalous.len();
    let ids = tokenizer.encode_batch(&sentences.normal)?;
    let longest = (0..ids.rows)
        .filter_map(|r| ids.row(r))
        .map(|row| {
            row.iter()
                .position(|&id| id == tokenizer.eos_id())
                .unwrap_or(0)
                + 1
        })
        .max()
        .unwrap_or(0);
    let side = TextSide {
        model: &model,
        tokenizer: &tokenizer,
    };
    let cold = time(runs.min(3), || {
        let mut cache = TextEmbeddingCache::in_memory();
        cache
            .class_vectors(&side, "metal nut", &prompts)
            .map_err(|e| e.0.clone())?;
        Ok(())
    })?;
    println!(
        "text ensemble, {n} sentences (≤{longest} tokens), no cache: {:>6.1} ms",
        cold.as_secs_f64() * 1e3
    );
    let mut cache = TextEmbeddingCache::in_memory();
    cache
        .class_vectors(&side, "metal nut", &prompts)
        .map_err(|e| e.0.clone())?;
    let warm = time(runs, || {
        cache
            .class_vectors(&side, "metal nut", &prompts)
            .map_err(|e| e.0.clone())?;
        Ok(())
    })?;
    println!(
        "text ensemble, cached:                  {:>8.3} ms",
        warm.as_secs_f64() * 1e3
    );
    Ok(())
}
