"""A model's weights laid out in one elastic arena.

Fused tensors are laid out so that each Hugging Face parameter is a view into them: q, k and v
projections sit back to back (one [q + 2kv, hidden] matrix), gate and up likewise. Loading
copies each checkpoint tensor into its view; the forward pass uses the fused views, so one
matmul does the work of three. The arena's address never changes, so a later eviction can
unmap the pages and a reactivation can copy the bytes back into the same place.
"""
from __future__ import annotations

from typing import Iterator

import torch

from prism.config import ModelConfig
from prism.engine.memory_plan import WeightLayout, weight_layout  # the torch-free page arithmetic
from prism.engine.host_store import SharedHostCopies, pin, unpin
from prism.errors import UserError
from prism.memory import Arena, Owner, PagePool

WEIGHT_CHUNK_PAGES = 512  # map weights 1 GiB at a time: one large handle maps far faster than many pages


class WeightsLoadError(UserError):
    """A checkpoint does not fit the model (missing, unexpected or misshaped tensors)."""


def plan_layout(config: ModelConfig, dtype: torch.dtype, vocab_shards: int = 1) -> WeightLayout:
    return weight_layout(config, dtype.itemsize, vocab_shards)


class ModelWeights:
    """The weight arena of one model and typed views of its fused tensors."""

    def __init__(self, model_id: str, config: ModelConfig, dtype: torch.dtype, pool: PagePool,
                 vocab_shards: int = 1, host_store: SharedHostCopies | None = None, store_key: str = ""):
        """`config` and `vocab_shards`: a tensor-parallel rank's sharded view (tp_shard.py).
        `host_store`: where the node's workers share host copies (under `store_key`, which
        must name these exact bytes); None: the copy is private to this process."""
        self.config = config
        self.dtype = dtype
        self.layout = plan_layout(config, dtype, vocab_shards)
        self.arena = Arena(pool, Owner(model_id, "weights"), self.layout.num_bytes)
        self.tensors: dict[str, torch.Tensor] = {}
        self._host_copy: torch.Tensor | None = None
        self._pinned = False  # a shared mapping page-locked here (cudaHostRegister)
        self._store = host_store
        self._store_key = store_key
        self.copy_dropped = False  # the node's budget took the copy: an eviction keeps none

    @property
    def num_bytes(self) -> int:
        return self.layout.num_bytes

    @property
    def num_pages(self) -> int:
        return -(-self.layout.num_bytes // self.arena.page_size)

    def map(self) -> bool:
        """Back the whole arena with physical pages; False if the pool cannot give them."""
        ok = self.arena.map(0, self.num_pages, chunk_pages=WEIGHT_CHUNK_PAGES)
        if ok:
            self.tensors = {
                name: self.arena.view(self.dtype, slot.shape, slot.offset)
                for name, slot in self.layout.slots.items()
            }
        return ok

    def unmap(self) -> None:
        self.tensors = {}
        self.arena.unmap_all()

    def load(self, named_tensors: Iterator[tuple[str, torch.Tensor]], source: str) -> None:
        """Copy a checkpoint in, checking that every expected tensor comes exactly once."""
        missing = set(self.layout.hf_names)
        for hf_name, tensor in named_tensors:
            if hf_name not in self.layout.hf_names:
                if hf_name == "lm_head.weight" and self.config.tie_word_embeddings:
                    continue  # some tied checkpoints still carry a copy of the embedding
                if "rotary_emb" in hf_name:
                    continue
                raise WeightsLoadError(f"{source}: unexpected tensor {hf_name!r}")
            fused, lo, hi = self.layout.hf_names[hf_name]
            dst = self.tensors[fused][lo:hi]
            if tuple(tensor.shape) != tuple(dst.shape):
                raise WeightsLoadError(
                    f"{source}: tensor {hf_name!r} has shape {tuple(tensor.shape)}, "
                    f"expected {tuple(dst.shape)}"
                )
            dst.copy_(tensor)
            missing.discard(hf_name)
        if missing:
            raise WeightsLoadError(
                f"{source}: {len(missing)} tensors missing, e.g. {sorted(missing)[0]!r}"
            )

    @property
    def has_host_copy(self) -> bool:
        """Whether restore_host_copy() can run: a copy mapped here, or one in the node's store."""
        return self._host_copy is not None or (self._store is not None and self._store.exists(self._store_key))

    def save_host_copy(self) -> None:
        """Keep the weight bytes in host memory (pinned on CUDA) so the model can be evicted
        and restored. Weights never change after loading, so one copy serves every eviction;
        with a node's store, the copy another worker wrote serves this one too."""
        self.copy_dropped = False
        if self._host_copy is not None or self._open_shared():
            return
        device_bytes = self.arena.tensor[: self.num_bytes]
        if self._store is not None and self._store.has_room(self.num_bytes):
            self._host_copy = self._store.publish(self._store_key, device_bytes)
            self._pin_shared()
            return
        pin_memory = device_bytes.device.type == "cuda"
        self._host_copy = torch.empty(self.num_bytes, dtype=torch.uint8, pin_memory=pin_memory)
        self._host_copy.copy_(device_bytes)

    def drop_host_copy(self) -> None:
        """Let the host copy go (here, and from the node's store): an eviction then keeps no
        copy, and the next activation reads the source (which makes a new one)."""
        self._release_host_copy()
        if self._store is not None:
            self._store.drop(self._store_key)
        self.copy_dropped = True

    def _open_shared(self) -> bool:
        if self._store is None:
            return False
        self._host_copy = self._store.open(self._store_key, self.num_bytes)
        if self._host_copy is not None:
            self._pin_shared()
        return self._host_copy is not None

    def _pin_shared(self) -> None:
        if self.arena.tensor.device.type == "cuda":
            self._pinned = pin(self._host_copy)

    def _release_host_copy(self) -> None:
        if self._pinned:
            unpin(self._host_copy)
            self._pinned = False
        self._host_copy = None

    def restore_host_copy(self, chunk_bytes: int = 256 << 20) -> None:
        """Copy the host copy back in (after map()). Chunked: on CUDA each chunk is an
        asynchronous copy from pinned memory, so copies queue back to back on the stream."""
        if self._host_copy is None:
            self._open_shared()
        if self._host_copy is None:
            raise RuntimeError("no host copy of the weights to restore")
        dst = self.arena.tensor
        for start in range(0, self.num_bytes, chunk_bytes):
            end = min(start + chunk_bytes, self.num_bytes)
            dst[start:end].copy_(self._host_copy[start:end], non_blocking=True)
        if dst.device.type == "cuda":
            torch.cuda.synchronize(dst.device)

    def close(self) -> None:
        """Give the pages back and let go of the host copy (a shared one stays for the node's
        other workers)."""
        self.tensors = {}
        self._release_host_copy()
        self.arena.close()
