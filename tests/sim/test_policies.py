"""Each serving system's defining behaviour, as the simulator shows it (H100 nominal rates)."""
import copy

from prism.bench.trace import TraceRequest, poisson_trace
from prism.memory.page_pool import Owner
from prism.sim.cluster import SimCluster
from prism.sim.costs import ProfileSet
from prism.sim.run import config_for, simulate

RAW = {
    "devices": [{"device": "cuda:0", "memory": "24GiB"}, {"device": "cuda:1", "memory": "24GiB"}],
    "models": [{"name": f"m{i}", "source": src, "rate": r}
               for i, (src, r) in enumerate([("llama-3.2-1b:random", 4), ("llama-3.2-3b:random", 2),
                                             ("llama-3.2-1b:random", 1), ("llama-3.2-3b:random", 1)])],
    "scheduler": {"idle_evict_s": 5},
}
ROOFLINE = ProfileSet({}, {})


def trace():
    busy = poisson_trace({"m0": 3.0, "m1": 1.0, "m2": 1.0, "m3": 0.5}, 8.0, (64, 512), (8, 64), seed=1)
    late = [TraceRequest(20.0 + i, "m0", 128, 16) for i in range(3)]  # m1..m3 idle from ~8 s on
    return busy + late


def resident_by_device(sample):
    return [m for m, st in sample["models"].items() if st["resident"]]


def test_every_request_is_served_under_every_system():
    for system in ("prism", "static", "muxserve", "swap", "dedicated"):
        result = simulate(config_for(RAW, system), trace(), ROOFLINE)
        assert all(r.ok for r in result.records), system
        assert all(r.num_output_tokens == r.output_len for r in result.records), system


def test_static_caps_each_models_kv_and_keeps_everything_resident():
    cluster = SimCluster(config_for(RAW, "static"), ROOFLINE)
    cluster.run(trace())
    caps, home = {}, {}
    for d in cluster.devices.values():
        for m, e in d.device.engines.items():
            if e.resident:
                caps[m], home[m] = d.device.pool.cap_of(Owner(m, "kv")), d.device.device_id
    assert sorted(caps) == ["m0", "m1", "m2", "m3"] and all(c is not None and c > 0 for c in caps.values())
    # shares follow rate x KV bytes: the busiest model gets more than a quiet one of its size
    neighbour = next(m for m in caps if home[m] == home["m0"] and m != "m0")
    assert caps["m0"] > caps[neighbour] or RAW["models"][int(neighbour[1])]["source"] != "llama-3.2-1b:random"
    last = {s["device"]: s for s in cluster.memory_samples}
    assert sorted(m for s in last.values() for m in resident_by_device(s)) == ["m0", "m1", "m2", "m3"]


def test_muxserve_pins_every_model_without_caps():
    cluster = SimCluster(config_for(RAW, "muxserve"), ROOFLINE)
    cluster.run(trace())
    last = {}
    for s in cluster.memory_samples:
        last[s["device"]] = s
    resident = sorted(m for s in last.values() for m in resident_by_device(s))
    assert resident == ["m0", "m1", "m2", "m3"]  # idle for 12 s and still there
    assert all(d.device.pool.cap_of(Owner(m, "kv")) is None for d in cluster.devices.values() for m in d.device.engines)


def with_scheduler(**knobs):
    raw = copy.deepcopy(RAW)
    raw["scheduler"].update(knobs)
    return raw


def last_resident(cluster):
    last = {}
    for s in cluster.memory_samples:
        last[s["device"]] = s
    return sorted(m for s in last.values() for m in resident_by_device(s))


def test_prism_with_idle_evict_always_evicts_idle_models():
    cluster = SimCluster(config_for(with_scheduler(idle_evict="always"), "prism"), ROOFLINE)
    cluster.run(trace())
    assert last_resident(cluster) == ["m0"]  # the others were idle past idle_evict_s


def test_prism_keeps_idle_models_while_nothing_needs_their_memory():
    # m1 is idle from ~8 s to 20 s (past idle_evict_s = 5 s); its next request then pays a
    # weight copy only if the idle model was evicted, which nothing needed (48 GiB, 4 small models)
    comeback = trace() + [TraceRequest(20.0, "m1", 128, 16)]
    runs = {}
    for mode in ("always", "pressure"):
        cluster = SimCluster(config_for(with_scheduler(idle_evict=mode), "prism"), ROOFLINE)
        back = next(r for r in cluster.run(comeback) if r.model == "m1" and r.arrival_s == 20.0)
        activations = sum(d.device.counters.activations["m1"] for d in cluster.devices.values())
        runs[mode] = (activations, back.token_s[0] - back.send_s, cluster)
    assert runs["always"][0] == 1 and runs["pressure"][0] == 0  # (loaded at start: no activation)
    assert runs["pressure"][1] < runs["always"][1]
    assert last_resident(runs["pressure"][2]) == ["m0", "m1", "m2", "m3"]


def test_swap_keeps_one_model_per_device():
    cluster = SimCluster(config_for(RAW, "swap"), ROOFLINE)
    cluster.run(trace())
    # (at t = 0 each device still holds what it loaded; the first step makes way)
    assert all(len(resident_by_device(s)) <= 1 for s in cluster.memory_samples if s["time"] > 0)
    assert sum(sum(d.device.counters.activations.values()) for d in cluster.devices.values()) > 2


def test_dedicated_gives_each_model_its_own_device():
    cluster = SimCluster(config_for(RAW, "dedicated"), ROOFLINE)
    cluster.run(trace())
    assert len(cluster.devices) == 4
    assert all(len(d.device.engines) == 1 for d in cluster.devices.values())


def test_the_simulation_is_deterministic():
    a = simulate(config_for(RAW, "prism"), trace(), ROOFLINE).records
    b = simulate(config_for(copy.deepcopy(RAW), "prism"), trace(), ROOFLINE).records
    assert [(r.token_s, r.finish_s) for r in a] == [(r.token_s, r.finish_s) for r in b]
