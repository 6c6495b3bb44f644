"""Measure two models' steps side by side on one device: each step alone, and both launched in
one turn as a device worker launches them with concurrent_models > 1 (the first model's step,
then the other's, each on the engine's own stream; then their tokens collected). The result is
a list of `MeasuredTurn` (prism.sched.concurrency), which `fit_rates` turns into the rates the
simulator charges such turns at.

Cases: both models decoding (batch x context each), one model's prompt chunk beside the
other's decode batch (both ways round), and both prefilling. Every repetition of a case does the
same work: a step is launched again and again without being committed, so each rewrites the
same KV slots. Alone and side-by-side runs alternate, so drift hits all three alike. Both
engines must be idle; every block is freed afterwards and each engine's KV pages are restored.
"""
from __future__ import annotations

import statistics
from dataclasses import dataclass
from typing import Iterable

from prism.engine.llm_engine import LLMEngine
from prism.engine.profiler import _fits, _restore_kv_pages, _Session, _timed_execute, decode_plan, prefill_all, timed_steps
from prism.engine.sequence import ScheduledChunk, Sequence, StepPlan
from prism.sched.concurrency import MeasuredTurn, SideStep

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
    if first.device != second.device:
        raise ValueError(f"side by side needs one device, not {first.device} and {second.device}")
    for engine in (first, second):
        if engine.has_unfinished:
            raise RuntimeError(f"{engine.model_id} has requests in flight: profile an idle engine")
    sessions = [_Session(first), _Session(second)]
    pages_before = [e.blocks.num_mapped_pages for e in (first, second)]
    try:
        turns = []
        for case in cases:
            turn = _time_case(sessions, case, repeats)
            if turn is not None:
                turns.append(turn)
        return turns
    finally:
        for session, pages in zip(sessions, pages_before):
            session.free(session.seqs)
            _restore_kv_pages(session.engine, pages)


def _time_case(sessions: list[_Session], case: tuple[StepCase, StepCase], repeats: int) -> MeasuredTurn | None:
    made: list[list[Sequence]] = [[], []]
    try:
        plans = []
        for session, step, seqs in zip(sessions, case, made):
            plan = _prepare(session, step, seqs)
            if plan is None:
                return None
            plans.append(plan)
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
        return MeasuredTurn(" | ".join(step.label for step in case), steps, turn)
    finally:
        for session, seqs in zip(sessions, made):
            session.free(seqs)


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
                    engine.config.kv_bytes_per_token(engine.dtype.itemsize), num_context, plan.num_tokens)
