"""Paged decode attention in Triton: one new token per sequence, context read through block
tables, split over the context (flash-decoding) so a small batch still fills the GPU.

Grid (batch, kv_heads, splits). A program takes one sequence, one KV head and the whole GQA
group of query heads that share it, padded to 16 rows so the scores are a tensor-core
`tl.dot`: each K/V token is loaded once per group, not once per query head. A program covers
a contiguous slice of its sequence's context; the slice length is computed in the kernel from
`context_lens`, so the grid depends only on the batch size. That keeps a CUDA graph captured
for a batch size valid whatever the contexts are. A second kernel merges the splits with
their log-sum-exp.

Cache slots past a context may hold any bit pattern (fresh GPU pages are not zeroed), so
every K/V load is masked with `other=0` and masked scores are -inf before the softmax.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import triton
import triton.language as tl

from prism.kernels import cache_pointer

if TYPE_CHECKING:  # the engine's type; kernels sit below the engine and only read its fields
    from prism.engine.attention import AttentionMetadata

LOG2E = 1.4426950408889634
TARGET_PROGRAMS = 264  # about two waves of an H100's 132 multiprocessors
MAX_SPLITS = 32


@dataclass(frozen=True)
class DecodeConfig:
    """Tile and pipeline of the decode kernel: keys per loop step (BLOCK_N; head_dim > 128
    halves it to stay within registers), warps per program, loads in flight."""

    # The fastest of benchmarks/engine.py --decode-sweep on an H100 (llama-3.1-8b, batch 256,
    # 1,024 tokens of context: 0.374 ms per layer, 1.04x its KV bytes at the measured copy
    # bandwidth; every BLOCK_N=128 variant tied, 64 was 4% slower, 32 8%).
    block_n: int = 128
    num_warps: int = 8
    num_stages: int = 3


DEFAULT_CONFIG = DecodeConfig()  # what engines use (a benchmark may set another before capture)


def dot_precision(dtype: torch.dtype) -> str:
    """float32 inputs keep full precision (tl.dot would otherwise round them to tf32)."""
    return "ieee" if dtype == torch.float32 else "tf32"


def num_splits_for(batch: int, num_kv_heads: int) -> int:
    """Enough programs to fill the GPU, from the batch size alone (CUDA-graph friendly)."""
    want = -(-TARGET_PROGRAMS // max(1, batch * num_kv_heads))
    return max(1, min(MAX_SPLITS, triton.next_power_of_2(want)))


# Not specialized on the block-table row stride: it varies with the batch outside CUDA graphs
# (see prefill_attention.py).
@triton.jit(do_not_specialize=["stride_bt"])
def _decode_split_kernel(
    q_ptr, k_ptr, k_off, v_ptr, v_off, tables_ptr, ctx_ptr, part_out_ptr, part_lse_ptr, out_ptr,
    stride_qt, stride_qh,
    stride_kp, stride_ks, stride_kh,
    stride_vp, stride_vs, stride_vh,
    stride_bt,
    stride_ot, stride_oh,
    scale_log2,
    head_dim,
    BLOCK_SIZE: tl.constexpr, BLOCKS_PER_PAGE: tl.constexpr,
    GROUP: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    NUM_SPLITS: tl.constexpr, PRECISION: tl.constexpr,
):
    seq = tl.program_id(0)
    kv_head = tl.program_id(1)
    split = tl.program_id(2)
    ctx = tl.load(ctx_ptr + seq)
    # Each split covers a BLOCK_N-aligned slice of the context.
    per_split = tl.cdiv(tl.cdiv(ctx, NUM_SPLITS), BLOCK_N) * BLOCK_N
    lo = split * per_split
    hi = tl.minimum(lo + per_split, ctx)

    rows = tl.arange(0, BLOCK_H)
    dims = tl.arange(0, BLOCK_D)
    row_ok = rows < GROUP
    dim_ok = dims < head_dim
    heads = kv_head * GROUP + rows
    q = tl.load(
        q_ptr + seq * stride_qt + heads[:, None] * stride_qh + dims[None, :],
        mask=row_ok[:, None] & dim_ok[None, :], other=0.0,
    )

    k_ptr += k_off
    v_ptr += v_off
    m_i = tl.full([BLOCK_H], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_H], tl.float32)
    acc = tl.zeros([BLOCK_H, BLOCK_D], tl.float32)
    for start in range(lo, hi, BLOCK_N):
        toks = start + tl.arange(0, BLOCK_N)
        tok_ok = toks < hi
        block = tl.load(tables_ptr + seq * stride_bt + toks // BLOCK_SIZE, mask=tok_ok, other=0)
        page = (block // BLOCKS_PER_PAGE).to(tl.int64)
        slot = (block % BLOCKS_PER_PAGE) * BLOCK_SIZE + toks % BLOCK_SIZE
        kv_mask = tok_ok[:, None] & dim_ok[None, :]
        k = tl.load(
            k_ptr + page[:, None] * stride_kp + slot[:, None] * stride_ks + kv_head * stride_kh
            + dims[None, :], mask=kv_mask, other=0.0,
        )
        s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * scale_log2  # [BLOCK_H, BLOCK_N], in log2 units
        s = tl.where(tok_ok[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        v = tl.load(
            v_ptr + page[:, None] * stride_vp + slot[:, None] * stride_vs + kv_head * stride_vh
            + dims[None, :], mask=kv_mask, other=0.0,
        )
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
        m_i = m_new

    if NUM_SPLITS == 1:
        out = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]
        tl.store(
            out_ptr + seq * stride_ot + heads[:, None] * stride_oh + dims[None, :],
            out.to(out_ptr.dtype.element_ty), mask=row_ok[:, None] & dim_ok[None, :],
        )
    else:
        # Partial results: normalized output and log2-sum-exp per (seq, head, split).
        out = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]
        lse = tl.where(l_i > 0, m_i + tl.log2(tl.where(l_i > 0, l_i, 1.0)), float("-inf"))
        base = (seq * tl.num_programs(1) * GROUP + heads) * NUM_SPLITS + split
        tl.store(part_out_ptr + base[:, None] * BLOCK_D + dims[None, :], out, mask=row_ok[:, None])
        tl.store(part_lse_ptr + base, lse, mask=row_ok)


@triton.jit
def _merge_splits_kernel(
    part_out_ptr, part_lse_ptr, out_ptr, stride_ot, stride_oh, head_dim,
    NUM_SPLITS: tl.constexpr, BLOCK_D: tl.constexpr,
):
    seq = tl.program_id(0)
    head = tl.program_id(1)
    splits = tl.arange(0, NUM_SPLITS)
    dims = tl.arange(0, BLOCK_D)
    base = (seq * tl.num_programs(1) + head) * NUM_SPLITS
    lse = tl.load(part_lse_ptr + base + splits)
    m = tl.max(lse, 0)
    m = tl.where(m == float("-inf"), 0.0, m)  # an empty context (padding row): all weights 0
    w = tl.exp2(lse - m)
    total = tl.sum(w, 0)
    parts = tl.load(part_out_ptr + (base + splits)[:, None] * BLOCK_D + dims[None, :])
    out = tl.sum(parts * w[:, None], 0) / tl.where(total > 0, total, 1.0)
    tl.store(out_ptr + seq * stride_ot + head * stride_oh + dims, out.to(out_ptr.dtype.element_ty),
             mask=dims < head_dim)


def paged_decode_attention(
    q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
    meta: AttentionMetadata, scale: float, num_splits: int | None = None,
    config: DecodeConfig | None = None,
) -> torch.Tensor:
    """q: [batch, heads, head_dim], one query per sequence -> [batch, heads, head_dim].

    Reads only device tensors of `meta` (block_tables, context_lens): safe to capture in a
    CUDA graph. A sequence with context 0 (a padding row) yields zeros."""
    batch, num_heads, head_dim = q.shape
    num_kv_heads = k_cache.shape[2]
    group = num_heads // num_kv_heads
    splits = num_splits or num_splits_for(batch, num_kv_heads)
    block_d = triton.next_power_of_2(head_dim)
    out = torch.empty_like(q)
    if splits > 1:
        part_out = torch.empty(batch * num_heads * splits * block_d, dtype=torch.float32, device=q.device)
        part_lse = torch.empty(batch * num_heads * splits, dtype=torch.float32, device=q.device)
    else:
        part_out = part_lse = out  # unused
    config = config or DEFAULT_CONFIG
    block_n = config.block_n if head_dim <= 128 else max(16, config.block_n // 2)
    _decode_split_kernel[(batch, num_kv_heads, splits)](
        q, *cache_pointer(k_cache), *cache_pointer(v_cache), meta.block_tables, meta.context_lens, part_out, part_lse, out,
        q.stride(0), q.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2),
        meta.block_tables.stride(0),
        out.stride(0), out.stride(1),
        scale * LOG2E, head_dim,
        BLOCK_SIZE=meta.block_size, BLOCKS_PER_PAGE=meta.blocks_per_page,
        GROUP=group, BLOCK_H=max(16, triton.next_power_of_2(group)), BLOCK_N=block_n,
        BLOCK_D=block_d, NUM_SPLITS=splits, PRECISION=dot_precision(q.dtype),
        num_warps=4, num_stages=2,
    )
    if splits > 1:
        _merge_splits_kernel[(batch, num_heads)](
            part_out, part_lse, out, out.stride(0), out.stride(1), head_dim,
            NUM_SPLITS=splits, BLOCK_D=block_d, num_warps=4,
        )
    return out
