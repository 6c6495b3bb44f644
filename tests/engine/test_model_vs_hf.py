"""Our paged Llama-family forward pass against transformers' own implementation."""
import importlib.util

import pytest
import torch

from conftest import TINY_CONFIGS
from prism.config import DeviceConfig, EngineConfig
from prism.engine.llm_engine import LLMEngine
from prism.engine.sequence import ScheduledChunk, Sequence, StepPlan
from prism.types import SamplingParams

ARCHS = sorted(TINY_CONFIGS)
DEVICES = ["cpu", pytest.param("cuda:0", marks=pytest.mark.gpu)]
# The Triton kernels (interpreted on CPU) against transformers too, not only the reference path.
KERNELS = ["reference", pytest.param("triton", marks=pytest.mark.skipif(
    importlib.util.find_spec("triton") is None, reason="triton is not installed"))]


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def make_engine(folder, device="cpu", block_size=5, kernels="reference"):
    # 64 KiB pages on CPU so several KV pages come and go even for a tiny model.
    page = 2 << 20 if device.startswith("cuda") else 64 << 10
    return LLMEngine(
        folder,
        EngineConfig(block_size=block_size, max_num_batched_tokens=64, kernels=kernels),
        DeviceConfig(device=device, memory_bytes=64 << 20, page_size=page),
        dtype=torch.float32,
    )


def run_chunk(engine, seq: Sequence, start: int, num: int) -> torch.Tensor:
    """Compute tokens [start, start+num) of seq and return their logits (float32, on CPU)."""
    assert engine.blocks.allocate(seq, start + num)
    plan = StepPlan((ScheduledChunk(seq, start, num),))
    logits = engine.runner.logits_for(plan).cpu()
    engine.scheduler.commit(plan)
    return logits


def hf_logits(hf_model, ids, device) -> torch.Tensor:
    with torch.no_grad():
        return hf_model.to(device)(torch.tensor([ids], device=device)).logits[0].float().cpu()


@pytest.mark.parametrize("kernels", KERNELS)
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("arch", ARCHS)
def test_prefill_decode_and_recompute_match_transformers(tiny_checkpoint, arch, device, kernels):
    folder, hf = tiny_checkpoint(arch)
    engine = make_engine(folder, device, kernels=kernels)
    try:
        gen = torch.Generator().manual_seed(1)
        ids = torch.randint(3, 320, (23,), generator=gen).tolist()  # 23: block size 5 does not divide it
        ref = hf_logits(hf, ids, device)
        prompt_len = 13

        seq = Sequence("r0", ids[:prompt_len], SamplingParams())
        prefill = run_chunk(engine, seq, 0, prompt_len)
        assert rel_err(prefill, ref[:prompt_len]) < 1e-4

        # Step-by-step decode, feeding the reference's tokens.
        for pos in range(prompt_len, len(ids)):
            seq.output_token_ids.append(ids[pos])
            step = run_chunk(engine, seq, pos, 1)
            assert rel_err(step[0], ref[pos]) < 1e-4, f"decode at position {pos}"

        # Preempt (drop every block) and recompute everything in uneven chunks.
        engine.blocks.free(seq)
        seq.num_computed_tokens = 0
        pieces = [run_chunk(engine, seq, s, min(7, len(ids) - s)) for s in range(0, len(ids), 7)]
        assert rel_err(torch.cat(pieces), ref) < 1e-4
    finally:
        engine.close()
    assert engine.pool.used_pages == 0


def test_llama_with_attention_bias_matches_transformers(tiny_checkpoint):
    folder, hf = tiny_checkpoint("LlamaForCausalLM", attention_bias=True)
    engine = make_engine(folder)
    try:
        ids = list(range(5, 30))
        logits = run_chunk(engine, Sequence("r", ids, SamplingParams()), 0, len(ids))
    finally:
        engine.close()
    assert engine.config.attention_out_bias
    assert rel_err(logits, hf_logits(hf, ids, "cpu")) < 1e-4


@pytest.mark.parametrize("arch", ARCHS)
def test_greedy_generation_matches_transformers_generate(tiny_checkpoint, arch):
    folder, hf = tiny_checkpoint(arch)
    engine = make_engine(folder)
    try:
        prompt = list(range(10, 27))
        out = engine.generate([prompt], SamplingParams(temperature=0, max_tokens=12, ignore_eos=True))[0]
    finally:
        engine.close()
    with torch.no_grad():
        ref = hf.generate(torch.tensor([prompt]), max_new_tokens=12, do_sample=False,
                          min_new_tokens=12, pad_token_id=0)[0, len(prompt):].tolist()
    assert out.token_ids == ref
