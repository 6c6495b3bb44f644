#!/usr/bin/env bash
# One device call of session 9 (2026-12-06): the concurrent pairs (gpu_pairs.sh: the contention
# rule's measured turns), profiles with the corrected profiler into a fresh folder for this card,
# then the six-model sweep for the systems named (gpu_sweep.sh), all under one deadline.
#
#   benchmarks/gpu_session.sh PAIRS_S SYSTEM[@TAG]...     # PAIRS_S 0: no pairs
set -u
t0=$(date +%s)
deadline=${SESSION_DEADLINE_S:-565}
pairs_s=$1
shift
card=$(nvidia-smi --query-gpu=name --format=csv,noheader | head -1 | tr 'A-Z ' 'a-z-')
export PRISM_PROFILE_DIR=benchmarks/profiles/$card-$(date -u +%F)
echo "card: $(nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader) $(date -u +%F)"
if [ "$pairs_s" -gt 0 ]; then
    pairs=$(mktemp -d)
    OUT="$pairs" timeout "$pairs_s" bash benchmarks/gpu_pairs.sh | tail -30
    # one file: the device tool brings back a bounded number of files
    tar czf "$OUT/pairs-$(date -u +%F).tgz" -C "$pairs" .
    echo "pairs: $(( $(date +%s) - t0 )) s"
fi
PROFILE_MODELS="llama-3.1-8b:random qwen2.5-7b:random llama-3.2-3b:random llama-3.2-1b:random" \
SWEEP_DEADLINE_S=$(( deadline - ($(date +%s) - t0) )) SWEEP_SYSTEM_S=${SWEEP_SYSTEM_S:-165} \
    bash benchmarks/gpu_sweep.sh examples/h100-6models.yaml \
    benchmarks/traces/alibaba-busiest-10min-timex0.05-6models-azureconv.jsonl 0.5,0.625,0.75,1 "$@"
