"""Re-read a sweep's request records (requests-<system>-x<scale>.jsonl) and report, per
system, attainment against rate and the highest rate sustained at the target, for the
config's SLOs and for those SLOs multiplied by other factors (records keep every token time,
so no rerun is needed to ask "and with looser SLOs?"). Writes a Markdown table, JSON and
PNGs (attainment vs rate, TTFT CDFs at the lowest common rate).

    python3 benchmarks/sweep_report.py --records benchmarks/results/h100-6models-2026-11-25 \
        --config examples/h100-6models.yaml --trace-duration 59 --slo-factors 1 2 4
"""
from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from prism.bench.plots import plot_attainment_vs_rate, plot_latency_cdfs  # noqa: E402
from prism.bench.records import load_records  # noqa: E402
from prism.bench.report import SLOTargets, summarize  # noqa: E402
from prism.bench.sweeps import sustained_rate  # noqa: E402
from prism.cluster.config import slos_from_config  # noqa: E402

NAME = re.compile(r"requests-(?P<system>[a-z]+)-x(?P<scale>[0-9.]+)\.jsonl(\.gz)?$")


def load_runs(folder: Path) -> dict[tuple[str, float], list]:
    runs = {}
    for path in sorted(folder.glob("requests-*.jsonl*")):
        m = NAME.search(path.name)
        if m:
            runs[(m["system"], float(m["scale"]))] = load_records(path)
    return runs


def points_for(runs, slos, duration_s: float) -> list[dict]:
    out = []
    for (system, scale), records in sorted(runs.items()):
        s = summarize(records, slos, duration_s)["overall"]
        out.append(dict(system=system, scale=scale, rate_rps=len(records) / duration_s,
                        ttft_attainment=s["ttft_attainment"], tpot_attainment=s["tpot_attainment"],
                        slo_attainment=s["slo_attainment"], ttft_p50_s=s["ttft_s"]["p50"], ttft_p99_s=s["ttft_s"]["p99"]))
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--records", required=True, help="folder of requests-<system>-x<scale>.jsonl")
    ap.add_argument("--config", required=True, help="the serve config whose SLOs are factor 1")
    ap.add_argument("--trace-duration", type=float, required=True, help="seconds spanned by the unscaled trace")
    ap.add_argument("--slo-factors", type=float, nargs="+", default=[1.0])
    ap.add_argument("--target", type=float, default=0.99)
    args = ap.parse_args()
    folder = Path(args.records)
    runs = load_runs(folder)
    if not runs:
        print(f"error: no requests-<system>-x<scale>.jsonl in {folder}", file=sys.stderr)
        return 2
    base = slos_from_config(args.config)
    systems = sorted({s for s, _ in runs})
    result = {"target": args.target, "factors": {}}
    lines = []
    for factor in args.slo_factors:
        slos = {m: SLOTargets(t.ttft_s * factor, t.tpot_s * factor) for m, t in base.items()}
        points = points_for(runs, slos, args.trace_duration)
        sustained = {s: {k: sustained_rate([(p["rate_rps"], p[f"{k}_attainment"]) for p in points
                                            if p["system"] == s], args.target) for k in ("ttft", "tpot", "slo")}
                     for s in systems}
        result["factors"][str(factor)] = {"points": points, "sustained": sustained}
        lines += [f"## SLOs x{factor:g} of the config's", "",
                  "| system | scale | rate (req/s) | TTFT att. | TPOT att. | both | TTFT p50 / p99 (s) |",
                  "|---|---:|---:|---:|---:|---:|---|"]
        for p in points:
            lines.append(f"| {p['system']} | {p['scale']:g} | {p['rate_rps']:.2f} | {p['ttft_attainment']:.0%} | "
                         f"{p['tpot_attainment']:.0%} | {p['slo_attainment']:.0%} | "
                         f"{p['ttft_p50_s']:.3f} / {p['ttft_p99_s']:.3f} |")
        fmt = lambda v: "-" if v is None else f"{v:.2f}"  # noqa: E731
        lines += ["", f"Highest rate sustained at {args.target:.0%} (req/s; '-': not even the lowest rate run):", "",
                  "| system | TTFT | TPOT | both |", "|---|---:|---:|---:|"]
        lines += [f"| {s} | {fmt(r['ttft'])} | {fmt(r['tpot'])} | {fmt(r['slo'])} |" for s, r in sustained.items()]
        lines.append("")
        plot_attainment_vs_rate({s: [(p["rate_rps"], p["ttft_attainment"]) for p in points if p["system"] == s]
                                 for s in systems}, folder / f"ttft_attainment_vs_rate_slo_x{factor:g}.png")
    lowest = min(scale for _, scale in runs)
    plot_latency_cdfs({s: runs[(s, lowest)] for s in systems if (s, lowest) in runs},
                      folder / f"latency_cdfs_x{lowest:g}.png")
    (folder / "report.json").write_text(json.dumps(result, indent=1))
    (folder / "report.md").write_text("\n".join(lines))
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
