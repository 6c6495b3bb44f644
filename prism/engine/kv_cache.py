"""Paged KV cache over one elastic arena, page-major: KV page p is 2 x num_layers physical
pages in a row (layer 0's K, layer 0's V, layer 1's K, ...), mapped with one call.

A KV page holds `tokens_per_page` token slots in every layer (whole blocks only, so a block
never straddles a page). Each layer's cache is a strided view [num_pages, tokens_per_page,
num_kv_heads, head_dim] whose address never changes, so block tables and CUDA graphs stay
valid while pages come and go. Page-major because a driver call costs about the same for one
page as for a hundred: one arena per layer (2 x num_layers calls per KV page) made growing a
batch's KV cost ~20% of its time to first token on an H100 (benchmarks/engine.py --elastic).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from prism.config import ModelConfig
from prism.engine.memory_plan import kv_geometry, mappable_kv_pages  # the torch-free page arithmetic
from prism.memory import Arena, Owner, PagePool


@dataclass(frozen=True)
class KVLayout:
    block_size: int
    blocks_per_page: int
    num_virtual_pages: int
    page_size: int
    dtype: torch.dtype
    num_kv_heads: int
    head_dim: int

    @property
    def tokens_per_page(self) -> int:
        return self.block_size * self.blocks_per_page

    @property
    def block_bytes(self) -> int:
        return self.block_size * self.num_kv_heads * self.head_dim * self.dtype.itemsize

    @classmethod
    def plan(cls, config: ModelConfig, dtype: torch.dtype, block_size: int, pool: PagePool,
             budget_pages: int | None = None):
        """`budget_pages` (default: the pool's) sizes the virtual range; the ranks of a
        tensor-parallel group pass the smallest budget among them so their layouts agree."""
        budget = pool.budget_pages if budget_pages is None else budget_pages
        g = kv_geometry(config, dtype.itemsize, block_size, pool.page_size, budget)
        return cls(
            block_size, g.blocks_per_page, g.num_virtual_pages, pool.page_size, dtype,
            config.num_kv_heads, config.head_dim,
        )


class PagedKVCache:
    """Owns the K/V arenas of one model and maps KV pages for its BlockManager."""

    def __init__(self, model_id: str, config: ModelConfig, layout: KVLayout, pool: PagePool):
        self.layout = layout
        self.pool = pool
        self.owner = Owner(model_id, "kv")
        self.num_layers = config.num_layers
        self._pages_per_kv_page = 2 * config.num_layers
        nbytes = layout.num_virtual_pages * layout.page_size * self._pages_per_kv_page
        self._arena: Arena | None = Arena(pool, self.owner, nbytes)
        self.k_caches = [self._layer_view(2 * n) for n in range(config.num_layers)]
        self.v_caches = [self._layer_view(2 * n + 1) for n in range(config.num_layers)]

    def _layer_view(self, index: int) -> torch.Tensor:
        """The view of physical page `index` of every KV page (2n: layer n's K, 2n+1: its V)."""
        lay = self.layout
        elems_per_page = lay.page_size // lay.dtype.itemsize
        flat = self._arena.tensor.view(lay.dtype)
        return flat.as_strided(
            (lay.num_virtual_pages, lay.tokens_per_page, lay.num_kv_heads, lay.head_dim),
            (elems_per_page * self._pages_per_kv_page, lay.num_kv_heads * lay.head_dim, lay.head_dim, 1),
            flat.storage_offset() + index * elems_per_page,
        )

    # ---- PageMapper ----------------------------------------------------------------------
    @property
    def pages_per_kv_page(self) -> int:
        return self._pages_per_kv_page

    def num_mappable_pages(self) -> int:
        return mappable_kv_pages(self.pool, self.owner, self.pages_per_kv_page)

    def map_page(self, page: int) -> bool:
        n = self._pages_per_kv_page
        return self._arena.map(page * n, n, chunk_pages=n)  # all or nothing

    def unmap_page(self, page: int) -> None:
        n = self._pages_per_kv_page
        self._arena.unmap(page * n, n)

    # ---- lifetime ------------------------------------------------------------------------
    @property
    def num_mapped_pages(self) -> int:
        return self._arena.num_mapped_pages // self._pages_per_kv_page if self._arena else 0

    def close(self) -> None:
        if self._arena is not None:
            self._arena.close()
            self._arena = None
