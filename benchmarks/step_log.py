"""A real worker's step log against the simulator's cost model: what each step took beyond
its forward pass, and the host overheads (per step, per sequence) that fit it.

A worker started with PRISM_STEP_LOG=DIR writes one line per step (prism/worker/process.py):
its start, wall time, model and cost terms. The cycle of a step is the time from its start to
the next step's start while the device stays busy: the forward pass, the worker's scheduling,
batch building, token messages and request intake. The forward pass is what the profiles
predict (prism.sim.costs.step_seconds, as the simulator charges it); the rest is host time,
fitted here as step_s + seq_s x sequences in the step (least squares over busy steps).

    python3 benchmarks/step_log.py --steps DIR [DIR...] --config examples/h100-6models.yaml \
        --profiles benchmarks/profiles/nvidia-h100
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from prism.sched.cost import ProfileCostModel  # noqa: E402
from prism.sim.costs import ProfileSet, step_seconds  # noqa: E402

BUSY_GAP_S = 0.02  # a longer gap between two steps is the worker waiting for work


@dataclass(frozen=True)
class Step:
    model: str
    seqs: int
    cycle_s: float
    predicted_s: float
    kind: str = "decode"  # decode, prefill or mixed

    @property
    def host_s(self) -> float:
        return self.cycle_s - self.predicted_s


def read_steps(files: list[Path], cost: ProfileCostModel) -> list[Step]:
    """Busy steps of every log (consecutive steps of one worker less than BUSY_GAP_S apart
    beyond the first one's wall time)."""
    steps = []
    for path in files:
        lines = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
        for a, b in zip(lines, lines[1:]):
            cycle = b["t"] - a["t"]
            if a["terms"] is None or cycle - a["wall_s"] > BUSY_GAP_S:
                continue
            decodes, _, prefill = a["terms"]
            kind = "decode" if not prefill else "prefill" if not decodes else "mixed"
            steps.append(Step(a["model"], a["seqs"], cycle, step_seconds(cost, a["model"], *a["terms"]), kind))
    return steps


def fit_host(steps: list[Step]) -> tuple[float, float]:
    """(step_s, seq_s): host time = step_s + seq_s x sequences, least squares, both >= 0."""
    if len(steps) < 2:
        raise ValueError("too few busy steps in the log to fit host overheads")
    x = np.array([s.seqs for s in steps], dtype=float)
    y = np.array([s.host_s for s in steps])
    slope, intercept = np.polyfit(x, y, 1) if np.ptp(x) > 0 else (0.0, float(np.mean(y)))
    if slope < 0:
        return max(0.0, float(np.median(y))), 0.0
    return max(0.0, float(intercept)), float(slope)


def cost_model(config_path: str, profiles: ProfileSet) -> ProfileCostModel:
    """The simulator's truth for the config's models on its first device."""
    from prism.server.config_file import load_config
    from prism.sim.shapes import model_shape

    config = load_config(config_path)
    device = config.devices[0].device
    shapes = {m.name: model_shape(m, device) for m in config.models}
    return profiles.cost_model(shapes, device)[0]


def table(steps: list[Step]) -> str:
    bins = [(1, 1), (2, 4), (5, 16), (17, 64), (65, 10**9)]
    rows = ["| sequences in step | steps | cycle p50 (ms) | forward predicted p50 (ms) | host p50 (ms) |",
            "|---|---:|---:|---:|---:|"]
    for lo, hi in bins:
        group = [s for s in steps if lo <= s.seqs <= hi]
        if group:
            med = lambda f: statistics.median(f(s) for s in group) * 1e3  # noqa: E731
            label = f"{lo}" if lo == hi else f"{lo}-{hi}" if hi < 10**9 else f">= {lo}"
            rows.append(f"| {label} | {len(group)} | {med(lambda s: s.cycle_s):.2f} | "
                        f"{med(lambda s: s.predicted_s):.2f} | {med(lambda s: s.host_s):.2f} |")
    return "\n".join(rows)


def table_by_model(steps: list[Step], min_steps: int = 20) -> str:
    """Measured cycle against the profile's forward time, per model and kind of step."""
    rows = ["| model | step | steps | sequences p50 | cycle p50 (ms) | forward predicted p50 (ms) | cycle / predicted p50 |",
            "|---|---|---:|---:|---:|---:|---:|"]
    for model, kind in sorted({(s.model, s.kind) for s in steps}):
        group = [s for s in steps if (s.model, s.kind) == (model, kind)]
        if len(group) >= min_steps:
            med = lambda f: statistics.median(f(s) for s in group)  # noqa: E731
            rows.append(f"| {model} | {kind} | {len(group)} | {med(lambda s: s.seqs):.0f} | "
                        f"{med(lambda s: s.cycle_s) * 1e3:.2f} | {med(lambda s: s.predicted_s) * 1e3:.2f} | "
                        f"{med(lambda s: s.cycle_s / s.predicted_s):.2f} |")
    return "\n".join(rows)


def log_files(folders: list[str]) -> list[Path]:
    files = sorted(f for d in folders for f in Path(d).glob("steps-*.jsonl"))
    if not files:
        raise ValueError(f"no steps-*.jsonl in {', '.join(folders)}")
    return files


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", nargs="+", required=True, help="folders of PRISM_STEP_LOG files")
    p.add_argument("--config", required=True)
    p.add_argument("--profiles", required=True)
    args = p.parse_args(argv)
    try:
        steps = read_steps(log_files(args.steps), cost_model(args.config, ProfileSet.load(args.profiles)))
        step_s, seq_s = fit_host(steps)
    except (ValueError, OSError) as e:
        print(f"step_log: error: {str(e).splitlines()[0]}", file=sys.stderr)
        return 2
    print(table(steps))
    print()
    print(table_by_model(steps))
    print(f"\n{len(steps)} busy steps; host time per step = {step_s * 1e3:.3f} ms + "
          f"{seq_s * 1e6:.1f} us x sequences in the step")
    return 0


if __name__ == "__main__":
    sys.exit(main())
