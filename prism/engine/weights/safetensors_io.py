"""Reading Hugging Face safetensors checkpoints (single file or sharded), one tensor at a time."""
from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

from safetensors import safe_open

from prism.config import ModelConfig

from .errors import WeightsError, one_line
from .shapes import NamedTensor, check_weights

INDEX_NAME = "model.safetensors.index.json"


def iter_safetensors(
    folder: str | Path, config: ModelConfig | None = None
) -> Iterator[NamedTensor]:
    """Yield (hf_name, tensor) in stored dtype for every tensor of an HF checkpoint folder.

    With `config`, tensors are checked against its parameters (see check_weights)."""
    tensors = _iter_folder(Path(folder))
    return check_weights(tensors, config, str(folder)) if config is not None else tensors


def _iter_folder(folder: Path) -> Iterator[NamedTensor]:
    for path, names in _shards(folder):
        yield from _iter_file(path, names)


def _shards(folder: Path) -> list[tuple[Path, list[str] | None]]:
    """The files to read and, for indexed checkpoints, which tensors each must hold."""
    if not folder.is_dir():
        raise WeightsError(f"{folder}: not a folder")
    index = folder / INDEX_NAME
    if index.is_file():
        return _shards_from_index(index)
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise WeightsError(f"{folder}: no *.safetensors files")
    return [(path, None) for path in files]


def _shards_from_index(index: Path) -> list[tuple[Path, list[str] | None]]:
    try:
        weight_map = json.loads(index.read_text())["weight_map"]
        by_file: dict[str, list[str]] = {}
        for name, file in weight_map.items():
            by_file.setdefault(file, []).append(name)
    except (ValueError, KeyError, TypeError, AttributeError) as e:
        raise WeightsError(f"{index}: not a valid safetensors index ({one_line(e)})") from None
    # Sorted by file so each shard is opened once and read front to back.
    return [(index.parent / file, names) for file, names in sorted(by_file.items())]


def _iter_file(path: Path, names: list[str] | None) -> Iterator[NamedTensor]:
    with _open(path) as handle:
        available = set(handle.keys())
        for name in names if names is not None else handle.keys():
            if name not in available:
                raise WeightsError(f"{path}: tensor {name} is listed in the index but absent")
            yield name, _get(handle, path, name)


def _open(path: Path):
    if not path.is_file():
        raise WeightsError(f"{path}: file not found")
    try:
        return safe_open(str(path), framework="pt")
    except Exception as e:  # SafetensorError has no stable import path; all mean "unreadable"
        raise WeightsError(f"{path}: not a valid safetensors file ({one_line(e)})") from None


def _get(handle, path: Path, name: str):
    try:
        return handle.get_tensor(name)
    except Exception as e:
        raise WeightsError(f"{path}: cannot read tensor {name} ({one_line(e)})") from None

