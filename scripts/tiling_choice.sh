#!/usr/bin/env bash
# Automatic tiling (whole image, tiles, or both) against forced tiles and no tiles: image and pixel AUROC
# of PatchCore and PaDiM on the committed thin-line and parts sets and their
# four-times-larger versions (built here from the committed generators), as
# tab-separated rows: set, category, detector, tiling, image AUROC, pixel
# AUROC, tile side chosen, the automatic choice's evidence, seconds.
#
#   scripts/tiling_choice.sh [FLAWSCOPE_BINARY] [WORK_DIR]
set -euo pipefail
cd "$(dirname "$0")/.."
bin=${1:-target/release/flawscope}
work=${2:-target/tiling-choice}
mkdir -p "$work"
[ -d "$work/thin_lines4" ] || cargo run -q --release -p flawscope-core --example thin_lines -- \
    demo/solar_cell/train/good "$work/thin_lines4" 4
[ -d "$work/parts4" ] || cargo run -q --release -p flawscope-core --example parts -- "$work/parts4" 4
printf 'set\tcategory\tdetector\ttiling\timage_auroc\tpixel_auroc\ttile_side\tdecision\tseconds\n'
for set in demo/thin_lines "$work/thin_lines4" demo/parts "$work/parts4"; do
    for category in $(ls "$set"); do
        for detector in patchcore padim; do
            for tiling in off forced auto; do
                case $tiling in
                    off) flags=(--no-tile) ;;
                    forced) flags=(--tile "$([ $detector = padim ] && echo 256 || echo 224)") ;;
                    auto) flags=() ;;
                esac
                start=$EPOCHREALTIME
                "$bin" eval --dataset "$set" --category "$category" --detector "$detector" \
                    "${flags[@]}" --json >"$work/eval.json" 2>/dev/null
                seconds=$(awk "BEGIN { print $EPOCHREALTIME - $start }")
                python3 - "$work/eval.json" "$set" "$category" "$detector" "$tiling" "$seconds" <<'PY'
import json, sys
path, dataset, category, detector, tiling, seconds = sys.argv[1:]
report = json.load(open(path))
c = report["categories"][0] if "categories" in report else report
d = c.get("tiling_decision")
overall = lambda v: "-" if not v else "%.3f" % ((v["local"] + v["global"]) / 2)
why = "" if not d else "untiled %s / tiled %s / both %s -> %s" % (
    overall(d["untiled"]), overall(d["tiled"]), overall(d.get("both")),
    "both" if d.get("whole_kept") else "tiles" if d["tiled_chosen"] else "untiled")
print("\t".join([dataset.split("/")[-1], category, detector, tiling,
                 "%.3f" % c["image_auroc"], "%.3f" % (c.get("pixel_auroc") or float("nan")),
                 str(c.get("tile_side") or "-"), why, "%.0f" % float(seconds)]), flush=True)
PY
            done
        done
    done
done
