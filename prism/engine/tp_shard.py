"""What one rank of a tensor-parallel group holds: the shard plan, torch-free.

Megatron-style: q/k/v and gate/up are split by output rows (each rank owns whole heads and a
slice of the MLP), o and down by input columns (each rank computes a partial sum that an
all-reduce adds up). A rank therefore runs the ordinary model over a *sharded view* of the
config (heads / tp, KV heads / tp, intermediate / tp), so its KV cache, block manager and
kernels need no change. What is not split:

- norms (q/k norms included): replicated, they are tiny;
- o_proj's bias (Llama/Qwen3 with attention_bias): replicated and added once, after the
  all-reduce;
- the embedding: replicated. It costs memory (vocab x hidden per rank: 2.1 GB for
  Llama-3.1-70B in bf16) but no bandwidth (a step reads only its tokens' rows) and needs no
  collective; a vocab-parallel embedding would save that memory for a mask and one more
  all-reduce per step;
- the LM head is vocab-parallel (each rank computes vocab / tp logits, an all-gather joins
  them) because every step reads all of it: split, each GPU reads 1/tp of it. A tied head is
  then a slice of the replicated embedding (no extra memory). When the vocabulary does not
  divide by tp the head is replicated instead.

KV heads: split when num_kv_heads divides by tp; when tp is a multiple of num_kv_heads each
rank keeps the one KV head its query heads use (replicated on tp / num_kv_heads ranks, so KV
memory is not divided further). Anything else is refused with a one-line TPError.

The simulator and the global scheduler size shards with the same functions (`shard_sizes`).
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from functools import cached_property
from typing import TYPE_CHECKING

from prism.config import ConfigError, ModelConfig
from prism.engine.memory_plan import weight_layout

if TYPE_CHECKING:
    import torch

# (dim, start, length): the slice of a checkpoint tensor one rank keeps; None: all of it.
Slice = tuple[int, int, int] | None


class TPError(ConfigError):
    """A model cannot be split across this many GPUs; the message says why, on one line."""


def check_tp(config: ModelConfig, tp: int, name: str = "model") -> None:
    """Raise TPError unless `config` splits evenly across `tp` ranks."""
    if tp < 1:
        raise TPError(f"{name}: tensor-parallel size must be >= 1, got {tp}")
    problems = []
    if config.num_heads % tp:
        problems.append(f"num_attention_heads {config.num_heads} is not a multiple of {tp}")
    kv = config.num_kv_heads
    if kv % tp and tp % kv:
        problems.append(f"num_key_value_heads {kv} is neither a multiple nor a divisor of {tp}")
    if config.intermediate_size % tp:
        problems.append(f"intermediate_size {config.intermediate_size} is not a multiple of {tp}")
    if problems:
        raise TPError(f"{name} cannot be split across {tp} GPUs: {'; '.join(problems)}")


def vocab_parallel(vocab_size: int, tp: int) -> bool:
    """Whether the LM head is split by vocabulary rows (else replicated)."""
    return tp > 1 and vocab_size % tp == 0


@dataclass(frozen=True)
class TPShard:
    """Rank `rank` of a `size`-way split of the model `full`."""

    full: ModelConfig
    size: int
    rank: int
    name: str = "model"

    def __post_init__(self) -> None:
        check_tp(self.full, self.size, self.name)
        if not 0 <= self.rank < self.size:
            raise TPError(f"{self.name}: rank {self.rank} is outside a group of {self.size}")

    # ---- shapes ------------------------------------------------------------------------------
    @cached_property
    def config(self) -> ModelConfig:
        """The model as this rank sees it: its heads, KV heads and MLP slice."""
        c, tp = self.full, self.size
        return replace(c, num_heads=c.num_heads // tp, num_kv_heads=max(1, c.num_kv_heads // tp),
                       intermediate_size=c.intermediate_size // tp)

    @property
    def vocab_parallel(self) -> bool:
        return vocab_parallel(self.full.vocab_size, self.size)

    @property
    def vocab_rows(self) -> tuple[int, int]:
        """(first row, rows) of the LM head this rank computes."""
        if not self.vocab_parallel:
            return 0, self.full.vocab_size
        rows = self.full.vocab_size // self.size
        return self.rank * rows, rows

    @property
    def vocab_shards(self) -> int:
        return self.size if self.vocab_parallel else 1

    def weight_bytes(self, itemsize: int) -> int:
        """Bytes of this rank's weight arena (the same on every rank)."""
        return weight_layout(self.config, itemsize, self.vocab_shards).num_bytes

    # ---- checkpoint slices -------------------------------------------------------------------
    def slice_for(self, hf_name: str) -> Slice:
        """The part of checkpoint tensor `hf_name` this rank keeps."""
        c, r = self.config, self.rank
        if self.size == 1:
            return None
        if hf_name == "lm_head.weight":
            return (0, *self.vocab_rows) if self.vocab_parallel else None
        if ".self_attn.q_proj." in hf_name:
            return 0, r * c.q_size, c.q_size
        if ".self_attn.k_proj." in hf_name or ".self_attn.v_proj." in hf_name:
            return 0, self._kv_head(r) * c.head_dim, c.kv_size
        if hf_name.endswith(".self_attn.o_proj.weight"):
            return 1, r * c.q_size, c.q_size
        if ".mlp.gate_proj." in hf_name or ".mlp.up_proj." in hf_name:
            return 0, r * c.intermediate_size, c.intermediate_size
        if hf_name.endswith(".mlp.down_proj.weight"):
            return 1, r * c.intermediate_size, c.intermediate_size
        return None  # embedding, norms, o_proj bias: replicated

    def _kv_head(self, rank: int) -> int:
        """The first KV head of `rank` (KV heads split, or the one head its queries use)."""
        kv, tp = self.full.num_kv_heads, self.size
        return rank * (kv // tp) if kv >= tp else rank * kv // tp

    def select(self, hf_name: str, tensor: "torch.Tensor") -> "torch.Tensor":
        """This rank's part of a full checkpoint tensor (a view; copy it where it goes)."""
        part = self.slice_for(hf_name)
        return tensor if part is None else tensor.narrow(*part)


def shard_sizes(config: ModelConfig, tp: int, itemsize: int) -> tuple[int, int]:
    """(weight bytes, KV bytes per token) of one rank of a `tp`-way split: what placement
    counts on each GPU of the group."""
    shard = TPShard(config, tp, 0)
    return shard.weight_bytes(itemsize), shard.config.kv_bytes_per_token(itemsize)


__all__ = ["Slice", "TPError", "TPShard", "check_tp", "shard_sizes", "vocab_parallel"]
