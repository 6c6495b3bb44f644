#!/usr/bin/env bash
# One device call's worth of issue 16's pending measurements, each step's output under $OUT,
# steps skipped once they would pass the deadline (MEASURE_DEADLINE_S, default 570 s):
#   gpu tests of the new kernels and profiler paths; the GEMM shapes against cuBLAS
#   (benchmarks/gemm_shapes.py --quick); the engine table for qwen2.5-7b; where one 8B decode
#   step's time goes (--profile, the kernel breakdown); steps of long prompts as piecewise graphs
#   up to 2,048 tokens (their launch's host time against eager); the concurrent pairs (gpu_pairs.sh).
#
#   benchmarks/gpu_measure.sh [STEP...]     # STEP: tests gemm qwen kernels graphs pairs (default: all)
set -uo pipefail
out=${OUT:-.}
deadline=${MEASURE_DEADLINE_S:-570}
t0=$(date +%s)
export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$out/card.txt"
date -u +%F >> "$out/card.txt"

run() {  # NAME ESTIMATE_S COMMAND...: run unless it would pass the deadline; log to $OUT/NAME.log
    local name=$1 estimate=$2
    shift 2
    if [ $(( $(date +%s) - t0 + estimate )) -gt "$deadline" ]; then
        echo "$name: skipped (would pass the ${deadline} s deadline)"
        return
    fi
    local start=$(date +%s)
    "$@" > "$out/$name.log" 2>&1
    echo "$name: rc=$? $(( $(date +%s) - start )) s"
    tail -15 "$out/$name.log"
}

steps=${*:-tests gemm qwen kernels graphs pairs}
for step in $steps; do
    case $step in
        tests) run tests 120 python3 -m pytest -q -s -m gpu tests/kernels tests/engine/test_profiler.py tests/engine/test_piecewise_graphs.py tests/worker/test_worker_own_pace.py ;;
        gemm) run gemm 150 python3 benchmarks/gemm_shapes.py --quick --out "$out/gemm-shapes.json" ;;
        qwen) run qwen 150 python3 benchmarks/engine.py --model qwen2.5-7b:random --offline 1000 \
                  --mixed 32:0 64:32 --out "$out/engine-qwen2.5-7b.json" ;;
        kernels) run kernels 90 python3 benchmarks/engine.py --model llama-3.1-8b:random --profile \
                     --batches 1 64 256 --prefill --out "$out/engine-8b-profile.json" ;;
        graphs) run graphs 120 python3 benchmarks/engine.py --model llama-3.1-8b:random --graph-tokens 2048 \
                    --batches 1 --prefill 2048 --mixed 2048:0 1024:0 512:16 384:16 256:16 \
                    --out "$out/engine-8b-graphs2048.json" ;;
        pairs) run pairs 180 env OUT="$out" bash benchmarks/gpu_pairs.sh ;;
        *) echo "unknown step: $step" >&2; exit 2 ;;
    esac
done
