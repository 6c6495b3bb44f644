"""ClusterControl.add_device: a device that joins at run time (its node joined the cluster)."""
from __future__ import annotations

from dataclasses import dataclass, field

from prism.cluster.config import parse_config
from prism.cluster.control import ClusterControl
from prism.config import DeviceConfig
from prism.worker import messages as msg

CONFIG = {"devices": [{"device": "cpu", "memory": "1GiB", "node": "a"}],
          "models": [{"name": "m", "source": "tiny-llama:random"}]}


@dataclass
class Link:
    """A device as ClusterControl sees it (its DeviceLink protocol), recording what it is sent."""

    device_id: str
    ready: msg.Ready
    report: msg.DeviceMemory | None = None
    sent: list = field(default_factory=list)

    def send(self, message) -> None:
        self.sent.append(message)


def ready(device: str, resident: bool) -> msg.Ready:
    return msg.Ready(device, [msg.ModelInfo("m", 256, 320, 25 << 20, 512, resident)])


def report(device: str, resident: bool) -> msg.DeviceMemory:
    return msg.DeviceMemory(0.0, device, 1 << 20, 1024, 900, {"m": msg.ModelMemory(resident, 25, 0, 0, 0, 0, 0, 0)})


def test_a_joined_device_starts_empty_and_is_placed_on():
    config = parse_config(CONFIG)
    links = {"a/cpu": Link("a/cpu", ready("a/cpu", True))}
    control = ClusterControl(config, links, lambda: {"m": 0})
    control.start(0.0)
    joined = Link("b/cpu", ready("b/cpu", True))  # its worker kept the model it loaded
    control.add_device(DeviceConfig("cpu", 2 << 30, node="b"), joined)
    assert joined.sent == [msg.Evict("m"), msg.ReportMemory()]
    assert links["b/cpu"] is joined and control.residency() == {"m": ["a/cpu"]}  # not what its Ready said
    view = control.cluster_view(1.0)
    assert [(d.device_id, d.memory_bytes, d.resident) for d in view.devices] == [
        ("a/cpu", 1 << 30, ("m",)), ("b/cpu", 2 << 30, ())]
    control.on_residency("b/cpu", msg.Evicted("m", 0))  # the worker carried out the Evict
    control.on_residency("b/cpu", msg.Activated("m"))  # later it hosts the model (placed there)
    assert control.residency() == {"m": ["a/cpu", "b/cpu"]}
    control.mark_down("b/cpu")
    assert [d.device_id for d in control.cluster_view(2.0).devices] == ["a/cpu"]
    control.add_device(DeviceConfig("cpu", 2 << 30, node="b"), Link("b/cpu", ready("b/cpu", False)))  # back
    assert [d.device_id for d in control.cluster_view(3.0).devices] == ["a/cpu", "b/cpu"]
