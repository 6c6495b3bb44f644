"""What an engine core needs of the thing that holds a model's memory and runs its forward pass.

vLLM v1's EngineCore/Executor split: the core (core.py) owns one model's requests, batching
and KV block accounting; an executor owns the memory and the compute. Two executors exist:
the device executor (device_executor.py: weight and KV arenas on a GPU or CPU, the model
runner, CUDA graphs, tensor parallelism) and the simulator's (prism/sim/executor.py: page
counts, a cost model and a manual clock). Torch-free, like the core.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Protocol

from prism.config import EngineConfig, ModelConfig
from prism.engine.block_manager import PageMapper
from prism.engine.memory_plan import KVGeometry
from prism.engine.sequence import SampledToken, Sequence, StepPlan


@dataclass(frozen=True)
class ModelSizes:
    """A model's sizes as its device sees them (a tensor-parallel rank: its shard's)."""

    weight_bytes: int
    weight_pages: int
    kv_bytes_per_token: int
    vocab_size: int


class Executor(Protocol):
    model_id: str
    config: ModelConfig  # the model this executor runs (a tensor-parallel rank: its sharded view)
    sizes: ModelSizes
    kv_geometry: KVGeometry
    kv_mapper: PageMapper  # maps and unmaps KV pages for the core's BlockManager
    budget_pages: int  # the page budget that sizes KV and request limits

    @property
    def weights_mapped(self) -> bool: ...

    @property
    def num_kv_pages(self) -> int:
        """Physical pages the model's KV holds now."""

    def execute(self, plan: StepPlan, while_running: Callable[[], None]) -> list[SampledToken]:
        """Run one step: (sequence, sampled token, logprobs) for each chunk that samples, in plan order.
        `while_running` is called once, while the step runs (host work that overlaps it)."""

    # Overlap (core.py): an executor that can queue a step without waiting for its tokens.
    supports_overlap: bool

    def launch(self, plan: StepPlan, after: object | None) -> object:
        """Queue one step and return at once: a handle for `collect`. `after` is the handle of
        the step in flight before it: the plan's pending input tokens are its sampled tokens,
        taken on the device."""

    def collect(self, step: object) -> list[SampledToken]:
        """Wait for a launched step's tokens: as `execute` returns them."""

    def is_done(self, step: object) -> bool:
        """Whether a launched step is over (`collect` would not wait), without waiting."""

    def forget(self, seq: Sequence) -> None:
        """A request ended: drop any per-request state (e.g. its random generator)."""

    def unmap_weights(self) -> None:
        """Give the weight pages back, keeping a host copy (unless it was dropped)."""

    def activate(self) -> None:
        """Map the weights again (same addresses) and copy them in, from the host copy if there
        is one, else from the model's source (which makes a new host copy); raises if no room."""

    @property
    def has_host_copy(self) -> bool:
        """Whether an activation here would copy the weights from host memory (no storage read)."""

    def drop_host_copy(self) -> None:
        """Give the host copy's memory back (the node's budget said so); the next activation
        after an eviction reads the source again."""

    def close(self) -> None:
        """Give every page back (KV and weights)."""


def context_limit(engine: EngineConfig, config: ModelConfig) -> int:
    """Most tokens (prompt plus output) one sequence may hold."""
    limit = engine.max_model_len or config.max_position_embeddings
    return min(limit, config.max_position_embeddings)
