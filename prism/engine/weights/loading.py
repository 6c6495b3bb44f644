"""A model source's weights as (hf_name, tensor), whatever the format."""
from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING

import torch

from . import iter_gguf_tensors, read_gguf
from .random_init import iter_random
from .safetensors_io import iter_safetensors
from .shapes import NamedTensor

if TYPE_CHECKING:
    from prism.engine.catalog import ModelSource


def iter_source_weights(
    source: "ModelSource", dtype: torch.dtype | None = None, device: str | torch.device = "cpu",
    select: Callable[[str, torch.Tensor], torch.Tensor] | None = None,
) -> Iterator[NamedTensor]:
    """(hf_name, tensor) for every parameter, checked against `config`, on device in dtype
    (default float32). `select(name, full_tensor)` picks the part to keep (a tensor-parallel
    rank's slice): checkpoint tensors are cut on the host, so only that part is copied to the
    device; random ones are generated whole (the same values whatever the split) and cut."""
    dtype = torch.float32 if dtype is None else dtype
    if source.kind == "random":
        for name, tensor in iter_random(source.config, source.seed, dtype, device):
            yield name, tensor if select is None else select(name, tensor)
        return
    if source.kind == "gguf":
        tensors = iter_gguf_tensors(read_gguf(source.path))  # checked against the GGUF's own config
    else:
        tensors = iter_safetensors(source.path, source.config)
    for name, tensor in tensors:
        if select is not None:
            tensor = select(name, tensor)
        yield name, tensor.to(device=device, dtype=dtype)
