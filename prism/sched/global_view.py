"""What the global (cluster) scheduler sees: plain, torch-free snapshots of models and devices.

The server (or the simulator) builds a `ClusterView` each tick from its config, the device
workers' reports and a `TokenRateTracker`; `placement.py` and `host_copies.py` read it and
return decisions.
"""
from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class ModelInfo:
    """Static facts of a model."""

    model_id: str
    weight_bytes: int
    kv_bytes_per_token: int
    tpot_slo_s: float
    pinned_device: str | None = None  # config may pin a model to a device: it lives only there
    weight: float = 1.0  # requests/s a placement made at start goes by (ClusterControl.placement_rates)

    def __post_init__(self) -> None:
        if self.weight_bytes < 0 or self.kv_bytes_per_token < 0:
            raise ValueError(f"model {self.model_id!r}: byte sizes must be >= 0")
        if not self.tpot_slo_s > 0:
            raise ValueError(f"model {self.model_id!r}: tpot_slo_s must be > 0, got {self.tpot_slo_s}")
        if self.weight < 0:
            raise ValueError(f"model {self.model_id!r}: weight must be >= 0, got {self.weight}")


@dataclass(frozen=True)
class DeviceState:
    device_id: str
    memory_bytes: int  # the device's page budget in bytes
    resident: tuple[str, ...]  # models whose weights are on it now (ready to serve)
    activating: tuple[str, ...] = ()  # models whose weights are being copied in
    # Resident models leaving (a migration's source): they finish what they hold, take no new
    # requests, and are evicted when done. Their weights still count here.
    draining: tuple[str, ...] = ()
    node: str = ""  # the machine it is on ("": single-host mode)

    @property
    def hosted(self) -> tuple[str, ...]:
        """Models that hold memory here: resident and activating ones. An activating model's
        weights are already reserved and its traffic is about to land here, so placement
        counts it exactly like a resident one."""
        return tuple(dict.fromkeys(self.resident + self.activating))


@dataclass(frozen=True)
class NodeState:
    """One machine: the host copies of model weights it holds and its budget for them."""

    name: str
    host_budget_bytes: int | None = None  # None: no budget (every copy stays)
    # model -> host bytes held for it on this node (one shared copy, or one per worker that
    # keeps a private copy)
    host_copies: dict[str, int] = field(default_factory=dict)

    @property
    def host_bytes(self) -> int:
        return sum(self.host_copies.values())


@dataclass(frozen=True)
class TransferRates:
    """What moving weights costs, for comparing activations (host_copies.activation_seconds).
    Defaults: the pinned host -> device copy measured on the H100 (DESIGN.md), and a local
    NVMe SSD's sustained read of a checkpoint (storage -> host); the simulator passes its own."""

    h2d_bytes_per_s: float = 50e9
    storage_bytes_per_s: float = 2e9


@dataclass(frozen=True)
class ClusterView:
    now: float
    models: dict[str, ModelInfo]  # every model the server knows
    devices: tuple[DeviceState, ...]
    token_rates: dict[str, float]  # tokens/s per model over the sliding window (absent: 0)
    last_request: dict[str, float]  # per model: time of its latest request (absent: never)
    pending: dict[str, int]  # per model: requests in flight (waiting or running) anywhere
    # Nodes by name, with their host copies; a device whose node is not listed is taken to
    # have every model's host copy at hand (single-host mode before nodes were known).
    nodes: dict[str, NodeState] = field(default_factory=dict)
    transfer: TransferRates = TransferRates()

    def __post_init__(self) -> None:
        # A device reporting a model the server does not know is a wiring bug, not load:
        # say so here rather than as a KeyError deep inside a KVPR sum.
        for d in self.devices:
            unknown = [m for m in d.hosted if m not in self.models]
            if unknown:
                raise ValueError(f"device {d.device_id!r} holds unknown models {unknown}")
        ids = [d.device_id for d in self.devices]
        if len(set(ids)) != len(ids):
            raise ValueError(f"device ids repeat: {ids}")

    def rate(self, model_id: str) -> float:
        return self.token_rates.get(model_id, 0.0)

    def num_pending(self, model_id: str) -> int:
        return self.pending.get(model_id, 0)

    def device(self, device_id: str) -> DeviceState:
        return next(d for d in self.devices if d.device_id == device_id)

    def hosts(self, model_id: str) -> list[DeviceState]:
        """Devices where `model_id` is resident or activating."""
        return [d for d in self.devices if model_id in d.hosted]

    def has_host_copy(self, node: str, model_id: str) -> bool:
        """Whether `node` holds `model_id`'s weights in host memory (an unknown node: yes)."""
        state = self.nodes.get(node)
        return state is None or model_id in state.host_copies


__all__ = ["ClusterView", "DeviceState", "ModelInfo", "NodeState", "TransferRates"]
