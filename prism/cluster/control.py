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
from prism.sched.global_view import ClusterView, DeviceState, ModelInfo, NodeState, TransferRates
from prism.sched.host_copies import DropHostCopy, HostCopyPolicy
from prism.sched.placement import Activate, Evict, GlobalScheduler, Migrate, kvpr
from prism.sched.rates import TokenRateTracker, placement_rates
from prism.worker import messages as msg

log = logging.getLogger("prism.control")
TICK_S = 0.5  # how often the frontend asks for memory reports and runs the global scheduler
# An activation the device could not carry out yet (no room) is re-decided after this long;
# one carried out is known at once (the device's Activated message).
ACTIVATION_GRACE_S = 30.0


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
        self.host_copy_policy = HostCopyPolicy()
        self.transfer = TransferRates()  # what the policies assume weight moves cost (the simulator sets its own)
        self._nodes: tuple[tuple, dict[str, NodeState]] | None = None
        self.rates = TokenRateTracker(config.global_.rate_window_s)
        # Requests/s a placement made at start goes by (`start` sets them; see placement_rates)
        self.placement_rates = placement_rates(self.specs, config.rates, None)
        # Static partitioning started on equal rates (a server knows none at start): when its
        # shares follow the measured rates instead, and where the models were placed.
        self._recap_at: float | None = None
        self._static_target: dict[str, str] = {}
        self._in_flight = in_flight  # requests in flight per model (waiting or running)
        self._pending_activation: dict[str, tuple[str, float]] = {}  # model -> (device, since)
        self._migrating: dict[str, _Migration] = {}  # model -> move whose target is not ready yet
        self._leaving: dict[str, str] = {}  # model -> migration source draining it
        self._queue_of: dict[str, str] = {}  # model -> device its latest request went to
        self.migrations = migrations if migrations is not None else Counter()
        self._infos: tuple[int, dict[str, ModelInfo]] | None = None
        # device -> models resident there: from each device's Ready, then its Activated and
        # Evicted messages, as they happen (reports are for memory, not residency).
        self._resident: dict[str, set[str]] = {}
        self._by_device: dict[str, tuple[str, ...]] | None = None
        # Devices whose worker died (restarting or failed for good): nothing is routed there,
        # the global scheduler does not see them, and their last report no longer counts.
        self.down: set[str] = set()

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
        self._resident[device.device_id] = set()  # its Ready's residency is about to be undone
        self._infos = self._by_device = None
        for info in link.ready.models:
            if info.resident:
                link.send(msg.Evict(info.name))
        link.send(msg.ReportMemory())

    def mark_up(self, device: str) -> None:
        """`device` has a fresh worker (its link's Ready and reports are new)."""
        self.down.discard(device)
        self._resident.pop(device, None)  # what its new worker holds: its Ready, then its notices
        self._by_device = None
        self.links[device].send(msg.ReportMemory())

    # ---- start -------------------------------------------------------------------------------
    def start(self, now: float, measured_rates: dict[str, float] | None = None,
              window_s: float | None = None, longest_request: int | None = None) -> dict[str, str]:
        """Lay the models out over the devices (when there is a choice to make or a baseline
        asks for it) and ask every device for a memory report. Returns the initial placement
        (model -> device; empty when each device keeps what it loaded).

        The placement (and static KV shares) go by `placement_rates`: the config's `rate:`
        where set, else `measured_rates` (requests/s over the first `window_s` seconds: the
        simulator measures them over the trace's start), else equal rates (a server at start).
        `longest_request`: the most tokens (prompt + output) any request will hold, if known
        (the simulator's trace); a static partition must hold that or each model's
        max_model_len, whichever is smaller, or the start is refused (ConfigError)."""
        self.placement_rates = placement_rates(self.specs, self.config.rates, measured_rates, window_s)
        self._infos = None
        target: dict[str, str] = {}
        if len(self.links) > 1 or self.config.system_spec.places_at_start:
            target = self._initial_placement(now, longest_request)
        if self._static_target and measured_rates is None and set(self.config.rates) != set(self.specs):
            self._recap_at = now + self.config.global_.placement_window_s  # shares follow what is measured
        for link in self.links.values():
            link.send(msg.ReportMemory())
        return target

    def _initial_placement(self, now: float, longest_request: int | None = None) -> dict[str, str]:
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
        caps = {}
        if self.config.system_spec.static_kv_shares:
            caps = self._static_kv_caps(target, longest_request)
            self._static_target = target
        for device, link in self.links.items():
            for info in link.ready.models:
                if info.resident and target.get(info.name) != device:
                    link.send(msg.Evict(info.name))
        for model, device in target.items():
            self.links[device].send(msg.Activate(model))
            self._pending_activation[model] = (device, now)
        for model, pages in caps.items():
            self.links[target[model]].send(msg.SetKVCap(model, pages))
        log.info("initial placement: %s (placed by requests/s %s)", target,
                 {m: round(r, 3) for m, r in self.placement_rates.items()})
        return target

    def _static_kv_caps(self, target: dict[str, str], longest_request: int | None) -> dict[str, int]:
        """Static partitioning: each device's memory left after weights is split among its
        models in proportion to rate x KV bytes per token (model -> its cap in pages). A share
        that cannot hold the model's longest possible request is refused here, at start: its
        requests that long would otherwise wait forever."""
        caps, short = self._kv_shares(target, self.placement_rates, longest_request)
        if short:
            raise ConfigError(f"scheduler.system static: {short[0]}; give it a higher rate:, a smaller "
                              f"max_model_len, or fewer models on the device")
        return caps

    def _kv_shares(self, target: dict[str, str], rates: dict[str, float],
                   longest_request: int | None = None) -> tuple[dict[str, int], list[str]]:
        """(model -> KV cap in pages by rate x KV bytes per token, the shares too small for
        the model's longest possible request, described)."""
        infos = {i.name: i for link in self.links.values() for i in link.ready.models}
        caps: dict[str, int] = {}
        short = []
        for device in self.links:
            here = [m for m, d in target.items() if d == device]
            left = self.memory_bytes(device) - sum(infos[m].weight_bytes for m in here)
            demand = {m: rates[m] * infos[m].kv_bytes_per_token for m in here}
            page = self._device(device).page_size
            for m in here:
                caps[m] = pages = int(left * demand[m] / sum(demand.values()) // page)
                need, why = infos[m].max_model_len, "its max_model_len"
                if longest_request is not None and longest_request < need:
                    need, why = longest_request, "the longest request of the trace"
                holds = _tokens_in(infos[m], pages, page)
                if holds < need:
                    short.append(f"{m}'s KV share on {device} ({pages} pages, {holds} tokens, rate "
                                 f"{rates[m]:.3g} req/s) cannot hold {why} ({need} tokens)")
        return caps, short

    def _recap_static_shares(self, now: float) -> None:
        """Static partitioning that started on equal rates: once `placement_window_s` has
        passed, the shares follow the rates measured since (S-Partition sizes each engine by
        its load), once. A share that would be too small for its model's longest possible
        request keeps every share as it is (logged): a request must never wait forever."""
        self._recap_at = None
        window = self.config.global_.placement_window_s
        span = min(window, self.rates.window_s)  # the tracker keeps rate_window_s of arrivals
        measured = {m: self.rates.request_rate(m, now) * self.rates.window_s / span for m in self.specs}
        rates = placement_rates(self.specs, self.config.rates, measured, window)
        caps, short = self._kv_shares(self._static_target, rates)
        if short:
            log.warning("static KV shares kept as at start: by the measured rates %s", short[0])
            return
        self.placement_rates = rates
        for model, pages in caps.items():
            self.links[self._static_target[model]].send(msg.SetKVCap(model, pages))
        log.info("static KV shares by the measured requests/s %s: %s pages",
                 {m: round(r, 3) for m, r in rates.items()}, caps)

    # ---- requests ----------------------------------------------------------------------------
    def max_model_len(self, model: str) -> int:
        return min(info.max_model_len for link in self.links.values()
                   for info in link.ready.models if info.name == model)

    def route(self, model: str, now: float) -> str:
        """The device a new request of `model` goes to (activating the model if needed).
        Raises DeviceDown when every device that hosts it is down."""
        if not self.hosting_up(model):
            raise DeviceDown(model, self._hosting(model))
        device = self._choose_device(model, now)
        self._queue_of[model] = device
        return device

    def _choose_device(self, model: str, now: float) -> str:
        view = self.cluster_view(now)
        device = self.global_sched.route(view, model)
        if device is not None:
            return device
        if self.config.system_spec.keeps_groups:
            return self._join_queue(model)
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

    def _join_queue(self, model: str) -> str:
        """QLM-style request groups (a system whose devices swap models in themselves): a
        request for a model resident nowhere joins the device queue where that model's requests
        in flight already wait, so the group is served in one turn there; a new group joins the
        queue with the fewest requests in flight. The device's own policy swaps the model in
        when the group's turn comes; the frontend orders no activation."""
        in_flight = self._in_flight()
        up = self.hosting_up(model)
        home = self._queue_of.get(model)
        if home in up and in_flight.get(model):
            return home
        load = Counter()
        for m, d in self._queue_of.items():
            load[d] += in_flight.get(m, 0)
        return min(up, key=lambda d: (load[d], d))

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
        if self._recap_at is not None and now >= self._recap_at:
            self._recap_static_shares(now)
        resident = self.residency()
        for model, (device, since) in list(self._pending_activation.items()):
            if device in resident.get(model, ()) or now - since > ACTIVATION_GRACE_S:
                del self._pending_activation[model]
        self._advance_migrations(resident, now)
        view = self.cluster_view(now)
        self.carry_out(self.global_sched.periodic(view), now)
        self._drop_host_copies(self.host_copy_policy.decide(view))

    def _drop_host_copies(self, drops: list[DropHostCopy]) -> None:
        """Tell every up worker of the node that lists the copy to free it (workers sharing
        one copy each let go of it; the first to act removes it)."""
        for drop in drops:
            for device, link in self.links.items():
                if (device not in self.down and self._devices[device].node == drop.node
                        and link.report is not None and drop.model_id in link.report.host_copies):
                    link.send(msg.DropHostCopy(drop.model_id))

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
                        tuple(m for m, dev in self._leaving.items() if dev == d), self._devices[d].node)
            for d in self.links if d not in self.down
        )
        return ClusterView(
            now=now, models=self._model_infos(), devices=devices,
            token_rates={m: self.rates.rate(m, now) for m in self.specs},
            last_request={m: t for m in self.specs if (t := self.rates.last_seen(m)) is not None},
            pending=self._in_flight(), nodes=self._node_states(), transfer=self.transfer,
        )

    def _node_states(self) -> dict[str, NodeState]:
        """Each node's budget and the host copies its up workers report: a copy in a store
        the node's workers share counts once, a worker's private copy once per worker.
        Recomputed only when a report changed (as `_resident_by_device`)."""
        reports = tuple(None if d in self.down else link.report for d, link in self.links.items())
        cached = self._nodes
        if cached is not None and len(cached[0]) == len(reports) and all(a is b for a, b in zip(cached[0], reports)):
            return cached[1]
        infos = self._model_infos()
        held: dict[str, dict[tuple[str, str], int]] = {n.name: {} for n in self.config.nodes}
        for device, report in zip(self.links, reports):
            if report is None:
                continue
            where = report.host_store or device
            for model in report.host_copies:
                if model in infos:
                    held.setdefault(self._devices[device].node, {})[(where, model)] = infos[model].weight_bytes
        budgets = {n.name: n.host_memory_bytes for n in self.config.nodes}
        nodes = {}
        for name, copies in held.items():
            per_model: dict[str, int] = {}
            for (_, model), num_bytes in copies.items():
                per_model[model] = per_model.get(model, 0) + num_bytes
            nodes[name] = NodeState(name, budgets.get(name), per_model)
        self._nodes = (reports, nodes)
        return nodes

    def _model_infos(self) -> dict[str, ModelInfo]:
        """What the global scheduler knows of each model: fixed once the devices are up."""
        if self._infos is None or self._infos[0] != len(self.links):
            infos = {}
            for link in self.links.values():
                for i in link.ready.models:
                    infos[i.name] = ModelInfo(i.name, i.weight_bytes, i.kv_bytes_per_token,
                                              self.specs[i.name].tpot_slo_s, self.config.pinned.get(i.name),
                                              weight=self.placement_rates[i.name])
            self._infos = (len(self.links), infos)
        return self._infos[1]

    def on_residency(self, device_id: str, notice: msg.Activated | msg.Evicted) -> None:
        """A device says a model came or went (whoever decided it)."""
        resident = self._resident_on(device_id)
        if isinstance(notice, msg.Activated):
            resident.add(notice.model)
            pending = self._pending_activation.get(notice.model)
            if pending is not None and pending[0] == device_id:
                del self._pending_activation[notice.model]
        else:
            resident.discard(notice.model)
        self._by_device = None

    def _resident_on(self, device_id: str) -> set[str]:
        if device_id not in self._resident:  # as the device said when it started
            self._resident[device_id] = {i.name for i in self.links[device_id].ready.models if i.resident}
        return self._resident[device_id]

    def _resident_by_device(self) -> dict[str, tuple[str, ...]]:
        """device -> models resident there, in the order the device listed its models."""
        if self._by_device is None or self._by_device.keys() != self.links.keys() - self.down:
            self._by_device = {d: tuple(i.name for i in link.ready.models if i.name in self._resident_on(d))
                               for d, link in self.links.items() if d not in self.down}
        return self._by_device

    def memory_bytes(self, device_id: str) -> int:
        dev = self._device(device_id)
        return dev.num_pages * dev.page_size

    def _device(self, device_id: str):
        return self._devices[device_id]

    def residency(self) -> dict[str, list[str]]:
        """model -> devices where it is resident, as the devices said."""
        out: dict[str, list[str]] = {}
        for device, models in self._resident_by_device().items():
            for model in models:
                out.setdefault(model, []).append(device)
        return out


def _tokens_in(info: msg.ModelInfo, pages: int, page_size: int) -> int:
    """Tokens of KV `pages` physical pages hold for a model (whole page groups only)."""
    if info.pages_per_kv_page:
        return pages // info.pages_per_kv_page * info.tokens_per_kv_page
    return pages * page_size // max(1, info.kv_bytes_per_token)


__all__ = ["ACTIVATION_GRACE_S", "TICK_S", "ClusterControl", "DeviceDown", "DeviceLink", "device_models"]
