"""Trace transforms: cut a window, scale the rate or the clock, rename models, cap lengths,
graft lengths from one trace onto the arrivals of another, merge traces, and describe one.
Each takes a list of TraceRequest and returns a new list sorted by arrival (inputs are never
changed); the random ones are deterministic for a seed."""
from __future__ import annotations

import math
import random
import statistics
from collections import defaultdict
from dataclasses import replace

from prism.bench.trace import TraceRequest
from prism.errors import UserError


def _sorted(trace) -> list[TraceRequest]:
    return sorted(trace, key=lambda r: r.arrival_s)


def _positive(name: str, value: float) -> float:
    if not (isinstance(value, (int, float)) and math.isfinite(value) and value > 0):
        raise UserError(f"{name} must be a positive number, got {value!r}")
    return float(value)


def window(trace: list[TraceRequest], start_s: float, end_s: float) -> list[TraceRequest]:
    """The requests with start_s <= arrival_s < end_s, re-based so start_s becomes 0."""
    if not (0 <= start_s < end_s):
        raise UserError(f"window needs 0 <= start < end, got {start_s} .. {end_s}")
    return _sorted(replace(r, arrival_s=r.arrival_s - start_s)
                   for r in trace if start_s <= r.arrival_s < end_s)


def scale_time(trace: list[TraceRequest], factor: float) -> list[TraceRequest]:
    """Every arrival_s multiplied by factor: < 1 compresses the trace (higher rate, same count),
    > 1 stretches it."""
    factor = _positive("time scale factor", factor)
    return _sorted(replace(r, arrival_s=r.arrival_s * factor) for r in trace)


def scale_rate(trace: list[TraceRequest], factor: float, seed: int = 0) -> list[TraceRequest]:
    """About factor times as many requests over the same span, keeping the shape (per-model
    popularity and bursts over time).

    factor < 1 thins: each request is kept with probability factor. factor > 1 replicates:
    each request appears floor(factor) times, plus once more with probability
    factor - floor(factor). The original keeps its time; each extra copy is moved later by a
    uniform fraction of the gap to the next later arrival in the trace (the trace's mean gap
    for the last one), so copies are not simultaneous and stay inside the local burst.
    Copies keep model, lengths and prompt."""
    factor = _positive("rate scale factor", factor)
    rng = random.Random(seed)
    trace = _sorted(trace)
    if factor == 1:
        return list(trace)
    if factor < 1:
        return [r for r in trace if rng.random() < factor]
    whole, frac = int(math.floor(factor)), factor - math.floor(factor)
    # gap from each request to the next strictly later arrival
    times = [r.arrival_s for r in trace]
    span = times[-1] - times[0] if trace else 0.0
    distinct = len(set(times))
    mean_gap = span / (distinct - 1) if distinct > 1 else 1.0
    gaps = [0.0] * len(trace)
    next_later = None
    for i in range(len(trace) - 1, -1, -1):
        if i + 1 < len(trace) and times[i + 1] > times[i]:
            next_later = times[i + 1]
        gaps[i] = (next_later - times[i]) if next_later is not None else mean_gap
    out = []
    for r, gap in zip(trace, gaps):
        copies = whole + (1 if rng.random() < frac else 0)
        out.append(r)
        for _ in range(copies - 1):
            out.append(replace(r, arrival_s=r.arrival_s + rng.random() * gap))
    return _sorted(out)


def map_models(trace: list[TraceRequest], mapping: dict[str, str]) -> list[TraceRequest]:
    """Rename models by `mapping`; models not in it keep their name (two names mapped to one
    merge)."""
    return _sorted(replace(r, model=mapping.get(r.model, r.model)) for r in trace)


def cap_lengths(trace: list[TraceRequest], max_input: int | None = None,
                max_output: int | None = None) -> list[TraceRequest]:
    """Clip input_len to max_input and output_len to max_output (None: no cap). A clipped
    request keeps its prompt text, if any, which may then be longer than input_len."""
    for name, cap in (("max_input", max_input), ("max_output", max_output)):
        if cap is not None and (not isinstance(cap, int) or cap < 1):
            raise UserError(f"{name} must be a positive integer, got {cap!r}")
    out = []
    for r in trace:
        inp = min(r.input_len, max_input) if max_input is not None else r.input_len
        outp = min(r.output_len, max_output) if max_output is not None else r.output_len
        out.append(replace(r, input_len=inp, output_len=outp))
    return _sorted(out)


def combine(arrivals_from: list[TraceRequest], lengths_from: list[TraceRequest],
            seed: int = 0) -> list[TraceRequest]:
    """Arrival times and models of `arrivals_from`, each with an (input_len, output_len) pair
    (and that request's prompt, if any) drawn with replacement from `lengths_from`. E.g.
    Alibaba arrivals and model popularity with Azure conv lengths."""
    if not lengths_from:
        raise UserError("combine: the lengths trace is empty")
    rng = random.Random(seed)
    pool = [(r.input_len, r.output_len, r.prompt) for r in lengths_from]
    out = []
    for r in _sorted(arrivals_from):
        inp, outp, prompt = pool[rng.randrange(len(pool))]
        out.append(replace(r, input_len=inp, output_len=outp, prompt=prompt))
    return out


def merge(*traces: list[TraceRequest]) -> list[TraceRequest]:
    """All requests of the given traces on one clock (each already starting at 0)."""
    return _sorted(r for trace in traces for r in trace)


def _cv(times: list[float]) -> float | None:
    gaps = [b - a for a, b in zip(times, times[1:])]
    if len(gaps) < 2:
        return None
    mean = statistics.fmean(gaps)
    return statistics.pstdev(gaps) / mean if mean > 0 else None


def describe(trace: list[TraceRequest]) -> dict:
    """Summary of a trace:
    {"requests", "duration_s" (last arrival; traces start at 0), "rate" (requests/s, None if
    duration is 0), "input_len": {"mean", "median", "max"}, "output_len": {...},
    "models": {name: {"requests", "share", "rate", "cv"}}} with models by request count,
    busiest first; cv is the coefficient of variation of the model's inter-arrival gaps
    (1 for Poisson; None with fewer than 3 requests)."""
    trace = _sorted(trace)
    n = len(trace)
    duration = trace[-1].arrival_s if trace else 0.0
    per_model = defaultdict(list)
    for r in trace:
        per_model[r.model].append(r.arrival_s)

    def lengths(values):
        if not values:
            return {"mean": None, "median": None, "max": None}
        return {"mean": statistics.fmean(values), "median": statistics.median(values),
                "max": max(values)}

    models = {}
    for model, times in sorted(per_model.items(), key=lambda kv: (-len(kv[1]), kv[0])):
        models[model] = {"requests": len(times), "share": len(times) / n,
                         "rate": len(times) / duration if duration > 0 else None,
                         "cv": _cv(times)}
    return {"requests": n, "duration_s": duration,
            "rate": n / duration if duration > 0 else None,
            "input_len": lengths([r.input_len for r in trace]),
            "output_len": lengths([r.output_len for r in trace]),
            "models": models}


def format_description(d: dict) -> str:
    """describe()'s dict as a short text table."""
    def num(x, fmt):
        return "-" if x is None else format(x, fmt)

    lines = [
        f"{d['requests']} requests over {d['duration_s']:.1f} s "
        f"({num(d['rate'], '.3f')} req/s), {len(d['models'])} model(s)",
        f"input_len mean {num(d['input_len']['mean'], '.1f')} median "
        f"{num(d['input_len']['median'], '.0f')} max {num(d['input_len']['max'], 'd')}; "
        f"output_len mean {num(d['output_len']['mean'], '.1f')} median "
        f"{num(d['output_len']['median'], '.0f')} max {num(d['output_len']['max'], 'd')}",
    ]
    if d["models"]:
        width = max(5, *(len(m) for m in d["models"]))
        lines.append(f"{'model':<{width}} {'requests':>9} {'share':>7} {'req/s':>9} {'cv':>6}")
        for m, s in d["models"].items():
            lines.append(f"{m:<{width}} {s['requests']:>9d} {s['share']:>7.1%} "
                         f"{num(s['rate'], '.4f'):>9} {num(s['cv'], '.2f'):>6}")
    return "\n".join(lines)
