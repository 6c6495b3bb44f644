"""One simulated run: a server config, a system (prism or a baseline), a trace -> records.

The config is the server's own YAML (`prism serve --config`), turned into the config of one
system exactly as `prism bench sweep` does (prism.cluster.systems.system_config), so a
simulated run and a real sweep point describe the same server.
"""
from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path

from prism.bench.records import DEFAULT_REQUEST_TIMEOUT_S, RequestRecord, save_records
from prism.bench.report import SLOTargets, records_duration, write_report
from prism.bench.trace import TraceRequest
from prism.cluster.config import ClusterConfig, parse_config, read_yaml
from prism.cluster.systems import system_config
from prism.config import ConfigError
from prism.sim.cluster import EarlyStop, SimCluster
from prism.sim.costs import ProfileSet

MAX_MEMORY_PANELS = 8  # memory.png gets one panel per device; beyond this it is unreadable


def read_raw_config(path: str | Path) -> dict:
    path = Path(path)
    raw = read_yaml(path)
    if not isinstance(raw, dict):
        raise ConfigError(f"{path.name}: expected a mapping with devices and models")
    return raw


def config_for(raw: dict, system: str, source: str = "config") -> ClusterConfig:
    """The server config of `system` (prism, static, muxserve, swap, serverless or dedicated)."""
    return parse_config(system_config(raw, system), source=source)


@dataclass
class SimResult:
    system: str
    records: list[RequestRecord]
    wall_s: float  # how long the simulation took on this machine
    num_events: int
    num_devices: int
    num_gpus: int
    cost_sources: dict[str, str] = field(default_factory=dict)  # model -> measured / scaled / roofline
    memory_samples: list[dict] = field(default_factory=list)
    stopped_at: float | None = None  # an early stop ended the run here (see EarlyStop)
    num_activations: int = 0
    num_storage_reads: int = 0  # activations on a node that held no host copy (cold loads)

    @property
    def duration_s(self) -> float:
        return records_duration(self.records)


def simulate(config: ClusterConfig, trace: list[TraceRequest], profiles: ProfileSet,
             request_timeout_s: float = DEFAULT_REQUEST_TIMEOUT_S,
             early_stop: EarlyStop | None = None) -> SimResult:
    start = time.perf_counter()
    cluster = SimCluster(config, profiles, request_timeout_s=request_timeout_s, early_stop=early_stop)
    records = cluster.run(trace)
    sources = {m: how for (_, m), how in sorted(cluster.cost_sources.items())}
    return SimResult(config.system, records, time.perf_counter() - start, cluster.num_events,
                     len(config.devices), sum(config.gpus.get(d.device_id, 1) for d in config.devices),
                     sources, cluster.memory_samples, cluster.stopped_at, *cluster.activation_counts())


def write_sim_report(out_dir: str | Path, result: SimResult, slos: dict[str, SLOTargets],
                     title: str) -> dict:
    """requests.jsonl, the replay report (summary.json/.md, PNGs) and sim.json in out_dir."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    save_records(out_dir / "requests.jsonl", result.records)
    memory_log = None
    if result.memory_samples and result.num_devices <= MAX_MEMORY_PANELS:
        memory_log = out_dir / "memory.jsonl"
        memory_log.write_text("".join(json.dumps(s) + "\n" for s in result.memory_samples))
    report = write_report(out_dir, result.records, slos, max(result.duration_s, 1e-9), title=title,
                          memory_log=memory_log)
    (out_dir / "sim.json").write_text(json.dumps({
        "system": result.system, "devices": result.num_devices, "gpus": result.num_gpus,
        "wall_s": result.wall_s, "events": result.num_events, "cost_sources": result.cost_sources,
    }, indent=1))
    return report
