"""A simulated device: the real device step flow (DeviceCore) over simulated engines (the
real engine core over a simulated executor: prism.sim.engine).

Like a worker process it drains its inbox (the same message handler, prism.worker.commands),
then runs one step; unlike one, its clock is its own ManualClock, which an activation's copy
and each step's forward pass move forward. The cluster (prism.sim.cluster) wakes it when the
step ends, when a message comes, or when a scheduling timer (idle eviction) falls due.

With models stepping at their own pace (pace "own"), a step does not move the device's clock:
each model's step is done on its own timeline (its host time, then its device time shared with
the other models' steps: SharedChip), and the device wakes when the first of them is done, to
read its tokens and launch that model's next step.
"""
from __future__ import annotations

import math
import time

from prism.config import ModelSpec
from prism.engine.core import EngineCore
from prism.memory.page_pool import PagePool
from prism.sched.clock import ManualClock
from prism.sched.cost import DefaultCosts, ModelProfile, ProfileCostModel
from prism.sched.view import CostModel
from prism.sched.concurrency import ContentionRule, SharedChip
from prism.sim.costs import ColdShapes, ConcurrentTurn, HostOverheads, card_defaults
from prism.sim.engine import sim_engine
from prism.sim.executor import CountingBackend
from prism.sim.shapes import ModelShape
from prism.worker.commands import handle
from prism.worker.device_core import DeviceCore, StepOutput, WorkerConfig


class SimDevice(DeviceCore):
    """`truth`: what steps take here (the simulation's device). `policy_profiles`: the
    measured profiles a real worker of this device would plan with (by model source); models
    without one are planned from the card's nominal rates, as on a real worker, and the
    calibration learns the difference from each step. `policy_cost` replaces all that with a
    given cost model (as DeviceWorker's `cost` argument does). `gpus`: the GPUs the device
    stands for (a tensor-parallel group in the planner). `concurrent_rates`: one GPU's rates
    that steps side by side are charged at (ProfileSet.concurrent_rates; default the card's
    nominal ones), and `contention_rule` how they contend (ProfileSet.contention_rule);
    `interleave`: at their own pace, steps' layers take turns instead (ProfileSet.interleave)."""

    def __init__(self, config: WorkerConfig, shapes: dict[str, ModelShape], truth: CostModel,
                 policy_profiles: dict[str, ModelProfile], start: float = 0.0,
                 policy_cost: CostModel | None = None, host: HostOverheads = HostOverheads(),
                 host_copies: set[str] | None = None, gpus: int = 1,
                 concurrent_rates: DefaultCosts | None = None,
                 contention_rule: ContentionRule = ContentionRule.ONE_BUDGET, interleave: float | None = None):
        dev = config.device
        pool = PagePool(CountingBackend(dev.page_size), dev.num_pages, num_spare_pages=0)
        cost = policy_cost or ProfileCostModel(defaults=card_defaults(dev.device))
        super().__init__(config, ManualClock(start), pool, cost, policy_profiles)
        self.shapes = shapes  # by model name
        self.truth = truth
        self.host = host
        self.cold = ColdShapes(host.cold_shape_s)  # kernels are loaded once per device process
        # Steps of several models in one turn are charged as one (concurrent_models > 1); at
        # their own pace, models share the chip step by step instead.
        own = self.own_pace
        concurrent = config.scheduler.concurrent_models > 1 and not own
        rates = concurrent_rates or card_defaults(dev.device)
        self.turn = ConcurrentTurn(rates, gpus, contention_rule) if concurrent else None
        self.chip = SharedChip(rates, gpus, contention_rule, host.one_host_thread, interleave) if own else None
        self.device_id = dev.device_id
        # The models whose weights this device's node holds in host memory: one set shared by
        # the node's devices, as the node's workers share one copy (None: every copy at hand).
        self.host_copies = host_copies
        self._register_all()

    # ---- DeviceCore ----------------------------------------------------------------------------
    def _weight_bytes(self, spec: ModelSpec) -> int:
        return self.shapes[spec.name].weight_bytes

    def _new_engine(self, spec: ModelSpec) -> EngineCore:
        return sim_engine(spec, self.shapes[spec.name], self.pool, self.clock, self.truth,
                          self._victim_chooser(spec.name), self.host, self.cold, self.host_copies, self.turn,
                          self.chip)

    def _begin_turn(self) -> None:
        if self.turn is not None:
            self.turn.reset()

    @property
    def host_store(self) -> str:
        return "" if self.host_copies is None else f"node:{self.config.device.node}"

    # ---- one wake-up ---------------------------------------------------------------------------
    def run(self, now: float, inbox: list, send) -> tuple[StepOutput, float | None]:
        """Handle the messages that came since the last wake-up ((message, when it came),
        as a worker's inbox dates them), then step once. Returns the
        step's output and when the device should wake next on its own (None: only when a
        message comes). The clock is at the step's end afterwards."""
        if now > self.clock.now():
            self.clock.set(now)
        start = self.clock.now()
        for m, received_at in inbox:  # an activation among them keeps the device busy for the copy
            handle(self, m, send, received_at)
        before = self._residency_marks()
        wall = time.perf_counter()
        out = self.step()
        for notice in self.take_notices():  # activations and evictions, as a worker sends them
            send(notice)
        if self.host.scheduling_scale and out.num_tokens:
            self.clock.advance(self.host.scheduling_scale * (time.perf_counter() - wall))
        progressed = self.clock.now() > start or self._residency_marks() != before
        if self.chip is not None:
            progressed = progressed or bool(out.num_tokens or out.events or out.finished)
            return out, self.clock.now() if progressed and not self._waiting_on_steps() else self.quiet_wake()
        if out.num_tokens or progressed:
            return out, self.clock.now()  # it worked (or made room): go on at once
        return out, self._next_timer()

    def quiet_wake(self) -> float | None:
        """When the device should next wake with nothing to do now: when a scheduling timer
        falls due or, at their own pace, when the first model's step in flight is done."""
        timer = self._next_timer()
        if self.chip is None:
            return timer
        done = [e.executor.last_launched.done for e in self.engines.values() if e.has_in_flight]
        due = min(done + ([] if timer is None else [timer]), default=None)
        return None if due is None else max(due, self.clock.now())

    def _waiting_on_steps(self) -> bool:
        """Every model with work is resident with a step running (at their own pace): nothing
        to do before the first of them is done. A model with work that is not resident may
        be activated now that something changed (an eviction made room)."""
        self.views.refresh()
        return all(self.engines[m].resident and not self.engines[m].in_flight_done for m in self.views.busy)

    def _residency_marks(self) -> tuple:
        c = self.counters
        return (sum(c.activations.values()), sum(c.evictions.values()), len(self.draining))

    def _next_timer(self) -> float | None:
        """When the local scheduler's idle rules may next decide differently with nothing else
        happening: a resident model without requests reaching swap_idle_s or idle_evict_s."""
        cfg = self.config.scheduler
        views = self.views.model_views()
        now = self.clock.now()
        due = math.inf
        for m, view in views.items():
            if not view.resident or m in self.views.busy:
                continue
            for limit in (cfg.swap_idle_s, cfg.idle_evict_s):
                t = self.last_used[m] + limit
                if now < t < due:
                    due = t
        return None if math.isinf(due) else due
