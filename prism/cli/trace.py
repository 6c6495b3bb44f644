"""`prism bench trace`: build a request trace from a public trace or the synthetic generator,
transform it (window, time and rate scale, lengths from Azure, caps), write it as JSONL (or CSV
by extension) and print a summary.

    prism bench trace azure --kind conv --window 0 600 --out conv.jsonl
    prism bench trace alibaba --num-models 4 --time-scale 0.002 --lengths-from azure-conv \
        --max-input 4096 --out alibaba4.jsonl
    prism bench trace synthetic --num-models 8 --duration 600 --rate 20 --alpha 1 --cv 2 \
        --out syn.csv

Steps run in this order: load, window (in the source's seconds), time scale, rate scale,
lengths, caps. Numbers are checked here, so a bad one ends in one `prism: error:` line.
"""
from __future__ import annotations

import argparse
import math

from prism.errors import UserError

LENGTH_SOURCES = ("azure-conv", "azure-code")


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", required=True, help="trace file to write (.csv for CSV, else JSONL)")
    p.add_argument("--window", nargs=2, metavar=("START", "END"), default=None,
                   help="keep arrivals in [START, END) seconds of the source, re-based to 0")
    p.add_argument("--time-scale", default=None, metavar="F",
                   help="multiply arrival times by F (0.5: twice as fast, same requests)")
    p.add_argument("--rate-scale", default=None, metavar="F",
                   help="about F times as many requests, same span and shape "
                        "(thinning or jittered copies)")
    p.add_argument("--lengths-from", default=None, metavar="SRC",
                   help="draw (input, output) lengths from azure-conv, azure-code or a trace "
                        "file (default for alibaba: azure-conv; others keep their own)")
    p.add_argument("--max-input", default=None, metavar="N", help="cap input lengths at N tokens")
    p.add_argument("--max-output", default=None, metavar="N", help="cap output lengths at N tokens")
    p.add_argument("--models", default=None, metavar="NAMES",
                   help="comma-separated model names, busiest model first")
    p.add_argument("--seed", default="0", help="seed of every random step (default 0)")


def add_trace_parser(bench_subparsers) -> None:
    """Register `trace` under the `prism bench` subcommands."""
    p = bench_subparsers.add_parser(
        "trace", help="build a request trace (Azure, Alibaba or synthetic) and write it",
        description=__doc__.split("\n\n")[0])
    sources = p.add_subparsers(dest="source", required=True, metavar="{azure,alibaba,synthetic}")

    a = sources.add_parser("azure", help="Azure LLM 2023 (Splitwise) trace: code, conv or both")
    a.add_argument("--kind", choices=["code", "conv", "both"], default="conv",
                   help="which service (both: two models on one clock, code first)")
    _common(a)

    b = sources.add_parser("alibaba", help="Alibaba many-model trace: arrivals and popularity "
                                           "of the N busiest base models (23 days)")
    b.add_argument("--num-models", default=None, metavar="N",
                   help="keep the N most popular models (default: the number of --models, else 4)")
    b.add_argument("--jitter", action="store_true",
                   help="spread arrivals within their 1 s timestamp (seeded)")
    _common(b)

    s = sources.add_parser("synthetic", help="power-law popularity, Gamma arrivals, on/off")
    s.add_argument("--num-models", default=None, metavar="N",
                   help="number of models (default: the number of --models, else 4)")
    s.add_argument("--duration", default="600", metavar="S", help="seconds (default 600)")
    s.add_argument("--rate", default="10", metavar="R", help="total requests/s (default 10)")
    s.add_argument("--alpha", default="1.0", help="popularity exponent: model k gets 1/(k+1)^alpha")
    s.add_argument("--cv", default="1.0", help="inter-arrival coefficient of variation (1: Poisson)")
    s.add_argument("--on-off", nargs=2, metavar=("ON", "OFF"), default=None,
                   help="mean on and off period seconds; models send only while on")
    s.add_argument("--input-lens", default="128:1024", metavar="LO:HI",
                   help="uniform input length range (default 128:1024)")
    s.add_argument("--output-lens", default="16:256", metavar="LO:HI",
                   help="uniform output length range (default 16:256)")
    _common(s)
    p.set_defaults(func=run_trace)


# ---- number parsing: ValueError with the option's name ------------------------------------
def _float(name: str, text: str | None, *, positive: bool = False, nonneg: bool = False):
    if text is None:
        return None
    try:
        value = float(text)
    except ValueError:
        raise UserError(f"{name}: not a number: {text!r}") from None
    if not math.isfinite(value):
        raise UserError(f"{name}: must be finite, got {text!r}")
    if positive and value <= 0:
        raise UserError(f"{name}: must be > 0, got {text}")
    if nonneg and value < 0:
        raise UserError(f"{name}: must be >= 0, got {text}")
    return value


def _int(name: str, text: str | None, *, minimum: int | None = 1):
    if text is None:
        return None
    try:
        value = int(text)
    except ValueError:
        raise UserError(f"{name}: not an integer: {text!r}") from None
    if minimum is not None and value < minimum:
        raise UserError(f"{name}: must be >= {minimum}, got {text}")
    return value


def _range(name: str, text: str) -> tuple[int, int]:
    lo, sep, hi = text.partition(":")
    if not sep:
        lo = hi = text
    lo_v, hi_v = _int(name, lo.strip()), _int(name, hi.strip())
    if lo_v > hi_v:
        raise UserError(f"{name}: LO must be <= HI, got {text}")
    return lo_v, hi_v


def _names(text: str | None) -> list[str] | None:
    if text is None:
        return None
    names = [n.strip() for n in text.split(",")]
    if not all(names):
        raise UserError(f"--models: empty name in {text!r}")
    if len(set(names)) != len(names):
        raise UserError(f"--models: names must be distinct, got {text!r}")
    return names


def _lengths_source(spec: str):
    from prism.bench.sources import load_azure
    from prism.bench.trace import load_trace

    if spec in LENGTH_SOURCES:
        return load_azure(spec.split("-", 1)[1])
    return load_trace(spec)


def build_trace(args) -> list:
    """The trace the parsed arguments describe (no file written)."""
    from prism.bench import transforms
    from prism.bench.sources import load_alibaba, load_azure, load_azure_both
    from prism.bench.synthetic import synthetic_trace

    seed = _int("--seed", args.seed, minimum=0)
    names = _names(args.models)
    window = None
    if args.window is not None:
        window = (_float("--window START", args.window[0], nonneg=True),
                  _float("--window END", args.window[1], nonneg=True))
        if window[1] <= window[0]:
            raise UserError(f"--window: END must be > START, got {args.window[0]} {args.window[1]}")
    time_scale = _float("--time-scale", args.time_scale, positive=True)
    rate_scale = _float("--rate-scale", args.rate_scale, positive=True)
    max_input = _int("--max-input", args.max_input)
    max_output = _int("--max-output", args.max_output)

    lengths_from = args.lengths_from
    if args.source == "azure":
        if args.kind == "both":
            if names is not None and len(names) != 2:
                raise UserError(f"--models: azure --kind both has 2 models (code, conv), "
                                 f"got {len(names)} names")
            trace = load_azure_both(tuple(names) if names else ("code", "conv"))
        else:
            if names is not None and len(names) != 1:
                raise UserError(f"--models: azure --kind {args.kind} has 1 model, "
                                 f"got {len(names)} names")
            trace = load_azure(args.kind, names[0] if names else args.kind)
    elif args.source == "alibaba":
        n = _int("--num-models", args.num_models)
        if n is None:
            n = len(names) if names else 4
        trace = load_alibaba(n, names, jitter_seed=seed if args.jitter else None)
        if lengths_from is None:
            lengths_from = "azure-conv"
    else:
        n = _int("--num-models", args.num_models)
        if n is None:
            n = len(names) if names else 4
        on_off = None
        if args.on_off is not None:
            on_off = (_float("--on-off ON", args.on_off[0], positive=True),
                      _float("--on-off OFF", args.on_off[1], nonneg=True))
        trace = synthetic_trace(
            n, _float("--duration", args.duration, positive=True),
            _float("--rate", args.rate, positive=True), _float("--alpha", args.alpha, nonneg=True),
            _float("--cv", args.cv, nonneg=True), _range("--input-lens", args.input_lens),
            _range("--output-lens", args.output_lens), on_off, seed, names)

    if window is not None:
        trace = transforms.window(trace, *window)
    if time_scale is not None:
        trace = transforms.scale_time(trace, time_scale)
    if rate_scale is not None:
        trace = transforms.scale_rate(trace, rate_scale, seed)
    if lengths_from is not None:
        trace = transforms.combine(trace, _lengths_source(lengths_from), seed)
    if max_input is not None or max_output is not None:
        trace = transforms.cap_lengths(trace, max_input, max_output)
    if not trace:
        raise UserError("the trace is empty (check --window and --rate-scale)")
    return trace


def run_trace(args) -> int:
    from prism.bench.trace import save_trace
    from prism.bench.transforms import describe, format_description

    trace = build_trace(args)
    save_trace(args.out, trace)
    print(f"wrote {args.out}")
    print(format_description(describe(trace)))
    return 0
