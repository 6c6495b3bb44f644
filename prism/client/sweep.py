"""`prism bench sweep`: one trace at increasing rate scales, under each serving system.

For every system (prism and the baselines) the same server config is started with
`scheduler.system` set to it, the trace is replayed at each rate scale (thinned or replicated,
shape kept), and the report gives, per system, the highest rate whose TTFT attainment (and
TPOT attainment) stays at or above the target (99% by default).
"""
from __future__ import annotations

import asyncio
import tempfile
from pathlib import Path

import yaml

from prism.bench.records import save_records
from prism.bench.report import SLOTargets, summarize
from prism.bench.sweeps import refused_point, sweep_point, write_sweep
from prism.bench.trace import TraceRequest
from prism.bench.transforms import scale_rate
from prism.client.replay import replay
from prism.client.server_process import free_port, start_server, stop_server, wait_healthy
from prism.cluster.config import read_yaml
from prism.cluster.systems import system_config
from prism.errors import USER_ERROR_EXIT


def run_system(raw_config: dict, system: str, trace: list[TraceRequest], scales: list[float],
               slos: dict[str, SLOTargets], out_dir: Path, seed: int = 0) -> list[dict]:
    folder = Path(tempfile.mkdtemp(prefix=f"sweep-{system}-"))
    config_path = folder / "config.yaml"
    config_path.write_text(yaml.safe_dump(system_config(raw_config, system)))
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    points = []
    log_path = out_dir / f"server-{system}.log"
    with open(log_path, "w") as log:
        proc = start_server(str(config_path), port, log)
        try:
            try:
                wait_healthy(base, proc, timeout_s=900)
            except RuntimeError:
                reason = _refusal(log_path, proc.returncode)
                if reason is None:
                    raise
                return [refused_point(system, scale, reason) for scale in scales]
            duration = max((r.arrival_s for r in trace), default=0.0)
            for scale in scales:
                scaled = scale_rate(trace, scale, seed=seed)
                records = asyncio.run(replay(scaled, f"{base}/v1", progress=False))
                save_records(out_dir / f"requests-{system}-x{scale:g}.jsonl", records)
                summary = summarize(records, slos, max(duration, 1e-9))["overall"]
                points.append(sweep_point(system, scale, len(scaled), duration, summary))
        finally:
            stop_server(proc)
    return points


def _refusal(log_path: Path, returncode: int | None) -> str | None:
    """The server's one-line error if it refused its config (exit code 2, `prism: error: ...`
    last in its log); None for any other failure (that one stops the sweep)."""
    if returncode != USER_ERROR_EXIT:
        return None
    lines = [ln for ln in log_path.read_text(errors="replace").splitlines() if ln.startswith("prism: error: ")]
    return lines[-1].removeprefix("prism: error: ") if lines else None


def sweep(config_path: str, trace: list[TraceRequest], systems: list[str], scales: list[float],
          slos: dict[str, SLOTargets], out_dir: str | Path, target: float = 0.99) -> dict:
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    raw = read_yaml(config_path)
    points = [p for s in systems for p in run_system(raw, s, trace, scales, slos, out_dir)]
    return write_sweep(points, systems, out_dir, target)


