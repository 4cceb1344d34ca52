//! CPU speed of WinCLIP through `flawscope_core::winclip`, on random weights
//! of the real CLIP ViT-B/16 shape (no download; accuracy is meaningless).
//!
//! Writes a random `openai/clip-vit-base-patch16`-shaped checkpoint (about
//! 600 MB, deleted on exit) with the tiny test fixture's tokenizer, then
//! reports medians of:
//! - one zero-shot image at 224² (image pass + 169 + 144 windows, text cached),
//!   with the vision tower in f32 and, where the CPU has AVX512-BF16, in bf16,
//! - one few-shot (k = 2) image (f32),
//! - the text side of one object (231 sentences + 1 user prompt) without and
//!   with the class-vector cache.
//!
//! ```text
//! cargo run --release -p flawscope-core --example winclip_speed -- [--runs N] [--image FILE] [--zero-shot-only]
//!     [--precision f32|bf16]
//! ```
//! `--zero-shot-only` skips the uncached text side and the few-shot model
//! (for profiling the image side alone).
//! The fixture tokenizer is a real CLIP BPE cut to 2000 merges, so sentences
//! come out somewhat longer than with the full one (the text cost is an
//! upper bound).

use std::collections::HashMap;
use std::error::Error;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use candle_core::{DType, Device, Tensor};
use flawscope_core::detectors::DetectorConfig;
use flawscope_core::images::{ImageLimits, load_image};
use flawscope_core::model::{FitOptions, Model};
use flawscope_core::progress::NoProgress;
use flawscope_core::runtime::Runtime;
use flawscope_core::winclip::config::{WinClipConfig, prompt_set};
use flawscope_core::winclip::engine::WinClip;
use flawscope_models::clip::{ClipPreprocessor, Precision, ResizeMode, sliding_windows};
use flawscope_models::clip_weights::{VIT_B_16, WeightsLookup};
use image::DynamicImage;

/// `(tower, width, mlp width, layers)`.
const TOWERS: [(&str, usize, usize, usize); 2] = [
    ("text_model", 512, 2048, 12),
    ("vision_model", 768, 3072, 12),
];

const CONFIG: &str = r#"{
  "model_type": "clip", "projection_dim": 512, "logit_scale_init_value": 2.6592,
  "text_config": {"vocab_size": 49408, "hidden_size": 512, "intermediate_size": 2048,
    "num_hidden_layers": 12, "num_attention_heads": 8, "max_position_embeddings": 77,
    "hidden_act": "quick_gelu", "eos_token_id": 2},
  "vision_config": {"hidden_size": 768, "intermediate_size": 3072, "num_hidden_layers": 12,
    "num_attention_heads": 12, "image_size": 224, "patch_size": 16, "num_channels": 3,
    "hidden_act": "quick_gelu"}
}"#;

/// Random weights in the Hugging Face `CLIPModel` layout.
fn write_checkpoint(dir: &Path, tokenizer: &Path) -> Result<(), Box<dyn Error>> {
    let cpu = Device::Cpu;
    let mut tensors: HashMap<String, Tensor> = HashMap::new();
    let mut add = |name: String, shape: &[usize], kind: char| -> candle_core::Result<()> {
        let t = match kind {
            '1' => Tensor::ones(shape, DType::F32, &cpu)?,
            '0' => Tensor::zeros(shape, DType::F32, &cpu)?,
            _ => Tensor::randn(0f32, 0.02, shape, &cpu)?,
        };
        tensors.insert(name, t);
        Ok(())
    };
    for (tower, d, mlp, layers) in TOWERS {
        for i in 0..layers {
            let layer = format!("{tower}.encoder.layers.{i}");
            for proj in ["q_proj", "k_proj", "v_proj", "out_proj"] {
                add(format!("{layer}.self_attn.{proj}.weight"), &[d, d], 'r')?;
                add(format!("{layer}.self_attn.{proj}.bias"), &[d], 'r')?;
            }
            add(format!("{layer}.mlp.fc1.weight"), &[mlp, d], 'r')?;
            add(format!("{layer}.mlp.fc1.bias"), &[mlp], 'r')?;
            add(format!("{layer}.mlp.fc2.weight"), &[d, mlp], 'r')?;
            add(format!("{layer}.mlp.fc2.bias"), &[d], 'r')?;
            for norm in ["layer_norm1", "layer_norm2"] {
                add(format!("{layer}.{norm}.weight"), &[d], '1')?;
                add(format!("{layer}.{norm}.bias"), &[d], '0')?;
            }
        }
    }
    let t = "text_model";
    let v = "vision_model";
    add(
        format!("{t}.embeddings.token_embedding.weight"),
        &[49408, 512],
        'r',
    )?;
    add(
        format!("{t}.embeddings.position_embedding.weight"),
        &[77, 512],
        'r',
    )?;
    add(format!("{v}.embeddings.class_embedding"), &[768], 'r')?;
    add(
        format!("{v}.embeddings.patch_embedding.weight"),
        &[768, 3, 16, 16],
        'r',
    )?;
    add(
        format!("{v}.embeddings.position_embedding.weight"),
        &[197, 768],
        'r',
    )?;
    add("text_projection.weight".into(), &[512, 512], 'r')?;
    add("visual_projection.weight".into(), &[512, 768], 'r')?;
    for (norm, d) in [
        (format!("{t}.final_layer_norm"), 512),
        (format!("{v}.pre_layrnorm"), 768),
        (format!("{v}.post_layernorm"), 768),
    ] {
        add(format!("{norm}.weight"), &[d], '1')?;
        add(format!("{norm}.bias"), &[d], '0')?;
    }
    tensors.insert("logit_scale".into(), Tensor::new(&[4.6052f32], &cpu)?);
    candle_core::safetensors::save(&tensors, dir.join("model.safetensors"))?;
    std::fs::write(dir.join("config.json"), CONFIG)?;
    std::fs::copy(tokenizer, dir.join("tokenizer.json"))?;
    Ok(())
}

/// Median of `runs` timed calls, after one warm-up call.
fn median<T>(
    runs: usize,
    mut f: impl FnMut(usize) -> Result<T, Box<dyn Error>>,
) -> Result<Duration, Box<dyn Error>> {
    f(usize::MAX)?;
    let mut times = Vec::with_capacity(runs);
    for i in 0..runs {
        let start = Instant::now();
        f(i)?;
        times.push(start.elapsed());
    }
    times.sort();
    Ok(times[times.len() / 2])
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

fn main() -> Result<(), Box<dyn Error>> {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..");
    let mut runs = 5usize;
    let mut image_path = root.join("demo/solar_cell/test/defect/cell0001.png");
    let mut zero_shot_only = false;
    let mut only: Option<Precision> = None;
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        match arg.as_str() {
            "--runs" => runs = args.next().ok_or("--runs needs a value")?.parse()?,
            "--image" => image_path = args.next().ok_or("--image needs a file")?.into(),
            "--zero-shot-only" => zero_shot_only = true,
            "--precision" => {
                only = match args.next().as_deref() {
                    Some("f32") => Some(Precision::F32),
                    Some("bf16") => Some(Precision::Bf16),
                    _ => return Err("--precision takes f32 or bf16".into()),
                }
            }
            other => return Err(format!("unknown argument {other}").into()),
        }
    }
    let runs = runs.max(1);
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
    println!("CPU threads available: {threads}");

    let dir = tempfile::tempdir()?;
    let start = Instant::now();
    write_checkpoint(
        dir.path(),
        &root.join("models/tests/fixtures/tiny_clip/tokenizer.json"),
    )?;
    println!(
        "random ViT-B/16 checkpoint written in {:.1?}",
        start.elapsed()
    );
    let start = Instant::now();
    let engine = Arc::new(
        WinClip::from_dir(dir.path(), "ViT-B/16 (random)", None, "flag", &Device::Cpu)?
            .with_vision_precision(Precision::F32)?,
    );
    println!("loaded in {:.1?}", start.elapsed());

    let limits = ImageLimits::default();
    let image = load_image(&image_path, &limits)?;
    let prompts = vec!["scratch on the surface".to_owned()];
    let set = prompt_set(&prompts)?;
    let sentences = set.sentences("metal nut");
    let n_sentences = sentences.normal.len() + sentences.anomalous.len();

    if !zero_shot_only {
        let cold = median(runs.min(3), |i| {
            // A new object name each time: a cache miss, same sentence count.
            Ok(engine.class_vectors(&format!("metal nut {i}"), &set)?)
        })?;
        println!(
            "text side, {n_sentences} sentences, no cache:   {:>9.1} ms",
            ms(cold)
        );
    }
    engine.class_vectors("metal nut", &set)?;
    let warm = median(runs, |_| Ok(engine.class_vectors("metal nut", &set)?))?;
    println!("text side, cached:                   {:>9.4} ms", ms(warm));

    let mut precisions = vec![Precision::F32];
    if engine.clip().bf16_available() {
        precisions.push(Precision::Bf16);
    } else {
        println!("no AVX512-BF16 on this CPU: f32 only");
    }
    let mut runtime = None;
    let mut f32_output = None;
    for precision in precisions {
        if only.is_some_and(|p| p != precision) {
            continue;
        }
        let engine = match precision {
            Precision::F32 => Arc::clone(&engine),
            Precision::Bf16 => Arc::new(
                WinClip::from_dir(dir.path(), "ViT-B/16 (random)", None, "flag", &Device::Cpu)?
                    .with_vision_precision(precision)?,
            ),
        };
        engine.class_vectors("metal nut", &set)?;
        let rt = Runtime::with_clip(
            Device::Cpu,
            WeightsLookup::from_vars(None, |_| None),
            VIT_B_16,
        )
        .with_engine(Arc::clone(&engine));
        let zero_shot_model = Model::zero_shot(&rt, "metal nut", &prompts)?;
        let zero_shot = median(runs, |_| Ok(zero_shot_model.inspect(&image)?))?;
        let output = zero_shot_model.inspect(&image)?;
        match (&f32_output, precision) {
            (None, Precision::F32) => f32_output = Some(output),
            (Some(f32_out), Precision::Bf16) => {
                let map = f32_out
                    .map
                    .values
                    .iter()
                    .zip(&output.map.values)
                    .map(|(a, b)| (a - b).abs())
                    .fold(0f32, f32::max);
                println!(
                    "bf16 drift from f32 (random weights): |Δscore| {:.2e}, max |Δmap| {map:.2e}",
                    (f32_out.raw_score - output.raw_score).abs()
                );
            }
            _ => {}
        }
        println!(
            "{precision:?} zero-shot image {}x{} -> 224² (1 + 169 + 144 windows), text cached: {:>7.1} ms",
            image.width(),
            image.height(),
            ms(zero_shot)
        );

        // Where the time goes: the whole-image pass and the windowed passes.
        let pixels = ClipPreprocessor::new(224)
            .with_mode(ResizeMode::Stretch)
            .tensor(&[DynamicImage::ImageRgb32F(image.clone())], &Device::Cpu)?;
        let clip = engine.clip();
        let whole = median(runs, |_| Ok(clip.encode_image(&pixels)?))?;
        let mut windows = sliding_windows(14, 14, 2, 1);
        windows.extend(sliding_windows(14, 14, 3, 1));
        let windowed = median(runs, |_| Ok(clip.encode_windows(&pixels, &windows)?))?;
        println!("  of which the whole-image pass:     {:>9.1} ms", ms(whole));
        println!(
            "  of which {} windows ({} tokens):  {:>9.1} ms",
            windows.len(),
            windows.iter().map(|w| w.len() + 1).sum::<usize>(),
            ms(windowed)
        );
        if precision == Precision::F32 {
            runtime = Some(rt);
        }
    }
    let Some(runtime) = runtime else {
        return Ok(());
    };

    if zero_shot_only {
        return Ok(());
    }
    let shots = [
        root.join("demo/solar_cell/train/good/cell0004.png"),
        root.join("demo/solar_cell/train/good/cell0009.png"),
    ];
    let options = FitOptions {
        features: None,
        detector: DetectorConfig::WinClip(WinClipConfig {
            shots: shots.len(),
            ..WinClipConfig::zero_shot("metal nut", &prompts)
        }),
        limits,
        ..FitOptions::default()
    };
    let few = Model::fit(&shots, &options, &runtime, &NoProgress)?;
    let few_shot = median(runs, |_| Ok(few.inspect(&image)?))?;
    println!(
        "few-shot (k = 2, memory {}) image:  {:>9.1} ms",
        few.info().memory_bank_size.unwrap_or(0),
        ms(few_shot)
    );
    Ok(())
}
