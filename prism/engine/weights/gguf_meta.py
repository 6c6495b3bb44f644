"""A GGUF checkpoint's metadata (llama.cpp's format): the model's config and whether it holds a
tokenizer. Torch-free, so the frontend and the simulator can resolve GGUF models; the tensors
are read by gguf_io.iter_gguf_tensors."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from gguf import GGUFReader

from prism.config import ModelConfig

from .errors import WeightsError, one_line
from .gguf_config import hf_config_from_gguf

TOKENIZER_TOKENS_KEY = "tokenizer.ggml.tokens"


@dataclass(frozen=True)
class GgufCheckpoint:
    path: Path
    hf_config: dict  # an HF config.json dict, ready for ModelConfig.from_hf_dict
    reader: GGUFReader = field(repr=False, compare=False)

    @property
    def gguf_architecture(self) -> str:
        return self.hf_config["model_type"]

    @property
    def has_tokenizer(self) -> bool:
        """Whether the metadata holds a tokenizer (transformers can build one from it)."""
        return TOKENIZER_TOKENS_KEY in self.reader.fields

    def model_config(self) -> ModelConfig:
        return ModelConfig.from_hf_dict(self.hf_config, source=str(self.path))


def read_gguf(path: str | Path) -> GgufCheckpoint:
    """Open a GGUF file and read its metadata; tensors are read lazily by iter_tensors()."""
    path = Path(path)
    if not path.is_file():
        raise WeightsError(f"{path}: file not found")
    try:
        reader = GGUFReader(path)
    except Exception as e:  # a bad magic, truncated data: the reader maps the whole file up front
        raise WeightsError(f"{path}: not a valid GGUF file ({one_line(e)})") from None
    return GgufCheckpoint(path, hf_config_from_gguf(reader, path), reader)
