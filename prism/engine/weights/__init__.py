"""Weight loading: HF safetensors, GGUF and seeded random weights, all as (hf_name, tensor)."""
from .errors import WeightsError
from .gguf_io import GgufCheckpoint, read_gguf
from .random_init import iter_random
from .safetensors_io import iter_safetensors
from .shapes import NamedTensor, check_weights, expected_parameter_shapes

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
