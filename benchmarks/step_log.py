"""A real worker's step log against the simulator's cost model: what each step took beyond
its forward pass, and the host overheads (per step, per sequence) that fit it.

A worker started with PRISM_STEP_LOG=DIR writes one line per step (prism/worker/process.py):
its start, wall time, model and cost terms. The cycle of a step is the time from its start to
the next step's start while the device stays busy: the forward pass, the worker's scheduling,
batch building, token messages and request intake. The forward pass is what the profiles
predict (prism.sim.costs.step_seconds, as the simulator charges it); the rest is host time,
fitted here as step_s + seq_s x sequences in the step (least squares over busy steps). A
fresh server's first eager step of each model shape and token-count class also takes longer
than later ones (kernels loaded on first use): that difference is fitted too (cold_shape_s,
prism.sim.costs.ColdShapes). With --launch (logs of a worker at its own pace, whose step calls
never wait for the device) it also fits each call's wall time, the step's launch on the worker's
one host thread (fit_launch: HostOverheads.launch_time, used with one_host_thread).

    python3 benchmarks/step_log.py --steps DIR [DIR...] --config examples/h100-6models.yaml \
        --profiles benchmarks/profiles/nvidia-h100
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from prism.bench.records import read_text  # noqa: E402
from prism.sched.cost import ProfileCostModel  # noqa: E402
from prism.sim.costs import ColdShapes, HostOverheads, ProfileSet, served_alone, step_seconds  # noqa: E402
from prism.sim.shapes import ModelShape  # noqa: E402

BUSY_GAP_S = 0.02  # a longer gap between two steps is the worker waiting for work
MATCH_S = 0.01  # how close a request's prefill step lies to the clock offset (request_latency)


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
        lines = _read_lines(path)
        for before, a, b in zip([{}] + lines, lines, lines[1:]):
            cycle = b["t"] - a["t"]
            if a["terms"] is None or cycle - a["wall_s"] > BUSY_GAP_S or _activated(before, a):
                continue
            decodes, _, prefill = a["terms"]
            kind = "decode" if not prefill else "prefill" if not decodes else "mixed"
            steps.append(Step(a["model"], a["seqs"], cycle, step_seconds(cost, a["model"], *a["terms"]), kind))
    return steps


def _read_lines(path: Path) -> list[dict]:
    return [json.loads(line) for line in read_text(path).splitlines() if line.strip()]


def _activated(before: dict, step: dict) -> bool:
    """Whether the step copied a model's weights in (logs since 2026-12-01 count activations;
    older ones cannot tell, so give them no swap runs)."""
    return step.get("activations", 0) > before.get("activations", 0)


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


@dataclass(frozen=True)
class LaunchFit:
    """A step's launch time on the worker's host thread (its call's wall time at its own pace),
    as HostOverheads.launch_time charges it: per step, per sequence, and per model layer for
    steps with prefill tokens and on top for those beyond the piecewise graphs' cap."""

    step_s: float
    seq_s: float
    prefill_layer_s: float
    eager_layer_s: float
    num_steps: int

    def host(self, host: HostOverheads) -> HostOverheads:
        """`host` with this launch model, its models on one host thread."""
        return dataclasses.replace(host, one_host_thread=True, launch_s=self.step_s, launch_seq_s=self.seq_s,
                                   launch_prefill_layer_s=self.prefill_layer_s,
                                   launch_eager_layer_s=self.eager_layer_s)


def launch_features(seqs: int, terms: list[int], num_layers: int, graph_max_tokens: int) -> list[float]:
    """The launch model's terms of a step (LaunchFit): 1, sequences, layers if it carries
    prefill tokens, layers if it is also beyond the graph cap (eager)."""
    decodes, _, prefill = terms
    eager = bool(prefill) and decodes + prefill > graph_max_tokens
    return [1.0, float(seqs), float(num_layers if prefill else 0), float(num_layers if eager else 0)]


def fit_launch(files: list[Path], models: dict[str, tuple[int, int]]) -> LaunchFit:
    """The launch model fitted to step logs of a worker at its own pace (where a call's wall
    time is its host time alone: it never waits for the device), by least squares with every
    coefficient >= 0 (a negative one is dropped and the rest refitted). `models`: each model's
    (layers, graph cap: EngineConfig.mixed_graph_max_tokens). Steps that activated a model are
    left out."""
    rows, walls = [], []
    for path in files:
        lines = _read_lines(path)
        for before, step in zip([{}] + lines, lines):
            if step["terms"] is None or _activated(before, step):
                continue
            rows.append(launch_features(step["seqs"], step["terms"], *models[step["model"]]))
            walls.append(step["wall_s"])
    if len(rows) < 4:
        raise ValueError("too few steps in the log to fit a launch model")
    x, y = np.array(rows), np.array(walls)
    keep = [i for i in range(x.shape[1]) if np.ptp(x[:, i]) > 0 or i == 0]
    while True:
        coef = np.linalg.lstsq(x[:, keep], y, rcond=None)[0]
        if (coef >= 0).all():
            break
        keep = [k for k, c in zip(keep, coef) if c >= 0]
    full = dict(zip(keep, coef))
    return LaunchFit(*(float(full.get(i, 0.0)) for i in range(x.shape[1])), len(rows))


def config_launch_models(config_path: str) -> dict[str, tuple[int, int]]:
    """Each model's (layers, graph cap) in the config, by name (fit_launch)."""
    from prism.cluster.config import load_config

    config = load_config(config_path)
    shapes = config_shapes(config_path)[1]
    return {m.name: (shapes[m.name].num_layers, m.engine.mixed_graph_max_tokens) for m in config.models}


def fit_cold_shapes(files: list[Path], cost: ProfileCostModel, shape_keys: dict[str, object]
                    ) -> tuple[float, int, int]:
    """(cold_shape_s, first steps, repeat steps): how much longer the first eager step of a
    model shape in a token-count class takes in a server's life (one log file) than the later
    ones of that class (prism.sim.costs.ColdShapes): the difference of the medians of each
    group's wall time beyond the profile, at least 0."""
    first, repeat = [], []
    for path in files:
        seen = ColdShapes(1.0)  # charges 1 for a first step, 0 for a repeat
        lines = _read_lines(path)
        for before, step in zip([{}] + lines, lines):
            if step["terms"] is None or not step["terms"][2] or _activated(before, step):
                continue
            extra = step["wall_s"] - step_seconds(cost, step["model"], *step["terms"])
            is_first = seen.charge(shape_keys[step["model"]], tuple(step["terms"]))
            (first if is_first else repeat).append(extra)
    if not first or not repeat:
        return 0.0, len(first), len(repeat)
    return max(0.0, statistics.median(first) - statistics.median(repeat)), len(first), len(repeat)


def request_latency(records, steps_file: Path) -> tuple[float, int]:
    """(seconds, requests used): what a request spends outside the worker's steps before its
    first token (HTTP, tokenizing, routing, IPC both ways), the median over the requests that
    were served alone of TTFT less the wall time of their prefill step. `steps_file` is the
    step log of the server that served `records`. A request's prefill step is a step of its
    model that prefills exactly its prompt, at the offset between the two clocks (the client's
    send times count from the replay's start, the log's from the worker's): the offset most
    candidates agree on. Unlike the solo figure of the records alone, this leaves out what the
    step itself paid (a cold shape class, say)."""
    steps = _read_lines(steps_file)
    alone = served_alone([r for r in records if r.ok and r.ttft is not None])
    candidates = {id(r): [s for s in steps if s["model"] == r.model and s["terms"] == [0, 0, r.input_len]]
                  for r in alone}
    offsets = [round((s["t"] - r.send_s) / MATCH_S) for r in alone for s in candidates[id(r)]]
    if not offsets:
        raise ValueError(f"no request served alone has its prefill step in {steps_file}")
    offset = statistics.mode(offsets) * MATCH_S
    outside = []
    for r in alone:
        near = [s for s in candidates[id(r)] if abs(s["t"] - r.send_s - offset) <= MATCH_S]
        if near:
            outside.append(r.ttft - near[0]["wall_s"])
    return max(0.0, statistics.median(outside)), len(outside)


def config_shapes(config_path: str) -> tuple[str, dict[str, ModelShape]]:
    """The config's first device and its models' shapes, by name."""
    from prism.cluster.config import load_config
    from prism.sim.shapes import model_shape

    config = load_config(config_path)
    device = config.devices[0].device
    return device, {m.name: model_shape(m, device) for m in config.models}


def shape_keys(config_path: str) -> dict[str, object]:
    """Each model's key in ColdShapes, as a simulated engine gives it (same shape, same key)."""
    return {name: s.kernel_key for name, s in config_shapes(config_path)[1].items()}


def cost_model(config_path: str, profiles: ProfileSet) -> ProfileCostModel:
    """The simulator's truth for the config's models on its first device."""
    device, shapes = config_shapes(config_path)
    return profiles.cost_model(shapes, device)[0]


def table(steps: list[Step]) -> str:
    bins = [(1, 1), (2, 4), (5, 16), (17, 64), (65, 10**9)]
    rows = ["| sequences in step | steps | cycle p50 (ms) | forward predicted p50 (ms) | host p50 (ms) |",
            "|---|---:|---:|---:|---:|"]
    for lo, hi in bins:
        group = [s for s in steps if lo <= s.seqs <= hi]
        if group:
            med = lambda f: statistics.median(f(s) for s in group) * 1e3  # noqa: E731, B023
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
            med = lambda f: statistics.median(f(s) for s in group)  # noqa: E731, B023
            rows.append(f"| {model} | {kind} | {len(group)} | {med(lambda s: s.seqs):.0f} | "
                        f"{med(lambda s: s.cycle_s) * 1e3:.2f} | {med(lambda s: s.predicted_s) * 1e3:.2f} | "
                        f"{med(lambda s: s.cycle_s / s.predicted_s):.2f} |")
    return "\n".join(rows)


def log_files(paths: list[str]) -> list[Path]:
    """The step logs named (files) or in the folders named (their steps-*.jsonl)."""
    files = sorted(f for d in map(Path, paths) for f in ([d] if d.is_file() else d.glob("steps-*.jsonl*")))
    if not files:
        raise ValueError(f"no steps-*.jsonl in {', '.join(paths)}")
    return files


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", nargs="+", required=True, help="PRISM_STEP_LOG folders, or step log files")
    p.add_argument("--config", required=True)
    p.add_argument("--profiles", required=True)
    p.add_argument("--launch", action="store_true",
                   help="also fit the launch model (HostOverheads.launch_time) to the logs: at their own pace only")
    args = p.parse_args(argv)
    try:
        files = log_files(args.steps)
        cost = cost_model(args.config, ProfileSet.load(args.profiles))
        steps = read_steps(files, cost)
        step_s, seq_s = fit_host(steps)
        cold_s, num_first, num_repeat = fit_cold_shapes(files, cost, shape_keys(args.config))
        launch = fit_launch(files, config_launch_models(args.config)) if args.launch else None
    except (ValueError, OSError) as e:
        print(f"step_log: error: {str(e).splitlines()[0]}", file=sys.stderr)
        return 2
    print(table(steps))
    print()
    print(table_by_model(steps))
    print(f"\n{len(steps)} busy steps; host time per step = {step_s * 1e3:.3f} ms + "
          f"{seq_s * 1e6:.1f} us x sequences in the step")
    print(f"first eager step of a shape class: {cold_s * 1e3:.1f} ms more than a repeat "
          f"({num_first} first, {num_repeat} repeat prefill or mixed steps)")
    if launch is not None:
        print(f"launch time = {launch.step_s * 1e3:.3f} ms + {launch.seq_s * 1e6:.1f} us x sequences "
              f"+ {launch.prefill_layer_s * 1e6:.1f} us x layers (prefill steps) "
              f"+ {launch.eager_layer_s * 1e6:.1f} us x layers (beyond the graph cap), {launch.num_steps} steps")
    return 0


if __name__ == "__main__":
    sys.exit(main())
