"""Host copies of weights that the device workers of one node share: one file per model in a
folder on a memory file system (/dev/shm), mapped by every worker that activates the model.

A copy is written once, by the first worker that needs it (it read the model's source), into
a file of its own and renamed into place when complete, so a worker never maps half a copy;
two workers racing each write one and the second rename wins (each keeps the mapping it made
until it drops it). Dropping unlinks the file; workers that still map it keep valid memory
until they let go (the frontend tells every worker of the node), and the memory is freed when
the last one does. On CUDA a mapping is page-locked (cuMemHostRegister), so the copy to the
device runs at pinned speed as a private pinned copy does.

Whoever names the folder owns it: it removes it when the node's workers are gone (files left
in /dev/shm outlive the processes).
"""
from __future__ import annotations

import functools
import logging
import os
from pathlib import Path
from urllib.parse import quote

import torch

from prism.memory.cuda_vmm import import_cuda_driver

log = logging.getLogger(__name__)


class SharedHostCopies:
    """The host copies of one node's workers, in `folder` (created if missing)."""

    def __init__(self, folder: str | Path):
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)

    def path(self, key: str) -> Path:
        return self.folder / (quote(key, safe="") + ".weights")

    def exists(self, key: str) -> bool:
        return self.path(key).is_file()

    def open(self, key: str, num_bytes: int) -> torch.Tensor | None:
        """The copy of `key` mapped into this process, or None if there is none (or it is not
        `num_bytes` long: another model's under the same key, never to be trusted)."""
        path = self.path(key)
        try:
            if path.stat().st_size != num_bytes:
                return None
            return torch.from_file(str(path), shared=True, size=num_bytes, dtype=torch.uint8)
        except (FileNotFoundError, RuntimeError):
            return None  # dropped between the check and the mapping

    def has_room(self, num_bytes: int) -> bool:
        """Whether the folder's file system can take `num_bytes` more, with a margin: a write
        into a full tmpfs through a mapping is a SIGBUS, not an error (a container's /dev/shm
        is often 64 MiB). Without room the caller keeps a private copy instead."""
        st = os.statvfs(self.folder)
        return st.f_bavail * st.f_frsize >= num_bytes + (num_bytes >> 4) + (64 << 20)

    def publish(self, key: str, data: torch.Tensor) -> torch.Tensor:
        """Write `data` (bytes, on any device) as the copy of `key` and return it mapped."""
        path = self.path(key)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        data = data.reshape(-1).view(torch.uint8)
        mapped = torch.from_file(str(tmp), shared=True, size=data.numel(), dtype=torch.uint8)
        try:
            mapped.copy_(data)
            os.replace(tmp, path)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        return mapped

    def drop(self, key: str) -> None:
        self.path(key).unlink(missing_ok=True)


# CU_MEMHOSTREGISTER_PORTABLE: page-locked for every context, so for any device of the node.
_PORTABLE = 0x01


def pin(host: torch.Tensor) -> bool:
    """Page-lock `host` (shared memory mapped here) for fast copies to CUDA devices.

    Through the driver API: a refusal there is only a return code, while a refused
    cudaHostRegister leaves the runtime's last error set and the next kernel launch check
    would report it as its own failure. Some platforms refuse to lock a shared file mapping
    (a sandboxed kernel, say); the copies then take the pageable path: slower, still correct.
    """
    if not torch.cuda.is_available():
        return False
    try:
        driver = import_cuda_driver()
    except ImportError:
        _warn_once("cuda-bindings is not installed (pip install prism[cuda]): shared host copies stay pageable")
        return False
    torch.cuda.synchronize()  # the primary context is current on this thread from here on
    (err,) = driver.cuMemHostRegister(host.data_ptr(), host.numel() * host.element_size(), _PORTABLE)
    if err != driver.CUresult.CUDA_SUCCESS:
        _warn_once(f"cuMemHostRegister refused a shared host copy ({err.name}): activations from it copy pageable memory")
        return False
    return True


def unpin(host: torch.Tensor) -> None:
    driver = import_cuda_driver()
    driver.cuMemHostUnregister(host.data_ptr())


@functools.cache
def _warn_once(message: str) -> None:
    log.warning(message)


__all__ = ["SharedHostCopies", "pin", "unpin"]
