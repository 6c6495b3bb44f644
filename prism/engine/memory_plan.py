"""How many pages a model's weights and KV take: the page arithmetic, torch-free.

The engine lays its arenas out with these functions and the simulator counts pages with the
very same ones, so a simulated device runs out of memory exactly where a real one would.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterable

from prism.config import ModelConfig
from prism.engine.block_manager import BlockManager
from prism.memory.page_pool import Owner, PagePool
from prism.types import RequestError

ALIGN = 256  # bytes; keeps every tensor aligned for vectorized loads
DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}


def dtype_itemsize(dtype: str, device: str) -> int:
    """Bytes per element of a ModelSpec dtype; "auto" is bfloat16 on CUDA, float32 on a CPU
    (what the engine's default_dtype picks)."""
    if dtype == "auto":
        return 2 if device.startswith("cuda") else 4
    return DTYPE_BYTES[dtype]


# ---- weights ---------------------------------------------------------------------------------
@dataclass(frozen=True)
class TensorSlot:
    offset: int  # bytes into the arena
    shape: tuple[int, ...]


@dataclass
class WeightLayout:
    """Where every fused tensor lives, and each HF name's (fused name, row range)."""

    slots: dict[str, TensorSlot] = field(default_factory=dict)
    hf_names: dict[str, tuple[str, int, int]] = field(default_factory=dict)
    num_bytes: int = 0

    def add(self, name: str, shape: tuple[int, ...], itemsize: int, parts: Iterable[tuple[str, int]]):
        """Add fused tensor `name`; `parts` are (hf_name, rows) stacked along dim 0."""
        self.num_bytes = -(-self.num_bytes // ALIGN) * ALIGN
        self.slots[name] = TensorSlot(self.num_bytes, shape)
        numel = 1
        for d in shape:
            numel *= d
        self.num_bytes += numel * itemsize
        row = 0
        for hf_name, rows in parts:
            self.hf_names[hf_name] = (name, row, row + rows)
            row += rows
        assert row == shape[0], f"parts of {name} do not add up"


def weight_layout(config: ModelConfig, itemsize: int, vocab_shards: int = 1) -> WeightLayout:
    """The weight arena's layout: q, k and v projections back to back (one [q + 2kv, hidden]
    matrix), gate and up likewise, so each HF parameter is a view into a fused tensor.

    A tensor-parallel rank passes its sharded config (see tp_shard.py) and, when its LM head
    is split by vocabulary, `vocab_shards` (the head then has vocab / vocab_shards rows)."""
    c, sz = config, itemsize
    h, q, kv, i = c.hidden_size, c.q_size, c.kv_size, c.intermediate_size
    lay = WeightLayout()
    lay.add("embed", (c.vocab_size, h), sz, [("model.embed_tokens.weight", c.vocab_size)])
    for n in range(c.num_layers):
        p = f"model.layers.{n}."
        att = p + "self_attn."
        lay.add(p + "qkv", (q + 2 * kv, h), sz,
                [(att + "q_proj.weight", q), (att + "k_proj.weight", kv), (att + "v_proj.weight", kv)])
        if c.attention_bias:
            lay.add(p + "qkv_bias", (q + 2 * kv,), sz,
                    [(att + "q_proj.bias", q), (att + "k_proj.bias", kv), (att + "v_proj.bias", kv)])
        if c.qk_norm:
            lay.add(p + "q_norm", (c.head_dim,), sz, [(att + "q_norm.weight", c.head_dim)])
            lay.add(p + "k_norm", (c.head_dim,), sz, [(att + "k_norm.weight", c.head_dim)])
        lay.add(p + "o", (h, q), sz, [(att + "o_proj.weight", h)])
        if c.attention_out_bias:
            lay.add(p + "o_bias", (h,), sz, [(att + "o_proj.bias", h)])
        mlp = p + "mlp."
        lay.add(p + "gate_up", (2 * i, h), sz, [(mlp + "gate_proj.weight", i), (mlp + "up_proj.weight", i)])
        lay.add(p + "down", (h, i), sz, [(mlp + "down_proj.weight", h)])
        lay.add(p + "input_norm", (h,), sz, [(p + "input_layernorm.weight", h)])
        lay.add(p + "post_norm", (h,), sz, [(p + "post_attention_layernorm.weight", h)])
    lay.add("norm", (h,), sz, [("model.norm.weight", h)])
    if not c.tie_word_embeddings:
        rows = c.vocab_size // vocab_shards
        lay.add("lm_head", (rows, h), sz, [("lm_head.weight", rows)])
    return lay


def num_pages_for(num_bytes: int, page_size: int) -> int:
    return -(-num_bytes // page_size)


# ---- KV ----------------------------------------------------------------------------------------
@dataclass(frozen=True)
class KVGeometry:
    """A model's KV over pages: KV page p is page p of each of the 2 x num_layers K and V
    arenas, and holds `blocks_per_page` whole blocks (a block never straddles a page)."""

    block_size: int
    blocks_per_page: int
    num_virtual_pages: int  # KV pages the arenas reserve room for
    pages_per_kv_page: int  # physical pages one KV page takes (2 x num_layers)

    @property
    def tokens_per_page(self) -> int:
        return self.block_size * self.blocks_per_page


def kv_geometry(config: ModelConfig, itemsize: int, block_size: int, page_size: int,
                budget_pages: int) -> KVGeometry:
    block_bytes = block_size * config.kv_size * itemsize
    blocks_per_page = page_size // block_bytes
    if blocks_per_page < 1:
        raise ValueError(
            f"a KV block of {block_size} tokens ({block_bytes} bytes per layer) is larger "
            f"than a page ({page_size} bytes); use a smaller block_size"
        )
    group = 2 * config.num_layers
    # Reserve enough virtual range for this model to hold KV in every page of the device.
    num_virtual_pages = max(1, budget_pages // group)
    return KVGeometry(block_size, blocks_per_page, num_virtual_pages, group)


def max_kv_blocks(blocks: BlockManager, pages_per_kv_page: int, budget_pages: int, weight_pages: int) -> int:
    """KV blocks a model would have if it had every page its weights leave free."""
    kv_pages = (budget_pages - weight_pages) // pages_per_kv_page
    return min(blocks.max_blocks(), kv_pages * blocks.blocks_per_page)


def check_prompt_fits(model_id: str, num_prompt_tokens: int, max_model_len: int,
                      blocks: BlockManager, max_blocks: int) -> None:
    """The two refusals every engine (real or simulated) makes before queueing a prompt."""
    if num_prompt_tokens >= max_model_len:
        raise RequestError(
            f"the prompt has {num_prompt_tokens} tokens but {model_id}'s context limit "
            f"is {max_model_len} (prompt plus at least one generated token)"
        )
    if blocks.num_blocks_for(num_prompt_tokens + 1) > max_blocks:
        raise RequestError(
            f"the prompt has {num_prompt_tokens} tokens, more than the KV memory this "
            f"device can ever give {model_id}"
        )


def mappable_kv_pages(pool: PagePool, owner: Owner, pages_per_kv_page: int) -> int:
    """How many more KV pages (of `pages_per_kv_page` physical pages each) the pool would give
    `owner` right now, within the budget and the owner's cap."""
    group = pages_per_kv_page
    hi = pool.free_pages // group
    if hi <= 0 or pool.can_allocate(owner, hi * group):
        return max(hi, 0)
    lo = 0  # an owner cap binds: find the largest n the pool accepts
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if pool.can_allocate(owner, mid * group):
            lo = mid
        else:
            hi = mid - 1
    return lo
