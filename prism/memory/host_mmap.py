"""CPU backend: an anonymous MAP_NORESERVE mapping per range; pages committed on map().

The whole range is always readable and writable (the kernel hands out zero pages on demand),
so unlike CUDA a stray touch of an unmapped page does not fault: it silently commits memory.
map() commits pages so resident memory really rises; unmap() drops them with MADV_DONTNEED
so it really falls, and the next map() of that page reads zeros.
"""
from __future__ import annotations

import bisect
import itertools
import mmap

import torch

from prism.memory.backend import MemoryBackend, PhysicalChunk

# Python < 3.13 lacks these constants; the values are Linux's.
_MAP_NORESERVE = getattr(mmap, "MAP_NORESERVE", 0x4000)
_MADV_POPULATE_WRITE = getattr(mmap, "MADV_POPULATE_WRITE", 23)  # Linux >= 5.14
_TOUCH_STRIDE = 4096


class HostMmapBackend(MemoryBackend):
    """Anonymous-mmap backend. max_pages, when given, emulates a device that can hold only
    that many pages at once (create() returns None beyond it), so pools can be tested."""

    def __init__(self, page_size: int = 2 << 20, max_pages: int | None = None):
        if page_size <= 0 or page_size % mmap.PAGESIZE:
            raise ValueError(f"page_size {page_size} must be a multiple of {mmap.PAGESIZE}")
        self.page_size = page_size
        self.device = torch.device("cpu")
        self.max_pages = max_pages
        self._serials = itertools.count(1)
        self._live: dict[int, int] = {}  # chunk handle -> num_pages
        self._ranges: dict[int, tuple[mmap.mmap, torch.Tensor]] = {}  # base -> (mmap, tensor)
        self._bases: list[int] = []  # sorted, to find the range holding an address
        self._mapped: dict[int, int] = {}  # addr -> num_pages
        self._populate = True  # cleared if the kernel refuses MADV_POPULATE_WRITE

    # -- virtual ranges -------------------------------------------------------------------
    def reserve(self, num_bytes: int) -> int:
        self.check_page_multiple(num_bytes, "reserve size")
        mm = mmap.mmap(
            -1,
            num_bytes,
            flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS | _MAP_NORESERVE,
            prot=mmap.PROT_READ | mmap.PROT_WRITE,
        )
        # Transparent huge pages would commit 2 MiB for a small touch (and keep it after a
        # partial DONTNEED), so resident memory would stop meaning "mapped pages".
        if hasattr(mmap, "MADV_NOHUGEPAGE"):
            mm.madvise(mmap.MADV_NOHUGEPAGE)
        # The tensor holds a reference to the mmap, so views outlive free_range() safely.
        tensor = torch.frombuffer(mm, dtype=torch.uint8)
        base = tensor.data_ptr()
        self._ranges[base] = (mm, tensor)
        bisect.insort(self._bases, base)
        return base

    def free_range(self, base: int, num_bytes: int) -> None:
        mm, _ = self._ranges[base]
        if len(mm) != num_bytes:
            raise ValueError(f"free_range size {num_bytes} != reserved size {len(mm)}")
        for addr in [a for a in self._mapped if base <= a < base + num_bytes]:
            del self._mapped[addr]
        mm.madvise(mmap.MADV_DONTNEED)
        del self._ranges[base]
        self._bases.remove(base)
        # No mm.close(): live tensor views may still point here. The mapping goes away
        # when the last of them (and our dropped reference) is collected.

    def _locate(self, addr: int, num_bytes: int) -> tuple[int, int]:
        """(base of the range holding [addr, addr + num_bytes), offset of addr in it)."""
        i = bisect.bisect_right(self._bases, addr) - 1
        if i >= 0:
            base = self._bases[i]
            if addr + num_bytes <= base + len(self._ranges[base][0]):
                return base, addr - base
        raise ValueError(f"[{addr:#x}, +{num_bytes}) is not inside a reserved range")

    # -- physical chunks ------------------------------------------------------------------
    def create(self, num_pages: int) -> PhysicalChunk | None:
        if num_pages < 1:
            raise ValueError(f"num_pages must be >= 1, got {num_pages}")
        if self.max_pages is not None and self.num_live_pages + num_pages > self.max_pages:
            return None
        chunk = PhysicalChunk(next(self._serials), num_pages)
        self._live[chunk.handle] = num_pages
        return chunk

    def release(self, chunk: PhysicalChunk) -> None:
        if self._live.pop(chunk.handle, None) is None:
            raise ValueError(f"release of unknown or released chunk {chunk}")

    @property
    def num_live_pages(self) -> int:
        return sum(self._live.values())

    # -- mapping --------------------------------------------------------------------------
    def map(self, addr: int, chunk: PhysicalChunk) -> None:
        if chunk.handle not in self._live:
            raise ValueError(f"map of unknown or released chunk {chunk}")
        num_bytes = chunk.num_pages * self.page_size
        base, offset = self._locate(addr, num_bytes)
        if offset % self.page_size:
            raise ValueError(f"address {addr:#x} is not page aligned in its range")
        if addr in self._mapped:
            raise ValueError(f"address {addr:#x} is already mapped")
        self._commit(base, offset, num_bytes)
        self._mapped[addr] = chunk.num_pages

    def _commit(self, base: int, offset: int, num_bytes: int) -> None:
        mm, whole = self._ranges[base]
        if self._populate:
            try:
                mm.madvise(_MADV_POPULATE_WRITE, offset, num_bytes)
                return
            except OSError:
                self._populate = False  # old kernel (EINVAL): fall back to touching
        # Read-then-write each 4 KiB page: the write commits it, the values stay as they are.
        touched = whole[offset : offset + num_bytes : _TOUCH_STRIDE]
        touched.copy_(touched.clone())

    def unmap(self, addr: int, num_pages: int, device_done: bool = False) -> None:
        if self._mapped.get(addr) != num_pages:
            raise ValueError(f"{num_pages} pages at {addr:#x} were not mapped by one map() call")
        num_bytes = num_pages * self.page_size
        base, offset = self._locate(addr, num_bytes)
        self._ranges[base][0].madvise(mmap.MADV_DONTNEED, offset, num_bytes)
        del self._mapped[addr]

    # -- views and teardown ---------------------------------------------------------------
    def tensor(self, base: int, num_bytes: int) -> torch.Tensor:
        range_base, offset = self._locate(base, num_bytes)
        return self._ranges[range_base][1][offset : offset + num_bytes]

    def close(self) -> None:
        for base in list(self._bases):
            self.free_range(base, len(self._ranges[base][0]))
        self._live.clear()
