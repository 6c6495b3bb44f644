"""One model's engine, for a user: an engine core over the device executor, plus a tokenizer.

The core (core.py) runs the request lifecycle (batching, KV blocks, outputs); the device
executor (device_executor.py) holds the weights and KV in elastic memory and runs the forward
pass. Several engines share one device by sharing its PagePool (the device worker arranges
that). An engine can be evicted (weights and KV unmapped, a host copy of the weights kept) and
activated again at the same addresses.
"""
from __future__ import annotations

import time
from typing import Callable

import torch

from prism.config import DeviceConfig, EngineConfig
from prism.engine.catalog import ModelSource, resolve_model
from prism.engine.core import EngineCore
from prism.engine.device_executor import DeviceExecutor, OutOfDeviceMemory, default_dtype
from prism.engine.host_store import SharedHostCopies
from prism.engine.parallel import TPGroup
from prism.engine.scheduler import VictimChooser
from prism.engine.tokenizer import load_tokenizer
from prism.memory import PagePool
from prism.types import CompletionOutput, SamplingParams

__all__ = ["LLMEngine", "OutOfDeviceMemory", "default_dtype"]


class LLMEngine(EngineCore):
    def __init__(
        self,
        model: str | ModelSource,
        engine_config: EngineConfig = EngineConfig(),
        device_config: DeviceConfig = DeviceConfig(),
        pool: PagePool | None = None,
        dtype: torch.dtype | None = None,
        model_id: str | None = None,
        show_progress: bool = False,
        clock: Callable[[], float] = time.monotonic,
        choose_victim: VictimChooser | None = None,
        keep_host_copy: bool = False,
        detokenize: bool = True,
        tp: TPGroup | None = None,
        host_store: SharedHostCopies | None = None,
    ):
        """`tp`: this process's rank of a tensor-parallel group (parallel.py). The engine then
        holds its shard only: `config` is the sharded view (heads / tp, ...) and `full_config`
        the model's. Every rank must be driven identically (same requests, aborts, evictions
        and steps, same settings): see parallel.py for what the ranks agree on.
        `detokenize=False`: token ids only (a server's frontend turns them into text and
        applies stop strings there). `host_store`: host copies shared by the workers of a node
        (host_store.py)."""
        source = resolve_model(model) if isinstance(model, str) else model
        executor = DeviceExecutor(source, engine_config, device_config, pool, dtype, model_id,
                                  show_progress, keep_host_copy, tp, host_store)
        try:
            tokenizer = load_tokenizer(source.tokenizer_path) if source.tokenizer_path else None
        except BaseException:
            executor.close()
            raise
        eos = tokenizer.eos_token_ids if tokenizer else executor.config.eos_token_ids
        super().__init__(executor, engine_config, clock, choose_victim, tokenizer, eos, detokenize)

    # ---- what the device executor holds (benchmarks, the profiler and tests read these) ----
    source = property(lambda self: self.executor.source)
    config = property(lambda self: self.executor.config)  # a tensor-parallel rank: its shard's
    full_config = property(lambda self: self.executor.full_config)
    tp = property(lambda self: self.executor.tp)
    shard = property(lambda self: self.executor.shard)
    device = property(lambda self: self.executor.device)
    dtype = property(lambda self: self.executor.dtype)
    pool = property(lambda self: self.executor.pool)
    weights = property(lambda self: self.executor.weights)
    kv = property(lambda self: self.executor.kv)
    runner = property(lambda self: self.executor.runner)

    def generate(
        self, prompts: list[str | list[int]], params: SamplingParams | list[SamplingParams] = SamplingParams(),
    ) -> list[CompletionOutput]:
        """Run prompts to completion together (continuous batching); outputs in prompt order."""
        param_list = params if isinstance(params, list) else [params] * len(prompts)
        ids = [self.add_request(p, sp) for p, sp in zip(prompts, param_list)]
        done: dict[str, CompletionOutput] = {}
        while len(done) < len(ids):
            for out in self.step():
                done[out.req_id] = out
            # Nobody streams these: dropped as they come, they never pile up into the old
            # generation that every full garbage collection walks.
            self.drain_events()
        return [done[i] for i in ids]
