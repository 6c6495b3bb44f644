"""Prism's attainment before and after, from two `sim_records_check.py run` folders.

    python benchmarks/results/tpot-chunks-2026-12-04/summarize.py BEFORE AFTER
"""
from __future__ import annotations

import sys
from pathlib import Path

from prism.bench.records import load_records
from prism.bench.report import summarize
from prism.cluster.config import slos_from_config

ROOT = Path(__file__).resolve().parents[3]
CASES = [("e1", "e1", "x1"), ("e1", "e1", "x4"), ("e1-host", "e1-host", "x1"), ("e1-host", "e1-host", "x4"),
         ("e2-4gpus", "e2", "x1"), ("e2-host-6gpus", "e2-host", "x1")]


def row(folder: Path, case: str, tag: str, scale: str) -> tuple[dict, int]:
    records = load_records(folder / case / f"requests-prism-{scale}.jsonl")
    slos = slos_from_config(ROOT / "benchmarks" / "sim-inputs" / f"{tag}-config.yaml")
    overall = summarize(records, slos, 1.0)["overall"]
    short_misses = sum(r.ok and r.tpot is not None and r.tpot > slos[r.model].tpot_s
                       and (r.num_output_tokens or len(r.token_s)) <= 5 for r in records)
    return overall, short_misses


def main(before: Path, after: Path) -> None:
    print("| case | both SLOs before → after | TTFT before → after | TPOT before → after "
          "| TPOT misses of ≤5-token outputs before → after |")
    print("|---|---|---|---|---|")
    for case, tag, scale in CASES:
        (b, bm), (a, am) = row(before, case, tag, scale), row(after, case, tag, scale)
        cells = [f"{b[k]:.1%} → {a[k]:.1%}" for k in ("slo_attainment", "ttft_attainment", "tpot_attainment")]
        print(f"| {case} {scale} | " + " | ".join(cells) + f" | {bm} → {am} |")


if __name__ == "__main__":
    main(Path(sys.argv[1]), Path(sys.argv[2]))
