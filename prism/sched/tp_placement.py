"""Placing a tensor-parallel model: its `tp` shards on `tp` distinct GPUs of one host.

Pure policy (no torch), in the terms of placement.py's KV pressure ratio. A shard of a model
split `tp` ways holds `shard_weight_bytes` of weights and, per token, `shard_kv_bytes_per_token`
of KV (prism.engine.tp_shard.shard_sizes computes both); every shard sees the model's whole
token rate, because every rank computes every token. So on each GPU of the group the shard adds

    shard_weight_bytes                                    to the weights there, and
    rate(m) * shard_kv_bytes_per_token / tpot_slo(m)      to the KVPR numerator.

The ranks step together, so the group runs out of KV when its most pressed GPU does: a
group's pressure is the maximum landing KVPR over its GPUs. Rules:

- anti-affinity: the shards go on distinct GPUs, none of which already holds this model;
- one host: NCCL groups here are the GPUs of one host (`DeviceLoad.host`);
- fit: as in placement.py, memory - weights there - shard_weight_bytes must leave
  `headroom_fraction` of the GPU's memory for KV;
- choice: on each host the `tp` fitting GPUs with the lowest landing KVPR (which minimises the
  group's maximum), then the host whose group has the lowest maximum; ties (no traffic yet):
  the most KV room left on the group's fullest GPU, then host and device ids.

Ranks are numbered in device_id order (rank 0 on the first), so a group's numbering does not
depend on the loads of the moment.
"""
from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass

from prism.sched.global_view import ClusterView
from prism.sched.placement import kv_demand, kv_free_bytes


@dataclass(frozen=True)
class DeviceLoad:
    """One GPU as placement sees it."""

    device_id: str
    memory_bytes: int  # the GPU's page budget
    weight_bytes: int = 0  # weights already there (every model, shards included)
    kv_demand: float = 0.0  # sum over what is there of rate * kv_bytes_per_token / tpot_slo
    host: str = ""  # a tensor-parallel group stays within one host
    hosted: tuple[str, ...] = ()  # models (or shards) already there

    @property
    def kv_free_bytes(self) -> int:
        return self.memory_bytes - self.weight_bytes

    def kvpr(self, extra_weight_bytes: int = 0, extra_demand: float = 0.0) -> float:
        """KV pressure ratio, optionally with one more shard; +inf without room for KV."""
        free = self.kv_free_bytes - extra_weight_bytes
        return (self.kv_demand + extra_demand) / free if free > 0 else math.inf


@dataclass(frozen=True)
class TPModel:
    model_id: str
    tp: int
    shard_weight_bytes: int
    shard_kv_bytes_per_token: int
    rate: float  # tokens/s of the whole model (each shard computes all of them)
    tpot_slo_s: float

    def __post_init__(self) -> None:
        if self.tp < 1:
            raise ValueError(f"model {self.model_id!r}: tp must be >= 1, got {self.tp}")
        if self.shard_weight_bytes < 0 or self.shard_kv_bytes_per_token < 0 or self.rate < 0:
            raise ValueError(f"model {self.model_id!r}: sizes and rate must be >= 0")
        if not self.tpot_slo_s > 0:
            raise ValueError(f"model {self.model_id!r}: tpot_slo_s must be > 0")

    @property
    def shard_demand(self) -> float:
        """What one shard adds to its GPU's KVPR numerator."""
        return self.rate * self.shard_kv_bytes_per_token / self.tpot_slo_s


@dataclass(frozen=True)
class TPPlacement:
    model_id: str
    device_ids: tuple[str, ...]  # rank r's GPU is device_ids[r]
    kvpr: float  # the group's pressure: the highest landing KVPR among its GPUs


def landing_kvpr(device: DeviceLoad, model: TPModel) -> float:
    return device.kvpr(model.shard_weight_bytes, model.shard_demand)


def fits(device: DeviceLoad, model: TPModel, headroom_fraction: float = 0.05) -> bool:
    left = device.kv_free_bytes - model.shard_weight_bytes
    return model.model_id not in device.hosted and left >= headroom_fraction * device.memory_bytes


def place_tp(devices: Iterable[DeviceLoad], model: TPModel,
             headroom_fraction: float = 0.05) -> TPPlacement | None:
    """The GPUs for `model`'s shards (see the module docstring), or None when no host has
    `tp` GPUs that each fit a shard."""
    by_host: dict[str, list[DeviceLoad]] = {}
    for d in devices:
        if fits(d, model, headroom_fraction):
            by_host.setdefault(d.host, []).append(d)
    best: tuple | None = None
    for host, candidates in by_host.items():
        if len(candidates) < model.tp:
            continue
        group = sorted(candidates, key=lambda d: _landing_key(d, model))[: model.tp]
        pressure = max(landing_kvpr(d, model) for d in group)
        room = min(d.kv_free_bytes - model.shard_weight_bytes for d in group)
        ids = tuple(sorted(d.device_id for d in group))
        key = (pressure, -room, host, ids)
        if best is None or key < best:
            best = key
    if best is None:
        return None
    pressure, _, _, ids = best
    return TPPlacement(model.model_id, ids, pressure)


def _landing_key(device: DeviceLoad, model: TPModel) -> tuple:
    return (landing_kvpr(device, model), -(device.kv_free_bytes - model.shard_weight_bytes),
            device.device_id)


def device_loads(view: ClusterView, hosts: dict[str, str] | None = None) -> list[DeviceLoad]:
    """The global scheduler's view as DeviceLoads, in placement.py's own terms (its
    kv_demand and kv_free_bytes). A TP model must appear in `view.models` with per-shard
    weight_bytes and kv_bytes_per_token, and in the `hosted` models of each GPU of its group.
    `hosts`: device_id -> host (default: all on one host)."""
    hosts = hosts or {}
    return [
        DeviceLoad(
            device_id=d.device_id,
            memory_bytes=d.memory_bytes,
            weight_bytes=d.memory_bytes - kv_free_bytes(d, view),
            kv_demand=sum(kv_demand(m, view) for m in d.hosted),
            host=hosts.get(d.device_id, ""),
            hosted=d.hosted,
        )
        for d in view.devices
    ]


__all__ = ["DeviceLoad", "TPModel", "TPPlacement", "device_loads", "fits", "landing_kvpr", "place_tp"]
