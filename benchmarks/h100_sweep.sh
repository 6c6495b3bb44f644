#!/usr/bin/env bash
# One device call's worth of the issue-5 experiment: `prism bench sweep` for each system named,
# one after the other, with the servers planning on the committed H100 profiles; every output
# (records, server logs, step logs, sweep tables, plots) tarred into $OUT, because the device tool brings
# back only a bounded number of files.
#
#   benchmarks/h100_sweep.sh examples/h100-6models.yaml \
#       benchmarks/traces/alibaba-busiest-10min-timex0.1-6models-azureconv.jsonl 1,2,4 prism static
#
# Budget: each system costs about (trace length + drain) x number of scales + 20 s of start-up.
# Then, here: python3 benchmarks/sweep_report.py --records <untarred folder> --config ... .
set -u
if [ $# -lt 4 ]; then
    echo "usage: $0 CONFIG TRACE SCALES SYSTEM [SYSTEM...]" >&2
    exit 2
fi
config=$1 trace=$2 scales=$3
shift 3
export PRISM_PROFILE_DIR=${PRISM_PROFILE_DIR:-benchmarks/profiles/nvidia-h100}
work=$(mktemp -d)
for system in "$@"; do
    start=$(date +%s)
    # One step log per server (a worker per scale): benchmarks/step_log.py fits host time to it.
    PRISM_STEP_LOG="$work/$system/steps" python3 -m prism.cli bench sweep --config "$config" --trace "$trace" --systems "$system" \
        --scales "$scales" --slo-config "$config" --out "$work/$system" 2>&1 | tail -8
    echo "$system: $(( $(date +%s) - start )) s"
done
tar czf "${OUT:-.}/sweep-$(date +%F).tgz" -C "$work" .
