"""The Llama family (Llama, Mistral, Qwen2, Qwen3) written for paged KV.

One functional implementation: architectures differ only in flags of ModelConfig (Qwen2's
q/k/v bias, Qwen3's per-head q/k RMSNorm, tied embeddings, llama3 RoPE scaling). Weights are
views into the model's elastic arena (see model_weights.py); nothing here owns memory.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

from prism.config import ModelConfig, RopeScaling
from prism.engine.attention import AttentionMetadata
from prism.engine.kv_cache import PagedKVCache
from prism.engine.model_weights import ModelWeights
from prism.engine.ops import ReferenceOps
from prism.engine.tp_shard import vocab_parallel

if TYPE_CHECKING:
    from prism.engine.parallel import TPGroup

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


@dataclass(frozen=True)
class LayerWeights:
    """One decoder layer's weights (views into the arena) and what its attention needs."""

    config: ModelConfig
    rotary: RotaryEmbedding
    input_norm: torch.Tensor
    qkv: torch.Tensor
    qkv_bias: torch.Tensor | None
    q_norm: torch.Tensor | None
    k_norm: torch.Tensor | None
    o: torch.Tensor
    o_bias: torch.Tensor | None
    post_norm: torch.Tensor
    gate_up: torch.Tensor
    down: torch.Tensor

    @classmethod
    def of(cls, n: int, config: ModelConfig, rotary: RotaryEmbedding, w: dict[str, torch.Tensor]):
        p = f"model.layers.{n}."
        return cls(
            config, rotary, w[p + "input_norm"], w[p + "qkv"], w.get(p + "qkv_bias"),
            w.get(p + "q_norm"), w.get(p + "k_norm"), w[p + "o"], w.get(p + "o_bias"),
            w[p + "post_norm"], w[p + "gate_up"], w[p + "down"],
        )


class LlamaModel:
    def __init__(
        self, config: ModelConfig, weights: ModelWeights, max_positions: int,
        ops: ReferenceOps | None = None, tp: TPGroup | None = None,
    ):
        """`tp`: this rank's tensor-parallel group; `config` and `weights` are then its shard
        (tp_shard.py). None: one GPU, and the forward pass is exactly the single-GPU one."""
        self.config = config
        self.weights = weights
        self.ops = ops or ReferenceOps()
        self.tp = tp
        self.rotary = RotaryEmbedding(config, max_positions, weights.arena.tensor.device)
        self.scale = config.head_dim ** -0.5
        # Views into the weight arena: their addresses never change, even across eviction and
        # activation, so they are taken once (and CUDA graphs that read them stay valid).
        w = weights.tensors
        self.layers = [LayerWeights.of(n, config, self.rotary, w) for n in range(config.num_layers)]
        self.embed = w["embed"]
        self.final_norm = w["norm"]
        self.lm_head = w["embed"] if config.tie_word_embeddings else w["lm_head"]
        # Tensor parallel: the LM head is split by vocabulary rows when they divide evenly
        # (a tied head is this rank's rows of the replicated embedding), else replicated.
        self.gather_logits = tp is not None and vocab_parallel(config.vocab_size, tp.size)
        if self.gather_logits and config.tie_word_embeddings:
            rows = config.vocab_size // tp.size
            self.lm_head = self.embed.narrow(0, tp.rank * rows, rows)

    def forward(
        self, input_ids: torch.Tensor, positions: torch.Tensor,
        meta: AttentionMetadata, kv: PagedKVCache,
    ) -> torch.Tensor:
        """Hidden states [num_tokens, hidden] after the final norm.

        Written as pieces between the attention calls (the piecewise CUDA graphs of mixed
        steps capture exactly these, piecewise_graphs.py): `first_piece` up to layer 0's
        attention, `middle_piece` from one layer's attention output to the next layer's, and
        `last_piece` to the final norm. The residual stream `h` and the normed input `x` of
        the next block travel together: each block ends with one fused add-and-norm
        (residual += out; x = norm(residual)).

        Tensor parallel (`self.tp`): the weights are this rank's shard, qkv and gate_up
        column-parallel (its heads and MLP slice), o and down row-parallel, so their outputs
        are partial sums that an all-reduce adds up (o's bias is added once, after it). On one
        GPU the two `tp is not None` tests are all that differs."""
        q, h = self.first_piece(input_ids, positions, meta, kv)
        for n in range(1, len(self.layers) + 1):
            o = self.attention(n - 1, q, meta, kv)
            if n == len(self.layers):
                return self.last_piece(o, h)
            q, h = self.middle_piece(n, o, h, positions, meta, kv)
        raise AssertionError("a model has at least one layer")

    def first_piece(self, input_ids, positions, meta: AttentionMetadata, kv: PagedKVCache):
        """Embedding and layer 0 up to its attention: (q of layer 0, residual)."""
        h = F.embedding(input_ids, self.embed)
        x = self.ops.rms_norm(h, self.layers[0].input_norm, self.config.rms_norm_eps)
        return self._qkv(0, x, positions, meta, kv), h

    def attention(self, n: int, q: torch.Tensor, meta: AttentionMetadata, kv: PagedKVCache) -> torch.Tensor:
        """Layer n's attention over the paged KV: [tokens, q_size]."""
        o = self.ops.attention(q, kv.k_caches[n], kv.v_caches[n], meta, self.scale)
        return o.reshape(-1, self.config.q_size)

    def middle_piece(self, n: int, o: torch.Tensor, h: torch.Tensor, positions, meta: AttentionMetadata,
                     kv: PagedKVCache):
        """Layer n-1 from its attention output on, and layer n up to its attention."""
        x, h = self._after_attention(n - 1, o, h, self.layers[n].input_norm)
        return self._qkv(n, x, positions, meta, kv), h

    def last_piece(self, o: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
        """The last layer from its attention output on, through the final norm."""
        x, _ = self._after_attention(len(self.layers) - 1, o, h, self.final_norm)
        return x

    def _qkv(self, n: int, x, positions, meta: AttentionMetadata, kv: PagedKVCache) -> torch.Tensor:
        layer = self.layers[n]
        return self.ops.qkv_to_cache(F.linear(x, layer.qkv, layer.qkv_bias), positions, meta,
                                     kv.k_caches[n], kv.v_caches[n], layer)

    def _after_attention(self, n: int, o: torch.Tensor, h: torch.Tensor, next_norm: torch.Tensor):
        """Layer n's output projection and MLP with their residual adds; (x, h) with x normed
        by `next_norm` (the next layer's input norm, or the final norm)."""
        ops, eps, tp, layer = self.ops, self.config.rms_norm_eps, self.tp, self.layers[n]
        attn = F.linear(o, layer.o, layer.o_bias if tp is None else None)
        if tp is not None:
            attn = _add_bias(tp.all_reduce(attn), layer.o_bias)
        x, h = ops.add_rms_norm(attn, h, layer.post_norm, eps)
        mlp = F.linear(ops.silu_and_mul(F.linear(x, layer.gate_up)), layer.down)
        if tp is not None:
            mlp = tp.all_reduce(mlp)
        return ops.add_rms_norm(mlp, h, next_norm, eps)

    def projections(self) -> list[tuple[torch.Tensor, torch.Tensor | None]]:
        """(weight, bias) of each linear layer of a block, as forward applies them: every
        block has the same shapes."""
        layer = self.layers[0]
        return [(layer.qkv, layer.qkv_bias), (layer.o, layer.o_bias if self.tp is None else None),
                (layer.gate_up, None), (layer.down, None)]

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Float32 logits over the whole vocabulary (on every rank of a TP group)."""
        logits = F.linear(hidden, self.lm_head)
        if self.gather_logits:
            logits = self.tp.all_gather(logits, dim=-1)
        return logits.float()


def _add_bias(x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    return x if bias is None else x + bias
