"""The backend for a device name: apart from the backends, which import the base class."""
from __future__ import annotations

import re

from prism.memory.backend import MemoryBackend


def make_backend(device: str, page_size: int) -> MemoryBackend:
    """"cpu" or "cpu:N" -> HostMmapBackend, "cuda:N" (or "cuda") -> CudaVmmBackend. Several
    "cpu:N" devices are separate page budgets on the host (tests and demos of many devices)."""
    if device == "cpu" or re.fullmatch(r"cpu:\d+", device):
        from prism.memory.host_mmap import HostMmapBackend

        return HostMmapBackend(page_size)
    if device == "cuda" or device.startswith("cuda:"):
        from prism.memory.cuda_vmm import CudaVmmBackend

        index = int(device.partition(":")[2] or 0)
        return CudaVmmBackend(index, page_size)
    raise ValueError(f"unknown device {device!r}: expected 'cpu', 'cpu:N' or 'cuda:N'")
