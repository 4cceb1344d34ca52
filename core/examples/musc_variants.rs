//! Mutual scoring (`flawscope_core::musc`) of a dataset category's test set
//! with settings other than the defaults, to measure each variant's image
//! and pixel AUROC the way `eval --detector musc` does (docs/musc.md lists
//! the attempts). Prints one JSON report.
//!
//! ```text
//! cargo run --release -p flawscope-core --example musc_variants -- DATASET CATEGORY
//!     [--side PX] [--stages stage4,stage3,stage5] [--degrees 1,3,5] [--interval 0.3]
//!     [--rescore 1,2,3]   (default: off)
//! ```

use std::error::Error;
use std::path::PathBuf;

use flawscope_core::dataset::Dataset;
use flawscope_core::evaluation::evaluate_batch;
use flawscope_core::features::{FeatureConfig, Resize, parse_stage};
use flawscope_core::images::ImageLimits;
use flawscope_core::musc::MuscConfig;
use flawscope_core::progress::NoProgress;
use flawscope_core::runtime::Runtime;

fn main() -> Result<(), Box<dyn Error>> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let (Some(dataset), Some(category)) = (args.first(), args.get(1)) else {
        return Err(
            "usage: musc_variants DATASET CATEGORY [--side PX] [--stages A,B] \
                    [--degrees 1,3,5] [--interval F]"
                .into(),
        );
    };
    let value = |flag: &str| {
        args.iter()
            .position(|a| a == flag)
            .and_then(|i| args.get(i + 1))
            .cloned()
    };
    let mut config = MuscConfig::default();
    let side: u32 = value("--side").map_or(Ok(224), |s| s.parse())?;
    let stages = match value("--stages") {
        Some(list) => list
            .split(',')
            .map(parse_stage)
            .collect::<Result<Vec<_>, _>>()?,
        None => config.features.stages.clone(),
    };
    config.features = FeatureConfig::lite0(&stages, Resize::KeepAspect { side });
    if let Some(list) = value("--degrees") {
        config.degrees = list
            .split(',')
            .map(str::parse)
            .collect::<Result<Vec<_>, _>>()?;
    }
    if let Some(list) = value("--rescore") {
        config.rescore = list
            .split(',')
            .map(str::parse)
            .filter(|k| *k != Ok(0))
            .collect::<Result<Vec<_>, _>>()?;
    }
    if let Some(f) = value("--interval") {
        config.interval = f.parse()?;
    }
    let dataset = Dataset::open(&PathBuf::from(dataset))?;
    let category = dataset.category(category)?.clone();
    let runtime = Runtime::new(candle_core::Device::Cpu);
    let report = evaluate_batch(
        &category,
        &config,
        &runtime,
        &ImageLimits::default(),
        &NoProgress,
    )?;
    eprintln!(
        "side {side}, stages {:?}, degrees {:?}, interval {}, rescore {:?}",
        stages.iter().map(|s| s.name()).collect::<Vec<_>>(),
        config.degrees,
        config.interval,
        config.rescore
    );
    println!("{}", serde_json::to_string(&report)?);
    Ok(())
}
