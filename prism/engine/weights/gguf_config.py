"""An HF-style config.json dict from a GGUF file's metadata (llama, qwen2, qwen3 families)."""
from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
from gguf import GGUFReader, Keys
from gguf.quants import dequantize

from .errors import WeightsError

ARCHITECTURES = {
    "llama": "LlamaForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
    "qwen3": "Qwen3ForCausalLM",
}
ROPE_FREQS_TENSOR = "rope_freqs.weight"  # llama.cpp's precomputed Llama-3 RoPE scaling factors
# llama.cpp's converter does not store these three; it assumes Meta's published values.
LLAMA3_FIXED = {
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 8192,
}


class _Metadata:
    """Typed access to GGUF key/values; `{arch}` in gguf.Keys templates is filled in."""

    def __init__(self, reader: GGUFReader, path: Path):
        self.reader, self.path = reader, path
        self.arch = str(self.get("general.architecture", ""))

    def get(self, key: str, default: Any = None) -> Any:
        field = self.reader.fields.get(key.format(arch=self.arch) if "{arch}" in key else key)
        return default if field is None else field.contents()

    def require(self, key: str) -> Any:
        value = self.get(key)
        if value is None:
            raise WeightsError(f"{self.path}: GGUF metadata lacks {key.format(arch=self.arch)}")
        return value


def hf_config_from_gguf(reader: GGUFReader, path: Path) -> dict:
    meta = _Metadata(reader, path)
    if meta.arch not in ARCHITECTURES:
        raise WeightsError(
            f"{path}: unsupported GGUF architecture {meta.arch!r}; "
            f"supported: {', '.join(ARCHITECTURES)}"
        )
    hidden = int(meta.require(Keys.LLM.EMBEDDING_LENGTH))
    heads = int(meta.require(Keys.Attention.HEAD_COUNT))
    tensor_names = {t.name for t in reader.tensors}
    config = {
        "architectures": [ARCHITECTURES[meta.arch]],
        "model_type": meta.arch,
        "hidden_size": hidden,
        "intermediate_size": int(meta.require(Keys.LLM.FEED_FORWARD_LENGTH)),
        "num_hidden_layers": int(meta.require(Keys.LLM.BLOCK_COUNT)),
        "num_attention_heads": heads,
        "num_key_value_heads": _kv_heads(meta, heads),
        # Qwen3 heads are wider than hidden/heads; key_length says so, rope dims for llama.
        "head_dim": int(
            meta.get(Keys.Attention.KEY_LENGTH)
            or meta.get(Keys.Rope.DIMENSION_COUNT)
            or hidden // heads
        ),
        "rms_norm_eps": _float32_shortest(meta.require(Keys.Attention.LAYERNORM_RMS_EPS)),
        "rope_theta": _float32_shortest(meta.get(Keys.Rope.FREQ_BASE, 10000.0)),
        "max_position_embeddings": int(meta.get(Keys.LLM.CONTEXT_LENGTH, 4096)),
        "vocab_size": _vocab_size(meta),
        # llama.cpp drops output.weight when it is the embedding: that is how ties are stored.
        "tie_word_embeddings": "output.weight" not in tensor_names,
        "bos_token_id": meta.get(Keys.Tokenizer.BOS_ID),
        "eos_token_id": _eos_ids(meta),
        "torch_dtype": "float32",
    }
    rope_scaling = _rope_scaling(meta, config)
    if rope_scaling is not None:
        config["rope_scaling"] = rope_scaling
    return config


def _kv_heads(meta: _Metadata, heads: int) -> int:
    value = meta.get(Keys.Attention.HEAD_COUNT_KV, heads)
    if isinstance(value, list):  # per-layer counts; we only serve uniform models
        if len(set(value)) != 1:
            raise WeightsError(f"{meta.path}: per-layer KV head counts {value} are not supported")
        value = value[0]
    return int(value)


def _vocab_size(meta: _Metadata) -> int:
    size = meta.get(Keys.LLM.VOCAB_SIZE)
    if size is not None:
        return int(size)
    # The embedding's rows, not the token list: padded vocabularies (Qwen) have more rows.
    for tensor in meta.reader.tensors:
        if tensor.name == "token_embd.weight":
            return int(tensor.shape[1])  # GGUF shapes are listed innermost first
    raise WeightsError(f"{meta.path}: no vocab size in metadata and no token_embd.weight")


def _eos_ids(meta: _Metadata) -> int | list[int] | None:
    # Chat GGUFs (Llama 3 instruct) mark end-of-turn separately; a server must stop on both.
    keys = (Keys.Tokenizer.EOS_ID, Keys.Tokenizer.EOT_ID, Keys.Tokenizer.EOM_ID)
    ids = list(dict.fromkeys(int(v) for v in (meta.get(k) for k in keys) if v is not None))
    if not ids:
        return None
    return ids[0] if len(ids) == 1 else ids


def _float32_shortest(value: float) -> float:
    # GGUF stores float32: 1e-5 reads back as 9.99999974e-06; print it as the author wrote it.
    return float(str(np.float32(value)))


def _rope_scaling(meta: _Metadata, config: dict) -> dict | None:
    scaling_type = meta.get(Keys.Rope.SCALING_TYPE)
    if scaling_type not in (None, "none"):
        # Passed on as HF spells it; ModelConfig names what it does not support.
        return {
            "rope_type": scaling_type,
            "factor": meta.get(Keys.Rope.SCALING_FACTOR),
            "original_max_position_embeddings": meta.get(Keys.Rope.SCALING_ORIG_CTX_LEN),
        }
    for tensor in meta.reader.tensors:
        if tensor.name == ROPE_FREQS_TENSOR:
            factors = dequantize(tensor.data, tensor.tensor_type).reshape(-1)
            return _llama3_scaling(factors, config, meta.path)
    return None


def _llama3_scaling(factors: np.ndarray, config: dict, path: Path) -> dict | None:
    """Recover HF's llama3 rope_scaling from llama.cpp's per-frequency divisors, and verify it."""
    factor = _float32_shortest(float(factors.max()))
    if factor == 1.0:
        return None
    scaling = {"rope_type": "llama3", "factor": factor, **LLAMA3_FIXED}
    expected = llama3_rope_factors(scaling, config["rope_theta"], config["head_dim"])
    if expected.shape != factors.shape or not np.allclose(expected, factors, rtol=1e-4):
        raise WeightsError(
            f"{path}: {ROPE_FREQS_TENSOR} is not Llama-3 RoPE scaling with "
            f"{LLAMA3_FIXED}; unsupported"
        )
    return scaling


def llama3_rope_factors(scaling: dict, theta: float, head_dim: int) -> np.ndarray:
    """Each RoPE frequency's divisor under Llama-3 scaling, as llama.cpp's converter stores it."""
    factor = scaling["factor"]
    low, high = scaling["low_freq_factor"], scaling["high_freq_factor"]
    old_context = scaling["original_max_position_embeddings"]
    freqs = 1.0 / theta ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim)
    wavelen = 2 * math.pi / freqs
    smooth = (old_context / wavelen - low) / (high - low)
    blended = 1 / ((1 - smooth) / factor + smooth)
    divisors = np.where(wavelen > old_context / low, factor, blended)
    return np.where(wavelen < old_context / high, 1.0, divisors).astype(np.float32)
