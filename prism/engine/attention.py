"""Attention over paged KV: metadata that travels with the batch, and the reference path.

The reference is plain PyTorch (CPU and CUDA): write this step's K/V into their slots, then
for each sequence gather its context through its block table and run causal attention.
It handles prefill chunks and decodes in one mixed batch. The Triton kernels (prism/kernels)
take the same metadata and the same cache views and are tested against this path.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass
class AttentionMetadata:
    """Everything attention needs about one batch; built by the model runner per step."""

    # device tensors
    slot_mapping: torch.Tensor  # [num_tokens] int64: page * tokens_per_page + slot in page
    block_tables: torch.Tensor  # [num_seqs, max_blocks] int32, padded with 0
    context_lens: torch.Tensor  # [num_seqs] int32: tokens in cache after this step
    query_start_loc: torch.Tensor  # [num_seqs + 1] int32: where each seq's new tokens start
    # host copies, so the reference loop never synchronizes with the device
    query_lens_host: list[int]
    context_lens_host: list[int]
    block_tables_host: list[list[int]]
    block_size: int
    blocks_per_page: int
    max_query_len: int = 0
    max_context_len: int = 0
    decode_splits: int | None = None  # fixed context splits of the decode kernel (CUDA graphs)

    @property
    def num_seqs(self) -> int:
        return len(self.query_lens_host)

    @property
    def tokens_per_page(self) -> int:
        return self.block_size * self.blocks_per_page


def write_kv(
    k_cache: torch.Tensor, v_cache: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
    meta: AttentionMetadata,
) -> None:
    """Store this step's keys and values ([num_tokens, kv_heads, head_dim]) in their slots;
    slot -1 stores nothing (as in the Triton kernel)."""
    tpp = meta.tokens_per_page
    slot_mapping = meta.slot_mapping
    if bool((slot_mapping < 0).any()):  # padding rows of a graph's bucket: nothing to store
        keep = slot_mapping >= 0
        slot_mapping, k, v = slot_mapping[keep], k[keep], v[keep]
    pages = slot_mapping // tpp
    slots = slot_mapping % tpp
    k_cache[pages, slots] = k.to(k_cache.dtype)
    v_cache[pages, slots] = v.to(v_cache.dtype)


def gather_context(cache: torch.Tensor, block_ids: list[int], length: int, meta: AttentionMetadata):
    """The first `length` tokens of one sequence's K or V: [length, kv_heads, head_dim]."""
    num_pages, tpp, heads, dim = cache.shape
    by_block = cache.view(num_pages, meta.blocks_per_page, meta.block_size, heads, dim)
    blocks = torch.tensor(block_ids, device=cache.device, dtype=torch.long)
    tokens = by_block[blocks // meta.blocks_per_page, blocks % meta.blocks_per_page]
    return tokens.reshape(-1, heads, dim)[:length]


def paged_attention_reference(
    q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
    meta: AttentionMetadata, scale: float,
) -> torch.Tensor:
    """q: [num_tokens, heads, head_dim] -> [num_tokens, heads, head_dim]. Keys/values must
    already be written. Computed in float32 whatever the cache dtype."""
    if meta.max_query_len == 1:
        return _decode_reference(q, k_cache, v_cache, meta, scale)
    out = torch.empty_like(q)
    start = 0
    for i, (q_len, ctx_len) in enumerate(zip(meta.query_lens_host, meta.context_lens_host)):
        num_blocks = -(-ctx_len // meta.block_size)
        block_ids = meta.block_tables_host[i][:num_blocks]
        k = gather_context(k_cache, block_ids, ctx_len, meta).float()
        v = gather_context(v_cache, block_ids, ctx_len, meta).float()
        qs = q[start : start + q_len].float()
        # Query j sits at absolute position ctx_len - q_len + j and sees keys 0..that position.
        q_pos = torch.arange(ctx_len - q_len, ctx_len, device=q.device)
        mask = torch.arange(ctx_len, device=q.device)[None, :] <= q_pos[:, None]
        o = F.scaled_dot_product_attention(
            qs.transpose(0, 1).unsqueeze(0),
            k.transpose(0, 1).unsqueeze(0),
            v.transpose(0, 1).unsqueeze(0),
            attn_mask=mask,
            scale=scale,
            enable_gqa=True,
        )
        out[start : start + q_len] = o.squeeze(0).transpose(0, 1).to(q.dtype)
        start += q_len
    return out


def _decode_reference(q, k_cache, v_cache, meta: AttentionMetadata, scale: float) -> torch.Tensor:
    """All sequences decode one token: gather every context at once (padded to the longest)
    and run one masked attention instead of one per sequence."""
    num_pages, tpp, heads, dim = k_cache.shape
    bpp, bs = meta.blocks_per_page, meta.block_size
    blocks = meta.block_tables.long()  # [B, max_blocks]
    pages, in_page = blocks // bpp, blocks % bpp

    def gather(cache):
        by_block = cache.view(num_pages, bpp, bs, heads, dim)
        t = by_block[pages, in_page]  # [B, max_blocks, bs, heads, dim]
        return t.reshape(t.shape[0], -1, heads, dim).transpose(1, 2).float()

    positions = torch.arange(blocks.shape[1] * bs, device=q.device)
    mask = positions[None, :] < meta.context_lens[:, None]  # [B, max_len]
    # Slots past a context hold whatever the page held before (fresh CUDA pages are not
    # zeroed): zero them, since NaN bit patterns would leak through a masked softmax.
    keep = mask[:, None, :, None]
    k = gather(k_cache).masked_fill(~keep, 0.0)
    v = gather(v_cache).masked_fill(~keep, 0.0)
    o = F.scaled_dot_product_attention(
        q.float().unsqueeze(2), k, v, attn_mask=mask[:, None, None, :], scale=scale, enable_gqa=True
    )
    return o.squeeze(2).to(q.dtype)
