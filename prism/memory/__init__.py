"""Elastic memory: virtual ranges reserved once, physical pages mapped in while needed.

All arenas of one device draw from one PagePool budget. See DESIGN.md, "Elastic memory".
"""
from prism.memory.arena import Arena
from prism.memory.backend import MemoryBackend, OutOfPages, PhysicalChunk, make_backend
from prism.memory.cuda_vmm import CudaVmmBackend  # imports cuda-bindings only when constructed
from prism.memory.host_mmap import HostMmapBackend
from prism.memory.page_pool import Owner, PagePool, PoolStats

__all__ = [
    "Arena",
    "CudaVmmBackend",
    "HostMmapBackend",
    "MemoryBackend",
    "OutOfPages",
    "Owner",
    "PagePool",
    "PhysicalChunk",
    "PoolStats",
    "make_backend",
]
