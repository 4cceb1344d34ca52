//! Anomalous regions: the connected areas of an anomaly map at or above a
//! threshold, as bounding boxes a caller can draw or describe.

use serde::Serialize;

use crate::anomaly_map::AnomalyMap;

/// At most this many regions are returned, the strongest first.
pub const MAX_REGIONS: usize = 20;

/// One 8-connected area of map values at or above the threshold.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct Region {
    /// Left edge of the bounding box, in map pixels.
    pub x: usize,
    /// Top edge of the bounding box.
    pub y: usize,
    /// Bounding-box width.
    pub w: usize,
    /// Bounding-box height.
    pub h: usize,
    /// Highest map value inside the area.
    pub peak: f32,
    /// Pixels in the area itself (at most `w × h`).
    pub area: usize,
}

/// The 8-connected components of `map.values >= threshold`, sorted by peak
/// (highest first, then largest area), at most [`MAX_REGIONS`]. NaN values
/// never belong to a region. A map whose `values` are shorter than
/// `width × height` is read as below the threshold where values are missing;
/// a map of 2³² cells or more has no regions.
pub fn regions(map: &AnomalyMap, threshold: f32) -> Vec<Region> {
    let above = |i: usize| map.values.get(i).is_some_and(|v| *v >= threshold);
    let Some((labels, count)) = label_components(map.width, map.height, above) else {
        return Vec::new();
    };
    let mut found = vec![
        Region {
            x: usize::MAX,
            y: usize::MAX,
            w: 0,
            h: 0,
            peak: f32::NEG_INFINITY,
            area: 0,
        };
        count
    ];
    // `w` and `h` hold the right and bottom edges until the boxes are closed.
    for (i, &label) in labels.iter().enumerate() {
        let Some(r) = (label as usize)
            .checked_sub(1)
            .and_then(|k| found.get_mut(k))
        else {
            continue;
        };
        let (x, y) = (i % map.width, i / map.width);
        r.x = r.x.min(x);
        r.y = r.y.min(y);
        r.w = r.w.max(x);
        r.h = r.h.max(y);
        r.area += 1;
        if let Some(v) = map.values.get(i) {
            r.peak = r.peak.max(*v);
        }
    }
    for r in &mut found {
        r.w = r.w - r.x + 1;
        r.h = r.h - r.y + 1;
    }
    found.sort_by(|a, b| {
        b.peak
            .total_cmp(&a.peak)
            .then(b.area.cmp(&a.area))
            .then((a.y, a.x).cmp(&(b.y, b.x)))
    });
    found.truncate(MAX_REGIONS);
    found
}

/// The 8-connected components of the cells where `is_set(i)` holds in a
/// row-major `width × height` grid (imageproc's two-pass labelling): one
/// label per cell (0 = not set, `1..=n` numbered in raster order of each
/// component's first cell) and `n`. `None` for grids imageproc cannot take
/// (a side over `u32::MAX`, or 2³² cells or more).
pub(crate) fn label_components(
    width: usize,
    height: usize,
    is_set: impl Fn(usize) -> bool,
) -> Option<(Vec<u32>, usize)> {
    let len = width.checked_mul(height)?;
    if len == 0 {
        return Some((Vec::new(), 0));
    }
    if u32::try_from(len).is_err() {
        return None;
    }
    if len == 1 {
        // imageproc 0.27 indexes its union-find out of bounds (a panic) on a
        // single set cell; that grid's answer is plain.
        return Some(if is_set(0) {
            (vec![1], 1)
        } else {
            (vec![0], 0)
        });
    }
    Some(two_pass(width, len, is_set))
}

/// Two-pass 8-connected labelling, with the labels as imageproc numbers
/// them. imageproc's own keeps a union-find of two machine words per
/// pixel besides the mask and the labels: 800 MB at 40 megapixels, the
/// largest part of the server's memory per request. Here the union-find
/// has one `u32` per provisional label, and no mask is made.
fn two_pass(width: usize, len: usize, is_set: impl Fn(usize) -> bool) -> (Vec<u32>, usize) {
    // parent[k] for provisional label k (0 unused).
    let mut parent: Vec<u32> = vec![0];
    fn root(parent: &mut [u32], mut k: u32) -> u32 {
        while parent[k as usize] != k {
            let up = parent[parent[k as usize] as usize];
            parent[k as usize] = up;
            k = up;
        }
        k
    }
    let mut labels = vec![0u32; len];
    for i in 0..len {
        if !is_set(i) {
            continue;
        }
        let (x, y) = (i % width, i / width);
        let mut neighbours = [0u32; 4];
        if x > 0 {
            neighbours[0] = labels[i - 1];
        }
        if y > 0 {
            let up = i - width;
            neighbours[1] = labels[up];
            if x > 0 {
                neighbours[2] = labels[up - 1];
            }
            if x + 1 < width {
                neighbours[3] = labels[up + 1];
            }
        }
        let mut own = 0u32;
        for n in neighbours.into_iter().filter(|&n| n != 0) {
            let r = root(&mut parent, n);
            if own == 0 {
                own = r;
            } else if r != own {
                // The smaller label (earlier first cell) stays the root.
                let (keep, join) = (own.min(r), own.max(r));
                parent[join as usize] = keep;
                own = keep;
            }
        }
        if own == 0 {
            own = u32::try_from(parent.len()).unwrap_or(u32::MAX);
            parent.push(own);
        }
        labels[i] = own;
    }
    // Roots renumbered 1..=n in raster order of each component's first cell.
    let mut final_label = vec![0u32; parent.len()];
    let mut count = 0u32;
    for label in &mut labels {
        if *label == 0 {
            continue;
        }
        let r = root(&mut parent, *label) as usize;
        if final_label[r] == 0 {
            count += 1;
            final_label[r] = count;
        }
        *label = final_label[r];
    }
    (labels, count as usize)
}

/// How many map values are at or above `threshold`.
pub fn area_above(map: &AnomalyMap, threshold: f32) -> usize {
    map.values.iter().filter(|v| **v >= threshold).count()
}

/// Position of the highest map value (the first one on ties; NaN ignored).
pub fn hotspot(map: &AnomalyMap) -> (usize, usize) {
    let mut best = (0, f32::NEG_INFINITY);
    for (i, v) in map.values.iter().enumerate() {
        if *v > best.1 {
            best = (i, *v);
        }
    }
    let width = map.width.max(1);
    (best.0 % width, best.0 / width)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn map(rows: &[&str]) -> AnomalyMap {
        // '.' = 0.0, digits d = d / 10.
        let width = rows[0].len();
        let values = rows
            .iter()
            .flat_map(|r| r.chars())
            .map(|c| c.to_digit(10).map_or(0.0, |d| d as f32 / 10.0))
            .collect();
        AnomalyMap::new(width, rows.len(), values).unwrap()
    }

    #[test]
    fn diagonal_neighbours_join_and_boxes_are_tight() {
        let m = map(&[
            "5.....", //
            ".6....", //
            "..7..9", //
            ".....8", //
        ]);
        let found = regions(&m, 0.5);
        assert_eq!(found.len(), 2);
        assert_eq!(
            found[0],
            Region {
                x: 5,
                y: 2,
                w: 1,
                h: 2,
                peak: 0.9,
                area: 2
            }
        );
        assert_eq!(
            (found[1].x, found[1].y, found[1].w, found[1].h),
            (0, 0, 3, 3)
        );
        assert_eq!(found[1].area, 3);
        assert!((found[1].peak - 0.7).abs() < 1e-6);
        assert_eq!(area_above(&m, 0.5), 5);
    }

    #[test]
    fn threshold_is_inclusive_and_below_is_empty() {
        let m = map(&["..", ".5"]);
        assert_eq!(regions(&m, 0.5).len(), 1);
        assert!(regions(&m, 0.51).is_empty());
    }

    #[test]
    fn capped_at_the_strongest_regions() {
        // 30 isolated pixels with increasing values.
        let width = 60;
        let mut values = vec![0.0; width];
        for k in 0..30 {
            values[2 * k] = 0.5 + k as f32 / 100.0;
        }
        let m = AnomalyMap::new(width, 1, values).unwrap();
        let found = regions(&m, 0.5);
        assert_eq!(found.len(), MAX_REGIONS);
        assert!((found[0].peak - 0.79).abs() < 1e-6);
        assert!(found.windows(2).all(|w| w[0].peak >= w[1].peak));
    }

    #[test]
    fn nan_and_short_or_empty_maps_are_safe() {
        let m = AnomalyMap {
            width: 3,
            height: 2,
            values: vec![f32::NAN, 0.9, 0.9],
        };
        let found = regions(&m, 0.5);
        assert_eq!(found.len(), 1);
        assert_eq!((found[0].w, found[0].h, found[0].area), (2, 1, 2));
        let empty = AnomalyMap {
            width: 0,
            height: 0,
            values: vec![],
        };
        assert!(regions(&empty, 0.5).is_empty());
        let huge = AnomalyMap {
            width: usize::MAX,
            height: 2,
            values: vec![1.0],
        };
        assert!(regions(&huge, 0.5).is_empty());
    }

    #[test]
    fn equal_regions_keep_raster_order() {
        // Two 2-pixel regions with equal peak and area: the one met first
        // in raster order comes first, the sort being stable.
        let m = map(&[
            "...55", //
            "55...", //
        ]);
        let found = regions(&m, 0.5);
        assert_eq!(found.len(), 2);
        assert_eq!((found[0].x, found[0].y), (3, 0));
        assert_eq!((found[1].x, found[1].y), (0, 1));
    }

    #[test]
    fn labels_are_consecutive_in_raster_order() {
        // A U shape whose arms meet only in the second row, then a lone cell:
        // labels 1 and 2, with no gap left by the merged arm.
        let set = [
            1, 0, 1, 0, 0, //
            1, 1, 1, 0, 1, //
        ];
        let (labels, count) = label_components(5, 2, |i| set[i] == 1).unwrap();
        assert_eq!(count, 2);
        assert_eq!(labels, vec![1, 0, 1, 0, 0, 1, 1, 1, 0, 2]);
    }

    #[test]
    fn grids_imageproc_cannot_take_are_refused_without_allocating() {
        assert!(label_components(1 << 32, 1, |_| true).is_none());
        assert!(label_components(1 << 16, 1 << 16, |_| true).is_none());
        assert_eq!(label_components(0, 7, |_| true), Some((Vec::new(), 0)));
    }

    #[test]
    fn one_cell_maps() {
        let m = map(&["9"]);
        let found = regions(&m, 0.5);
        assert_eq!((found.len(), found[0].area, found[0].w), (1, 1, 1));
        assert!(regions(&m, 0.95).is_empty());
    }

    #[test]
    fn labels_equal_imageproc_on_random_masks() {
        use image::{GrayImage, Luma};
        use imageproc::region_labelling::{Connectivity, connected_components};
        use rand::{Rng, SeedableRng};
        let mut rng = rand::rngs::StdRng::seed_from_u64(26);
        for round in 0..300 {
            let (w, h) = (rng.random_range(1..40usize), rng.random_range(1..40usize));
            let density = rng.random_range(0.05..0.95);
            let mask: Vec<bool> = (0..w * h).map(|_| rng.random_bool(density)).collect();
            let ours = label_components(w, h, |i| mask[i]).unwrap();
            if w * h == 1 {
                continue; // imageproc panics there (see label_components).
            }
            let image = GrayImage::from_raw(
                w as u32,
                h as u32,
                mask.iter().map(|&b| u8::from(b)).collect(),
            )
            .unwrap();
            let theirs = connected_components(&image, Connectivity::Eight, Luma([0u8])).into_raw();
            let count = theirs.iter().copied().max().unwrap_or(0) as usize;
            assert_eq!(ours, (theirs, count), "round {round}: {w}×{h}");
        }
    }
}
