"""Host <-> device copies that do not wait for the device's queue.

`torch.tensor(data, device="cuda")` copies synchronously: it waits until every kernel queued
on the stream has run, which would make the host wait for the step in flight before it could
build the next one (overlap, core.py). Copies from pageable host memory queued with
non_blocking are staged by the driver at once and run in stream order, so the host goes on.
Device-to-host results go to pinned memory and are read after their event (`HostResult`).
"""
from __future__ import annotations

import itertools

import numpy as np
import torch


# Above this size a step input is staged in pinned memory first: the driver stages a copy from
# pageable memory through a bounded buffer of its own and may wait for the copy engine (i.e.
# for the step in flight) when the copy is large; from pinned memory the copy is only queued.
PINNED_STAGING_BYTES = 16 << 10


def device_tensor(data, dtype: torch.dtype, device: torch.device | str) -> torch.Tensor:
    """A host list (nested lists, or a numpy array) as a tensor on `device`, queued in stream
    order."""
    host = torch.from_numpy(data).to(dtype) if isinstance(data, np.ndarray) else torch.tensor(data, dtype=dtype)
    if torch.device(device).type == "cpu":
        return host
    if host.numel() * host.element_size() >= PINNED_STAGING_BYTES:
        # torch's caching host allocator reuses the pinned block once the copy's event passed.
        host = host.pin_memory()
    return host.to(device, non_blocking=True)


def padded_block_tables(tables: list[list[int]]) -> np.ndarray:
    """Block tables as one [len(tables), longest] int32 array, each row padded with block 0
    (a row's context length keeps the kernels from reading past its table). Built in numpy:
    a step of a thousand sequences pads and converts its tables several times faster so."""
    lens = np.fromiter(map(len, tables), np.int64, len(tables))
    width = int(lens.max(initial=0))
    out = np.zeros((len(tables), width), np.int32)
    out[np.arange(width) < lens[:, None]] = np.fromiter(itertools.chain.from_iterable(tables), np.int32, int(lens.sum()))
    return out


def to_host_async(tensor: torch.Tensor) -> torch.Tensor:
    """Start copying `tensor` to host memory; read it once the stream has passed this point
    (`HostResult.wait`). On the CPU this is the tensor itself."""
    if tensor.device.type == "cpu":
        return tensor
    out = torch.empty(tensor.shape, dtype=tensor.dtype, pin_memory=True)
    out.copy_(tensor, non_blocking=True)
    return out


class HostResult:
    """Marks the point in the device's stream after which copies started with
    `to_host_async` are complete."""

    def __init__(self, device: torch.device):
        self._event = None
        if device.type == "cuda":
            self._event = torch.cuda.Event()
            self._event.record(torch.cuda.current_stream(device))

    def wait(self) -> None:
        if self._event is not None:
            self._event.synchronize()

    def query(self) -> bool:
        """Whether the stream has passed this point, without waiting (on the CPU: always)."""
        return self._event is None or self._event.query()
