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
/// `width × height` is read as below the threshold where values are missing.
pub fn regions(map: &AnomalyMap, threshold: f32) -> Vec<Region> {
    let (width, height) = (map.width, map.height);
    let Some(len) = width.checked_mul(height) else {
        return Vec::new();
    };
    let above = |i: usize| map.values.get(i).is_some_and(|v| *v >= threshold);
    let mut visited = vec![false; len];
    let mut stack = Vec::new();
    let mut found = Vec::new();
    for start in 0..len {
        if visited[start] || !above(start) {
            continue;
        }
        visited[start] = true;
        stack.push(start);
        let (mut x0, mut y0, mut x1, mut y1) = (usize::MAX, usize::MAX, 0, 0);
        let mut peak = f32::NEG_INFINITY;
        let mut area = 0;
        while let Some(i) = stack.pop() {
            let (x, y) = (i % width, i / width);
            x0 = x0.min(x);
            y0 = y0.min(y);
            x1 = x1.max(x);
            y1 = y1.max(y);
            area += 1;
            if let Some(v) = map.values.get(i) {
                peak = peak.max(*v);
            }
            for ny in y.saturating_sub(1)..=(y + 1).min(height - 1) {
                for nx in x.saturating_sub(1)..=(x + 1).min(width - 1) {
                    let j = ny * width + nx;
                    if !visited[j] && above(j) {
                        visited[j] = true;
                        stack.push(j);
                    }
                }
            }
        }
        found.push(Region {
            x: x0,
            y: y0,
            w: x1 - x0 + 1,
            h: y1 - y0 + 1,
            peak,
            area,
        });
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

/// How many map values are at or above `threshold`.
pub fn area_above(map: &AnomalyMap, threshold: f32) -> usize {
    map.values.iter().filter(|v| **v >= threshold).count()
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
}
