"""One model on a simulated device: the real engine core over the simulated executor.

The real per-model machinery runs unchanged: the engine core with its `Scheduler`
(continuous batching, chunked prefill, recompute preemption), `BlockManager` (blocks over
pages, mapped on first use and ahead of the next step) and `OutputProcessor` (stop
conditions, per-request timings), over the device's `PagePool`. Only what touches a GPU is
replaced (prism.sim.executor). Requests run to max_tokens (or the context limit): a simulated
model has no EOS and no tokenizer (nothing is detokenized), and traces give the true output
length as max_tokens.
"""
from __future__ import annotations

from prism.config import ModelSpec
from prism.engine.core import EngineCore
from prism.engine.scheduler import VictimChooser
from prism.memory.page_pool import PagePool
from prism.sched.clock import ManualClock
from prism.sched.view import CostModel
from prism.sched.concurrency import SharedChip
from prism.sim.costs import ColdShapes, ConcurrentTurn, HostOverheads
from prism.sim.executor import SimExecutor
from prism.sim.shapes import ModelShape


def sim_engine(spec: ModelSpec, shape: ModelShape, pool: PagePool, clock: ManualClock, cost: CostModel,
               choose_victim: VictimChooser | None = None, host: HostOverheads = HostOverheads(),
               cold: ColdShapes | None = None, host_copies: set[str] | None = None,
               turn: ConcurrentTurn | None = None, chip: SharedChip | None = None) -> EngineCore:
    """`cost`: what a step takes on this device (the simulation's truth); `host_copies`: the
    node's, `turn`: the device's steps side by side, `chip`: the device its models share at
    their own pace (prism.sim.executor.SimExecutor)."""
    executor = SimExecutor(spec, shape, pool, clock, cost, host, cold, host_copies, turn, chip)
    return EngineCore(executor, spec.engine, clock.now, choose_victim, eos_token_ids=())
