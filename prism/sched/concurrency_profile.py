"""What steps of several models side by side were measured to cost, and what is fitted to it:
turns launched together (`MeasuredTurn`, `prism profile --pair-with`) pick the contention rule
and its rates (`fit_contention`); steps relaunched at their own pace (`MeasuredStreams`,
`--streams`) pick the own-pace account, a fluid rule or interleaving with its wait (`fit_pace`).
`ConcurrencyProfile` keeps all of it as `concurrency.yaml` in a profile folder, where the
simulator reads it (prism.sim.costs.ProfileSet); the accounts themselves are
prism.sched.concurrency's (`ConcurrentTurn`, `SharedChip`).
"""
from __future__ import annotations

import dataclasses
import functools
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Mapping, Sequence

from prism.errors import UserError
from prism.sched.concurrency import ChipStep, ConcurrentTurn, ContentionRule, SharedChip
from prism.sched.cost import DefaultCosts

CONCURRENCY_FILE = "concurrency.yaml"


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
        return chip.launch(now, 0.0, steps[i].alone_s, floors[i], layers=steps[i].num_layers)

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
    accounts = {rule.value: functools.partial(predicted_streams, fit.rates[rule], rule=rule) for rule in ContentionRule}
    if pace.wait is not None:
        accounts[f"{INTERLEAVED} {pace.wait:g}"] = functools.partial(
            predicted_streams, fit.rates[fit.rule], rule=fit.rule, interleave=pace.wait)
    return accounts


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
