#!/usr/bin/env bash
# One device call for issue 16's offline and per-model tables: `benchmarks/engine.py` for the
# 8B (decode batches, prefill, offline 1,000 x (256 + 256)) at the engine's running-request cap
# of 256 and of 1,024 (the batch a decode step may reach; CUDA graphs up to it), then the same
# table for llama-3.2-1b and qwen2.5-7b at the larger cap. Each run under its own time limit;
# logs and JSON tarred into $OUT after each (the device tool returns a bounded number of files).
#
#   benchmarks/gpu_offline.sh    # MEMORY_GIB: the engines' page budget (default 120, sized for an H200)
set -u
out=${OUT:-.}
work=$(mktemp -d)
mem=${MEMORY_GIB:-120}
export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$work/card.txt"
date -u +%F >> "$work/card.txt"
run() {  # NAME LIMIT_S ARGS...: one engine.py run, its table printed
    local name=$1 limit=$2 start=$(date +%s)
    shift 2
    timeout "$limit" python3 benchmarks/engine.py --memory-gib "$mem" --out "$work/$name.json" "$@" > "$work/$name.log" 2>&1
    echo "$name: rc=$? $(( $(date +%s) - start )) s"
    grep -v 'loading\|tensor/s' "$work/$name.log" | tail -12
    tar czf "$out/offline-$(date -u +%F).tgz" -C "$work" .
}
run 8b-seqs1024 170 --model llama-3.1-8b:random --batches 1 64 256 --offline 1000 --max-seqs 1024
run 8b-seqs256 110 --model llama-3.1-8b:random --batches 1 --prefill --offline 1000 --max-seqs 256
run 1b-seqs1024 120 --model llama-3.2-1b:random --batches 1 64 256 1024 --offline 1000 --max-seqs 1024
run qwen-seqs1024 130 --model qwen2.5-7b:random --batches 1 64 256 1024 --offline 1000 --max-seqs 1024
