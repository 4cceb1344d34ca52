//! Builds a validation set from normal training images only, for choosing
//! settings without test labels: the first K images by path become
//! `train/good` (what `--shots K` fits on), and the images after them are
//! dealt in turn to `test/good` (held-back normals) and to one folder per
//! synthetic defect kind (`test/<kind>`, pasted in by the same code `fit`
//! uses to estimate missed alarms). The layout is MVTec's, so
//! `flawscope eval --dataset OUT --shots K` scores it.
//!
//! ```sh
//! cargo run --release -p flawscope-core --example validation_set -- \
//!     ../shared/data/mtd/magnetic_tile/train/good /tmp/mtd-val/magnetic_tile 16 100
//! ```
//!
//! Arguments: TRAIN_FOLDER OUT_CATEGORY_FOLDER SHOTS PER_FOLDER (images in
//! `test/good` and in each defect folder).

use std::path::{Path, PathBuf};

use flawscope_core::images::{ImageLimits, load_image};
use flawscope_core::synthetic::{DefectKind, with_defect};
use image::DynamicImage;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let [train, out, shots, per_folder] = args.as_slice() else {
        return Err(
            "usage: validation_set TRAIN_FOLDER OUT_CATEGORY_FOLDER SHOTS PER_FOLDER".into(),
        );
    };
    let (shots, per_folder): (usize, usize) = (shots.parse()?, per_folder.parse()?);
    let mut paths: Vec<PathBuf> = std::fs::read_dir(train)?
        .map(|entry| entry.map(|e| e.path()))
        .collect::<Result<_, _>>()?;
    paths.retain(|p| p.is_file());
    paths.sort();
    let folders = 1 + DefectKind::ALL.len();
    if paths.len() < shots + folders * per_folder {
        return Err(format!(
            "{} images: {shots} shots and {folders} folders of {per_folder} need {}",
            paths.len(),
            shots + folders * per_folder
        )
        .into());
    }
    let out = Path::new(out);
    let train_out = out.join("train/good");
    std::fs::create_dir_all(&train_out)?;
    for path in &paths[..shots] {
        let name = path
            .file_name()
            .ok_or("a training path without a file name")?;
        std::fs::copy(path, train_out.join(name))?;
    }
    // The held-back images are spread over the rest in path order, so each
    // folder draws from the whole range (names often group by batch).
    let rest = &paths[shots..];
    let step = rest.len() / (folders * per_folder);
    let limits = ImageLimits::default();
    for slot in 0..folders * per_folder {
        let path = &rest[slot * step];
        let folder = slot % folders;
        let image = load_image(path, &limits)?;
        let (name, image) = match folder {
            0 => ("good", image),
            f => {
                let kind = DefectKind::ALL[f - 1];
                (kind.name(), with_defect(&image, kind, slot))
            }
        };
        let dir = out.join("test").join(name);
        std::fs::create_dir_all(&dir)?;
        let stem = path.file_stem().ok_or("a path without a file name")?;
        let file = dir.join(Path::new(stem).with_extension("png"));
        DynamicImage::ImageRgb32F(image).to_rgb8().save(&file)?;
    }
    println!(
        "{shots} shots, {per_folder} held-back normals and {per_folder} per defect kind in {}",
        out.display()
    );
    Ok(())
}
