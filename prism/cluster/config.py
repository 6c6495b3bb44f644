"""The system's YAML config (what `prism serve`, `prism simulate` and `prism plan` read):
models, devices, scheduler knobs, HTTP settings.

Parsed with pydantic (unknown keys refused) and turned into the frozen dataclasses the rest
of the system uses. Errors name the file and the bad key, e.g.
`cpu-demo.yaml: models.1.ttft_slo_ms: Input should be greater than 0`.
"""
from __future__ import annotations

from dataclasses import MISSING, dataclass, field, fields
from pathlib import Path
from typing import Annotated, get_type_hints

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, create_model, model_validator

from prism.bench.report import SLOTargets
from prism.cluster.systems import SYSTEM_NAMES, SystemSpec, system_spec
from prism.config import ConfigError, DeviceConfig, EngineConfig, ModelSpec, NodeConfig, NonNegInt, PosFloat, Size
from prism.sched.local import LocalSchedulerConfig
from prism.sched.placement import GlobalSchedulerConfig

_STRICT = ConfigDict(extra="forbid")


DEFAULT_MAX_BODY_SIZE = 4 << 20  # bytes of one HTTP request body


@dataclass(frozen=True)
class AutoDevices:
    """`ray.auto_devices`: every device the Ray cluster has, on the nodes there now and on those
    that join: one per GPU of a node (`device: cuda`) or one per node (`device: cpu`), each
    with this page budget."""

    device: Annotated[str, Field(pattern="^(cuda|cpu)$")] = "cuda"
    memory_bytes: Size = 4 << 30  # YAML: memory (required)
    page_size: Size = 2 << 20
    num_spare_pages: NonNegInt = 4


@dataclass(frozen=True)
class RayConfig:
    """The YAML's `ray:` section, read by `prism serve --ray` only (docs/cluster.md)."""

    # The cluster to join (host:port or "auto"); `--ray ADDRESS` wins; neither: ray.init()'s
    # default (RAY_ADDRESS, the cluster `ray start` started here, else a new local one).
    address: str | None = None
    # Where a worker actor listens for the frontend (ZeroMQ TCP): an address, or "node" for its
    # node's IP as Ray knows it (what a multi-node cluster needs). Loopback by default, so a
    # local cluster opens no port beyond this machine.
    bind_host: Annotated[str, Field(min_length=1)] = "127.0.0.1"
    worker_cpus: PosFloat = 1.0  # CPUs a worker actor reserves on its node (a GPU worker: 1 GPU too)
    # A worker silent this long (it answers a memory report every tick) is taken for lost.
    silence_timeout_s: PosFloat = 30.0
    start_timeout_s: PosFloat = 600.0  # for a worker actor to be placed and load its models
    auto_devices: AutoDevices | None = None


@dataclass(frozen=True)
class ClusterConfig:
    devices: tuple[DeviceConfig, ...]
    models: tuple[ModelSpec, ...]
    pinned: dict  # model name -> device (only pinned models)
    local: LocalSchedulerConfig
    global_: GlobalSchedulerConfig
    # The serving system as a whole (docs/policies.md): prism, or one of the baselines it is
    # measured against, all run by this same server. YAML: scheduler.system
    system: Annotated[str, Field(pattern="^(" + "|".join(SYSTEM_NAMES) + ")$")] = "prism"
    # model name -> requests/s given in the config (`rate:`), only for models that set one: it
    # overrides what is measured (ClusterControl.placement_rates)
    rates: dict = field(default_factory=dict)
    gpus: dict = field(default_factory=dict)  # device -> GPUs it stands for (groups: simulator only)
    # Every node a device is on (those listed under `nodes:` and those only named by a device);
    # single-host mode: one node named "".
    nodes: tuple[NodeConfig, ...] = (NodeConfig(""),)
    # YAML: the server section
    host: str = "127.0.0.1"
    port: Annotated[int, Field(ge=0, le=65535)] = 8000
    api_key: str | None = None
    max_body_size: Size = DEFAULT_MAX_BODY_SIZE  # a larger request body is refused (413)
    metrics_log: str | None = None  # JSON-lines file per worker (suffixed with the device)
    # A request not finished this long after it arrived is aborted on its worker and answered
    # with a 504 (an error event in a stream): no client waits without bound.
    request_timeout_s: Annotated[float, Field(gt=0)] = 600.0
    ray: RayConfig = RayConfig()

    @property
    def system_spec(self) -> SystemSpec:
        return system_spec(self.system)

    def device(self, device_id: str) -> DeviceConfig:
        return next(d for d in self.devices if d.device_id == device_id)


# ---- the YAML schema: made of the runtime dataclasses' fields (types, constraints, defaults
# declared there, once), plus the few keys that exist only in YAML -----------------------------
def _fields_of(cls, only: tuple[str, ...] = (), skip: tuple[str, ...] = ()) -> dict:
    hints = get_type_hints(cls, include_extras=True)
    return {f.name: (hints[f.name], f.default if f.default is not MISSING else ...)
            for f in fields(cls) if f.name not in skip and (not only or f.name in only)}


def _in_ms(cls, name: str):  # a field in seconds, in YAML in milliseconds
    typ, default = _fields_of(cls, only=(name,))[name]
    return typ, default * 1e3


_MODEL_ONLY = ("ttft_slo_s", "tpot_slo_s", "engine")
_model = _fields_of(ModelSpec, skip=_MODEL_ONLY)
_device = _fields_of(DeviceConfig, skip=("memory_bytes",))
_node = _fields_of(NodeConfig, skip=("host_memory_bytes",))
_local, _global = _fields_of(LocalSchedulerConfig), _fields_of(GlobalSchedulerConfig)
assert all(_local[k] == _global[k] for k in _local.keys() & _global.keys()), "shared knobs differ"

DeviceEntry = create_model(
    "DeviceEntry", __config__=_STRICT, **_device,
    memory=(_fields_of(DeviceConfig, only=("memory_bytes",))["memory_bytes"][0], ...),  # required
    # GPUs this device stands for: > 1 is a tensor-parallel group (memory is the group's).
    # Only the simulator models groups; the server refuses them.
    gpus=(int, Field(1, ge=1)),
)
NodeEntry = create_model(
    "NodeEntry", __config__=_STRICT, **_node,
    host_memory=_fields_of(NodeConfig, only=("host_memory_bytes",))["host_memory_bytes"],
)
AutoDevicesEntry = create_model(
    "AutoDevicesEntry", __config__=_STRICT, **_fields_of(AutoDevices, skip=("memory_bytes",)),
    memory=(_fields_of(AutoDevices, only=("memory_bytes",))["memory_bytes"][0], ...),  # required
)
RayEntry = create_model(
    "RayEntry", __config__=_STRICT, **_fields_of(RayConfig, skip=("auto_devices",)),
    auto_devices=(AutoDevicesEntry | None, None),
)
ModelEntry = create_model(
    "ModelEntry", __config__=_STRICT, **_model,
    ttft_slo_ms=_in_ms(ModelSpec, "ttft_slo_s"), tpot_slo_ms=_in_ms(ModelSpec, "tpot_slo_s"),
    device=(str | None, None),  # pin to one device
    **_fields_of(EngineConfig),  # the engine's knobs sit in the model's entry
    # requests/s to place by (popularity for placement, static KV shares), overriding the rate
    # measured; unset: measured (simulator) or equal for every model (server start)
    rate=(PosFloat | None, None),
)
SchedulerEntry = create_model(
    "SchedulerEntry", __config__=_STRICT, **_fields_of(ClusterConfig, only=("system",)),
    # pace unset: the system's own (SystemSpec.pace)
    **(_local | _global | {"pace": (_local["pace"][0] | None, None)}),
)
ServerEntry = create_model(
    "ServerEntry", __config__=_STRICT,
    **_fields_of(ClusterConfig, only=("host", "port", "api_key", "max_body_size", "metrics_log",
                                             "request_timeout_s")),
)


class ConfigFile(BaseModel):
    model_config = _STRICT
    # Omitted only with ray.auto_devices (the devices are then the Ray cluster's)
    devices: list[DeviceEntry] = Field(None, min_length=1)  # type: ignore[valid-type]
    nodes: list[NodeEntry] = []  # type: ignore[valid-type]
    models: list[ModelEntry] = Field(min_length=1)  # type: ignore[valid-type]
    scheduler: SchedulerEntry = SchedulerEntry()  # type: ignore[valid-type]
    server: ServerEntry = ServerEntry()  # type: ignore[valid-type]
    ray: RayEntry = RayEntry()  # type: ignore[valid-type]

    @model_validator(mode="after")
    def _cross_checks(self):
        if self.devices is None:
            if self.ray.auto_devices is None:
                raise ValueError("devices: list at least one device (or ask for ray.auto_devices)")
            self.devices = []
        names = [f"{d.node}/{d.device}" if d.node else d.device for d in self.devices]
        if len(set(names)) != len(names):
            raise ValueError(f"devices: {names} lists a device twice")
        node_names = [n.name for n in self.nodes]
        if len(set(node_names)) != len(node_names):
            raise ValueError(f"nodes: {node_names} lists a node twice")
        for i, d in enumerate(self.devices):
            if node_names and d.node not in node_names:
                raise ValueError(f"devices.{i}.node: {d.node!r} is not among the nodes {node_names}")
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


def _build(cls, entry: BaseModel, **given):
    """A runtime dataclass from an entry: every field the entry has, plus those given."""
    return cls(**{f.name: getattr(entry, f.name) for f in fields(cls) if f.name in type(entry).model_fields} | given)


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
    devices = tuple(_build(DeviceConfig, d, memory_bytes=d.memory) for d in f.devices)
    listed = {n.name: _build(NodeConfig, n, host_memory_bytes=n.host_memory) for n in f.nodes}
    nodes = tuple(listed.get(name, NodeConfig(name)) for name in dict.fromkeys([*listed, *(d.node for d in devices)]))
    models = tuple(
        _build(ModelSpec, m, ttft_slo_s=m.ttft_slo_ms / 1e3, tpot_slo_s=m.tpot_slo_ms / 1e3,
               engine=_build(EngineConfig, m))
        for m in f.models
    )
    s = f.scheduler
    pinned = {m.name: m.device for m in f.models if m.device}
    spec = system_spec(s.system)
    if spec.device_per_model:  # one device per model, in order, unless pinned otherwise
        free = [d.device_id for d in devices if d.device_id not in pinned.values()]
        pinned.update({m.name: free.pop(0) for m in f.models if m.name not in pinned})
    local, global_ = spec.scheduler_configs(s)
    return ClusterConfig(
        devices=devices, models=models, pinned=pinned, local=local, global_=global_,
        system=s.system, rates={m.name: m.rate for m in f.models if m.rate is not None},
        gpus={dev.device_id: d.gpus for dev, d in zip(devices, f.devices)}, nodes=nodes,
        host=f.server.host, port=f.server.port, api_key=f.server.api_key,
        metrics_log=f.server.metrics_log, max_body_size=f.server.max_body_size,
        request_timeout_s=f.server.request_timeout_s, ray=_ray_config(f.ray),
    )


def _ray_config(entry) -> RayConfig:
    auto = entry.auto_devices
    return _build(RayConfig, entry, auto_devices=None if auto is None else _build(AutoDevices, auto, memory_bytes=auto.memory))
