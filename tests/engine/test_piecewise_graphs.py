"""Piecewise graphs of steps with prefill tokens (engine/piecewise_graphs.py) against the plain
forward pass: on the CPU the pieces run eagerly over the static buffers (the buffer and
padding logic), on a GPU they are captured and replayed with Triton attention in between."""
import random

import pytest
import torch

from prism.engine.piecewise_graphs import MixedGraphs, token_buckets
from prism.engine.sequence import ScheduledChunk, Sequence, StepPlan
from prism.types import SamplingParams

from test_batching import engine_for, mixed_requests

GREEDY = SamplingParams(temperature=0, max_tokens=1 << 20, ignore_eos=True)


@pytest.fixture
def folder(tiny_checkpoint):
    folder, _ = tiny_checkpoint("LlamaForCausalLM", initializer_range=0.3)
    return folder


def test_buckets_cover_every_size_up_to_the_largest():
    assert token_buckets(256) == [16, 32, 64, 96, 128, 192, 256]
    assert token_buckets(100) == [16, 32, 64, 96] and token_buckets(8) == [8]
    assert token_buckets(2048)[-3:] == [1024, 1536, 2048]
    big = token_buckets(8192)
    assert all(b / a <= 1.5 for a, b in zip(big[6:], big[7:]))  # padding under half a step beyond 256


def mixed_plan(engine, rng: random.Random, max_prompt: int = 40) -> tuple[StepPlan, list[Sequence]]:
    """A fresh random step: prompt chunks of several lengths (up to `max_prompt` tokens each)
    beside decodes over long contexts."""
    vocab = engine.config.vocab_size
    seqs, chunks = [], []
    for i in range(rng.randint(2, 5)):
        n = rng.randint(1, max_prompt)
        seq = Sequence(f"p{i}", [rng.randrange(vocab) for _ in range(n)], GREEDY)
        assert engine.blocks.allocate(seq, n)
        seqs.append(seq)
        chunks.append(ScheduledChunk(seq, 0, n))
    for i in range(rng.randint(0, 6)):  # decodes: their context written by a first step
        n = rng.randint(20, 120)
        seq = Sequence(f"d{i}", [rng.randrange(vocab) for _ in range(n)], GREEDY)
        assert engine.blocks.allocate(seq, n)
        engine.runner.execute(StepPlan((ScheduledChunk(seq, 0, n - 1),)))
        seqs.append(seq)
        chunks.append(ScheduledChunk(seq, n - 1, 1))
    return StepPlan(tuple(chunks)), seqs


def compare_with_plain_forward(engine, mixed: MixedGraphs, seed: int, atol: float, max_prompt: int = 40) -> None:
    rng = random.Random(seed)
    for _ in range(4):
        plan, seqs = mixed_plan(engine, rng, max_prompt)
        expected = engine.runner.logits_for(plan)
        batch = engine.runner.prepare(plan)
        assert mixed.fits(len(batch.input_ids))
        got = engine.runner.model.logits(mixed.run(batch.input_ids, batch.positions, batch.meta))
        torch.testing.assert_close(got, expected, atol=atol, rtol=0)
        for seq in seqs:
            engine.blocks.free(seq)


def check_pieces(engine, mixed: MixedGraphs, seed: int, atol: float, max_prompt: int = 40) -> None:
    """The pieces' logits equal the plain forward's on fresh random steps, and the runner,
    given the pieces, generates the same tokens as without them."""
    engine.runner.mixed_graphs = None  # logits_for and plain steps: eager
    compare_with_plain_forward(engine, mixed, seed=seed, atol=atol, max_prompt=max_prompt)
    prompts, params = mixed_requests(12, seed=seed + 2)
    plain = engine.generate(prompts, params)
    engine.runner.mixed_graphs = mixed
    assert [o.token_ids for o in engine.generate(prompts, params)] == [o.token_ids for o in plain]


# (the largest bucket, the longest prompt chunk; the tiny model holds 256 positions)
SIZES = [(256, 40), (2048, 240)]


@pytest.mark.parametrize("max_tokens,max_prompt", SIZES)
def test_pieces_over_static_buffers_equal_the_forward_pass_on_cpu(folder, max_tokens, max_prompt):
    engine = engine_for(folder, max_num_batched_tokens=max_tokens)
    try:
        mixed = MixedGraphs(engine.runner.model, engine.kv, engine.device, max_tokens, capture=False)
        check_pieces(engine, mixed, 1, 1e-4, max_prompt)
    finally:
        engine.close()


@pytest.mark.gpu
@pytest.mark.parametrize("max_tokens,max_prompt", SIZES)
def test_captured_pieces_equal_the_forward_pass_on_cuda(folder, max_tokens, max_prompt):
    engine = engine_for(folder, device="cuda:0", max_num_batched_tokens=max_tokens, mixed_graph_max_tokens=max_tokens)
    try:
        mixed = engine.runner.mixed_graphs
        assert mixed is not None and mixed.buckets[-1] == max_tokens
        check_pieces(engine, mixed, 2, 2e-3, max_prompt)
    finally:
        engine.close()
