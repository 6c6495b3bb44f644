"""Repeats of one real sweep beside the simulator's prediction of it: per system and rate,
each run's attainment (both SLOs, TTFT, TPOT), their spread, the simulated figure, and the
highest rate each sustains at the target. Writes repeats.md, repeats.json and a plot.

    python3 benchmarks/repeats_report.py --runs r1=RUN1/records r2=RUN2/records --sim SIM_OUT \
        --config examples/h100-6models.yaml --trace TRACE --out DIR
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from sweep_report import load_runs  # noqa: E402

from prism.bench.plots import plot_attainment_by_source  # noqa: E402
from prism.bench.report import summarize  # noqa: E402
from prism.bench.sweeps import sustained_rate  # noqa: E402
from prism.bench.trace import load_trace  # noqa: E402
from prism.cluster.config import slos_from_config  # noqa: E402

KEYS = (("slo_attainment", "both"), ("ttft_attainment", "TTFT"), ("tpot_attainment", "TPOT"))


def points(folder: Path, slos, duration_s: float) -> dict[tuple[str, float], dict]:
    """(system, scale) -> overall summary with the point's offered rate."""
    out = {}
    for key, records in load_runs(folder).items():
        summary = summarize(records, slos, duration_s)["overall"]
        out[key] = dict(summary, rate_rps=len(records) / duration_s)
    return out


def table(runs: dict[str, dict], sim: dict, target: float) -> tuple[str, dict]:
    labels = list(runs)
    keys = sorted({k for r in runs.values() for k in r}, key=lambda k: (k[0], k[1]))
    head = " | ".join(f"{name} {' / '.join(labels)} (spread) / sim" for _, name in KEYS)
    lines = [f"| system | scale | rate (req/s) | {head} |", "|---|---:|---:|" + "---|" * len(KEYS)]
    for system, scale in keys:
        rate = next(r[(system, scale)]["rate_rps"] for r in runs.values() if (system, scale) in r)
        cells = []
        for key, _ in KEYS:
            real = [r[(system, scale)][key] for r in runs.values() if (system, scale) in r]
            simulated = sim.get((system, scale), {}).get(key)
            spread = max(real) - min(real)
            cells.append(" / ".join(f"{v:.1%}" for v in real) + f" ({spread * 100:.1f} pts) / "
                         + ("-" if simulated is None else f"{simulated:.1%}"))
        lines.append(f"| {system} | {scale:g} | {rate:.2f} | " + " | ".join(cells) + " |")
    sustained = {}
    for label, source in [*runs.items(), ("sim", sim)]:
        for system in sorted({s for s, _ in source}):
            mine = [(p["rate_rps"], p["slo_attainment"]) for (s, _), p in source.items() if s == system]
            sustained.setdefault(system, {})[label] = sustained_rate(mine, target)
    lines += ["", f"Highest rate (req/s) with both SLOs at >= {target:.0%} (none: not even the lowest; "
              "-: the system is not in that run):", "",
              "| system | " + " | ".join([*labels, "sim"]) + " |", "|---|" + "---:|" * (len(labels) + 1)]
    for system, by in sorted(sustained.items()):
        lines.append(f"| {system} | " + " | ".join(_rate_cell(by, x) for x in [*labels, "sim"]) + " |")
    return "\n".join(lines) + "\n", sustained


def _rate_cell(by: dict, label: str) -> str:
    if label not in by:
        return "-"
    return "none" if by[label] is None else f"{by[label]:.2f}"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--runs", nargs="+", required=True, metavar="LABEL=DIR", help="real sweeps' record folders")
    p.add_argument("--sim", required=True, help="the simulated records (sim_validation.py --out)")
    p.add_argument("--config", required=True, help="the serve config (its SLOs judge every run)")
    p.add_argument("--trace", required=True)
    p.add_argument("--target", type=float, default=0.99)
    p.add_argument("--out", required=True)
    args = p.parse_args(argv)
    slos = slos_from_config(args.config)
    duration = max(r.arrival_s for r in load_trace(args.trace))
    runs = {label: points(Path(folder), slos, duration)
            for label, folder in (item.split("=", 1) for item in args.runs)}
    sim = points(Path(args.sim), slos, duration)
    text, sustained = table(runs, sim, args.target)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "repeats.md").write_text(text)
    (out / "repeats.json").write_text(json.dumps(
        {"target": args.target, "sustained": sustained,
         "points": {label: {f"{s}-x{x:g}": v for (s, x), v in pts.items()}
                    for label, pts in [*runs.items(), ("sim", sim)]}}, indent=1, default=str))
    curves: dict[str, dict[str, list]] = {}
    for label, pts in [*runs.items(), ("sim", sim)]:
        for (system, _), v in pts.items():
            curves.setdefault(system, {}).setdefault(label, []).append((v["rate_rps"], v["slo_attainment"]))
    plot_attainment_by_source(curves, out / "attainment_vs_rate.png")
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
