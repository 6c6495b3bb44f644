"""Offline throughput for benchmarks/engine.py, and where the host's time goes in it: every
request submitted at once to `LLMEngine.generate`, with overlap and without; the wall time by
step phase, the GPU's idle time between steps, each launch on one axis with the GPU
(timeline), garbage collections, torch allocator events, and optionally the host's slowest
functions (cProfile) or a window of launches under torch.profiler.
"""
from __future__ import annotations

import cProfile
import gc
import pstats
import statistics
import time
from collections import defaultdict
from pathlib import Path
from types import ModuleType

import torch

from engine_cases import random_prompts
from prism.engine.llm_engine import LLMEngine
from prism.engine.profiler import synchronize
from prism.types import SamplingParams


class StepTimes:
    """Wall time of an engine's step phases, by wrapping its bound methods for one run: what
    the host spends (scheduling, batch building, bookkeeping) against forward + sampling; and
    on CUDA, from events around each launch, how long the GPU sat idle between steps."""

    def __init__(self, engine: LLMEngine):
        self.seconds: dict[str, float] = defaultdict(float)
        self.steps: dict[str, int] = defaultdict(int)
        self.events: list[tuple] = []  # (started, ended, kind, host start, host end) of each launch
        self.cuda = engine.device.type == "cuda"
        self._clock: tuple | None = None  # (event, perf_counter) at one instant: GPU and host times on one axis
        self._batch_built = None  # an event recorded once the launching step's inputs were built
        self._marks: list[tuple[str, float]] = []  # (what, host time) in the launching step
        self.marks: list[list] = []  # of each launch: [what, ms from its start]
        self._undo = []
        self._wrap(engine.scheduler, "schedule", "schedule")
        self._wrap(engine.runner, "host_batch", "host batch (inside the steps)", marks_start=True)
        self._wrap(engine.runner, "launch", "", count_kind=True)  # forward + sampling queued, by kind
        self._wrap(engine.runner, "collect", "waiting for tokens")
        self._wrap(engine.scheduler, "commit", "commit")
        self._wrap(engine, "step", "engine.step (all of the above and bookkeeping)")
        self._wrap(engine, "_process_tokens", "processing tokens")
        self._wrap(engine.blocks, "map_ahead", "mapping ahead")
        import prism.engine.model_runner as runner_module
        for obj, name in ((engine.runner, "to_device"), (engine.runner.model, "attention"),
                          (engine.runner.model, "logits"), (runner_module, "sample"), (runner_module, "to_host_async")):
            self._mark_calls(obj, name)
        self._wrap(engine.kv, "map_page", "KV pages mapped", count=True)
        self._wrap(engine.kv, "unmap_page", "KV pages unmapped", count=True)
        self._gc_started = 0.0
        gc.callbacks.append(self._time_gc)

    def _mark_calls(self, obj, name: str) -> None:
        """The host time of every call of obj.name within a launch (where the host is while
        it queues a step: its inputs copied, each layer's attention, the logits, sampling)."""
        inner = getattr(obj, name)

        def marked(*args, **kwargs):
            self._marks.append((name, time.perf_counter()))
            return inner(*args, **kwargs)

        setattr(obj, name, marked)
        self._undo.append((obj, name, inner if isinstance(obj, ModuleType) else None))

    def start_clock(self) -> None:
        """Call with the device idle: an event recorded now is reached at once, so later events'
        times from it and the host's perf_counter from now share one axis (to tens of us)."""
        if self.cuda:
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            self._clock = (event, time.perf_counter())

    def _time_gc(self, phase: str, info: dict) -> None:
        """Python's garbage collections: a full one stops the host for the whole heap."""
        if phase == "start":
            self._gc_started = time.perf_counter()
            self._marks.append((f"gc {info['generation']}", self._gc_started))
            return
        label = f"garbage collection, generation {info['generation']}"
        self.seconds[label] += time.perf_counter() - self._gc_started
        self.steps[label] += 1

    def _wrap(self, obj, name: str, label: str, count_kind: bool = False, count: bool = False,
              marks_start: bool = False) -> None:
        """count_kind: the launch, timed by the kind of step, with events around its device
        work; its device work starts once the host has built the step's inputs (marks_start:
        host_batch), so the GPU's idle time counts that host time too."""
        inner = getattr(obj, name)

        def timed(*args, **kwargs):
            t0 = time.perf_counter()
            if count_kind:
                self._batch_built, self._marks = None, []
            try:
                return inner(*args, **kwargs)
            finally:
                if marks_start:
                    self._marks.append(("built", time.perf_counter()))
                    if self.cuda:
                        self._batch_built = torch.cuda.Event(enable_timing=True)
                        self._batch_built.record()
                if count_kind:
                    plan = args[0]
                    kind = "decode" if all(c.num_tokens == 1 for c in plan.chunks) else "mixed"
                    self.steps[kind] += 1
                    self.seconds[f"{kind} steps"] += time.perf_counter() - t0
                    if self.cuda and self._batch_built is not None:
                        self.marks.append(_runs([(what, round((m - t0) * 1e3, 3)) for what, m in self._marks]))
                        ended = torch.cuda.Event(enable_timing=True)
                        ended.record()
                        self.events.append((self._batch_built, ended, kind, t0, time.perf_counter()))
                else:
                    self.seconds[label] += time.perf_counter() - t0
                    if count:
                        self.steps[label] += 1

        if count:
            self.steps[label] = self.seconds[label] = 0  # reported when never called too

        setattr(obj, name, timed)
        self._undo.append((obj, name, None))

    def gpu_idle_between_steps_us(self) -> dict:
        """The GPU's idle time from the end of one step's work to the start of the next's
        (an event is timed when the GPU reaches it): the host time the GPU waited for; in all
        and by the kind of step waited for (with its steps' device time beside it)."""
        if len(self.events) < 2:
            return {}
        gaps = [(max(0.0, a[1].elapsed_time(b[0])) * 1e3, b[2]) for a, b in zip(self.events, self.events[1:])]
        us = sorted(g for g, _ in gaps)
        by_kind = {}
        for kind in sorted({e[2] for e in self.events}):
            mine = [g for g, k in gaps if k == kind]
            busy = [e[0].elapsed_time(e[1]) for e in self.events if e[2] == kind]
            by_kind[kind] = dict(steps=len(busy), idle_before_ms=round(sum(mine) / 1e3, 3),
                                 idle_over_1ms=sum(g > 1e3 for g in mine), device_ms=round(sum(busy), 3))
        longest = sorted(range(len(gaps)), key=lambda i: -gaps[i][0])[:20]
        return dict(mean=statistics.fmean(us), median=us[len(us) // 2], p90=us[int(len(us) * 0.9)], by_next_step=by_kind,
                    longest=[dict(before_step=i + 1, kind=gaps[i][1], us=round(gaps[i][0])) | self._timeline(i + 1)
                             for i in sorted(longest)])

    def _timeline(self, i: int) -> dict:
        """What the host did around the GPU's idle time before step i, in us on one axis with
        the GPU (start_clock): when the previous launch call began and returned against when
        the GPU finished that step's work, and when step i's launch call began. A launch that
        returns only as its own work ends had waited for the device inside (a synchronizing
        call, a full launch queue); one that returned early left the host time to build step i."""
        if self._clock is None:
            return {}
        ref, host0 = self._clock
        prev, this = self.events[i - 1], self.events[i]
        gpu_end = ref.elapsed_time(prev[1]) * 1e3
        return dict(previous_launch_us=round((prev[4] - prev[3]) * 1e6),
                    previous_launch_returned_before_its_gpu_end_us=round(gpu_end - (prev[4] - host0) * 1e6),
                    launch_began_after_gpu_end_us=round((this[3] - host0) * 1e6 - gpu_end))

    def timeline(self) -> list[dict]:
        """Every launch on one axis with the GPU (ms from start_clock): the host's launch call,
        the GPU's span of the step's work, and where the host was inside the call (ms from its
        start: the inputs built, then each attention call of an eager step)."""
        if self._clock is None:
            return []
        ref, host0 = self._clock
        return [dict(kind=kind, host=[round((a - host0) * 1e3, 3), round((b - host0) * 1e3, 3)],
                     gpu=[round(ref.elapsed_time(started), 3), round(ref.elapsed_time(ended), 3)], marks=marks)
                for (started, ended, kind, a, b), marks in zip(self.events, self.marks)]

    def restore(self) -> None:
        gc.callbacks.remove(self._time_gc)
        for obj, name, original in reversed(self._undo):
            if original is not None:  # a module's function
                setattr(obj, name, original)
            else:
                delattr(obj, name)  # back to the class's method


def _runs(marks: list[tuple[str, float]]) -> list[list]:
    """Consecutive marks of one kind as [what, first ms, last ms, count] (32 attention calls
    in one entry)."""
    out: list[list] = []
    for what, ms in marks:
        if out and out[-1][0] == what:
            out[-1][2], out[-1][3] = ms, out[-1][3] + 1
        else:
            out.append([what, ms, ms, 1])
    return out


def offline_case(engine: LLMEngine, lengths: list[tuple[int, int]], label: str,
                 host_profile: int = 0, api_profile: tuple[int, int] | None = None) -> list[dict]:
    """All requests submitted at once to engine.generate (continuous batching); output tokens
    per second, where the wall time went and the GPU's idle time between steps: with overlap
    (the engine's default) and without, on the same engine. `host_profile` > 0: that many of
    the host's functions by own wall time (cProfile) in a third run with overlap, which shows
    what the host waits in (a call that waits for the device is slow in itself). `api_profile`
    (first, last launch): the host calls of those steps (CUDA runtime, torch ops) by host time (torch.profiler)
    in another run with overlap: a launch queue that is full shows as slow kernel launches, a
    synchronizing copy or wait as a slow call of its own."""
    prompts = random_prompts(engine.config.vocab_size, [n for n, _ in lengths])
    params = [SamplingParams(temperature=0, max_tokens=out, ignore_eos=True) for _, out in lengths]
    engine.generate(prompts[:8], params[:8])  # warm-up
    default = engine.overlap
    rows, tokens = [], {}
    try:
        for overlap in dict.fromkeys([default, False]):
            engine.overlap = overlap
            row, tokens[overlap] = _offline_run(engine, prompts, params, lengths, label)
            rows.append(dict(row, overlap=overlap))
    finally:
        engine.overlap = default
    if len(tokens) == 2:  # the same greedy tokens either way
        rows[0]["same_tokens_as_without_overlap"] = tokens[True] == tokens[False]
    if host_profile:
        rows[0]["host_profile"] = _host_profile(engine, prompts, params, lengths, label, host_profile)
    if api_profile:
        rows[0]["api_profile"] = _api_profile(engine, prompts, params, lengths, label, *api_profile)
    return rows


def _api_profile(engine, prompts, params, lengths, label, first: int, last: int, top: int = 16) -> dict:
    from torch.profiler import ProfilerActivity, profile

    prof = profile(activities=[ProfilerActivity.CPU] + [ProfilerActivity.CUDA] * (engine.device.type == "cuda"))
    launch, launched = engine.runner.launch, [0]

    def windowed(plan, after):
        launched[0] += 1
        if launched[0] == first:
            prof.start()
        try:
            return launch(plan, after)
        finally:
            if launched[0] == last:
                prof.stop()

    engine.runner.launch = windowed
    try:
        _offline_run(engine, prompts, params, lengths, label)
    finally:
        vars(engine.runner).pop("launch", None)  # StepTimes.restore may have removed it already
    averages = prof.key_averages()
    runtime = sorted(averages, key=lambda a: -a.self_cpu_time_total)[:top]  # CUDA runtime calls and torch ops
    found = [dict(call=a.key, calls=a.count, host_ms=round(a.self_cpu_time_total / 1e3, 3),
                  mean_us=round(a.self_cpu_time_total / max(1, a.count), 1)) for a in runtime]
    for r in found:
        print(f"  {r['host_ms']:9.3f} ms {r['calls']:7d}x {r['mean_us']:9.1f} us  {r['call']}", flush=True)
    return dict(launches=[first, last], host_calls=found)


def _host_profile(engine, prompts, params, lengths, label, top: int) -> list[dict]:
    profiler = cProfile.Profile()
    profiler.enable()
    try:
        _offline_run(engine, prompts, params, lengths, label)
    finally:
        profiler.disable()
    stats = pstats.Stats(profiler).stats  # (file, line, name) -> (calls, primitive, own s, cumulative s, callers)
    rows = sorted(stats.items(), key=lambda kv: -kv[1][2])[:top]
    found = [dict(function=f"{Path(f).name}:{line}:{name}", calls=calls, own_s=round(own, 4), cumulative_s=round(cum, 4))
             for (f, line, name), (_, calls, own, cum, _) in rows]
    for r in found:
        print(f"  {r['own_s']:8.3f} s own {r['cumulative_s']:8.3f} s cum {r['calls']:7d}x  {r['function']}", flush=True)
    return found


ALLOCATOR_EVENTS = ("num_alloc_retries", "num_device_alloc", "num_device_free", "num_sync_all_streams")
HOST_ALLOCATOR_EVENTS = ("num_host_alloc", "host_alloc_time.total")


def _allocator_events(device: torch.device) -> dict[str, int]:
    """torch's caching allocators' counters: a device retry frees its cached blocks (a
    device-wide wait) because the device had no memory left for an activation; a new pinned
    host block (num_host_alloc, host_alloc_time.total in us) is a cudaHostAlloc, which may
    wait for the device too (step inputs are staged in pinned memory, transfer.py)."""
    if device.type != "cuda":
        return {}
    stats = torch.cuda.memory_stats(device)
    found = {k: stats.get(k, 0) for k in ALLOCATOR_EVENTS}
    host = torch.cuda.host_memory_stats() if hasattr(torch.cuda, "host_memory_stats") else {}
    return found | {k: host.get(k, 0) for k in HOST_ALLOCATOR_EVENTS}


def _offline_run(engine, prompts, params, lengths, label) -> tuple[dict, list]:
    times = StepTimes(engine)
    synchronize(engine.device)
    times.start_clock()
    allocator_before = _allocator_events(engine.device)
    t0 = time.perf_counter()
    try:
        outs = engine.generate(prompts, params)
        synchronize(engine.device)
    finally:
        times.restore()
    elapsed = time.perf_counter() - t0
    allocator = {k: v - allocator_before[k] for k, v in _allocator_events(engine.device).items()}
    out_tokens = sum(len(o.token_ids) for o in outs)
    in_tokens = sum(n for n, _ in lengths)
    return dict(phase="offline", model=engine.source.name, lengths=label,
                batch=engine.scheduler.config.max_num_seqs, requests=len(lengths),
                input_len=in_tokens / len(lengths), output_len=out_tokens / len(lengths),
                time_ms=elapsed * 1e3, output_tokens=out_tokens,
                output_tokens_per_s=out_tokens / elapsed, total_tokens_per_s=(out_tokens + in_tokens) / elapsed,
                seconds={k: round(v, 6) for k, v in times.seconds.items()}, steps=dict(times.steps),
                gpu_idle_between_steps_us=times.gpu_idle_between_steps_us(), allocator=allocator,
                timeline=times.timeline()), [o.token_ids for o in outs]
