"""The global (cluster) scheduler: which models are resident on which device.

Prism's rule is to keep the KV pressure ratio even across devices:

    KVPR(d) = sum over models m on d of rate(m) * kv_bytes_per_token(m) / tpot_slo(m)
              ------------------------------------------------------------------
                          memory_bytes(d) - weight bytes of the models on d

The numerator is how fast the models on d need KV memory to keep their decodes within their
TPOT SLOs; the denominator is the memory left for KV once the weights are in. A device with a
high ratio runs out of KV first and starts preempting, so placement puts each model where the
ratio stays lowest, migrates only when that clearly evens things out, and evicts idle models.

Pure policy: it reads a `ClusterView` (time is `view.now`) and returns decisions; the server
and the simulator carry them out. The only state kept here is the time of the last periodic
pass, per-model migration cooldowns, and since when each model has been on each device.

Choices where the brief is silent:
- "On a device" means resident or activating (`DeviceState.hosted`): an activating model's
  weights are already reserved and its traffic is on its way, so it counts in full.
- Weights fit on d when memory_bytes - weights already on d - weight_bytes(m) >=
  kv_headroom_fraction * memory_bytes. Current KV use does not count against a fit: KV is
  elastic (the local scheduler preempts under pressure), weights are not. The headroom keeps
  a model from landing where it could not hold a single batch of KV.
- Choosing a device compares the KVPR it would have *with* the model (the greedy step that
  keeps the maximum low, and it sees both the model's own demand and the memory its weights
  take). Ties, e.g. when nothing has traffic yet: the device with the most memory left for
  KV, then device_id, so models spread out instead of piling onto the first device.
- on_request prefers a device with room as it is; idle models are evicted ("make-room") only
  when no allowed device has room, since an eviction costs a re-activation when that model's
  next request comes.
- Nodes (host_copies.py): among the devices on_request may choose, those whose KVPR with the
  model is within `migration_threshold` of the lowest count as equally good for pressure, and
  the one the model is activated on soonest wins (its node holds the host copy: a copy in,
  no read from storage); then the landing key as above. Not a hard rule: a device whose
  KVPR is lower by more than the threshold wins even if its node must read storage first,
  since anywhere else the model would be a migration candidate at once. On one node every
  device costs the same and the choice is the landing key's.
- Idle means no pending requests. Idle for eviction counts from the later of the model's last
  request and the time this scheduler first saw (or put) it on the device, so a model placed
  before any traffic gets `idle_evict_s` of grace like everyone else.
- A pinned model lives only on its pinned device; it can still be evicted when idle.
- Idle evictions of a periodic pass count as freed memory for that pass's migrations. They
  happen only under `idle_evict: always`; under "pressure" (the default) an idle model stays
  until an activation needs its memory (make-room here, or the device's own residency rules,
  which also evict for KV demand): an eviction nobody needed makes its next request pay the
  weight copy.
- Among moves with the same gain (moving a model off the hottest device often leaves the
  same maximum whichever cooler device takes it), the cheaper move wins (a migration is an
  eviction plus an activation on the target: cheaper where the target's node holds the host
  copy), then the one that leaves the target with the lower KVPR; then source device_id,
  model_id, target device_id.
- make-room victims go least recently used first: by the later of the last request and the
  time this scheduler noted the model on the device (never requested, never noted: first).
- `Migrate` means: activate on `to_device`; the source keeps serving until the target is
  resident, then drains (serves every request it holds, takes no new one) and is evicted
  (ClusterControl carries this out; the source is `DeviceState.draining` meanwhile). `route`
  sends new requests to the resident, not draining copy with the lower KVPR, so no request
  waits at a source that is leaving.
"""
from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass, replace

from typing import Annotated, Literal

from pydantic import Field

from prism.config import NonNegFloat, NonNegInt, PosFloat, check_fields

from prism.sched.global_view import ClusterView, DeviceState, ModelInfo
from prism.sched.host_copies import activation_seconds, migration_seconds
from prism.sched.residency import IDLE_EVICT, IDLE_EVICT_S, IdleEvict

EVICT_REASONS = ("idle", "make-room", "migration")


@dataclass(frozen=True)
class GlobalSchedulerConfig:
    rate_window_s: PosFloat = 60.0  # the window of the token rates the server feeds the view
    # The simulator only: a placement made once at start (and static KV shares) goes by the
    # request rates measured over this first stretch of the trace. (The server has no trace
    # ahead of it: it goes by the config's `rate:`, else equal rates.)
    placement_window_s: PosFloat = 60.0
    # The placement at start: "kvpr" (prism's: the lowest KV pressure) or "muxserve" (MuxServe's
    # greedy over computation demand, `muxserve_placement`)
    placement: Literal["kvpr", "muxserve"] = "kvpr"
    idle_evict_s: NonNegFloat = IDLE_EVICT_S  # a model with no pending requests and no request this long...
    # ...is evicted by periodic(): "always", or "pressure": never there; only when memory is
    # wanted (on_request's make-room here, KV demand and activations on the device).
    idle_evict: IdleEvict = IDLE_EVICT
    placement_period_s: NonNegFloat = 10.0  # periodic() does its work at most this often
    # Migrate only if it lowers max(KVPR(src), KVPR(dst)) by more than this fraction.
    migration_threshold: NonNegFloat = 0.2
    migration_cooldown_s: NonNegFloat = 60.0  # per model, after a migration
    max_migrations_per_period: NonNegInt = 1
    # of a device's memory, kept free for KV when weights "fit"
    kv_headroom_fraction: Annotated[float, Field(ge=0, lt=1)] = 0.05

    def __post_init__(self) -> None:
        check_fields(self)  # the bounds and choices of the field types above


# ---- decisions -----------------------------------------------------------------------------
@dataclass(frozen=True)
class Activate:
    model_id: str
    device_id: str


@dataclass(frozen=True)
class Evict:
    model_id: str
    device_id: str
    reason: str  # one of EVICT_REASONS

    def __post_init__(self) -> None:
        if self.reason not in EVICT_REASONS:
            raise ValueError(f"unknown eviction reason {self.reason!r}; use one of {EVICT_REASONS}")


@dataclass(frozen=True)
class Migrate:
    model_id: str
    from_device: str
    to_device: str


# ---- KV pressure ----------------------------------------------------------------------------
def _models_on(device: DeviceState, extra: str | None, without: str | None) -> list[str]:
    models = [m for m in device.hosted if m != without]
    if extra is not None and extra not in models:
        models.append(extra)
    return models


def kv_demand(model_id: str, view: ClusterView) -> float:
    """How fast `model_id` needs KV memory to decode within its TPOT SLO."""
    info = view.models[model_id]
    return view.rate(model_id) * info.kv_bytes_per_token / info.tpot_slo_s


def kv_free_bytes(device: DeviceState, view: ClusterView, extra: str | None = None,
                  without: str | None = None) -> int:
    """Memory left for KV once the weights on `device` (with/without one model) are in."""
    weights = sum(view.models[m].weight_bytes for m in _models_on(device, extra, without))
    return device.memory_bytes - weights


def kvpr(device: DeviceState, view: ClusterView, extra: str | None = None,
         without: str | None = None) -> float:
    """KV pressure ratio of `device`, optionally as if `extra` were added and/or `without`
    removed; +inf when the weights leave no memory for KV."""
    free = kv_free_bytes(device, view, extra, without)
    if free <= 0:
        return math.inf
    return sum(kv_demand(m, view) for m in _models_on(device, extra, without)) / free


def relative_gain(before: float, after: float) -> float:
    """The fraction by which `after` is lower than `before` (0 when it is not lower)."""
    if not after < before:
        return 0.0
    if math.isinf(before):
        return 1.0  # from no KV room at all to some: as good as it gets
    return (before - after) / before


# ---- hypothetical device states -------------------------------------------------------------
def _with_model(device: DeviceState, model_id: str) -> DeviceState:
    return replace(device, activating=device.activating + (model_id,))


def _without_models(device: DeviceState, model_ids: Iterable[str]) -> DeviceState:
    gone = set(model_ids)
    return replace(
        device,
        resident=tuple(m for m in device.resident if m not in gone),
        activating=tuple(m for m in device.activating if m not in gone),
    )


def _ready(device: DeviceState) -> list[str]:
    """Resident, not (also) activating and not draining: the models that serve new requests
    and that a decision may evict or move."""
    return sorted(m for m in device.resident if _serves(device, m))


def _serves(device: DeviceState, model_id: str) -> bool:
    return model_id in device.resident and model_id not in device.activating and model_id not in device.draining


# ---- the scheduler --------------------------------------------------------------------------
class GlobalScheduler:
    def __init__(self, config: GlobalSchedulerConfig) -> None:
        self.config = config
        self._last_period: float | None = None
        self._cooldown_until: dict[str, float] = {}  # model -> no migration before this time
        self._on_device_since: dict[tuple[str, str], float] = {}  # (model, device) -> first seen

    # ---- public calls -------------------------------------------------------------------
    def initial_placement(self, view: ClusterView) -> list[Activate]:
        """Every model not yet on a device, in descending weighted rate, to the device where
        its KVPR would be lowest among those its weights fit on. Models that fit nowhere stay
        evicted (their first request retries through `on_request`)."""
        if self.config.placement == "muxserve":
            return self._muxserve_placement(view)
        devices = {d.device_id: d for d in view.devices}
        placed = {m for d in view.devices for m in d.hosted}
        decisions: list[Activate] = []
        for info in sorted(view.models.values(), key=lambda i: _placement_key(i, view)):
            if info.model_id in placed:
                continue
            fitting = [d for d in self._allowed(info, devices.values()) if self._fits(d, view, info)]
            if not fitting:
                continue
            target = min(fitting, key=lambda d: self._landing_key(d, view, info.model_id))
            devices[target.device_id] = _with_model(target, info.model_id)
            decisions.append(Activate(info.model_id, target.device_id))
            self._on_device_since[(info.model_id, target.device_id)] = view.now
        return decisions

    def _muxserve_placement(self, view: ClusterView) -> list[Activate]:
        """MuxServe's greedy placement (Duan et al., ICML 2024, section 3.2; its code's
        `naive_greedy_placement`, muxserve/muxsched/placement.py): models in descending
        computation demand, popularity x size (its rate x rate_scale, the scale growing with
        the parameter count: weight bytes here), each to the device with the least computation
        demand placed on it so far among those its weights fit on; ties: the most memory left,
        then device_id. Left out: its enumeration of GPU mesh groups (devices are given here)
        and its variant that scores each candidate by a throughput estimate."""
        devices = {d.device_id: d for d in view.devices}
        load = {d: 0.0 for d in devices}
        placed = {m for d in view.devices for m in d.hosted}
        decisions: list[Activate] = []
        demand = {i.model_id: i.weight * i.weight_bytes for i in view.models.values()}
        for info in sorted(view.models.values(), key=lambda i: (-demand[i.model_id], i.model_id)):
            if info.model_id in placed:
                continue
            fitting = [d for d in self._allowed(info, devices.values()) if self._fits(d, view, info)]
            if not fitting:
                continue
            target = min(fitting, key=lambda d: (load[d.device_id], -kv_free_bytes(d, view, extra=info.model_id),
                                                 d.device_id))
            devices[target.device_id] = _with_model(target, info.model_id)
            load[target.device_id] += demand[info.model_id]
            decisions.append(Activate(info.model_id, target.device_id))
            self._on_device_since[(info.model_id, target.device_id)] = view.now
        return decisions

    def on_request(self, view: ClusterView, model_id: str) -> list[Activate | Evict]:
        """A request for `model_id` came: if the model is on no device, activate it now on the
        best device with room, evicting idle models there (least recently used first) only
        when no device has room as it is. Busy models are never evicted: if no device can make
        room, return [] and the server retries on its next tick."""
        info = view.models.get(model_id)
        if info is None:
            raise ValueError(f"unknown model {model_id!r}")
        if view.hosts(model_id):
            return []
        options = []
        for device in self._allowed(info, view.devices):
            victims = self._make_room(device, view, info)
            if victims is not None:
                options.append((_without_models(device, victims), victims))
        if not options:
            return []
        with_room = [o for o in options if not o[1]]
        after, victims = self._activation_choice(view, model_id, with_room or options)
        device = view.device(after.device_id)
        self._on_device_since[(model_id, device.device_id)] = view.now
        evicts = [Evict(m, device.device_id, "make-room") for m in victims]
        return [*evicts, Activate(model_id, device.device_id)]

    def periodic(self, view: ClusterView) -> list[Evict | Migrate]:
        """Call every tick; at most once per `placement_period_s` it evicts idle models, then
        makes up to `max_migrations_per_period` migrations that each lower the pressure by
        more than `migration_threshold`."""
        self._note_devices(view)
        if self._last_period is not None and view.now - self._last_period < self.config.placement_period_s:
            return []
        self._last_period = view.now
        evicts = self._idle_evictions(view)
        devices = {d.device_id: d for d in view.devices}
        for e in evicts:
            devices[e.device_id] = _without_models(devices[e.device_id], [e.model_id])
        return [*evicts, *self._migrations(view, devices)]

    def route(self, view: ClusterView, model_id: str) -> str | None:
        """The device that serves a request of `model_id` now: one where it is resident and
        not leaving (the lowest KVPR if several), or None (not ready anywhere: the request
        waits)."""
        ready = [d for d in view.devices if _serves(d, model_id)]
        if not ready:
            return None
        return min(ready, key=lambda d: (kvpr(d, view), d.device_id)).device_id

    # ---- fitting and choosing -----------------------------------------------------------
    def _allowed(self, info: ModelInfo, devices: Iterable[DeviceState]) -> list[DeviceState]:
        return [d for d in devices if info.pinned_device in (None, d.device_id)]

    def _headroom_bytes(self, device: DeviceState) -> float:
        return self.config.kv_headroom_fraction * device.memory_bytes

    def _fits(self, device: DeviceState, view: ClusterView, info: ModelInfo) -> bool:
        return kv_free_bytes(device, view, extra=info.model_id) >= self._headroom_bytes(device)

    def _landing_key(self, device: DeviceState, view: ClusterView, model_id: str) -> tuple:
        # Lowest KVPR with the model; then most memory left for KV; then device_id.
        return (kvpr(device, view, extra=model_id), -kv_free_bytes(device, view, extra=model_id),
                device.device_id)

    def _activation_choice(self, view: ClusterView, model_id: str,
                           options: list[tuple[DeviceState, list[str]]]) -> tuple[DeviceState, list[str]]:
        """Where an on-demand activation goes: among the devices whose KVPR with the model is
        within `migration_threshold` of the lowest, the one it is activated on soonest (its
        node holds the host copy: no read from storage), then the landing key. A device whose
        pressure is lower by more than the threshold wins even at the price of a read from
        storage: placing the model elsewhere would make it a migration candidate at once."""
        best = min(kvpr(d, view, extra=model_id) for d, _ in options)
        near = [o for o in options
                if relative_gain(kvpr(o[0], view, extra=model_id), best) <= self.config.migration_threshold]
        return min(near, key=lambda o: (activation_seconds(view, model_id, o[0]),
                                        self._landing_key(o[0], view, model_id)))

    def _make_room(self, device: DeviceState, view: ClusterView, info: ModelInfo) -> list[str] | None:
        """Idle models to evict from `device` so `info` fits, least recently used first:
        [] if it fits as it is, None if even evicting every idle model would not do."""
        victims: list[str] = []
        idle = sorted(
            (m for m in _ready(device) if view.num_pending(m) == 0),
            key=lambda m: (self._idle_since(view, m, device.device_id), m),
        )
        while not self._fits(_without_models(device, victims), view, info):
            if not idle:
                return None
            victims.append(idle.pop(0))
        return victims

    # ---- idleness -----------------------------------------------------------------------
    def _note_devices(self, view: ClusterView) -> None:
        """Remember since when each model is on each device (for idle time); forget models
        that left."""
        on_now = {(m, d.device_id) for d in view.devices for m in d.hosted}
        for key in on_now:
            self._on_device_since.setdefault(key, view.now)
        for key in [k for k in self._on_device_since if k not in on_now]:
            del self._on_device_since[key]

    def _idle_since(self, view: ClusterView, model_id: str, device_id: str) -> float:
        # periodic() notes every model on a device before it asks; elsewhere a model not yet
        # noted ranks by its last request alone (-inf: never), which keeps LRU order.
        last_request = view.last_request.get(model_id, -math.inf)
        return max(last_request, self._on_device_since.get((model_id, device_id), -math.inf))

    def _idle_evictions(self, view: ClusterView) -> list[Evict]:
        if self.config.idle_evict != "always":
            return []  # under "pressure", idle models go only when their memory is wanted
        return [
            Evict(m, d.device_id, "idle")
            for d in sorted(view.devices, key=lambda d: d.device_id)
            for m in _ready(d)
            if view.num_pending(m) == 0
            and view.now - self._idle_since(view, m, d.device_id) >= self.config.idle_evict_s
        ]

    # ---- migration ----------------------------------------------------------------------
    def _migrations(self, view: ClusterView, devices: dict[str, DeviceState]) -> list[Migrate]:
        moves: list[Migrate] = []
        for _ in range(self.config.max_migrations_per_period):
            move = self._best_migration(view, devices)
            if move is None:
                break
            devices[move.from_device] = _without_models(devices[move.from_device], [move.model_id])
            devices[move.to_device] = _with_model(devices[move.to_device], move.model_id)
            self._cooldown_until[move.model_id] = view.now + self.config.migration_cooldown_s
            self._on_device_since[(move.model_id, move.to_device)] = view.now
            moves.append(move)
        return moves

    def _best_migration(self, view: ClusterView, devices: dict[str, DeviceState]) -> Migrate | None:
        """The move with the largest relative drop of max(KVPR(src), KVPR(dst)), if above the
        threshold. Ties: the lower KVPR the target is left with (moving a model off the hot
        device to any cooler one often leaves the same max, the source's; the coolest target
        keeps the most room), then source device_id, model_id, target device_id."""
        best: tuple | None = None
        for src_id in sorted(devices):
            src = devices[src_id]
            for model_id in _ready(src):
                if view.now < self._cooldown_until.get(model_id, -math.inf):
                    continue
                info = view.models[model_id]
                for dst_id in sorted(devices):
                    dst = devices[dst_id]
                    if dst_id == src_id or model_id in dst.hosted or info.pinned_device not in (None, dst_id):
                        continue
                    if not self._fits(dst, view, info):
                        continue
                    gain = self._migration_gain(view, src, dst, model_id)
                    if gain > self.config.migration_threshold:
                        key = (-gain, migration_seconds(view, model_id, dst), kvpr(dst, view, extra=model_id),
                               src_id, model_id, dst_id)
                        if best is None or key < best:
                            best = key
        if best is None:
            return None
        *_, src_id, model_id, dst_id = best
        return Migrate(model_id, src_id, dst_id)

    @staticmethod
    def _migration_gain(view: ClusterView, src: DeviceState, dst: DeviceState, model_id: str) -> float:
        before = max(kvpr(src, view), kvpr(dst, view))
        after = max(kvpr(src, view, without=model_id), kvpr(dst, view, extra=model_id))
        return relative_gain(before, after)


def _placement_key(info: ModelInfo, view: ClusterView) -> tuple:
    # Descending weighted rate; without traffic, descending weight; then bigger weights first
    # (first-fit-decreasing packs better); then name.
    return (-info.weight * view.rate(info.model_id), -info.weight, -info.weight_bytes, info.model_id)


__all__ = [
    "EVICT_REASONS",
    "Activate",
    "Evict",
    "GlobalScheduler",
    "GlobalSchedulerConfig",
    "Migrate",
    "kv_demand",
    "kv_free_bytes",
    "kvpr",
    "relative_gain",
]
