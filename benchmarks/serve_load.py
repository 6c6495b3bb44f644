"""The server under load: `prism serve` with several models on one device, driven by the
official openai client (open-loop Poisson arrivals per model), TTFT/TPOT percentiles and SLO
attainment per model, judged against the SLOs in the server's config.

    python3 benchmarks/serve_load.py --config examples/h100.yaml --rate 4 --duration 60
"""
from __future__ import annotations

import argparse
import asyncio
import datetime
import json
import re
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from prism.bench.records import save_records  # noqa: E402
from prism.client.replay import replay  # noqa: E402
from prism.bench.report import SLOTargets, markdown_table, summarize  # noqa: E402
from prism.bench.trace import poisson_trace  # noqa: E402
from prism.client.server_process import free_port, start_server, stop_server, wait_healthy  # noqa: E402
from prism.cluster.config import load_config  # noqa: E402


def card_name() -> str:
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=10).stdout.strip()
        return out.splitlines()[0] if out else "cpu"
    except (OSError, subprocess.TimeoutExpired):
        return "cpu"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", default="examples/h100.yaml")
    ap.add_argument("--rate", type=float, default=4.0, help="total requests/s, split over the models by popularity")
    ap.add_argument("--skew", type=float, default=1.0, help="popularity of model k ~ 1/(k+1)^skew")
    ap.add_argument("--duration", type=float, default=60.0)
    ap.add_argument("--input", type=int, nargs=2, default=(128, 1024))
    ap.add_argument("--output", type=int, nargs=2, default=(32, 256))
    ap.add_argument("--out-dir", default="benchmarks/results")
    ap.add_argument("--log", default=None, help="server log file (default: inherit)")
    args = ap.parse_args()

    config = load_config(args.config)
    names = [m.name for m in config.models]
    weights = [1 / (k + 1) ** args.skew for k in range(len(names))]
    rates = {n: args.rate * w / sum(weights) for n, w in zip(names, weights)}
    trace = poisson_trace(rates, args.duration, tuple(args.input), tuple(args.output), seed=0)
    slos = {m.name: SLOTargets(m.ttft_slo_s, m.tpot_slo_s) for m in config.models}

    port = free_port()
    log = open(args.log, "w") if args.log else None
    t0 = time.perf_counter()
    proc = start_server(args.config, port, log or sys.stderr)
    try:
        wait_healthy(f"http://127.0.0.1:{port}", proc, timeout_s=900)
        startup_s = time.perf_counter() - t0
        t1 = time.perf_counter()
        records = asyncio.run(replay(trace, f"http://127.0.0.1:{port}/v1", progress=False))
        wall_s = time.perf_counter() - t1
    finally:
        stop_server(proc)
    summary = summarize(records, slos, wall_s)

    card, date = card_name(), datetime.date.today().isoformat()
    slug = re.sub(r"[^a-z0-9]+", "-", card.lower()).strip("-")
    out_dir = Path(args.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    stem = f"serve-load-{Path(args.config).stem}-{slug}-{date}"
    save_records(out_dir / f"{stem}-requests.jsonl", records)
    result = dict(benchmark="serve_load", card=card, date=date, command="python3 " + " ".join(sys.argv),
                  config=args.config, rates_rps=rates, duration_s=args.duration, input_range=args.input,
                  output_range=args.output, startup_s=startup_s, replay_wall_s=wall_s, summary=summary)
    (out_dir / f"{stem}.json").write_text(json.dumps(result, indent=1))
    table = markdown_table(summary)
    (out_dir / f"{stem}.md").write_text(f"# {stem}\n\n{card}, {date}\n\n`{result['command']}`\n\n{table}\n")
    print(f"\n{card}: {len(records)} requests over {args.duration:.0f} s at {args.rate} req/s; "
          f"server start {startup_s:.0f} s, replay {wall_s:.0f} s")
    print(table)
    print(f"wrote {out_dir / stem}.json")
    return 0


if __name__ == "__main__":
    sys.exit(main())
