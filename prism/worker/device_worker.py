"""One device, many models: shared page pool, eviction and activation, one SLO-aware queue.

The real device: engines hold weights and KV in the device's memory and run forward passes.
Each step the worker shows the local scheduler a snapshot and carries out its decision; that
flow lives in `DeviceCore`, which the simulator's devices share. Every model keeps a host copy
of its weights, so eviction is an unmap and activation a map plus a copy back to the same
addresses; with `host_copy_dir` the workers of a node share one copy per model (a file in
/dev/shm each maps), and the frontend drops copies to keep the node within its budget.
"""
from __future__ import annotations

import dataclasses
import os

import torch

from prism import env
from prism.config import ModelSpec
from prism.engine.catalog import resolve_model
from prism.engine.host_store import SharedHostCopies
from prism.engine.llm_engine import LLMEngine, default_dtype
from prism.engine.model_weights import plan_layout
from prism.memory import PagePool, make_backend
from prism.sched.clock import Clock, MonotonicClock
from prism.sched.cost import DefaultCosts, ProfileCostModel, load_profiles
from prism.sched.view import CostModel
from prism.worker.device_core import DeviceCore, StepOutput, WorkerConfig

__all__ = ["DeviceWorker", "StepOutput", "WorkerConfig"]


def cpu_threads(cpu_workers_on_node: int) -> int:
    """torch threads for one of the node's CPU workers: an equal share of its cores."""
    return max(1, (os.cpu_count() or 1) // max(1, cpu_workers_on_node))


class DeviceWorker(DeviceCore):
    def __init__(self, config: WorkerConfig, clock: Clock | None = None,
                 cost: CostModel | None = None, show_progress: bool = False):
        if not config.models:
            raise ValueError("a device worker needs at least one model")
        dev = config.device
        if not dev.is_cuda:
            torch.set_num_threads(cpu_threads(config.cpu_workers_on_node))
        pool = PagePool(make_backend(dev.device, dev.page_size), dev.num_pages, dev.num_spare_pages)
        # Without a measured profile, estimates come from model sizes and the device's nominal
        # rates (a CPU's defaults would make every GPU step look hopelessly late).
        defaults = DefaultCosts.nvidia_h100() if dev.is_cuda else DefaultCosts()
        super().__init__(config, clock or MonotonicClock(), pool,
                         cost or ProfileCostModel(defaults=defaults),
                         load_profiles(env.profile_dir(), device=dev.device) if cost is None else {})
        self._show_progress = show_progress
        self._host_store = SharedHostCopies(config.host_copy_dir) if config.host_copy_dir else None
        self._register_all()

    def _dtype(self, spec: ModelSpec) -> torch.dtype:
        if spec.dtype == "auto":
            return default_dtype(torch.device(self.config.device.device))
        return getattr(torch, spec.dtype)

    def _weight_bytes(self, spec: ModelSpec) -> int:
        return plan_layout(resolve_model(spec.source).config, self._dtype(spec)).num_bytes

    def _new_engine(self, spec: ModelSpec) -> LLMEngine:
        engine_config = spec.engine
        if self.config.scheduler.concurrent_models > 1 or self.own_pace:  # its steps may run beside others'
            engine_config = dataclasses.replace(engine_config, own_stream=True)
        return LLMEngine(
            resolve_model(spec.source), engine_config, self.config.device, pool=self.pool,
            dtype=self._dtype(spec), model_id=spec.name, show_progress=self._show_progress,
            clock=self.clock.now, choose_victim=self._victim_chooser(spec.name),
            keep_host_copy=True, detokenize=self.config.detokenize, host_store=self._host_store,
        )
