"""Elastic memory: virtual ranges reserved once, physical pages mapped in while needed.

All arenas of one device draw from one PagePool budget. See DESIGN.md, "Elastic memory".

Names are loaded on first use: the page pool's arithmetic (`prism.memory.page_pool`) is
torch-free, so the simulator can count pages with the very same PagePool without importing
torch; the arenas and the CPU/CUDA backends bring torch in only when asked for.
"""
from __future__ import annotations

import importlib

_WHERE = {
    "Arena": "prism.memory.arena",
    "CudaVmmBackend": "prism.memory.cuda_vmm",  # imports cuda-bindings only when constructed
    "HostMmapBackend": "prism.memory.host_mmap",
    "MemoryBackend": "prism.memory.backend",
    "OutOfPages": "prism.memory.backend",
    "PhysicalChunk": "prism.memory.backend",
    "make_backend": "prism.memory.factory",
    "Owner": "prism.memory.page_pool",
    "PagePool": "prism.memory.page_pool",
    "PoolStats": "prism.memory.page_pool",
}

__all__ = sorted(_WHERE)


def __getattr__(name: str):
    module = _WHERE.get(name)
    if module is None:
        raise AttributeError(f"module 'prism.memory' has no attribute {name!r}")
    return getattr(importlib.import_module(module), name)
