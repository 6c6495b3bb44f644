"""SLO attainment and latency summaries of a replay. Failed and unfinished requests count as
misses; percentiles are over the requests that produced the quantity."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from prism.bench.replay import RequestRecord


@dataclass(frozen=True)
class SLOTargets:
    ttft_s: float
    tpot_s: float


def _pct(values: list[float]) -> dict:
    if not values:
        return {"p50": None, "p90": None, "p99": None}
    arr = np.asarray(values)
    return {f"p{q}": float(np.percentile(arr, q)) for q in (50, 90, 99)}


def summarize_group(records: list[RequestRecord], slo: SLOTargets, duration_s: float) -> dict:
    n = len(records)
    ok = [r for r in records if r.ok]
    ttft_met = [r.ok and r.ttft is not None and r.ttft <= slo.ttft_s for r in records]
    tpot_met = [r.ok and (r.tpot is None or r.tpot <= slo.tpot_s) for r in records]
    both = [a and b for a, b in zip(ttft_met, tpot_met)]
    tokens = sum(r.num_output_tokens or len(r.token_s) for r in ok)
    return {
        "requests": n,
        "finished": len(ok),
        "errors": sum(r.error is not None for r in records),
        "ttft_s": _pct([r.ttft for r in ok if r.ttft is not None]),
        "tpot_s": _pct([r.tpot for r in ok if r.tpot is not None]),
        "ttft_attainment": sum(ttft_met) / n if n else None,
        "tpot_attainment": sum(tpot_met) / n if n else None,
        "slo_attainment": sum(both) / n if n else None,
        "goodput_rps": sum(both) / duration_s if duration_s > 0 else None,
        "output_tokens_per_s": tokens / duration_s if duration_s > 0 else None,
        "slo": {"ttft_s": slo.ttft_s, "tpot_s": slo.tpot_s},
    }


def summarize(records: list[RequestRecord], slos: dict[str, SLOTargets], duration_s: float) -> dict:
    """Per model and overall (overall judges each request by its own model's SLO)."""
    by_model: dict[str, list[RequestRecord]] = {}
    for r in records:
        by_model.setdefault(r.model, []).append(r)
    out = {m: summarize_group(rs, slos[m], duration_s) for m, rs in sorted(by_model.items())}
    n = len(records)
    if n:
        weights = {m: len(rs) / n for m, rs in by_model.items()}
        out["overall"] = {
            "requests": n,
            "finished": sum(v["finished"] for m, v in out.items() if m in by_model),
            "errors": sum(v["errors"] for m, v in out.items() if m in by_model),
            **{k: sum(weights[m] * out[m][k] for m in by_model)
               for k in ("ttft_attainment", "tpot_attainment", "slo_attainment")},
            "goodput_rps": sum(out[m]["goodput_rps"] or 0 for m in by_model),
        }
    return out


def markdown_table(summary: dict) -> str:
    lines = ["| model | requests | finished | TTFT p50 / p99 (s) | TPOT p50 / p99 (ms) | TTFT att. | TPOT att. | both |",
             "|---|---:|---:|---|---|---:|---:|---:|"]
    for model, s in summary.items():
        if model == "overall":
            continue
        t, p = s["ttft_s"], s["tpot_s"]
        lines.append(
            f"| {model} | {s['requests']} | {s['finished']} | {_f(t['p50'])} / {_f(t['p99'])} | "
            f"{_f(p['p50'], 1e3, 0)} / {_f(p['p99'], 1e3, 0)} | {s['ttft_attainment']:.0%} | "
            f"{s['tpot_attainment']:.0%} | {s['slo_attainment']:.0%} |")
    if "overall" in summary:
        o = summary["overall"]
        lines.append(f"| overall | {o['requests']} | {o['finished']} | | | {o['ttft_attainment']:.0%} | "
                     f"{o['tpot_attainment']:.0%} | {o['slo_attainment']:.0%} |")
    return "\n".join(lines)


def _f(x, scale: float = 1.0, digits: int = 2) -> str:
    return "-" if x is None else f"{x * scale:.{digits}f}"
