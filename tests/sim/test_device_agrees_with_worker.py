"""The simulated device and the real device worker, step for step.

The real worker runs real tiny models on the CPU under a manual clock that each forward pass
and each weight copy moves by what the cost model says; the simulated device runs the same
requests with engines that only count pages and take the same costs. Both share the step
flow (DeviceCore), the local scheduler, the batch scheduler and the block manager, so every
step must pick the same model and batch the same tokens, and every token must come out at the
same instant, through evictions, activations and preemptions alike.
"""
import random

import pytest

from prism.config import DeviceConfig, EngineConfig, ModelSpec
from prism.engine.memory_plan import weight_layout
from prism.engine.catalog import resolve_model
from prism.sched.clock import ManualClock
from prism.sched.local import LocalSchedulerConfig
from prism.sim.costs import step_seconds
from prism.sim.device import SimDevice
from prism.sim.shapes import model_shape
from prism.types import SamplingParams
from prism.worker.device_worker import DeviceWorker, WorkerConfig

from linear_cost import LinearCost

PAGE = 64 << 10
# Without overlap: the simulated engines step in turn (their host time is a charge per step),
# and overlap reads each step's tokens one step late, so the real worker's flow would differ.
ENGINE = EngineConfig(block_size=8, max_num_batched_tokens=96, max_num_seqs=8, overlap=False)
SOURCES = ("tiny-llama:random", "tiny-qwen2:random", "tiny-qwen3:random")
IDLE_TICK_S = 0.05
KV_PAGES = 2  # KV pages (512 tokens each) beyond two models' weights


def weight_pages(source: str) -> int:
    return -(-weight_layout(resolve_model(source).config, 4).num_bytes // PAGE)


def config(policy: str) -> WorkerConfig:
    # Room for m0 and one of the other two, and a little KV: requests of the third model
    # force evictions and activations, bursts force preemptions.
    kv_group = 2 * resolve_model(SOURCES[0]).config.num_layers
    budget = weight_pages(SOURCES[0]) + max(map(weight_pages, SOURCES[1:])) + KV_PAGES * kv_group
    models = tuple(ModelSpec(f"m{i}", s, ttft_slo_s=0.3 + 0.2 * i, tpot_slo_s=0.05, engine=ENGINE)
                   for i, s in enumerate(SOURCES))
    return WorkerConfig(DeviceConfig("cpu", budget * PAGE, PAGE), models,
                        LocalSchedulerConfig(policy=policy, idle_evict_s=1.0, swap_idle_s=0.2),
                        detokenize=False)


def arrivals(n=24, seed=2):
    rng = random.Random(seed)
    t, out = 0.0, []
    for i in range(n):
        t += rng.expovariate(25.0)
        out.append((t, f"m{rng.choice([0, 0, 1, 2])}", [rng.randrange(3, 300) for _ in range(rng.randint(20, 120))],
                    rng.randint(6, 30), f"r{i}"))
    return out


def virtual_time(worker: DeviceWorker, cost) -> None:
    """Make the real engines take simulated time: each forward pass and weight copy moves
    the worker's manual clock by what `cost` says (the engines still compute everything)."""
    for model_id, engine in worker.engines.items():
        execute, activate = engine.runner.execute, engine.activate

        def timed_execute(plan, while_gpu_runs=None, *, execute=execute, model_id=model_id):
            out = execute(plan, while_gpu_runs)
            worker.clock.advance(step_seconds(cost, model_id, *plan.cost_terms()))
            return out

        def timed_activate(activate=activate, engine=engine, model_id=model_id):
            resident = engine.resident
            activate()
            if not resident:
                worker.clock.advance(cost.activation_time(model_id))

        engine.runner.execute = timed_execute
        engine.activate = timed_activate


def drive(device, clock) -> tuple[list, dict]:
    """Feed the arrivals at their times, step until done; (step log, req_id -> token times)."""
    pending, log, times = arrivals(), [], {}
    while pending or device.has_unfinished:
        while pending and pending[0][0] <= clock.now():
            _, model, prompt, max_tokens, req_id = pending.pop(0)
            device.add_request(model, prompt, SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True),
                               req_id=req_id)
        if not device.has_unfinished:
            clock.set(pending[0][0])
            continue
        out = device.step()
        log.append((out.ran_model, out.num_tokens, round(clock.now(), 9)))
        for _, done in out.finished:
            times[done.req_id] = [round(t, 9) for t in done.metrics["token_times"]]
        if not out.num_tokens:  # nothing runnable now: time passes, as a worker's idle tick
            clock.advance(IDLE_TICK_S)
        assert len(log) < 20_000, "the device makes no progress"
    return log, times


@pytest.mark.parametrize("policy", ["prism", "fcfs"])
def test_same_steps_and_token_times(policy):
    cost = LinearCost()
    cfg = config(policy)
    worker = DeviceWorker(cfg, clock=ManualClock(), cost=cost)
    try:
        virtual_time(worker, cost)
        real_log, real_times = drive(worker, worker.clock)
        real_counters = (dict(worker.counters.evictions), dict(worker.counters.activations),
                         dict(worker.counters.preemptions))
    finally:
        worker.close()
    shapes = {m.name: model_shape(m, "cpu") for m in cfg.models}
    sim = SimDevice(cfg, shapes, truth=cost, policy_profiles={}, policy_cost=cost)
    sim_log, sim_times = drive(sim, sim.clock)
    sim_counters = (dict(sim.counters.evictions), dict(sim.counters.activations), dict(sim.counters.preemptions))

    assert len(real_times) == 24
    assert sum(real_counters[0].values()) > 0 and sum(real_counters[2].values()) > 0  # the case is not trivial
    assert sim_log == real_log
    assert sim_times == real_times
    assert sim_counters == real_counters
