"""Seeded random weights with real model shapes, generated on the target device.

Each tensor gets its own generator seeded from (seed, name), so a tensor's values do not depend
on which other tensors were generated before it (a sharded or partial load sees the same values).
The same seed gives different values on CPU and on CUDA: the generators differ by design.
"""
from __future__ import annotations

import zlib
from collections.abc import Iterator

import torch

from prism.config import ModelConfig

from .shapes import NamedTensor, Shape, expected_parameter_shapes

INIT_STD = 0.02  # transformers' initializer_range for all four architectures


def iter_random(
    config: ModelConfig,
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
) -> Iterator[NamedTensor]:
    """Yield (hf_name, tensor) for every parameter of `config`, deterministic per (seed, name)."""
    for name, shape in expected_parameter_shapes(config).items():
        yield name, random_tensor(name, shape, seed, dtype, device)


def random_tensor(
    name: str, shape: Shape, seed: int, dtype: torch.dtype, device: str | torch.device
) -> torch.Tensor:
    generator = torch.Generator(device=device)
    generator.manual_seed(tensor_seed(seed, name))
    tensor = torch.empty(shape, dtype=dtype, device=device)
    # Norm weights near 1 (not exactly 1) so a kernel that forgets to apply them is caught.
    mean = 1.0 if name.endswith("norm.weight") else 0.0
    return tensor.normal_(mean, INIT_STD, generator=generator)


def tensor_seed(seed: int, name: str) -> int:
    # crc32 is stable across processes and Python versions, unlike hash().
    return zlib.crc32(f"{seed}:{name}".encode())
