"""The backend contract: virtual ranges, physical chunks, and mapping one onto the other.

A backend is a thin mechanism over the device's memory API. It keeps no policy: the page pool
decides how much physical memory may exist, the arena decides where it is mapped. Backends
only track what they need to stay safe (which addresses are mapped, which ranges reserved).
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # torch-free at import: the page pool (and the simulator) need only PhysicalChunk
    import torch


@dataclass(frozen=True)
class PhysicalChunk:
    """Physical memory of num_pages contiguous pages (one cuMemCreate handle on CUDA)."""

    handle: int  # CUDA: CUmemGenericAllocationHandle as int; CPU: a serial number
    num_pages: int


class OutOfPages(Exception):
    """No physical page is available now. The public API returns None/False instead."""


class MemoryBackend(ABC):
    """Reserve virtual ranges, create physical chunks, map chunks into ranges."""

    page_size: int
    device: torch.device

    @abstractmethod
    def reserve(self, num_bytes: int) -> int:
        """Reserve a virtual range (a multiple of page_size); returns its base address."""

    @abstractmethod
    def free_range(self, base: int, num_bytes: int) -> None:
        """Give a reserved range back. Anything still mapped in it is unmapped first."""

    @abstractmethod
    def create(self, num_pages: int) -> PhysicalChunk | None:
        """Create num_pages of physical memory; None when the device has none now."""

    @abstractmethod
    def release(self, chunk: PhysicalChunk) -> None:
        """Destroy a chunk created here (its memory goes back once it is unmapped)."""

    @abstractmethod
    def map(self, addr: int, chunk: PhysicalChunk) -> None:
        """Map chunk at addr (page aligned, inside a reserved range) and make it accessible."""

    @abstractmethod
    def unmap(self, addr: int, num_pages: int, device_done: bool = False) -> None:
        """Unmap exactly one earlier map() call's pages, starting at addr. `device_done`: the
        caller knows that no queued kernel touches them any more (the backend need not wait
        for the device first)."""

    @abstractmethod
    def tensor(self, base: int, num_bytes: int) -> torch.Tensor:
        """A uint8 tensor over [base, base + num_bytes) of a reserved range, fixed address."""

    @abstractmethod
    def close(self) -> None:
        """Unmap and release everything still held; idempotent."""

    def check_page_multiple(self, num_bytes: int, what: str = "size") -> None:
        if num_bytes <= 0 or num_bytes % self.page_size:
            raise ValueError(
                f"{what} {num_bytes} must be a positive multiple of the page size {self.page_size}"
            )
