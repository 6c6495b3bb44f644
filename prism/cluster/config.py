"""The system's YAML config (what `prism serve`, `prism simulate` and `prism plan` read):
models, devices, scheduler knobs, HTTP settings.

Parsed with pydantic (unknown keys refused) and turned into the frozen dataclasses the rest
of the system uses. Errors name the file and the bad key, e.g.
`cpu-demo.yaml: models.1.ttft_slo_ms: Input should be greater than 0`.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from prism.bench.report import SLOTargets
from prism.cluster.systems import SYSTEM_NAMES, SystemSpec, system_spec
from prism.config import ConfigError, DeviceConfig, EngineConfig, ModelSpec, parse_size
from prism.sched.local import LocalSchedulerConfig
from prism.sched.placement import GlobalSchedulerConfig

_STRICT = ConfigDict(extra="forbid")


def _size(value) -> int:
    return value if isinstance(value, int) else parse_size(str(value))


class DeviceEntry(BaseModel):
    model_config = _STRICT
    device: str = Field(pattern=r"^(cpu(:\d+)?|cuda:\d+)$")  # cpu:N: separate host budgets
    memory: int | str  # page budget: bytes, or "4GiB", "512MiB"
    page_size: int | str = 2 << 20  # the CUDA VMM granularity
    # GPUs this device stands for: > 1 is a tensor-parallel group (memory is the group's).
    # Only the simulator models groups; the server refuses them.
    gpus: int = Field(1, ge=1)

    @field_validator("memory", "page_size")
    @classmethod
    def _bytes(cls, value) -> int:
        return _size(value)


class ModelEntry(BaseModel):
    model_config = _STRICT
    name: str = Field(min_length=1, pattern=r"^[A-Za-z0-9._:/-]+$")
    source: str = Field(min_length=1)
    dtype: str = Field("auto", pattern=r"^(auto|float32|bfloat16|float16)$")
    ttft_slo_ms: float = Field(2000.0, gt=0)
    tpot_slo_ms: float = Field(200.0, gt=0)
    device: str | None = None  # pin to one device
    max_model_len: int | None = Field(None, ge=2)
    block_size: int = Field(16, ge=1)
    max_num_seqs: int = Field(64, ge=1)
    max_num_batched_tokens: int = Field(2048, ge=1)
    rate: float = Field(1.0, gt=0)  # expected relative request rate: popularity for placement, static KV shares


class SchedulerEntry(BaseModel):
    model_config = _STRICT
    # The serving system as a whole (docs/policies.md): prism, or one of the baselines it is
    # measured against, all run by this same server.
    system: str = Field("prism", pattern="^(" + "|".join(SYSTEM_NAMES) + ")$")
    policy: str = Field("prism", pattern=r"^(prism|fcfs)$")  # local order (prism system only)
    idle_evict_s: float = Field(45.0, ge=0)
    # When a model idle for idle_evict_s goes: "pressure" (only when its memory is wanted) or
    # "always" (prism system; the swap baseline always evicts idle models)
    idle_evict: str = Field("pressure", pattern="^(pressure|always)$")
    swap_idle_s: float = Field(2.0, ge=0)
    # A late request contends like on-time work after waiting this many TTFT SLOs (prism policy)
    late_contender_ttft_multiple: float = Field(3.0, gt=0)
    rate_window_s: float = Field(60.0, gt=0)
    placement_period_s: float = Field(10.0, gt=0)
    migration_threshold: float = Field(0.2, ge=0)
    migration_cooldown_s: float = Field(60.0, ge=0)


class ServerEntry(BaseModel):
    model_config = _STRICT
    host: str = "127.0.0.1"
    port: int = Field(8000, ge=0, le=65535)
    api_key: str | None = None
    metrics_log: str | None = None  # JSON-lines file per worker (suffixed with the device)


class ConfigFile(BaseModel):
    model_config = _STRICT
    devices: list[DeviceEntry] = Field(min_length=1)
    models: list[ModelEntry] = Field(min_length=1)
    scheduler: SchedulerEntry = SchedulerEntry()
    server: ServerEntry = ServerEntry()

    @model_validator(mode="after")
    def _cross_checks(self):
        names = [d.device for d in self.devices]
        if len(set(names)) != len(names):
            raise ValueError(f"devices: {names} lists a device twice")
        model_names = [m.name for m in self.models]
        dupes = sorted({n for n in model_names if model_names.count(n) > 1})
        if dupes:
            raise ValueError(f"models: name {dupes[0]!r} is used twice")
        for i, m in enumerate(self.models):
            if m.device is not None and m.device not in names:
                raise ValueError(f"models.{i}.device: {m.device!r} is not among the devices {names}")
        if system_spec(self.scheduler.system).device_per_model and len(self.devices) < len(self.models):
            raise ValueError(f"scheduler.system: {self.scheduler.system} needs a device per model "
                             f"({len(self.models)} models, {len(self.devices)} devices)")
        return self


@dataclass(frozen=True)
class ClusterConfig:
    devices: tuple[DeviceConfig, ...]
    models: tuple[ModelSpec, ...]
    pinned: dict  # model name -> device (only pinned models)
    local: LocalSchedulerConfig
    global_: GlobalSchedulerConfig
    system: str = "prism"
    rates: dict = field(default_factory=dict)  # model name -> expected relative rate
    gpus: dict = field(default_factory=dict)  # device -> GPUs it stands for (groups: simulator only)
    host: str = "127.0.0.1"
    port: int = 8000
    api_key: str | None = None
    metrics_log: str | None = None

    @property
    def system_spec(self) -> SystemSpec:
        return system_spec(self.system)


def read_yaml(path: str | Path):
    """A config file's YAML content; ConfigError (one line) if it is missing or not YAML."""
    path = Path(path)
    try:
        return yaml.safe_load(path.read_text())
    except FileNotFoundError:
        raise ConfigError(f"config file not found: {path}") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"{path.name}: not valid YAML: {str(e).splitlines()[0]}") from None


def load_config(path: str | Path) -> ClusterConfig:
    return parse_config(read_yaml(path), source=Path(path).name)


def slos_from_config(path: str | Path) -> dict[str, SLOTargets]:
    """The ttft_slo_ms / tpot_slo_ms of each model in a config, as a report judges them."""
    return {m.name: SLOTargets(m.ttft_slo_s, m.tpot_slo_s) for m in load_config(path).models}


def parse_config(raw, source: str = "config") -> ClusterConfig:
    try:
        f = ConfigFile.model_validate(raw if raw is not None else {})
    except ValidationError as e:
        err = e.errors()[0]
        where = ".".join(str(p) for p in err["loc"]) or "(top level)"
        raise ConfigError(f"{source}: {where}: {err['msg']}") from None
    devices = tuple(DeviceConfig(d.device, d.memory, d.page_size) for d in f.devices)
    models = tuple(
        ModelSpec(
            m.name, m.source, ttft_slo_s=m.ttft_slo_ms / 1e3, tpot_slo_s=m.tpot_slo_ms / 1e3,
            dtype=m.dtype,
            engine=EngineConfig(m.block_size, m.max_num_seqs, m.max_num_batched_tokens, m.max_model_len),
        )
        for m in f.models
    )
    s = f.scheduler
    pinned = {m.name: m.device for m in f.models if m.device}
    spec = system_spec(s.system)
    if spec.device_per_model:  # one device per model, in order, unless pinned otherwise
        free = [d.device for d in f.devices if d.device not in pinned.values()]
        pinned.update({m.name: free.pop(0) for m in f.models if m.name not in pinned})
    local, global_ = spec.scheduler_configs(s)
    return ClusterConfig(
        devices=devices, models=models, pinned=pinned, local=local, global_=global_,
        system=s.system, rates={m.name: m.rate for m in f.models},
        gpus={d.device: d.gpus for d in f.devices},
        host=f.server.host, port=f.server.port, api_key=f.server.api_key,
        metrics_log=f.server.metrics_log,
    )
