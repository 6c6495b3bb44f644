"""The layer body's operations, in two interchangeable implementations.

`ReferenceOps` is plain PyTorch: it runs everywhere (CI runs it on CPU) and is what every fast
path is tested against. `TritonOps` is the CUDA fast path: fused norm/residual, fused
RoPE + KV store, SiLU-and-mul, and paged attention kernels. The model (llama.py) is written
once against this interface; `make_ops` picks the implementation for a device.
"""
from __future__ import annotations

import importlib.util

import torch
import torch.nn.functional as F

from prism import env
from prism.config import ConfigError
from prism.engine.attention import AttentionMetadata, paged_attention_reference, write_kv


def rms_norm_reference(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    # As transformers does it: normalize in float32, cast back, then scale.
    xf = x.float()
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return weight * xf.to(x.dtype)


class ReferenceOps:
    name = "reference"

    def rms_norm(self, x, weight, eps):
        return rms_norm_reference(x, weight, eps)

    def add_rms_norm(self, x, residual, weight, eps):
        """(RMSNorm(residual + x), residual + x)."""
        h = residual + x
        return rms_norm_reference(h, weight, eps), h

    def qkv_to_cache(self, qkv, positions, meta: AttentionMetadata, k_cache, v_cache, layer) -> torch.Tensor:
        """Split the fused projection, apply the q/k norm (Qwen3) and RoPE, store k and v in
        their cache slots; return q [tokens, heads, head_dim]."""
        c = layer.config
        q, k, v = qkv.split([c.q_size, c.kv_size, c.kv_size], dim=-1)
        q = q.view(-1, c.num_heads, c.head_dim)
        k = k.view(-1, c.num_kv_heads, c.head_dim)
        v = v.view(-1, c.num_kv_heads, c.head_dim)
        if layer.q_norm is not None:
            q = rms_norm_reference(q, layer.q_norm, c.rms_norm_eps)
            k = rms_norm_reference(k, layer.k_norm, c.rms_norm_eps)
        q = layer.rotary.apply(q, positions)
        k = layer.rotary.apply(k, positions)
        write_kv(k_cache, v_cache, k, v, meta)
        return q

    def attention(self, q, k_cache, v_cache, meta: AttentionMetadata, scale: float) -> torch.Tensor:
        return paged_attention_reference(q, k_cache, v_cache, meta, scale)

    def silu_and_mul(self, gate_up):
        gate, up = gate_up.chunk(2, dim=-1)
        return F.silu(gate) * up


class TritonOps(ReferenceOps):
    name = "triton"

    def __init__(self):
        # Imported here: Triton is only needed (and only importable) where this path runs.
        from prism.kernels import decode_attention, fix_interpreter_scalars, fused_ops

        if env.triton_interpret():  # kernels on CPU tensors (tests)
            fix_interpreter_scalars()
        self._decode = decode_attention
        self._fused = fused_ops
        self._prefill = _load_prefill_kernel()

    def rms_norm(self, x, weight, eps):
        return self._fused.rms_norm(x, weight, eps)

    def add_rms_norm(self, x, residual, weight, eps):
        return self._fused.add_rms_norm(x, residual, weight, eps), residual

    def qkv_to_cache(self, qkv, positions, meta, k_cache, v_cache, layer):
        c = layer.config
        qk_norm = (layer.q_norm, layer.k_norm, c.rms_norm_eps) if layer.q_norm is not None else None
        return self._fused.rope_and_write_kv(
            qkv, positions, layer.rotary.cos, layer.rotary.sin, meta.slot_mapping, k_cache, v_cache,
            c.num_heads, c.num_kv_heads, c.head_dim, qk_norm,
        )

    def attention(self, q, k_cache, v_cache, meta, scale):
        if meta.max_query_len == 1:
            return self._decode.paged_decode_attention(q, k_cache, v_cache, meta, scale,
                                                       num_splits=meta.decode_splits)
        if self._prefill is not None:
            return self._prefill(q, k_cache, v_cache, meta, scale)
        return paged_attention_reference(q, k_cache, v_cache, meta, scale)

    def silu_and_mul(self, gate_up):
        return self._fused.silu_and_mul(gate_up)


def _load_prefill_kernel():
    try:
        from prism.kernels.prefill_attention import paged_prefill_attention
    except ImportError:
        return None
    return paged_prefill_attention


def triton_available() -> bool:
    return importlib.util.find_spec("triton") is not None


def make_ops(device: torch.device, kind: str | None = None) -> ReferenceOps:
    """`kind`: "reference", "triton" or "auto"/None (Triton on CUDA when installed). The
    environment variable PRISM_KERNELS overrides auto (e.g. PRISM_KERNELS=reference); a kind
    set explicitly (EngineConfig.kernels) wins over it."""
    kind = kind or "auto"
    if kind == "auto":
        kind = env.kernels() or "auto"
    if kind == "auto":
        kind = "triton" if device.type == "cuda" and triton_available() else "reference"
    if kind == "reference":
        return ReferenceOps()
    if kind == "triton":
        return TritonOps()
    raise ConfigError(f"unknown kernel set {kind!r} (PRISM_KERNELS or kernels:); use reference, triton or auto")
