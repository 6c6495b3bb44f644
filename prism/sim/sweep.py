"""Simulated runs of one trace under several systems and rate scales: `prism simulate` with
more than one policy or scale. The output is laid out as `prism bench sweep` lays out a real
sweep (requests-<system>-x<scale>.jsonl, sweep.json, sweep.md, the attainment plot), so real
and simulated sweeps are compared file by file (benchmarks/sim_validation.py)."""
from __future__ import annotations

import multiprocessing as mp
import os
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Callable, Iterable

from prism.bench.records import save_records
from prism.bench.report import SLOTargets, summarize
from prism.bench.sweeps import refused_point, sweep_point, write_sweep
from prism.bench.trace import TraceRequest
from prism.bench.transforms import scale_rate
from prism.config import ConfigError
from prism.errors import one_line
from prism.sim.costs import ProfileSet
from prism.sim.run import config_for, simulate


def default_jobs() -> int:
    return max(1, min(4, os.cpu_count() or 1))


_WORK: tuple[Callable, list] | None = None  # what forked workers run (inherited, not pickled)


def _run_one(index: int):
    fn, items = _WORK
    return fn(items[index])


def parallel_map(fn: Callable, items: Iterable, jobs: int) -> list:
    """fn over items in `jobs` forked processes (results in order); in this process when
    jobs == 1. Simulations are independent and deterministic, so this changes only the wall
    time. Forked workers inherit fn and items, so closures are fine (nothing is pickled but
    indices and results)."""
    global _WORK
    items = list(items)
    if jobs <= 1 or len(items) <= 1:
        return [fn(x) for x in items]
    _WORK = (fn, items)
    try:
        with ProcessPoolExecutor(min(jobs, len(items)), mp_context=mp.get_context("fork")) as pool:
            return list(pool.map(_run_one, range(len(items))))
    finally:
        _WORK = None


def sim_point(raw: dict, system: str, trace: list[TraceRequest], scale: float, profiles: ProfileSet,
              slos: dict[str, SLOTargets], out_dir: Path | None, seed: int = 0) -> dict:
    """One simulated sweep point (records saved as a real sweep saves them)."""
    scaled = scale_rate(trace, scale, seed=seed)
    try:
        result = simulate(config_for(raw, system), scaled, profiles)
    except ConfigError as e:  # the system refuses this config at start; the others go on
        return refused_point(system, scale, one_line(e))
    if out_dir is not None:
        save_records(out_dir / f"requests-{system}-x{scale:g}.jsonl", result.records)
    duration = max((r.arrival_s for r in trace), default=0.0)
    summary = summarize(result.records, slos, max(duration, 1e-9))["overall"]
    point = sweep_point(system, scale, len(scaled), duration, summary)
    point["sim_wall_s"] = round(result.wall_s, 2)
    return point


def sim_sweep(raw: dict, trace: list[TraceRequest], systems: list[str], scales: list[float],
              slos: dict[str, SLOTargets], profiles: ProfileSet, out_dir: str | Path,
              target: float = 0.99, jobs: int | None = None) -> dict:
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    cases = [(s, x) for s in systems for x in scales]
    points = parallel_map(lambda c: sim_point(raw, c[0], trace, c[1], profiles, slos, out_dir),
                          cases, jobs or default_jobs())
    return write_sweep(points, systems, out_dir, target)
