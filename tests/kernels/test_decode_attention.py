"""The Triton decode attention and fused layer kernels against the PyTorch reference path,
on fresh random inputs (Triton's interpreter on CPU, compiled on CUDA)."""
import pytest
import torch

pytest.importorskip("triton")

from prism.engine.attention import AttentionMetadata, paged_attention_reference  # noqa: E402
from prism.kernels.decode_attention import num_splits_for, paged_decode_attention  # noqa: E402

# Compiled on a GPU; on CPU Triton's interpreter, whose bfloat16 tl.dot is broken (it reads
# the bits wrongly), so bfloat16 is checked on the GPU only.
DEVICE = "cuda:0" if torch.cuda.is_available() else "cpu"
DTYPES = [torch.float32, torch.float16] + ([torch.bfloat16] if DEVICE != "cpu" else [])
TOL = {torch.float32: 2e-5, torch.float16: 2e-3, torch.bfloat16: 2e-2}


def paged_setup(context_lens, kv_heads, head_dim, block_size, blocks_per_page, dtype, device, seed=0):
    """Random K/V caches (unused slots hold NaN) and shuffled block tables for the contexts."""
    gen = torch.Generator().manual_seed(seed)
    tables, next_free = [], 0
    total_blocks = sum(-(-c // block_size) for c in context_lens) + 3
    perm = torch.randperm(total_blocks, generator=gen).tolist()
    for c in context_lens:
        n = -(-c // block_size)
        tables.append(perm[next_free:next_free + n])
        next_free += n
    num_pages = -(-total_blocks // blocks_per_page) + 1
    tpp = block_size * blocks_per_page
    # A page stride larger than its tokens, as the arena views have.
    flat_k = torch.full((num_pages, tpp + 3, kv_heads, head_dim), float("nan"), dtype=dtype)
    flat_v = flat_k.clone()
    k_cache, v_cache = flat_k[:, :tpp].to(device), flat_v[:, :tpp].to(device)
    for t, c in zip(tables, context_lens):
        for pos in range(c):
            b = t[pos // block_size]
            page, slot = b // blocks_per_page, (b % blocks_per_page) * block_size + pos % block_size
            k_cache[page, slot] = torch.randn(kv_heads, head_dim, generator=gen).to(dtype).to(device)
            v_cache[page, slot] = torch.randn(kv_heads, head_dim, generator=gen).to(dtype).to(device)
    return k_cache, v_cache, tables


def decode_meta(context_lens, tables, block_size, blocks_per_page, device) -> AttentionMetadata:
    width = max(len(t) for t in tables)
    return AttentionMetadata(
        slot_mapping=torch.zeros(len(context_lens), dtype=torch.long, device=device),
        block_tables=torch.tensor([t + [0] * (width - len(t)) for t in tables], dtype=torch.int32, device=device),
        context_lens=torch.tensor(context_lens, dtype=torch.int32, device=device),
        query_start_loc=torch.arange(len(context_lens) + 1, dtype=torch.int32, device=device),
        query_lens_host=[1] * len(context_lens), context_lens_host=list(context_lens),
        block_tables_host=tables, block_size=block_size, blocks_per_page=blocks_per_page,
        max_query_len=1, max_context_len=max(context_lens),
    )


def rel_err(a, b) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("heads,kv_heads,head_dim,block_size,splits", [
    (4, 4, 32, 5, None),   # no GQA, a block size that divides nothing
    (8, 2, 64, 16, 1),     # GQA 4, one split (no merge kernel)
    (6, 2, 24, 16, 4),     # GQA 3 padded to 16 rows, head_dim not a power of two
])
def test_decode_matches_reference(dtype, heads, kv_heads, head_dim, block_size, splits):
    device, context_lens = DEVICE, [1, 37, 130, 64]
    k_cache, v_cache, tables = paged_setup(context_lens, kv_heads, head_dim, block_size, 3, dtype, device)
    meta = decode_meta(context_lens, tables, block_size, 3, device)
    q = torch.randn(len(context_lens), heads, head_dim, generator=torch.Generator().manual_seed(5)).to(dtype).to(device)
    ref = paged_attention_reference(q, k_cache, v_cache, meta, head_dim ** -0.5)
    out = paged_decode_attention(q, k_cache, v_cache, meta, head_dim ** -0.5, num_splits=splits)
    assert not out.isnan().any()
    assert rel_err(out, ref) < TOL[dtype]


def test_padding_rows_give_zeros_and_splits_follow_batch():
    device = DEVICE
    k_cache, v_cache, tables = paged_setup([20, 1], 2, 32, 16, 2, torch.float32, device)
    meta = decode_meta([20, 0], [tables[0], [0]], 16, 2, device)  # row 1: context 0 (padding)
    q = torch.randn(2, 4, 32).to(device)
    out = paged_decode_attention(q, k_cache, v_cache, meta, 0.2, num_splits=8)
    assert torch.equal(out[1], torch.zeros_like(out[1]))
    assert num_splits_for(1, 8) > num_splits_for(64, 8) >= 1
