"""SLO attainment, goodput, latency percentiles and throughput over time of a replay.

Failed and unfinished requests count as misses of every SLO; percentiles are over the
finished requests that produced the quantity. SLOs are given per model, either explicitly, from
a config (`prism.cluster.config.slos_from_config`), or as `scale x` the model's latency when served alone
(`slos_from_solo`, the research convention, scale 5).
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from prism.bench.records import RequestRecord
from prism.errors import UserError

PERCENTILES = (50, 90, 99)
DEFAULT_SOLO_SCALE = 5.0
DEFAULT_BIN_S = 10.0


@dataclass(frozen=True)
class SLOTargets:
    ttft_s: float
    tpot_s: float

    def __post_init__(self):
        if not (self.ttft_s > 0 and self.tpot_s > 0 and math.isfinite(self.ttft_s) and math.isfinite(self.tpot_s)):
            raise UserError(f"SLO targets must be positive and finite, got TTFT {self.ttft_s} s, TPOT {self.tpot_s} s")


# ---- where SLOs come from -------------------------------------------------------------------
def slos_from_solo(solo_records: list[RequestRecord], scale: float = DEFAULT_SOLO_SCALE) -> dict[str, SLOTargets]:
    """Per model: scale x the median TTFT and scale x the median TPOT of a run in which the
    model was served alone (only finished requests count)."""
    if scale <= 0:
        raise UserError(f"SLO scale must be positive, got {scale}")
    by_model = _by_model([r for r in solo_records if r.ok])
    out = {}
    for model in sorted({r.model for r in solo_records}):
        rs = by_model.get(model, [])
        ttfts = [r.ttft for r in rs if r.ttft is not None]
        tpots = [r.tpot for r in rs if r.tpot is not None]
        if not ttfts or not tpots:
            raise UserError(f"solo run of {model}: no finished request with a TTFT and a TPOT to scale")
        out[model] = SLOTargets(scale * float(np.median(ttfts)), scale * float(np.median(tpots)))
    if not out:
        raise UserError("solo run has no requests")
    return out


def uniform_slos(models, ttft_s: float, tpot_s: float) -> dict[str, SLOTargets]:
    return {m: SLOTargets(ttft_s, tpot_s) for m in models}


# ---- metrics --------------------------------------------------------------------------------


def _pct(values: list[float]) -> dict:
    if not values:
        return {f"p{q}": None for q in PERCENTILES}
    arr = np.asarray(values, dtype=float)
    return {f"p{q}": float(np.percentile(arr, q)) for q in PERCENTILES}


def _met(records: list[RequestRecord], slos: dict[str, SLOTargets]) -> tuple[list[bool], list[bool]]:
    """Per request: TTFT met, TPOT met (a request with a single token has no TPOT to miss)."""
    ttft = [r.ok and r.ttft is not None and r.ttft <= slos[r.model].ttft_s for r in records]
    tpot = [r.ok and (r.tpot is None or r.tpot <= slos[r.model].tpot_s) for r in records]
    return ttft, tpot


def _latencies(records: list[RequestRecord]) -> dict:
    ok = [r for r in records if r.ok]
    return {
        "ttft_s": _pct([r.ttft for r in ok if r.ttft is not None]),
        "tpot_s": _pct([r.tpot for r in ok if r.tpot is not None]),
        "e2e_s": _pct([x for x in (r.e2e for r in ok) if x is not None]),
    }


def _counts(records: list[RequestRecord], slos: dict[str, SLOTargets], duration_s: float) -> dict:
    n = len(records)
    ttft_met, tpot_met = _met(records, slos)
    both = sum(a and b for a, b in zip(ttft_met, tpot_met))
    tokens = sum(_num_tokens(r) for r in records if r.ok)
    rate = (lambda x: x / duration_s) if duration_s > 0 else (lambda x: None)
    return {
        "requests": n,
        "finished": sum(r.ok for r in records),
        "errors": sum(r.error is not None for r in records),
        "ttft_attainment": sum(ttft_met) / n if n else None,
        "tpot_attainment": sum(tpot_met) / n if n else None,
        "slo_attainment": both / n if n else None,
        "goodput_rps": rate(both),
        "throughput_rps": rate(sum(r.ok for r in records)),
        "output_tokens_per_s": rate(tokens),
    }


def summarize_group(records: list[RequestRecord], slo: SLOTargets, duration_s: float) -> dict:
    """One model's requests judged against one SLO."""
    slos = {r.model: slo for r in records}
    return {**_counts(records, slos, duration_s), **_latencies(records),
            "slo": {"ttft_s": slo.ttft_s, "tpot_s": slo.tpot_s}}


def summarize(records: list[RequestRecord], slos: dict[str, SLOTargets], duration_s: float) -> dict:
    """Per model and "overall" (overall judges each request by its own model's SLO)."""
    by_model = _by_model(records)
    missing = sorted(set(by_model) - set(slos))
    if missing:
        raise UserError(f"no SLO for model {missing[0]!r} (SLOs given for: {', '.join(sorted(slos)) or 'none'})")
    out = {m: summarize_group(rs, slos[m], duration_s) for m, rs in sorted(by_model.items())}
    if records:
        out["overall"] = {**_counts(records, slos, duration_s), **_latencies(records)}
    return out


def throughput_over_time(records: list[RequestRecord], bin_s: float = DEFAULT_BIN_S,
                         duration_s: float | None = None) -> dict:
    """Finished requests (by finish time) and output tokens (by arrival time of each streamed
    token) per time bin of `bin_s` seconds from the replay start, plus the same as rates."""
    if bin_s <= 0:
        raise UserError(f"bin width must be positive, got {bin_s}")
    finishes = [r.finish_s for r in records if r.ok and r.finish_s is not None]
    tokens = [t for r in records if r.ok for t in r.token_s]
    end = max([duration_s or 0.0, *finishes, *tokens, 0.0])
    num_bins = max(1, math.ceil(end / bin_s - 1e-9))
    edges = np.arange(num_bins + 1) * bin_s
    edges[-1] = max(edges[-1], end)  # the last bin holds events exactly at the end
    done = np.histogram(finishes, bins=edges)[0] if finishes else np.zeros(num_bins, int)
    toks = np.histogram(tokens, bins=edges)[0] if tokens else np.zeros(num_bins, int)
    return {
        "bin_s": bin_s,
        "start_s": [float(x) for x in edges[:-1]],
        "finished_requests": [int(x) for x in done],
        "output_tokens": [int(x) for x in toks],
        "requests_per_s": [float(x) / bin_s for x in done],
        "output_tokens_per_s": [float(x) / bin_s for x in toks],
    }


def records_duration(records: list[RequestRecord]) -> float:
    """From the replay start to the last thing that happened (finish, send or arrival)."""
    times = [t for r in records for t in (r.finish_s, r.send_s, r.arrival_s) if t is not None]
    return max(times, default=0.0)


def _num_tokens(r: RequestRecord) -> int:
    return r.num_output_tokens if r.num_output_tokens is not None else len(r.token_s)


def _by_model(records: list[RequestRecord]) -> dict[str, list[RequestRecord]]:
    out: dict[str, list[RequestRecord]] = {}
    for r in records:
        out.setdefault(r.model, []).append(r)
    return out


# ---- output ---------------------------------------------------------------------------------
def markdown_table(summary: dict) -> str:
    lines = ["| model | requests | finished | TTFT p50 / p99 (s) | TPOT p50 / p99 (ms) | E2E p50 / p99 (s) "
             "| TTFT att. | TPOT att. | both | goodput (req/s) |",
             "|---|---:|---:|---|---|---|---:|---:|---:|---:|"]
    rows = [m for m in summary if m != "overall"] + (["overall"] if "overall" in summary else [])
    for model in rows:
        s = summary[model]
        t, p, e = s.get("ttft_s", {}), s.get("tpot_s", {}), s.get("e2e_s", {})
        lines.append(
            f"| {model} | {s['requests']} | {s['finished']} | {_f(t.get('p50'))} / {_f(t.get('p99'))} | "
            f"{_f(p.get('p50'), 1e3, 0)} / {_f(p.get('p99'), 1e3, 0)} | {_f(e.get('p50'))} / {_f(e.get('p99'))} | "
            f"{_pc(s['ttft_attainment'])} | {_pc(s['tpot_attainment'])} | {_pc(s['slo_attainment'])} | "
            f"{_f(s.get('goodput_rps'))} |")
    return "\n".join(lines)


def _f(x, scale: float = 1.0, digits: int = 2) -> str:
    return "-" if x is None else f"{x * scale:.{digits}f}"


def _pc(x) -> str:
    return "-" if x is None else f"{x:.0%}"


def write_report(out_dir: str | Path, records: list[RequestRecord], slos: dict[str, SLOTargets],
                 duration_s: float, title: str = "replay", memory_log: str | Path | None = None,
                 bin_s: float = DEFAULT_BIN_S) -> dict:
    """summary.json, summary.md and PNGs (latency CDFs, throughput over time, memory over time
    when a worker memory log is given) in out_dir. Returns what summary.json holds."""
    from prism.bench import plots

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    summary = summarize(records, slos, duration_s)
    used = {m: slos[m] for m in sorted({r.model for r in records})}
    report = {
        "title": title,
        "duration_s": duration_s,
        "requests": len(records),
        "slos": {m: {"ttft_s": s.ttft_s, "tpot_s": s.tpot_s} for m, s in used.items()},
        "summary": summary,
        "throughput_over_time": throughput_over_time(records, bin_s, duration_s),
    }
    plots_written = []
    if records:
        for metric in ("ttft", "tpot", "e2e"):
            name = f"{metric}_cdf.png"
            plots.plot_latency_cdfs({title: records}, out_dir / name, metric=metric, slos=used)
            plots_written.append(name)
        plots.plot_throughput_over_time(report["throughput_over_time"], out_dir / "throughput.png")
        plots_written.append("throughput.png")
    if memory_log is not None:
        report["memory"] = plots.memory_summary(plots.read_memory_log(memory_log))
        plots.plot_memory_over_time(memory_log, out_dir / "memory.png")
        plots_written.append("memory.png")
    report["plots"] = plots_written
    (out_dir / "summary.json").write_text(json.dumps(report, indent=1))
    (out_dir / "summary.md").write_text(_markdown(report))
    return report


def _markdown(report: dict) -> str:
    o = report["summary"].get("overall", {})
    lines = [f"# {report['title']}", "",
             f"{report['requests']} requests over {report['duration_s']:.1f} s; "
             f"{o.get('finished', 0)} finished, {o.get('errors', 0)} errors.",
             "SLOs: " + ", ".join(f"{m} TTFT {s['ttft_s'] * 1e3:.0f} ms / TPOT {s['tpot_s'] * 1e3:.0f} ms"
                                  for m, s in report["slos"].items()) + ".",
             f"SLO attainment (requests meeting both TTFT and TPOT) {_pc(o.get('slo_attainment'))}; "
             f"goodput {_f(o.get('goodput_rps'))} req/s; throughput "
             f"{_f(o.get('throughput_rps'))} req/s, {_f(o.get('output_tokens_per_s'), digits=1)} output tokens/s.",
             "Failed and unfinished requests count as misses.", "",
             markdown_table(report["summary"]), ""]
    if "memory" in report:
        mem = report["memory"]
        lines += [f"Memory: peak used {mem['peak_used_gib']:.2f} GiB of {mem['budget_gib']:.2f} GiB "
                  f"({mem['samples']} samples).", ""]
    lines += [f"![{p}]({p})" for p in report["plots"]]
    return "\n".join(lines) + "\n"
