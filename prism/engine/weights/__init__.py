"""Weight loading: HF safetensors, GGUF and seeded random weights, all as (hf_name, tensor).

The gguf package is imported only when a GGUF file is read: the GPU machine does not have it,
and random or safetensors weights must load there without it.
"""
from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from .errors import WeightsError
from .random_init import iter_random
from .safetensors_io import iter_safetensors
from .shapes import NamedTensor, check_weights, expected_parameter_shapes

if TYPE_CHECKING:
    from .gguf_io import GgufCheckpoint


def read_gguf(path: str | Path) -> "GgufCheckpoint":
    """Open a GGUF file and read its metadata; tensors are read lazily by iter_tensors()."""
    try:
        from .gguf_io import read_gguf as read
    except ImportError as e:
        raise WeightsError(f"{path}: reading GGUF files needs the gguf package ({e})") from None
    return read(path)


__all__ = [
    "GgufCheckpoint",
    "NamedTensor",
    "WeightsError",
    "check_weights",
    "expected_parameter_shapes",
    "iter_random",
    "iter_safetensors",
    "read_gguf",
]


def __getattr__(name: str):
    if name == "GgufCheckpoint":  # for isinstance checks and annotations, without eager gguf
        from .gguf_io import GgufCheckpoint

        return GgufCheckpoint
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
