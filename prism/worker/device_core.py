"""One device, many models: the step flow that the real device worker and the simulator's
devices share.

Mechanism only: each step the device shows the local scheduler a snapshot (DeviceView) and
carries out its decision (evict, activate, admission order, which model steps). What differs
between a real device and a simulated one is only how engines are built (weights on a GPU, or
page counts and a cost model) and what a step costs in time (the clock); `DeviceCore` is the
rest, written once. Torch-free: the engines bring torch in where they need it.
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field

from prism.config import DeviceConfig, ModelSpec
from prism.engine.executor import ModelSizes
from prism.engine.output_processor import TokenEvent
from prism.engine.scheduler import VictimChooser
from prism.engine.sequence import Sequence
from prism.memory.page_pool import Owner, PagePool
from prism.sched.calibration import CalibratedCost
from prism.sched.clock import Clock
from prism.sched.cost import ModelProfile, ProfileCostModel
from prism.sched.local import LocalScheduler, LocalSchedulerConfig, Pace
from prism.sched.rates import TokenRateTracker
from prism.sched.view import SLO, CostModel, DeviceView, StepDecision
from prism.types import CompletionOutput, RequestError, SamplingParams
from prism.worker import messages as msg
from prism.worker.engine_protocol import DeviceEngine
from prism.worker.metrics import DeviceCounters, MetricsLog
from prism.worker.views import DeviceViews, request_view


@dataclass(frozen=True)
class WorkerConfig:
    device: DeviceConfig
    models: tuple[ModelSpec, ...]
    scheduler: LocalSchedulerConfig = field(default_factory=LocalSchedulerConfig)
    metrics_path: str | None = None
    sample_interval_s: float = 0.1
    detokenize: bool = True  # False when a frontend detokenizes (the server)
    metrics_keep_last: int = 10_000  # request and sample lines kept in memory (0: none)
    # A folder (under /dev/shm) where the workers of one node share host copies of weights,
    # one file per model; None: each worker keeps its own copies in its own memory.
    host_copy_dir: str | None = None
    # CPU devices of this node that run models (each its own worker process): a CPU worker
    # takes its share of the node's cores for torch's threads, not all of them each.
    cpu_workers_on_node: int = 1


@dataclass
class StepOutput:
    events: list[TokenEvent]
    finished: list[tuple[str, CompletionOutput]]  # (model_id, output)
    ran_model: str | None
    num_tokens: int = 0  # tokens the step computed


@dataclass
class Launch:
    """One model's step launched at its own pace: when, how long its call held the host
    thread, and its cost terms (a worker's step log has a line per launch)."""
    model_id: str
    started: float
    took_s: float
    terms: tuple[int, ...]
    seqs: int


class DeviceCore(ABC):
    """Many engines on one PagePool, driven by the local scheduler. Subclasses say how an
    engine is built (`_new_engine`, preempting through `_victim_chooser`) and how big a
    model's weights are before it is built (`_weight_bytes`)."""

    def __init__(self, config: WorkerConfig, clock: Clock, pool: PagePool, cost: CostModel,
                 profiles: dict[str, ModelProfile] | None = None):
        if not config.models:
            raise ValueError("a device worker needs at least one model")
        self.config = config
        self.clock = clock
        self.pool = pool
        self.profiles = cost  # the base estimates; `cost` corrects them from measured steps
        self.cost = CalibratedCost(self.profiles)
        self._profiles = profiles or {}  # by model source, measured by `prism profile`
        self.local = LocalScheduler(config.scheduler, self.cost)
        # The requests reaching this device, per model (the same tracker the frontend keeps):
        # MuxServe's quotas follow them.
        self.arrivals = TokenRateTracker(config.scheduler.rate_window_s)
        self.metrics = MetricsLog(config.metrics_path, config.sample_interval_s, config.metrics_keep_last)
        self.counters = DeviceCounters()
        # Activated / Evicted, as they happen (frontend-ordered or the local scheduler's own),
        # for the cluster layer: what it knows of residency comes from these.
        self._notices: list[msg.Activated | msg.Evicted] = []
        self.engines: dict[str, DeviceEngine] = {}
        self.specs: dict[str, ModelSpec] = {}
        self.last_used: dict[str, float] = {}
        self.last_step: dict[str, float] = {}  # when each model last ran a step (absent: never)
        self.draining: set[str] = set()
        self._sizes: dict[str, ModelSizes] = {}
        # Bookkeeping that keeps a step's cost independent of how many idle models the device
        # holds: every change to an engine goes through this class, which marks the model
        # touched; views, the busy set and pending events are refreshed only for those.
        self.views = DeviceViews(self.engines, self._sizes, self.last_used, self.last_step, pool,
                                 config.device.device_id)
        self._paused: set[str] = set()  # models whose admission is paused
        self._with_events: set[str] = set()  # engines that may hold undrained token events
        # At its own pace, each step launched (its cost terms), kept only for a step log that asks
        self.record_launches = False
        self._launches: list[Launch] = []
        self._finished_early: list[tuple[str, CompletionOutput]] = []  # read while evicting: next step's
        self._in_flight: set[str] = set()  # models whose last launched step is unread (overlap)
        self._beside_last = -1  # registration rank of the last model stepped beside another

    # ---- what subclasses provide ---------------------------------------------------------
    @abstractmethod
    def _weight_bytes(self, spec: ModelSpec) -> int: ...

    @abstractmethod
    def _new_engine(self, spec: ModelSpec) -> DeviceEngine: ...

    # ---- models ----------------------------------------------------------------------------
    def _register_all(self) -> None:
        try:
            for spec in self.config.models:
                self._register(spec)
        except BaseException:
            self.close()
            raise
        self._notices.clear()  # what loading moved aside is in the start-up message (Ready)

    def _register(self, spec: ModelSpec) -> None:
        if spec.name in self.engines:
            raise ValueError(f"model name {spec.name!r} is used twice")
        self._make_room_for_loading(self._weight_bytes(spec))
        engine = self._new_engine(spec)
        self.engines[spec.name] = engine
        self._sizes[spec.name] = engine.sizes
        self.specs[spec.name] = spec
        self.last_used[spec.name] = self.clock.now()
        self.views.add_model(spec.name)
        if isinstance(self.profiles, ProfileCostModel):
            sizes = self.sizes(spec.name)
            self.profiles.set_model_size(spec.name, sizes.weight_bytes, sizes.kv_bytes_per_token)
            profile = self._profiles.get(spec.source)  # measured by `prism profile --model SOURCE`
            if profile is not None:
                self.profiles.add(spec.name, profile)

    def _make_room_for_loading(self, weight_bytes: int) -> None:
        # Loading needs the weights mapped: models registered earlier step aside (they keep
        # host copies), oldest first, until the new weights fit.
        needed = -(-weight_bytes // self.pool.page_size)
        for name in list(self.engines):
            if self.pool.free_pages >= needed:
                return
            self.evict(name)

    def _victim_chooser(self, model_id: str) -> VictimChooser:
        """Whom `model_id`'s engine preempts when its KV runs out mid-step: the local
        scheduler's choice."""
        return lambda candidates: self._choose_victim(model_id, candidates)

    def _choose_victim(self, model_id: str, candidates: list[Sequence]) -> Sequence:
        views = [request_view(model_id, s, running=True) for s in candidates]
        chosen = self.local.choose_victim(self.views.model_snapshot(model_id, self.clock.now()), views)
        if chosen is None:
            return candidates[-1]
        return next(s for s in candidates if s.req_id == chosen.req_id)

    @property
    def host_store(self) -> str:
        """Where this device's host copies live ("" private to it; see DeviceMemory)."""
        return self.config.host_copy_dir or ""

    def sizes(self, model_id: str) -> ModelSizes:
        return self._sizes[model_id]

    def model_info(self, model_id: str) -> msg.ModelInfo:
        """What the frontend (or the simulated cluster) learns of a model when the device starts."""
        e, s = self.engines[model_id], self._sizes[model_id]
        g = e.kv_geometry
        return msg.ModelInfo(model_id, e.max_model_len, s.vocab_size, s.weight_bytes,
                             s.kv_bytes_per_token, e.resident, g.pages_per_kv_page, g.tokens_per_page)

    def resident_models(self) -> list[str]:
        return [m for m, e in self.engines.items() if e.resident]

    def evict(self, model_id: str, mode: str = "preempt") -> None:
        """preempt: running requests are preempted now and recomputed after reactivation.
        drain (a migration's source): every request the model holds, waiting ones too, is
        served, then the model is evicted. The frontend sends it no new ones meanwhile;
        pausing admission instead would strand the waiting ones until a re-activation."""
        engine = self._engine(model_id)
        if not engine.resident:
            return
        if mode == "drain" and engine.has_unfinished:
            self.draining.add(model_id)
            return
        if mode not in ("preempt", "drain"):
            raise ValueError(f"unknown eviction mode {mode!r} (preempt or drain)")
        preempted = engine.evict()
        # Overlap: the step in flight was read first; requests it ended are reported now.
        early = [(model_id, out) for out in engine.take_finished_early()]
        self._finished_early += early
        self._in_flight.discard(model_id)
        self._after_engine_change(model_id, early)
        self.counters.preemptions[model_id] += len(preempted)
        self.counters.evictions[model_id] += 1
        self._notices.append(msg.Evicted(model_id, len(preempted)))
        self.draining.discard(model_id)
        self._pause(model_id, False)

    def set_kv_cap(self, model_id: str, max_pages: int | None) -> None:
        """A fixed KV share for a model (the static baseline); None lifts it."""
        self.pool.set_cap(Owner(model_id, "kv"), max_pages)

    def activate(self, model_id: str) -> bool:
        engine = self._engine(model_id)
        if engine.resident:
            return True
        if self.pool.free_pages < self.sizes(model_id).weight_pages:
            return False
        start = self.clock.now()
        engine.activate()
        self._touch(model_id)
        self.counters.activations[model_id] += 1
        self.counters.activation_seconds[model_id] += self.clock.now() - start
        self._notices.append(msg.Activated(model_id))
        return True

    def take_launches(self) -> list[Launch]:
        """The steps launched at their own pace since the last call, in order, while
        `record_launches` is on (the step log)."""
        launches, self._launches = self._launches, []
        return launches

    def take_notices(self) -> list[msg.Activated | msg.Evicted]:
        """The residency changes since the last call, in order (for the frontend)."""
        notices, self._notices = self._notices, []
        return notices

    def drop_host_copy(self, model_id: str) -> None:
        """Free a model's host copy: its next activation after an eviction reads its source."""
        self._engine(model_id).drop_host_copy()

    def _engine(self, model_id: str) -> DeviceEngine:
        try:
            return self.engines[model_id]
        except KeyError:
            raise RequestError(
                f"unknown model {model_id!r}; this device serves: {', '.join(self.engines)}"
            ) from None

    # ---- requests --------------------------------------------------------------------------
    def add_request(
        self, model_id: str, prompt: str | list[int], params: SamplingParams = SamplingParams(),
        req_id: str | None = None, slo: SLO | None = None, priority: int = 0,
        arrival: float | None = None,
    ) -> str:
        """`arrival`: when the request reached the frontend, on this device's clock (None:
        now); its deadlines, its place in arrival order and its TTFT count from then. Never
        later than now."""
        engine = self._engine(model_id)
        spec = self.specs[model_id]
        slo = slo or SLO(spec.ttft_slo_s, spec.tpot_slo_s)
        if req_id is not None and any(e.has_request(req_id) for e in self.engines.values()):
            raise RequestError(f"request id {req_id!r} is already in use")
        now = self.clock.now()
        arrival = now if arrival is None else min(arrival, now)
        req_id = engine.add_request(prompt, params, req_id=req_id, arrival_time=arrival, slo=slo,
                                    priority=priority)
        self.last_used[model_id] = now
        self.arrivals.record(model_id, now, 0)  # the rate of what reaches this device, in order
        self._touch(model_id)
        return req_id

    def abort(self, req_id: str) -> bool:
        for model_id, engine in self.engines.items():
            if engine.has_request(req_id):
                engine.abort(req_id)
                self.views.forget_request(req_id)
                self._touch(model_id)
                self._with_events.add(model_id)
                return True
        return False

    @property
    def has_unfinished(self) -> bool:
        self.views.refresh()
        return bool(self.views.busy or self._finished_early)

    # ---- bookkeeping -----------------------------------------------------------------------
    def _touch(self, model_id: str) -> None:
        self.views.touch(model_id)

    def _pause(self, model_id: str, paused: bool) -> None:
        self.engines[model_id].pause_admission(paused)
        (self._paused.add if paused else self._paused.discard)(model_id)

    def _in_order(self, models) -> list[str]:
        return self.views.in_order(models)

    # ---- stepping --------------------------------------------------------------------------
    def step(self) -> StepOutput:
        self._finish_drains()
        view = self.snapshot()
        decision = self.local.decide(view)
        paused = set(decision.drain)
        for model_id in self._paused ^ paused:
            self._pause(model_id, model_id in paused)
        for model_id in decision.evict:
            self.evict(model_id)
        for model_id in decision.activate:
            self.activate(model_id)
        for model_id, order in decision.admit_order.items():
            self.engines[model_id].reorder_waiting(list(order))
        finished, self._finished_early = self._finished_early, []
        # The policy cannot see whether a model's next batch fits in memory: if the chosen
        # model can do nothing now (say its prefill waits for pages), the step goes to another
        # model with work, so the device never idles (or livelocks) while work exists.
        self.views.refresh()
        run = decision.run_model
        candidates = [run] if run is not None else []
        candidates += [m for m in self._in_order(self.views.busy) if m != run and self.engines[m].resident]
        steps = self._step_at_own_pace if self.own_pace else self._step_in_turn
        done, run, num_tokens = steps(candidates, decision)
        finished += done
        events = [ev for m in self._in_order(self._with_events) for ev in self.engines[m].drain_events()]
        self._with_events.clear()
        for model_id, out in finished:
            self.metrics.record_request(model_id, out.req_id, out.finish_reason.value, out.metrics)
        self._maybe_sample()
        return StepOutput(events, finished, run, num_tokens)

    @property
    def own_pace(self) -> bool:
        """Each model steps again as soon as its own last step is done (LocalSchedulerConfig.pace)."""
        return self.config.scheduler.pace is Pace.OWN

    def _step_in_turn(self, candidates: list[str], decision: StepDecision) -> tuple[list, str | None, int]:
        """One turn: the first candidate with work steps (and, with concurrent_models > 1, others
        beside it); the other models' steps still in flight are read. (finished, ran, tokens)"""
        finished, num_tokens, run = [], 0, decision.run_model
        self._begin_turn()
        for model_id in candidates:
            if not self.engines[model_id].resident:
                continue
            # (With overlap a step that launches nothing may still read the last one's tokens.)
            done, num_tokens = self._step_model(model_id, decision.token_budget.get(model_id))
            finished += done
            if num_tokens:
                run = model_id
                break
        launched = {run}
        if run is not None and self.config.scheduler.concurrent_models > 1:
            done, more, side = self._step_beside(run, candidates, decision.beside)
            finished, num_tokens, launched = finished + done, num_tokens + more, launched | side
        finished += self._read_others_in_flight(launched)
        return finished, run, num_tokens

    def _step_at_own_pace(self, candidates: list[str], decision: StepDecision) -> tuple[list, str | None, int]:
        """Every candidate whose last step is over steps now (its tokens read, its next step
        launched), in the policy's order; one whose step still runs is passed over, never
        waited for. (finished, the first model that launched tokens, tokens launched)"""
        finished, ran, num_tokens = [], None, 0
        for model_id in candidates:
            engine = self.engines[model_id]
            if not engine.resident or not engine.in_flight_done:
                continue
            done, n = self._step_model(model_id, decision.token_budget.get(model_id))
            finished += done
            if n:
                num_tokens += n
                ran = ran or model_id
        return finished, ran, num_tokens

    def _step_model(self, model_id: str, budget: int | None = None) -> tuple[list[tuple[str, CompletionOutput]], int]:
        """One step of `model_id` (`budget`: its tokens, the local scheduler's; None: the engine's).
        At its own pace its last step is over (only such models step), so its tokens are read
        before the next one is launched: launched first, they would go out only once that
        launch returns (an eager prefill holds the host for milliseconds). In turn the launch
        comes first and overlaps the step still running."""
        engine = self.engines[model_id]
        before = engine.num_preemptions
        early = engine.read_in_flight() if self.own_pace else []
        start = self.clock.now()
        finished = [(model_id, out) for out in early + (engine.step() if budget is None else engine.step(budget))]
        (self._in_flight.add if engine.has_in_flight else self._in_flight.discard)(model_id)
        self._after_engine_change(model_id, finished)
        self.counters.preemptions[model_id] += engine.num_preemptions - before
        plan = engine.last_plan
        if plan is not None and not plan.is_empty:
            now = self.clock.now()
            self.last_used[model_id] = self.last_step[model_id] = now
            if self.own_pace and self.record_launches:
                self._launches.append(Launch(model_id, start, now - start, tuple(plan.cost_terms()), len(plan.chunks)))
            # Steps side by side share the chip and read each other's turns: their wall times
            # are not one model's step, so the estimates keep their profiles then (at its own
            # pace a step is read only once done: its call is its host time alone).
            if self.config.scheduler.concurrent_models == 1 and not self.own_pace:
                self.cost.observe_step(model_id, plan.cost_terms(), now - start)
        return finished, engine.last_step_num_tokens

    def _step_beside(self, run: str, candidates: list[str], chosen: tuple[str, ...] | None) -> tuple[list, int, set[str]]:
        """Other models with work, stepped in the same turn as `run` (concurrent_models): those
        the policy chose, in its order; if it chose none (None), in turn after the last one
        that went beside, so every busy model gets its share."""
        # (Those before `run` in the candidates had nothing to run this turn.)
        others = [m for m in candidates[candidates.index(run) + 1:] if self.engines[m].resident]
        if not others:
            return [], 0, set()
        if chosen is None:
            start = next((i for i, m in enumerate(others) if self.views.rank(m) > self._beside_last), 0)
            order = others[start:] + others[:start]
        else:
            order = [m for m in chosen if m in others]
        finished, num_tokens, side = [], 0, set()
        for model_id in order[: self.config.scheduler.concurrent_models - 1]:
            done, n = self._step_model(model_id)
            finished += done
            if n:
                num_tokens += n
                side.add(model_id)
                self._beside_last = self.views.rank(model_id)
        return finished, num_tokens, side

    def _begin_turn(self) -> None:  # noqa: B027 (a hook: a real device has nothing to do)
        """A turn's steps start (the simulated device charges steps run side by side as one)."""

    def _read_others_in_flight(self, launched: set[str | None]) -> list[tuple[str, CompletionOutput]]:
        """Read the tokens of other models' steps still in flight: queued before the steps just
        launched, they are done or nearly, and their requests must not wait until their model
        runs again."""
        finished = []
        for model_id in self._in_order(self._in_flight - launched):
            mine = [(model_id, out) for out in self.engines[model_id].read_in_flight()]
            self._after_engine_change(model_id, mine)
            finished += mine
        self._in_flight &= launched
        return finished

    def _after_engine_change(self, model_id: str, finished: list[tuple[str, CompletionOutput]]) -> None:
        self._touch(model_id)
        self._with_events.add(model_id)
        for _, out in finished:
            self.views.forget_request(out.req_id)

    def _finish_drains(self) -> None:
        for model_id in list(self.draining):
            if not self.engines[model_id].has_unfinished:
                self.evict(model_id)

    def run_until_idle(self, max_steps: int = 1_000_000) -> list[tuple[str, CompletionOutput]]:
        """Step until every request has finished (tests, offline batches)."""
        done = []
        for _ in range(max_steps):
            if not self.has_unfinished and not self.draining:
                return done
            done += self.step().finished
        raise RuntimeError(f"still busy after {max_steps} steps")

    # ---- snapshots for the policy ----------------------------------------------------------
    def snapshot(self) -> DeviceView:
        now = self.clock.now()
        rates = self.arrivals.request_rates(now) if self.local.needs_request_rates else {}
        return self.views.snapshot(now, rates)

    def _maybe_sample(self) -> None:
        now = self.clock.now()
        if not self.metrics.due(now):
            return
        self.metrics.record_sample(self.memory_report(now))

    def memory_report(self, now: float | None = None) -> msg.DeviceMemory:
        return self.views.memory_report(self.clock.now() if now is None else now, self.counters, self.host_store)

    def close(self) -> None:
        for engine in self.engines.values():
            engine.close()
        self.engines.clear()  # in place: the views read this same dict
        self.metrics.close()
        self.pool.close()

