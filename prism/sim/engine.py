"""One model on a simulated device.

The real per-model machinery runs unchanged: the engine's `Scheduler` (continuous batching,
chunked prefill, recompute preemption), its `BlockManager` (blocks over pages, mapped on first
use), the device's `PagePool` (budget, caps) and the `OutputProcessor` (stop conditions,
per-request timings). Only what touches a GPU is replaced: weights and KV are page counts
(a counting backend hands out chunk handles, no memory), and a step's forward pass is the
time the cost model gives it, by which the device's clock moves.
"""
from __future__ import annotations

import itertools
from typing import Callable

from prism.config import ModelSpec
from prism.engine.block_manager import BlockManager
from prism.engine.memory_plan import (
    check_prompt_fits, kv_geometry, mappable_kv_pages, max_kv_blocks, num_pages_for,
)
from prism.engine.output_processor import OutputProcessor, TokenEvent
from prism.engine.scheduler import Scheduler, VictimChooser
from prism.engine.sequence import Sequence, StepPlan
from prism.memory.backend import PhysicalChunk
from prism.memory.page_pool import Owner, PagePool
from prism.sched.clock import ManualClock
from prism.sched.view import SLO, CostModel
from prism.sim.costs import ColdShapes, HostOverheads, step_seconds
from prism.sim.shapes import ModelShape
from prism.types import CompletionOutput, FinishReason, RequestError, SamplingParams

SAMPLED_TOKEN = 0  # what a simulated step "samples"; EOS is never checked (see SimEngine)


class CountingBackend:
    """A memory backend that only hands out chunk handles: the PagePool keeps the books."""

    def __init__(self, page_size: int):
        self.page_size = page_size
        self._ids = itertools.count(1)

    def create(self, num_pages: int) -> PhysicalChunk:
        return PhysicalChunk(next(self._ids), num_pages)

    def release(self, chunk: PhysicalChunk) -> None:
        pass


class SimWeights:
    """A model's weight pages: mapped (resident) or not."""

    def __init__(self, pool: PagePool, owner: Owner, num_bytes: int):
        self.pool, self.owner, self.num_bytes = pool, owner, num_bytes
        self.num_pages = num_pages_for(num_bytes, pool.page_size)
        self._chunk: PhysicalChunk | None = None

    @property
    def mapped(self) -> bool:
        return self._chunk is not None

    def map(self) -> bool:
        if self._chunk is None:
            self._chunk = self.pool.allocate(self.owner, self.num_pages)
        return self._chunk is not None

    def unmap(self) -> None:
        if self._chunk is not None:
            self.pool.free(self.owner, self._chunk)
            self._chunk = None


class CountingKV:
    """The BlockManager's PageMapper over pool pages: a KV page is `pages_per_kv_page`
    physical pages (K and V of every layer), taken and given back as one."""

    def __init__(self, pool: PagePool, owner: Owner, pages_per_kv_page: int):
        self.pool, self.owner, self.pages_per_kv_page = pool, owner, pages_per_kv_page
        self._chunks: dict[int, PhysicalChunk] = {}

    @property
    def num_mapped_pages(self) -> int:
        return len(self._chunks)

    def num_mappable_pages(self) -> int:
        return mappable_kv_pages(self.pool, self.owner, self.pages_per_kv_page)

    def map_page(self, page: int) -> bool:
        if not self.pool.can_allocate(self.owner, self.pages_per_kv_page):
            return False
        chunk = self.pool.allocate(self.owner, self.pages_per_kv_page)
        if chunk is None:
            return False
        self._chunks[page] = chunk
        return True

    def unmap_page(self, page: int) -> None:
        self.pool.free(self.owner, self._chunks.pop(page))


class SimEngine:
    """What `DeviceCore` needs of an engine (prism.worker.device_core.DeviceEngine).

    Requests run to max_tokens (or the context limit): a simulated model never says EOS, and
    traces give the true output length as max_tokens."""

    def __init__(self, spec: ModelSpec, shape: ModelShape, pool: PagePool, clock: ManualClock,
                 cost: CostModel, choose_victim: VictimChooser | None = None,
                 host: HostOverheads = HostOverheads(), cold: ColdShapes | None = None):
        self.model_id = spec.name
        self.shape = shape
        self.config = shape.config
        self.pool = pool
        self.clock = clock
        self.cost = cost  # what a step takes on this device (the simulation's truth)
        self.host = host  # host time per step beyond the forward pass
        self.cold = cold or ColdShapes(host.cold_shape_s)  # the device's, shared by its engines
        self.weights = SimWeights(pool, Owner(spec.name, "weights"), shape.weight_bytes)
        if not self.weights.map():
            raise RuntimeError(
                f"{spec.name}: weights need {self.weights.num_pages} pages "
                f"({shape.weight_bytes / 2**30:.2f} GiB) but the device has "
                f"{pool.free_pages} free of {pool.budget_pages}")
        self.geometry = kv_geometry(shape.config, shape.itemsize, spec.engine.block_size,
                                    pool.page_size, pool.budget_pages)
        self.kv = CountingKV(pool, Owner(spec.name, "kv"), self.geometry.pages_per_kv_page)
        self.blocks = BlockManager(self.geometry.num_virtual_pages, self.geometry.blocks_per_page,
                                   self.geometry.block_size, self.kv)
        self.scheduler = Scheduler(spec.engine, self.blocks, choose_victim)
        limit = spec.engine.max_model_len or shape.config.max_position_embeddings
        self.max_model_len = min(limit, shape.config.max_position_embeddings)
        self.outputs = OutputProcessor(None, (), self.max_model_len)
        self.last_step_num_tokens = 0
        self.last_plan: StepPlan | None = None
        self._req_counter = itertools.count()
        self._live: dict[str, Sequence] = {}  # unfinished requests by id

    # ---- requests --------------------------------------------------------------------------
    def add_request(self, prompt: list[int], params: SamplingParams = SamplingParams(),
                    req_id: str | None = None, arrival_time: float | None = None,
                    slo: SLO | None = None, priority: int = 0) -> str:
        if isinstance(prompt, str) or not prompt:
            raise RequestError("a simulated model takes a non-empty list of token ids")
        self._check_fits(len(prompt))
        req_id = req_id or f"{self.model_id}-{next(self._req_counter)}"
        if req_id in self.outputs:
            raise RequestError(f"request id {req_id!r} is already in use")
        arrival = self.clock.now() if arrival_time is None else arrival_time
        seq = Sequence(req_id, list(prompt), params, arrival, slo=slo, priority=priority)
        self.outputs.add(seq)
        self.scheduler.add(seq)
        self._live[req_id] = seq
        return req_id

    def _check_fits(self, num_prompt_tokens: int) -> None:
        max_blocks = max_kv_blocks(self.blocks, self.kv.pages_per_kv_page, self.pool.budget_pages,
                                   self.weights.num_pages)
        check_prompt_fits(self.model_id, num_prompt_tokens, self.max_model_len, self.blocks, max_blocks)

    def abort(self, req_id: str) -> CompletionOutput | None:
        seq = self._live.get(req_id)
        return None if seq is None else self._finish(seq, FinishReason.ABORT, self.clock.now())

    def first_token_time(self, req_id: str) -> float | None:
        """When an unfinished request got its first token (None: not yet, or not here)."""
        seq = self._live.get(req_id)
        return None if seq is None else seq.first_token_time

    def sequences(self) -> list[Sequence]:
        """Every unfinished request: running ones first, then waiting in queue order."""
        return self.scheduler.unfinished()

    @property
    def has_unfinished(self) -> bool:
        return self.scheduler.has_work

    # ---- stepping --------------------------------------------------------------------------
    def step(self) -> list[CompletionOutput]:
        """Run one batch: the clock moves by its cost; finished requests are returned."""
        plan = self.scheduler.schedule()
        self.last_plan = plan
        self.last_step_num_tokens = plan.num_tokens
        if plan.is_empty:
            return []
        now = self.clock.now()
        for chunk in plan.chunks:
            if chunk.seq.admitted_time is None:
                chunk.seq.admitted_time = now
        terms = plan.cost_terms()
        self.clock.advance(self.host.step_time(len(plan.chunks)) + step_seconds(self.cost, self.model_id, *terms)
                           + self.cold.charge(self.shape.kernel_key, terms))
        self.scheduler.commit(plan)
        now = self.clock.now()
        finished = []
        for chunk in plan.chunks:
            if chunk.samples:
                event = self.outputs.on_token(chunk.seq, SAMPLED_TOKEN, now)
                if event.finish_reason is not None:
                    finished.append(self._finish(chunk.seq, event.finish_reason, now))
        return finished

    def _finish(self, seq: Sequence, reason: FinishReason, now: float) -> CompletionOutput:
        _, out = self.outputs.finish(seq, reason, now)
        self.scheduler.finish(seq, reason)
        self._live.pop(seq.req_id, None)
        return out

    def drain_events(self) -> list[TokenEvent]:
        return []  # nothing streams: token times come with each finished request's metrics

    # ---- residency -------------------------------------------------------------------------
    @property
    def resident(self) -> bool:
        return self.weights.mapped

    def evict(self) -> list[Sequence]:
        preempted = self.scheduler.preempt_all()
        self.blocks.release_all_free_pages()
        self.weights.unmap()
        return preempted

    def activate(self) -> None:
        """Map the weights and copy them in: the device is busy for the copy."""
        if self.resident:
            return
        if not self.weights.map():
            raise RuntimeError(f"{self.model_id}: no room for its weights")
        self.clock.advance(self.cost.activation_time(self.model_id))

    @property
    def num_kv_pages(self) -> int:
        return self.kv.num_mapped_pages * self.kv.pages_per_kv_page

    def close(self) -> None:
        for seq in self.sequences():
            self._finish(seq, FinishReason.ABORT, self.clock.now())
        self.blocks.release_all_free_pages()
        self.weights.unmap()


def victim_chooser(choose: Callable[[str, list[Sequence]], Sequence], model_id: str) -> VictimChooser:
    return lambda candidates: choose(model_id, candidates)
