#!/usr/bin/env bash
# One device call's worth of issue 16's pending measurements, steps skipped once they would pass
# the deadline (MEASURE_DEADLINE_S, default 570 s):
#   gpu tests of the new kernels and profiler paths; the GEMM shapes against cuBLAS
#   (benchmarks/gemm_shapes.py --quick); the engine table for qwen2.5-7b; where one 8B decode
#   step's time goes (--profile, the kernel breakdown); steps of long prompts as piecewise graphs
#   up to 2,048 tokens (their launch's host time against eager); the concurrent pairs (gpu_pairs.sh);
#   offline: the engine table of the 8B with the running-request cap at 1,024 and at 256, then of
#   llama-3.2-1b and qwen2.5-7b at 1,024 (MEMORY_GIB: the engines' page budget, default 120).
# Every output is tarred into $OUT/measure-DATE.tgz after each step (the device tool brings back
# a bounded number of files, and a call stopped at its limit still returns what $OUT holds).
#
#   benchmarks/gpu_measure.sh [STEP...]     # STEP: tests tests-memory gemm qwen kernels graphs pairs offline small hostwaits microbatch graphs8192
#                                           # (default: tests gemm qwen kernels graphs pairs)
# microbatch: two 8B decodes side by side on two streams against alternated at batches up to 256
# (context 512, to fit an H100): the most that running a large batch as two halves whose
# attention and GEMMs overlap could gain (issue 16's offline target needs that overlap).
# graphs8192: the 8B offline run with every step of prefill up to 8,192 tokens as piecewise graphs.
# hostwaits: the offline runs of the 8B and the 1B at cap 1,024, with
# the GPU's idle time by the kind of step waited for and the host's garbage collections.
set -uo pipefail
out=$(mktemp -d)
deadline=${MEASURE_DEADLINE_S:-570}
mem=${MEMORY_GIB:-120}
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
    grep -v 'tensor/s' "$out/$name.log" | tail -15
    tar czf "${OUT:-.}/measure-$(date -u +%F).tgz" -C "$out" .
}

engine() {  # NAME ESTIMATE_S ENGINE.PY ARGS...: one benchmarks/engine.py run, its JSON as NAME.json
    local name=$1 estimate=$2
    shift 2
    run "$name" "$estimate" python3 benchmarks/engine.py --out "$out/$name.json" "$@"
}

small_models() {  # the engine table of llama-3.2-1b and qwen2.5-7b, cap 1,024
    for model in llama-3.2-1b qwen2.5-7b; do
        engine "$model-seqs1024" 130 --memory-gib "$mem" --model "$model:random" --batches 1 64 256 1024 \
            --offline 1000 --max-seqs 1024
    done
}

steps=${*:-tests gemm qwen kernels graphs pairs}
for step in $steps; do
    case $step in
        tests) run tests 120 python3 -m pytest -q -s -m gpu tests/kernels tests/engine/test_profiler.py tests/engine/test_piecewise_graphs.py tests/worker/test_worker_own_pace.py ;;
        tests-memory) run tests-memory 60 python3 -m pytest -q -m gpu tests/memory tests/engine/test_overlap.py tests/worker/test_worker_own_pace.py ;;
        gemm) run gemm 150 python3 benchmarks/gemm_shapes.py --quick --out "$out/gemm-shapes.json" ;;
        qwen) engine engine-qwen2.5-7b 150 --model qwen2.5-7b:random --offline 1000 --mixed 32:0 64:32 ;;
        kernels) engine engine-8b-profile 90 --model llama-3.1-8b:random --profile --batches 1 64 256 --prefill ;;
        graphs) engine engine-8b-graphs2048 120 --model llama-3.1-8b:random --graph-tokens 2048 \
                    --batches 1 --prefill 2048 --mixed 2048:0 1024:0 512:16 384:16 256:16 ;;
        pairs) run pairs 180 env OUT="$out" bash benchmarks/gpu_pairs.sh ;;
        offline)
            engine 8b-seqs1024 170 --memory-gib "$mem" --model llama-3.1-8b:random --batches 1 64 256 --offline 1000 --max-seqs 1024
            engine 8b-seqs256 110 --memory-gib "$mem" --model llama-3.1-8b:random --batches 1 --prefill --offline 1000 --max-seqs 256
            small_models ;;
        small) small_models ;;
        microbatch) engine 8b-two-streams-large 150 --memory-gib "${MEMORY_GIB:-70}" --model llama-3.1-8b:random \
                        --batches 1 --prefill --context 512 --two-streams 64 128 256 ;;
        hostwaits)
            engine 8b-hostwaits 150 --memory-gib "$mem" --model llama-3.1-8b:random --batches 1 --prefill \
                --offline 1000 --max-seqs 1024 --api-profile "${API_FIRST:-10}" "${API_LAST:-16}"
            engine 1b-hostwaits 60 --memory-gib "$mem" --model llama-3.2-1b:random --batches 1 --prefill \
                --offline 1000 --max-seqs 1024 ;;
        graphs8192) engine 8b-graphs8192 170 --memory-gib "$mem" --model llama-3.1-8b:random --batches 1 --prefill \
                        --offline 1000 --max-seqs 1024 --graph-tokens 8192 ;;
        *) echo "unknown step: $step" >&2; exit 2 ;;
    esac
done
