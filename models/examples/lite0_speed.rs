//! Times the EfficientNet-Lite0 forward pass (logits) on a 224×224 image,
//! batch 1: `cargo run --release -p flawscope-models --example lite0_speed`.
//!
//! Optional arguments: number of timed runs (default 20), then height and
//! width (default 224 224).

use std::time::Instant;

use flawscope_models::candle_core::{Device, Tensor};
use flawscope_models::{EfficientNetLite, ModelError};

fn main() -> Result<(), ModelError> {
    let args: Vec<usize> = std::env::args()
        .skip(1)
        .filter_map(|a| a.parse().ok())
        .collect();
    let runs = args.first().copied().unwrap_or(20).max(1);
    let height = args.get(1).copied().unwrap_or(224);
    let width = args.get(2).copied().unwrap_or(height);
    let device = Device::Cpu;

    let t0 = Instant::now();
    let model = EfficientNetLite::embedded_lite0(&device)?;
    println!("load (embedded weights, BN folding): {:.1} ms", ms(t0));

    let x = Tensor::randn(0f32, 1.0, (1, 3, height, width), &device)?;
    for _ in 0..3 {
        model.logits(&x)?;
    }
    let mut times = Vec::with_capacity(runs);
    for _ in 0..runs {
        let t = Instant::now();
        let logits = model.logits(&x)?;
        // Force the result to the host so the timing includes all work.
        logits.sum_all()?.to_scalar::<f32>()?;
        times.push(ms(t));
    }
    times.sort_by(f64::total_cmp);
    let median = times[times.len() / 2];
    println!(
        "efficientnet-lite0 {height}×{width}, batch 1, {runs} runs: median {median:.1} ms, \
         min {:.1} ms, max {:.1} ms ({} rayon threads)",
        times[0],
        times[times.len() - 1],
        rayon::current_num_threads()
    );
    Ok(())
}

fn ms(t: Instant) -> f64 {
    t.elapsed().as_secs_f64() * 1e3
}
