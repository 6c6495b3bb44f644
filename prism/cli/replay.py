"""`prism bench replay` (drive a server with a trace, then report) and `prism bench report`
(recompute a report from saved request records).

    prism bench replay --trace trace.jsonl --url http://127.0.0.1:8000/v1 --out runs/a --slo-config cfg.yaml
    prism bench report --records runs/a/requests.jsonl --out runs/a2 --slo-ttft-ms 2000 --slo-tpot-ms 200
"""
from __future__ import annotations

import argparse
import asyncio
import time
from pathlib import Path

from prism.bench.records import DEFAULT_REQUEST_TIMEOUT_S
from prism.errors import UserError


def add_slo_options(p: argparse.ArgumentParser, required: bool = True) -> None:
    g = p.add_argument_group("SLOs (one source; required)" if required else
                             "SLOs (one source; default: the config's ttft_slo_ms / tpot_slo_ms)")
    g.add_argument("--slo-config", metavar="YAML", help="a prism serve config: each model's ttft_slo_ms/tpot_slo_ms")
    g.add_argument("--slo-ttft-ms", type=float, metavar="X", help="one TTFT SLO for every model (with --slo-tpot-ms)")
    g.add_argument("--slo-tpot-ms", type=float, metavar="Y", help="one TPOT SLO for every model (with --slo-ttft-ms)")
    g.add_argument("--slo-solo", metavar="RECORDS",
                   help="requests.jsonl of solo runs: SLO = scale x each model's median latency served alone")
    g.add_argument("--slo-scale", type=float, default=5.0, help="the scale for --slo-solo (default 5)")


def _add_report_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--memory-log", metavar="FILE", help="a worker's JSON-lines metrics log: adds memory.png")
    p.add_argument("--title", default=None, help="report title (default: the output folder's name)")
    p.add_argument("--bin-s", type=float, default=10.0, help="throughput-over-time bin width in seconds (default 10)")


def add_replay_parsers(bench_subparsers) -> None:
    p = bench_subparsers.add_parser("replay", help="replay a trace open-loop against an OpenAI-compatible server and report")
    p.add_argument("--trace", required=True, help="trace file (.jsonl or .csv: arrival_s, model, input_len, output_len)")
    p.add_argument("--url", required=True,
                   help="base URL of the API, e.g. http://127.0.0.1:8000/v1 (loopback only unless --allow-remote)")
    p.add_argument("--out", required=True, help="output folder: requests.jsonl, summary.json, summary.md, PNGs")
    p.add_argument("--max-requests", type=int, default=None, help="send at most N requests")
    p.add_argument("--max-duration", type=float, default=None, metavar="S", help="send no request that arrives after S seconds")
    p.add_argument("--request-timeout", type=float, default=DEFAULT_REQUEST_TIMEOUT_S, metavar="S",
                   help=f"give up on a request after S seconds (default {DEFAULT_REQUEST_TIMEOUT_S:g})")
    p.add_argument("--text-prompts", action="store_true", help="send text prompts instead of token ids")
    p.add_argument("--api-key", default="none")
    p.add_argument("--allow-remote", action="store_true", help="allow a non-loopback URL (traffic to other hosts)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    add_slo_options(p)
    _add_report_options(p)
    p.set_defaults(func=run_replay)

    p = bench_subparsers.add_parser("report", help="recompute a report from saved request records")
    p.add_argument("--records", required=True, help="requests.jsonl written by `prism bench replay`")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--duration", type=float, default=None, metavar="S",
                   help="run duration for rates (default: the last finish time in the records)")
    add_slo_options(p)
    _add_report_options(p)
    p.set_defaults(func=run_report)

    p = bench_subparsers.add_parser("sweep", help="a trace at increasing rates under prism and each baseline")
    p.add_argument("--config", required=True, help="the prism serve config (its scheduler.system is overridden)")
    p.add_argument("--trace", required=True)
    p.add_argument("--systems", default="prism,static,muxserve,swap",
                   help="comma-separated: prism, static, muxserve, swap, serverless, dedicated")
    p.add_argument("--scales", default="0.5,1,2,4", help="comma-separated rate scales of the trace")
    p.add_argument("--target", type=float, default=0.99, help="attainment to sustain (default 0.99)")
    p.add_argument("--out", required=True)
    add_slo_options(p)
    p.set_defaults(func=run_sweep)


def resolve_slos(args, models: list[str], default_config: str | None = None) -> dict:
    """The SLOs the options give (exactly one source), else those of `default_config`."""
    from prism.bench.records import load_records
    from prism.bench.report import slos_from_solo, uniform_slos
    from prism.cluster.config import slos_from_config

    explicit = args.slo_ttft_ms is not None or args.slo_tpot_ms is not None
    given = [bool(args.slo_config), explicit, bool(args.slo_solo)]
    if sum(given) == 0 and default_config is not None:
        args.slo_config = default_config
        given[0] = True
    if sum(given) != 1:
        raise UserError("give the SLOs one way: --slo-config YAML, --slo-ttft-ms X --slo-tpot-ms Y, or --slo-solo RECORDS")
    if args.slo_config:
        slos = slos_from_config(args.slo_config)
    elif args.slo_solo:
        slos = slos_from_solo(load_records(args.slo_solo), args.slo_scale)
    else:
        if args.slo_ttft_ms is None or args.slo_tpot_ms is None:
            raise UserError("--slo-ttft-ms and --slo-tpot-ms go together")
        slos = uniform_slos(models, args.slo_ttft_ms / 1e3, args.slo_tpot_ms / 1e3)
    missing = sorted(set(models) - set(slos))
    if missing:
        raise UserError(f"no SLO for model {missing[0]!r} (SLOs given for: {', '.join(sorted(slos))})")
    return slos


def run_replay(args) -> int:
    from prism.bench.records import save_records
    from prism.bench.report import markdown_table, write_report
    from prism.bench.trace import load_trace
    from prism.client.replay import check_url, replay

    check_url(args.url, args.allow_remote)
    if args.max_requests is not None and args.max_requests < 0:
        raise UserError(f"--max-requests must be >= 0, got {args.max_requests}")
    trace = load_trace(args.trace)
    if args.max_duration is not None:
        trace = [r for r in trace if r.arrival_s <= args.max_duration]
    trace = trace[:args.max_requests]
    if not trace:
        raise UserError(f"{args.trace}: no requests to replay (after --max-requests / --max-duration)")
    slos = resolve_slos(args, sorted({r.model for r in trace}))  # fail before sending anything
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    records = asyncio.run(replay(
        trace, args.url, api_key=args.api_key, use_token_ids=not args.text_prompts,
        progress=not args.no_progress, request_timeout_s=args.request_timeout, allow_remote=args.allow_remote,
    ))
    duration_s = time.perf_counter() - start
    save_records(out / "requests.jsonl", records)
    report = write_report(out, records, slos, duration_s, title=args.title or out.name,
                          memory_log=args.memory_log, bin_s=args.bin_s)
    _print(report, out, markdown_table)
    return 0


def run_report(args) -> int:
    from prism.bench.records import load_records
    from prism.bench.report import markdown_table, records_duration, write_report

    records = load_records(args.records)
    if not records:
        raise UserError(f"{args.records}: no request records")
    slos = resolve_slos(args, sorted({r.model for r in records}))
    duration_s = args.duration if args.duration is not None else records_duration(records)
    if duration_s <= 0:
        raise UserError(f"duration must be positive, got {duration_s}")
    out = Path(args.out)
    report = write_report(out, records, slos, duration_s, title=args.title or out.name,
                          memory_log=args.memory_log, bin_s=args.bin_s)
    _print(report, out, markdown_table)
    return 0


def run_sweep(args) -> int:
    from prism.bench.trace import load_trace
    from prism.client.sweep import sweep
    from prism.cluster.systems import parse_systems

    systems = parse_systems(args.systems, "--systems")
    try:
        scales = [float(x) for x in args.scales.split(",")]
    except ValueError:
        raise UserError(f"--scales must be comma-separated numbers, got {args.scales!r}") from None
    if any(x <= 0 for x in scales) or not 0 < args.target <= 1:
        raise UserError("rate scales must be > 0 and --target in (0, 1]")
    trace = load_trace(args.trace)
    slos = resolve_slos(args, sorted({r.model for r in trace}))
    result = sweep(args.config, trace, systems, scales, slos, args.out, args.target)
    print((Path(args.out) / "sweep.md").read_text(), end="")
    print(f"wrote {Path(args.out) / 'sweep.json'}")
    return 0 if result else 2


def _print(report: dict, out: Path, markdown_table) -> None:
    o = report["summary"].get("overall", {})
    print(f"{report['requests']} requests over {report['duration_s']:.1f} s: "
          f"{o.get('finished', 0)} finished, {o.get('errors', 0)} errors")
    print(markdown_table(report["summary"]))
    print(f"wrote {out / 'summary.md'}, {out / 'summary.json'} and {len(report['plots'])} plots")
