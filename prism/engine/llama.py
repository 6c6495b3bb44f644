"""The Llama family (Llama, Mistral, Qwen2, Qwen3) written for paged KV.

One functional implementation: architectures differ only in flags of ModelConfig (Qwen2's
q/k/v bias, Qwen3's per-head q/k RMSNorm, tied embeddings, llama3 RoPE scaling). Weights are
views into the model's elastic arena (see model_weights.py); nothing here owns memory.
"""
from __future__ import annotations

import math
from typing import Callable

import torch
import torch.nn.functional as F

from prism.config import ModelConfig, RopeScaling
from prism.engine.attention import AttentionMetadata, paged_attention_reference, write_kv
from prism.engine.kv_cache import PagedKVCache
from prism.engine.model_weights import ModelWeights

AttentionFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, AttentionMetadata, float], torch.Tensor]


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    # As transformers does it: normalize in float32, cast back, then scale.
    xf = x.float()
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return weight * xf.to(x.dtype)


def rope_inv_freq(config: ModelConfig) -> torch.Tensor:
    dim = config.head_dim
    inv_freq = 1.0 / (config.rope_theta ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim))
    if config.rope_scaling is not None:
        inv_freq = _llama3_scale(inv_freq, config.rope_scaling)
    return inv_freq


def _llama3_scale(inv_freq: torch.Tensor, s: RopeScaling) -> torch.Tensor:
    """Llama 3.1's frequency scaling: long wavelengths slowed by `factor`, short ones kept,
    a smooth blend in between."""
    low_freq_wavelen = s.original_max_position_embeddings / s.low_freq_factor
    high_freq_wavelen = s.original_max_position_embeddings / s.high_freq_factor
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_freq_wavelen, inv_freq / s.factor, inv_freq)
    smooth = (s.original_max_position_embeddings / wavelen - s.low_freq_factor) / (
        s.high_freq_factor - s.low_freq_factor
    )
    smoothed = (1 - smooth) * scaled / s.factor + smooth * scaled
    is_medium = ~(wavelen < high_freq_wavelen) & ~(wavelen > low_freq_wavelen)
    return torch.where(is_medium, smoothed, scaled)


class RotaryEmbedding:
    def __init__(self, config: ModelConfig, max_positions: int, device: torch.device):
        inv_freq = rope_inv_freq(config).to(device)
        t = torch.arange(max_positions, device=device, dtype=torch.int64).float()
        freqs = torch.outer(t, inv_freq)
        self.cos = freqs.cos()  # [max_positions, head_dim / 2], float32
        self.sin = freqs.sin()

    def apply(self, x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """x: [tokens, heads, head_dim], rotate-half layout (as in HF checkpoints)."""
        cos = self.cos[positions].unsqueeze(1)
        sin = self.sin[positions].unsqueeze(1)
        x1, x2 = x.float().chunk(2, dim=-1)
        out = torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)
        return out.to(x.dtype)


class LlamaModel:
    def __init__(
        self, config: ModelConfig, weights: ModelWeights, max_positions: int,
        attention: AttentionFn = paged_attention_reference,
    ):
        self.config = config
        self.weights = weights
        self.attention = attention
        self.rotary = RotaryEmbedding(config, max_positions, weights.arena.tensor.device)
        self.scale = config.head_dim ** -0.5

    def forward(
        self, input_ids: torch.Tensor, positions: torch.Tensor,
        meta: AttentionMetadata, kv: PagedKVCache,
    ) -> torch.Tensor:
        """Hidden states [num_tokens, hidden] after the final norm."""
        w = self.weights.tensors
        h = F.embedding(input_ids, w["embed"])
        for layer in range(self.config.num_layers):
            h = self._layer(layer, h, positions, meta, kv)
        return rms_norm(h, w["norm"], self.config.rms_norm_eps)

    def _layer(self, n: int, h: torch.Tensor, positions, meta, kv: PagedKVCache) -> torch.Tensor:
        c, w, p = self.config, self.weights.tensors, f"model.layers.{n}."
        x = rms_norm(h, w[p + "input_norm"], c.rms_norm_eps)
        qkv = F.linear(x, w[p + "qkv"], w.get(p + "qkv_bias"))
        q, k, v = qkv.split([c.q_size, c.kv_size, c.kv_size], dim=-1)
        q = q.view(-1, c.num_heads, c.head_dim)
        k = k.view(-1, c.num_kv_heads, c.head_dim)
        v = v.view(-1, c.num_kv_heads, c.head_dim)
        if c.qk_norm:
            q = rms_norm(q, w[p + "q_norm"], c.rms_norm_eps)
            k = rms_norm(k, w[p + "k_norm"], c.rms_norm_eps)
        q = self.rotary.apply(q, positions)
        k = self.rotary.apply(k, positions)
        write_kv(kv.k_caches[n], kv.v_caches[n], k, v, meta)
        o = self.attention(q, kv.k_caches[n], kv.v_caches[n], meta, self.scale)
        h = h + F.linear(o.reshape(-1, c.q_size), w[p + "o"], w.get(p + "o_bias"))
        x = rms_norm(h, w[p + "post_norm"], c.rms_norm_eps)
        gate, up = F.linear(x, w[p + "gate_up"]).chunk(2, dim=-1)
        return h + F.linear(F.silu(gate) * up, w[p + "down"])

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        w = self.weights.tensors
        head = w["embed"] if self.config.tie_word_embeddings else w["lm_head"]
        return F.linear(hidden, head).float()
