"""The cluster's control: where models start, which device serves a request, and the global
scheduler's periodic work, over links to the devices.

Torch-free and transport-free. The server's Router drives it with worker processes behind
ZeroMQ links; the simulator drives it with simulated devices behind in-memory links; so both
make the very same global decisions. The decisions themselves come from prism.sched
(GlobalScheduler); this is the mechanism that feeds it views and carries its answers out as
messages to the devices.
"""
from __future__ import annotations

import logging
from collections import Counter
from dataclasses import dataclass, replace
from typing import Callable, Protocol

from prism.cluster.config import ClusterConfig
from prism.config import ConfigError, DeviceConfig, ModelSpec
from prism.sched.global_view import ClusterView, DeviceState, ModelInfo
from prism.sched.placement import Activate, Evict, GlobalScheduler, Migrate, kvpr
from prism.sched.rates import TokenRateTracker
from prism.worker import messages as msg

log = logging.getLogger("prism.control")
TICK_S = 0.5  # how often the frontend asks for memory reports and runs the global scheduler
ACTIVATION_GRACE_S = 30.0  # an activation not reported done after this long is forgotten


@dataclass(frozen=True)
class _Migration:
    """A model on its way from one device to another (see `ClusterControl.tick`)."""

    from_device: str
    to_device: str
    since: float


class DeviceDown(RuntimeError):
    """Every device that hosts the model is down (restarting or failed for good)."""

    def __init__(self, model: str, devices: list[str]):
        super().__init__(f"every device hosting {model!r} is down ({', '.join(devices) or 'none'})")
        self.devices = devices


class DeviceLink(Protocol):
    """One device as the frontend sees it: what it said when it started, its latest memory
    report, and a way to send it messages (prism.worker.messages)."""

    device_id: str
    ready: msg.Ready
    report: msg.DeviceMemory | None

    def send(self, message) -> None: ...


def device_models(config: ClusterConfig, device_id: str) -> tuple[ModelSpec, ...]:
    """The models a device loads when it starts: those pinned to it and every unpinned one."""
    return tuple(m for m in config.models if config.pinned.get(m.name, device_id) == device_id)


class ClusterControl:
    def __init__(self, config: ClusterConfig, links: dict[str, DeviceLink],
                 in_flight: Callable[[], dict[str, int]], migrations: Counter | None = None,
                 devices: list[DeviceConfig] | None = None):
        self.config = config
        self.specs = {m.name: m for m in config.models}
        # The devices at the start: the config's, or those a cluster has (ray.auto_devices).
        self._devices = {d.device_id: d for d in (config.devices if devices is None else devices)}
        self.links = links  # device_id -> link (the owner may fill it after construction)
        self.global_sched = GlobalScheduler(config.global_)
        self.rates = TokenRateTracker(config.global_.rate_window_s)
        self._in_flight = in_flight  # requests in flight per model (waiting or running)
        self._pending_activation: dict[str, tuple[str, float]] = {}  # model -> (device, since)
        self._migrating: dict[str, _Migration] = {}  # model -> move whose target is not ready yet
        self._leaving: dict[str, str] = {}  # model -> migration source draining it
        self.migrations = migrations if migrations is not None else Counter()
        self._infos: tuple[int, dict[str, ModelInfo]] | None = None
        self._by_device: tuple[tuple, dict[str, tuple[str, ...]]] | None = None
        # Devices whose worker died (restarting or failed for good): nothing is routed there,
        # the global scheduler does not see them, and their last report no longer counts.
        self.down: set[str] = set()
        self._joined: set[str] = set()  # devices added at run time (see add_device)

    # ---- devices going down and up ----------------------------------------------------------
    def mark_down(self, device: str) -> None:
        """Forget what was on its way to or from `device`: its worker is gone."""
        self.down.add(device)
        self._pending_activation = {m: p for m, p in self._pending_activation.items() if p[0] != device}
        self._migrating = {m: mv for m, mv in self._migrating.items() if device not in (mv.from_device, mv.to_device)}
        self._leaving = {m: d for m, d in self._leaving.items() if d != device}
        self._by_device = None

    def add_device(self, device: DeviceConfig, link: DeviceLink) -> None:
        """A device that joined after the start (its node joined the cluster). It starts
        empty: what its worker kept resident is evicted, and the global scheduler puts models
        there (a request for a model hosted nowhere, or its next periodic pass's migrations)."""
        self._devices[device.device_id] = device
        self.links[device.device_id] = link
        self.down.discard(device.device_id)
        self._joined.add(device.device_id)  # its Ready's residency is about to be undone
        self._infos = self._by_device = None
        for info in link.ready.models:
            if info.resident:
                link.send(msg.Evict(info.name))
        link.send(msg.ReportMemory())

    def mark_up(self, device: str) -> None:
        """`device` has a fresh worker (its link's Ready and reports are new)."""
        self.down.discard(device)
        self._by_device = None
        self.links[device].send(msg.ReportMemory())

    # ---- start -------------------------------------------------------------------------------
    def start(self, now: float) -> dict[str, str]:
        """Lay the models out over the devices (when there is a choice to make or a baseline
        asks for it) and ask every device for a memory report. Returns the initial placement
        (model -> device; empty when each device keeps what it loaded)."""
        target: dict[str, str] = {}
        if len(self.links) > 1 or self.config.system_spec.places_at_start:
            target = self._initial_placement(now)
        for link in self.links.values():
            link.send(msg.ReportMemory())
        return target

    def _initial_placement(self, now: float) -> dict[str, str]:
        """Each worker loaded every model it may host, keeping whatever fitted last; the global
        scheduler decides instead where each model starts (evictions go first per worker)."""
        view = self.cluster_view(now)
        empty = replace(view, devices=tuple(replace(d, resident=(), activating=()) for d in view.devices))
        target = {a.model_id: a.device_id for a in self.global_sched.initial_placement(empty)}
        if self.config.system_spec.keeps_all_resident:
            missing = [m for m in self.specs if m not in target]
            if missing:
                raise ConfigError(f"scheduler.system {self.config.system} keeps every model resident, "
                                  f"but {', '.join(missing)} fit(s) on no device")
        for device, link in self.links.items():
            for info in link.ready.models:
                if info.resident and target.get(info.name) != device:
                    link.send(msg.Evict(info.name))
        for model, device in target.items():
            self.links[device].send(msg.Activate(model))
            self._pending_activation[model] = (device, now)
        if self.config.system_spec.static_kv_shares:
            self._set_static_kv_shares(target)
        log.info("initial placement: %s", target)
        return target

    def _set_static_kv_shares(self, target: dict[str, str]) -> None:
        """Static partitioning: each device's memory left after weights is split among its
        models in proportion to rate x KV bytes per token, and each model is capped there."""
        infos = {i.name: i for link in self.links.values() for i in link.ready.models}
        for device, link in self.links.items():
            here = [m for m, d in target.items() if d == device]
            left = self.memory_bytes(device) - sum(infos[m].weight_bytes for m in here)
            demand = {m: self.config.rates.get(m, 1.0) * infos[m].kv_bytes_per_token for m in here}
            page = self._device(device).page_size
            for m in here:
                link.send(msg.SetKVCap(m, int(left * demand[m] / sum(demand.values()) // page)))

    # ---- requests ----------------------------------------------------------------------------
    def max_model_len(self, model: str) -> int:
        return min(info.max_model_len for link in self.links.values()
                   for info in link.ready.models if info.name == model)

    def route(self, model: str, now: float) -> str:
        """The device a new request of `model` goes to (activating the model if needed).
        Raises DeviceDown when every device that hosts it is down."""
        if not self.hosting_up(model):
            raise DeviceDown(model, self._hosting(model))
        view = self.cluster_view(now)
        device = self.global_sched.route(view, model)
        if device is not None:
            return device
        pending = self._pending_activation.get(model)
        if pending is not None and now - pending[1] < ACTIVATION_GRACE_S and pending[0] not in self.down:
            return pending[0]
        actions = self.global_sched.on_request(view, model)
        self.carry_out(actions, now)
        for a in actions:
            if isinstance(a, Activate) and a.model_id == model:
                return a.device_id
        # No device can make room now: queue it where it may run; that worker's local
        # scheduler activates it as soon as memory allows.
        return min(self.hosting_up(model), key=lambda d: self._kvpr(view, d))

    def record_arrival(self, model: str, now: float, num_prompt_tokens: int, max_tokens: int) -> None:
        self.rates.record_arrival(model, now, num_prompt_tokens, max_tokens)

    def _hosting(self, model: str) -> list[str]:
        return [d for d, link in self.links.items() if any(i.name == model for i in link.ready.models)]

    def hosting(self, model: str) -> list[str]:
        """The devices whose worker loaded `model` when it started (up or down)."""
        return self._hosting(model)

    def hosting_up(self, model: str) -> list[str]:
        """The devices that may serve `model` now (it is pinned to one of them, if pinned)."""
        return [d for d in self._hosting(model) if d not in self.down]

    def _kvpr(self, view: ClusterView, device_id: str) -> float:
        return kvpr(next(d for d in view.devices if d.device_id == device_id), view)

    def carry_out(self, actions, now: float) -> None:
        for a in actions:
            if isinstance(a, Evict):
                self.links[a.device_id].send(msg.Evict(a.model_id, "drain" if a.reason == "migration" else "preempt"))
            elif isinstance(a, Activate):
                self.links[a.device_id].send(msg.Activate(a.model_id))
                self._pending_activation[a.model_id] = (a.device_id, now)
            elif isinstance(a, Migrate):
                # The source keeps serving while the target copies the weights in: draining it
                # now would leave the requests routed there meanwhile waiting for nothing.
                # `_advance_migrations` drains it once the target reports the model resident.
                self.links[a.to_device].send(msg.Activate(a.model_id))
                self._pending_activation[a.model_id] = (a.to_device, now)
                self._migrating[a.model_id] = _Migration(a.from_device, a.to_device, now)
                self.migrations[a.model_id] += 1
                log.info("migrating %s from %s to %s", a.model_id, a.from_device, a.to_device)

    # ---- the tick: reports in, global decisions out -------------------------------------------
    def tick(self, now: float) -> None:
        """Ask every device for a fresh report, forget activations that are done (or too old),
        and carry out the global scheduler's periodic decisions."""
        for link in self.links.values():
            link.send(msg.ReportMemory())
        resident = self.residency()
        for model, (device, since) in list(self._pending_activation.items()):
            if device in resident.get(model, ()) or now - since > ACTIVATION_GRACE_S:
                del self._pending_activation[model]
        self._advance_migrations(resident, now)
        self.carry_out(self.global_sched.periodic(self.cluster_view(now)), now)

    def _advance_migrations(self, resident: dict[str, list[str]], now: float) -> None:
        """A migration's target reported the model resident: from now on requests go there
        (route skips a draining copy), and the source drains: it serves every request it
        holds, then evicts the model. A target that never got ready (no memory) is given up
        after ACTIVATION_GRACE_S; the source simply keeps the model."""
        for model, move in list(self._migrating.items()):
            if move.to_device in resident.get(model, ()):
                del self._migrating[model]
                self._leaving[model] = move.from_device
                self.links[move.from_device].send(msg.Evict(model, "drain"))
            elif now - move.since > ACTIVATION_GRACE_S:
                del self._migrating[model]
        for model, device in list(self._leaving.items()):
            if device not in resident.get(model, ()):
                del self._leaving[model]

    def cluster_view(self, now: float) -> ClusterView:
        resident = self._resident_by_device()
        devices = tuple(
            DeviceState(d, self.memory_bytes(d), resident.get(d, ()),
                        tuple(m for m, (dev, _) in self._pending_activation.items() if dev == d),
                        tuple(m for m, dev in self._leaving.items() if dev == d))
            for d in self.links if d not in self.down
        )
        return ClusterView(
            now=now, models=self._model_infos(), devices=devices,
            token_rates={m: self.rates.rate(m, now) for m in self.specs},
            last_request={m: t for m in self.specs if (t := self.rates.last_seen(m)) is not None},
            pending=self._in_flight(),
        )

    def _model_infos(self) -> dict[str, ModelInfo]:
        """What the global scheduler knows of each model: fixed once the devices are up."""
        if self._infos is None or self._infos[0] != len(self.links):
            infos = {}
            for link in self.links.values():
                for i in link.ready.models:
                    infos[i.name] = ModelInfo(i.name, i.weight_bytes, i.kv_bytes_per_token,
                                              self.specs[i.name].tpot_slo_s, self.config.pinned.get(i.name),
                                              weight=self.config.rates.get(i.name, 1.0))
            self._infos = (len(self.links), infos)
        return self._infos[1]

    def _resident_by_device(self) -> dict[str, tuple[str, ...]]:
        """device -> models resident there, as of the latest reports (recomputed only when a
        report changed: the cache holds the report objects it was computed from)."""
        reports = tuple(link.report for link in self.links.values())
        cached = self._by_device
        if cached is None or len(cached[0]) != len(reports) or any(a is not b for a, b in zip(cached[0], reports)):
            by_device: dict[str, list[str]] = {}
            for model, devices in self.residency().items():
                for d in devices:
                    by_device.setdefault(d, []).append(model)
            cached = self._by_device = (reports, {d: tuple(ms) for d, ms in by_device.items()})
        return cached[1]

    def memory_bytes(self, device_id: str) -> int:
        dev = self._device(device_id)
        return dev.num_pages * dev.page_size

    def _device(self, device_id: str):
        return self._devices[device_id]

    def residency(self) -> dict[str, list[str]]:
        """model -> devices where it is resident, as of each device's latest report."""
        out: dict[str, list[str]] = {}
        for device, link in self.links.items():
            if device in self.down:
                continue
            if link.report is None:
                if device in self._joined:  # nothing resident until it reports
                    continue
                for i in link.ready.models:
                    if i.resident:
                        out.setdefault(i.name, []).append(device)
                continue
            for model, st in link.report.models.items():
                if st.resident:
                    out.setdefault(model, []).append(device)
        return out


__all__ = ["ACTIVATION_GRACE_S", "TICK_S", "ClusterControl", "DeviceDown", "DeviceLink", "device_models"]
