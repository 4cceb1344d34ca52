#!/usr/bin/env python3
"""Write the reference fixtures for `flawscope_core::metrics`.

Independent reference values, computed with scikit-learn and a plain numpy
implementation of AUPRO that follows the MVTec AD definition literally.
The output is deterministic (fixed seed, sorted keys, fixed float format):

    python3 scripts/make_metric_fixtures.py

writes core/tests/fixtures/metrics/*.json.

Every score is a float32. In the JSON it is written as the shortest decimal
that reads back (decimal -> f64 -> f32, as serde_json does) to the same
float32, and all references are computed from those float32 values.

Pixel metrics:
* pixel AUROC: `sklearn.metrics.roc_auc_score` over every pixel of every
  image (mask pixel 1 = anomalous, images without a mask are all normal);
* AUPRO: thresholds are all unique scores; for each threshold t,
  FPR(t) = share of all normal pixels with score >= t, and
  PRO(t) = mean over every connected anomalous region (8-connectivity,
  `scipy.ndimage.label` with a 3x3 structure of ones) of every image of the
  share of that region's pixels with score >= t. The curve starts at (0, 0);
  it is cut at FPR = limit with linear interpolation, integrated with the
  trapezoid rule and divided by the limit.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from scipy import ndimage
from sklearn.metrics import precision_recall_curve, roc_auc_score

SEED = 20240611
OUT_DIR = Path(__file__).resolve().parent.parent / "core" / "tests" / "fixtures" / "metrics"
LIMITS = (0.3, 0.05, 1.0)


# --------------------------------------------------------------------------
# float32 handling


def f32_array(values) -> np.ndarray:
    """Round to float32 and make sure each value survives the JSON trip."""
    arr = np.asarray(values, dtype=np.float32)
    for v in arr.ravel():
        text = np.format_float_positional(v, unique=True, trim="-")
        back = np.float32(np.float64(float(text)))
        assert back == v, (v, text)
    return arr


def f32_list(arr: np.ndarray) -> list[float]:
    return [float(np.format_float_positional(v, unique=True, trim="-")) for v in arr.ravel()]


# --------------------------------------------------------------------------
# references


def f1_max_reference(scores: np.ndarray, labels: np.ndarray) -> dict:
    precision, recall, thresholds = precision_recall_curve(labels, scores.astype(np.float64))
    with np.errstate(divide="ignore", invalid="ignore"):
        f1 = 2 * precision * recall / (precision + recall)
    f1 = np.nan_to_num(f1[:-1], nan=0.0)  # the last point has no threshold
    best = float(f1.max())
    # thresholds are ascending; report the highest one reaching the best F1
    at_best = thresholds[np.isclose(f1, best, rtol=0, atol=1e-12)]
    return {"f1": best, "threshold": float(np.float32(at_best.max()))}


def aupro_reference(images: list[dict], limit: float) -> float:
    """Exact AUPRO by a literal sweep over all unique scores."""
    normal = []
    regions = []
    for img in images:
        scores = img["scores"].astype(np.float64)
        mask = img["mask"]
        if mask is None:
            normal.append(scores.ravel())
            continue
        normal.append(scores[~mask])
        labelled, count = ndimage.label(mask, structure=np.ones((3, 3), dtype=int))
        for r in range(1, count + 1):
            regions.append(np.sort(scores[labelled == r]))
    normal = np.sort(np.concatenate(normal))
    all_scores = np.concatenate([normal] + regions)
    thresholds = np.unique(all_scores)[::-1]  # descending: FPR grows

    fpr = (normal.size - np.searchsorted(normal, thresholds, side="left")) / normal.size
    overlaps = [
        (reg.size - np.searchsorted(reg, thresholds, side="left")) / reg.size for reg in regions
    ]
    pro = np.mean(np.stack(overlaps), axis=0)

    fpr = np.concatenate([[0.0], fpr])
    pro = np.concatenate([[0.0], pro])
    inside = fpr <= limit
    x = fpr[inside]
    y = pro[inside]
    if x[-1] < limit:
        nxt = np.argmax(fpr > limit)
        f0, f1, p0, p1 = fpr[nxt - 1], fpr[nxt], pro[nxt - 1], pro[nxt]
        x = np.append(x, limit)
        y = np.append(y, p0 + (p1 - p0) * (limit - f0) / (f1 - f0))
    return float(np.trapezoid(y, x) / limit)


def pixel_reference(images: list[dict]) -> dict:
    scores = np.concatenate([img["scores"].ravel().astype(np.float64) for img in images])
    labels = np.concatenate(
        [
            np.zeros(img["scores"].size, dtype=bool) if img["mask"] is None else img["mask"].ravel()
            for img in images
        ]
    )
    return {
        "pixel_auroc": float(roc_auc_score(labels, scores)),
        "aupro": {str(limit): aupro_reference(images, limit) for limit in LIMITS},
    }


# --------------------------------------------------------------------------
# cases


def image_case(name: str, scores, labels: np.ndarray) -> dict:
    scores = f32_array(scores)
    labels = np.asarray(labels, dtype=bool)
    case = {"name": name, "scores": f32_list(scores), "labels": labels.tolist()}
    if labels.all() or not labels.any():
        case["expected"] = {"error": "single_class"}
    else:
        case["expected"] = {
            "auroc": float(roc_auc_score(labels, scores.astype(np.float64))),
            "f1_max": f1_max_reference(scores, labels),
        }
    return case


def ellipse(h: int, w: int, cy: float, cx: float, ry: float, rx: float) -> np.ndarray:
    yy, xx = np.mgrid[0:h, 0:w]
    return ((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 <= 1.0


def blob_images(rng: np.random.Generator) -> list[dict]:
    """Eight 40x50 images: normal ones, blobs, diagonal touch, empty mask."""
    h, w = 40, 50
    images = []

    def add(mask: np.ndarray | None, offset: float, spread: float):
        noise = rng.normal(offset, spread, size=(h, w))
        if mask is not None and mask.any():
            dist = ndimage.distance_transform_edt(mask)
            bump = 1.5 * (1 - np.exp(-dist / 2.0)) + 0.6
            noise = noise + np.where(mask, bump, 0.0)
            # a soft halo so that neighbouring normal pixels score a bit higher
            halo = ndimage.gaussian_filter(mask.astype(float), 2.0)
            noise = noise + 0.8 * halo * ~mask
        images.append({"scores": f32_array(noise), "mask": mask})

    # normal image first with a narrow range: later images force re-binning
    add(None, 0.0, 0.2)
    add(ellipse(h, w, 12, 15, 5, 7), 0.0, 0.5)
    add(None, 0.1, 0.5)
    two = ellipse(h, w, 10, 10, 3, 4) | ellipse(h, w, 28, 38, 6, 5)
    add(two, 0.0, 0.6)
    diag = np.zeros((h, w), dtype=bool)
    diag[5:10, 5:10] = True  # touches the next square only at a corner
    diag[10:14, 10:14] = True
    diag[30:32, 40:49] = True
    add(diag, 0.0, 0.5)
    add(np.zeros((h, w), dtype=bool), 0.0, 0.5)  # anomalous image, empty mask
    add(ellipse(h, w, 20, 25, 12, 3), 0.3, 0.7)
    single = np.zeros((h, w), dtype=bool)
    single[0, 0] = True  # a one-pixel region in the corner
    single[39, 20:23] = True  # a region on the border
    add(single, -0.2, 0.9)
    # one far outlier forces several coarsenings of the grid
    images[-1]["scores"][5, 5] = np.float32(25.0)
    return images


def with_scores(images: list[dict], fn) -> list[dict]:
    return [{"scores": f32_array(fn(img["scores"])), "mask": img["mask"]} for img in images]


def pixel_case(name: str, images: list[dict]) -> dict:
    any_anomalous = any(img["mask"] is not None and img["mask"].any() for img in images)
    any_normal = any(img["mask"] is None or not img["mask"].all() for img in images)
    case = {
        "name": name,
        "images": [
            {
                "width": int(img["scores"].shape[1]),
                "height": int(img["scores"].shape[0]),
                "scores": f32_list(img["scores"]),
                "mask": None
                if img["mask"] is None
                else [int(v) for v in img["mask"].ravel().astype(np.uint8)],
            }
            for img in images
        ],
    }
    if not any_anomalous:
        case["expected"] = {"error": "no_anomalous"}
    elif not any_normal:
        case["expected"] = {"error": "no_normal"}
    else:
        case["expected"] = pixel_reference(images)
    return case


def write(name: str, payload: dict) -> None:
    path = OUT_DIR / f"{name}.json"
    text = json.dumps(payload, sort_keys=True, separators=(",", ":"))
    path.write_text(text + "\n")
    print(f"{path.relative_to(OUT_DIR.parent.parent.parent)}: {len(text)} bytes")


def main() -> None:
    rng = np.random.default_rng(SEED)
    OUT_DIR.mkdir(parents=True, exist_ok=True)

    # image level -----------------------------------------------------------
    n = 200
    labels = rng.random(n) < 0.3
    scores = rng.normal(0.0, 1.0, n) + 1.2 * labels
    image_cases = [image_case("random", scores, labels)]

    n = 150
    labels = rng.random(n) < 0.4
    scores = np.round(rng.normal(0.0, 1.0, n) + 0.8 * labels)  # few values
    image_cases.append(image_case("heavy_ties", np.clip(scores, -1, 2) / 4, labels))

    labels = rng.random(50) < 0.5
    image_cases.append(image_case("all_equal", np.full(50, 0.5), labels))

    # a perfect separator with a tie across the classes at the border
    labels = np.array([False] * 6 + [True] * 4)
    scores = np.array([0.1, 0.2, 0.2, 0.3, 0.4, 0.6, 0.6, 0.7, 0.8, 0.9])
    image_cases.append(image_case("border_tie", scores, labels))

    image_cases.append(image_case("single_class_normal", rng.random(20), np.zeros(20, bool)))
    image_cases.append(image_case("single_class_anomalous", rng.random(20), np.ones(20, bool)))
    write("image_cases", {"cases": image_cases})

    # pixel level -----------------------------------------------------------
    blobs = blob_images(rng)
    write("pixel_blobs", pixel_case("blobs", blobs))
    ties = with_scores(blobs, lambda s: np.round(np.clip(s, -2, 4) * 4) / 4)
    write("pixel_ties", pixel_case("ties", ties))
    equal = with_scores(blobs[:4], lambda s: np.full_like(s, 0.7))
    write("pixel_all_equal", pixel_case("all_equal", equal))
    normal_only = [img for img in blobs if img["mask"] is None]
    write("pixel_no_anomalous", pixel_case("no_anomalous", normal_only))


if __name__ == "__main__":
    main()
