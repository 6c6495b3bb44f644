"""What each rank of tests/engine/test_tensor_parallel.py runs (also the TP=1 reference).

Kept out of the test module so a spawned rank imports only this (no pytest, no transformers).
"""
from __future__ import annotations

import traceback
from pathlib import Path

import torch

from prism.config import DeviceConfig, EngineConfig
from prism.engine.llm_engine import LLMEngine
from prism.engine.parallel import TPGroup, destroy_tp_group, init_tp_group
from prism.engine.sequence import ScheduledChunk, Sequence, StepPlan
from prism.types import SamplingParams

PAGE = 4096  # small CPU pages, so KV pages come and go (and run out) even for tiny models
GREEDY = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
CPU = dict(device="cpu", kernels="reference", graph_batch=0)


def make_engine(source: str, memory_bytes: int, tp: TPGroup | None = None, device: str = "cpu",
                kernels: str = "reference", graph_batch: int = 0) -> LLMEngine:
    page = PAGE if device == "cpu" else 2 << 20  # CUDA maps 2 MiB pages
    return LLMEngine(
        source, EngineConfig(block_size=5, max_num_batched_tokens=64, kernels=kernels,
                             cuda_graph_max_batch=graph_batch),
        DeviceConfig(device, memory_bytes, page_size=page), dtype=torch.float32, tp=tp,
    )


def teacher_forced_logits(engine: LLMEngine, ids: list[int], prompt_len: int) -> torch.Tensor:
    """Logits of a prefill of ids[:prompt_len], then one decode step per remaining id."""
    seq = Sequence("tf", ids[:prompt_len], SamplingParams())
    rows = [_chunk_logits(engine, seq, 0, prompt_len)]
    for pos in range(prompt_len, len(ids)):
        seq.output_token_ids.append(ids[pos])
        rows.append(_chunk_logits(engine, seq, pos, 1))
    engine.blocks.free(seq)
    return torch.cat(rows)


def _chunk_logits(engine: LLMEngine, seq: Sequence, start: int, num: int) -> torch.Tensor:
    assert engine.blocks.allocate(seq, start + num)
    plan = StepPlan((ScheduledChunk(seq, start, num),))
    logits = engine.runner.logits_for(plan)
    engine.scheduler.commit(plan)
    return logits


def run_case(engine: LLMEngine, case: dict) -> dict:
    out: dict = {}
    if "ids" in case:
        out["logits"] = teacher_forced_logits(engine, case["ids"], case["prompt_len"])
    prompts = case["prompts"]
    out["greedy"] = [o.token_ids for o in engine.generate(prompts, case.get("params", GREEDY))]
    if case.get("sample"):  # unseeded: only rank 0's broadcast tokens keep ranks in step
        params = SamplingParams(temperature=1.0, max_tokens=10, ignore_eos=True)
        out["sampled"] = [o.token_ids for o in engine.generate(prompts, params)]
    if case.get("evict"):
        engine.evict()
        engine.activate()
        out["after_activation"] = [o.token_ids for o in engine.generate(prompts, GREEDY)]
    out["preemptions"] = engine.num_preemptions
    out["weight_bytes"] = engine.weights.num_bytes
    return out


def run_rank(rank: int, size: int, port: int, cases: list[dict], out_dir: str,
             backend: str = "gloo", engine_options: dict = CPU) -> None:
    """One rank: join the group, run every case with this rank's memory, save results.
    On CUDA every rank uses cuda:0 (a check of the sharded path on a one-GPU machine)."""
    torch.set_num_threads(1)
    results: dict = {}
    try:
        tp = init_tp_group(rank, size, port, backend, engine_options["device"], timeout_s=45)
        for case in cases:
            engine = make_engine(case["source"], case["memory"][rank], tp, **engine_options)
            try:
                results[case["name"]] = run_case(engine, case)
            finally:
                engine.close()
            results[case["name"]]["pages_left"] = engine.pool.used_pages
    except BaseException:  # reported by the test, which reads this file
        results["error"] = traceback.format_exc()
    finally:
        torch.save(results, Path(out_dir) / f"rank{rank}.pt")
        destroy_tp_group()
