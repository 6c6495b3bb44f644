"""Several real models on one CPU device: shared elastic memory, eviction, activation."""
import os
import random

import pytest

from prism.config import DeviceConfig, EngineConfig, ModelSpec
from prism.engine.model_weights import plan_layout
from prism.engine.catalog import resolve_model
from prism.sched.clock import ManualClock
from prism.sched.local import LocalSchedulerConfig
from prism.types import SamplingParams
from prism.worker.device_worker import DeviceWorker, WorkerConfig

import torch

PAGE = 64 << 10
ENGINE = EngineConfig(block_size=8, max_num_batched_tokens=256, max_num_seqs=64)
TINY = ("tiny-llama:random", "tiny-qwen2:random", "tiny-qwen3:random")


def weight_pages(source: str) -> int:
    return -(-plan_layout(resolve_model(source).config, torch.float32).num_bytes // PAGE)


def kv_group_pages(source: str) -> int:
    return 2 * resolve_model(source).config.num_layers


def make_worker(sources, kv_groups: int, clock=None, **sched):
    """A CPU worker whose budget holds every model's weights plus `kv_groups` KV pages."""
    budget = sum(weight_pages(s) for s in sources) + kv_groups * max(map(kv_group_pages, sources)) + 4
    models = tuple(ModelSpec(f"m{i}", s, engine=ENGINE) for i, s in enumerate(sources))
    config = WorkerConfig(DeviceConfig("cpu", budget * PAGE, PAGE), models,
                          LocalSchedulerConfig(**sched))
    return DeviceWorker(config, clock=clock or ManualClock())


def greedy(max_tokens):
    return SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True)


def prompts(n, seed=0, lo=4, hi=40):
    rng = random.Random(seed)
    return [[rng.randrange(3, 49000) for _ in range(rng.randint(lo, hi))] for _ in range(n)]


def test_burst_grows_kv_into_pages_another_model_freed():
    worker = make_worker(TINY[:2], kv_groups=24)
    try:
        budget_kv = worker.pool.free_pages
        # m1 is busy first, then finishes and gives its KV pages back ...
        for p in prompts(16, seed=1):
            worker.add_request("m1", p, greedy(40))
        worker.run_until_idle()
        assert worker.engines["m1"].num_kv_pages <= kv_group_pages(TINY[1])  # one spare page group
        # ... then a burst on m0 takes far more than an even static split would allow.
        for p in prompts(64, seed=2, lo=100, hi=200):
            worker.add_request("m0", p, greedy(100))
        peak = 0
        while worker.has_unfinished:
            worker.step()
            peak = max(peak, worker.engines["m0"].num_kv_pages)
        assert peak > budget_kv / 2, f"m0 peaked at {peak} KV pages of {budget_kv}"
    finally:
        worker.close()


def test_idle_model_is_evicted_and_reactivated_with_identical_output():
    clock = ManualClock()
    worker = make_worker(("smollm2-135m", TINY[0]), kv_groups=8, clock=clock, idle_evict_s=45,
                         idle_evict="always")
    try:
        prompt = "The capital of France is"
        worker.add_request("m0", prompt, greedy(12))
        before = worker.run_until_idle()[0][1]
        clock.advance(50)
        worker.step()
        assert not worker.engines["m0"].resident and worker.counters.evictions["m0"] == 1
        assert worker.memory_report().models["m0"].weight_pages == 0
        worker.add_request("m0", prompt, greedy(12))
        after = worker.run_until_idle()[0][1]
        assert worker.counters.activations["m0"] == 1
        assert after.token_ids == before.token_ids and after.text == before.text
    finally:
        worker.close()


def test_burst_larger_than_memory_completes_every_request():
    worker = make_worker(TINY, kv_groups=3)
    try:
        reqs = {}
        for i, p in enumerate(prompts(60, seed=3, lo=20, hi=60)):
            model = f"m{i % 3}"
            reqs[worker.add_request(model, p, greedy(30))] = model
        done = worker.run_until_idle()
        assert sorted(out.req_id for _, out in done) == sorted(reqs)
        assert all(len(out.token_ids) == 30 for _, out in done)
        assert sum(worker.counters.preemptions.values()) > 0
        assert worker.pool.free_pages > 0
    finally:
        worker.close()


@pytest.mark.parametrize("mode", ["preempt", "drain"])
def test_eviction_with_running_requests(mode):
    ps = prompts(6, seed=4)
    reference = make_worker(TINY[:1], kv_groups=8)
    try:
        for p in ps:
            reference.add_request("m0", p, greedy(20))
        expected = {tuple(o.prompt_token_ids): o.token_ids for _, o in reference.run_until_idle()}
    finally:
        reference.close()

    worker = make_worker(TINY[:1], kv_groups=8)
    done = []
    try:
        for p in ps[:3]:
            worker.add_request("m0", p, greedy(20))
        for _ in range(3):
            done += worker.step().finished
        for p in ps[3:]:
            worker.add_request("m0", p, greedy(20))
        engine = worker.engines["m0"]
        assert engine.num_running == 3
        worker.evict("m0", mode=mode)
        if mode == "preempt":
            assert not engine.resident and not engine.num_running
            assert worker.counters.preemptions["m0"] == 3
            assert worker.memory_report().models["m0"].weight_pages == 0
        else:  # every request it holds, waiting ones too, finishes before the eviction
            assert engine.resident and not engine.admission_paused
            while worker.counters.evictions["m0"] == 0:
                done += worker.step().finished
            assert len(done) == 6 and worker.counters.preemptions["m0"] == 0
        done += worker.run_until_idle()
        assert worker.counters.activations["m0"] == (1 if mode == "preempt" else 0)
    finally:
        worker.close()
    assert {tuple(o.prompt_token_ids): o.token_ids for _, o in done} == expected


def test_metrics_log_is_json_lines_of_requests_and_device_samples(tmp_path):
    import json

    path = tmp_path / "metrics.jsonl"
    sources = TINY[:2]
    budget = sum(weight_pages(s) for s in sources) + 8 * max(map(kv_group_pages, sources)) + 4
    models = tuple(ModelSpec(f"m{i}", s, engine=ENGINE) for i, s in enumerate(sources))
    worker = DeviceWorker(WorkerConfig(DeviceConfig("cpu", budget * PAGE, PAGE), models,
                                       metrics_path=str(path), sample_interval_s=0.0), clock=ManualClock())
    try:
        for i, p in enumerate(prompts(4, seed=5)):
            worker.add_request(f"m{i % 2}", p, greedy(5))
        worker.run_until_idle()
    finally:
        worker.close()
    lines = [json.loads(line) for line in path.read_text().splitlines()]
    requests = [x for x in lines if x["kind"] == "request"]
    samples = [x for x in lines if x["kind"] == "device"]
    assert len(requests) == 4 and {r["model"] for r in requests} == {"m0", "m1"}
    for r in requests:
        assert r["num_output_tokens"] == 5 and len(r["token_times"]) == 5
        assert r["ttft"] is not None and "ttft_met" in r and r["num_preemptions"] == 0
    assert samples and all({"free_pages", "models", "time"} <= set(s) for s in samples)
    assert max(s["models"]["m0"]["kv_pages"] for s in samples) > 0


def test_a_cpu_worker_takes_its_share_of_the_cores():
    """Two CPU workers on one node each run torch on half its cores, not all of them each."""
    before = torch.get_num_threads()
    try:
        budget = weight_pages(TINY[0]) + 2 * kv_group_pages(TINY[0]) + 4
        config = WorkerConfig(DeviceConfig("cpu", budget * PAGE, PAGE), (ModelSpec("m0", TINY[0], engine=ENGINE),),
                              cpu_workers_on_node=2)
        worker = DeviceWorker(config, clock=ManualClock())
        assert torch.get_num_threads() == max(1, (os.cpu_count() or 1) // 2)
        worker.add_request("m0", [5, 6, 7], greedy(3))
        assert len(worker.run_until_idle()) == 1
    finally:
        torch.set_num_threads(before)
