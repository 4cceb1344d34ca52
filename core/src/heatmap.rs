//! Heatmap images a person can read on their own: the anomaly map in colour
//! blended over the image, the outline of what is over the threshold, and a
//! legend strip below with the colour ramp and the image's score, threshold
//! and verdict; written as PNG.
//!
//! # Colour scale, anchored to the threshold
//! Map values are calibrated 0–1 scores, anomalous at and above a
//! `threshold` (0.5 at the model's own operating point, another value when
//! a request moves it). Colours follow the value *relative to the
//! threshold*, not the absolute value: [`scale`] stretches `[0, threshold]`
//! linearly onto the lower half of the ramp and `[threshold, 1]` onto the
//! upper half, so the threshold is always the ramp's middle (yellow), and
//! one colour means the same evidence on every image. Below the middle the
//! ramp runs dark blue → blue → teal → green, above it yellow → orange →
//! red → dark red ([`colour`]). A hot spot at 0.36 under a threshold of 0.5
//! is 72 % up the lower half (teal-green over a dark-blue background), so
//! what stays under the threshold is still visible.
//!
//! # Threshold outline
//! Regions at or above the threshold are outlined 2 px wide: white on the
//! region's own edge pixels, black on the pixels just outside, so the line
//! shows over any colour. Outside the image counts as below the threshold,
//! so a region that reaches the edge is closed by the outline too.
//!
//! # Legend
//! Below the image (never over it) a dark strip holds the ramp as a colour
//! bar with a white tick at its middle (the threshold, labelled with its
//! value; `0` and `1` label the ends), a white marker above the bar at the
//! image score, and the line `score 0.36  threshold 0.50  OK` (or
//! `ANOMALOUS`, in red). Text is the public-domain 8×8 bitmap font of the
//! `font8x8` crate, drawn 1× on images under 400 px wide, 2× under 1600,
//! 3× under 3200 and 4× above. Where the width is short the line wraps
//! between its three parts (room is kept for `ANOMALOUS` either way, so OK
//! and ANOMALOUS pictures of one width have one height); an image narrower
//! than the longest part is centred on a picture widened with the legend's
//! background, so any size draws, 1×1 included.
//!
//! [`blend`] is the picture part alone, at the image's size, for previews
//! too small to carry a legend.

use std::io::Cursor;
use std::path::Path;

use font8x8::legacy::BASIC_LEGACY;
use image::{ImageFormat, Rgb, Rgb32FImage, RgbImage};

use crate::Error;
use crate::anomaly_map::AnomalyMap;
use crate::model::Inspection;
use crate::model_file::write_atomically;

/// How much of the colour map shows over the image.
const OVERLAY_OPACITY: f32 = 0.5;

/// The outline on the edge pixels of a region at or above the threshold.
pub const OUTLINE_INSIDE: Rgb<u8> = Rgb([255, 255, 255]);
/// The outline on the pixels just outside such a region.
pub const OUTLINE_OUTSIDE: Rgb<u8> = Rgb([0, 0, 0]);

const BACKGROUND: Rgb<u8> = Rgb([32, 32, 32]);
const TEXT: Rgb<u8> = Rgb([240, 240, 240]);
const ANOMALOUS_TEXT: Rgb<u8> = Rgb([255, 96, 96]);
const OK_TEXT: Rgb<u8> = Rgb([120, 220, 120]);

/// The ramp: positions in `[0, 1]` and their colours; the threshold sits at
/// 0.5.
const RAMP: [(f32, [f32; 3]); 7] = [
    (0.0, [0.0, 0.0, 0.5]),
    (0.25, [0.0, 0.35, 1.0]),
    (0.4, [0.0, 0.8, 0.6]),
    (0.5, [1.0, 0.9, 0.0]),
    (0.7, [1.0, 0.5, 0.0]),
    (0.85, [0.9, 0.0, 0.0]),
    (1.0, [0.5, 0.0, 0.0]),
];

/// What the legend says about the image: its 0–1 score, the 0–1 threshold
/// of the verdict, and the verdict.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Legend {
    pub score: f32,
    pub threshold: f32,
    pub is_anomalous: bool,
}

impl Legend {
    /// The legend of an inspection.
    pub fn of(inspection: &Inspection) -> Self {
        Self {
            score: inspection.score,
            threshold: inspection.threshold,
            is_anomalous: inspection.is_anomalous,
        }
    }
}

/// The threshold as drawn: clamped to `[0, 1]`, 0.5 when not a number.
fn usable_threshold(threshold: f32) -> f32 {
    if threshold.is_finite() {
        threshold.clamp(0.0, 1.0)
    } else {
        0.5
    }
}

/// Position on the ramp (0–1) of a 0–1 `value` under `threshold`:
/// `[0, threshold]` → `[0, 0.5]` and `[threshold, 1]` → `[0.5, 1]`, both
/// linear, so `scale(threshold, threshold)` is always 0.5. Values outside
/// `[0, 1]` are clamped; a value that is not a number is 0.
pub fn scale(value: f32, threshold: f32) -> f32 {
    let t = usable_threshold(threshold);
    let v = if value.is_finite() {
        value.clamp(0.0, 1.0)
    } else {
        0.0
    };
    if v < t {
        0.5 * v / t
    } else if t < 1.0 {
        0.5 + 0.5 * (v - t) / (1.0 - t)
    } else {
        // Threshold 1: only a value of 1 reaches it.
        1.0
    }
}

/// Colour at a ramp position in `[0, 1]` (see [`scale`]): dark blue at 0,
/// yellow at 0.5 (the threshold), dark red at 1. Clamped; not a number is 0.
pub fn colour(position: f32) -> [f32; 3] {
    let p = if position.is_finite() {
        position.clamp(0.0, 1.0)
    } else {
        0.0
    };
    let mut previous = RAMP[0];
    for stop in RAMP {
        if p <= stop.0 {
            let span = stop.0 - previous.0;
            let f = if span > 0.0 {
                (p - previous.0) / span
            } else {
                0.0
            };
            return std::array::from_fn(|i| previous.1[i] + f * (stop.1[i] - previous.1[i]));
        }
        previous = stop;
    }
    previous.1
}

fn to_u8(v: f32) -> u8 {
    (v * 255.0).round().clamp(0.0, 255.0) as u8
}

/// The map at the image's size: resized when the sizes differ, zeros when
/// the map is unusable (empty, or its values not `width × height`) or the
/// image is empty.
fn map_at(map: &AnomalyMap, w: usize, h: usize) -> Vec<f32> {
    let usable = map.width > 0 && map.height > 0 && map.values.len() == map.width * map.height;
    if !usable || w == 0 || h == 0 {
        vec![0.0; w * h]
    } else if (map.width, map.height) == (w, h) {
        map.values.clone()
    } else {
        map.resized_bilinear(w, h).values
    }
}

/// Paints the image with the map in colour and the threshold outline onto
/// `canvas`, its top-left corner at `(x0, 0)`.
fn paint(canvas: &mut RgbImage, x0: u32, image: &Rgb32FImage, map: &AnomalyMap, threshold: f32) {
    let (w, h) = image.dimensions();
    let (wu, hu) = (w as usize, h as usize);
    let values = map_at(map, wu, hu);
    // Drawn as `value >= threshold`, the verdict's own comparison; a value
    // that is not a number is below.
    let above: Vec<bool> = values.iter().map(|&v| v >= threshold).collect();
    let at = |x: i64, y: i64| -> bool {
        x >= 0
            && y >= 0
            && (x as usize) < wu
            && (y as usize) < hu
            && above[y as usize * wu + x as usize]
    };
    for y in 0..h {
        for x in 0..w {
            let (xi, yi) = (i64::from(x), i64::from(y));
            let index = y as usize * wu + x as usize;
            let pixel = if above[index] {
                let edge = !(at(xi - 1, yi) && at(xi + 1, yi) && at(xi, yi - 1) && at(xi, yi + 1));
                edge.then_some(OUTLINE_INSIDE)
            } else {
                let near = (-1..=1).any(|dy| (-1..=1).any(|dx| at(xi + dx, yi + dy)));
                near.then_some(OUTLINE_OUTSIDE)
            };
            let pixel = pixel.unwrap_or_else(|| {
                let p = image.get_pixel(x, y);
                let grey = (p[0] + p[1] + p[2]) / 3.0;
                let grey = if grey.is_finite() { grey } else { 0.0 };
                let c = colour(scale(values[index], threshold));
                Rgb(c.map(|ch| to_u8((1.0 - OVERLAY_OPACITY) * grey + OVERLAY_OPACITY * ch)))
            });
            canvas.put_pixel(x0 + x, y, pixel);
        }
    }
}

/// The map (calibrated 0–1 values) in colour over the image, scaled to the
/// threshold, with the threshold outline: the picture part of [`overlay`],
/// at the image's size. The map is resized to the image if their sizes
/// differ.
pub fn blend(image: &Rgb32FImage, map: &AnomalyMap, threshold: f32) -> RgbImage {
    let (w, h) = image.dimensions();
    let mut canvas = RgbImage::new(w, h);
    paint(&mut canvas, 0, image, map, usable_threshold(threshold));
    canvas
}

/// A number for the legend: two decimals, more (up to four) where two
/// would not give `v` back.
fn number(v: f32) -> String {
    for decimals in 2..4 {
        let text = format!("{v:.decimals$}");
        if text
            .parse::<f32>()
            .is_ok_and(|back| (back - v).abs() < 1e-6)
        {
            return text;
        }
    }
    format!("{v:.4}")
}

/// The score, with more decimals where two would read as the threshold.
fn score_text(score: f32, threshold: f32) -> String {
    let mut decimals = 2;
    while decimals < 4
        && score != threshold
        && format!("{score:.decimals$}") == format!("{threshold:.decimals$}")
    {
        decimals += 1;
    }
    format!("{score:.decimals$}")
}

/// The legend's parts of the text line, each with its colour.
fn text_parts(legend: &Legend) -> [(String, Rgb<u8>); 3] {
    let verdict = if legend.is_anomalous {
        ("ANOMALOUS".to_owned(), ANOMALOUS_TEXT)
    } else {
        ("OK".to_owned(), OK_TEXT)
    };
    [
        (
            format!("score {}", score_text(legend.score, legend.threshold)),
            TEXT,
        ),
        (format!("threshold {}", number(legend.threshold)), TEXT),
        verdict,
    ]
}

/// Spaces between two parts of the text line.
const GAP: usize = 2;

/// Where the legend's pieces go, in pixels from the strip's top.
#[derive(Debug, Clone, PartialEq)]
struct Layout {
    /// Text (and stroke) size: 1 for 8×8 glyphs, 2 for 16×16, …
    unit: u32,
    /// Width of the whole picture (image and legend).
    width: u32,
    /// Height of the strip.
    height: u32,
    /// Margin round the strip's content.
    pad: u32,
    marker_top: u32,
    bar_top: u32,
    bar_height: u32,
    labels_top: u32,
    text_top: u32,
    /// Indices into the text parts, one run a line.
    lines: Vec<Vec<usize>>,
}

fn text_unit(image_width: u32) -> u32 {
    match image_width {
        0..400 => 1,
        400..1600 => 2,
        1600..3200 => 3,
        _ => 4,
    }
}

fn glyph_width(unit: u32) -> u32 {
    8 * unit
}

/// Packs parts of these lengths into lines of at most `columns` characters,
/// [`GAP`] spaces apart (a part longer than a line gets a line of its own).
fn wrap(lengths: &[usize], columns: usize) -> Vec<Vec<usize>> {
    let mut lines: Vec<Vec<usize>> = Vec::new();
    let mut used = 0;
    for (index, &len) in lengths.iter().enumerate() {
        match lines.last_mut() {
            Some(line) if used + GAP + len <= columns => {
                line.push(index);
                used += GAP + len;
            }
            _ => {
                lines.push(vec![index]);
                used = len;
            }
        }
    }
    lines
}

fn layout(image_width: u32, parts: &[(String, Rgb<u8>)]) -> Layout {
    let unit = text_unit(image_width);
    let pad = 4 * unit;
    let glyph = glyph_width(unit);
    let mut lengths: Vec<usize> = parts.iter().map(|(text, _)| text.chars().count()).collect();
    // Room for the longer verdict either way, so OK and ANOMALOUS pictures
    // of one width have one height.
    if let Some(verdict) = lengths.last_mut() {
        *verdict = (*verdict).max("ANOMALOUS".len());
    }
    let longest = lengths.iter().copied().max().unwrap_or(0) as u32;
    // Room for the longest part, and for the bar's three labels side by side.
    let min_width = 2 * pad + glyph * longest.max(12);
    let width = image_width.max(min_width);
    let columns = ((width - 2 * pad) / glyph) as usize;
    let lines = wrap(&lengths, columns);
    let marker_top = pad;
    let bar_top = marker_top + 5 * unit;
    let bar_height = 10 * unit;
    let labels_top = bar_top + bar_height + 3 * unit;
    let text_top = labels_top + glyph + 5 * unit;
    let line_count = lines.len() as u32;
    let height = text_top + line_count * glyph + line_count.saturating_sub(1) * 3 * unit + pad;
    Layout {
        unit,
        width,
        height,
        pad,
        marker_top,
        bar_top,
        bar_height,
        labels_top,
        text_top,
        lines,
    }
}

fn fill(canvas: &mut RgbImage, x: u32, y: u32, w: u32, h: u32, colour: Rgb<u8>) {
    let (cw, ch) = canvas.dimensions();
    for yy in y.min(ch)..y.saturating_add(h).min(ch) {
        for xx in x.min(cw)..x.saturating_add(w).min(cw) {
            canvas.put_pixel(xx, yy, colour);
        }
    }
}

/// Draws `text` with its top-left corner at `(x, y)`, each font pixel a
/// `unit × unit` square; clipped to the canvas.
fn draw_text(canvas: &mut RgbImage, x: u32, y: u32, text: &str, unit: u32, colour: Rgb<u8>) {
    for (i, c) in text.chars().enumerate() {
        let glyph = BASIC_LEGACY
            .get(c as usize)
            .unwrap_or(&BASIC_LEGACY[b'?' as usize]);
        let left = x.saturating_add((i as u32).saturating_mul(glyph_width(unit)));
        for (row, bits) in glyph.iter().enumerate() {
            for bit in 0..8 {
                // The font's lowest bit is the glyph's leftmost pixel.
                if bits & (1 << bit) != 0 {
                    fill(
                        canvas,
                        left.saturating_add(bit * unit),
                        y.saturating_add(row as u32 * unit),
                        unit,
                        unit,
                        colour,
                    );
                }
            }
        }
    }
}

fn text_width(text: &str, unit: u32) -> u32 {
    (text.chars().count() as u32).saturating_mul(glyph_width(unit))
}

/// Draws the legend strip at `top`.
fn draw_legend(canvas: &mut RgbImage, top: u32, layout: &Layout, legend: &Legend) {
    let Layout {
        unit, width, pad, ..
    } = *layout;
    fill(canvas, 0, top, width, layout.height, BACKGROUND);

    // The colour bar: the ramp left to right.
    let bar_left = pad;
    // Odd, so that one pixel is the middle: the threshold.
    let bar_width = (width - 2 * pad).saturating_sub(1) | 1;
    let span = bar_width.saturating_sub(1).max(1) as f32;
    for i in 0..bar_width {
        let c = colour(i as f32 / span);
        fill(
            canvas,
            bar_left + i,
            top + layout.bar_top,
            1,
            layout.bar_height,
            Rgb(c.map(to_u8)),
        );
    }
    let x_of = |position: f32| bar_left + (position * span).round() as u32;

    // The threshold: a white tick through the bar, down to its label.
    let tick = x_of(0.5).saturating_sub(unit / 2);
    fill(
        canvas,
        tick,
        top + layout.bar_top,
        unit,
        layout.labels_top - layout.bar_top,
        OUTLINE_INSIDE,
    );

    // The score: a white triangle above the bar, pointing at it.
    let centre = x_of(scale(legend.score, legend.threshold));
    let rows = 5 * unit;
    for r in 0..rows {
        let half = rows - 1 - r;
        fill(
            canvas,
            centre.saturating_sub(half),
            top + layout.marker_top + r,
            2 * half + 1,
            1,
            TEXT,
        );
    }

    // The bar's labels: 0, the threshold at the middle, 1.
    let labels_y = top + layout.labels_top;
    let threshold_label = number(legend.threshold);
    draw_text(canvas, bar_left, labels_y, "0", unit, TEXT);
    let middle = x_of(0.5).saturating_sub(text_width(&threshold_label, unit) / 2);
    draw_text(canvas, middle, labels_y, &threshold_label, unit, TEXT);
    let right = (bar_left + bar_width).saturating_sub(text_width("1", unit));
    draw_text(canvas, right, labels_y, "1", unit, TEXT);

    // Score, threshold and verdict.
    let parts = text_parts(legend);
    let line_step = glyph_width(unit) + 3 * unit;
    for (n, line) in layout.lines.iter().enumerate() {
        let y = top + layout.text_top + n as u32 * line_step;
        let mut x = pad;
        for &index in line {
            let (text, colour) = &parts[index];
            draw_text(canvas, x, y, text, unit, *colour);
            x += text_width(text, unit) + GAP as u32 * glyph_width(unit);
        }
    }
}

/// The map (calibrated 0–1 values) in colour over the image, scaled to
/// `legend.threshold`, the threshold outlined, with the legend strip below
/// (see the module comment). The map is resized to the image if their sizes
/// differ. The picture is the image's width, or the legend's least width
/// when the image is narrower (the image centred), and the image's height
/// plus the strip's.
pub fn overlay(image: &Rgb32FImage, map: &AnomalyMap, legend: &Legend) -> RgbImage {
    let (w, h) = image.dimensions();
    let layout = layout(w, &text_parts(legend));
    let mut canvas = RgbImage::from_pixel(layout.width, h + layout.height, BACKGROUND);
    let x0 = (layout.width - w) / 2;
    paint(
        &mut canvas,
        x0,
        image,
        map,
        usable_threshold(legend.threshold),
    );
    draw_legend(&mut canvas, h, &layout, legend);
    canvas
}

/// PNG bytes of the overlay.
pub fn overlay_png(
    image: &Rgb32FImage,
    map: &AnomalyMap,
    legend: &Legend,
) -> Result<Vec<u8>, Error> {
    let mut bytes = Cursor::new(Vec::new());
    overlay(image, map, legend)
        .write_to(&mut bytes, ImageFormat::Png)
        .map_err(|e| Error::Encode(e.to_string()))?;
    Ok(bytes.into_inner())
}

/// Writes the overlay PNG to `path` atomically.
pub fn save_overlay(
    path: &Path,
    image: &Rgb32FImage,
    map: &AnomalyMap,
    legend: &Legend,
) -> Result<(), Error> {
    write_atomically(path, &overlay_png(image, map, legend)?)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeSet;

    use super::*;

    const GREY: Rgb<f32> = Rgb([0.5, 0.5, 0.5]);

    fn legend(score: f32, threshold: f32) -> Legend {
        Legend {
            score,
            threshold,
            is_anomalous: score >= threshold,
        }
    }

    fn uniform(w: usize, h: usize, v: f32) -> AnomalyMap {
        AnomalyMap::new(w, h, vec![v; w * h]).unwrap()
    }

    /// A `size × size` map at 0.1 with the square `[lo, hi)²` at 0.9.
    fn square(size: usize, lo: usize, hi: usize) -> AnomalyMap {
        let inside = |i: usize| (lo..hi).contains(&i);
        let values = (0..size * size)
            .map(|i| {
                if inside(i % size) && inside(i / size) {
                    0.9
                } else {
                    0.1
                }
            })
            .collect();
        AnomalyMap::new(size, size, values).unwrap()
    }

    fn pixels_of(picture: &RgbImage, colour: Rgb<u8>) -> BTreeSet<(u32, u32)> {
        picture
            .enumerate_pixels()
            .filter(|(_, _, p)| **p == colour)
            .map(|(x, y, _)| (x, y))
            .collect()
    }

    fn distance(a: [f32; 3], b: [f32; 3]) -> f32 {
        a.iter().zip(b).map(|(x, y)| (x - y).abs()).sum()
    }

    #[test]
    fn ramp_runs_dark_blue_through_yellow_to_dark_red() {
        assert_eq!(colour(0.0), [0.0, 0.0, 0.5]);
        assert_eq!(colour(0.5), [1.0, 0.9, 0.0]);
        assert_eq!(colour(1.0), [0.5, 0.0, 0.0]);
        assert_eq!(colour(f32::NAN), colour(0.0));
        assert_eq!(colour(-3.0), colour(0.0));
        assert_eq!(colour(7.0), colour(1.0));
    }

    #[test]
    fn the_threshold_has_one_colour_whatever_it_is() {
        let image = Rgb32FImage::from_pixel(9, 9, GREY);
        let mut centres = Vec::new();
        for threshold in [0.2, 0.36, 0.5, 0.8] {
            assert_eq!(scale(threshold, threshold), 0.5, "{threshold}");
            let picture = blend(&image, &uniform(9, 9, threshold), threshold);
            centres.push(*picture.get_pixel(4, 4));
        }
        assert!(centres.iter().all(|c| *c == centres[0]), "{centres:?}");
        // The same value under another threshold is another colour.
        let at = |threshold| *blend(&image, &uniform(9, 9, 0.5), threshold).get_pixel(4, 4);
        assert_ne!(at(0.3), at(0.7));
    }

    #[test]
    fn values_under_the_threshold_span_the_lower_half() {
        for threshold in [0.2, 0.5, 0.8] {
            assert_eq!(scale(0.0, threshold), 0.0);
            assert!((scale(threshold / 2.0, threshold) - 0.25).abs() < 1e-6);
            assert!((scale((1.0 + threshold) / 2.0, threshold) - 0.75).abs() < 1e-6);
            assert_eq!(scale(1.0, threshold), 1.0);
        }
        // A sub-threshold hot spot (0.36 under 0.5) stands out from the
        // background (0.05) by more than a third of the ramp.
        assert!(scale(0.36, 0.5) - scale(0.05, 0.5) > 0.3);
        assert!(distance(colour(scale(0.36, 0.5)), colour(scale(0.05, 0.5))) > 0.6);
        assert_eq!(scale(f32::NAN, 0.5), 0.0);
        assert_eq!(scale(0.7, f32::NAN), scale(0.7, 0.5));
        assert_eq!(scale(0.0, 0.0), 0.5);
        assert_eq!(scale(0.99, 1.0), 0.495);
        assert_eq!(scale(1.0, 1.0), 1.0);
    }

    #[test]
    fn the_outline_lies_exactly_on_the_boundary_of_a_square() {
        let image = Rgb32FImage::from_pixel(20, 20, GREY);
        let picture = blend(&image, &square(20, 5, 10), 0.5);
        let ring = |lo: u32, hi: u32, corners: bool| -> BTreeSet<(u32, u32)> {
            let mut ring = BTreeSet::new();
            for i in lo..=hi {
                let on_side = corners || (i != lo && i != hi);
                if on_side {
                    ring.extend([(i, lo), (i, hi), (lo, i), (hi, i)]);
                }
            }
            ring
        };
        // White on the square's own edge, black on the pixels around it.
        assert_eq!(pixels_of(&picture, OUTLINE_INSIDE), ring(5, 9, true));
        assert_eq!(pixels_of(&picture, OUTLINE_OUTSIDE), ring(4, 10, true));
        // Inside and outside the outline the map's colours show.
        assert_ne!(picture.get_pixel(7, 7), picture.get_pixel(15, 15));
    }

    #[test]
    fn no_outline_when_nothing_reaches_the_threshold() {
        let image = Rgb32FImage::from_pixel(20, 20, GREY);
        let picture = blend(&image, &square(20, 5, 10), 0.95);
        assert!(pixels_of(&picture, OUTLINE_INSIDE).is_empty());
        assert!(pixels_of(&picture, OUTLINE_OUTSIDE).is_empty());
        let picture = blend(&image, &uniform(20, 20, f32::NAN), 0.5);
        assert!(pixels_of(&picture, OUTLINE_INSIDE).is_empty());
    }

    #[test]
    fn a_region_at_the_image_edge_is_closed_by_the_outline() {
        let image = Rgb32FImage::from_pixel(6, 4, GREY);
        let picture = blend(&image, &uniform(3, 2, 0.8), 0.5);
        let edge: BTreeSet<_> = picture
            .enumerate_pixels()
            .map(|(x, y, _)| (x, y))
            .filter(|&(x, y)| x == 0 || y == 0 || x == 5 || y == 3)
            .collect();
        assert_eq!(pixels_of(&picture, OUTLINE_INSIDE), edge);
    }

    #[test]
    fn the_legend_adds_a_strip_below_the_image() {
        let image = Rgb32FImage::from_pixel(300, 200, GREY);
        let map = square(30, 10, 20);
        for l in [legend(0.36, 0.5), legend(0.72, 0.5)] {
            let picture = overlay(&image, &map, &l);
            assert_eq!(picture.dimensions(), (300, 200 + 58));
            // The image is all there, uncovered.
            let top = image::imageops::crop_imm(&picture, 0, 0, 300, 200).to_image();
            assert_eq!(top, blend(&image, &map, 0.5));
        }
        // Twice the text on a wider image.
        let wide = Rgb32FImage::from_pixel(500, 100, GREY);
        let picture = overlay(&wide, &uniform(5, 1, 0.2), &legend(0.2, 0.5));
        assert_eq!(picture.dimensions(), (500, 100 + 116));
        // One line of text where it fits.
        let wider = Rgb32FImage::from_pixel(1000, 100, GREY);
        let picture = overlay(&wider, &uniform(5, 1, 0.2), &legend(0.2, 0.5));
        assert_eq!(picture.dimensions(), (1000, 100 + 94));
    }

    #[test]
    fn the_bar_has_the_threshold_colour_at_its_tick() {
        let image = Rgb32FImage::from_pixel(300, 10, GREY);
        let l = legend(0.36, 0.5);
        let picture = overlay(&image, &uniform(1, 1, 0.0), &l);
        let layout = layout(300, &text_parts(&l));
        let y = 10 + layout.bar_top + layout.bar_height / 2;
        // 292 px between the margins: a bar of 291, its middle 145 px in.
        let (left, middle) = (layout.pad, layout.pad + 145);
        assert_eq!(picture.get_pixel(left, y).0, colour(0.0).map(to_u8));
        assert_eq!(*picture.get_pixel(middle, y), OUTLINE_INSIDE);
        let next = picture.get_pixel(middle + 1, y).0;
        let yellow = colour(0.5).map(to_u8);
        assert!(
            next.iter().zip(yellow).all(|(a, b)| a.abs_diff(b) <= 2),
            "{next:?}"
        );
    }

    #[test]
    fn tiny_and_elongated_images_draw() {
        for (w, h) in [
            (1, 1),
            (0, 0),
            (0, 5),
            (1, 500),
            (500, 1),
            (3, 2),
            (6000, 2),
            (2, 6000),
        ] {
            let image = Rgb32FImage::from_pixel(w, h, GREY);
            for map in [uniform(1, 1, 0.9), square(8, 2, 5)] {
                let png = overlay_png(&image, &map, &legend(0.9, 0.5)).unwrap();
                let back = image::load_from_memory(&png).unwrap().to_rgb8();
                let (bw, bh) = back.dimensions();
                assert!(bw >= w.max(120), "{w}×{h}: {bw}");
                assert!(bh > h, "{w}×{h}: {bh}");
            }
        }
        // A map that is not its own size draws as zeros.
        let broken = AnomalyMap {
            width: 4,
            height: 4,
            values: vec![1.0; 3],
        };
        let image = Rgb32FImage::from_pixel(4, 4, GREY);
        assert_eq!(
            blend(&image, &broken, 0.5),
            blend(&image, &uniform(4, 4, 0.0), 0.5)
        );
        // Narrow: the text wraps, the picture widens, the image centred.
        let picture = overlay(
            &Rgb32FImage::from_pixel(1, 1, GREY),
            &uniform(1, 1, 0.0),
            &legend(0.0, 0.5),
        );
        assert_eq!(picture.dimensions(), (120, 1 + 69));
        assert_ne!(*picture.get_pixel(59, 0), BACKGROUND);
        assert_eq!(*picture.get_pixel(0, 0), BACKGROUND);
    }

    #[test]
    fn the_score_and_verdict_are_written() {
        let image = Rgb32FImage::from_pixel(300, 50, GREY);
        let map = uniform(1, 1, 0.1);
        let text_rows = |l: &Legend| {
            let layout = layout(300, &text_parts(l));
            let picture = overlay(&image, &map, l);
            let top = 50 + layout.text_top;
            image::imageops::crop_imm(&picture, 0, top, 300, layout.height - layout.text_top)
                .to_image()
        };
        let blank = RgbImage::from_pixel(300, 23, BACKGROUND);
        let ok = text_rows(&legend(0.36, 0.5));
        assert_ne!(ok, blank);
        // Another score, the same verdict: the score's digits change.
        assert_ne!(ok, text_rows(&legend(0.38, 0.5)));
        // The same score, another verdict.
        let flipped = Legend {
            is_anomalous: true,
            ..legend(0.36, 0.5)
        };
        assert_ne!(ok, text_rows(&flipped));
        assert!(pixels_of(&text_rows(&flipped), ANOMALOUS_TEXT).len() > 20);
        assert!(pixels_of(&ok, OK_TEXT).len() > 5);
        assert_eq!(
            text_parts(&legend(0.36, 0.5)).map(|(t, _)| t),
            ["score 0.36", "threshold 0.50", "OK"]
        );
    }

    #[test]
    fn numbers_keep_the_decimals_that_matter() {
        assert_eq!(number(0.5), "0.50");
        assert_eq!(number(0.375), "0.375");
        assert_eq!(score_text(0.36, 0.5), "0.36");
        assert_eq!(score_text(0.499, 0.5), "0.499");
        assert_eq!(score_text(0.5, 0.5), "0.50");
        assert_eq!(score_text(f32::NAN, 0.5), "NaN");
    }

    #[test]
    fn glyphs_draw_left_to_right() {
        // 'L': the vertical stroke at the glyph's left, the foot at its bottom.
        let mut canvas = RgbImage::new(8, 8);
        draw_text(&mut canvas, 0, 0, "L", 1, TEXT);
        assert_eq!(*canvas.get_pixel(0, 0), TEXT);
        assert_eq!(*canvas.get_pixel(7, 0), Rgb([0, 0, 0]));
        // Clipped at the canvas, and a character outside ASCII draws.
        draw_text(&mut canvas, 5, 5, "é€", 3, TEXT);
    }

    #[test]
    fn overlay_is_a_decodable_png_with_the_map_over_the_image() {
        let image = Rgb32FImage::from_pixel(20, 10, GREY);
        let map = AnomalyMap::new(4, 2, vec![0.0, 0.0, 0.3, 0.4, 0.0, 0.0, 0.3, 0.4]).unwrap();
        let png = overlay_png(&image, &map, &legend(0.4, 0.5)).unwrap();
        let back = image::load_from_memory(&png).unwrap().to_rgb8();
        assert_eq!(back.width(), 120);
        // The image is centred in the legend's width; its right side is hotter.
        assert!(back.get_pixel(50 + 19, 5)[1] > back.get_pixel(50, 5)[1]);
    }
}
