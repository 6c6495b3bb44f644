"""Paged attention in Triton for variable-length query chunks: prompts, chunked prefill
continuing an earlier chunk, and decode rows, all in one mixed batch.

Flash-attention forward (online softmax, float32 accumulators, exp2 with log2(e) folded into
the scale) whose K/V tiles are gathered token by token through the block tables.

Tiling. A program takes one KV head and one *tile* of one sequence: TOKENS_PER_TILE
consecutive new tokens times the GROUP query heads that share that KV head, packed into the
BLOCK_M rows of the M dimension (row r = token r // GROUP, head r % GROUP; for the usual
head-major layout these rows are even contiguous in q). Each K/V tile is loaded once for the
whole GQA group, and a decode row (q_len 1) still fills GROUP rows of the tensor-core tile
instead of one. Non-power-of-two groups leave BLOCK_M % GROUP rows idle.

Tile table. The host (from meta's host lists, no device sync) lists (sequence, first new
token) for every tile, heaviest first (most keys to read) so that the long tail of a big
prompt starts early and short tiles fill the last wave. The table is an int32 tensor built
once per batch and reused by every layer (cached on the metadata object's identity). Grid is
1-D: program = tile * num_kv_heads + kv_head, so all heads of a heavy tile start together.

Causal structure. Query j of a sequence with q_len new tokens and context ctx sits at
position ctx - q_len + j and sees keys 0..that position (bottom-right aligned). For a tile
whose first token sits at position p0 and last at p1, keys [0, p0] are visible to every row:
those KV tiles run without any mask. KV tiles in (p0, p1] are masked (causal and context);
KV tiles past p1 are never visited, which skips the upper triangle of a long prompt.

Garbage. Slots past a context may hold any bit pattern, NaN included (fresh GPU pages are
not zeroed). The unmasked loop only touches positions < p0 + 1 <= ctx; the masked loop loads
with other=0 and sets masked scores to -inf before the exponent.
"""
from __future__ import annotations

import weakref
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import torch
import triton
import triton.language as tl

from prism.kernels import cache_pointer, fix_interpreter_scalars

if TYPE_CHECKING:  # the engine's type; kernels sit below the engine and only read its fields
    from prism.engine.attention import AttentionMetadata

LOG2E = 1.4426950408889634


@dataclass(frozen=True)
class PrefillConfig:
    block_m: int  # rows of a tile: tokens_per_tile * group (+ idle rows when group is not a power of 2)
    block_n: int  # keys per inner-loop step
    num_warps: int
    num_stages: int


def default_config(head_dim: int, dtype: torch.dtype, group: int) -> PrefillConfig:
    """Tile sizes for H100 (fine on other GPUs): 128 query rows, one warpgroup. Measured on
    an H100 (benchmarks/attention_kernels.py prefill --sweep, 4096 tokens, 32/8 heads,
    head_dim 128, bf16): 128x32 keys, 4 warps, 2 stages 0.404 ms; 128x64/4 warps/3 stages
    0.414 ms; 128x64/8 warps/3 stages 0.465 ms; 128x128/8/3 0.434 ms. head_dim 64 keeps the
    usual 128x64. float32 operands and head_dim 256 halve a dimension for registers and
    shared memory."""
    block_d = _block_d(head_dim)
    if dtype == torch.float32:
        cfg = PrefillConfig(64, 32, 4, 2)
    elif block_d <= 64:
        cfg = PrefillConfig(128, 64, 4, 3)
    elif block_d <= 128:
        cfg = PrefillConfig(128, 32, 4, 2)
    else:
        cfg = PrefillConfig(64, 32, 4, 2)
    if cfg.block_m < group:  # very wide groups (MQA): at least one token per tile
        cfg = PrefillConfig(triton.next_power_of_2(group), cfg.block_n, cfg.num_warps, cfg.num_stages)
    return cfg


def short_config(head_dim: int, dtype: torch.dtype, group: int) -> PrefillConfig:
    """Tiles for sequences with few new tokens (decode rows of a mixed batch): the smallest
    tensor-core tile, so a decode row does not pay 128 rows of dot products per key."""
    wide = dtype == torch.float32 or _block_d(head_dim) > 128
    return PrefillConfig(max(16, triton.next_power_of_2(group)), 32 if wide else 64, 4, 2 if wide else 3)


def _block_d(head_dim: int) -> int:
    return max(16, triton.next_power_of_2(head_dim))


@triton.jit
def _slots(table, pos, pos_ok, stride_bb, BLOCK_SIZE: tl.constexpr, BLOCKS_PER_PAGE: tl.constexpr):
    """(page, slot in page) of each token position, through the sequence's block table."""
    block = tl.load(table + (pos // BLOCK_SIZE) * stride_bb, mask=pos_ok, other=0)
    page = (block // BLOCKS_PER_PAGE).to(tl.int64)
    slot = (block % BLOCKS_PER_PAGE) * BLOCK_SIZE + pos % BLOCK_SIZE
    return page, slot


@triton.jit
def _online_softmax_step(s, v, m_i, l_i, acc, dot_ty: tl.constexpr, PRECISION: tl.constexpr):
    """Fold one KV tile into the running max, sum and output; s is in log2 units."""
    m_new = tl.maximum(m_i, tl.max(s, 1))
    p = tl.exp2(s - m_new[:, None])
    alpha = tl.exp2(m_i - m_new)
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = acc * alpha[:, None]
    acc = tl.dot(p.to(dot_ty), v.to(dot_ty), acc, input_precision=PRECISION)
    return m_new, l_i, acc


@triton.jit
def _tile_of(pid, tiles_ptr, qstart_ptr, ctx_ptr, NUM_KV_HEADS: tl.constexpr, TOKENS_PER_TILE: tl.constexpr):
    """Program `pid`'s work: (KV head, sequence, first new token of the tile within it, the
    sequence's first row in q, the position of its first new token, the tile's new tokens)."""
    tile = pid // NUM_KV_HEADS
    seq = tl.load(tiles_ptr + 2 * tile)
    first = tl.load(tiles_ptr + 2 * tile + 1)
    q_begin = tl.load(qstart_ptr + seq)
    q_len = tl.load(qstart_ptr + seq + 1) - q_begin
    past = tl.load(ctx_ptr + seq) - q_len
    return pid % NUM_KV_HEADS, seq, first, q_begin, past, tl.minimum(q_len - first, TOKENS_PER_TILE)


@triton.jit
def _cache_offsets(page, slot, dims, stride_p, stride_s, stride_d):
    """Offsets of a KV tile's rows (cache slots) and head dimensions in a paged cache."""
    return page[:, None] * stride_p + slot[:, None] * stride_s + dims[None, :] * stride_d


@triton.jit
def _load_unmasked_rows(ptrs, dim_ok, FULL_HEAD: tl.constexpr):
    """A tile whose rows are all valid: no mask at all when it spans the whole head."""
    if FULL_HEAD:
        return tl.load(ptrs)
    return tl.load(ptrs, mask=dim_ok[None, :], other=0.0)


# The block-table row stride changes with the longest sequence of a batch; Triton would compile
# a variant for each of its value classes (1, multiple of 16, other), a pause of about a second
# in the middle of serving each time a new class turns up.
@triton.jit(do_not_specialize=["stride_bt"])
def _prefill_kernel(
    q_ptr, k_ptr, k_anchor_off, v_ptr, v_anchor_off, out_ptr, tiles_ptr, tables_ptr, ctx_ptr, qstart_ptr,
    stride_qt, stride_qh, stride_qd,
    stride_kp, stride_ks, stride_kh, stride_kd,
    stride_vp, stride_vs, stride_vh, stride_vd,
    stride_ot, stride_oh, stride_od,
    stride_bt, stride_bb,
    scale_log2,
    NUM_KV_HEADS: tl.constexpr, GROUP: tl.constexpr, TOKENS_PER_TILE: tl.constexpr,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_SIZE: tl.constexpr, BLOCKS_PER_PAGE: tl.constexpr, PRECISION: tl.constexpr,
    DOT_FP32: tl.constexpr,
):
    kv_head, seq, first, q_begin, past, n_tok = _tile_of(tl.program_id(0), tiles_ptr, qstart_ptr, ctx_ptr,
                                                          NUM_KV_HEADS, TOKENS_PER_TILE)

    rows = tl.arange(0, BLOCK_M)
    tok = first + rows // GROUP
    head = kv_head * GROUP + rows % GROUP
    row_ok = rows < n_tok * GROUP
    q_pos = past + tok
    dims = tl.arange(0, BLOCK_D)
    dim_ok = dims < HEAD_DIM

    q_off = (q_begin + tok)[:, None] * stride_qt + head[:, None] * stride_qh + dims[None, :] * stride_qd
    q = tl.load(q_ptr + q_off, mask=row_ok[:, None] & dim_ok[None, :], other=0.0)
    # tl.dot operands in the cache dtype (bf16/fp16 tensor cores), or float32 when DOT_FP32:
    # the Triton 3.6 interpreter multiplies bfloat16 as raw uint16 bits.
    dot_ty = tl.float32 if DOT_FP32 else k_ptr.dtype.element_ty
    q = q.to(dot_ty)

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)

    table = tables_ptr + seq.to(tl.int64) * stride_bt
    k_head = k_ptr + k_anchor_off + kv_head * stride_kh  # see prism.kernels.cache_pointer
    v_head = v_ptr + v_anchor_off + kv_head * stride_vh
    cols = tl.arange(0, BLOCK_N)
    # Keys [0, past + first] are visible to every row of the tile: whole KV tiles there
    # need no mask at all (and are all inside the context).
    full_end = (past + first + 1) // BLOCK_N * BLOCK_N
    kv_end = past + first + n_tok  # one past the last valid row's position (<= ctx)

    for start in range(0, full_end, BLOCK_N):
        pos = start + cols
        page, slot = _slots(table, pos, cols < BLOCK_N, stride_bb, BLOCK_SIZE, BLOCKS_PER_PAGE)  # all true
        k_rows = _cache_offsets(page, slot, dims, stride_kp, stride_ks, stride_kd)
        v_rows = _cache_offsets(page, slot, dims, stride_vp, stride_vs, stride_vd)
        k = _load_unmasked_rows(k_head + k_rows, dim_ok, BLOCK_D == HEAD_DIM)
        s = tl.dot(q, tl.trans(k.to(dot_ty)), input_precision=PRECISION) * scale_log2
        v = _load_unmasked_rows(v_head + v_rows, dim_ok, BLOCK_D == HEAD_DIM)
        m_i, l_i, acc = _online_softmax_step(s, v, m_i, l_i, acc, dot_ty, PRECISION)

    # The diagonal band: causal mask, and never a position at or past kv_end (<= ctx).
    for start in range(full_end, kv_end, BLOCK_N):
        pos = start + cols
        pos_ok = pos < kv_end
        page, slot = _slots(table, pos, pos_ok, stride_bb, BLOCK_SIZE, BLOCKS_PER_PAGE)
        kv_mask = pos_ok[:, None] & dim_ok[None, :]
        k_rows = _cache_offsets(page, slot, dims, stride_kp, stride_ks, stride_kd)
        v_rows = _cache_offsets(page, slot, dims, stride_vp, stride_vs, stride_vd)
        k = tl.load(k_head + k_rows, mask=kv_mask, other=0.0)
        s = tl.dot(q, tl.trans(k.to(dot_ty)), input_precision=PRECISION)
        visible = (pos[None, :] <= q_pos[:, None]) & pos_ok[None, :]
        s = tl.where(visible, s * scale_log2, float("-inf"))
        # Every row sees key 0 (q_pos >= 0, kv_end >= 1), so the running max is finite from
        # the first step.
        v = tl.load(v_head + v_rows, mask=kv_mask, other=0.0)
        m_i, l_i, acc = _online_softmax_step(s, v, m_i, l_i, acc, dot_ty, PRECISION)

    out = acc / l_i[:, None]
    o_off = (q_begin + tok)[:, None] * stride_ot + head[:, None] * stride_oh + dims[None, :] * stride_od
    tl.store(out_ptr + o_off, out.to(out_ptr.dtype.element_ty), mask=row_ok[:, None] & dim_ok[None, :])


# ---- host side -----------------------------------------------------------------------------

def build_tiles(query_lens, context_lens, tokens_per_tile: int, seqs=None) -> np.ndarray:
    """[num_tiles, 2] int32 (sequence, first new token) covering the new tokens of `seqs`
    (default: every sequence), heaviest tile first. Vectorized: cheap for hundreds of
    sequences."""
    q_all = np.asarray(query_lens, dtype=np.int64)
    ctx_all = np.asarray(context_lens, dtype=np.int64)
    seqs = np.arange(len(q_all), dtype=np.int64) if seqs is None else np.asarray(seqs, dtype=np.int64)
    q_lens, ctx = q_all[seqs], ctx_all[seqs]
    counts = -(-q_lens // tokens_per_tile)
    total = int(counts.sum())
    tile_seq = np.repeat(np.arange(len(seqs), dtype=np.int64), counts)
    tile_starts = np.cumsum(counts) - counts  # index of each sequence's first tile
    first = (np.arange(total, dtype=np.int64) - np.repeat(tile_starts, counts)) * tokens_per_tile
    # Work of a tile ~ keys it reads: the position of its last token + 1.
    work = ctx[tile_seq] - q_lens[tile_seq] + np.minimum(first + tokens_per_tile, q_lens[tile_seq])
    order = np.argsort(-work, kind="stable")
    return np.stack([seqs[tile_seq[order]], first[order]], axis=1).astype(np.int32)


# One batch's tile tables, reused by every layer of the step: (metadata ref, lists, {key: tiles}).
_tile_cache: tuple[weakref.ref, list, dict] | None = None


def _tiles_for(meta: AttentionMetadata, tokens_per_tile: int, short_tokens: int, device: torch.device):
    """(tiles of tokens_per_tile for the longer sequences, tiles of short_tokens for the
    sequences with at most short_tokens new tokens); either is None when it has no tile."""
    global _tile_cache
    cached = _tile_cache
    if cached is None or cached[0]() is not meta or cached[1][0] is not meta.query_lens_host:
        cached = (weakref.ref(meta), [meta.query_lens_host], {})
        _tile_cache = cached
    key = (tokens_per_tile, short_tokens, device)
    if key not in cached[2]:
        q_lens = np.asarray(meta.query_lens_host)
        short = q_lens <= short_tokens
        parts = []
        for seqs, tpt in ((np.flatnonzero(~short), tokens_per_tile), (np.flatnonzero(short), short_tokens)):
            table = build_tiles(q_lens, meta.context_lens_host, tpt, seqs) if len(seqs) else None
            parts.append(None if table is None or not len(table) else torch.from_numpy(table).to(device, non_blocking=True))
        cached[2][key] = tuple(parts)
    return cached[2][key]


def _kernel_for(device: torch.device):
    """The compiled kernel, or on CPU tensors the Triton interpreter's (which needs
    TRITON_INTERPRET=1 before triton is first imported: triton.language's own helpers are
    built as interpreted or compiled functions at that moment)."""
    if device.type != "cpu":
        return _prefill_kernel
    if isinstance(_prefill_kernel, triton.runtime.JITFunction):
        raise RuntimeError("paged_prefill_attention on CPU tensors needs the Triton interpreter: "
                           "set TRITON_INTERPRET=1 before triton is imported")
    fix_interpreter_scalars()
    return _prefill_kernel


def paged_prefill_attention(q, k_cache, v_cache, meta: AttentionMetadata, scale: float) -> torch.Tensor:
    """q: [num_tokens, heads, head_dim] (each sequence's new tokens, concatenated) ->
    [num_tokens, heads, head_dim] in q's dtype. K/V of the new tokens must be in the cache.
    Same result as `paged_attention_reference` (float32 accumulation)."""
    head_dim, dtype = q.shape[2], k_cache.dtype
    group = q.shape[1] // max(1, k_cache.shape[2])
    return run_prefill(q, k_cache, v_cache, meta, scale, default_config(head_dim, dtype, group),
                       short_config(head_dim, dtype, group))


def run_prefill(q, k_cache, v_cache, meta: AttentionMetadata, scale: float, config: PrefillConfig,
                short: PrefillConfig | None = None) -> torch.Tensor:
    """paged_prefill_attention with explicit tile sizes (tests and benchmark sweeps). With
    `short`, sequences whose new tokens fit one `short` tile go to a second launch of it."""
    num_tokens, num_heads, head_dim = q.shape
    num_pages, tokens_per_page, num_kv_heads, kv_dim = k_cache.shape
    if kv_dim != head_dim or v_cache.shape != k_cache.shape or v_cache.dtype != k_cache.dtype:
        raise ValueError(f"q {tuple(q.shape)}, k {tuple(k_cache.shape)} {k_cache.dtype}, "
                         f"v {tuple(v_cache.shape)} {v_cache.dtype} do not match")
    if num_heads % num_kv_heads:
        raise ValueError(f"{num_heads} query heads are not a multiple of {num_kv_heads} KV heads")
    if tokens_per_page != meta.tokens_per_page:
        raise ValueError(f"cache has {tokens_per_page} tokens per page, metadata says {meta.tokens_per_page}")
    group = num_heads // num_kv_heads
    out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    if num_tokens == 0 or meta.num_seqs == 0:
        return out
    if config.block_m < group:
        raise ValueError(f"block_m {config.block_m} is smaller than the GQA group {group}")
    if short is not None and (short.block_m < group or short.block_m >= config.block_m):
        short = None
    short_tokens = short.block_m // group if short is not None else 0
    long_tiles, short_tiles = _tiles_for(meta, config.block_m // group, short_tokens, q.device)
    for tiles, cfg in ((long_tiles, config), (short_tiles, short)):
        if tiles is not None:
            _launch(q, k_cache, v_cache, out, meta, scale, tiles, cfg, group)
    return out


def _launch(q, k_cache, v_cache, out, meta, scale, tiles, config: PrefillConfig, group: int) -> None:
    num_kv_heads, head_dim = k_cache.shape[2], q.shape[2]
    grid = (tiles.shape[0] * num_kv_heads,)
    interpret = q.device.type == "cpu"
    _kernel_for(q.device)[grid](
        q, *cache_pointer(k_cache), *cache_pointer(v_cache), out, tiles,
        meta.block_tables, meta.context_lens, meta.query_start_loc,
        *q.stride(), *k_cache.stride(), *v_cache.stride(), *out.stride(),
        *meta.block_tables.stride(),
        scale * LOG2E,
        NUM_KV_HEADS=num_kv_heads, GROUP=group, TOKENS_PER_TILE=config.block_m // group,
        HEAD_DIM=head_dim, BLOCK_D=_block_d(head_dim), BLOCK_M=config.block_m, BLOCK_N=config.block_n,
        BLOCK_SIZE=meta.block_size, BLOCKS_PER_PAGE=meta.blocks_per_page,
        PRECISION="ieee" if k_cache.dtype == torch.float32 or interpret else "tf32",
        DOT_FP32=interpret,
        num_warps=config.num_warps, num_stages=config.num_stages,
    )
