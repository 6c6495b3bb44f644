"""A preemption mid-step asks the local scheduler for a victim with a view of the stepping
model only (DeviceViews.model_snapshot). It must choose as it would with the whole device's
snapshot: checked at every preemption of a busy multi-model device."""
import random

import pytest

from prism.config import DeviceConfig, EngineConfig, ModelSpec
from prism.engine.catalog import resolve_model
from prism.engine.memory_plan import weight_layout
from prism.sched.local import LocalSchedulerConfig
from prism.sim.device import SimDevice
from prism.sim.shapes import model_shape
from prism.types import SamplingParams
from prism.worker.device_core import WorkerConfig

from linear_cost import LinearCost

PAGE = 64 << 10
SOURCES = ("tiny-llama:random", "tiny-qwen2:random", "tiny-qwen3:random")


def device(policy: str) -> SimDevice:
    # Every model's weights fit; KV is short, so bursts preempt while other models have work.
    weights = sum(-(-weight_layout(resolve_model(s).config, 4).num_bytes // PAGE) for s in SOURCES)
    kv_group = 2 * resolve_model(SOURCES[0]).config.num_layers
    engine = EngineConfig(block_size=8, max_num_batched_tokens=96, max_num_seqs=16)
    models = tuple(ModelSpec(f"m{i}", s, ttft_slo_s=0.2 + 0.2 * i, tpot_slo_s=0.02 + 0.01 * i, engine=engine)
                   for i, s in enumerate(SOURCES))
    config = WorkerConfig(DeviceConfig("cpu", (weights + 3 * kv_group) * PAGE, PAGE), models,
                          LocalSchedulerConfig(policy=policy))
    shapes = {m.name: model_shape(m, "cpu") for m in models}
    cost = LinearCost()
    return SimDevice(config, shapes, truth=cost, policy_profiles={}, policy_cost=cost)


@pytest.mark.parametrize("policy", ["prism", "fcfs"])
def test_victims_from_one_models_view_are_the_whole_devices_choice(policy):
    dev = device(policy)
    inner = dev.local.choose_victim
    checks = {"all": 0, "others_busy": 0}

    def checked(view, candidates):
        chosen = inner(view, candidates)
        whole = dev.snapshot()
        assert {r.model_id for r in view.requests} == {candidates[0].model_id}
        assert inner(whole, candidates).req_id == chosen.req_id
        checks["all"] += 1
        checks["others_busy"] += any(r.model_id != candidates[0].model_id for r in whole.requests)
        return chosen

    dev.local.choose_victim = checked
    rng = random.Random(5)
    done = []
    for i in range(60):
        prompt = [rng.randrange(3, 300) for _ in range(rng.randint(10, 100))]
        dev.add_request(f"m{i % 3}", prompt, SamplingParams(temperature=0, max_tokens=rng.randint(20, 60),
                                                            ignore_eos=True), req_id=f"r{i}")
        if i % 4 == 3:
            for _ in range(3):
                done += dev.step().finished
    done += dev.run_until_idle()
    assert len(done) == 60
    assert checks["others_busy"] > 0 and sum(dev.counters.preemptions.values()) >= checks["all"]
