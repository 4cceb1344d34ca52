#!/usr/bin/env bash
# The few-shot curve: image AUROC (pixel AUROC where the set has masks) of
# PatchCore and PaDiM fitted on the first k normal training images by path
# (`eval --shots k`), k = 1, 2, 4, 8, 16 and all, beside mutual scoring
# (k = 0, `--detector musc`, no training image read), on the shared sets.
# Each eval's JSON line is appended to WORK_DIR/curve.jsonl (with its k and
# set); the table is printed as tab-separated rows at the end: set, detector,
# k, image AUROC, pixel AUROC, false alarms at the model's threshold (n/N),
# training images, seconds.
#
#   scripts/few_shot_curve.sh [FLAWSCOPE_BINARY] [WORK_DIR] [SETS...]
#
# SETS are DATASET[:CATEGORY] (default: the shared MTD and ELPV mono); K
# (environment) overrides the shots, e.g. K="1 2" for a quick run, and
# DETECTORS the detectors ("patchcore padim musc").
set -euo pipefail
cd "$(dirname "$0")/.."
bin=${1:-target/release/flawscope}
work=${2:-target/few-shot-curve}
shift $(($# < 2 ? $# : 2))
sets=("$@")
[ ${#sets[@]} -gt 0 ] || sets=(/work/shared/data/mtd /work/shared/data/elpv:mono)
shots=${K:-"1 2 4 8 16 all"}
detectors=${DETECTORS:-"musc patchcore padim"}
mkdir -p "$work"
for set in "${sets[@]}"; do
    dataset=${set%%:*}
    category=$([ "$set" != "$dataset" ] && echo "${set#*:}" || true)
    [ -d "$dataset" ] || { echo "skipping $dataset: not found" >&2; continue; }
    cat_flags=()
    [ -n "$category" ] && cat_flags=(--category "$category")
    for detector in $detectors; do
        ks=$([ "$detector" = musc ] && echo 0 || echo "$shots")
        for k in $ks; do
            shot_flags=()
            case $k in
                0 | all) ;;
                *) shot_flags=(--shots "$k") ;;
            esac
            start=$EPOCHREALTIME
            "$bin" eval --dataset "$dataset" "${cat_flags[@]}" --detector "$detector" \
                "${shot_flags[@]}" --json >"$work/eval.json" 2>"$work/eval.err" || {
                echo "failed: $set $detector k=$k" >&2
                cat "$work/eval.err" >&2
                continue
            }
            seconds=$(awk "BEGIN { print $EPOCHREALTIME - $start }")
            python3 - "$work/eval.json" "$set" "$k" "$seconds" >>"$work/curve.jsonl" <<'PY'
import json, sys
path, name, k, seconds = sys.argv[1:]
for line in open(path):
    report = json.loads(line)
    report["set"], report["k"], report["seconds"] = name.split("/")[-1], k, float(seconds)
    print(json.dumps(report))
PY
            tail -n 1 "$work/curve.jsonl" | python3 -c '
import json, sys
r = json.loads(sys.stdin.read())
print("%s\t%s\tk=%s\timage %.3f\tpixel %s\t%.0f s" % (r["set"], r["detector"], r["k"],
      r["image_auroc"], "-" if r.get("pixel_auroc") is None else "%.3f" % r["pixel_auroc"],
      r["seconds"]), file=sys.stderr)'
        done
    done
done
python3 - "$work/curve.jsonl" <<'PY'
import json, sys
print("set\tdetector\tk\timage_auroc\tpixel_auroc\tfalse_alarms\ttrain_images\tseconds")
for line in open(sys.argv[1]):
    r = json.loads(line)
    t = r["at_threshold"]
    px = r.get("pixel_auroc")
    print("\t".join([r["set"], r["detector"], r["k"], "%.3f" % r["image_auroc"],
                     "-" if px is None else "%.3f" % px,
                     "%d/%d" % (t["false_alarms"], t["good_images"]),
                     str(r["train_images"]),
                     "%.0f" % r["seconds"]]))
PY
