//! Builds the parts test set (`demo/parts`): drawn grey parts, in the two
//! cases where tiling cuts both ways (see `docs/tiling.md`):
//!
//! - `tall`: 320 × 860–940 px (≥ 2.7:1) turned parts at native resolution:
//!   a shaded cylinder with rounded ends at varying heights, segment grooves
//!   at a random phase, fine grain and a few small bright glints that every
//!   normal part has somewhere; the defects are thin cracks (1.5–2.5 px
//!   wide, 120–300 px long, within 35° of the part's axis), slightly darker
//!   (by 0.07–0.12). Tiles see the cracks sharply, and
//!   the glints too.
//! - `whole`: 480 × 480 px flanges: a plate with six bolts on a circle and
//!   a hub, turned by a random angle; the defects are a bolt missing
//!   (`missing_bolt`) or a bolt moved off its circle (`moved_bolt`). Every
//!   patch of a defective part still looks like some patch of a normal one:
//!   only the whole part shows the defect.
//!
//! Every count and shape comes from a fixed seed, so the set is
//! reproducible; the committed set is scale 1, an optional second argument
//! multiplies every count, for a larger set that is not committed:
//!
//! ```sh
//! cargo run --release -p flawscope-core --example parts -- demo/parts
//! cargo run --release -p flawscope-core --example parts -- /tmp/parts4 4
//! ```

use std::f32::consts::{PI, TAU};
use std::path::Path;

use image::{GrayImage, Luma};
use rand::{Rng, SeedableRng, rngs::StdRng};

const SEED: u64 = 0x9a47;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let (out_dir, scale) = match args.as_slice() {
        [out] => (out, 1),
        [out, scale] => (out, scale.parse::<usize>()?.max(1)),
        _ => return Err("usage: parts OUT_FOLDER [SCALE]".into()),
    };
    let mut rng = StdRng::seed_from_u64(SEED);
    let tall = Path::new(out_dir).join("tall");
    for i in 0..16 * scale {
        save(&tall_part(&mut rng), &tall.join("train/good"), i)?;
    }
    for i in 0..6 * scale {
        save(&tall_part(&mut rng), &tall.join("test/good"), i)?;
    }
    for i in 0..6 * scale {
        let mut image = tall_part(&mut rng);
        let mask = crack(&mut image, &mut rng);
        save(&image, &tall.join("test/crack"), i)?;
        save_mask(&mask, &tall.join("ground_truth/crack"), i)?;
    }

    let whole = Path::new(out_dir).join("whole");
    for i in 0..12 * scale {
        save(&flange(&mut rng, None).0, &whole.join("train/good"), i)?;
    }
    for i in 0..6 * scale {
        save(&flange(&mut rng, None).0, &whole.join("test/good"), i)?;
    }
    for (name, defect) in [
        ("missing_bolt", BoltDefect::Missing),
        ("moved_bolt", BoltDefect::Moved),
    ] {
        for i in 0..3 * scale {
            let (image, mask) = flange(&mut rng, Some(defect));
            save(&image, &whole.join("test").join(name), i)?;
            save_mask(&mask, &whole.join("ground_truth").join(name), i)?;
        }
    }
    Ok(())
}

/// Values on a 0–1 scale, written as 8-bit grey.
struct Canvas {
    width: u32,
    height: u32,
    values: Vec<f32>,
}

impl Canvas {
    fn new(width: u32, height: u32, fill: impl Fn(f32, f32) -> f32) -> Self {
        let values = (0..height)
            .flat_map(|y| (0..width).map(move |x| (x as f32 + 0.5, y as f32 + 0.5)))
            .map(|(x, y)| fill(x, y))
            .collect();
        Self {
            width,
            height,
            values,
        }
    }

    /// Adds `delta · alpha(x, y)` where `alpha > 0`, within the box.
    fn shade(&mut self, bounds: (f32, f32, f32, f32), delta: f32, alpha: impl Fn(f32, f32) -> f32) {
        let (x0, y0, x1, y1) = bounds;
        let clip = |v: f32, limit: u32| (v.max(0.0) as u32).min(limit);
        for y in clip(y0, self.height)..clip(y1.ceil(), self.height) {
            for x in clip(x0, self.width)..clip(x1.ceil(), self.width) {
                let a = alpha(x as f32 + 0.5, y as f32 + 0.5);
                if a > 0.0 {
                    self.values[(y * self.width + x) as usize] += delta * a;
                }
            }
        }
    }

    fn to_gray(&self) -> GrayImage {
        GrayImage::from_fn(self.width, self.height, |x, y| {
            let v = self.values[(y * self.width + x) as usize];
            Luma([(v.clamp(0.0, 1.0) * 255.0).round() as u8])
        })
    }
}

/// Smooth value noise: a coarse random grid, bilinearly interpolated.
fn value_noise(
    rng: &mut StdRng,
    width: u32,
    height: u32,
    cell: f32,
) -> impl Fn(f32, f32) -> f32 + use<> {
    let gw = (width as f32 / cell).ceil() as usize + 2;
    let gh = (height as f32 / cell).ceil() as usize + 2;
    let grid: Vec<f32> = (0..gw * gh).map(|_| rng.random_range(-1.0..1.0)).collect();
    move |x, y| {
        let (gx, gy) = (x / cell, y / cell);
        let (ix, iy) = (gx.floor() as usize, gy.floor() as usize);
        let (fx, fy) = (gx.fract(), gy.fract());
        let at = |i: usize, j: usize| grid[(j.min(gh - 1)) * gw + i.min(gw - 1)];
        let top = at(ix, iy) * (1.0 - fx) + at(ix + 1, iy) * fx;
        let bottom = at(ix, iy + 1) * (1.0 - fx) + at(ix + 1, iy + 1) * fx;
        top * (1.0 - fy) + bottom * fy
    }
}

/// A soft disc's coverage at distance `d` from its centre.
fn disc(d: f32, radius: f32) -> f32 {
    (radius + 0.5 - d).clamp(0.0, 1.0)
}

/// Width, and the range of heights (parts end at different places).
const TALL_WIDTH: u32 = 320;
const TALL_HEIGHTS: std::ops::RangeInclusive<u32> = 860..=940;
/// Background above and below the part: 30–110 px at each end.
const TALL_ENDS: std::ops::Range<f32> = 30.0..110.0;

/// A normal tall part.
fn tall_part(rng: &mut StdRng) -> GrayImage {
    let (w, h) = (TALL_WIDTH, rng.random_range(TALL_HEIGHTS));
    let (top, bottom) = (
        rng.random_range(TALL_ENDS),
        h as f32 - rng.random_range(TALL_ENDS),
    );
    let grain = value_noise(rng, w, h, 3.0);
    let shade = value_noise(rng, w, h, 160.0);
    let axis = w as f32 / 2.0 + rng.random_range(-8.0..8.0);
    let half = w as f32 * rng.random_range(0.36..0.40);
    let pitch = rng.random_range(54.0..62.0f32);
    let phase = rng.random_range(0.0..pitch);
    let brightness = rng.random_range(0.42..0.50f32);
    let mut canvas = Canvas::new(w, h, |x, y| {
        // The ends are rounded over 24 px.
        let end = ((y - top).min(bottom - y) / 24.0).min(1.0);
        if end <= 0.0 {
            return 0.08 + 0.02 * grain(x, y);
        }
        let across = (x - axis) / (half * end.sqrt());
        if across.abs() >= 1.0 {
            return 0.08 + 0.02 * grain(x, y);
        }
        // A cylinder lit from the front: bright along the axis.
        let cylinder = (1.0 - across * across).sqrt();
        let groove = {
            let d = ((y - phase).rem_euclid(pitch) - pitch / 2.0).abs() - pitch / 2.0 + 1.5;
            (d + 0.5).clamp(0.0, 1.0)
        };
        brightness * (0.55 + 0.45 * cylinder) + 0.03 * grain(x, y) + 0.04 * shade(x, y)
            - 0.12 * groove
    });
    let glints: Vec<(f32, f32)> = (0..rng.random_range(2..=7))
        .map(|_| {
            (
                axis + half * rng.random_range(-0.8..0.8f32),
                rng.random_range(top + 10.0..bottom - 10.0),
            )
        })
        .collect();
    for &(gx, gy) in &glints {
        let (rx, ry) = (rng.random_range(2.0..6.0f32), rng.random_range(2.0..9.0f32));
        let strength = rng.random_range(0.15..0.55);
        canvas.shade(
            (gx - rx - 1.0, gy - ry - 1.0, gx + rx + 1.0, gy + ry + 1.0),
            strength,
            |x, y| {
                let d = ((x - gx) / rx).hypot((y - gy) / ry);
                ((1.0 - d) * 2.0).clamp(0.0, 1.0)
            },
        );
    }
    canvas.to_gray()
}

/// A thin dark crack along the part's axis (within 35°) drawn into `image`;
/// its mask.
fn crack(image: &mut GrayImage, rng: &mut StdRng) -> GrayImage {
    let (w, h) = image.dimensions();
    let length = rng.random_range(120.0..300.0f32);
    let angle = PI / 2.0 + rng.random_range(-0.6..0.6f32);
    let width = rng.random_range(1.5..2.5f32);
    let depth = rng.random_range(0.07..0.12f32);
    let centre = (
        w as f32 / 2.0 + rng.random_range(-50.0..50.0f32),
        rng.random_range(TALL_ENDS.end + length / 2.0..h as f32 - TALL_ENDS.end - length / 2.0),
    );
    // A slight bend: the crack's offset across its direction.
    let bend = rng.random_range(-8.0..8.0f32);
    let (dx, dy) = (angle.cos(), angle.sin());
    let coverage = |x: f32, y: f32| {
        let (px, py) = (x - centre.0, y - centre.1);
        let along = px * dx + py * dy;
        let t = along / (length / 2.0);
        if t.abs() > 1.0 {
            return 0.0;
        }
        let across = (-px * dy + py * dx - bend * (1.0 - t * t)).abs();
        (width / 2.0 + 0.5 - across).clamp(0.0, 1.0)
    };
    let mask = GrayImage::from_fn(w, h, |x, y| {
        Luma([if coverage(x as f32 + 0.5, y as f32 + 0.5) >= 0.5 {
            255
        } else {
            0
        }])
    });
    for (x, y, p) in image.enumerate_pixels_mut() {
        let a = coverage(x as f32 + 0.5, y as f32 + 0.5);
        if a > 0.0 {
            p.0[0] = (f32::from(p.0[0]) - 255.0 * depth * a).clamp(0.0, 255.0) as u8;
        }
    }
    mask
}

#[derive(Clone, Copy)]
enum BoltDefect {
    Missing,
    Moved,
}

const FLANGE: u32 = 480;
const BOLTS: usize = 6;

/// A flange (plate, hub, six bolts on a circle), turned by a random angle,
/// with one bolt missing or moved; the image and its mask (where the bolt
/// was and, when moved, where it is).
fn flange(rng: &mut StdRng, defect: Option<BoltDefect>) -> (GrayImage, GrayImage) {
    let side = FLANGE as f32;
    let grain = value_noise(rng, FLANGE, FLANGE, 4.0);
    let (cx, cy) = (
        side / 2.0 + rng.random_range(-6.0..6.0f32),
        side / 2.0 + rng.random_range(-6.0..6.0f32),
    );
    let plate = side * 0.42;
    let circle = side * 0.29;
    let bolt = side * 0.045;
    let turn = rng.random_range(0.0..TAU);
    let mut bolts: Vec<(f32, f32)> = (0..BOLTS)
        .map(|i| {
            let a = turn + TAU * i as f32 / BOLTS as f32;
            (cx + circle * a.cos(), cy + circle * a.sin())
        })
        .collect();
    let mut marked: Vec<(f32, f32)> = Vec::new();
    let victim = rng.random_range(0..BOLTS);
    match defect {
        None => {}
        Some(BoltDefect::Missing) => marked.push(bolts.remove(victim)),
        Some(BoltDefect::Moved) => {
            let (bx, by) = bolts[victim];
            // Along the circle by a third of the spacing, or inward.
            let moved = if rng.random_bool(0.5) {
                let a = (by - cy).atan2(bx - cx) + TAU / BOLTS as f32 / 3.0;
                (cx + circle * a.cos(), cy + circle * a.sin())
            } else {
                let inward = circle * 0.62;
                let a = (by - cy).atan2(bx - cx);
                (cx + inward * a.cos(), cy + inward * a.sin())
            };
            marked.push((bx, by));
            marked.push(moved);
            bolts[victim] = moved;
        }
    }
    let canvas = Canvas::new(FLANGE, FLANGE, |x, y| {
        let r = (x - cx).hypot(y - cy);
        let mut v = 0.12 + 0.02 * grain(x, y);
        let on_plate = disc(r, plate);
        // The plate: brushed (radial streaks), a chamfered rim.
        let streak = 0.02 * ((y - cy).atan2(x - cx) * 90.0).sin();
        v += on_plate
            * (0.38 + streak + 0.03 * grain(x, y) - 0.10 * disc(r, plate) * disc(plate - 6.0, r));
        // The hub: a raised ring and a dark bore.
        v += 0.18 * disc(r, side * 0.11) - 0.30 * disc(r, side * 0.05);
        for &(bx, by) in &bolts {
            let d = (x - bx).hypot(y - by);
            v += 0.32 * disc(d, bolt) - 0.22 * disc(d, bolt * 0.45);
        }
        v
    });
    let mask = GrayImage::from_fn(FLANGE, FLANGE, |x, y| {
        let inside = marked
            .iter()
            .any(|&(bx, by)| (x as f32 + 0.5 - bx).hypot(y as f32 + 0.5 - by) <= bolt + 1.0);
        Luma([if inside { 255 } else { 0 }])
    });
    (canvas.to_gray(), mask)
}

fn save(image: &GrayImage, dir: &Path, index: usize) -> Result<(), Box<dyn std::error::Error>> {
    std::fs::create_dir_all(dir)?;
    write_png(image, &dir.join(format!("{index:03}.png")))
}

fn save_mask(mask: &GrayImage, dir: &Path, index: usize) -> Result<(), Box<dyn std::error::Error>> {
    std::fs::create_dir_all(dir)?;
    write_png(mask, &dir.join(format!("{index:03}_mask.png")))
}

/// PNG at the best compression (the set is committed).
fn write_png(image: &GrayImage, path: &Path) -> Result<(), Box<dyn std::error::Error>> {
    use image::codecs::png::{CompressionType, FilterType, PngEncoder};
    let file = std::io::BufWriter::new(std::fs::File::create(path)?);
    let encoder = PngEncoder::new_with_quality(file, CompressionType::Best, FilterType::Adaptive);
    image.write_with_encoder(encoder)?;
    Ok(())
}
