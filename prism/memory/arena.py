"""An arena: one virtual range reserved for good, physical pages mapped in only while needed.

The range's address never moves, so the tensor over it, typed views of it, block tables and
CUDA graphs captured over it stay valid while pages come and go. Pages come from the pool
(the device budget) as chunks of one or more pages; each chunk is mapped by one backend call
and must be unmapped whole.

Only mapped pages may be read or written. On CUDA touching an unmapped page is a sticky
fault that kills the context; on CPU it silently commits memory outside the budget.
"""
from __future__ import annotations

import math

import torch

from prism.memory.backend import PhysicalChunk
from prism.memory.page_pool import Owner, PagePool

_UNMAPPED = -1


class Arena:
    def __init__(self, pool: PagePool, owner: Owner, num_bytes: int):
        if num_bytes <= 0:
            raise ValueError(f"arena size must be positive, got {num_bytes}")
        self.pool = pool
        self.owner = owner
        self.page_size = pool.page_size
        self.num_pages = math.ceil(num_bytes / self.page_size)
        self.num_bytes = self.num_pages * self.page_size  # the whole reserved range
        self._backend = pool.backend
        self.base = self._backend.reserve(self.num_bytes)
        self.tensor: torch.Tensor = self._backend.tensor(self.base, self.num_bytes)
        self._chunk_start = [_UNMAPPED] * self.num_pages  # page -> first page of its chunk
        self._chunks: dict[int, PhysicalChunk] = {}  # first page -> chunk
        self._num_mapped = 0
        self._closed = False

    # -- views ----------------------------------------------------------------------------
    def view(self, dtype: torch.dtype, shape: tuple[int, ...], offset_bytes: int = 0) -> torch.Tensor:
        """A typed view of the range; the caller reads and writes only mapped pages of it."""
        itemsize = dtype.itemsize
        num_bytes = math.prod(shape) * itemsize
        if offset_bytes < 0 or offset_bytes % itemsize:
            raise ValueError(f"offset {offset_bytes} is not a multiple of {dtype}'s size {itemsize}")
        if offset_bytes + num_bytes > self.num_bytes:
            raise ValueError(
                f"view of {num_bytes} bytes at {offset_bytes} exceeds the arena's {self.num_bytes}"
            )
        raw = self.tensor[offset_bytes : offset_bytes + num_bytes]
        return raw.view(dtype).view(shape)

    def page_of(self, offset_bytes: int) -> int:
        return offset_bytes // self.page_size

    # -- mapping state --------------------------------------------------------------------
    def is_mapped(self, page_index: int) -> bool:
        return self._chunk_start[page_index] != _UNMAPPED

    @property
    def num_mapped_pages(self) -> int:
        return self._num_mapped

    def mapped_chunks(self) -> list[tuple[int, int]]:
        """(first_page, num_pages) of each mapped chunk, in address order."""
        return [(first, self._chunks[first].num_pages) for first in sorted(self._chunks)]

    # -- map and unmap --------------------------------------------------------------------
    def map(self, first_page: int, num_pages: int, chunk_pages: int = 1) -> bool:
        """Map pages [first_page, first_page + num_pages) in chunks of up to chunk_pages.
        All or nothing: on a refusal, undo this call's mappings and return False."""
        self._check_range(first_page, num_pages)
        if chunk_pages < 1:
            raise ValueError(f"chunk_pages must be >= 1, got {chunk_pages}")
        already = [p for p in range(first_page, first_page + num_pages) if self.is_mapped(p)]
        if already:
            raise ValueError(f"pages {already[:8]} of the arena are already mapped")
        if not self.pool.can_allocate(self.owner, num_pages):
            self.pool.reclaim()  # unmaps deferred until the device passed them give pages back
        if not self.pool.can_allocate(self.owner, num_pages):
            # Refuse before touching anything, so a refusal leaves the pool exactly as it was.
            self.pool.note_refusal()
            return False
        done: list[int] = []
        try:
            page = first_page
            while page < first_page + num_pages:
                take = min(chunk_pages, first_page + num_pages - page)
                if not self._map_chunk(page, take):
                    self._unmap_chunks(done)
                    return False
                done.append(page)
                page += take
        except BaseException:
            self._unmap_chunks(done)
            raise
        return True

    def _map_chunk(self, page: int, num_pages: int) -> bool:
        chunk = self.pool.allocate(self.owner, num_pages)
        if chunk is None:
            return False
        start = self.pool.clock()
        try:
            self._backend.map(self._addr(page), chunk)
        except BaseException:
            self.pool.free(self.owner, chunk)
            raise
        self.pool.record_map(self.pool.clock() - start)
        self._chunks[page] = chunk
        self._chunk_start[page : page + num_pages] = [page] * num_pages
        self._num_mapped += num_pages
        return True

    def unmap(self, first_page: int, num_pages: int, device_done: bool = False) -> None:
        """Unmap every chunk inside [first_page, first_page + num_pages) and free it to the
        pool. Unmapped pages in the range are skipped; a chunk straddling an edge is an error.
        `device_done`: no queued kernel touches these pages any more (MemoryBackend.unmap)."""
        self._check_range(first_page, num_pages)
        end = first_page + num_pages
        starts = []
        for page in range(first_page, end):
            start = self._chunk_start[page]
            if start == _UNMAPPED or start in starts:
                continue
            if start < first_page or start + self._chunks[start].num_pages > end:
                raise ValueError(
                    f"chunk at pages [{start}, {start + self._chunks[start].num_pages}) "
                    f"straddles the range [{first_page}, {end})"
                )
            starts.append(start)
        self._unmap_chunks(starts, device_done)

    def _unmap_chunks(self, starts: list[int], device_done: bool = False) -> None:
        for page in starts:
            chunk = self._chunks[page]
            start = self.pool.clock()
            self._backend.unmap(self._addr(page), chunk.num_pages, device_done)
            self.pool.record_unmap(self.pool.clock() - start)
            del self._chunks[page]
            self._chunk_start[page : page + chunk.num_pages] = [_UNMAPPED] * chunk.num_pages
            self._num_mapped -= chunk.num_pages
            self.pool.free(self.owner, chunk)

    def unmap_all(self) -> None:
        self._unmap_chunks(sorted(self._chunks))

    def close(self) -> None:
        """Unmap everything and give the virtual range back. Views of it must not be used
        afterwards (on CUDA their address is no longer valid)."""
        if self._closed:
            return
        self.unmap_all()
        self._backend.free_range(self.base, self.num_bytes)
        self._closed = True

    def __del__(self):
        try:
            if not self._closed:
                self.close()
        except Exception:
            pass  # interpreter shutdown: the backend may already be gone

    # -- helpers --------------------------------------------------------------------------
    def _addr(self, page: int) -> int:
        return self.base + page * self.page_size

    def _check_range(self, first_page: int, num_pages: int) -> None:
        if self._closed:
            raise ValueError("arena is closed")
        if num_pages < 1 or first_page < 0 or first_page + num_pages > self.num_pages:
            raise ValueError(
                f"pages [{first_page}, {first_page + num_pages}) outside the arena's "
                f"{self.num_pages} pages"
            )
