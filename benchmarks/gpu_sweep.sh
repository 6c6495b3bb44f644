#!/usr/bin/env bash
# One device call's worth of the six-model experiment: `prism bench sweep` for each system
# named, one after the other, each with a step log, the servers planning on the profiles in
# $PRISM_PROFILE_DIR; every output (records, server logs, step logs, sweep tables, plots) is
# tarred into $OUT after each system, because the device tool brings back only a bounded
# number of files and a call stopped at its limit still returns what $OUT holds.
#
#   benchmarks/gpu_sweep.sh examples/h100-6models.yaml \
#       benchmarks/traces/alibaba-busiest-10min-timex0.1-6models-azureconv.jsonl 1,2 prism static muxserve@b
#
# SYSTEM@TAG runs SYSTEM again into its own folder (SYSTEM-TAG): a repeat of the same points.
# PROFILE_MODELS="llama-3.1-8b:random ..." first runs `prism profile` for each model that has
# no profile in $PRISM_PROFILE_DIR yet (the servers then plan with the new ones).
# SWEEP_DEADLINE_S (seconds from the start; default 540) and SWEEP_SYSTEM_S (the estimate of
# one system's run; default 120 x scales): no system starts that would end past the deadline.
#
# Then, here: python3 benchmarks/sweep_report.py --records <untarred folder> --config ... .
set -u
if [ $# -lt 4 ]; then
    echo "usage: $0 CONFIG TRACE SCALES SYSTEM[@TAG] [SYSTEM[@TAG]...]" >&2
    exit 2
fi
config=$1 trace=$2 scales=$3
shift 3
export PRISM_PROFILE_DIR=${PRISM_PROFILE_DIR:-benchmarks/profiles/nvidia-h100}
num_scales=$(echo "$scales" | tr ',' '\n' | wc -l)
deadline=${SWEEP_DEADLINE_S:-540}
per_system=${SWEEP_SYSTEM_S:-$(( 120 * num_scales ))}
t0=$(date +%s)
out=${OUT:-.}
work=$(mktemp -d)
tarball="$out/sweep-$(date +%F).tgz"

mkdir -p "$PRISM_PROFILE_DIR"
for model in ${PROFILE_MODELS:-}; do
    file="$PRISM_PROFILE_DIR/$(echo "$model" | tr ':' '-').json"
    if [ ! -f "$file" ]; then
        start=$(date +%s)
        python3 -m prism.cli profile --model "$model" --device cuda:0 --out "$file" 2>&1 | tail -4
        echo "profile $model: $(( $(date +%s) - start )) s"
        cp "$file" "$out/" 2>/dev/null
    fi
done

for item in "$@"; do
    system=${item%@*}
    folder=$system
    [ "$item" != "$system" ] && folder="$system-${item#*@}"
    if [ $(( $(date +%s) - t0 + per_system )) -gt "$deadline" ]; then
        echo "$folder: skipped (would pass the ${deadline} s deadline)"
        continue
    fi
    start=$(date +%s)
    # One step log per server: benchmarks/step_log.py fits the host time to it, and
    # sim_validation.py --solo-steps measures the request latency outside the steps.
    PRISM_STEP_LOG="$work/$folder/steps" python3 -m prism.cli bench sweep --config "$config" --trace "$trace" \
        --systems "$system" --scales "$scales" --slo-config "$config" --out "$work/$folder" 2>&1 | tail -8
    echo "$folder: $(( $(date +%s) - start )) s"
    tar czf "$tarball" -C "$work" .
done
