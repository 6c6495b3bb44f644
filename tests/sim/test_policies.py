"""Each serving system's defining behaviour, as the simulator shows it (H100 nominal rates)."""
import copy
import dataclasses

from prism.bench.trace import TraceRequest, poisson_trace
from prism.cluster.systems import SYSTEMS, System
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


# ---- no head-of-line blocking across models (docs/policies.md) -----------------------------
# One GPU holds an 8B and a 1B model. A 1,000-token decode of the 8B starts at 0; a 10-token
# request to the 1B comes 0.5 s later. Engines that share a GPU by time slices (static,
# muxserve) serve it within a few of its steps; time sharing (swap) serves the 8B's group first.
PAIR = {
    "devices": [{"device": "cuda:0", "memory": "80GiB"}],
    "models": [{"name": "big", "source": "llama-3.1-8b:random", "rate": 1},
               {"name": "small", "source": "llama-3.2-1b:random", "rate": 1}],
}
PAIR_TRACE = [TraceRequest(0.0, "big", 128, 1000), TraceRequest(0.5, "small", 64, 10)]


def pair_run(system):
    records = {r.model: r for r in simulate(config_for(PAIR, system), PAIR_TRACE, ROOFLINE).records}
    big, small = records["big"], records["small"]
    return small.token_s[0] - small.send_s, big.finish_s - big.token_s[0], big.finish_s


def test_static_and_muxserve_serve_a_small_request_while_a_big_model_decodes():
    for system in ("static", "muxserve"):
        small_ttft, big_decode_s, _ = pair_run(system)
        assert big_decode_s > 5.0, system  # ~6 ms per 8B step x 1,000 tokens
        assert small_ttft < 0.05, (system, small_ttft)  # a few steps (one 1B prefill, one 8B decode)
        assert small_ttft < big_decode_s / 100, system


def test_swap_serves_the_small_request_after_the_big_models_group():
    small_ttft, _, big_finish = pair_run("swap")
    assert 0.5 + small_ttft > big_finish  # the 8B's group ran to the end first


def test_swap_keeps_each_models_requests_in_one_device_queue(monkeypatch):
    """QLM-style groups: a request for a model resident nowhere joins the queue where its
    model's requests in flight wait, and that device swaps the model in once for the group.
    Placing each such request anew instead (as prism places activations) swaps more often
    and makes requests wait longer."""
    busy = poisson_trace({"m0": 3.0, "m1": 2.0, "m2": 2.0, "m3": 1.0}, 20.0, (64, 512), (8, 128), seed=3)
    outcome = {}
    for keeps_groups in (True, False):
        spec = dataclasses.replace(SYSTEMS[System.SWAP], keeps_groups=keeps_groups)
        monkeypatch.setitem(SYSTEMS, System.SWAP, spec)
        cluster = SimCluster(config_for(RAW, "swap"), ROOFLINE)
        records = cluster.run(busy)
        assert all(r.ok for r in records)
        swaps = sum(sum(d.device.counters.activations.values()) for d in cluster.devices.values())
        ttfts = sorted(r.ttft for r in records)
        outcome[keeps_groups] = swaps, ttfts[int(0.9 * len(ttfts))]
    assert outcome[True][0] < outcome[False][0] and outcome[True][1] < outcome[False][1], outcome
