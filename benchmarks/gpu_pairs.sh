#!/usr/bin/env bash
# One device call: the rates steps of two models reach side by side (`prism profile
# --pair-with`), and a held-out check of them on another pair.
#
#   benchmarks/gpu_pairs.sh [FIT_A FIT_B [HELD_A HELD_B]]
#
# Defaults: fitted on llama-3.2-1b + llama-3.1-8b, checked on llama-3.1-8b twice (session 7 of
# benchmarks/results/engine-notes.md measured that pair's decode turns). Writes to $OUT (default
# .): concurrency.yaml (copy it into the card's profile folder, e.g. benchmarks/profiles/nvidia-h200/),
# concurrency-held-out.yaml, check.log, contention-rules.md (each turn under both contention
# rules, the rule each file picks) and each run's stdout (.log) and stderr (.err).
# Each case is also run as models at their own pace run it (--streams: each step relaunched once
# done, alone and side by side, PAIR_STREAMS_S seconds each, default 0.4; 0: not).
# DEVICE (default cuda:0) and PAIR_ARGS (e.g. "--quick --memory 512MiB") for a try on CPU.
set -uo pipefail
fit_a=${1:-llama-3.2-1b:random} fit_b=${2:-llama-3.1-8b:random}
held_a=${3:-llama-3.1-8b:random} held_b=${4:-llama-3.1-8b:random}
out=${OUT:-.} device=${DEVICE:-cuda:0}
export PYTHONUNBUFFERED=1
if command -v nvidia-smi >/dev/null; then
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$out/card.txt"
fi
for pair in "fit $fit_a $fit_b concurrency" "held-out $held_a $held_b concurrency-held-out"; do
    set -- $pair
    start=$(date +%s)
    # shellcheck disable=SC2086 (PAIR_ARGS is several arguments)
    if ! python3 -m prism.cli profile --model "$2" --pair-with "$3" --device "$device" --out "$out/$4.yaml" \
            --streams "${PAIR_STREAMS_S:-0.4}" ${PAIR_ARGS:-} 2>"$out/$4.err" | tee "$out/$4.log"; then
        tail -20 "$out/$4.err"
        exit 1
    fi
    echo "$1 pair $2 + $3: $(( $(date +%s) - start )) s" | tee -a "$out/$4.log"
done
python3 benchmarks/concurrency_check.py "$out/concurrency.yaml" "$out/concurrency-held-out.yaml" | tee "$out/check.log"
python3 benchmarks/contention_rules.py "$out/concurrency.yaml" "$out/concurrency-held-out.yaml" | tee "$out/contention-rules.md"
