#!/usr/bin/env bash
# Benchmark: every speed ratio of issue 27 in one run, flawscope and its
# anchors back to back on this machine, with each process's peak memory:
#   1. Lite0 forward 224², batch 1, 2 threads: `flawscope bench backbone`
#      against torch (the harness's bench_backbone.py), alternating pairs;
#   2. MTD PatchCore at anomalib's settings, batch 1 and batch 32
#      (scripts/bench_vs_anomalib.sh, which also gives the AUROCs);
#   3. WinCLIP zero-shot ViT-B/16 224² on random weights: the core crate's
#      `winclip_speed --precision bf16` example against anomalib's
#      WinClipModel (the harness's winclip_speed_anomalib.py).
# It prints one table at the end. A benchmark, not a test.
#
#   scripts/bench_all.sh HARNESS_DIR PYTHON WEIGHTS [CATEGORY_DIR] [OUT_DIR]
#
# Arguments as for scripts/bench_vs_anomalib.sh (the harness's venv needs
# open_clip_torch for part 3). Environment:
#   FLAWSCOPE      the binary (default target/release/flawscope)
#   WINCLIP_SPEED  the example binary (default target/release/examples/winclip_speed;
#                  `cargo build --release -p flawscope-core --example winclip_speed`)
#   BANK_SAMPLER   anomalib's bank: random (default here: same bank shape, so
#                  the same scoring cost, minutes instead of hours) or greedy
#   PAIRS          timed backbone pairs after one warm-up pair (default 3)
#   SKIP_BACKBONE / SKIP_PATCHCORE / SKIP_WINCLIP   set to 1 to leave a part out
set -euo pipefail
# The harness's malloc setting (for anomalib's coreset) slows torch's forward
# about 2× here; bench_vs_anomalib.sh sets it for its own part, both sides.
unset MALLOC_MMAP_THRESHOLD_

harness=${1:?harness directory}
python=${2:?python of the anomalib venv}
weights=${3:?lite0 weights (.pth)}
category=${4:-../shared/data/mtd/magnetic_tile}
out=${5:-target/bench-all}
flawscope=${FLAWSCOPE:-target/release/flawscope}
winclip=${WINCLIP_SPEED:-target/release/examples/winclip_speed}
pairs=${PAIRS:-3}
mkdir -p "$out"
harness=$(cd "$harness" && pwd)

# Runs a command under /usr/bin/time -v; stdout to $1.out, the report to $1.time.
timed() {
    local name=$1
    shift
    /usr/bin/time -v "$@" >"$out/$name.out" 2>"$out/$name.time"
}
peak_mib() { awk '/Maximum resident set size/ {printf "%.0f", $NF / 1024}' "$out/$1.time"; }
median() { python3 -c 'import statistics,sys; print(round(statistics.median(float(v) for v in sys.argv[1:]), 2))' "$@"; }
ratio() { python3 -c 'import sys; print(f"{float(sys.argv[2]) / float(sys.argv[1]):.2f}")' "$1" "$2"; }
# A field of a JSON file, or of the file's last line (where a tool logs first).
json() { python3 -c 'import json,sys
text=open(sys.argv[1]).read()
try: d=json.loads(text)
except ValueError: d=json.loads(text.strip().splitlines()[-1])
for k in sys.argv[2].split("."): d=d[k]
print(d)' "$1" "$2"; }

rows=()
row() { rows+=("| $1 | $2 | $3 MiB | $4 | $5 MiB | $(ratio "$2" "$4")× | $6 |"); }

echo "load before: $(uptime)"
if [ "${SKIP_BACKBONE:-0}" != 1 ]; then
    ours=() theirs=() ours_rss=0 theirs_rss=0
    for i in $(seq 0 "$pairs"); do
        timed backbone_flawscope "$flawscope" bench backbone --size 224 --runs 50
        timed backbone_torch "$python" "$harness/bench_backbone.py" "$weights"
        [ "$i" = 0 ] && continue # warm-up pair
        ours+=("$(sed -n 's/.*median \([0-9.]*\) ms.*/\1/p' "$out/backbone_flawscope.out")")
        theirs+=("$(json "$out/backbone_torch.out" logits.median_ms)")
        ours_rss=$(( $(peak_mib backbone_flawscope) > ours_rss ? $(peak_mib backbone_flawscope) : ours_rss ))
        theirs_rss=$(( $(peak_mib backbone_torch) > theirs_rss ? $(peak_mib backbone_torch) : theirs_rss ))
    done
    echo "backbone ms, flawscope: ${ours[*]}; torch: ${theirs[*]}"
    row "Lite0 forward 224², batch 1, 2 threads (median of $pairs pairs)" \
        "$(median "${ours[@]}")" "$ours_rss" "$(median "${theirs[@]}")" "$theirs_rss" "≥ 2×"
    echo "load after the backbone: $(uptime)"
fi
if [ "${SKIP_PATCHCORE:-0}" != 1 ]; then
    SKIP_PADIM=1 BANK_SAMPLER=${BANK_SAMPLER:-random} FLAWSCOPE=$flawscope \
        "$(dirname "$0")/bench_vs_anomalib.sh" "$harness" "$python" "$weights" "$category" \
        "$out/patchcore" | tee "$out/patchcore.log"
    p=$out/patchcore
    a=$p/anomalib_patchcore.json
    for b in 1 32; do
        f=$p/flawscope_patchcore_b$b.json
        anomalib_ms=$(json "$a" infer_ms_per_image)
        [ "$b" = 1 ] && anomalib_ms=$(json "$a" infer_ms_per_image_batch1)
        row "MTD PatchCore at anomalib's settings, batch $b (image AUROC $(json "$f" image_auroc) / anomalib $(json "$a" image_auroc))" \
            "$(json "$f" ms_per_image)" "$(awk '/Maximum resident/ {printf "%.0f", $NF/1024}' "$p/flawscope_patchcore_b$b.time")" \
            "$anomalib_ms" "$(json "$a" peak_rss_mib)" "≥ 4×"
    done
fi
if [ "${SKIP_WINCLIP:-0}" != 1 ]; then
    timed winclip_flawscope "$winclip" --precision bf16 --zero-shot-only --runs 5
    echo "load after flawscope WinCLIP: $(uptime)"
    timed winclip_anomalib "$python" "$harness/winclip_speed_anomalib.py" ViT-B-16
    echo "load after anomalib WinCLIP: $(uptime)"
    ours=$(sed -n 's/^Bf16 zero-shot.*: *\([0-9.]*\) ms$/\1/p' "$out/winclip_flawscope.out")
    if [ -z "$ours" ]; then # no AVX512-BF16: the f32 line
        ours=$(sed -n 's/^F32 zero-shot.*: *\([0-9.]*\) ms$/\1/p' "$out/winclip_flawscope.out")
    fi
    row "WinCLIP zero-shot ViT-B/16 224², random weights" \
        "$ours" "$(peak_mib winclip_flawscope)" "$(json "$out/winclip_anomalib.out" zero_shot_ms_median)" \
        "$(peak_mib winclip_anomalib)" "≥ 2.5×"
fi
echo "load after: $(uptime)"
echo
echo "| pair | flawscope ms | peak RSS | anchor ms | peak RSS | anchor ÷ flawscope | goal |"
echo "|---|---|---|---|---|---|---|"
printf '%s\n' "${rows[@]}"
