"""Host copies of model weights, per node: what an activation costs with and without one, and
which copies a node keeps within its host-memory budget.

An evicted model's weights stay in its node's host memory (one copy per node, shared by the
node's device workers), so bringing it back on any device of that node is a host-to-device
copy. A node without the copy first reads the checkpoint from storage into host memory (the
node's first use), then copies it in. A migration across nodes is therefore nothing special:
the source evicts (an unmap, free), the target activates (priced by whether its node holds the
copy).

Which copies a node keeps (`HostCopyPolicy`): within the node's budget, least recently used
go first, where a copy is in use while its model is resident, activating or draining on a
device of that node (its next eviction there is then free), and otherwise was last used when
it last was. LRU because a model's next activation is likeliest for the models used recently
(traffic comes in bursts: a model idle for long tends to stay idle), and it needs no forecast.
Copies of models in use go last, but they do go when they alone exceed the budget: the budget
is the operator's hard limit, and a model without a host copy still serves (its eviction then
drops the weights, its next activation reads storage).

Pure policy: it reads a `ClusterView` (time is `view.now`) and returns decisions; the server
and the simulator carry them out by telling the workers of the node to drop the copy.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

from prism.sched.global_view import ClusterView, DeviceState, NodeState


def activation_seconds(view: ClusterView, model_id: str, device: DeviceState) -> float:
    """The time to bring `model_id` onto `device`: a host-to-device copy of its weights, after a
    read from storage into host memory when the device's node holds no host copy."""
    weight_bytes = view.models[model_id].weight_bytes
    seconds = weight_bytes / view.transfer.h2d_bytes_per_s
    if not view.has_host_copy(device.node, model_id):
        seconds += weight_bytes / view.transfer.storage_bytes_per_s
    return seconds


def migration_seconds(view: ClusterView, model_id: str, target: DeviceState) -> float:
    """A migration is an eviction at the source (an unmap, after it drained: no time of its
    own) plus an activation on the target, whichever nodes they are on."""
    return activation_seconds(view, model_id, target)


@dataclass(frozen=True)
class DropHostCopy:
    node: str
    model_id: str


class HostCopyPolicy:
    """Keeps each node's host copies within its budget, least recently used first."""

    def __init__(self) -> None:
        self._last_use: dict[tuple[str, str], float] = {}  # (node, model) -> last time in use

    def decide(self, view: ClusterView) -> list[DropHostCopy]:
        """The copies to drop now so that every node is within its budget."""
        in_use = self._note_use(view)
        drops: list[DropHostCopy] = []
        for node in sorted(view.nodes.values(), key=lambda n: n.name):
            drops += [DropHostCopy(node.name, m) for m in self.victims(node, in_use.get(node.name, set()))]
        return drops

    def victims(self, node: NodeState, in_use: set[str]) -> list[str]:
        """`node`'s copies to drop, in order, until it is within its budget."""
        if node.host_budget_bytes is None or node.host_bytes <= node.host_budget_bytes:
            return []
        order = sorted(node.host_copies, key=lambda m: (
            m in in_use, self._last_use.get((node.name, m), -math.inf), m))
        held, out = node.host_bytes, []
        for model_id in order:
            if held <= node.host_budget_bytes:
                break
            out.append(model_id)
            held -= node.host_copies[model_id]
        return out

    def _note_use(self, view: ClusterView) -> dict[str, set[str]]:
        """Which models are in use on each node now (and remember it as their last use)."""
        in_use: dict[str, set[str]] = {}
        for device in view.devices:
            models = set(device.hosted) | set(device.draining)
            in_use.setdefault(device.node, set()).update(models)
            for model_id in models:
                self._last_use[(device.node, model_id)] = view.now
        return in_use


__all__ = ["DropHostCopy", "HostCopyPolicy", "activation_seconds", "migration_seconds"]
