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


TWO_MODELS = {"devices": [{"device": "cpu", "memory": "1GiB"}],
              "models": [{"name": "a", "source": "tiny-llama:random"}, {"name": "b", "source": "tiny-llama:random"}],
              "scheduler": {"system": "static", "placement_window_s": 10}}


def two_model_ready(max_model_len: int = 256) -> msg.Ready:
    return msg.Ready("cpu", [msg.ModelInfo(m, max_model_len, 320, 25 << 20, 512, True) for m in ("a", "b")])


def caps_sent(link: Link) -> dict[str, int]:
    return {m.model: m.max_pages for m in link.sent if isinstance(m, msg.SetKVCap)}


def test_static_shares_start_equal_and_follow_the_measured_rates_once():
    """A server knows no rates at start: static partitioning splits the KV memory equally, and
    once placement_window_s has passed, by the requests measured since (once)."""
    links = {"cpu": Link("cpu", two_model_ready())}
    control = ClusterControl(parse_config(TWO_MODELS), links, lambda: {})
    control.start(0.0)
    at_start = caps_sent(links["cpu"])
    assert at_start["a"] == at_start["b"] > 0
    for i in range(9):
        control.record_arrival("a", 1.0 + i, 10, 10)
    control.record_arrival("b", 2.0, 10, 10)
    links["cpu"].sent.clear()
    control.tick(5.0)  # before the window has passed: nothing changes
    assert caps_sent(links["cpu"]) == {}
    control.tick(10.0)
    recapped = caps_sent(links["cpu"])
    assert recapped == {"a": 438, "b": 48}  # 9 : 1 of the same 486 pages, each rounded down
    assert sum(at_start.values()) == 486
    links["cpu"].sent.clear()
    control.tick(30.0)  # once only
    assert caps_sent(links["cpu"]) == {}


def test_static_shares_too_small_for_a_model_stay_as_at_start():
    """By the measured rates b's share could not hold a request of its max_model_len: every
    share stays as it was (no request may wait forever)."""
    links = {"cpu": Link("cpu", two_model_ready(max_model_len=4096))}
    control = ClusterControl(parse_config(TWO_MODELS), links, lambda: {})
    control.start(0.0)
    for i in range(500):
        control.record_arrival("a", 0.01 * i, 10, 10)
    links["cpu"].sent.clear()
    control.tick(10.0)
    assert caps_sent(links["cpu"]) == {}


def test_configured_rates_keep_the_shares_fixed():
    config = dict(TWO_MODELS, models=[dict(m, rate=1.0) for m in TWO_MODELS["models"]])
    links = {"cpu": Link("cpu", two_model_ready())}
    control = ClusterControl(parse_config(config), links, lambda: {})
    control.start(0.0)
    control.record_arrival("a", 1.0, 10, 10)
    links["cpu"].sent.clear()
    control.tick(20.0)
    assert caps_sent(links["cpu"]) == {}
