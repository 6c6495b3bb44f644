"""`prism simulate` and `prism plan`: the server's schedulers over simulated devices.

    prism simulate --config examples/h100.yaml --trace trace.jsonl --policy prism --out runs/sim
    prism simulate --config cfg.yaml --trace t.jsonl --policy prism,static,muxserve,swap \\
        --rate-scales 0.5,1,2,4 --out runs/sweep
    prism plan --config cfg.yaml --trace t.jsonl --target 0.99 --max-gpus 8 --out runs/plan
"""
from __future__ import annotations

import argparse
from pathlib import Path

from prism.cli.replay import add_slo_options, resolve_slos
from prism.errors import UserError


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", required=True, help="a prism serve YAML (its scheduler.system is overridden by the policy)")
    p.add_argument("--trace", required=True, help="trace file (.jsonl or .csv: arrival_s, model, input_len, output_len)")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--profiles", default=None, metavar="DIR",
                   help="folder of `prism profile` JSONs for the simulated card (default: $PRISM_PROFILE_DIR "
                        "or ~/.cache/prism/profiles; models without one are scaled from the nearest measured "
                        "model, or from the card's nominal rates)")
    p.add_argument("--jobs", type=int, default=None, help="simulations run in parallel (default: cores, at most 4)")
    add_slo_options(p, required=False)


def add_simulate_parser(sub) -> None:
    p = sub.add_parser("simulate", help="replay a trace on simulated devices with the server's own schedulers")
    p.add_argument("--policy", default="prism",
                   help="serving system: prism, static, muxserve, swap, serverless, dedicated (comma-separated: a sweep)")
    p.add_argument("--rate-scales", default=None, metavar="F,...",
                   help="replay the trace at these rate scales (thinned or replicated, shape kept): a sweep")
    p.add_argument("--target", type=float, default=0.99, help="attainment a sweep reports the rate for (default 0.99)")
    _common(p)
    p.set_defaults(func=run_simulate)


def add_plan_parser(sub) -> None:
    p = sub.add_parser("plan", help="fewest GPUs that meet an SLO attainment target, per policy (simulated)")
    p.add_argument("--target", type=float, default=0.99, help="TTFT and TPOT attainment to reach (default 0.99)")
    p.add_argument("--policies", default="prism,static,muxserve,swap",
                   help="comma-separated: prism, static, muxserve, swap, dedicated")
    p.add_argument("--max-gpus", type=int, default=8, help="largest cluster to try (default 8)")
    p.add_argument("--group-weight-fraction", type=float, default=0.5,
                   help="a model goes on a tensor-parallel group when its weights exceed this share of one "
                        "GPU's memory (default 0.5)")
    p.add_argument("--no-early-stop", action="store_true",
                   help="simulate every point to the end (exact attainment curves; slower where the target is missed)")
    _common(p)
    p.set_defaults(func=run_plan)


# ---- parsing helpers: ValueError with the option's name -----------------------------------------
def _systems(text: str, option: str) -> list[str]:
    from prism.cluster.systems import parse_systems

    return parse_systems(text, option)


def _scales(text: str | None) -> list[float] | None:
    if text is None:
        return None
    try:
        scales = [float(x) for x in text.split(",")]
    except ValueError:
        raise UserError(f"--rate-scales must be comma-separated numbers, got {text!r}") from None
    if not scales or any(not x > 0 for x in scales):
        raise UserError(f"--rate-scales must be > 0, got {text!r}")
    return scales


def _check(args) -> None:
    if not 0 < args.target <= 1:
        raise UserError(f"--target must be in (0, 1], got {args.target}")
    if args.jobs is not None and args.jobs < 1:
        raise UserError(f"--jobs must be >= 1, got {args.jobs}")


def _inputs(args):
    """(raw config, trace, SLOs, profiles), each checked, before anything runs."""
    from prism.bench.trace import load_trace
    from prism.env import profile_dir
    from prism.sim.costs import ProfileSet
    from prism.sim.run import config_for, read_raw_config

    raw = read_raw_config(args.config)
    config_for(raw, "prism", source=Path(args.config).name)  # a bad config fails here, in one line
    trace = load_trace(args.trace)
    if not trace:
        raise UserError(f"{args.trace}: the trace has no requests")
    slos = resolve_slos(args, sorted({r.model for r in trace}), default_config=args.config)
    folder = args.profiles
    if folder is None and profile_dir().is_dir():
        folder = profile_dir()
    return raw, trace, slos, ProfileSet.load(folder)


# ---- commands -------------------------------------------------------------------------------------
def run_simulate(args) -> int:
    from prism.bench.report import markdown_table
    from prism.sim.run import config_for, simulate, write_sim_report
    from prism.sim.sweep import sim_sweep

    _check(args)
    systems = _systems(args.policy, "--policy")
    scales = _scales(args.rate_scales)
    raw, trace, slos, profiles = _inputs(args)
    out = Path(args.out)
    if len(systems) > 1 or scales is not None:
        result = sim_sweep(raw, trace, systems, scales or [1.0], slos, profiles, out, args.target, args.jobs)
        print((out / "sweep.md").read_text(), end="")
        print(f"wrote {out / 'sweep.json'}")
        return 0 if result else 2
    result = simulate(config_for(raw, systems[0]), trace, profiles)
    report = write_sim_report(out, result, slos, title=f"{out.name} (simulated, {systems[0]})")
    o = report["summary"].get("overall", {})
    print(f"{report['requests']} requests over {report['duration_s']:.1f} simulated s on "
          f"{result.num_gpus} GPU(s): {o.get('finished', 0)} finished, {o.get('errors', 0)} errors; "
          f"simulated in {result.wall_s:.1f} s")
    print(markdown_table(report["summary"]))
    print(f"wrote {out / 'summary.md'}, {out / 'requests.jsonl'} and {len(report['plots'])} plots")
    return 0


def run_plan(args) -> int:
    from prism.sim.plan import plan, write_plan

    _check(args)
    if args.max_gpus < 1:
        raise UserError(f"--max-gpus must be >= 1, got {args.max_gpus}")
    if not 0 < args.group_weight_fraction <= 1:
        raise UserError(f"--group-weight-fraction must be in (0, 1], got {args.group_weight_fraction}")
    systems = _systems(args.policies, "--policies")
    raw, trace, slos, profiles = _inputs(args)
    result = plan(raw, trace, systems, slos, profiles, args.target, args.max_gpus,
                  args.group_weight_fraction, args.jobs, early_stop=not args.no_early_stop)
    out = Path(args.out)
    write_plan(result, out)
    print((out / "plan.md").read_text(), end="")
    print(f"wrote {out / 'plan.json'} and {out / 'plan.png'}")
    return 0
