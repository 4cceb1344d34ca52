#!/usr/bin/env bash
# Runs each fuzz target in fuzz/ for SECONDS (default 60), one after another,
# and prints the executions and crashes of each.
#
#   scripts/fuzz.sh 600            # ten minutes per target
#   FUZZ_TARGETS="decode" scripts/fuzz.sh 60
#
# Needs cargo-fuzz (`cargo install cargo-fuzz`). With a nightly toolchain
# installed the targets run under AddressSanitizer (`cargo +nightly fuzz`);
# otherwise on stable without a sanitizer (`--sanitizer none`, and
# RUSTC_BOOTSTRAP=1 for the few unstable flags cargo-fuzz passes). Our
# crates forbid unsafe code, so the sanitizer mostly watches dependencies.
#
# Each target starts from its committed regression corpus
# (fuzz/regressions/<target>/, replayed by `cargo test` too) and keeps what
# it finds in fuzz/corpus/<target>/ (ignored by git). A crash is written to
# fuzz/artifacts/<target>/: fix it, then copy it into the regression corpus.
set -euo pipefail

seconds="${1:-60}"
targets="${FUZZ_TARGETS:-decode upload oip_infer}"
cd "$(dirname "$0")/../fuzz"

if rustup run nightly rustc --version >/dev/null 2>&1; then
    fuzz=(cargo +nightly fuzz)
    sanitizer="${FUZZ_SANITIZER:-address}"
else
    export RUSTC_BOOTSTRAP=1
    fuzz=(cargo fuzz)
    sanitizer="${FUZZ_SANITIZER:-none}"
fi

"${fuzz[@]}" build --release --sanitizer "$sanitizer"
status=0
for target in $targets; do
    mkdir -p "corpus/$target" "artifacts/$target"
    log="artifacts/$target/last-run.log"
    echo "== $target: ${seconds}s ($sanitizer sanitizer)"
    # Slow inputs (a 40-megapixel decode) are fine; hangs and memory past
    # 3 GB are findings.
    if "${fuzz[@]}" run --release --sanitizer "$sanitizer" "$target" \
        "corpus/$target" "regressions/$target" -- \
        -max_total_time="$seconds" -timeout=60 -rss_limit_mb=3072 \
        -print_final_stats=1 >"$log" 2>&1; then
        result="no crash"
    else
        result="CRASH (see $log and artifacts/$target/)"
        status=1
    fi
    runs=$(grep -o 'stat::number_of_executed_units: *[0-9]*' "$log" | grep -o '[0-9]*$' || echo "?")
    echo "$target: $runs executions, $result"
done
exit "$status"
