"""Paged KV cache over one elastic arena, page-major: KV page p is 2 x num_layers physical
pages in a row (layer 0's K, layer 0's V, layer 1's K, ...), mapped with one call.

A KV page holds `tokens_per_page` token slots in every layer (whole blocks only, so a block
never straddles a page). Each layer's cache is a strided view [num_pages, tokens_per_page,
num_kv_heads, head_dim] whose address never changes, so block tables and CUDA graphs stay
valid while pages come and go. Page-major because a driver call costs about the same for one
page as for a hundred: one arena per layer (2 x num_layers calls per KV page) made growing a
batch's KV cost ~20% of its time to first token on an H100 (benchmarks/engine.py --elastic).

Unmapping a page must wait until no queued kernel uses it. With overlap (core.py) a request
finishes while the next step is already queued, which may still write the request's last
blocks; waiting for that step then would stall the host for the rest of it. So a page freed
while this model's stream has work queued is unmapped later: once an event recorded behind
that work has passed (checked on every step's collection and whenever the pool is short), or
at once if the page is mapped again meanwhile.
"""
from __future__ import annotations

import threading
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

    def __init__(self, model_id: str, config: ModelConfig, layout: KVLayout, pool: PagePool,
                 stream: torch.cuda.Stream | None = None):
        """`stream`: the CUDA stream of this model's steps (None: the current stream)."""
        self.layout = layout
        self.pool = pool
        self._stream = stream
        self._unmap_after: dict[int, torch.cuda.Event] = {}  # KV page -> the point its kernels end
        self._lock = threading.Lock()  # the pool may run reclaim() from another model's thread
        self.owner = Owner(model_id, "kv")
        self.num_layers = config.num_layers
        self._pages_per_kv_page = 2 * config.num_layers
        nbytes = layout.num_virtual_pages * layout.page_size * self._pages_per_kv_page
        self._arena: Arena | None = Arena(pool, self.owner, nbytes)
        self.k_caches = [self._layer_view(2 * n) for n in range(config.num_layers)]
        self.v_caches = [self._layer_view(2 * n + 1) for n in range(config.num_layers)]
        self._on_cuda = self._arena.tensor.device.type == "cuda"
        pool.add_reclaimer(self.reclaim)

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
        self.pool.reclaim()
        return mappable_kv_pages(self.pool, self.owner, self.pages_per_kv_page) + len(self._unmap_after)

    def map_page(self, page: int) -> bool:
        with self._lock:
            if self._unmap_after.pop(page, None) is not None:
                self.pool.note_deferred(-self._pages_per_kv_page)
                return True  # its deferred unmap had not happened: it is still mapped
        n = self._pages_per_kv_page
        return self._arena.map(page * n, n, chunk_pages=n)  # all or nothing

    def unmap_page(self, page: int) -> None:
        n = self._pages_per_kv_page
        if not self._on_cuda:
            self._arena.unmap(page * n, n)
            return
        stream = self._stream or torch.cuda.current_stream(self._arena.tensor.device)
        if stream.query():  # nothing queued on this model's stream: no kernel can use the page
            self._arena.unmap(page * n, n, device_done=True)
            return
        passed = torch.cuda.Event()
        passed.record(stream)
        with self._lock:
            self._unmap_after[page] = passed
            self.pool.note_deferred(n)

    def reclaim(self, wait: bool = False) -> None:
        """Unmap the pages whose deferred unmap's event has passed (`wait`: all of them,
        waiting for the device)."""
        if not self._unmap_after:  # the common case, on every step: no lock taken
            return
        n = self._pages_per_kv_page
        with self._lock:
            for page, passed in list(self._unmap_after.items()):
                if wait:
                    passed.synchronize()
                elif not passed.query():
                    continue
                del self._unmap_after[page]
                self._arena.unmap(page * n, n, device_done=True)
                self.pool.note_deferred(-n)

    # ---- lifetime ------------------------------------------------------------------------
    @property
    def num_mapped_pages(self) -> int:
        """KV pages mapped and not waiting to be unmapped."""
        if self._arena is None:
            return 0
        return self._arena.num_mapped_pages // self._pages_per_kv_page - len(self._unmap_after)

    def close(self) -> None:
        if self._arena is not None:
            self.pool.remove_reclaimer(self.reclaim)
            self.reclaim(wait=True)
            self._arena.close()
            self._arena = None
