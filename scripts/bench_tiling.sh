#!/usr/bin/env bash
# Benchmark: what tiles cost against the pixels they cover. For each set,
# `flawscope eval` untiled (--no-tile) and in forced tiles (--tile 224 for
# PatchCore, 256 for PaDiM), each under /usr/bin/time -v, one after the
# other. Prints one tab-separated row per run: fit seconds, scoring ms per
# test image, both per megapixel, peak RSS, image and pixel AUROC.
#
# Per megapixel: untiled, of the pixels the backbone sees (the detector's
# input, about 224² or 256², whatever the image size); tiled, of the
# image's own pixels (tiles see them at native resolution). The goal of
# "large images at the cost of their pixels" is tiled ≤ 2× untiled.
#
#   scripts/bench_tiling.sh [FLAWSCOPE_BINARY] [WORK_DIR]
#
# Environment: SCALE multiplies the generated sets (default 20: the tall
# thin-line set then has 120 training images of 256 × 1 200 px), SETS
# lists what to run (default: thin_tall thin_strip parts_tall mtd; mtd
# needs ../shared/data/mtd), DETECTORS (default: patchcore padim).
set -euo pipefail
cd "$(dirname "$0")/.."
bin=${1:-target/release/flawscope}
work=${2:-target/bench-tiling}
scale=${SCALE:-20}
sets=${SETS:-thin_tall thin_strip parts_tall mtd}
detectors=${DETECTORS:-patchcore padim}
mkdir -p "$work"
thin=$work/thin_lines$scale
parts=$work/parts$scale
[ -d "$thin" ] || cargo run -q --release -p flawscope-core --example thin_lines -- \
    demo/solar_cell/train/good "$thin" "$scale" >/dev/null
[ -d "$parts" ] || cargo run -q --release -p flawscope-core --example parts -- "$parts" "$scale" >/dev/null

# Mean megapixels of the PNG/JPEG files under a folder (headers only).
megapixels() {
    python3 - "$1" <<'PY'
import pathlib, struct, sys
def size(path):
    data = path.read_bytes()
    if data[:8] == b"\x89PNG\r\n\x1a\n":
        return struct.unpack(">II", data[16:24])
    i = 2
    while i < len(data):
        marker, length = data[i + 1], struct.unpack(">H", data[i + 2:i + 4])[0]
        if marker in (0xC0, 0xC1, 0xC2):
            h, w = struct.unpack(">HH", data[i + 5:i + 9])
            return w, h
        i += 2 + length
    raise ValueError(path)
sizes = [size(p) for p in pathlib.Path(sys.argv[1]).rglob("*") if p.suffix.lower() in (".png", ".jpg", ".jpeg") and "ground_truth" not in p.parts]
print(sum(w * h for w, h in sizes) / len(sizes) / 1e6)
PY
}

echo "load before: $(uptime)"
printf 'set\tdetector\ttiling\ttrain_images\tfit_s\tfit_s_per_mp\tms_per_image\tms_per_mp\tpeak_rss_mib\timage_auroc\tpixel_auroc\n'
for set in $sets; do
    case $set in
        thin_tall) args=(--dataset "$thin" --category tall) dir=$thin/tall ;;
        thin_strip) args=(--dataset "$thin" --category strip) dir=$thin/strip ;;
        parts_tall) args=(--dataset "$parts" --category tall) dir=$parts/tall ;;
        mtd)
            if [ ! -d ../shared/data/mtd ]; then
                echo "mtd: ../shared/data/mtd is absent, skipped" >&2
                continue
            fi
            args=(--dataset ../shared/data/mtd) dir=../shared/data/mtd/magnetic_tile
            ;;
        *) echo "unknown set $set" >&2; exit 2 ;;
    esac
    train_mp=$(megapixels "$dir/train")
    test_mp=$(megapixels "$dir/test")
    for detector in $detectors; do
        side=$([ "$detector" = padim ] && echo 256 || echo 224)
        for tiling in off tiles; do
            flags=(--no-tile)
            [ "$tiling" = tiles ] && flags=(--tile "$side")
            /usr/bin/time -v "$bin" eval "${args[@]}" --detector "$detector" "${flags[@]}" --json \
                >"$work/eval.json" 2>"$work/eval.time"
            python3 - "$work/eval.json" "$work/eval.time" "$set" "$detector" "$tiling" \
                "$train_mp" "$test_mp" "$side" <<'PY'
import json, re, sys
path, timing, name, detector, tiling, train_mp, test_mp, side = sys.argv[1:]
report = json.load(open(path))
c = report["categories"][0] if "categories" in report else report
rss = int(re.search(r"Maximum resident set size \(kbytes\): (\d+)", open(timing).read()).group(1)) / 1024
# Untiled, the backbone sees about side² pixels per image; tiled, the image's own.
seen_train = float(train_mp) if tiling == "tiles" else int(side) ** 2 / 1e6
seen_test = float(test_mp) if tiling == "tiles" else int(side) ** 2 / 1e6
fit_per_mp = c["fit_seconds"] / (c["train_images"] * seen_train)
ms_per_mp = c["ms_per_image"] / seen_test
pixel = c.get("pixel_auroc")
print("\t".join([name, detector, tiling, str(c["train_images"]), "%.1f" % c["fit_seconds"],
                 "%.2f" % fit_per_mp, "%.1f" % c["ms_per_image"], "%.1f" % ms_per_mp, "%.0f" % rss,
                 "%.4f" % c["image_auroc"], "-" if pixel is None else "%.4f" % pixel]))
PY
        done
    done
done
echo "load after: $(uptime)"
