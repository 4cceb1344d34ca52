#!/usr/bin/env bash
# Benchmark: flawscope and anomalib 2.7 back to back, at anomalib's settings,
# on one machine in one run. Prints PatchCore scoring ms/image (same 100
# training images, bank 10 240) and PaDiM fit peak RSS (64 × 64 grid);
# flawscope's peak RSS (fit and score in one process) is in OUT_DIR/*.time.
#
#   scripts/bench_vs_anomalib.sh HARNESS_DIR PYTHON WEIGHTS [CATEGORY_DIR] [OUT_DIR]
#
# HARNESS_DIR holds anomalib's reference harness (run_patchcore.py), PYTHON
# is the interpreter of the venv anomalib is installed in, WEIGHTS the
# efficientnet-lite0 .pth it loads. CATEGORY_DIR defaults to
# ../shared/data/mtd/magnetic_tile. Environment:
#   FLAWSCOPE       the binary (default target/release/flawscope)
#   BANK_SAMPLER    greedy (default: anomalib's KCenterGreedy, about 6 min on
#                   an idle 2-core machine, hours under load) or random (same
#                   bank shape, so the same scoring cost; accuracy then is not
#                   anomalib's)
#   SKIP_PATCHCORE / SKIP_PADIM   set to 1 to leave one part out
set -euo pipefail

harness=${1:?harness directory}
python=${2:?python of the anomalib venv}
weights=${3:?lite0 weights (.pth)}
category=${4:-../shared/data/mtd/magnetic_tile}
out=${5:-target/bench-vs-anomalib}
flawscope=${FLAWSCOPE:-target/release/flawscope}
sampler=${BANK_SAMPLER:-greedy}
mkdir -p "$out"
category=$(cd "$category" && pwd)
name=$(basename "$category")
export MALLOC_MMAP_THRESHOLD_=1048576 # the harness's README: glibc heap fragmentation in its coreset

# anomalib's 100-image subset, linked into a copy of the category.
subset="$out/subset"
rm -rf "$subset"
python3 - "$category" "$subset/$name" <<'EOF'
import os, random, sys
from pathlib import Path
src, dst = Path(sys.argv[1]), Path(sys.argv[2])
exts = {".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff"}
train = sorted(p for p in (src / "train" / "good").iterdir() if p.suffix.lower() in exts)
chosen = sorted(random.Random(0).sample(train, 100))
(dst / "train" / "good").mkdir(parents=True)
for p in chosen:
    os.symlink(p, dst / "train" / "good" / p.name)
for d in ("test", "ground_truth"):
    if (src / d).exists():
        os.symlink(src / d, dst / d)
EOF

field() { python3 -c "import json,sys; print(json.load(open(sys.argv[1]))[sys.argv[2]])" "$1" "$2"; }
peak_mib() { awk '/Maximum resident set size/ {printf "%.0f", $NF / 1024}' "$1"; }

echo "load before: $(uptime)"
if [ "${SKIP_PATCHCORE:-0}" != 1 ]; then
    # Batch 1 (one image after another: a request's latency) and batch 32
    # (32 images scored at once, as anomalib's batch-32 forward).
    for batch in 1 32; do
        /usr/bin/time -v "$flawscope" eval --dataset "$subset" --detector patchcore \
            --stages stage3,stage5 --size 256 --square --coarse-size 0 --batch "$batch" --json \
            >"$out/flawscope_patchcore_b$batch.json" 2>"$out/flawscope_patchcore_b$batch.time"
    done
    echo "load after flawscope PatchCore: $(uptime)"
    extra=()
    [ "$sampler" = random ] && extra=(--bank-sampler random --bank-size 10240)
    "$python" "$harness/run_patchcore.py" --data "$subset/$name" --weights "$weights" \
        --train-limit 100 --no-aupro "${extra[@]}" --out "$out/anomalib_patchcore.json" \
        >"$out/anomalib_patchcore.log" 2>&1
    echo "load after anomalib PatchCore: $(uptime)"
fi
if [ "${SKIP_PADIM:-0}" != 1 ]; then
    /usr/bin/time -v "$flawscope" eval --dataset "$(dirname "$category")" --detector padim \
        --stages stage2,stage3,stage5 --size 256 --json \
        >"$out/flawscope_padim.json" 2>"$out/flawscope_padim.time"
    echo "load after flawscope PaDiM: $(uptime)"
    "$python" "$harness/run_patchcore.py" --data "$category" --weights "$weights" --model padim \
        --no-aupro --out "$out/anomalib_padim.json" >"$out/anomalib_padim.log" 2>&1
    echo "load after anomalib PaDiM: $(uptime)"
fi

echo
if [ "${SKIP_PATCHCORE:-0}" != 1 ]; then
    f=$out/flawscope_patchcore_b1.json f32=$out/flawscope_patchcore_b32.json a=$out/anomalib_patchcore.json
    echo "PatchCore, 100 training images, stages 3+5 at 256² square, one scale:"
    echo "  flawscope: image AUROC $(field "$f" image_auroc), pixel $(field "$f" pixel_auroc), bank $(field "$f" memory_bank_size), $(field "$f32" ms_per_image) ms/image (batch 32), $(field "$f" ms_per_image) (batch 1), peak RSS $(peak_mib "$out/flawscope_patchcore_b32.time") / $(peak_mib "$out/flawscope_patchcore_b1.time") MiB"
    echo "  anomalib ($(field "$a" bank_sampler)): image AUROC $(field "$a" image_auroc), pixel $(field "$a" pixel_auroc), bank $(field "$a" memory_bank_shape), $(field "$a" infer_ms_per_image) ms/image (batch 32), $(field "$a" infer_ms_per_image_batch1) (batch 1), peak RSS $(field "$a" peak_rss_mib) MiB"
fi
if [ "${SKIP_PADIM:-0}" != 1 ]; then
    f=$out/flawscope_padim.json a=$out/anomalib_padim.json
    echo "PaDiM, stages 2+3+5 at 256² (64 × 64 grid), all training images:"
    echo "  flawscope: image AUROC $(field "$f" image_auroc), pixel $(field "$f" pixel_auroc), peak RSS $(peak_mib "$out/flawscope_padim.time") MiB"
    echo "  anomalib: image AUROC $(field "$a" image_auroc), pixel $(field "$a" pixel_auroc), peak RSS $(field "$a" peak_rss_mib) MiB"
fi
