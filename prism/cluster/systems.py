"""The registry of serving systems: prism and the baselines it is measured against, each run by
this same code (docs/policies.md). One `SystemSpec` per system says everything that differs
between them: the local and global scheduler settings it runs with, whether its models are
laid out and pinned at start, whether KV is partitioned statically, and whether every model
gets a device of its own. Code elsewhere asks the spec, never compares system names.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass, fields
from enum import Enum
from typing import Protocol

from prism.config import ConfigError
from prism.sched.local import LocalPolicy, LocalSchedulerConfig, Pace
from prism.sched.placement import GlobalSchedulerConfig

NEVER = float("inf")


class System(str, Enum):
    PRISM = "prism"
    STATIC = "static"
    MUXSERVE = "muxserve"
    SWAP = "swap"
    DEDICATED = "dedicated"
    SERVERLESS = "serverless"


class SchedulerKnobs(Protocol):
    """The scheduler section of a config, as the systems read it: `system` and every field of
    LocalSchedulerConfig and GlobalSchedulerConfig (idle_evict_s and idle_evict are shared)."""

    system: str
    policy: str
    idle_evict_s: float
    idle_evict: str
    swap_idle_s: float
    late_contender_ttft_multiple: float
    rate_window_s: float
    placement_window_s: float
    placement: str
    placement_period_s: float
    migration_threshold: float
    migration_cooldown_s: float
    kv_headroom_pages: int
    max_resident: int | None
    admission_window: int
    max_migrations_per_period: int
    kv_headroom_fraction: float
    concurrent_models: int
    pace: Pace | None  # None: the system's own (SystemSpec.pace)


def knobs_of(cls, s: SchedulerKnobs, **fixed) -> dict:
    """The section's values of every field of `cls`, with the system's fixed values over them."""
    return {f.name: getattr(s, f.name) for f in fields(cls)} | fixed


@dataclass(frozen=True)
class SystemSpec:
    system: System
    summary: str
    places_at_start: bool  # lays models out at start even with one device (prism: only with several)
    keeps_all_resident: bool  # every model stays resident where it was placed (refused if none fits)
    static_kv_shares: bool  # each model's KV capped at a share of its device (S-Partition)
    device_per_model: bool  # one device per model (no sharing at all)
    # A request for a model resident nowhere joins a device queue (QLM-style request groups:
    # the one its model's requests in flight wait on, else the least loaded) and that device's
    # own policy swaps the model in; the frontend orders no activation (ClusterControl._join_queue).
    keeps_groups: bool = False
    # the placed-once systems' order within a device (see sched/local.py) and their placement
    # at start (see sched/placement.py: prism's KVPR greedy, or MuxServe's)
    policy: LocalPolicy = LocalPolicy.ROUND_ROBIN
    placement: str = "kvpr"
    # When its models step unless the config says otherwise: `own` where the real system runs
    # each model's engine at once on the device (separate engines under MPS, MuxServe's SM
    # sharing), `turn` where models take turns (see LocalSchedulerConfig.pace).
    pace: Pace = Pace.TURN

    def scheduler_configs(self, s: SchedulerKnobs) -> tuple[LocalSchedulerConfig, GlobalSchedulerConfig]:
        """The local and global scheduler settings this system runs with: prism shares memory
        elastically, arbitrates by SLO, evicts idle models and migrates; the baselines switch
        those off one by one."""
        # kv_headroom_pages, admission_window, concurrent_models and pace (the device's
        # mechanisms for models side by side) and the global tuning knobs reach every system;
        # the rest of the local config is what a baseline is.
        tuning = {k: getattr(s, k) for k in ("kv_headroom_pages", "admission_window", "rate_window_s",
                                             "concurrent_models")}
        tuning["pace"] = self.pace if s.pace is None else Pace(s.pace)
        if self.system is System.PRISM:
            local = LocalSchedulerConfig(**knobs_of(LocalSchedulerConfig, s, pace=tuning["pace"]))
            fixed = {}
        elif self.system is System.SERVERLESS:
            # Loaded on demand where there is room; an idle model (nothing in flight) may be
            # evicted the moment another needs its memory, least recently used first; no SLO
            # arbitration (models take turns), no migration.
            local = LocalSchedulerConfig(policy=LocalPolicy.ROUND_ROBIN, idle_evict_s=0.0, idle_evict="pressure",
                                         swap_idle_s=0.0, **tuning)
            fixed = dict(migration_threshold=NEVER, idle_evict_s=0.0, idle_evict="pressure")
        elif self.system is System.SWAP:
            local = LocalSchedulerConfig(policy=LocalPolicy.FCFS, idle_evict_s=s.idle_evict_s, swap_idle_s=0.0, max_resident=1,
                                         **tuning)
            fixed = dict(migration_threshold=NEVER, idle_evict="always")
        else:  # placed once, pinned even when idle; arrival order per model, each its pace
            local = LocalSchedulerConfig(policy=self.policy, idle_evict_s=NEVER, swap_idle_s=NEVER, **tuning)
            fixed = dict(migration_threshold=NEVER, idle_evict_s=NEVER, idle_evict="always",
                         placement=self.placement)
        global_ = GlobalSchedulerConfig(**knobs_of(GlobalSchedulerConfig, s, **fixed))
        return local, global_


SYSTEMS: dict[System, SystemSpec] = {s.system: s for s in (
    SystemSpec(System.PRISM, "elastic memory, SLO-aware local order, idle eviction, migration",
               places_at_start=False, keeps_all_resident=False, static_kv_shares=False, device_per_model=False),
    SystemSpec(System.STATIC, "S-Partition: models pinned, KV split by rate x KV bytes per token",
               places_at_start=True, keeps_all_resident=True, static_kv_shares=True, device_per_model=False,
               pace=Pace.OWN),
    SystemSpec(System.MUXSERVE, "MuxServe: models placed by popularity x size and pinned, one KV pool per "
               "device with quotas by rate, prefill and decode jobs multiplexed (ADBS)",
               places_at_start=True, keeps_all_resident=True, static_kv_shares=False, device_per_model=False,
               policy=LocalPolicy.ADBS, placement="muxserve", pace=Pace.OWN),
    SystemSpec(System.SWAP, "time sharing: one resident model per device, served in arrival groups",
               places_at_start=True, keeps_all_resident=False, static_kv_shares=False, device_per_model=False,
               keeps_groups=True),
    SystemSpec(System.SERVERLESS, "ServerlessLLM-style: loaded on demand where there is room, the least "
               "recently used idle model evicted for it, models take turns",
               places_at_start=False, keeps_all_resident=False, static_kv_shares=False, device_per_model=False),
    SystemSpec(System.DEDICATED, "one device per model",
               places_at_start=True, keeps_all_resident=True, static_kv_shares=False, device_per_model=True),
)}
SYSTEM_NAMES = tuple(s.value for s in System)


def system_spec(name: str | System) -> SystemSpec:
    try:
        return SYSTEMS[System(name)]
    except ValueError:
        raise ConfigError(f"unknown system {name!r}; choose from {', '.join(SYSTEM_NAMES)}") from None


def parse_systems(text: str, option: str) -> list[str]:
    """A comma-separated list of system names (an option's value), checked, duplicates dropped."""
    names = [s.strip() for s in text.split(",") if s.strip()]
    bad = [s for s in names if s not in SYSTEM_NAMES]
    if bad or not names:
        raise ConfigError(f"{option}: unknown system {bad[0] if bad else '(none)'!r}; "
                          f"choose from {', '.join(SYSTEM_NAMES)}")
    return list(dict.fromkeys(names))


def system_config(raw: dict, system: str) -> dict:
    """A raw config (YAML content) turned into the config of one system. A system with a device
    per model gets as many copies of the first device (cpu:N on a CPU, cuda:N on GPUs: it
    needs that many cards), and no model stays pinned."""
    spec = system_spec(system)
    cfg = copy.deepcopy(raw)
    cfg.setdefault("scheduler", {})["system"] = spec.system.value
    if spec.device_per_model:
        first = cfg["devices"][0]
        kind = "cpu" if first["device"].startswith("cpu") else "cuda"
        cfg["devices"] = [dict(first, device=f"{kind}:{i}") for i in range(len(cfg["models"]))]
        for m in cfg["models"]:
            m.pop("device", None)
    return cfg
