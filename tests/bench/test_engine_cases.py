"""benchmarks/engine_cases.py on a tiny CPU model: the cases run end to end and say what
they measured (their GPU figures come from the device; here only that they work)."""
import sys
from pathlib import Path

import torch

from prism.config import DeviceConfig, EngineConfig
from prism.engine.llm_engine import LLMEngine
from prism.types import SamplingParams

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))

import engine_cases  # noqa: E402
import offline_case  # noqa: E402

GREEDY_8 = SamplingParams(temperature=0, max_tokens=8)


def tiny_engine(tiny_checkpoint, **kw):
    folder, _ = tiny_checkpoint("LlamaForCausalLM")
    return LLMEngine(folder, EngineConfig(block_size=8, max_num_seqs=64, max_num_batched_tokens=256),
                     DeviceConfig("cpu", 256 << 20, 64 << 10), dtype=torch.float32, **kw)


def test_offline_case_counts_tokens_and_splits_the_wall_time(tiny_checkpoint):
    engine = tiny_engine(tiny_checkpoint)
    try:
        with_overlap, without = offline_case.offline_case(engine, [(20, 5), (7, 3), (33, 4)], "mixed", host_profile=5,
                                                            api_profile=(1, 3))
        assert (with_overlap["overlap"], without["overlap"]) == (True, False) and engine.overlap
        profile = with_overlap["host_profile"]
        assert len(profile) == 5 and profile[0]["own_s"] >= profile[-1]["own_s"] and profile[0]["calls"] >= 1
        assert with_overlap["same_tokens_as_without_overlap"]
        api = with_overlap["api_profile"]
        assert api["launches"] == [1, 3] and api["host_calls"]
        assert not any(c["call"].startswith("cuda") for c in api["host_calls"])  # no CUDA on this machine
        for case in (with_overlap, without):
            assert case["output_tokens"] == 12 and case["requests"] == 3
            assert case["steps"]["mixed"] >= 1 and case["steps"]["decode"] >= 1
            assert {"KV pages mapped", "KV pages unmapped"} <= case["steps"].keys() & case["seconds"].keys()
            assert 0 < case["seconds"]["schedule"] < case["time_ms"] / 1e3
            assert case["gpu_idle_between_steps_us"] == {}  # no events on the CPU
        engine.generate([[1, 2, 3]])  # the engine's own methods are back after the case
        assert "step" not in vars(engine) and "launch" not in vars(engine.runner) and "map_page" not in vars(engine.kv)
        import prism.engine.model_runner as runner_module
        from prism.engine.sampler import sample
        assert runner_module.sample is sample and "attention" not in vars(engine.runner.model)
    finally:
        engine.close()


def test_many_models_case_steps_every_model_in_each_mode(tiny_checkpoint):
    first = tiny_engine(tiny_checkpoint)
    others = [tiny_engine(tiny_checkpoint, pool=first.pool, model_id=f"m{i}") for i in range(2)]
    engines = [first, *others]
    try:
        rows = engine_cases.many_models_case(engines, batch=4, context=12, rounds=5)
        assert [r["mode"] for r in rows] == ["one model per step", "overlap, one stream", "overlap, a stream per model"]
        assert all(r["models"] == 3 and r["tokens_per_s"] > 0 for r in rows) and rows[0]["vs_one_model_per_step"] == 1
        assert not any(e.has_unfinished for e in engines)  # its requests are gone afterwards
    finally:
        for e in reversed(engines):
            e.close()


def test_elastic_case_compares_on_demand_with_static_pages(tiny_checkpoint):
    engine = tiny_engine(tiny_checkpoint)
    try:
        cases = engine_cases.elastic_overhead_case(engine, alone=(3, 100, 6), together=(8, 60, 20))
        assert {(c["load"], c["metric"]) for c in cases} == {
            (load, m) for load in ("alone", "batch8") for m in ("ttft_ms", "tpot_ms")}
        assert all(c["time_ms"] > 0 and c["roofline_ms"] > 0 for c in cases)
        assert engine.blocks.num_spare_pages == 1 and engine.blocks.num_mapped_pages <= 1
    finally:
        engine.close()


def test_activation_case_restores_the_model(tiny_checkpoint):
    engine = tiny_engine(tiny_checkpoint, keep_host_copy=True)
    try:
        before = engine.generate([[5, 6, 7]], GREEDY_8)[0].token_ids
        case = engine_cases.activation_case(engine, h2d_bandwidth=1e9, repeats=2)
        assert case["weight_bytes"] == engine.weights.num_bytes and case["time_ms"] > 0
        assert engine.generate([[5, 6, 7]], GREEDY_8)[0].token_ids == before
    finally:
        engine.close()
