"""`prism` command line (generate, profile, serve, demo, bench, simulate, plan, tokenizer): the roof,
which nothing else imports. Errors a user can cause end in one line on stderr and exit code 2."""
from __future__ import annotations

import argparse
import sys
import traceback

from prism.cli.profile import add_profile_parser
from prism.cli.replay import add_replay_parsers
from prism.cli.serve import add_demo_parser, add_generate_parser, add_serve_parser
from prism.cli.simulate import add_plan_parser, add_simulate_parser
from prism.cli.tokenizer import add_tokenizer_parser
from prism.cli.trace import add_trace_parser
from prism.errors import USER_ERROR_EXIT, UserError, one_line


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
    add_tokenizer_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    return run_parsed(build_parser().parse_args(argv))


def run_parsed(args) -> int:
    """Run a parsed subcommand. A user's error (bad option, model name, config or file, no
    memory for the model) is one line on stderr and exit 2; a missing file too. Anything else
    is a bug: a crash report (the traceback) and exit 1."""
    try:
        return args.func(args)
    except KeyboardInterrupt:
        return 130
    except (UserError, FileNotFoundError, IsADirectoryError, PermissionError) as e:
        print(f"prism: error: {one_line(e)}", file=sys.stderr)
        return USER_ERROR_EXIT
    except Exception:
        traceback.print_exc()
        print("prism: internal error (a bug): the traceback above says where", file=sys.stderr)
        return 1

