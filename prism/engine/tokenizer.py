"""Tokenizer loading (HF folder or GGUF file) behind a small wrapper the engine can rely on."""
from __future__ import annotations

import functools
import json
import mmap
import os
import struct
from typing import Any

from prism.errors import UserError
from prism.types import RequestError

# GGUF metadata keys that name ids which end a generation (llama.cpp's conventions).
_GGUF_EOS_KEYS = ("tokenizer.ggml.eos_token_id", "tokenizer.ggml.eot_token_id", "tokenizer.ggml.eom_token_id")


class TokenizerLoadError(UserError):
    """A tokenizer could not be loaded: missing, unreadable or corrupt files."""


class Tokenizer:
    """Thin wrapper over a transformers tokenizer with the few calls the engine needs."""

    def __init__(self, hf: Any, eos_token_ids: tuple[int, ...] = ()):
        self.hf = hf
        # The tokenizer's own eos first, then extra ids (e.g. from generation_config.json).
        ids = ([hf.eos_token_id] if hf.eos_token_id is not None else []) + list(eos_token_ids)
        self.eos_token_ids: tuple[int, ...] = tuple(dict.fromkeys(int(i) for i in ids))

    @property
    def vocab_size(self) -> int:
        # len() counts added tokens too (e.g. chat markers), unlike hf.vocab_size on some models.
        return len(self.hf)

    def encode(self, text: str) -> list[int]:
        if not isinstance(text, str):
            raise RequestError(f"prompt must be a string, got {type(text).__name__}")
        # Same as tokenizer(text).input_ids: the checkpoint decides whether BOS is added.
        return list(self.hf(text)["input_ids"])

    def apply_chat_template(self, messages: list[dict]) -> list[int]:
        _check_messages(messages)
        if not getattr(self.hf, "chat_template", None):
            raise RequestError("this model's tokenizer has no chat template; send a plain prompt instead")
        from jinja2 import TemplateError

        try:
            ids = self.hf.apply_chat_template(
                messages, add_generation_prompt=True, tokenize=True, return_dict=False
            )
        except TemplateError as e:  # e.g. the template's raise_exception("roles must alternate")
            raise RequestError(f"chat template rejected the messages: {e}") from None
        if isinstance(ids, dict) or hasattr(ids, "keys"):  # some versions ignore return_dict=False
            ids = ids["input_ids"]
        return [int(i) for i in ids]

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return self.hf.decode(list(ids), skip_special_tokens=skip_special_tokens)


def _check_messages(messages: Any) -> None:
    if not isinstance(messages, list) or not messages:
        raise RequestError("messages must be a non-empty list of {role, content} objects")
    for i, m in enumerate(messages):
        if not isinstance(m, dict):
            raise RequestError(f"messages[{i}] must be an object with 'role' and 'content'")
        for key in ("role", "content"):
            if not isinstance(m.get(key), str):
                raise RequestError(f"messages[{i}].{key} must be a string")


def load_tokenizer(path: str) -> Tokenizer:
    """Load (once per path) the tokenizer of an HF folder or a .gguf file."""
    return _load_cached(os.path.abspath(os.fspath(path)))


@functools.lru_cache(maxsize=32)
def _load_cached(path: str) -> Tokenizer:
    # Local import: transformers is slow to import and only needed once per model.
    from transformers import AutoTokenizer

    if not os.path.exists(path):
        raise TokenizerLoadError(f"cannot load tokenizer from {path}: no such file or directory")
    is_gguf = os.path.isfile(path) and path.endswith(".gguf")
    try:
        if is_gguf:
            hf = AutoTokenizer.from_pretrained(os.path.dirname(path), gguf_file=os.path.basename(path))
            extra = _gguf_eos_ids(path)
        else:
            hf = AutoTokenizer.from_pretrained(path)
            extra = _folder_eos_ids(path)
    except Exception as e:  # transformers raises many types (OSError, ValueError, KeyError...)
        reason = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise TokenizerLoadError(f"cannot load tokenizer from {path}: {reason}") from None
    return Tokenizer(hf, extra)


def _as_id_list(value: Any) -> list[int]:
    if isinstance(value, int):
        return [value]
    if isinstance(value, (list, tuple)):
        return [int(v) for v in value if isinstance(v, int)]
    return []


def _folder_eos_ids(folder: str) -> list[int]:
    """eos ids from generation_config.json and config.json (chat models often list several)."""
    ids: list[int] = []
    for name in ("generation_config.json", "config.json"):
        file = os.path.join(folder, name)
        if not os.path.isfile(file):
            continue
        with open(file) as f:
            ids += _as_id_list(json.load(f).get("eos_token_id"))
    return ids


def _gguf_eos_ids(file: str) -> list[int]:
    meta = _gguf_scalar_metadata(file, _GGUF_EOS_KEYS)
    return [int(meta[k]) for k in _GGUF_EOS_KEYS if isinstance(meta.get(k), int)]


# GGUF value type -> struct format, for the scalar types; 8 is string, 9 is array.
_GGUF_SCALARS = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q", 12: "d"}


def _gguf_scalar_metadata(file: str, keys: tuple[str, ...]) -> dict[str, Any]:
    """Read a few scalar metadata values of a GGUF header.

    gguf.GGUFReader would take ~2 s here: it decodes every array (the whole vocab, the merges)
    and the tensor table; this walks the key/value section only, skipping arrays by length.
    """
    with open(file, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as buf:
        if buf[:4] != b"GGUF":
            raise ValueError(f"{file} is not a GGUF file")
        (kv_count,) = struct.unpack_from("<Q", buf, 16)  # after magic, version u32, tensor count u64
        pos, out = 24, {}
        for _ in range(kv_count):
            (n,) = struct.unpack_from("<Q", buf, pos)
            key = bytes(buf[pos + 8 : pos + 8 + n]).decode("utf-8", "replace")
            (vtype,) = struct.unpack_from("<I", buf, pos + 8 + n)
            pos += 12 + n
            if vtype in _GGUF_SCALARS and key in keys:
                (out[key],) = struct.unpack_from("<" + _GGUF_SCALARS[vtype], buf, pos)
            pos = _gguf_skip_value(buf, pos, vtype)
        return out


def _gguf_skip_value(buf: mmap.mmap, pos: int, vtype: int) -> int:
    if vtype in _GGUF_SCALARS:
        return pos + struct.calcsize("<" + _GGUF_SCALARS[vtype])
    if vtype == 8:
        return pos + 8 + struct.unpack_from("<Q", buf, pos)[0]
    if vtype != 9:
        raise ValueError(f"unknown GGUF value type {vtype}")
    itype, count = struct.unpack_from("<IQ", buf, pos)
    pos += 12
    if itype in _GGUF_SCALARS:  # fixed-size items: jump over them at once
        return pos + count * struct.calcsize("<" + _GGUF_SCALARS[itype])
    for _ in range(count):  # strings (vocab, merges) or nested arrays: walk item by item
        pos = _gguf_skip_value(buf, pos, itype)
    return pos
