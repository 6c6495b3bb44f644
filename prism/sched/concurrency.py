"""Steps of several models on one GPU: what they cost side by side, launched in one turn
(concurrent_models > 1: `ConcurrentTurn`) or each at its model's own pace (`SharedChip`). The
rates, rule and interleaving they are charged by are measured and fitted in
prism.sched.concurrency_profile (`concurrency.yaml`).

A step's floor is its least device time per resource: its bytes (weights, the decodes' KV) over
the memory bandwidth, and its matmul FLOPs over the matmul rate (`StepFloor`). What steps side
by side cannot beat is a budget of those floors, and there are two accounts of it
(`ContentionRule`):

- one budget (ONE_BUDGET): each step counts its binding resource's floor (the larger of the two)
  against one budget: a bandwidth-bound decode and a compute-bound prefill take turns.
- per resource (PER_RESOURCE): bandwidth floors and compute floors count against a budget each:
  a bandwidth-bound decode beside a compute-bound prefill may overlap all the way.

A turn cannot end before its longest step alone, nor before any budget's sum of floors. With
nominal rates the one-budget rule predicted somewhat less than the H200's measured turns
(docs/policies.md has the figures): the rates side-by-side kernels reach together are not a
copy's or a large GEMM's. They are measurable, and so is the rule (prism.sched.concurrency_profile).
"""
from __future__ import annotations

import enum
import math
from dataclasses import dataclass

from prism.sched.cost import DefaultCosts

class ContentionRule(str, enum.Enum):
    """How steps side by side contend for the chip (module docstring)."""

    ONE_BUDGET = "one-budget"
    PER_RESOURCE = "per-resource"

    def budgets(self, floor: StepFloor | float, seconds: float) -> tuple[float, ...]:
        """What a step of `seconds` alone with this floor counts against each budget: each
        part of the floor at most the step's own time (rates below what the card does must
        not make a step side by side cost more than alone). A bare number is a floor of both
        resources: a step whose split is unknown contends as under one budget."""
        if not isinstance(floor, StepFloor):
            floor = StepFloor(floor, floor)
        if self is ContentionRule.ONE_BUDGET:
            return (min(floor.binding, seconds),)
        return (min(floor.moved, seconds), min(floor.computed, seconds))


@dataclass(frozen=True)
class StepFloor:
    """A step's least device time per resource: `moved` (its bytes over the memory bandwidth)
    and `computed` (its matmul FLOPs over the matmul rate)."""

    moved: float
    computed: float

    @property
    def binding(self) -> float:
        """The floor of the step's binding resource."""
        return max(self.moved, self.computed)


def step_floors(rates: DefaultCosts, weight_bytes: int, kv_bytes_per_token: int,
                num_context: int, num_tokens: int) -> StepFloor:
    """A step's floor per resource: weights and the decodes' KV over the memory bandwidth, its
    matmul FLOPs (16-bit weights: two per parameter per token) over the matmul rate."""
    moved = (weight_bytes + kv_bytes_per_token * num_context) / rates.memory_bytes_per_s
    computed = 2 * (weight_bytes / 2) * num_tokens / rates.flops_per_s
    return StepFloor(moved, computed)


def step_floor(rates: DefaultCosts, weight_bytes: int, kv_bytes_per_token: int,
               num_context: int, num_tokens: int) -> float:
    """A step's least device time: the floor of its binding resource (`step_floors`)."""
    return step_floors(rates, weight_bytes, kv_bytes_per_token, num_context, num_tokens).binding


class ConcurrentTurn:
    """The device time of the steps one turn runs side by side (concurrent_models > 1): the
    larger of the longest step alone and each budget's sum of the steps' floors (under
    `rule`: module docstring). The steps are charged one after another as the clock's
    marginal moves, so the first model's tokens come out at its own end, the later ones' at
    the turn's."""

    def __init__(self, rates: DefaultCosts, gpus: int = 1, rule: ContentionRule = ContentionRule.ONE_BUDGET):
        """`rates`: one GPU's bandwidth and matmul rate (nominal, or fitted: ConcurrencyProfile);
        `gpus`: the GPUs the device stands for (a tensor-parallel group moves and computes k
        times as much at once); `rule`: how the steps' floors contend."""
        self.rates = DefaultCosts(memory_bytes_per_s=rates.memory_bytes_per_s * gpus,
                                  flops_per_s=rates.flops_per_s * gpus, h2d_bytes_per_s=rates.h2d_bytes_per_s * gpus)
        self.rule = rule
        self.reset()

    def reset(self) -> None:
        self.longest = self.charged = 0.0
        self.floors: list[float] = []  # each budget's sum so far

    def floor(self, weight_bytes: int, kv_bytes_per_token: int, num_context: int, num_tokens: int) -> StepFloor:
        return step_floors(self.rates, weight_bytes, kv_bytes_per_token, num_context, num_tokens)

    def charge(self, seconds: float, floor: StepFloor | float) -> float:
        """Add one step (its time alone, its floor); the time the clock moves for it now. A
        floor above the step's own time (rates below what the card does) counts as that
        time: side by side, no step costs more than alone."""
        self.longest = max(self.longest, seconds)
        counted = self.rule.budgets(floor, seconds)
        self.floors = [a + b for a, b in zip(self.floors, counted)] if self.floors else list(counted)
        total = max(self.longest, *self.floors)
        moved, self.charged = total - self.charged, total
        return moved


# ---- models stepping at their own pace ---------------------------------------------------------
@dataclass(eq=False)
class ChipStep:
    """One model's step on a shared chip: it reaches the chip at `starts` (its launch plus the
    host time of its own process), has `work` seconds of device time alone still to run and,
    alone, keeps each budget of the chip busy by its `uses` (its floor against that budget
    over its time alone, each in [0, 1]: one budget, or bandwidth and matmul; ContentionRule).
    `done`: when it ends given the steps launched so far (later launches may push it back,
    never forward, nor before `launched`, when its launch lets go of the host thread).
    `layer_s`: its time alone per model layer (under interleaving, SharedChip)."""

    starts: float
    work: float
    uses: tuple[float, ...]
    done: float = math.inf
    launched: float = 0.0
    layer_s: float = 0.0


class SharedChip:
    """The device time of steps that models launch at their own pace (LocalSchedulerConfig
    pace "own": separate engines, or MuxServe's processes, under MPS), each model on its own
    timeline: fluid sharing of the chip. While the steps on the chip together ask no budget
    for more than it has (the sum of their uses of it, each a floor over its step's time
    alone, is at most 1) each runs as fast as alone; beyond that every one of them is slowed
    by the largest such sum, so the floors of what runs at once never exceed what the chip
    moves or computes. Under ONE_BUDGET a step's use is its binding resource's floor over its
    time alone; under PER_RESOURCE it has a bandwidth use and a matmul use, and a
    bandwidth-bound decode slows a compute-bound prefill only by what it computes (module
    docstring). A step launched later thus stretches the steps already running too, and a
    step running alone at the end of a busy stretch gets its speed back.

    The rates and rule are those of `ConcurrentTurn` (nominal, or fitted to measured turns:
    ConcurrencyProfile); for steps launched together the rule charges at least what a turn
    charges (the longest step alone, each budget's sum of floors) and more when the shorter
    steps slow the longer one while they last. What it leaves out: no SM caps (MPS's active
    thread percentage), no time-slicing costs (contexts without MPS switch), no per-kernel
    launch gaps; and a model's own consecutive steps never overlap (it launches the next once
    the last is done). A model's host time overlaps everything (each engine has its own
    process) unless `one_host_thread`: the models are one worker process's, whose launches take
    turns on its one host thread. A launch then starts when the thread is free, holds it for
    its launch time (`hold_s`) and puts its step on the chip after its host time: the kernels
    of a step run while later ones of the same step are still being launched, but no other
    model launches meanwhile, and the step ends no earlier than its launch.

    Interleaving (`interleave`, a number): instead of the fluid rule, the steps' layers take
    turns. Steps relaunched side by side do not slow each other alike: a stream of short decodes
    beside a long prefill barely slows it and is itself slowed several times over (measured:
    `prism profile --streams`). The GPU runs the kernels of concurrent streams roughly in turn,
    a kernel of each, and a kernel of another step partly overlaps one's own; so a step whose
    layers take `layer_s` each alone waits `interleave` of the others' layer times for each of
    its own: it is slowed by 1 + interleave x (sum of the others' layer_s) / its layer_s.
    Layers stand for kernels (the kernels per layer of one architecture are alike), so a step
    of few heavy layers gains on one of many light ones."""

    def __init__(self, rates: DefaultCosts, gpus: int = 1, rule: ContentionRule = ContentionRule.ONE_BUDGET,
                 one_host_thread: bool = False, interleave: float | None = None):
        self.turn = ConcurrentTurn(rates, gpus, rule)  # the same rates, floors and rule as a turn's
        self.interleave = interleave
        self.one_host_thread = one_host_thread
        self.host_free = 0.0  # when the worker's host thread is next free (one_host_thread)
        self._t = 0.0  # the state below is as of this time
        self._steps: list[ChipStep] = []  # launched and not yet over at _t

    @property
    def rule(self) -> ContentionRule:
        return self.turn.rule

    def floor(self, weight_bytes: int, kv_bytes_per_token: int, num_context: int, num_tokens: int) -> StepFloor:
        return self.turn.floor(weight_bytes, kv_bytes_per_token, num_context, num_tokens)

    @property
    def running(self) -> int:
        """Steps launched and not over (as of the last launch)."""
        return len(self._steps)

    def launch(self, now: float, host_s: float, alone_s: float, floor: StepFloor | float,
               hold_s: float = 0.0, layers: int = 1) -> ChipStep:
        """A step launched at `now`: `host_s` of its process's time, then `alone_s` of device
        time alone whose floor is `floor` over `layers` model layers; with `one_host_thread`,
        from when the host thread is free, holding it for `hold_s` (otherwise `hold_s` is not
        charged). Its `done` (and every running step's) is set."""
        _share(self._steps, self._t, now, self.interleave)
        self._t = max(self._t, now)
        self._steps = [s for s in self._steps if s.work > 0]
        start, launched = now, 0.0
        if self.one_host_thread:
            start = max(now, self.host_free)
            launched = self.host_free = start + hold_s
        if alone_s <= 0:  # nothing for the chip: done once its host time has passed
            return ChipStep(start + host_s, 0.0, (), max(start + host_s, launched), launched)
        uses = tuple(max(b, 0.0) / alone_s for b in self.rule.budgets(floor, alone_s))
        step = ChipStep(start + host_s, alone_s, uses, launched=launched, layer_s=alone_s / max(1, layers))
        self._steps.append(step)
        future = [ChipStep(s.starts, s.work, s.uses, layer_s=s.layer_s) for s in self._steps]
        _share(future, self._t, math.inf, self.interleave)
        for s, f in zip(self._steps, future):
            s.done = max(f.done, s.launched)
        return step


def _share(steps: list[ChipStep], t: float, until: float, interleave: float | None = None) -> None:
    """Run `steps` from `t` to `until` on a SharedChip (its fluid rule, or interleaving): their
    work goes down, and those that end get their `done`."""
    while t < until:
        on_chip = [s for s in steps if s.work > 0 and s.starts <= t]
        pending = [s.starts for s in steps if s.work > 0 and s.starts > t]
        if not on_chip and not pending:
            return
        slowdowns = _slowdowns(on_chip, interleave)
        ends = [t + s.work * slow for s, slow in zip(on_chip, slowdowns)]
        event = min([*ends, *pending, until])
        for s, slow, end in zip(on_chip, slowdowns, ends):
            if end <= event:
                s.work, s.done = 0.0, end
            else:
                s.work -= (event - t) / slow
        t = event


def _slowdowns(on_chip: list[ChipStep], interleave: float | None) -> list[float]:
    """Each step's slowdown on the chip: under the fluid rule all alike, the largest sum of
    uses of a budget (at least 1); interleaving, each by the others' layer times (SharedChip)."""
    if interleave is None:
        slowdown = max([1.0, *(sum(budget) for budget in zip(*(s.uses for s in on_chip)))])
        return [slowdown] * len(on_chip)
    total = sum(s.layer_s for s in on_chip)  # each > 0: a step on the chip has work, so time alone
    return [1.0 + interleave * (total - s.layer_s) / s.layer_s for s in on_chip]
