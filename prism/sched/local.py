"""The local (per-device) scheduler: one SLO-aware queue across all of a device's models.

Each step the device worker hands `decide()` a `DeviceView` and gets back a `StepDecision`:
which models to evict and activate (see `residency.py`), the admission order of waiting
requests per model, and which model runs one step. Pure policy: no torch, no I/O, no wall
clock (time is `view.now`), so the simulator runs this very code.

Policy "prism":
- Admission: deadlines are each request's next-token deadline (arrival + TTFT SLO before the
  first token); Moore-Hodgson picks the largest set of waiting requests that can all meet them;
  those go first in EDD order, then the still-feasible rest by deadline, then late ones by
  arrival. Nothing is dropped.
- Run: least slack first among each resident model's decodes and the on-time prefills taken
  in EDD order (each prefill planned for its likely-worst time: the estimate times the
  measured spread of past prefill steps, `CalibratedCost.prefill_margin`); late work fills the
  gaps it fits in, and contends like the rest once it has waited
  `late_contender_ttft_multiple` x its TTFT SLO (see `_pick_model_prism`).
- Step size: the model that runs (at their own pace: every model) batches its full token
  budget, unless a running decode of it would then miss its TPOT as judged over the whole
  request; then the prefill chunk is cut to what keeps it on time, never below the size where
  a step stops being weight-bound (see step_budget.py).
- Preemption victim: the request with most slack.
Policy "fcfs" (baseline): arrival order everywhere; same residency rules. The device runs the
model of its oldest unfinished request (decoding ones included): models take turns by arrival
groups, as time sharing (`swap`) does.
Policy "rr" (baseline): each model's queue in arrival order, and the device's resident models
with work take turns step by step (the one whose last step is oldest runs), as engines that
share a GPU by time slices do (`static`): no model waits for another's whole decode.
Policy "adbs" (baseline): MuxServe's adaptive batch scheduling (`muxserve`; see adbs.py): each
model's queue in arrival order, KV quotas per model by request rate (adapted to who waits),
prefill and decode phases alternating, models taking turns within each.
"""
from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass, field
from enum import Enum

from prism.config import EngineConfig, NonNegFloat, NonNegInt, PosFloat, PosInt, check_fields
from prism.sched.adbs import Adbs
from prism.sched.cost import step_seconds
from prism.sched.moore_hodgson import Job, moore_hodgson
from prism.sched.residency import IDLE_EVICT, IDLE_EVICT_S, IdleEvict, plan_residency
from prism.sched.step_budget import step_token_budget, weight_bound_chunk
from prism.sched.swap import plan_swap
from prism.sched.view import CostModel, DeviceView, RequestView, StepDecision


class LocalPolicy(str, Enum):
    PRISM = "prism"  # SLO-aware: Moore-Hodgson admission, least slack runs, most slack preempted
    FCFS = "fcfs"  # arrival order everywhere; the model of the oldest request runs (swap)
    ROUND_ROBIN = "rr"  # arrival order per model; models with work take turns per step (static)
    ADBS = "adbs"  # MuxServe's: KV quotas by rate, prefill and decode phases, turns within each (muxserve)


POLICIES = tuple(p.value for p in LocalPolicy)


class Pace(str, Enum):
    """When a device's models step (a mechanism: DeviceCore carries it out)."""

    TURN = "turn"  # models take turns: a turn's steps all end before the next turn begins
    OWN = "own"  # each model steps again as soon as its own last step is done (separate engines, MPS)


@dataclass(frozen=True)
class LocalSchedulerConfig:
    policy: LocalPolicy = LocalPolicy.PRISM
    idle_evict_s: NonNegFloat = IDLE_EVICT_S  # a resident model with no requests this long may be evicted...
    # ...when: "pressure" (the device's work wants its pages: see residency.py) or "always"
    idle_evict: IdleEvict = IDLE_EVICT
    swap_idle_s: NonNegFloat = 2.0  # under activation pressure, models idle this long (no requests) may go
    kv_headroom_pages: NonNegInt = 0  # pages to keep free beyond a model's weights when activating it
    # Time-sharing only (the `swap` baseline): at most this many resident models, served in
    # arrival groups (see swap.py). None: space sharing, as many as memory holds.
    max_resident: PosInt | None = None
    # Moore-Hodgson weighs only this many waiting requests, those due first; the rest queue by
    # deadline behind them. It bounds the policy's cost per step (it grows with the queue and
    # competes with 8-10 ms GPU steps) and loses nothing while it exceeds what one step can
    # admit (max_num_seqs).
    admission_window: PosInt = 256
    # Starvation bound: a waiting request that missed its Moore-Hodgson slot gets the leftover
    # slack only, which a device whose other models decode without pause never has. Once it
    # has waited this many times its TTFT SLO it becomes a contender like on-time work (its
    # model competes by slack, and a request that late has the least), so no request waits
    # forever behind other models' decodes. inf: no bound (late work only steals slack).
    late_contender_ttft_multiple: PosFloat = 3.0
    # The window of the request rates the device measures (adbs quotas follow them); the
    # same knob sets the frontend's token-rate window.
    rate_window_s: PosFloat = 60.0
    # The most resident models a device steps in one turn, side by side (on CUDA each model's
    # steps go to a stream of its own, so their kernels share the chip): the policy's model,
    # then other models with work in turn. 1: one model per step.
    concurrent_models: PosInt = 1
    # turn: the device steps in turns (one model, or concurrent_models side by side), a turn
    # ending with its longest step. own: every resident model with work steps again as soon
    # as its own previous step is done, never waiting for another model's (each on a stream
    # of its own on CUDA; concurrent_models is then moot), as separate engines under MPS do.
    pace: Pace = Pace.TURN

    def __post_init__(self) -> None:
        check_fields(self)  # the bounds and choices of the field types above


# ---- keys: every sort is total, so decisions never depend on input order -------------------
def next_deadline(r: RequestView) -> float:
    """When `r`'s next token is due: TTFT deadline before the first token, else one TPOT after
    the last. A preempted request waiting for recompute is thus due by its next token, not by
    its long-past TTFT deadline."""
    if not r.has_first_token:
        return r.ttft_deadline
    last = r.last_token_time if r.last_token_time is not None else r.first_token_time
    return last + r.slo.tpot_s


def _edd_key(r: RequestView) -> tuple:
    # Priority breaks deadline ties (higher first), then arrival, then id for determinism.
    return (next_deadline(r), -r.priority, r.arrival, r.req_id)


def _arrival_key(r: RequestView) -> tuple:
    return (r.arrival, -r.priority, r.req_id)


def _is_decoding(r: RequestView) -> bool:
    """Running past its first token: its next step is a decode (anything else is a prefill)."""
    return r.running and r.has_first_token


def num_tokens_to_prefill(r: RequestView) -> int:
    # After a recompute preemption this covers the output produced so far as well.
    return max(0, r.num_tokens - r.num_computed_tokens)


@dataclass(frozen=True)
class _Estimates:
    """Per-view facts the slack arithmetic needs, computed once per decision."""

    now: float
    resident: frozenset[str]  # resident and not activating: can run right now
    decode_step_s: dict[str, float]  # model -> time of one decode step of its current batch
    # Memos for this one decision, keyed by id(view) (the views outlive it): a request's
    # prefill time and slack are asked for several times per decision.
    prefill_s: dict[int, float] = field(default_factory=dict)
    slack_s: dict[int, float] = field(default_factory=dict)

    @staticmethod
    def of(view: DeviceView, cost: CostModel) -> _Estimates:
        decoding: dict[str, list[RequestView]] = {}
        for r in view.requests:
            if _is_decoding(r):
                decoding.setdefault(r.model_id, []).append(r)
        steps = {
            model_id: cost.decode_step_time(model_id, len(batch), sum(r.num_tokens for r in batch))
            for model_id, batch in decoding.items()
        }
        resident = frozenset(m.model_id for m in view.models if m.resident and not m.activating)
        return _Estimates(view.now, resident, steps)


@dataclass(frozen=True)
class _Admission:
    order: tuple[RequestView, ...]  # all waiting requests of the device, best first
    on_time: frozenset[str]  # req_ids Moore-Hodgson promises on time (empty under fcfs)


class LocalScheduler:
    def __init__(self, config: LocalSchedulerConfig, cost: CostModel,
                 max_step_tokens: int = EngineConfig.max_num_batched_tokens) -> None:
        self.config = config
        self.cost = cost
        self.max_step_tokens = max_step_tokens  # the engines' token budget per step
        self._adbs = Adbs(config.rate_window_s) if config.policy is LocalPolicy.ADBS else None

    @property
    def needs_request_rates(self) -> bool:
        """Whether `decide` reads `DeviceView.request_rates` (the device fills them only then)."""
        return self._adbs is not None

    # ---- the one call per step ----------------------------------------------------------
    def decide(self, view: DeviceView) -> StepDecision:
        est = _Estimates.of(view, self.cost)
        admission = self._admission(view, est)
        drain: tuple[str, ...] = ()
        token_budget: dict[str, int] = {}
        if self.config.max_resident is not None:
            evict, activate, drain = plan_swap(view, self.config.max_resident, self.config.kv_headroom_pages)
        else:
            evict, activate = plan_residency(
                view,
                (r.model_id for r in admission.order),
                idle_evict_s=self.config.idle_evict_s,
                idle_evict=self.config.idle_evict,
                swap_idle_s=self.config.swap_idle_s,
                kv_headroom_pages=self.config.kv_headroom_pages,
            )
        if self.config.policy is LocalPolicy.PRISM:
            run_model = self._pick_model_prism(view, est, admission)
            # The models that step keep their decodes within TPOT: at their own pace every one
            # with decodes, in turn the one that runs.
            stepping = sorted(est.resident & est.decode_step_s.keys()) if self.config.pace is Pace.OWN \
                else [run_model] if run_model is not None else []
            token_budget = {m: b for m in stepping if (b := self._token_budget(view, est, m)) is not None}
        elif self.config.policy is LocalPolicy.ROUND_ROBIN:
            run_model = self._pick_model_round_robin(view, est)
        elif self._adbs is not None:
            plan = self._adbs.plan(view, est.resident)
            run_model, drain = plan.run_model, drain + plan.over_quota
        else:
            run_model = self._pick_model_fcfs(view, est)
        beside = None
        if self.config.policy is LocalPolicy.PRISM and self.config.concurrent_models > 1 and run_model is not None:
            beside = self._rank_beside(view, est, run_model)
        return StepDecision(
            run_model=run_model,
            admit_order=_per_model(admission.order),
            activate=activate,
            evict=evict,
            drain=drain,
            token_budget=token_budget,
            beside=beside,
        )

    # ---- public pieces (the simulator and tests use them too) ---------------------------
    def order_waiting(self, view: DeviceView) -> list[RequestView]:
        """The admission order of all waiting requests of the device, across models."""
        return list(self._admission(view, _Estimates.of(view, self.cost)).order)

    def slack(self, r: RequestView, view: DeviceView) -> float:
        """Seconds `r` can still wait before its next token is late (negative: already late)."""
        return self._slack(r, _Estimates.of(view, self.cost))

    def choose_victim(self, view: DeviceView, candidates: list[RequestView]) -> RequestView | None:
        """Whom to preempt (and recompute later) under memory pressure."""
        if not candidates:
            return None
        if self.config.policy is not LocalPolicy.PRISM:
            return max(candidates, key=lambda r: (r.arrival, r.req_id))  # newest goes
        est = _Estimates.of(view, self.cost)
        # Most slack can best afford a recompute; ties: lower priority, then newest arrival.
        return max(candidates, key=lambda r: (self._slack(r, est), -r.priority, r.arrival, r.req_id))

    def step_token_budget(self, view: DeviceView, model_id: str) -> int | None:
        """The most tokens `model_id`'s next step may batch under prism (None: the full budget)."""
        return self._token_budget(view, _Estimates.of(view, self.cost), model_id)

    # ---- step size ------------------------------------------------------------------------
    def _token_budget(self, view: DeviceView, est: _Estimates, model_id: str) -> int | None:
        decodes = [r for r in view.requests if r.model_id == model_id and _is_decoding(r)]
        if not decodes:
            return None
        pending = sum(num_tokens_to_prefill(r) for r in view.requests
                      if r.model_id == model_id and not _is_decoding(r))
        context = sum(r.num_tokens for r in decodes)
        floor = weight_bound_chunk(lambda n: self.cost.prefill_time(model_id, n), self.max_step_tokens)
        return step_token_budget(
            decodes, pending, est.now, est.decode_step_s[model_id],
            lambda p: self._step_estimate(model_id, len(decodes), context, p), floor, self.max_step_tokens,
        )

    def _step_estimate(self, model_id: str, num_decodes: int, context: int, num_prefill: int) -> float:
        estimate = getattr(self.cost, "step_estimate", None)  # a calibrated cost's own pricing
        if estimate is not None:
            return estimate(model_id, num_decodes, context, num_prefill)
        return step_seconds(self.cost, model_id, num_decodes, context, num_prefill)

    # ---- estimates ----------------------------------------------------------------------
    def _prefill_s(self, r: RequestView, est: _Estimates) -> float:
        t = est.prefill_s.get(id(r))
        if t is None:
            tokens = num_tokens_to_prefill(r)
            t = est.prefill_s[id(r)] = self.cost.prefill_time(r.model_id, tokens) if tokens else 0.0
        return t

    def _activation_s(self, model_id: str, est: _Estimates) -> float:
        # An activating model counts in full: how far its copy has got is not in the view.
        return 0.0 if model_id in est.resident else self.cost.activation_time(model_id)

    def _slack(self, r: RequestView, est: _Estimates) -> float:
        slack = est.slack_s.get(id(r))
        if slack is None:
            slack = est.slack_s[id(r)] = self._slack_of(r, est)
        return slack

    def _slack_of(self, r: RequestView, est: _Estimates) -> float:
        if _is_decoding(r):
            step = est.decode_step_s.get(r.model_id)
            if step is None:  # r is not among the view's decoding requests: a batch of one
                step = self.cost.decode_step_time(r.model_id, 1, r.num_tokens)
            return next_deadline(r) - est.now - step
        # Prefill pending (first token, or the next one after a recompute preemption).
        return next_deadline(r) - est.now - self._prefill_s(r, est) - self._activation_s(r.model_id, est)

    # ---- admission ----------------------------------------------------------------------
    def _admission(self, view: DeviceView, est: _Estimates) -> _Admission:
        waiting = [r for r in view.requests if not r.running]
        if self.config.policy is not LocalPolicy.PRISM:
            return _Admission(tuple(sorted(waiting, key=_arrival_key)), frozenset())
        waiting.sort(key=_edd_key)
        window, beyond = waiting[: self.config.admission_window], waiting[self.config.admission_window:]
        on_time = self._on_time_set(window, est)
        selected = [r for r in window if r.req_id in on_time]
        rest = [r for r in window if r.req_id not in on_time]
        feasible = [r for r in rest if self._slack(r, est) >= 0]
        late = sorted((r for r in rest if self._slack(r, est) < 0), key=_arrival_key)
        # Beyond the window all are due later than anything in it: after its feasible ones, and
        # before its late ones, which stay last as without a window.
        return _Admission(tuple(selected + feasible + beyond + late), frozenset(on_time))

    def _on_time_set(self, waiting: list[RequestView], est: _Estimates) -> set[str]:
        """req_ids of the largest set of waiting requests that can all meet their deadlines.

        A non-resident model's activation is charged once, to its first request in EDD order
        (the carrier). If Moore-Hodgson drops a carrier but keeps a later request of the same
        model, that request would be promised a free activation; so the carrier is set aside
        (it joins the rest) and the selection is redone. Each round sets aside at least one
        request, so this ends; the result is always truly feasible, if not always maximal.
        """
        set_aside: set[str] = set()
        while True:
            candidates = sorted((r for r in waiting if r.req_id not in set_aside), key=_edd_key)
            carriers: dict[str, str] = {}  # model -> req_id charged with its activation
            jobs, rank = [], {}
            for r in candidates:
                processing = self._prefill_s(r, est)
                if r.model_id not in est.resident and r.model_id not in carriers:
                    carriers[r.model_id] = r.req_id
                    processing += self._activation_s(r.model_id, est)
                jobs.append(Job(r.req_id, processing, next_deadline(r)))
                rank[r.req_id] = _edd_key(r)[1:]
            kept, _ = moore_hodgson(jobs, est.now, tie_key=lambda j: rank[j.job_id])  # noqa: B023 (called within the iteration)
            on_time = {j.job_id for j in kept}
            models_on_time = {r.model_id for r in candidates if r.req_id in on_time}
            stranded = {
                req_id for model_id, req_id in carriers.items()
                if req_id not in on_time and model_id in models_on_time
            }
            if not stranded:
                return on_time
            set_aside |= stranded

    # ---- which model runs -----------------------------------------------------------------
    def _pick_model_prism(self, view: DeviceView, est: _Estimates, admission: _Admission) -> str | None:
        """Least slack first, where the contenders are
        - each runnable model with decodes: the least slack of its decoding requests;
        - the prefill pipeline: prefills still pending that Moore-Hodgson has on time (running
          ones and on-time waiting ones of runnable models) back to back in EDD order; its
          slack is the least of (deadline - completion) over it, and it is the model of its
          head that runs. Following EDD, not each prefill's own slack, matters: a long prefill
          with less slack of its own must not jump a short one due earlier, or the set
          Moore-Hodgson promised on time is no longer on time.
        Before that, the head of the pipeline runs at once if its prefill fits into the least
        decode slack: no decode misses its next token, and the prefill is not held back until
        its own deadline draws near (that would add latency for nothing).
        Ties: the model with the earliest-arrived request. When all of it is late, least slack
        still decides: the most late runs first (the deadline order the admission promised).

        Work not on time (feasible-but-dropped, or late) must neither starve nor push the
        above past its deadlines: the first such request in the admission order runs when its
        prefill fits into the least slack of all contenders (slack stealing), and whenever
        there are no contenders. Slack stealing alone starves it where other models decode
        without pause (their slack never holds a prefill), so waiting work late by
        (late_contender_ttft_multiple - 1) TTFT SLOs is overdue: each model with such work is
        a contender with its least slack (the most late runs first).
        """
        runnable = [r for r in view.requests if r.model_id in est.resident]
        if not runnable:
            return None
        first_arrival: dict[str, float] = {}
        for r in runnable:
            first_arrival[r.model_id] = min(r.arrival, first_arrival.get(r.model_id, r.arrival))
        contenders: list[tuple[float, float, str]] = []
        for model_id, reqs in _group_by_model(r for r in runnable if _is_decoding(r)).items():
            least = min(self._slack(r, est) for r in reqs)
            contenders.append((least, first_arrival[model_id], model_id))
        decode_slack = min((c[0] for c in contenders), default=math.inf)
        pipeline = sorted(
            (r for r in runnable if not _is_decoding(r) and (r.running or r.req_id in admission.on_time)),
            key=_edd_key,
        )
        if pipeline:
            head_model = pipeline[0].model_id
            contenders.append((self._pipeline_slack(pipeline, est), first_arrival[head_model], head_model))
        overdue = self._overdue(runnable, est, admission)
        for model_id, reqs in overdue.items():
            least = min(self._slack(r, est) for r in reqs)
            contenders.append((least, first_arrival[model_id], model_id))
        # Serve the next on-time prefill at once when that makes no decode miss its next token:
        # waiting until its own slack is the least would only add latency to its first token.
        # Not while work is overdue: a stream of such prefills could postpone it without end.
        if pipeline and not overdue and self._prefill_s(pipeline[0], est) <= decode_slack:
            return head_model
        spare = min(contenders)[0] if contenders else math.inf
        rest_head = next(
            (r for r in admission.order if r.req_id not in admission.on_time and r.model_id in est.resident),
            None,
        )
        if rest_head is not None and self._prefill_s(rest_head, est) <= spare:
            return rest_head.model_id
        return min(contenders)[2] if contenders else None

    def _rank_beside(self, view: DeviceView, est: _Estimates, run_model: str) -> tuple[str, ...]:
        """The other runnable models to step beside `run_model` when the device runs several per
        turn: least slack first (ties: earliest arrival, then name), and only those whose step
        makes no decode in the turn miss its next token. A turn lasts as long as its longest
        step, so a long step beside a model's decodes delays them; a model left out runs in a
        later turn."""
        least: dict[str, tuple[float, float]] = {}
        urgent: dict[str, RequestView] = {}
        for r in view.requests:
            if r.model_id in est.resident and r.model_id != run_model:
                key = (self._slack(r, est), r.arrival)
                if key < least.get(r.model_id, (math.inf, math.inf)):
                    least[r.model_id], urgent[r.model_id] = key, r
        decodes = _group_by_model(r for r in view.requests if _is_decoding(r))
        in_turn, chosen = [run_model], []
        for model_id in sorted(least, key=lambda m: (least[m], m)):
            r = urgent[model_id]
            step = est.decode_step_s.get(model_id, 0.0) if _is_decoding(r) else self._prefill_s(r, est)
            delayed = [d for m in in_turn for d in decodes.get(m, ())]
            if all(step - est.decode_step_s.get(d.model_id, 0.0) <= self._slack(d, est) for d in delayed):
                chosen.append(model_id)
                in_turn.append(model_id)
        return tuple(chosen)

    def _overdue(self, runnable: list[RequestView], est: _Estimates,
                 admission: _Admission) -> dict[str, list[RequestView]]:
        """Waiting work outside the on-time set that is late by (multiple - 1) TTFT SLOs or
        more (a first token: waited `late_contender_ttft_multiple` x its TTFT SLO), by model.
        It contends like on-time work from then on: slack stealing alone can starve it."""
        bound = self.config.late_contender_ttft_multiple - 1.0
        return _group_by_model(
            r for r in runnable
            if not r.running and r.req_id not in admission.on_time
            and est.now - next_deadline(r) >= bound * r.slo.ttft_s
        )

    def _pipeline_slack(self, pipeline: list[RequestView], est: _Estimates) -> float:
        """How long prefills run back to back in this order could all wait and still be on time,
        each taking its likely-worst time (the estimate times the measured prefill margin:
        calibration.py), so that a pipeline started just in time is not late whenever a step
        runs longer than its estimate."""
        slack, finish = math.inf, est.now
        for r in pipeline:
            finish += self._prefill_s(r, est) * self._prefill_margin(r.model_id)
            slack = min(slack, next_deadline(r) - finish)
        return slack

    def _prefill_margin(self, model_id: str) -> float:
        margin = getattr(self.cost, "prefill_margin", None)  # cost models that measure their spread
        return 1.0 if margin is None else margin(model_id)

    def _pick_model_fcfs(self, view: DeviceView, est: _Estimates) -> str | None:
        runnable = [r for r in view.requests if r.model_id in est.resident]
        if not runnable:
            return None
        return min(runnable, key=_arrival_key).model_id

    def _pick_model_round_robin(self, view: DeviceView, est: _Estimates) -> str | None:
        """Among the resident models with work, the one whose last step is oldest (never ran:
        first); ties: the model with the earliest-arrived request, then by name. Each model
        with work thus gets one step in turn, whatever the others decode."""
        first_arrival: dict[str, tuple] = {}
        for r in view.requests:
            if r.model_id in est.resident:
                key = _arrival_key(r)
                first_arrival[r.model_id] = min(key, first_arrival.get(r.model_id, key))
        if not first_arrival:
            return None
        last_step = {m.model_id: m.last_step for m in view.models}
        return min(first_arrival, key=lambda m: (last_step[m], first_arrival[m], m))


def _group_by_model(requests: Iterable[RequestView]) -> dict[str, list[RequestView]]:
    groups: dict[str, list[RequestView]] = {}
    for r in requests:
        groups.setdefault(r.model_id, []).append(r)
    return groups


def _per_model(order: Iterable[RequestView]) -> dict[str, tuple[str, ...]]:
    """The device-wide admission order projected onto each model (relative order kept)."""
    return {model_id: tuple(r.req_id for r in reqs) for model_id, reqs in _group_by_model(order).items()}


__all__ = [
    "POLICIES",
    "LocalPolicy",
    "LocalScheduler",
    "LocalSchedulerConfig",
    "next_deadline",
    "num_tokens_to_prefill",
]
