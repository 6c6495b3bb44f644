"""Nodes in the simulator: host copies are per node, an activation on a node without the copy
reads storage first, and each node's copies stay within its budget."""
from prism.bench.trace import TraceRequest
from prism.config import DeviceConfig, ModelSpec
from prism.sched.global_view import TransferRates
from prism.sim.cluster import SimCluster
from prism.sim.costs import HostOverheads, ProfileSet
from prism.sim.device import SimDevice
from prism.sim.run import config_for
from prism.sim.shapes import model_shape
from prism.worker.device_core import WorkerConfig

from linear_cost import LinearCost

GIB = 1 << 30


def sim_device(node: str, copies: set[str], host: HostOverheads) -> SimDevice:
    spec = ModelSpec("m", "llama-3.2-1b:random")
    config = WorkerConfig(DeviceConfig("cuda:0", 24 * GIB, node=node), (spec,))
    cost = LinearCost()
    return SimDevice(config, {"m": model_shape(spec, "cuda:0")}, truth=cost, policy_profiles={},
                     policy_cost=cost, host=host, host_copies=copies)


def test_a_model_evicted_on_node_a_comes_back_faster_on_a_than_on_b():
    host = HostOverheads(storage_bytes_per_s=1e9)
    node_a, node_b = set(), set()
    on_a, on_b = sim_device("a", node_a, host), sim_device("b", node_b, host)
    assert node_a == node_b == {"m"}  # each loaded m at start: its node keeps the copy
    on_b.drop_host_copy("m")  # node b's budget took it
    assert node_b == set() and on_b.memory_report().host_copies == []
    assert on_a.memory_report().host_copies == ["m"] and on_a.memory_report().host_store == "node:a"
    times = {}
    for dev in (on_a, on_b):
        dev.evict("m")
        start = dev.clock.now()
        assert dev.activate("m")
        times[dev.device_id] = dev.clock.now() - start
    weight_bytes = on_a.sizes("m").weight_bytes
    assert times["a/cuda:0"] == LinearCost().activation_time("m")  # the copy in only
    assert times["b/cuda:0"] == weight_bytes / 1e9 + LinearCost().activation_time("m")  # storage first
    assert node_b == {"m"}  # the read made node b a copy again
    assert on_b.engines["m"].executor.num_storage_reads == 1


def test_devices_of_one_node_share_its_copies():
    host = HostOverheads()
    node = set()
    first, second = sim_device("a", node, host), sim_device("a", node, host)
    first.drop_host_copy("m")  # one copy per node: gone for both
    assert second.memory_report().host_copies == []
    second.evict("m")
    second.activate("m")
    assert first.memory_report().host_copies == ["m"]


# Two nodes of one 6 GiB device each (room for two 1B models: 2.3 GiB of weights each), six
# models taking turns, and host room for two copies per node: models leave and come back.
RAW = {
    "devices": [{"device": "cuda:0", "memory": "6GiB", "node": "a"},
                {"device": "cuda:0", "memory": "6GiB", "node": "b"}],
    "nodes": [{"name": "a", "host_memory": "5GiB"}, {"name": "b", "host_memory": "5GiB"}],
    "models": [{"name": f"m{i}", "source": "llama-3.2-1b:random", "ttft_slo_ms": 2000, "tpot_slo_ms": 200}
               for i in range(6)],
    "scheduler": {"idle_evict_s": 2},
}
TRACE = [TraceRequest(1.0 * i, f"m{i % 6}", 128, 32) for i in range(40)]


def test_each_node_keeps_its_copies_within_its_budget():
    cluster = SimCluster(config_for(RAW, "prism"), ProfileSet({}, {}))
    records = cluster.run(TRACE)
    assert all(r.ok for r in records)
    weight = cluster.control._model_infos()["m0"].weight_bytes
    assert 2 * weight <= 5 * GIB < 3 * weight
    # After a last tick and the drops it sends, every node holds at most two copies.
    cluster.control.tick(cluster.now)
    cluster._settle()
    assert all(len(copies) <= 2 for copies in cluster.host_copies.values()), cluster.host_copies
    activations, cold = cluster.activation_counts()
    assert cold > 0  # models came back on a node that had dropped their copy


def test_the_view_carries_nodes_and_copies():
    cluster = SimCluster(config_for(RAW, "prism"), ProfileSet({}, {}))
    cluster.control.start(0.0)
    cluster._settle()
    view = cluster.control.cluster_view(cluster.now)
    assert {d.device_id: d.node for d in view.devices} == {"a/cuda:0": "a", "b/cuda:0": "b"}
    assert {n: s.host_budget_bytes for n, s in view.nodes.items()} == {"a": 5 * GIB, "b": 5 * GIB}
    # every device loaded every model at start: each node holds every copy (until a tick trims)
    assert all(set(s.host_copies) == {f"m{i}" for i in range(6)} for s in view.nodes.values())
    assert view.transfer == TransferRates(50e9, HostOverheads().storage_bytes_per_s)
