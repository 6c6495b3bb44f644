"""The simulated executor: one model's memory as page counts, its forward pass as time.

What the engine core (prism.engine.core) asks of an executor, without a GPU: weights and KV
are pool pages (a counting backend hands out chunk handles, no memory), a step takes the time
the cost model gives it (plus host overheads and a fresh server's cold shapes), by which the
device's ManualClock moves, and every sampled token is SAMPLED_TOKEN. The core around it is
the real engine's, so batching, KV mapping (map-ahead and trim included) and preemption are
the real ones.
"""
from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import Callable

from prism.config import ModelSpec
from prism.engine.executor import ModelSizes
from prism.engine.memory_plan import kv_geometry, mappable_kv_pages, num_pages_for
from prism.engine.sequence import SampledToken, Sequence, StepPlan
from prism.memory.backend import PhysicalChunk
from prism.memory.page_pool import Owner, PagePool
from prism.sched.clock import ManualClock
from prism.sched.view import CostModel
from prism.sched.concurrency import ChipStep, SharedChip, StepFloor
from prism.sim.costs import ColdShapes, ConcurrentTurn, HostOverheads, step_seconds
from prism.sim.shapes import ModelShape

SAMPLED_TOKEN = 0  # what a simulated step "samples"; its engines have no EOS (see sim/engine.py)


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

    def close(self) -> None:
        for page in list(self._chunks):
            self.unmap_page(page)


@dataclass(frozen=True)
class SimStep:
    """A step launched at its model's own pace: where it is on the shared chip, and the
    sequences it samples."""

    on_chip: ChipStep
    samples: tuple[Sequence, ...]

    @property
    def done(self) -> float:
        return self.on_chip.done


class SimExecutor:
    """The Executor (prism.engine.executor) of a simulated device. `cost` is what a step takes
    on this device (the simulation's truth); `host` the host time per step beyond the forward
    pass; `cold` the device's first-use costs, shared by its engines."""

    def __init__(self, spec: ModelSpec, shape: ModelShape, pool: PagePool, clock: ManualClock,
                 cost: CostModel, host: HostOverheads = HostOverheads(), cold: ColdShapes | None = None,
                 host_copies: set[str] | None = None, turn: ConcurrentTurn | None = None,
                 chip: SharedChip | None = None):
        """`host_copies`: the models whose weights the device's node holds in host memory,
        shared by the node's devices (None: a copy of this model is always at hand). `turn`:
        the device's account of the steps it runs side by side (None: one model per step).
        `chip`: the device shared by models stepping at their own pace, each on its own
        timeline (None: steps move the device's clock)."""
        self.model_id = spec.name
        self.shape = shape
        self.graph_max_tokens = spec.engine.mixed_graph_max_tokens  # eager launches beyond (launch_time)
        self.config = shape.config
        self.pool = pool
        self.clock = clock
        self.cost = cost
        self.host = host
        self.cold = cold or ColdShapes(host.cold_shape_s)
        self.budget_pages = pool.budget_pages
        self.weights = SimWeights(pool, Owner(spec.name, "weights"), shape.weight_bytes)
        if not self.weights.map():
            raise RuntimeError(
                f"{spec.name}: weights need {self.weights.num_pages} pages "
                f"({shape.weight_bytes / 2**30:.2f} GiB) but the device has "
                f"{pool.free_pages} free of {pool.budget_pages}")
        self.kv_geometry = kv_geometry(shape.config, shape.itemsize, spec.engine.block_size,
                                       pool.page_size, pool.budget_pages)
        self.kv = CountingKV(pool, Owner(spec.name, "kv"), self.kv_geometry.pages_per_kv_page)
        self.kv_mapper = self.kv
        self.sizes = ModelSizes(shape.weight_bytes, self.weights.num_pages, shape.kv_bytes_per_token,
                                shape.config.vocab_size)
        self.host_copies = host_copies
        self.turn = turn
        self.chip = chip
        # At its own pace a model's steps are launched and read later (the engine's overlap),
        # each done on the model's own timeline; in turn the host's time is charged per step
        # (HostOverheads) and a step moves the device's clock.
        self.supports_overlap = chip is not None
        self.last_launched: SimStep | None = None
        self.num_storage_reads = 0  # activations that read storage first (the node had no copy)
        self._add_host_copy()  # the weights were read from the source: the node keeps a copy

    @property
    def weights_mapped(self) -> bool:
        return self.weights.mapped

    @property
    def num_kv_pages(self) -> int:
        return self.kv.num_mapped_pages * self.kv.pages_per_kv_page

    def execute(self, plan: StepPlan, while_running: Callable[[], None]) -> list[SampledToken]:
        """The step's time passes on the device's clock; every sampling chunk gets SAMPLED_TOKEN.
        A step run beside others (`turn`) moves it only by what it adds to their turn; at the
        model's own pace (`chip`, an engine without overlap) the host waits for its step while
        other models' steps go on."""
        if self.chip is not None:
            step = self.launch(plan, None)
            while_running()
            return self.collect(step)
        terms = plan.cost_terms()
        device_s = self._device_seconds(terms)
        if self.turn is not None:
            device_s = self.turn.charge(device_s, self._floor(terms, plan.num_tokens, self.turn))
        self.clock.advance(self.host.step_time(len(plan.chunks)) + device_s)
        while_running()
        return [SampledToken(chunk.seq, SAMPLED_TOKEN) for chunk in plan.chunks if chunk.samples]

    def _device_seconds(self, terms: tuple[int, int, int]) -> float:
        """The step's device time alone (a fresh server's first shapes included); `terms`: its
        plan's cost_terms()."""
        return step_seconds(self.cost, self.model_id, *terms) + self.cold.charge(self.shape.kernel_key, terms)

    def _floor(self, terms: tuple[int, int, int], num_tokens: int, rates: ConcurrentTurn | SharedChip) -> StepFloor:
        return rates.floor(self.shape.weight_bytes, self.shape.kv_bytes_per_token, terms[1], num_tokens)

    # ---- at the model's own pace (chip) ----------------------------------------------------------
    def launch(self, plan: StepPlan, after: SimStep | None) -> SimStep:
        """The step starts now on the model's own timeline: its host time, then its device time
        shared with the other models' steps on the chip (SharedChip). The clock does not move."""
        terms = plan.cost_terms()
        hold_s = self.host.launch_time(len(plan.chunks), plan.num_tokens, terms[2],
                                       self.shape.num_layers, self.graph_max_tokens)
        on_chip = self.chip.launch(self.clock.now(), self.host.step_time(len(plan.chunks)), self._device_seconds(terms),
                                   self._floor(terms, plan.num_tokens, self.chip), hold_s, self.shape.num_layers)
        self.last_launched = SimStep(on_chip, tuple(c.seq for c in plan.chunks if c.samples))
        return self.last_launched

    def is_done(self, step: SimStep) -> bool:
        return step.done <= self.clock.now()

    def collect(self, step: SimStep) -> list[SampledToken]:
        """The step's tokens; a read before it is done waits for it (the clock moves to its end)."""
        if step.done > self.clock.now():
            self.clock.set(step.done)
        return [SampledToken(seq, SAMPLED_TOKEN) for seq in step.samples]

    def forget(self, seq: Sequence) -> None:
        pass  # no per-request state

    def unmap_weights(self) -> None:
        self.weights.unmap()

    def activate(self) -> None:
        """Map the weights and copy them in: the device is busy for the copy, and before it
        for the read from storage when the node holds no host copy (which then makes one)."""
        if not self.weights.map():
            raise RuntimeError(f"{self.model_id}: no room for its weights")
        if not self.has_host_copy:
            self.num_storage_reads += 1
            self.clock.advance(self.shape.weight_bytes / self.host.storage_bytes_per_s)
            self._add_host_copy()
        self.clock.advance(self.cost.activation_time(self.model_id))

    @property
    def has_host_copy(self) -> bool:
        return self.host_copies is None or self.model_id in self.host_copies

    def drop_host_copy(self) -> None:
        if self.host_copies is not None:
            self.host_copies.discard(self.model_id)

    def _add_host_copy(self) -> None:
        if self.host_copies is not None:
            self.host_copies.add(self.model_id)

    def close(self) -> None:
        self.kv.close()
        self.weights.unmap()
