"""Paged KV cache over elastic arenas: one arena for each layer's K and one for its V.

KV page p is page p of all 2 x num_layers arenas at once; it holds `tokens_per_page` token
slots (whole blocks only, so a block never straddles a page). Each layer's cache is a strided
view [num_pages, tokens_per_page, num_kv_heads, head_dim] whose address never changes, so
block tables and (later) CUDA graphs stay valid while pages come and go.
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
        nbytes = layout.num_virtual_pages * layout.page_size
        self._arenas = [Arena(pool, self.owner, nbytes) for _ in range(2 * config.num_layers)]
        self.k_caches = [self._layer_view(a) for a in self._arenas[0::2]]
        self.v_caches = [self._layer_view(a) for a in self._arenas[1::2]]

    def _layer_view(self, arena: Arena) -> torch.Tensor:
        lay = self.layout
        elems_per_page = lay.page_size // lay.dtype.itemsize
        flat = arena.tensor.view(lay.dtype)
        return flat.as_strided(
            (lay.num_virtual_pages, lay.tokens_per_page, lay.num_kv_heads, lay.head_dim),
            (elems_per_page, lay.num_kv_heads * lay.head_dim, lay.head_dim, 1),
        )

    # ---- PageMapper ----------------------------------------------------------------------
    @property
    def pages_per_kv_page(self) -> int:
        return len(self._arenas)

    def num_mappable_pages(self) -> int:
        return mappable_kv_pages(self.pool, self.owner, self.pages_per_kv_page)

    def map_page(self, page: int) -> bool:
        if not self.pool.can_allocate(self.owner, self.pages_per_kv_page):
            return False
        for i, arena in enumerate(self._arenas):
            if not arena.map(page, 1):
                for done in self._arenas[:i]:
                    done.unmap(page, 1)
                return False
        return True

    def unmap_page(self, page: int) -> None:
        for arena in self._arenas:
            arena.unmap(page, 1)

    # ---- lifetime ------------------------------------------------------------------------
    @property
    def num_mapped_pages(self) -> int:
        return self._arenas[0].num_mapped_pages

    def close(self) -> None:
        for arena in self._arenas:
            arena.close()
        self._arenas = []
