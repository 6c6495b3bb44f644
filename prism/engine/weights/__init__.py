"""Weight loading: HF safetensors, GGUF and seeded random weights, all as (hf_name, tensor).

Names are loaded on first use, as in prism.memory: a GGUF file's metadata (gguf_meta) and the
errors are torch-free, so resolving a model name (the frontend, the simulator) does not bring
torch in; the readers of tensors do. The gguf package is imported only when a GGUF file is read:
the GPU machine does not have it, and random or safetensors weights must load there without it.
"""
from __future__ import annotations

import importlib
from pathlib import Path
from typing import TYPE_CHECKING, Iterator

from .errors import WeightsError

if TYPE_CHECKING:
    from .gguf_meta import GgufCheckpoint
    from .shapes import NamedTensor


def read_gguf(path: str | Path) -> "GgufCheckpoint":
    """Open a GGUF file and read its metadata (torch-free); tensors: iter_gguf_tensors."""
    try:
        from .gguf_meta import read_gguf as read
    except ImportError as e:
        raise WeightsError(f"{path}: reading GGUF files needs the gguf package ({e})") from None
    return read(path)


def iter_gguf_tensors(checkpoint: "GgufCheckpoint") -> Iterator["NamedTensor"]:
    """(hf_name, float32 tensor) for every parameter of a GGUF checkpoint, checked."""
    from .gguf_io import iter_gguf_tensors as iterate

    return iterate(checkpoint)


_WHERE = {
    "GgufCheckpoint": "gguf_meta",
    "NamedTensor": "shapes",
    "check_weights": "shapes",
    "expected_parameter_shapes": "shapes",
    "iter_random": "random_init",
    "iter_safetensors": "safetensors_io",
    "iter_source_weights": "loading",
}

__all__ = sorted([*_WHERE, "WeightsError", "iter_gguf_tensors", "read_gguf"])


def __getattr__(name: str):
    module = _WHERE.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{module}"), name)
