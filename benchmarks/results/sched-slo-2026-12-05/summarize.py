"""Prism's attainment before and after, from two folders of simulator records.

    python benchmarks/results/sched-slo-2026-12-05/summarize.py committed BEFORE AFTER
    python benchmarks/results/sched-slo-2026-12-05/summarize.py unseen BEFORE AFTER

`committed`: two `sim_records_check.py run` folders (the committed E1 and E2 inputs).
`unseen`: two folders of `prism simulate --policy prism` runs of the unseen traces (see the
README), one sub-folder per trace and profile set, judged by the E1 config's SLOs.
Columns: both SLOs, TTFT and TPOT attainment; TTFT misses within 10% of the SLO; TPOT misses
of outputs of at most 16 tokens.
"""
from __future__ import annotations

import sys
from pathlib import Path

from prism.bench.records import load_records
from prism.bench.report import summarize
from prism.cluster.config import slos_from_config

ROOT = Path(__file__).resolve().parents[3]
INPUTS = ROOT / "benchmarks" / "sim-inputs"
COMMITTED = [("e1", "e1", "x1"), ("e1", "e1", "x4"), ("e1-host", "e1-host", "x1"), ("e1-host", "e1-host", "x4"),
             ("e2-4gpus", "e2", "x1"), ("e2-host-6gpus", "e2-host", "x1")]
UNSEEN = [(f"{trace}-{profiles}", "e1-host", scale) for trace in ("conv", "code")
          for profiles in ("nvidia-h100-overlap", "nvidia-h100-host") for scale in ("x1", "x2")]
SHORT_OUTPUT = 16


def row(folder: Path, case: str, tag: str, scale: str) -> tuple[dict, int, int]:
    records = load_records(folder / case / f"requests-prism-{scale}.jsonl")
    slos = slos_from_config(INPUTS / f"{tag}-config.yaml")
    overall = summarize(records, slos, 1.0)["overall"]
    near = sum(r.ok and r.ttft is not None and 1 < r.ttft / slos[r.model].ttft_s <= 1.1 for r in records)
    short = sum(r.ok and r.tpot is not None and r.tpot > slos[r.model].tpot_s
                and (r.num_output_tokens or len(r.token_s)) <= SHORT_OUTPUT for r in records)
    return overall, near, short


def main(kind: str, before: Path, after: Path) -> None:
    print("| case | both SLOs before → after | TTFT before → after | TPOT before → after "
          f"| TTFT misses ≤1.1x SLO | TPOT misses of ≤{SHORT_OUTPUT}-token outputs |")
    print("|---|---|---|---|---|---|")
    for case, tag, scale in COMMITTED if kind == "committed" else UNSEEN:
        (b, bn, bs), (a, an, as_) = row(before, case, tag, scale), row(after, case, tag, scale)
        cells = [f"{b[k]:.1%} → {a[k]:.1%}" for k in ("slo_attainment", "ttft_attainment", "tpot_attainment")]
        print(f"| {case} {scale} | " + " | ".join(cells) + f" | {bn} → {an} | {bs} → {as_} |")


if __name__ == "__main__":
    main(sys.argv[1], Path(sys.argv[2]), Path(sys.argv[3]))
