"""CUDA backend: driver virtual memory management (VMM) through cuda-bindings.

reserve = cuMemAddressReserve, create = cuMemCreate, map = cuMemMap + cuMemSetAccess,
unmap = cuCtxSynchronize + cuMemUnmap, release = cuMemRelease, free_range = cuMemAddressFree.

Touching an unmapped address on CUDA is a sticky fault that kills the context, so nothing
here reads or writes memory: torch kernels do that, and only over pages an arena mapped.
"""
from __future__ import annotations

import torch

from prism.memory.backend import MemoryBackend, PhysicalChunk


def import_cuda_driver():
    try:
        from cuda.bindings import driver
    except ImportError:  # cuda-python < 12.6 spelled it this way
        from cuda import cuda as driver
    return driver


class _CudaRange:
    """What torch.as_tensor needs to wrap device memory it did not allocate."""

    def __init__(self, ptr: int, num_bytes: int):
        self.__cuda_array_interface__ = {
            "shape": (num_bytes,),
            "typestr": "|u1",
            "data": (ptr, False),
            "version": 3,
        }


class CudaVmmBackend(MemoryBackend):
    """VMM on one device, in the primary context that torch uses too."""

    def __init__(self, device_index: int, page_size: int | None = None):
        self._drv = import_cuda_driver()
        self.device_index = device_index
        self.device = torch.device("cuda", device_index)
        self._closed = False
        self._call("cuInit", 0)
        self._dev = self._call("cuDeviceGet", device_index)
        # Retaining the primary context (the one torch's runtime uses) keeps our pointers
        # valid in torch's kernels and CUDA graphs.
        self._ctx = self._call("cuDevicePrimaryCtxRetain", self._dev)
        self._call("cuCtxSetCurrent", self._ctx)
        self._prop = self._allocation_prop()
        self.granularity = int(
            self._call(
                "cuMemGetAllocationGranularity",
                self._prop,
                self._drv.CUmemAllocationGranularity_flags.CU_MEM_ALLOC_GRANULARITY_MINIMUM,
            )
        )
        self.page_size = page_size or self.granularity
        if self.page_size % self.granularity:
            raise ValueError(
                f"page_size {self.page_size} must be a multiple of the VMM granularity "
                f"{self.granularity} of cuda:{device_index}"
            )
        self._access = [self._access_desc()]
        self._ranges: dict[int, int] = {}  # base -> num_bytes
        self._mapped: dict[int, int] = {}  # addr -> num_bytes
        self._scratch: int | None = None  # one page, to let torch inspect an unmapped base

    # -- driver plumbing ------------------------------------------------------------------
    def _call(self, name: str, *args):
        """Call a driver function; raise naming it and its CUresult unless it succeeded."""
        err, *values = getattr(self._drv, name)(*args)
        if err != self._drv.CUresult.CUDA_SUCCESS:
            raise RuntimeError(f"{name} failed: {self._error_name(err)} ({int(err)})")
        return values[0] if len(values) == 1 else (tuple(values) or None)

    def _error_name(self, err) -> str:
        status, name = self._drv.cuGetErrorName(err)
        if status != self._drv.CUresult.CUDA_SUCCESS or name is None:
            return str(err)
        return name.decode() if isinstance(name, bytes) else str(name)

    def _allocation_prop(self):
        prop = self._drv.CUmemAllocationProp()
        prop.type = self._drv.CUmemAllocationType.CU_MEM_ALLOCATION_TYPE_PINNED
        prop.location.type = self._drv.CUmemLocationType.CU_MEM_LOCATION_TYPE_DEVICE
        prop.location.id = self.device_index
        return prop

    def _access_desc(self):
        desc = self._drv.CUmemAccessDesc()
        desc.location.type = self._drv.CUmemLocationType.CU_MEM_LOCATION_TYPE_DEVICE
        desc.location.id = self.device_index
        desc.flags = self._drv.CUmemAccess_flags.CU_MEM_ACCESS_FLAGS_PROT_READWRITE
        return desc

    def _bind(self) -> None:
        """Make our context current in this thread (a worker may call from another thread)."""
        current = self._call("cuCtxGetCurrent")
        if current is None or int(current) != int(self._ctx):
            self._call("cuCtxSetCurrent", self._ctx)

    def synchronize(self) -> None:
        self._bind()
        self._call("cuCtxSynchronize")

    # -- virtual ranges -------------------------------------------------------------------
    def reserve(self, num_bytes: int) -> int:
        self.check_page_multiple(num_bytes, "reserve size")
        self._bind()
        base = int(self._call("cuMemAddressReserve", num_bytes, self.page_size, 0, 0))
        self._ranges[base] = num_bytes
        return base

    def free_range(self, base: int, num_bytes: int) -> None:
        if self._ranges.get(base) != num_bytes:
            raise ValueError(f"no reserved range of {num_bytes} bytes at {base:#x}")
        inside = [a for a in self._mapped if base <= a < base + num_bytes]
        if inside:
            self.synchronize()
            for addr in inside:
                self._call("cuMemUnmap", addr, self._mapped.pop(addr))
        self._call("cuMemAddressFree", base, num_bytes)
        del self._ranges[base]

    def _check_inside(self, addr: int, num_bytes: int) -> None:
        for base, size in self._ranges.items():
            if base <= addr and addr + num_bytes <= base + size:
                if (addr - base) % self.page_size:
                    raise ValueError(f"address {addr:#x} is not page aligned in its range")
                return
        raise ValueError(f"[{addr:#x}, +{num_bytes}) is not inside a reserved range")

    # -- physical chunks ------------------------------------------------------------------
    def create(self, num_pages: int) -> PhysicalChunk | None:
        if num_pages < 1:
            raise ValueError(f"num_pages must be >= 1, got {num_pages}")
        self._bind()
        err, handle = self._drv.cuMemCreate(num_pages * self.page_size, self._prop, 0)
        if err == self._drv.CUresult.CUDA_ERROR_OUT_OF_MEMORY:
            return None  # not sticky: the context stays usable
        if err != self._drv.CUresult.CUDA_SUCCESS:
            raise RuntimeError(f"cuMemCreate failed: {self._error_name(err)} ({int(err)})")
        return PhysicalChunk(int(handle), num_pages)

    def release(self, chunk: PhysicalChunk) -> None:
        self._call("cuMemRelease", chunk.handle)

    # -- mapping --------------------------------------------------------------------------
    def map(self, addr: int, chunk: PhysicalChunk) -> None:
        num_bytes = chunk.num_pages * self.page_size
        self._check_inside(addr, num_bytes)
        if addr in self._mapped:
            raise ValueError(f"address {addr:#x} is already mapped")
        self._bind()
        self._call("cuMemMap", addr, num_bytes, 0, chunk.handle, 0)
        try:
            self._call("cuMemSetAccess", addr, num_bytes, self._access, 1)
        except RuntimeError:
            self._call("cuMemUnmap", addr, num_bytes)
            raise
        self._mapped[addr] = num_bytes

    def unmap(self, addr: int, num_pages: int, device_done: bool = False) -> None:
        num_bytes = num_pages * self.page_size
        if self._mapped.get(addr) != num_bytes:
            raise ValueError(f"{num_pages} pages at {addr:#x} were not mapped by one map() call")
        # Kernels queued earlier may still read or write these pages; unmapping under them
        # would be a sticky fault. cuMemUnmap itself does not wait for them.
        if not device_done:
            self.synchronize()
        self._call("cuMemUnmap", addr, num_bytes)
        del self._mapped[addr]

    # -- views and teardown ---------------------------------------------------------------
    def tensor(self, base: int, num_bytes: int) -> torch.Tensor:
        self._check_inside(base, num_bytes)
        if any(a <= base < a + n for a, n in self._mapped.items()):
            return self._wrap(base, num_bytes)
        # Some torch versions ask the runtime which device owns the first byte
        # (cudaPointerGetAttributes), which fails on an unmapped address: back it with a
        # scratch page for that moment. No kernel runs, so nothing touches the scratch page.
        scratch = self._scratch_handle()
        self._bind()
        self._call("cuMemMap", base, self.page_size, 0, scratch, 0)
        try:
            self._call("cuMemSetAccess", base, self.page_size, self._access, 1)
            return self._wrap(base, num_bytes)
        finally:
            self._call("cuMemUnmap", base, self.page_size)

    def _wrap(self, ptr: int, num_bytes: int) -> torch.Tensor:
        tensor = torch.as_tensor(_CudaRange(ptr, num_bytes), device=self.device)
        if tensor.data_ptr() != ptr or tensor.device != self.device:
            raise RuntimeError("torch copied VMM memory instead of wrapping it")
        return tensor

    def _scratch_handle(self) -> int:
        if self._scratch is None:
            chunk = self.create(1)
            if chunk is None:
                raise RuntimeError(f"cuda:{self.device_index} has no free page to build a tensor")
            self._scratch = chunk.handle
        return self._scratch

    def close(self) -> None:
        if self._closed:
            return
        for base, num_bytes in list(self._ranges.items()):
            self.free_range(base, num_bytes)
        if self._scratch is not None:
            self._call("cuMemRelease", self._scratch)
            self._scratch = None
        self._call("cuDevicePrimaryCtxRelease", self._dev)
        self._closed = True

    def driver_version(self) -> int:
        return int(self._call("cuDriverGetVersion"))
