"""`prism` command line (generate, profile, serve, demo, bench, simulate, plan): the roof,
which nothing else imports. Errors a user can cause end in one line on stderr and exit code 2."""
from __future__ import annotations

import argparse
import sys

from prism.cli.profile import add_profile_parser
from prism.cli.replay import add_replay_parsers
from prism.cli.serve import add_demo_parser, add_generate_parser, add_serve_parser
from prism.cli.simulate import add_plan_parser, add_simulate_parser
from prism.cli.trace import add_trace_parser


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="prism", description="Prism: many LLMs on shared GPUs")
    sub = parser.add_subparsers(dest="command", required=True)
    add_generate_parser(sub)
    add_profile_parser(sub)
    add_serve_parser(sub)
    add_demo_parser(sub)
    bench = sub.add_parser("bench", help="workloads: make traces, replay them, report SLO attainment")
    bench_sub = bench.add_subparsers(dest="bench_command", required=True)
    add_trace_parser(bench_sub)
    add_replay_parsers(bench_sub)
    add_simulate_parser(sub)
    add_plan_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    return run_parsed(build_parser().parse_args(argv))


def run_parsed(args) -> int:
    """Run a parsed subcommand; user-caused errors become one line on stderr and exit 2."""
    try:
        return args.func(args)
    except KeyboardInterrupt:
        return 130
    except (ValueError, RuntimeError, OSError) as e:
        # User-caused problems (bad model name, corrupt weights, prompt too long, no memory)
        # arrive here as exceptions with a message meant for people: one line, no traceback.
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        print(f"prism: error: {msg}", file=sys.stderr)
        return 2

