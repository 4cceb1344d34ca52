//! Builds the thin-line test set (`demo/thin_lines`): thin dark and bright
//! lines, 1–6 px wide, on real normal texture at native resolution, in two
//! shapes a resize-to-224² detector handles badly:
//!
//! - `tall`: 256 × 1 200 px, four normal solar cells stacked (each cropped
//!   to 256 px wide at a random offset);
//! - `strip`: 4 096 × 256 px line-scan-like strips, fourteen cells side by
//!   side (each cropped to 256 px tall).
//!
//! The texture is the demo's normal ELPV cells (CC BY-NC-SA 4.0, see
//! `demo/LICENSE.md`); the first 60 (by name) build the normal training
//! images, the other 40 the test images. Every line is straight, 100–400 px
//! long at a random angle, darker or brighter by 0.25 (0–1 scale), with a
//! pixel mask in `ground_truth/` (MVTec layout). Everything is drawn from a
//! fixed seed, so the set is reproducible (the committed set is scale 1,
//! a few MB; an optional third argument multiplies every count, for a
//! larger uncommitted set):
//!
//! ```sh
//! cargo run --release -p flawscope-core --example thin_lines -- \
//!     demo/solar_cell/train/good demo/thin_lines
//! ```

use std::path::{Path, PathBuf};

use flawscope_core::synthetic::draw_line;
use image::{DynamicImage, GrayImage, Luma, Rgb32FImage, imageops};
use rand::{Rng, SeedableRng, rngs::StdRng};

const SEED: u64 = 0x7417;
const CELL_CROP: u32 = 256;

struct Shape {
    name: &'static str,
    cells: usize,
    /// Cells side by side (else stacked).
    across: bool,
    /// Final size.
    size: (u32, u32),
    train: usize,
    test_good: usize,
    test_lines: usize,
}

const SHAPES: [Shape; 2] = [
    Shape {
        name: "tall",
        cells: 4,
        across: false,
        size: (CELL_CROP, 1200),
        train: 6,
        test_good: 3,
        test_lines: 3,
    },
    Shape {
        name: "strip",
        cells: 14,
        across: true,
        size: (4096, CELL_CROP),
        train: 2,
        test_good: 2,
        test_lines: 2,
    },
];

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let (cells_dir, out_dir, scale) = match args.as_slice() {
        [cells, out] => (cells, out, 1),
        [cells, out, scale] => (cells, out, scale.parse::<usize>()?.max(1)),
        _ => return Err("usage: thin_lines CELL_FOLDER OUT_FOLDER [SCALE]".into()),
    };
    let mut cells: Vec<PathBuf> = std::fs::read_dir(cells_dir)?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|e| e == "png"))
        .collect();
    cells.sort();
    if cells.len() < 100 {
        return Err(format!(
            "need 100 normal cells in {cells_dir}, found {}",
            cells.len()
        )
        .into());
    }
    let cells: Vec<GrayImage> = cells
        .iter()
        .map(|p| image::open(p).map(|i| i.to_luma8()))
        .collect::<Result<_, _>>()?;
    let (train_cells, test_cells) = cells.split_at(60);
    let mut rng = StdRng::seed_from_u64(SEED);
    for shape in &SHAPES {
        let root = Path::new(out_dir).join(shape.name);
        for i in 0..shape.train * scale {
            let image = compose(shape, train_cells, &mut rng);
            save(&image, &root.join("train/good"), i)?;
        }
        for i in 0..shape.test_good * scale {
            let image = compose(shape, test_cells, &mut rng);
            save(&image, &root.join("test/good"), i)?;
        }
        for (kind, delta) in [("dark_line", -0.25f32), ("bright_line", 0.25)] {
            for i in 0..shape.test_lines * scale {
                let base = compose(shape, test_cells, &mut rng);
                // Widths cycle through 1–6 px.
                let width = 1.0 + ((i + usize::from(delta > 0.0) * 3) % 6) as f32;
                let (image, mask) = with_line(&base, width, delta, &mut rng);
                save(&image, &root.join("test").join(kind), i)?;
                let masks = root.join("ground_truth").join(kind);
                std::fs::create_dir_all(&masks)?;
                write_png(&mask, &masks.join(format!("{i:03}_mask.png")))?;
            }
        }
    }
    Ok(())
}

/// Normal cells, cropped to `CELL_CROP` across the joining direction at a
/// random offset, joined side by side or stacked, cut to the shape's size.
fn compose(shape: &Shape, cells: &[GrayImage], rng: &mut StdRng) -> GrayImage {
    let (w, h) = shape.size;
    let mut out = GrayImage::new(w, h);
    let mut at = 0u32;
    for _ in 0..shape.cells {
        let cell = &cells[rng.random_range(0..cells.len())];
        let (cw, ch) = cell.dimensions();
        let piece = if shape.across {
            let y = rng.random_range(0..=ch - CELL_CROP);
            imageops::crop_imm(cell, 0, y, cw, CELL_CROP).to_image()
        } else {
            let x = rng.random_range(0..=cw - CELL_CROP);
            imageops::crop_imm(cell, x, 0, CELL_CROP, ch).to_image()
        };
        let (x, y) = if shape.across { (at, 0) } else { (0, at) };
        imageops::replace(&mut out, &piece, i64::from(x), i64::from(y));
        at += if shape.across {
            piece.width()
        } else {
            piece.height()
        };
    }
    out
}

/// One straight line of `width` px, 100–400 px long, at a random place and
/// angle; the image and its mask (line pixels at least half covered).
fn with_line(base: &GrayImage, width: f32, delta: f32, rng: &mut StdRng) -> (GrayImage, GrayImage) {
    let (w, h) = base.dimensions();
    let length = rng.random_range(100.0..400.0f32).min(w.max(h) as f32 * 0.8);
    let angle = rng.random_range(0.0..std::f32::consts::PI);
    let margin = |side: u32| (side as f32 * 0.1).max(1.0);
    let centre = (
        rng.random_range(margin(w)..w as f32 - margin(w)),
        rng.random_range(margin(h)..h as f32 - margin(h)),
    );
    let mut image = DynamicImage::ImageLuma8(base.clone()).to_rgb32f();
    draw_line(&mut image, centre, angle, length, width, delta);
    let mut coverage = Rgb32FImage::new(w, h);
    draw_line(&mut coverage, centre, angle, length, width, 1.0);
    let mask = GrayImage::from_fn(w, h, |x, y| {
        Luma([if coverage.get_pixel(x, y).0[0] >= 0.5 {
            255
        } else {
            0
        }])
    });
    (DynamicImage::ImageRgb32F(image).to_luma8(), mask)
}

fn save(image: &GrayImage, dir: &Path, index: usize) -> Result<(), Box<dyn std::error::Error>> {
    std::fs::create_dir_all(dir)?;
    write_png(image, &dir.join(format!("{index:03}.png")))
}

/// PNG at the best compression (the set is committed).
fn write_png(image: &GrayImage, path: &Path) -> Result<(), Box<dyn std::error::Error>> {
    use image::codecs::png::{CompressionType, FilterType, PngEncoder};
    let file = std::io::BufWriter::new(std::fs::File::create(path)?);
    let encoder = PngEncoder::new_with_quality(file, CompressionType::Best, FilterType::Adaptive);
    image.write_with_encoder(encoder)?;
    Ok(())
}
