"""Two real sweeps of the same trace and config, point by point: how far apart two runs of
the real system land, the yardstick for the simulator's error (benchmarks/sim_validation.py).

    python3 benchmarks/real_vs_real.py RUN_A RUN_B --config examples/h100-6models.yaml \
        --trace benchmarks/traces/alibaba-busiest-10min-timex0.1-6models-azureconv.jsonl
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from sim_validation import METRICS, compare, comparison_cell, real_points  # noqa: E402

from prism.bench.records import load_records  # noqa: E402
from prism.cluster.config import slos_from_config  # noqa: E402
from prism.bench.report import summarize  # noqa: E402
from prism.bench.trace import load_trace  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("run_a")
    p.add_argument("run_b")
    p.add_argument("--config", required=True, help="the serve config (its SLOs judge both runs)")
    p.add_argument("--trace", required=True)
    args = p.parse_args(argv)
    trace = load_trace(args.trace)
    slos = slos_from_config(args.config)
    duration = max(r.arrival_s for r in trace)
    b_points = {(s, x): path for s, x, path in real_points(Path(args.run_b), None)}
    print("| system | scale | " + " | ".join(f"{label} A / B (diff)" for _, label, _ in METRICS) + " |")
    print("|---|---:|" + "---|" * len(METRICS))
    for system, scale, path in real_points(Path(args.run_a), None):
        if (system, scale) not in b_points:
            continue
        a = summarize(load_records(path), slos, duration)["overall"]
        b = summarize(load_records(b_points[system, scale]), slos, duration)["overall"]
        cells = [comparison_cell(key, m) for key, m in compare(a, b).items()]
        print(f"| {system} | {scale:g} | " + " | ".join(cells) + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
