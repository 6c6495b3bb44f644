"""`prism bench sweep`: one trace at increasing rate scales, under each serving system.

For every system (prism and the baselines) the same server config is started with
`scheduler.system` set to it, the trace is replayed at each rate scale (thinned or replicated,
shape kept), and the report gives, per system, the highest rate whose TTFT attainment (and
TPOT attainment) stays at or above the target (99% by default).
"""
from __future__ import annotations

import asyncio
import json
import tempfile
from pathlib import Path

import yaml

from prism.bench.plots import plot_attainment_vs_rate
from prism.bench.replay import replay, save_records
from prism.bench.report import SLOTargets, summarize
from prism.bench.trace import TraceRequest
from prism.bench.transforms import scale_rate

SYSTEMS = ("prism", "static", "muxserve", "swap", "dedicated")


def system_config(raw: dict, system: str) -> dict:
    """The server config for one system. `dedicated` gets one device per model, each a copy
    of the first device (cpu:N on a CPU, cuda:N on GPUs: it needs that many cards)."""
    cfg = json.loads(json.dumps(raw))  # deep copy
    cfg.setdefault("scheduler", {})["system"] = system
    if system == "dedicated":
        first = cfg["devices"][0]
        kind = "cpu" if first["device"].startswith("cpu") else "cuda"
        cfg["devices"] = [dict(first, device=f"{kind}:{i}") for i in range(len(cfg["models"]))]
        for m in cfg["models"]:
            m.pop("device", None)
    return cfg


def sustained_rate(points: list[tuple[float, float]], target: float) -> float | None:
    """Highest rate at which attainment >= target, counting only rates below the first miss
    (a sweep is monotone in intent; a lucky point after a failure does not count)."""
    best = None
    for rate, attainment in sorted(points):
        if attainment < target:
            break
        best = rate
    return best


def run_system(raw_config: dict, system: str, trace: list[TraceRequest], scales: list[float],
               slos: dict[str, SLOTargets], out_dir: Path, seed: int = 0) -> list[dict]:
    from prism.server.demo import free_port, start_server, stop_server, wait_healthy

    folder = Path(tempfile.mkdtemp(prefix=f"sweep-{system}-"))
    config_path = folder / "config.yaml"
    config_path.write_text(yaml.safe_dump(system_config(raw_config, system)))
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    points = []
    with open(out_dir / f"server-{system}.log", "w") as log:
        proc = start_server(str(config_path), port, log)
        try:
            wait_healthy(base, proc, timeout_s=900)
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


def sweep(config_path: str, trace: list[TraceRequest], systems: list[str], scales: list[float],
          slos: dict[str, SLOTargets], out_dir: str | Path, target: float = 0.99) -> dict:
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    from prism.server.config_file import read_yaml

    raw = read_yaml(config_path)
    points = [p for s in systems for p in run_system(raw, s, trace, scales, slos, out_dir)]
    return write_sweep(points, systems, out_dir, target)


def sweep_point(system: str, scale: float, num_requests: int, duration_s: float, summary: dict) -> dict:
    """One (system, rate scale) point of a sweep, from the run's overall summary."""
    return {"system": system, "scale": scale, "rate_rps": num_requests / max(duration_s, 1e-9),
            "ttft_attainment": summary["ttft_attainment"], "tpot_attainment": summary["tpot_attainment"],
            "slo_attainment": summary["slo_attainment"], "requests": num_requests,
            "errors": summary["errors"]}


def write_sweep(points: list[dict], systems: list[str], out_dir: str | Path, target: float) -> dict:
    """sweep.json, sweep.md and the attainment plot; returns what sweep.json holds."""
    out_dir = Path(out_dir)
    result = {"target": target, "points": points, "sustained": {}}
    for s in systems:
        mine = [p for p in points if p["system"] == s]
        result["sustained"][s] = {
            "ttft": sustained_rate([(p["rate_rps"], p["ttft_attainment"]) for p in mine], target),
            "tpot": sustained_rate([(p["rate_rps"], p["tpot_attainment"]) for p in mine], target),
        }
    (out_dir / "sweep.json").write_text(json.dumps(result, indent=1))
    (out_dir / "sweep.md").write_text(markdown(result))
    plot_attainment_vs_rate({s: [(p["rate_rps"], p["ttft_attainment"]) for p in points if p["system"] == s]
                             for s in systems}, out_dir / "ttft_attainment_vs_rate.png")
    return result


def markdown(result: dict) -> str:
    target = result["target"]
    lines = [f"Highest rate (requests/s) sustained at {target:.0%} attainment:", "",
             "| system | TTFT | TPOT |", "|---|---:|---:|"]
    for s, r in result["sustained"].items():
        fmt = lambda v: "-" if v is None else f"{v:.2f}"  # noqa: E731
        lines.append(f"| {s} | {fmt(r['ttft'])} | {fmt(r['tpot'])} |")
    lines += ["", "| system | scale | rate | TTFT att. | TPOT att. | both |", "|---|---:|---:|---:|---:|---:|"]
    for p in result["points"]:
        lines.append(f"| {p['system']} | {p['scale']:g} | {p['rate_rps']:.2f} | {p['ttft_attainment']:.0%} | "
                     f"{p['tpot_attainment']:.0%} | {p['slo_attainment']:.0%} |")
    return "\n".join(lines) + "\n"
