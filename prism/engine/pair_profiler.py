"""Measure two models' steps side by side on one device: each step alone, and both launched in
one turn as a device worker launches them with concurrent_models > 1 (the first model's step,
then the other's, each on the engine's own stream; then their tokens collected). The result is
a list of `MeasuredTurn` (prism.sched.concurrency), which `fit_rates` turns into the rates the
simulator charges such turns at. `profile_streams` runs the same cases as models at their own
pace do (each step relaunched as soon as its last one is done): `MeasuredStreams`, the check of
the rule on what pace "own" runs.

Cases: both models decoding (batch x context each), one model's prompt chunk beside the
other's decode batch (both ways round), and both prefilling. Every repetition of a case does the
same work: a step is launched again and again without being committed, so each rewrites the
same KV slots. Alone and side-by-side runs alternate, so drift hits all three alike. Both
engines must be idle; every block is freed afterwards and each engine's KV pages are restored.
"""
from __future__ import annotations

import statistics
import time
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterable, Iterator

from prism.engine.llm_engine import LLMEngine
from prism.engine.profiler import _fits, _restore_kv_pages, _Session, _timed_execute, decode_plan, prefill_all, timed_steps
from prism.engine.sequence import ScheduledChunk, Sequence, StepPlan
from prism.sched.concurrency_profile import MeasuredStreams, MeasuredTurn, SideStep

# (batch, context per sequence) of the decode batch each model runs
DEFAULT_PAIR_DECODES = ((1, 1024), (16, 1024), (64, 1024), (16, 4096))
# prompt chunks run beside the other model's decode batch (DEFAULT_BESIDE), and beside each other
DEFAULT_PAIR_PREFILLS = (256, 2048)
DEFAULT_BESIDE = (16, 1024)
QUICK_PAIR_DECODES = ((1, 128), (8, 128))
QUICK_PAIR_PREFILLS = (64,)
QUICK_BESIDE = (4, 128)


@dataclass(frozen=True)
class StepCase:
    """One model's step in a case: a decode batch (`batch` sequences of `context` tokens) or,
    with batch 0, one prompt chunk of `context` tokens."""

    batch: int
    context: int

    @property
    def label(self) -> str:
        return f"decode {self.batch}x{self.context}" if self.batch else f"prefill {self.context}"


def pair_cases(decodes: Iterable[tuple[int, int]], prefills: Iterable[int],
               beside: tuple[int, int]) -> list[tuple[StepCase, StepCase]]:
    """The (first model's step, second model's step) of every case."""
    cases = [(StepCase(b, c), StepCase(b, c)) for b, c in decodes]
    near = StepCase(*beside)
    for n in prefills:
        cases += [(StepCase(0, n), near), (near, StepCase(0, n)), (StepCase(0, n), StepCase(0, n))]
    return cases


def profile_pair(first: LLMEngine, second: LLMEngine, cases: Iterable[tuple[StepCase, StepCase]],
                 repeats: int = 5) -> list[MeasuredTurn]:
    """Time every case (that fits both engines' KV memory and context): each step alone and
    both in one turn, medians of `repeats` runs after one warm-up of each."""
    if repeats < 1:
        raise ValueError(f"repeats must be >= 1, got {repeats}")
    with _pair_sessions(first, second) as sessions:
        turns = [_time_case(sessions, case, repeats) for case in cases]
        return [t for t in turns if t is not None]


def profile_streams(first: LLMEngine, second: LLMEngine, cases: Iterable[tuple[StepCase, StepCase]],
                    seconds: float = 0.5) -> list[MeasuredStreams]:
    """Time every case (that fits) as models at their own pace run it: each model's step
    relaunched as soon as its last one is done (one host thread polling both, as a device
    worker at pace "own" does), alone and side by side, `seconds` each; each step's mean
    period. Steps launched together once (`profile_pair`) cannot tell whether a long prefill
    beside a stream of short decodes is slowed by all of them or barely; this can."""
    if seconds <= 0:
        raise ValueError(f"seconds must be > 0, got {seconds}")
    measured = []
    with _pair_sessions(first, second) as sessions:
        engines = [s.engine for s in sessions]
        for case in cases:
            with _prepared(sessions, case) as plans:
                if plans is None:
                    continue
                alone = [_relaunched([e], [p], seconds)[0] for e, p in zip(engines, plans)]
                side = tuple(_relaunched(engines, plans, seconds))
                steps = tuple(_side_step(e, p, t) for e, p, t in zip(engines, plans, alone))
                measured.append(MeasuredStreams(_label(case), steps, side))
    return measured


@contextmanager
def _pair_sessions(first: LLMEngine, second: LLMEngine) -> Iterator[list[_Session]]:
    """Both engines' profiling sessions (idle engines on one device); every block freed and
    each engine's KV pages restored afterwards."""
    if first.device != second.device:
        raise ValueError(f"side by side needs one device, not {first.device} and {second.device}")
    for engine in (first, second):
        if engine.has_unfinished:
            raise RuntimeError(f"{engine.model_id} has requests in flight: profile an idle engine")
    sessions = [_Session(first), _Session(second)]
    pages_before = [e.blocks.num_mapped_pages for e in (first, second)]
    try:
        yield sessions
    finally:
        for session, pages in zip(sessions, pages_before):
            session.free(session.seqs)
            _restore_kv_pages(session.engine, pages)


def _relaunched(engines: list[LLMEngine], plans: list[StepPlan], seconds: float) -> list[float]:
    """Each engine's plan relaunched once its last launch is done, for about `seconds` (after
    one warm-up launch each): each one's mean period, from its first to its last completion."""
    for engine, plan in zip(engines, plans):
        engine.runner.collect(engine.runner.launch(plan, None))
    done_at: list[list[float]] = [[] for _ in engines]
    in_flight = [e.runner.launch(p, None) for e, p in zip(engines, plans)]
    start = time.perf_counter()
    while time.perf_counter() - start < seconds or any(len(d) < 3 for d in done_at):
        for j, (engine, plan) in enumerate(zip(engines, plans)):
            if engine.runner.is_done(in_flight[j]):
                engine.runner.collect(in_flight[j])
                done_at[j].append(time.perf_counter())
                in_flight[j] = engine.runner.launch(plan, None)
    for engine, step in zip(engines, in_flight):
        engine.runner.collect(step)
    return [(d[-1] - d[0]) / (len(d) - 1) for d in done_at]


def _label(case: tuple[StepCase, StepCase]) -> str:
    return " | ".join(step.label for step in case)


@contextmanager
def _prepared(sessions: list[_Session], case: tuple[StepCase, StepCase]) -> Iterator[list[StepPlan] | None]:
    """Each session's plan of the case (None: one does not fit); its sequences freed after."""
    made: list[list[Sequence]] = [[], []]
    try:
        plans = [_prepare(session, step, seqs) for session, step, seqs in zip(sessions, case, made)]
        yield None if any(p is None for p in plans) else plans
    finally:
        for session, seqs in zip(sessions, made):
            session.free(seqs)


def _time_case(sessions: list[_Session], case: tuple[StepCase, StepCase], repeats: int) -> MeasuredTurn | None:
    with _prepared(sessions, case) as plans:
        if plans is None:
            return None
        engines = [s.engine for s in sessions]
        times: list[list[float]] = [[], [], []]
        for i in range(1 + repeats):
            for j, (engine, plan) in enumerate(zip(engines, plans)):
                seconds = _timed_execute(engine, plan)[0]
                if i:
                    times[j].append(seconds)
            seconds = timed_steps(engines, plans)[0]  # both launched, then both collected, as DeviceCore does
            if i:
                times[2].append(seconds)
        alone, turn = [statistics.median(t) for t in times[:2]], statistics.median(times[2])
        steps = tuple(_side_step(e, p, t) for e, p, t in zip(engines, plans, alone))
        return MeasuredTurn(_label(case), steps, turn)


def _prepare(session: _Session, step: StepCase, seqs: list[Sequence]) -> StepPlan | None:
    """The step's sequences (added to `seqs` for freeing), their KV filled for a decode batch;
    the plan to launch (None: it does not fit)."""
    engine = session.engine
    if not step.batch:  # a prompt chunk; its KV slots are rewritten each run
        if not _fits(engine, 1, step.context):
            return None
        seqs.append(session.new_seq(step.context))
        if not engine.blocks.allocate(seqs[0], step.context):
            return None
        return StepPlan((ScheduledChunk(seqs[0], 0, step.context),))
    if not _fits(engine, step.batch, step.context + 1):
        return None
    seqs += [session.new_seq(step.context) for _ in range(step.batch)]
    for seq in seqs:
        if not engine.blocks.allocate(seq, step.context + 1):  # the slot each decode rewrites
            return None
    prefill_all(engine, seqs, step.context)
    return decode_plan(seqs)


def _side_step(engine: LLMEngine, plan: StepPlan, alone_s: float) -> SideStep:
    _, num_context, _ = plan.cost_terms()
    return SideStep(engine.source.name, alone_s, engine.weights.num_bytes,
                    engine.config.kv_bytes_per_token(engine.dtype.itemsize), num_context, plan.num_tokens,
                    engine.config.num_layers)
