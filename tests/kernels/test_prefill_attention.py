"""The Triton prefill kernel against the reference attention, on random paged caches.

Without CUDA the kernel runs in the Triton interpreter on CPU tensors (slow: sizes are tiny
and small tile sizes make the few tokens span several tiles and inner-loop steps)."""
import os
import random
from types import SimpleNamespace

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is imported
pytest.importorskip("triton")

from prism.engine.attention import paged_attention_reference, write_kv  # noqa: E402
from prism.engine.kv_cache import KVLayout, PagedKVCache  # noqa: E402
from prism.engine.model_runner import ModelRunner  # noqa: E402
from prism.engine.sequence import ScheduledChunk, Sequence, StepPlan  # noqa: E402
from prism.kernels.prefill_attention import (  # noqa: E402
    PrefillConfig, build_tiles, paged_prefill_attention, run_prefill,
)
from prism.types import SamplingParams  # noqa: E402

CUDA = torch.cuda.is_available()
# The interpreter runs only where CUDA is absent (TRITON_INTERPRET is set above for that case).
DEVICES = [pytest.param("cuda", marks=pytest.mark.gpu)] if CUDA else ["cpu"]
TOL = {torch.float32: dict(atol=2e-5, rtol=2e-5), torch.bfloat16: dict(atol=2e-2, rtol=2e-2),
       torch.float16: dict(atol=3e-3, rtol=3e-3)}
# (new tokens, context after this step): decodes, a fresh prompt, chunked-prefill
# continuations, lengths that are not multiples of any tile size
MIXED = [(1, 9), (3, 3), (37, 50), (1, 1), (20, 20), (6, 29)]


def make_batch(seqs, *, num_kv_heads, group, head_dim, block_size, blocks_per_page, dtype, device, seed=0):
    """Random q, a paged K/V cache in the engine's strided layout (pages padded past their
    blocks, every unused slot NaN), and metadata built by the model runner itself."""
    gen = torch.Generator().manual_seed(seed)
    rng = random.Random(seed)
    elem = torch.tensor([], dtype=dtype).element_size()
    block_bytes = block_size * num_kv_heads * head_dim * elem
    page_size = blocks_per_page * block_bytes + 3 * num_kv_heads * head_dim * elem  # page stride > its tokens
    blocks_needed = sum(-(-ctx // block_size) for _, ctx in seqs)
    num_pages = -(-blocks_needed // blocks_per_page) + 2  # spare pages: ids spread over all of them
    lay = KVLayout(block_size=block_size, blocks_per_page=blocks_per_page, num_virtual_pages=num_pages,
                   page_size=page_size, dtype=dtype, num_kv_heads=num_kv_heads, head_dim=head_dim)

    # One layer's K and V pages interleaved page by page, as the engine's page-major arena has them.
    arena = torch.full((2 * num_pages * page_size // elem,), float("nan"), dtype=dtype, device=device)
    kv = SimpleNamespace(layout=lay, _arena=SimpleNamespace(tensor=arena.view(torch.uint8)), _pages_per_kv_page=2)
    k_cache, v_cache = (PagedKVCache._layer_view(kv, i) for i in (0, 1))
    assert k_cache.stride(0) > lay.tokens_per_page * num_kv_heads * head_dim

    free = list(range(num_pages * blocks_per_page))
    rng.shuffle(free)
    chunks, all_slots = [], []
    for i, (q_len, ctx) in enumerate(seqs):
        seq = Sequence(f"s{i}", [0] * ctx, SamplingParams(max_tokens=1))
        seq.block_table = [free.pop() for _ in range(-(-ctx // block_size))]
        chunks.append(ScheduledChunk(seq, ctx - q_len, q_len))
        # the whole context is in the cache (earlier chunks, and this step's tokens)
        full = ModelRunner(None, SimpleNamespace(layout=lay), device).prepare(
            StepPlan((ScheduledChunk(seq, 0, ctx),)))
        all_slots.append(full.meta.slot_mapping)
    meta = ModelRunner(None, SimpleNamespace(layout=lay), device).prepare(StepPlan(tuple(chunks))).meta

    slots = torch.cat(all_slots)
    kv_shape = (slots.numel(), num_kv_heads, head_dim)
    k = torch.randn(kv_shape, generator=gen).to(device, dtype)
    v = torch.randn(kv_shape, generator=gen).to(device, dtype)
    write_kv(k_cache, v_cache, k, v, SimpleNamespace(slot_mapping=slots, tokens_per_page=lay.tokens_per_page))
    num_tokens = sum(q for q, _ in seqs)
    q = torch.randn((num_tokens, num_kv_heads * group, head_dim), generator=gen).to(device, dtype)
    return q, k_cache, v_cache, meta


def check(out, ref, dtype):
    assert out.shape == ref.shape and out.dtype == ref.dtype
    assert torch.isfinite(out.float()).all()
    torch.testing.assert_close(out.float(), ref.float(), **TOL[dtype])


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("group", [1, 4])
@pytest.mark.parametrize("block_size", [5, 16])
def test_mixed_batch_matches_reference(device, dtype, group, block_size):
    q, k, v, meta = make_batch(MIXED, num_kv_heads=2, group=group, head_dim=32, block_size=block_size,
                               blocks_per_page=3, dtype=dtype, device=device)
    scale = 32 ** -0.5
    # 32 rows: 32 or 8 tokens per tile, so 37 new tokens span several tiles; 16 keys a step
    out = run_prefill(q, k, v, meta, scale, PrefillConfig(block_m=32, block_n=16, num_warps=4, num_stages=2))
    check(out, paged_attention_reference(q, k, v, meta, scale), dtype)


@pytest.mark.parametrize("device", DEVICES)
def test_default_config_odd_group_and_head_dim(device):
    """The public entry point's own tile sizes; GQA group 3 (idle rows in each tile) and
    head_dim 24 (padded to 32), as the tiny Qwen3 test model has."""
    q, k, v, meta = make_batch([(70, 75), (1, 40), (9, 9)], num_kv_heads=1, group=3, head_dim=24,
                               block_size=16, blocks_per_page=2, dtype=torch.bfloat16, device=device, seed=1)
    # q as the engine may hand it over: a view into a fused projection, rows further apart
    qkv = torch.randn(q.shape[0], q.shape[1] + 2, q.shape[2], dtype=q.dtype, device=device)
    qkv[:, : q.shape[1]] = q
    q = qkv[:, : q.shape[1]]
    out = paged_prefill_attention(q, k, v, meta, 0.3)
    check(out, paged_attention_reference(q, k, v, meta, 0.3), torch.bfloat16)


@pytest.mark.parametrize("device", DEVICES)
def test_every_tile_alignment(device):
    """5 tokens per tile (group 3 in 16 rows) against 16-key steps: the tiles' first
    positions take every residue mod 16, so the border between unmasked and masked key
    tiles is hit at every offset."""
    q, k, v, meta = make_batch([(80, 85), (35, 35)], num_kv_heads=1, group=3, head_dim=16, block_size=16,
                               blocks_per_page=2, dtype=torch.float32, device=device, seed=4)
    out = run_prefill(q, k, v, meta, 0.25, PrefillConfig(16, 16, 4, 2))
    check(out, paged_attention_reference(q, k, v, meta, 0.25), torch.float32)


@pytest.mark.parametrize("device", DEVICES)
def test_decode_only_batch(device):
    q, k, v, meta = make_batch([(1, 1), (1, 23), (1, 16)], num_kv_heads=2, group=2, head_dim=16,
                               block_size=5, blocks_per_page=4, dtype=torch.float32, device=device, seed=2)
    out = run_prefill(q, k, v, meta, 0.25, PrefillConfig(16, 16, 4, 2))
    check(out, paged_attention_reference(q, k, v, meta, 0.25), torch.float32)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("head_dim,group", [(64, 4), (128, 4), (128, 1), (256, 2)])
def test_gpu_shapes_with_default_config(dtype, head_dim, group):
    """Real-model head sizes, long enough for many tiles and the unmasked inner loop."""
    seqs = [(700, 1000), (1, 513), (250, 250), (33, 300)]
    q, k, v, meta = make_batch(seqs, num_kv_heads=2, group=group, head_dim=head_dim, block_size=16,
                               blocks_per_page=8, dtype=dtype, device="cuda", seed=3)
    scale = head_dim ** -0.5
    check(paged_prefill_attention(q, k, v, meta, scale), paged_attention_reference(q, k, v, meta, scale), dtype)


def test_tile_table_covers_every_token_once_heaviest_first():
    q_lens, ctx = [1, 37, 8, 17], [9, 50, 8, 17]
    tiles = build_tiles(q_lens, ctx, tokens_per_tile=8)
    covered = sorted((int(s), int(f) + j) for s, f in tiles for j in range(min(8, q_lens[s] - f)))
    assert covered == sorted((s, j) for s, n in enumerate(q_lens) for j in range(n))
    work = [ctx[s] - q_lens[s] + min(f + 8, q_lens[s]) for s, f in tiles]
    assert work == sorted(work, reverse=True)
    assert tiles.dtype.name == "int32" and tiles.shape == (1 + 5 + 1 + 3, 2)
