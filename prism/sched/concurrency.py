"""Steps of several models on one GPU: what they cost side by side, launched in one turn
(concurrent_models > 1: `ConcurrentTurn`) or each at its model's own pace (`SharedChip`); the
turns `prism profile --pair-with` measures, and the rates and the contention rule fitted to them.

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
copy's or a large GEMM's. They are measurable, and so is the rule: `fit_contention` finds, for
each rule, the bandwidth and matmul rate under which it best reproduces measured turns
(`MeasuredTurn`: two models' steps alone and in one turn), and keeps the rule that reproduces
them better; `ConcurrencyProfile` keeps the rule, its rates, both rules' losses and the turns, as
`concurrency.yaml` in a profile folder, where the simulator reads them.
"""
from __future__ import annotations

import dataclasses
import enum
import functools
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Mapping, Sequence

from prism.errors import UserError
from prism.sched.cost import DefaultCosts

CONCURRENCY_FILE = "concurrency.yaml"


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
    total = sum(s.layer_s for s in on_chip)
    return [1.0 + interleave * (total - s.layer_s) / s.layer_s if s.layer_s > 0 else 1.0 for s in on_chip]


# ---- measured turns -----------------------------------------------------------------------------
@dataclass(frozen=True)
class SideStep:
    """One model's step in a measured turn: its time alone and the work its floor counts
    (the same terms the simulator charges it by: plan.cost_terms()'s context, its tokens)."""

    model: str
    alone_s: float
    weight_bytes: int
    kv_bytes_per_token: int
    num_context: int
    num_tokens: int
    num_layers: int = 0  # 0: not recorded (files written before interleaving was measured)


@dataclass(frozen=True)
class MeasuredTurn:
    """Steps of several models launched in one turn, and the turn's measured time."""

    case: str  # what ran, e.g. "decode 16x1024 | prefill 256"
    steps: tuple[SideStep, ...]
    turn_s: float


def predicted_turn(rates: DefaultCosts, steps: Iterable[SideStep],
                   rule: ContentionRule = ContentionRule.ONE_BUDGET) -> float:
    """What `ConcurrentTurn` charges for these steps at these rates under `rule`."""
    turn = ConcurrentTurn(rates, rule=rule)
    for s in steps:
        turn.charge(s.alone_s, turn.floor(s.weight_bytes, s.kv_bytes_per_token, s.num_context, s.num_tokens))
    return turn.charged


def turn_loss(rates: DefaultCosts, turns: Sequence[MeasuredTurn], rule: ContentionRule) -> float:
    """The mean squared log error of the turns `rule` charges at `rates` against the measured ones."""
    return sum(math.log(predicted_turn(rates, t.steps, rule) / t.turn_s) ** 2 for t in turns) / len(turns)


@dataclass(frozen=True)
class MeasuredStreams:
    """Steps of several models, each relaunched as soon as its last one is done (models at their
    own pace): each step's period alone (`steps[i].alone_s`) and side by side (`side_s[i]`)."""

    case: str
    steps: tuple[SideStep, ...]
    side_s: tuple[float, ...]


def predicted_streams(rates: DefaultCosts, steps: Sequence[SideStep],
                      rule: ContentionRule = ContentionRule.ONE_BUDGET, periods: int = 40,
                      interleave: float | None = None) -> tuple[float, ...]:
    """Each step's mean period when every one is relaunched as soon as it is done on a
    `SharedChip` at these rates under `rule` (or `interleave`), over `periods` of the longest
    step alone."""
    chip = SharedChip(rates, rule=rule, interleave=interleave)
    floors = [chip.floor(s.weight_bytes, s.kv_bytes_per_token, s.num_context, s.num_tokens) for s in steps]

    def launch(now: float, i: int) -> ChipStep:
        return chip.launch(now, 0.0, steps[i].alone_s, floors[i], layers=max(1, steps[i].num_layers))

    running = [launch(0.0, i) for i in range(len(steps))]
    done_at: list[list[float]] = [[] for _ in steps]
    horizon = periods * max(s.alone_s for s in steps)
    while True:
        j = min(range(len(steps)), key=lambda i: running[i].done)
        now = running[j].done
        if now > horizon:
            break
        done_at[j].append(now)
        running[j] = launch(now, j)
    return tuple((d[-1] - d[0]) / (len(d) - 1) if len(d) > 1 else horizon for d in done_at)


def streams_loss(rates: DefaultCosts, streams: Sequence[MeasuredStreams], rule: ContentionRule,
                 interleave: float | None = None) -> float:
    """The mean squared log error of each step's period side by side that `rule` (or
    `interleave`) predicts at `rates` against the measured ones."""
    errors = [math.log(p / m) ** 2 for s in streams
              for p, m in zip(predicted_streams(rates, s.steps, rule, interleave=interleave), s.side_s)]
    return sum(errors) / len(errors)


# ---- the fit ------------------------------------------------------------------------------------
# Rates are searched in octaves around the nominal ones: from 2^-16 (a CPU, where "side by
# side" runs one after another) to 2^4 of them, coarse to fine, to 1/128 of an octave.
_OCTAVES = (-16.0, 4.0)
_REFINE = ((0.5, None), (1 / 16, 0.5), (1 / 128, 1 / 16))  # (step, half-width around the best; None: all)
_TIE = 1e-9  # losses this close are equal: the rates nearer the nominal ones win, and one budget over two


def fit_rates(turns: Sequence[MeasuredTurn], nominal: DefaultCosts,
              rule: ContentionRule = ContentionRule.ONE_BUDGET) -> DefaultCosts:
    """The memory bandwidth and matmul rate under which `ConcurrentTurn` with `rule` best
    reproduces the measured turns (least mean squared log error). Where the turns do not pin
    a rate down (no step of theirs is bound by it, or every turn took its longest step
    alone), the rate stays nearest the nominal one that fits as well."""
    if not turns:
        raise ValueError("no measured turns to fit")

    def loss(point: tuple[float, float]) -> float:
        return turn_loss(_scaled(nominal, *point), turns, rule)

    best = (0.0, 0.0)
    for step, half in _REFINE:
        axes = [_axis(c, step, half) for c in best]
        scored = [(loss((x, y)), x * x + y * y, (x, y)) for x in axes[0] for y in axes[1]]
        least = min(s[0] for s in scored)
        best = min((s for s in scored if s[0] <= least + _TIE), key=lambda s: s[1])[2]
    return _scaled(nominal, *best)


@dataclass(frozen=True)
class ContentionFit:
    """Each rule's rates fitted to the same measured turns, each one's loss there (mean
    squared log error), and the rule kept: the lower loss, one budget where they tie."""

    rates: Mapping[ContentionRule, DefaultCosts]
    losses: Mapping[ContentionRule, float]

    @property
    def rule(self) -> ContentionRule:
        one, per = (self.losses[r] for r in (ContentionRule.ONE_BUDGET, ContentionRule.PER_RESOURCE))
        return ContentionRule.PER_RESOURCE if per < one - _TIE else ContentionRule.ONE_BUDGET


def fit_contention(turns: Sequence[MeasuredTurn], nominal: DefaultCosts) -> ContentionFit:
    """Fit the rates under each contention rule (`fit_rates`); the measurement picks the rule."""
    rates = {rule: fit_rates(turns, nominal, rule) for rule in ContentionRule}
    return ContentionFit(rates, {rule: turn_loss(r, turns, rule) for rule, r in rates.items()})


def _axis(center: float, step: float, half: float | None) -> list[float]:
    lo, hi = _OCTAVES if half is None else (max(_OCTAVES[0], center - half), min(_OCTAVES[1], center + half))
    n = round((hi - lo) / step)
    return [lo + i * step for i in range(n + 1)]


def _scaled(nominal: DefaultCosts, bw_octaves: float, flops_octaves: float) -> DefaultCosts:
    return dataclasses.replace(nominal, memory_bytes_per_s=nominal.memory_bytes_per_s * 2 ** bw_octaves,
                               flops_per_s=nominal.flops_per_s * 2 ** flops_octaves)


INTERLEAVED = "interleaved"  # the own-pace account by layers taking turns (SharedChip `interleave`)
_INTERLEAVE_GRID = [i / 100 for i in range(5, 301)]  # the wait per layer, in others' layer times


@dataclass(frozen=True)
class PaceFit:
    """How steps relaunched at their own pace share the chip, as their measured periods pick:
    each account's loss over the periods (the fluid rules at the turns' rates, by name, and
    INTERLEAVED at its fitted `wait`; None where the steps' layer counts are unknown)."""

    wait: float | None
    losses: Mapping[str, float]

    @property
    def interleave(self) -> float | None:
        """Interleaving's wait if it reproduces the periods best, else None (the fluid rule)."""
        if self.wait is None:
            return None
        return self.wait if self.losses[INTERLEAVED] < min(self.losses[r.value] for r in ContentionRule) else None


def pace_accounts(fit: ContentionFit, pace: PaceFit) -> dict[str, Callable[[Sequence[SideStep]], tuple[float, ...]]]:
    """Each account of steps relaunched side by side, by name: the steps' predicted periods
    (each fluid rule at its fitted rates; interleaving at its wait, where fitted)."""
    accounts = {rule.value: functools.partial(_fluid_periods, fit.rates[rule], rule) for rule in ContentionRule}
    if pace.wait is not None:
        accounts[f"{INTERLEAVED} {pace.wait:g}"] = functools.partial(
            _fluid_periods, fit.rates[fit.rule], fit.rule, interleave=pace.wait)
    return accounts


def _fluid_periods(rates: DefaultCosts, rule: ContentionRule, steps: Sequence[SideStep],
                   interleave: float | None = None) -> tuple[float, ...]:
    return predicted_streams(rates, steps, rule, interleave=interleave)


def fit_pace(streams: Sequence[MeasuredStreams], fit: ContentionFit) -> PaceFit:
    """Each fluid rule at its turn-fitted rates, and interleaving at the wait that best
    reproduces the periods (a grid of 1/100). Interleaving needs every step's layer count."""
    losses = {rule.value: streams_loss(fit.rates[rule], streams, rule) for rule in ContentionRule}
    if not all(step.num_layers > 0 for s in streams for step in s.steps):
        return PaceFit(None, losses)
    rates = fit.rates[fit.rule]  # interleaving does not use them
    wait = min(_INTERLEAVE_GRID, key=lambda w: streams_loss(rates, streams, fit.rule, w))
    return PaceFit(wait, {**losses, INTERLEAVED: streams_loss(rates, streams, fit.rule, wait)})


# ---- the file -----------------------------------------------------------------------------------
@dataclass(frozen=True)
class ConcurrencyProfile:
    """The rates steps side by side reach on a card (per GPU) and the contention rule they
    reach them under, the turns they were fitted to (and each rule's loss there), and where
    they were measured. `prism profile --model A --pair-with B` writes one."""

    card: str
    device: str
    date: str
    command: str
    memory_bytes_per_s: float
    flops_per_s: float
    turns: tuple[MeasuredTurn, ...] = ()
    rule: ContentionRule = ContentionRule.ONE_BUDGET  # a file without one: what every file had before
    losses: Mapping[ContentionRule, float] = field(default_factory=dict)  # each rule's, where fitted
    # Steps relaunched at their own pace side by side (`prism profile --streams`), where measured,
    # and the account of pace "own" they pick (PaceFit): interleaving's wait, or None (the rule).
    streams: tuple[MeasuredStreams, ...] = ()
    interleave: float | None = None
    pace_losses: Mapping[str, float] = field(default_factory=dict)

    @classmethod
    def fitted(cls, turns: Sequence[MeasuredTurn], nominal: DefaultCosts, card: str, device: str,
               date: str, command: str, streams: Sequence[MeasuredStreams] = ()) -> "ConcurrencyProfile":
        """The rule the turns pick and its rates (`fit_contention`), both rules' losses."""
        fit = fit_contention(turns, nominal)
        rates = fit.rates[fit.rule]
        pace = fit_pace(streams, fit) if streams else PaceFit(None, {})
        return cls(card, device, date, command, rates.memory_bytes_per_s, rates.flops_per_s, tuple(turns),
                   fit.rule, dict(fit.losses), tuple(streams), pace.interleave, dict(pace.losses))

    @property
    def pace_account(self) -> str:
        """How models at their own pace share the chip, in words (SharedChip)."""
        return f"{INTERLEAVED}, wait {self.interleave:g}" if self.interleave is not None else f"{self.rule.value} (fluid)"

    def rates(self, nominal: DefaultCosts) -> DefaultCosts:
        """`nominal` with this profile's bandwidth and matmul rate."""
        return dataclasses.replace(nominal, memory_bytes_per_s=self.memory_bytes_per_s, flops_per_s=self.flops_per_s)

    def to_dict(self) -> dict:
        losses = {"loss": {rule.value: round(loss, 9) for rule, loss in self.losses.items()}} if self.losses else {}
        return {
            "card": self.card, "device": self.device, "date": self.date, "command": self.command,
            "rule": self.rule.value, **losses,
            "memory_gb_per_s": round(self.memory_bytes_per_s / 1e9, 6),
            "matmul_tflop_per_s": round(self.flops_per_s / 1e12, 9),
            "turns": [{"case": t.case, "turn_ms": round(t.turn_s * 1e3, 6),
                       "steps": [_step_dict(s) for s in t.steps]}
                      for t in self.turns],
            **({"own_pace": {"interleave": self.interleave,
                             "loss": {k: round(v, 9) for k, v in self.pace_losses.items()}}}
               if self.pace_losses or self.interleave is not None else {}),
            **({"streams": [{"case": m.case, "side_ms": [round(x * 1e3, 6) for x in m.side_s],
                             "steps": [_step_dict(x) for x in m.steps]} for m in self.streams]} if self.streams else {}),
        }

    @classmethod
    def from_dict(cls, raw: dict) -> "ConcurrencyProfile":
        turns = tuple(MeasuredTurn(str(t["case"]), tuple(_step_of(s) for s in t["steps"]), float(t["turn_ms"]) / 1e3)
                      for t in raw.get("turns") or ())
        streams = tuple(MeasuredStreams(str(m["case"]), tuple(_step_of(s) for s in m["steps"]),
                                        tuple(float(x) / 1e3 for x in m["side_ms"]))
                        for m in raw.get("streams") or ())
        pace = raw.get("own_pace") or {}
        interleave = None if pace.get("interleave") is None else float(pace["interleave"])
        profile = cls(str(raw.get("card", "")), str(raw.get("device", "")), str(raw.get("date", "")),
                      str(raw.get("command", "")), float(raw["memory_gb_per_s"]) * 1e9,
                      float(raw["matmul_tflop_per_s"]) * 1e12, turns,
                      ContentionRule(raw.get("rule", ContentionRule.ONE_BUDGET)),
                      {ContentionRule(k): float(v) for k, v in (raw.get("loss") or {}).items()}, streams,
                      interleave, {str(k): float(v) for k, v in (pace.get("loss") or {}).items()})
        if profile.memory_bytes_per_s <= 0 or profile.flops_per_s <= 0:
            raise ValueError("rates must be positive")
        if interleave is not None and interleave < 0:
            raise ValueError("interleave must be >= 0")
        return profile

    def save(self, path: str | Path) -> Path:
        import yaml

        path = Path(path).expanduser()
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("# The rates steps of several models reach side by side (prism.sched.concurrency)\n"
                        + yaml.safe_dump(self.to_dict(), sort_keys=False, width=120))
        return path

    @classmethod
    def load(cls, path: str | Path) -> "ConcurrencyProfile":
        import yaml

        path = Path(path).expanduser()
        try:
            return cls.from_dict(yaml.safe_load(path.read_text()) or {})
        except FileNotFoundError:
            raise UserError(f"concurrency profile not found: {path}") from None
        except (yaml.YAMLError, KeyError, TypeError, ValueError, AttributeError) as e:
            raise UserError(f"{path}: not a concurrency profile ({type(e).__name__}: {e})") from None


def _step_dict(s: SideStep) -> dict:
    return {"model": s.model, "alone_ms": round(s.alone_s * 1e3, 6), "weight_bytes": s.weight_bytes,
            "kv_bytes_per_token": s.kv_bytes_per_token, "num_context": s.num_context, "num_tokens": s.num_tokens,
            **({"num_layers": s.num_layers} if s.num_layers else {})}


def _step_of(raw: dict) -> SideStep:
    return SideStep(str(raw["model"]), float(raw["alone_ms"]) / 1e3, int(raw["weight_bytes"]),
                    int(raw["kv_bytes_per_token"]), int(raw["num_context"]), int(raw["num_tokens"]),
                    int(raw.get("num_layers", 0)))
