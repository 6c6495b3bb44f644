"""What the simulator needs to know of a model: its shape, bytes per element, weight and KV
sizes. Read through the engine's own catalog and page arithmetic (torch-free), so a simulated
model takes exactly the pages the real one would."""
from __future__ import annotations

from dataclasses import dataclass

from prism.config import ModelConfig, ModelSpec
from prism.engine.catalog import resolve_model
from prism.engine.memory_plan import dtype_itemsize, weight_layout


@dataclass(frozen=True)
class ModelShape:
    source: str  # the catalog name / path the model was resolved from
    config: ModelConfig
    itemsize: int  # bytes per weight and KV element
    weight_bytes: int  # the weight arena's size (fused layout, aligned tensors)

    @property
    def kv_bytes_per_token(self) -> int:
        return self.config.kv_bytes_per_token(self.itemsize)

    @property
    def kernel_key(self) -> tuple:
        """What a model's kernels depend on: models with the same key share them on a device
        (prism.sim.costs.ColdShapes)."""
        return (self.config, self.itemsize)

    @property
    def num_layers(self) -> int:
        return self.config.num_layers


_CACHE: dict[tuple[str, int], ModelShape] = {}


def model_shape(spec: ModelSpec, device: str) -> ModelShape:
    """The shape of `spec` as served on `device` ("cuda:N" serves "auto" in bfloat16)."""
    itemsize = dtype_itemsize(spec.dtype, device)
    key = (spec.source, itemsize)
    if key not in _CACHE:
        config = resolve_model(spec.source).config
        _CACHE[key] = ModelShape(spec.source, config, itemsize, weight_layout(config, itemsize).num_bytes)
    return _CACHE[key]
