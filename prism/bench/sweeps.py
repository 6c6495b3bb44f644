"""Reports of a sweep (one trace at increasing rate scales under each system), real or
simulated: the points, the highest rate sustained at a target attainment, sweep.json/.md and
the attainment plot."""
from __future__ import annotations

import json
from pathlib import Path

from prism.bench.plots import plot_attainment_vs_rate


def sustained_rate(points: list[tuple[float, float]], target: float) -> float | None:
    """Highest rate at which attainment >= target, counting only rates below the first miss
    (a sweep is monotone in intent; a lucky point after a failure does not count)."""
    best = None
    for rate, attainment in sorted(points):
        if attainment < target:
            break
        best = rate
    return best


def sweep_point(system: str, scale: float, num_requests: int, duration_s: float, summary: dict) -> dict:
    """One (system, rate scale) point of a sweep, from the run's overall summary."""
    return {"system": system, "scale": scale, "rate_rps": num_requests / max(duration_s, 1e-9),
            "ttft_attainment": summary["ttft_attainment"], "tpot_attainment": summary["tpot_attainment"],
            "slo_attainment": summary["slo_attainment"], "requests": num_requests,
            "errors": summary["errors"]}


def refused_point(system: str, scale: float, reason: str) -> dict:
    """A point the system did not run: it refused the config at start (say, a static
    partition too small for a model's longest request). The other systems' points go on."""
    return {"system": system, "scale": scale, "refused": reason}


def write_sweep(points: list[dict], systems: list[str], out_dir: str | Path, target: float) -> dict:
    """sweep.json, sweep.md and the attainment plot; returns what sweep.json holds."""
    out_dir = Path(out_dir)
    result = {"target": target, "points": points, "sustained": {}}
    ran = [p for p in points if "refused" not in p]
    for s in systems:
        mine = [p for p in ran if p["system"] == s]
        result["sustained"][s] = {
            "both": sustained_rate([(p["rate_rps"], p["slo_attainment"]) for p in mine], target),
            "ttft": sustained_rate([(p["rate_rps"], p["ttft_attainment"]) for p in mine], target),
            "tpot": sustained_rate([(p["rate_rps"], p["tpot_attainment"]) for p in mine], target),
        }
    (out_dir / "sweep.json").write_text(json.dumps(result, indent=1))
    (out_dir / "sweep.md").write_text(markdown(result))
    plot_attainment_vs_rate({s: [(p["rate_rps"], p["ttft_attainment"]) for p in ran if p["system"] == s]
                             for s in systems}, out_dir / "ttft_attainment_vs_rate.png")
    return result


def markdown(result: dict) -> str:
    target = result["target"]
    lines = [f"Highest rate (requests/s) sustained at {target:.0%} attainment:", "",
             "| system | both SLOs | TTFT | TPOT |", "|---|---:|---:|---:|"]
    for s, r in result["sustained"].items():
        fmt = lambda v: "-" if v is None else f"{v:.2f}"  # noqa: E731
        lines.append(f"| {s} | {fmt(r.get('both'))} | {fmt(r['ttft'])} | {fmt(r['tpot'])} |")
    lines += ["", "| system | scale | rate | TTFT att. | TPOT att. | both |", "|---|---:|---:|---:|---:|---:|"]
    for p in result["points"]:
        if "refused" in p:
            lines.append(f"| {p['system']} | {p['scale']:g} | refused: {p['refused']} | | | |")
            continue
        lines.append(f"| {p['system']} | {p['scale']:g} | {p['rate_rps']:.2f} | {p['ttft_attainment']:.0%} | "
                     f"{p['tpot_attainment']:.0%} | {p['slo_attainment']:.0%} |")
    return "\n".join(lines) + "\n"
