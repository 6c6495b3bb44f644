"""PNG plots of replays and sweeps (matplotlib, Agg backend: no display needed)."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from prism.bench.records import RequestRecord
from prism.errors import UserError

try:  # an extra: reports, sweeps and simulations plot with it
    import matplotlib
except ImportError:
    raise UserError("plots need matplotlib, which is not installed: pip install 'prism[reports]'") from None
matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

GIB = 1 << 30
_METRICS = {"ttft": ("TTFT", "s"), "tpot": ("TPOT", "ms"), "e2e": ("end-to-end latency", "s")}


def save_figure(fig, path: str | Path) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_attainment_vs_rate(results: dict[str, list[tuple[float, float]]], path: str | Path,
                            title: str = "SLO attainment vs request rate") -> None:
    """One line per policy: (rate in req/s, attainment in 0..1) points of a sweep."""
    fig, ax = plt.subplots(figsize=(6, 4))
    for policy, points in sorted(results.items()):
        pts = sorted(points)
        ax.plot([p[0] for p in pts], [100 * p[1] for p in pts], marker="o", label=policy)
    ax.set(xlabel="request rate (req/s)", ylabel="SLO attainment (%)", ylim=(0, 102), title=title)
    ax.grid(alpha=0.3)
    if results:
        ax.legend()
    save_figure(fig, path)


def plot_attainment_by_source(results: dict[str, dict[str, list[tuple[float, float]]]], path: str | Path,
                              title: str = "Both SLOs met vs request rate") -> None:
    """results[system][source] = (rate in req/s, attainment in 0..1) points: one colour per
    system, one line style per source (real repeats, the simulator), the legend beside."""
    styles = ["-", "--", ":", "-."]
    sources = sorted({src for by in results.values() for src in by})
    fig, ax = plt.subplots(figsize=(7.5, 4))
    for i, (system, by) in enumerate(sorted(results.items())):
        for src, pts in sorted(by.items()):
            pts = sorted(pts)
            ax.plot([p[0] for p in pts], [100 * p[1] for p in pts], color=f"C{i}", marker="o", markersize=3,
                    linestyle=styles[sources.index(src) % len(styles)], label=f"{system} ({src})")
    ax.set(xlabel="request rate (req/s)", ylabel="attainment (%)", ylim=(0, 102), title=title)
    ax.grid(alpha=0.3)
    if results:
        ax.legend(loc="center left", bbox_to_anchor=(1.01, 0.5), fontsize=7)
    save_figure(fig, path)


def _metric_values(records: list[RequestRecord], metric: str) -> list[float]:
    ok = [r for r in records if r.ok]
    if metric == "ttft":
        vals = [r.ttft for r in ok]
    elif metric == "tpot":
        vals = [r.tpot * 1e3 if r.tpot is not None else None for r in ok]
    else:
        vals = [r.e2e for r in ok]
    return [v for v in vals if v is not None]


def plot_latency_cdfs(records_by_policy: dict[str, list[RequestRecord]], path: str | Path,
                      metric: str = "ttft", slos: dict | None = None) -> None:
    """Empirical CDF of TTFT, TPOT or end-to-end latency per policy, over finished requests.
    The y axis is the share of *all* requests, so failed/unfinished ones keep the curve below
    100%. With `slos` (model -> SLOTargets) and a single SLO value, it is drawn as a line."""
    if metric not in _METRICS:
        raise UserError(f"metric must be one of {sorted(_METRICS)}, got {metric!r}")
    name, unit = _METRICS[metric]
    fig, ax = plt.subplots(figsize=(6, 4))
    for policy, records in sorted(records_by_policy.items()):
        vals = np.sort(_metric_values(records, metric))
        if len(records) and len(vals):
            y = np.arange(1, len(vals) + 1) / len(records) * 100
            ax.step(vals, y, where="post", label=f"{policy} ({len(vals)}/{len(records)} finished)")
    if slos and metric in ("ttft", "tpot"):
        targets = {getattr(s, f"{metric}_s") for s in slos.values()}
        if len(targets) == 1:
            t = targets.pop() * (1e3 if unit == "ms" else 1)
            ax.axvline(t, color="gray", linestyle="--", label=f"SLO {t:g} {unit}")
    ax.set(xlabel=f"{name} ({unit})", ylabel="requests (%)", ylim=(0, 102), title=f"{name} CDF")
    ax.grid(alpha=0.3)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=8)
    save_figure(fig, path)


def plot_throughput_over_time(bins: dict, path: str | Path) -> None:
    """From report.throughput_over_time: finished requests/s and output tokens/s per bin."""
    edges = list(bins["start_s"]) + [bins["start_s"][-1] + bins["bin_s"]]
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(7, 5), sharex=True)
    for ax, key, label, color in ((top, "requests_per_s", "finished requests/s", "C0"),
                                  (bottom, "output_tokens_per_s", "output tokens/s", "C1")):
        ax.stairs(bins[key], edges, color=color, fill=True, alpha=0.6)
        ax.set(ylabel=label, ylim=(0, max(bins[key], default=0) * 1.1 or 1))
        ax.grid(alpha=0.3)
    top.set_title(f"throughput over time ({bins['bin_s']:g} s bins)")
    bottom.set_xlabel("time since replay start (s)")
    save_figure(fig, path)


# ---- the worker's memory log ----------------------------------------------------------------
def read_memory_log(path: str | Path) -> list[dict]:
    """The `kind: device` lines of a worker's JSON-lines metrics log, in order."""
    path = Path(path)
    out = []
    try:
        lines = path.read_text().splitlines()
    except FileNotFoundError:
        raise UserError(f"memory log not found: {path}") from None
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            raise UserError(f"{path}: line {i + 1} is not JSON") from None
        if row.get("kind") == "device":
            out.append(row)
    return out


def memory_summary(samples: list[dict]) -> dict:
    if not samples:
        return {"samples": 0, "peak_used_gib": 0.0, "budget_gib": 0.0}
    used = [_used_pages(s) * s["page_size"] / GIB for s in samples]
    budget = max(s.get("budget_pages", 0) * s["page_size"] / GIB for s in samples)
    return {"samples": len(samples), "peak_used_gib": max(used), "budget_gib": budget}


def _used_pages(sample: dict) -> int:
    return sum(m.get("weight_pages", 0) + m.get("kv_pages", 0) for m in sample.get("models", {}).values())


def plot_memory_over_time(memory_log_path: str | Path, path: str | Path) -> None:
    """Stacked areas of each model's weight and KV pages (GiB) over time, one panel per
    device, with the device's page budget as a dashed line."""
    samples = read_memory_log(memory_log_path)
    if not samples:
        raise UserError(f"{memory_log_path}: no device samples (lines with kind 'device')")
    by_device: dict[str, list[dict]] = {}
    for s in samples:
        by_device.setdefault(s.get("device", "device"), []).append(s)
    fig, axes = plt.subplots(len(by_device), 1, figsize=(7, 3.5 * len(by_device)), squeeze=False)
    for ax, (device, rows) in zip(axes[:, 0], sorted(by_device.items())):
        t0 = rows[0]["time"]
        t = [r["time"] - t0 for r in rows]
        models = sorted({m for r in rows for m in r.get("models", {})})
        layers, labels = [], []
        for m in models:
            for kind in ("weight_pages", "kv_pages"):
                layers.append([r.get("models", {}).get(m, {}).get(kind, 0) * r["page_size"] / GIB for r in rows])
                labels.append(f"{m} {'weights' if kind == 'weight_pages' else 'KV'}")
        if layers:
            colors = [plt.cm.tab20(i % 20) for i in range(len(layers))]
            ax.stackplot(t, *layers, labels=labels, colors=colors, step="post")
        budget = [r.get("budget_pages", 0) * r["page_size"] / GIB for r in rows]
        if any(budget):
            ax.step(t, budget, where="post", color="black", linestyle="--", linewidth=1, label="budget")
        ax.set(xlabel="time (s)", ylabel="GiB", title=f"memory on {device}")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, loc="upper left", ncol=2)
    save_figure(fig, path)
