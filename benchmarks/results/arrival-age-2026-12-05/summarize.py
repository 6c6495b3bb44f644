"""Every system's attainment before and after, from two folders of simulator records.

    PYTHONPATH=. python benchmarks/results/arrival-age-2026-12-05/summarize.py committed BEFORE AFTER
    PYTHONPATH=. python benchmarks/results/arrival-age-2026-12-05/summarize.py unseen BEFORE AFTER

`committed`: two `sim_records_check.py run` folders, each case judged by its own config.
`unseen`: one sub-folder per trace and profile set (see the README), judged by the E1 host
config's SLOs. One row per records file present on both sides (case, system, rate scale): both
SLOs, TTFT and TPOT attainment, and TTFT misses within 10% of the SLO.
"""
from __future__ import annotations

import sys
from pathlib import Path

from prism.bench.records import load_records
from prism.bench.report import summarize
from prism.cluster.config import slos_from_config

ROOT = Path(__file__).resolve().parents[3]
INPUTS = ROOT / "benchmarks" / "sim-inputs"
CASES = [("e1", "e1"), ("e1-host", "e1-host"), ("e2-4gpus", "e2"), ("e2-host-6gpus", "e2-host")]
SYSTEMS = ("prism", "static", "muxserve", "swap", "dedicated")


def row(path: Path, tag: str) -> tuple[dict, int]:
    records = load_records(path)
    slos = slos_from_config(INPUTS / f"{tag}-config.yaml")
    overall = summarize(records, slos, 1.0)["overall"]
    near = sum(r.ok and r.ttft is not None and 1 < r.ttft / slos[r.model].ttft_s <= 1.1 for r in records)
    return overall, near


def main(kind: str, before: Path, after: Path) -> None:
    cases = CASES if kind == "committed" else [(d.name, "e1-host") for d in sorted(before.iterdir()) if d.is_dir()]
    print("| case | system | both SLOs before → after | TTFT before → after | TPOT before → after "
          "| TTFT misses ≤1.1x SLO |")
    print("|---|---|---|---|---|---|")
    for case, tag in cases:
        for system in SYSTEMS:
            for b_path in sorted((before / case).glob(f"requests-{system}-x*.jsonl")):
                a_path = after / case / b_path.name
                if not a_path.is_file():
                    continue
                scale = b_path.stem.rsplit("-", 1)[1]
                (b, bn), (a, an) = row(b_path, tag), row(a_path, tag)
                cells = [f"{b[k]:.1%} → {a[k]:.1%}" for k in ("slo_attainment", "ttft_attainment", "tpot_attainment")]
                print(f"| {case} {scale} | {system} | " + " | ".join(cells) + f" | {bn} → {an} |")


if __name__ == "__main__":
    main(sys.argv[1], Path(sys.argv[2]), Path(sys.argv[3]))
