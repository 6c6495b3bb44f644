"""Reading a GGUF checkpoint's tensors (llama.cpp's format) as float32 tensors with HF names and layouts."""
from __future__ import annotations

from collections.abc import Iterator

import gguf
import numpy as np
import torch
from gguf import ReaderTensor
from gguf.quants import dequantize

from prism.config import ModelConfig

from .errors import WeightsError, one_line
from .gguf_config import ROPE_FREQS_TENSOR
from .gguf_meta import GgufCheckpoint
from .shapes import NamedTensor, Shape, check_weights, expected_parameter_shapes

# Tensors llama.cpp stores that are not HF parameters (folded into hf_config instead).
NON_PARAMETERS = frozenset({ROPE_FREQS_TENSOR})


def iter_gguf_tensors(checkpoint: GgufCheckpoint) -> Iterator[NamedTensor]:
    """Yield (hf_name, float32 tensor) for every parameter, checked against hf_config."""
    config = checkpoint.model_config()
    return check_weights(_iter_unchecked(checkpoint, config), config, str(checkpoint.path))


def _iter_unchecked(checkpoint: GgufCheckpoint, config: ModelConfig) -> Iterator[NamedTensor]:
    shapes = expected_parameter_shapes(config)
    to_hf = gguf_to_hf_names(checkpoint.gguf_architecture, config.num_layers, shapes)
    for tensor in checkpoint.reader.tensors:
        if tensor.name in NON_PARAMETERS:
            continue
        hf_name = to_hf.get(tensor.name)
        if hf_name is None:
            raise WeightsError(f"{checkpoint.path}: unexpected tensor {tensor.name}")
        yield hf_name, _load(checkpoint, tensor, hf_name, shapes[hf_name], config)


def _load(
    checkpoint: GgufCheckpoint, tensor: ReaderTensor, hf_name: str, shape: Shape, config: ModelConfig
) -> torch.Tensor:
    try:
        array = dequantize(tensor.data, tensor.tensor_type)
    except Exception as e:  # NotImplementedError for types gguf-py cannot dequantize
        raise WeightsError(
            f"{checkpoint.path}: tensor {tensor.name} of type {tensor.tensor_type.name}: "
            f"{one_line(e)}"
        ) from None
    if tuple(array.shape) != shape:
        raise WeightsError(
            f"{checkpoint.path}: tensor {tensor.name} ({hf_name}) has shape {list(array.shape)}, "
            f"expected {list(shape)}"
        )
    heads = _permuted_heads(checkpoint.gguf_architecture, hf_name, config)
    if heads:
        array = unpermute_rope_rows(array, heads)
    if not array.flags.writeable or array.dtype != np.float32:
        array = array.astype(np.float32)  # a private copy: F32 tensors come memory-mapped
    return torch.from_numpy(array)


def gguf_to_hf_names(gguf_arch: str, num_layers: int, hf_names) -> dict[str, str]:
    """GGUF tensor name -> HF name, from gguf-py's own HF -> GGUF table (as transformers does)."""
    arch = next(k for k, v in gguf.MODEL_ARCH_NAMES.items() if v == gguf_arch)
    table = gguf.get_tensor_name_map(arch, num_layers)
    mapping = {}
    for hf_name in hf_names:
        module, suffix = hf_name.rsplit(".", 1)
        gguf_module = table.get_name(module)
        if gguf_module is not None:  # an unmapped name surfaces as a missing tensor
            mapping[f"{gguf_module}.{suffix}"] = hf_name
    return mapping


def _permuted_heads(gguf_arch: str, hf_name: str, config: ModelConfig) -> int:
    """How many heads llama.cpp permuted this tensor's rows over; 0 when it did not."""
    # Only the llama converter permutes (its RoPE rotates adjacent pairs; HF rotates halves).
    if gguf_arch != "llama":
        return 0
    if ".self_attn.q_proj." in hf_name:
        return config.num_heads
    if ".self_attn.k_proj." in hf_name:
        return config.num_kv_heads
    return 0


def unpermute_rope_rows(array: np.ndarray, heads: int) -> np.ndarray:
    """Undo convert_hf_to_gguf.py's LlamaModel.permute on q/k rows (weights and biases).

    It interleaved each head's two rotary halves ([x0..x63, y0..y63] -> [x0, y0, x1, y1, ...]);
    reading the rows as (head, pair, half) and swapping the last two restores HF's order.
    """
    rows = array.shape[0]
    grouped = array.reshape(heads, rows // heads // 2, 2, *array.shape[1:])
    return grouped.swapaxes(1, 2).reshape(array.shape)
