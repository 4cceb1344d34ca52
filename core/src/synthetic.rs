//! Synthetic defects, for estimating the missed-alarm rate at fit time.
//!
//! No labelled defect is needed to fit a model, so none is at hand to say
//! how many real defects a threshold misses. Instead normal images (a bounded
//! subset, [`crate::crossfit::synthetic_images`]) get one defect of each [`DefectKind`] pasted in (the mix: one of
//! each kind per image, placed and sized from a fixed seed, [`SEED`], so a
//! fit is reproducible), the copies are scored like any image, and the
//! fraction of each kind scoring below the threshold is the estimated
//! missed-alarm rate. Sizes are fractions of the image's short side:
//!
//! - **cut-paste**: a rectangle of 8–20 % × 8–20 % of the short side cut
//!   from elsewhere in the same image, flipped and/or turned, its brightness
//!   scaled by 0.75–0.9 or 1.1–1.25, pasted at a random place;
//! - **blotch**: a noise-edged blob of radius 4–10 % of the short side,
//!   darker or brighter by 0.15–0.35 (on a 0–1 scale), soft-edged;
//! - **scratch**: a straight line 1–3 px wide and 20–50 % of the short side
//!   long, darker or brighter by 0.2–0.4;
//! - **missing piece**: a square of 15–30 % of the short side replaced by
//!   another square of the same image, unchanged and blended in over its
//!   outer quarter (no seam), as where a piece is missing and what is
//!   around it shows;
//! - **moved piece**: two squares of 15–30 % of the short side, 20–45 %
//!   apart, swapped the same way.
//!
//! In the last two every patch still looks like some normal patch: only
//! the arrangement is wrong (a global anomaly, which tiles cannot see).
//!
//! The first three are local; the last two are what a whole-image view
//! sees and tiles miss, so the automatic tiling choice weighs both
//! ([`crate::tiling`]).
//!
//! The estimate is optimistic where real defects are subtler than these
//! (the README compares it with real missed-alarm rates).

use image::{Rgb32FImage, imageops};
use rand::{Rng, SeedableRng, rngs::StdRng};
use serde::{Deserialize, Serialize};

/// The seed every fit uses, mixed with the image's index.
pub const SEED: u64 = 0x16_defec7;

/// A kind of synthetic defect.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum DefectKind {
    CutPaste,
    Blotch,
    Scratch,
    MissingPiece,
    MovedPiece,
}

impl DefectKind {
    pub const ALL: [DefectKind; 5] = [
        Self::CutPaste,
        Self::Blotch,
        Self::Scratch,
        Self::MissingPiece,
        Self::MovedPiece,
    ];
    /// The local kinds (what SuperSimpleNet trains on).
    pub const LOCAL: [DefectKind; 3] = [Self::CutPaste, Self::Blotch, Self::Scratch];

    pub fn name(self) -> &'static str {
        match self {
            Self::CutPaste => "cut-paste",
            Self::Blotch => "blotch",
            Self::Scratch => "scratch",
            Self::MissingPiece => "missing-piece",
            Self::MovedPiece => "moved-piece",
        }
    }

    /// Whether a defect of this kind changes the part as a whole rather
    /// than one place.
    pub fn is_global(self) -> bool {
        matches!(self, Self::MissingPiece | Self::MovedPiece)
    }
}

/// A copy of `image` with one defect of `kind`, the `index`-th of a fit.
pub fn with_defect(image: &Rgb32FImage, kind: DefectKind, index: usize) -> Rgb32FImage {
    let mut rng = StdRng::seed_from_u64(SEED ^ ((index as u64) << 8) ^ kind as u64);
    let mut out = image.clone();
    let (w, h) = image.dimensions();
    let short = w.min(h) as f32;
    match kind {
        DefectKind::CutPaste => cut_paste(&mut out, image, short, &mut rng),
        DefectKind::Blotch => {
            let radius = (short * rng.random_range(0.04..0.10)).max(2.0);
            let (cx, cy) = (
                rng.random_range(0.0..w as f32),
                rng.random_range(0.0..h as f32),
            );
            let delta = signed(&mut rng, 0.15, 0.35);
            // Edge modulation: a few random low-frequency ripples.
            let ripples: Vec<(f32, f32, f32)> = (0..3)
                .map(|_| {
                    (
                        rng.random_range(2.0..5.0f32).round(),
                        rng.random_range(0.0..std::f32::consts::TAU),
                        rng.random_range(0.05..0.15),
                    )
                })
                .collect();
            shade(&mut out, cx, cy, radius * 1.4, delta, |dx, dy| {
                let angle = dy.atan2(dx);
                let edge = 1.0
                    - ripples
                        .iter()
                        .map(|(f, p, a)| a * (f * angle + p).sin())
                        .sum::<f32>();
                let r = (dx * dx + dy * dy).sqrt() / radius;
                ((edge - r) * 4.0).clamp(0.0, 1.0)
            });
        }
        DefectKind::Scratch => {
            let length = short * rng.random_range(0.2..0.5);
            let width = rng.random_range(1.0..=3.0f32);
            let angle = rng.random_range(0.0..std::f32::consts::PI);
            let (cx, cy) = (
                rng.random_range(0.0..w as f32),
                rng.random_range(0.0..h as f32),
            );
            let delta = signed(&mut rng, 0.2, 0.4);
            draw_line(&mut out, (cx, cy), angle, length, width, delta);
        }
        DefectKind::MissingPiece => missing_piece(&mut out, image, short, &mut rng),
        DefectKind::MovedPiece => moved_piece(&mut out, image, short, &mut rng),
    }
    out
}

/// A square side of `low..high` of the short side, at least 2 px and at
/// most the image's short side.
fn piece_side(rng: &mut StdRng, short: f32, low: f32, high: f32) -> u32 {
    ((short * rng.random_range(low..high)).round() as u32).clamp(2, (short as u32).max(2))
}

fn missing_piece(out: &mut Rgb32FImage, image: &Rgb32FImage, short: f32, rng: &mut StdRng) {
    // Where a piece came off, what surrounds it shows: a square of the
    // part copied from elsewhere, unchanged and blended in without a seam.
    let (w, h) = image.dimensions();
    let side = piece_side(rng, short, 0.15, 0.30).min(w).min(h);
    let corner = |rng: &mut StdRng| {
        (
            rng.random_range(0..=w - side),
            rng.random_range(0..=h - side),
        )
    };
    let (to, from) = (corner(rng), corner(rng));
    blend_square(out, image, from, to, side);
}

fn moved_piece(out: &mut Rgb32FImage, image: &Rgb32FImage, short: f32, rng: &mut StdRng) {
    let (w, h) = image.dimensions();
    let side = piece_side(rng, short, 0.15, 0.30).min(w).min(h);
    let a = (
        rng.random_range(0..=w - side),
        rng.random_range(0..=h - side),
    );
    let distance = short * rng.random_range(0.20..0.45);
    let angle = rng.random_range(0.0..std::f32::consts::TAU);
    let clamp = |v: f32, limit: u32| (v.round().max(0.0) as u32).min(limit - side);
    let b = (
        clamp(a.0 as f32 + distance * angle.cos(), w),
        clamp(a.1 as f32 + distance * angle.sin(), h),
    );
    // Each square goes where the other was, blended in without a seam.
    blend_square(out, image, a, b, side);
    blend_square(out, image, b, a, side);
}

/// Copies the `side` square of `image` at `from` onto `out` at `to`, fully
/// inside and fading out over the outer quarter, so no edge is drawn.
fn blend_square(
    out: &mut Rgb32FImage,
    image: &Rgb32FImage,
    from: (u32, u32),
    to: (u32, u32),
    side: u32,
) {
    let fade = (side as f32 / 4.0).max(1.0);
    for dy in 0..side {
        for dx in 0..side {
            let edge = dx.min(dy).min(side - 1 - dx).min(side - 1 - dy) as f32 + 0.5;
            let alpha = (edge / fade).min(1.0);
            let source = image.get_pixel(from.0 + dx, from.1 + dy).0;
            let target = out.get_pixel_mut(to.0 + dx, to.1 + dy);
            for (t, s) in target.0.iter_mut().zip(source) {
                *t += alpha * (s - *t);
            }
        }
    }
}

/// A line of `width` px and `length` px centred on `centre` at `angle`
/// (radians), added as `delta` to every channel (anti-aliased edges,
/// clamped to `[0, 1]`). Also used by the thin-line test-set generator.
pub fn draw_line(
    image: &mut Rgb32FImage,
    centre: (f32, f32),
    angle: f32,
    length: f32,
    width: f32,
    delta: f32,
) {
    let (dx, dy) = (angle.cos(), angle.sin());
    let half = length / 2.0;
    shade(image, centre.0, centre.1, half + width, delta, |x, y| {
        let along = x * dx + y * dy;
        let across = (-x * dy + y * dx).abs();
        let beyond = (along.abs() - half).max(0.0);
        let distance = (across * across + beyond * beyond).sqrt();
        (width / 2.0 + 0.5 - distance).clamp(0.0, 1.0)
    });
}

/// Adds `delta · alpha(x − cx, y − cy)` to every pixel within `reach` of
/// `(cx, cy)`.
fn shade(
    image: &mut Rgb32FImage,
    cx: f32,
    cy: f32,
    reach: f32,
    delta: f32,
    alpha: impl Fn(f32, f32) -> f32,
) {
    let (w, h) = image.dimensions();
    let x0 = (cx - reach).floor().max(0.0) as u32;
    let y0 = (cy - reach).floor().max(0.0) as u32;
    let x1 = ((cx + reach).ceil().max(0.0) as u32).min(w);
    let y1 = ((cy + reach).ceil().max(0.0) as u32).min(h);
    for y in y0..y1 {
        for x in x0..x1 {
            let a = alpha(x as f32 + 0.5 - cx, y as f32 + 0.5 - cy);
            if a > 0.0 {
                let pixel = image.get_pixel_mut(x, y);
                for c in pixel.0.iter_mut() {
                    *c = (*c + delta * a).clamp(0.0, 1.0);
                }
            }
        }
    }
}

fn cut_paste(out: &mut Rgb32FImage, image: &Rgb32FImage, short: f32, rng: &mut StdRng) {
    let (w, h) = image.dimensions();
    let side = |rng: &mut StdRng, limit: u32| {
        ((short * rng.random_range(0.08..0.20)).round() as u32).clamp(2, limit.max(2))
    };
    let (pw, ph) = (side(rng, w / 2), side(rng, h / 2));
    let (pw, ph) = (pw.min(w), ph.min(h));
    let pick = |rng: &mut StdRng, limit: u32, size: u32| rng.random_range(0..=limit - size);
    let (sx, sy) = (pick(rng, w, pw), pick(rng, h, ph));
    let mut patch = imageops::crop_imm(image, sx, sy, pw, ph).to_image();
    if rng.random_bool(0.5) {
        patch = imageops::flip_horizontal(&patch);
    }
    if rng.random_bool(0.5) {
        patch = imageops::flip_vertical(&patch);
    }
    if rng.random_bool(0.5) && pw <= h && ph <= w {
        patch = imageops::rotate90(&patch);
    }
    let scale = if rng.random_bool(0.5) {
        rng.random_range(0.75..0.9)
    } else {
        rng.random_range(1.1..1.25)
    };
    for p in patch.pixels_mut() {
        for c in p.0.iter_mut() {
            *c = (*c * scale).clamp(0.0, 1.0);
        }
    }
    let (tw, th) = patch.dimensions();
    let (dx, dy) = (pick(rng, w, tw.min(w)), pick(rng, h, th.min(h)));
    imageops::replace(out, &patch, i64::from(dx), i64::from(dy));
}

fn signed(rng: &mut StdRng, low: f32, high: f32) -> f32 {
    let magnitude = rng.random_range(low..high);
    if rng.random_bool(0.5) {
        magnitude
    } else {
        -magnitude
    }
}

/// The estimated missed-alarm rate of one kind of synthetic defect.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct KindRate {
    pub kind: DefectKind,
    /// Synthetic defect images of this kind scored.
    pub images: usize,
    /// How many of them scored below the threshold.
    pub missed: usize,
    /// `missed / images`.
    pub rate: f64,
    /// One-sided 95 % upper confidence bound on the rate (Clopper–Pearson).
    pub upper_95: f64,
}

/// Missed-alarm rates on synthetic defects at a model's threshold; stored
/// in the model file.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct MissedAlarmEstimate {
    pub seed: u64,
    pub per_kind: Vec<KindRate>,
}

impl MissedAlarmEstimate {
    /// The rates of raw `scores` (one list per kind) against `is_flagged`.
    pub fn measure(scores: &[(DefectKind, Vec<f32>)], is_flagged: impl Fn(f32) -> bool) -> Self {
        let per_kind = scores
            .iter()
            .map(|(kind, s)| {
                let missed = s.iter().filter(|v| !is_flagged(**v)).count();
                KindRate {
                    kind: *kind,
                    images: s.len(),
                    missed,
                    rate: missed as f64 / s.len().max(1) as f64,
                    upper_95: crate::calibration::upper_bound_95(missed, s.len()),
                }
            })
            .collect();
        Self {
            seed: SEED,
            per_kind,
        }
    }

    /// `cut-paste 0.10 (2/20), blotch …`.
    pub fn describe(&self) -> String {
        self.per_kind
            .iter()
            .map(|k| {
                format!(
                    "{} {:.2} ({}/{}, 95 % bound {:.2})",
                    k.kind.name(),
                    k.rate,
                    k.missed,
                    k.images,
                    k.upper_95
                )
            })
            .collect::<Vec<_>>()
            .join(", ")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn texture() -> Rgb32FImage {
        Rgb32FImage::from_fn(120, 80, |x, y| {
            let v = 0.5 + 0.1 * ((x as f32 * 0.3).sin() * (y as f32 * 0.2).cos());
            image::Rgb([v, v, v])
        })
    }

    #[test]
    fn every_kind_changes_the_image_reproducibly() {
        let image = texture();
        for kind in DefectKind::ALL {
            let a = with_defect(&image, kind, 3);
            let b = with_defect(&image, kind, 3);
            assert_eq!(a, b, "{kind:?} is not reproducible");
            assert_ne!(a, image, "{kind:?} changed nothing");
            assert_eq!(a.dimensions(), image.dimensions());
            assert!(
                a.pixels()
                    .all(|p| p.0.iter().all(|c| (0.0..=1.0).contains(c)))
            );
            assert_ne!(with_defect(&image, kind, 4), a);
        }
        // Tiny images do not panic.
        let tiny = Rgb32FImage::new(3, 2);
        for kind in DefectKind::ALL {
            with_defect(&tiny, kind, 0);
        }
    }

    #[test]
    fn a_thin_line_is_thin() {
        let mut image = Rgb32FImage::from_pixel(50, 50, image::Rgb([0.5; 3]));
        draw_line(&mut image, (25.0, 25.0), 0.0, 40.0, 2.0, -0.3);
        let changed_rows: Vec<u32> = (0..50)
            .filter(|y| (image.get_pixel(25, *y).0[0] - 0.5).abs() > 0.01)
            .collect();
        assert!((2..=4).contains(&changed_rows.len()), "{changed_rows:?}");
        assert!((image.get_pixel(25, 25).0[0] - 0.2).abs() < 1e-6);
    }

    #[test]
    fn rates_count_misses() {
        let e =
            MissedAlarmEstimate::measure(&[(DefectKind::Blotch, vec![1.0, 2.0, 3.0, 4.0])], |s| {
                s >= 2.5
            });
        assert_eq!(e.per_kind[0].missed, 2);
        assert_eq!(e.per_kind[0].rate, 0.5);
        assert!(e.per_kind[0].upper_95 > 0.5);
    }
}
