"""Each baseline's defining behaviour on a two-model micro-trace in the simulator (H100 nominal
rates): the systems they are named after behave this way, so the baselines must too (issue 15;
docs/policies.md). The same micro-trace on a real CPU server: tests/server/test_baselines_real.py."""
import pytest

from prism.bench.trace import TraceRequest
from prism.memory.page_pool import Owner
from prism.sched.adbs import kv_quotas
from prism.sim.cluster import SimCluster
from prism.sim.costs import ProfileSet
from prism.sim.run import config_for, simulate

ROOFLINE = ProfileSet({}, {})
ONE_GPU = [{"device": "cuda:0", "memory": "40GiB"}]
TWO_MODELS = [{"name": "big", "source": "llama-3.1-8b:random"}, {"name": "small", "source": "llama-3.2-1b:random"}]
# An 8B request with 1,000 output tokens, and 0.5 s later a 10-token request to the 1B model.
HOL = [TraceRequest(0.0, "big", 128, 1000), TraceRequest(0.5, "small", 64, 10)]


def raw(devices=ONE_GPU, models=TWO_MODELS):
    return {"devices": devices, "models": models}


def records(system, trace=HOL, config=None):
    out = simulate(config_for(config or raw(), system), trace, ROOFLINE).records
    assert all(r.ok for r in out), system
    return {r.model: r for r in out}


def ttft(r):
    return r.token_s[0] - r.send_s


@pytest.mark.parametrize("system", ["static", "muxserve", "prism"])
def test_a_small_request_is_not_blocked_by_the_other_models_long_decode(system):
    r = records(system)
    big_decode_s = r["big"].finish_s - r["big"].token_s[0]
    assert big_decode_s > 3.0  # the decode it must not wait for is long
    assert ttft(r["small"]) < 0.1, f"{system}: small waited {ttft(r['small']):.2f} s"
    assert r["small"].finish_s < r["big"].finish_s


def test_swap_serves_the_other_model_once_the_group_drains():
    r = records("swap")
    # small's request waits for big's whole decode, then for its weights to be copied in
    assert r["small"].token_s[0] > r["big"].finish_s
    assert ttft(r["small"]) > 3.0


def test_dedicated_runs_each_model_on_its_own_device():
    cluster = SimCluster(config_for(raw(), "dedicated"), ROOFLINE)
    r = {rec.model: rec for rec in cluster.run(HOL)}
    homes = {m: d for d, st in cluster.devices.items() for m, e in st.device.engines.items() if e.resident}
    assert homes == {"big": "cuda:0", "small": "cuda:1"}
    assert ttft(r["small"]) < 0.1


# ---- rates: what a placement made once and MuxServe's quotas go by ----------------------------
SAME_SIZE = [{"name": "hot", "source": "llama-3.2-1b:random"}, {"name": "cold", "source": "llama-3.2-1b:random"}]
# hot gets four requests for each of cold's, for 20 s
SKEWED = sorted([TraceRequest(0.25 * i, "hot", 64, 8) for i in range(80)]
                + [TraceRequest(1.0 * i, "cold", 64, 8) for i in range(20)], key=lambda t: t.arrival_s)


def test_static_kv_shares_follow_the_rates_measured_over_the_first_window():
    cluster = SimCluster(config_for(raw(models=SAME_SIZE), "static"), ROOFLINE)
    cluster.run(SKEWED)
    pool = cluster.devices["cuda:0"].device.pool
    hot, cold = pool.cap_of(Owner("hot", "kv")), pool.cap_of(Owner("cold", "kv"))
    assert cluster.control.placement_rates == pytest.approx({"hot": 80 / 60, "cold": 20 / 60})
    assert hot / cold == pytest.approx(4.0, rel=0.01)
    # the config's rate: overrides what was measured
    over = raw(models=[dict(SAME_SIZE[0], rate=1), dict(SAME_SIZE[1], rate=1)])
    cluster = SimCluster(config_for(over, "static"), ROOFLINE)
    cluster.run(SKEWED)
    pool = cluster.devices["cuda:0"].device.pool
    assert pool.cap_of(Owner("hot", "kv")) == pool.cap_of(Owner("cold", "kv"))


def test_muxserve_kv_quotas_follow_the_request_rates_the_device_measured():
    cluster = SimCluster(config_for(raw(models=SAME_SIZE), "muxserve"), ROOFLINE)
    cluster.run(SKEWED)
    device = cluster.devices["cuda:0"].device
    view = device.snapshot()
    assert view.request_rates == pytest.approx({"hot": 80 / 60, "cold": 20 / 60})
    quotas = kv_quotas(view, 60.0)
    assert quotas["hot"] / quotas["cold"] == pytest.approx(4.0, rel=0.01)
    # muxserve shares one pool: no model is capped
    assert device.pool.cap_of(Owner("hot", "kv")) is None


def test_muxserve_places_by_popularity_times_size_where_compute_is_least():
    # Two popular 8B models land on different GPUs, and the two quiet 1B ones join the GPU
    # with the less popular 8B model (MuxServe's greedy over computation demand).
    models = [{"name": "a8", "source": "llama-3.1-8b:random", "rate": 10},
              {"name": "b8", "source": "llama-3.1-8b:random", "rate": 9},
              {"name": "c1", "source": "llama-3.2-1b:random", "rate": 1},
              {"name": "d1", "source": "llama-3.2-1b:random", "rate": 1}]
    devices = [{"device": "cuda:0", "memory": "40GiB"}, {"device": "cuda:1", "memory": "40GiB"}]
    cluster = SimCluster(config_for(raw(devices, models), "muxserve"), ROOFLINE)
    target = cluster.control.start(0.0)
    assert target["a8"] != target["b8"]
    assert target["c1"] == target["d1"] == target["b8"]


def test_serverless_loads_on_demand_and_evicts_the_least_recently_used_idle_model():
    # Two 8B models on a GPU that holds one: each request loads its model, evicting the other
    # once it is idle; static (every model resident) cannot start at all here.
    models = [{"name": "x", "source": "llama-3.1-8b:random"}, {"name": "y", "source": "llama-3.1-8b:random"},
              {"name": "z", "source": "llama-3.2-1b:random"}]
    config = raw([{"device": "cuda:0", "memory": "24GiB"}], models)
    trace = [TraceRequest(0.0, "x", 128, 16), TraceRequest(2.0, "z", 128, 16), TraceRequest(4.0, "y", 128, 16)]
    cluster = SimCluster(config_for(config, "serverless"), ROOFLINE)
    r = {rec.model: rec for rec in cluster.run(trace)}
    assert all(rec.ok for rec in r.values())
    engines = cluster.devices["cuda:0"].device.engines
    # y needed x's memory: x (idle longest) went, z (used later) stayed
    assert {m for m, e in engines.items() if e.resident} == {"y", "z"}
    assert ttft(r["y"]) > 0.25 > ttft(r["z"])  # y paid for its 16 GB copy over the host link; z was there
    from prism.config import ConfigError
    with pytest.raises(ConfigError, match="fit"):
        simulate(config_for(config, "static"), trace, ROOFLINE)
