"""The research system's cluster-scale experiments, on the simulator (CPU only).

    python benchmarks/sim_experiments.py inputs   # write the traces and configs (deterministic)
    python benchmarks/sim_experiments.py e1       # 8 models on 2 GPUs: highest rate at 99% TTFT attainment
    python benchmarks/sim_experiments.py e2       # 18 models of 1B-8B: GPUs needed (1-8) per policy
    python benchmarks/sim_experiments.py e3       # 58 models of 1B-70B: GPUs needed (up to 32) per policy
    python benchmarks/sim_experiments.py speed    # wall time of 58 models on 32 GPUs, 10-minute trace

Each writes benchmarks/results/sim-<name>/ (tables, PNGs, the command line). Everything runs
through `prism simulate` / `prism plan` code paths. Workload: the Alibaba many-model trace's
popularity and burstiness (its busiest day for the experiment's models, squeezed into 10
minutes: each model's share and bursts kept, 144x faster), Azure conv prompt and output lengths
(input <= 2048, output <= 1024), and
model sizes assigned to popularity ranks by a seeded shuffle (size and popularity are not
correlated). SLOs follow the research convention: 5x each model's latency served alone
(TTFT of a median prompt, TPOT of a lone decode), from the same cost model the devices use.
Cost model: the profiles in --profiles (default benchmarks/profiles/nvidia-h100, measured by
`prism profile` on the H100); `--profiles none` uses the H100's nominal rates (roofline).
"""
from __future__ import annotations

import argparse
import json
import random
import shlex
import statistics
import sys
import time
from pathlib import Path

import yaml

from prism.bench.sweeps import sustained_rate

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
INPUTS = ROOT / "benchmarks" / "sim-inputs"
DEFAULT_PROFILES = ROOT / "benchmarks" / "profiles" / "nvidia-h100"
DEVICE = {"device": "cuda:0", "memory": "70GiB"}  # an H100 80GB, as examples/h100.yaml budgets it
SLO_SCALE = 5.0
DURATION_S = 600.0
WINDOW_S = 24 * 3600.0  # the busiest day of the Alibaba trace becomes the 10-minute trace
MAX_INPUT, MAX_OUTPUT = 2048, 1024  # longer prompts could miss a 5x-median TTFT SLO even served alone

# (shape, count): the model zoos of the three experiments
ZOO_8 = [("llama-3.2-1b", 2), ("llama-3.2-3b", 2), ("qwen2.5-7b", 2), ("llama-3.1-8b", 2)]
ZOO_18 = [("llama-3.2-1b", 6), ("llama-3.2-3b", 6), ("qwen2.5-7b", 3), ("llama-3.1-8b", 3)]
ZOO_58 = [("llama-3.2-1b", 24), ("llama-3.2-3b", 16), ("qwen2.5-7b", 5), ("llama-3.1-8b", 5),
          ("qwen2.5-14b", 4), ("qwen2.5-32b", 2), ("llama-3.1-70b", 2)]
POLICIES = ["prism", "static", "muxserve", "swap"]
ALL_SYSTEMS = POLICIES + ["serverless", "dedicated"]  # dedicated: one GPU per model, the reference


# ---- inputs -------------------------------------------------------------------------------------
def model_names(zoo, seed: int = 0) -> list[tuple[str, str]]:
    """(name, shape) per popularity rank: sizes shuffled over ranks with a fixed seed."""
    shapes = [s for s, n in zoo for _ in range(n)]
    random.Random(seed).shuffle(shapes)
    return [(f"{shape}-{i:02d}", shape) for i, shape in enumerate(shapes)]


def busiest_window(trace, span_s: float) -> float:
    """Start of the `span_s` window with the most arrivals."""
    times = [r.arrival_s for r in trace]
    best, best_start, j = 0, 0.0, 0
    for i, t in enumerate(times):
        while times[j] < t - span_s:
            j += 1
        if i - j + 1 > best:
            best, best_start = i - j + 1, times[j]
    return best_start


def build_trace(names: list[str], rate_scale: float):
    """The busiest day of the Alibaba trace for these models, squeezed into 10 minutes (each
    model's share and bursts kept, 144x faster), then thinned or replicated by `rate_scale`."""
    from prism.bench import transforms
    from prism.bench.sources import load_alibaba, load_azure

    trace = load_alibaba(len(names), names)
    start = busiest_window(trace, WINDOW_S)
    trace = transforms.window(trace, start, start + WINDOW_S)
    trace = transforms.scale_time(trace, DURATION_S / WINDOW_S)
    if rate_scale != 1:
        trace = transforms.scale_rate(trace, rate_scale, seed=0)
    trace = transforms.combine(trace, load_azure("conv"), seed=0)
    return transforms.cap_lengths(trace, MAX_INPUT, MAX_OUTPUT)


def solo_slos(models: list[tuple[str, str]], trace, profiles, group_fraction: float = 0.5) -> dict:
    """name -> (ttft_ms, tpot_ms): SLO_SCALE x the model's latency served alone, from the
    cost model of the GPU group it would run on, plus the host time of `profiles.host` (what a
    deployment measuring its solo latency would see: the request latency and one step's host
    time in the TTFT, one step's host time in the TPOT; none without a host.yaml)."""
    from prism.config import ModelSpec
    from prism.sched.cost import ProfileCostModel
    from prism.sim.shapes import model_shape

    memory = 70 << 30
    inputs = [r.input_len for r in trace] or [1024]
    outputs = [r.output_len for r in trace] or [128]
    n_in, n_out = int(statistics.median(inputs)), int(statistics.median(outputs))
    out = {}
    for name, shape_name in models:
        shape = model_shape(ModelSpec(name, f"{shape_name}:random"), DEVICE["device"])
        gpus = 1
        while shape.weight_bytes > group_fraction * gpus * memory:
            gpus *= 2
        profile, _ = profiles.profile_for(shape, DEVICE["device"], gpus)
        cost = ProfileCostModel({name: profile})
        host_step = profiles.host.step_time(1)
        ttft = cost.prefill_time(name, n_in) + profiles.host.request_s + host_step
        tpot = cost.decode_step_time(name, 1, n_in + n_out // 2) + host_step
        out[name] = (round(SLO_SCALE * ttft * 1e3, 1), round(SLO_SCALE * tpot * 1e3, 1))
    return out


def build_config(models, slos: dict, num_devices: int = 1) -> dict:
    devices = [dict(DEVICE, device=f"cuda:{i}") for i in range(num_devices)]
    return {
        "devices": devices,
        "models": [{"name": n, "source": f"{s}:random", "ttft_slo_ms": slos[n][0], "tpot_slo_ms": slos[n][1],
                    "max_model_len": 8192} for n, s in models],
        "scheduler": {"system": "prism", "idle_evict_s": 45},
    }


def write_inputs(tag: str, zoo, rate_scale: float, profiles, num_devices: int = 1) -> tuple[Path, Path]:
    """The trace and config of one experiment (SLOs from `profiles`, so each cost model has
    its own inputs: tag carries the suffix)."""
    from prism.bench.trace import save_trace

    models = model_names(zoo)
    trace = build_trace([n for n, _ in models], rate_scale)
    config = build_config(models, solo_slos(models, trace, profiles), num_devices)
    INPUTS.mkdir(parents=True, exist_ok=True)
    trace_path, config_path = INPUTS / f"{tag}-trace.jsonl", INPUTS / f"{tag}-config.yaml"
    save_trace(trace_path, trace)
    config_path.write_text(f"# {tag}: written by benchmarks/sim_experiments.py inputs\n"
                           + yaml.safe_dump(config, sort_keys=False))
    return trace_path, config_path


# ---- runs ---------------------------------------------------------------------------------------
def inputs(args, tag: str) -> tuple[Path, Path]:
    return INPUTS / f"{tag}{args.suffix}-trace.jsonl", INPUTS / f"{tag}{args.suffix}-config.yaml"


def prism_cli(args: list[str]) -> None:
    from prism.cli import main

    print("$ prism " + shlex.join(args), flush=True)
    code = main(args)
    if code:
        raise SystemExit(code)


def note(out: Path, command: list[str], extra: str = "") -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "COMMAND.md").write_text(
        "Simulated on the 2-core CPU development machine (no GPU), "
        f"{time.strftime('%Y-%m-%d')}.\n\n    prism {shlex.join(command)}\n\n{extra}")


def profiles_args(args) -> list[str]:
    return [] if args.profiles == "none" else ["--profiles", args.profiles]


TARGETS = (0.99, 0.95)
# Prism with parts of its policy off (docs/simulator.md, "What the simulator found"): a
# migration's drain strands the requests queued at the source; idle eviction makes the next
# request pay a weight copy longer than a 5x-solo TTFT SLO.
VARIANTS = {
    "prism-without-migration": {"migration_threshold": float("inf")},
    "prism-without-migration-or-idle-eviction": {"migration_threshold": float("inf"), "idle_evict_s": float("inf")},
    # Prism's models stepping at their own pace, as the static and muxserve baselines do
    "prism-own-pace": {"pace": "own"},
}


def variant_config(config: Path, name: str) -> Path:
    raw = yaml.safe_load(config.read_text())
    raw.setdefault("scheduler", {}).update(VARIANTS[name])
    path = config.with_name(config.name.replace("-config.yaml", f"-{name}-config.yaml"))
    path.write_text(f"# {config.name} with {VARIANTS[name]} (benchmarks/sim_experiments.py)\n"
                    + yaml.safe_dump(raw, sort_keys=False))
    return path


def chosen_variants(args) -> list[str]:
    if args.no_variants:
        return []
    names = args.variants.split(",") if args.variants else list(VARIANTS)
    unknown = [n for n in names if n not in VARIANTS]
    if unknown:
        raise SystemExit(f"unknown variant(s): {', '.join(unknown)}; known: {', '.join(VARIANTS)}")
    return names


def rel(path: Path) -> str:
    return str(path.relative_to(ROOT))


def run_e1(args) -> None:
    out = RESULTS / f"sim-e1-8models-2gpus{args.suffix}{args.out_suffix}"
    trace, config = inputs(args, "e1")
    commands = []
    variants = chosen_variants(args)
    runs = [(out, config, args.policies.split(","))] + [(out / v, variant_config(config, v), ["prism"]) for v in variants]
    for folder, cfg, policies in runs:
        cmd = ["simulate", "--config", rel(cfg), "--trace", rel(trace), "--policy", ",".join(policies),
               "--rate-scales", args.scales, *profiles_args(args), "--out", rel(folder)]
        prism_cli(cmd)
        commands.append(cmd)
    # The headline: both SLOs met (TTFT and TPOT); TTFT alone beside it.
    kinds = (("slo_attainment", "both SLOs"), ("ttft_attainment", "TTFT"))
    summary = ["| policy | " + " | ".join(f"rate at {t:.0%} {label}" for _, label in kinds for t in TARGETS) + " |",
               "|---|" + "---:|" * (len(TARGETS) * len(kinds))]
    for folder, name in [(out, None)] + [(out / v, v) for v in variants]:
        points = json.loads((folder / "sweep.json").read_text())["points"]
        for system in dict.fromkeys(p["system"] for p in points):
            cells = []
            for key, _ in kinds:
                mine = [(p["rate_rps"], p[key]) for p in points if p["system"] == system]
                cells += [_rate(sustained_rate(mine, t)) for t in TARGETS]
            summary.append(f"| {name or system} | " + " | ".join(cells) + " |")
    (out / "summary.md").write_text("\n".join(summary) + "\n")
    variant_note = ("and, for the prism variants:\n\n" + "".join(f"    prism {shlex.join(c)}\n" for c in commands[1:])
                    + "\n") if variants else ""
    note(out, commands[0], variant_note + "\n".join(summary) + "\n")


def _rate(value) -> str:
    return "none of the rates" if value is None else f"{value:.2f} req/s"


def run_plan(args, tag: str, out_name: str, max_gpus: int) -> None:
    out = RESULTS / f"{out_name}{args.suffix}{args.out_suffix}"
    trace, config = inputs(args, tag)
    lines, commands = [], []
    start = time.perf_counter()
    variants = chosen_variants(args)
    for target in TARGETS:
        folder = out / f"target-{round(100 * target)}"
        runs = [(folder, config, args.policies.split(","))]
        runs += [(folder / v, variant_config(config, v), ["prism"]) for v in variants]
        for where, cfg, policies in runs:
            cmd = ["plan", "--config", rel(cfg), "--trace", rel(trace), "--policies", ",".join(policies),
                   "--max-gpus", str(max_gpus), "--target", str(target), "--no-early-stop", *profiles_args(args),
                   "--out", rel(where)]
            prism_cli(cmd)
            commands.append(cmd)
        for where, name in [(folder, None)] + [(folder / v, v) for v in variants]:
            result = json.loads((where / "plan.json").read_text())
            for system, entry in result["policies"].items():
                by_class = ", ".join(f"{_gpus(n, max_gpus)} for the {_cls(c)}" for c, n in
                                     ((c, entry["by_class"][str(c["gpus"])]) for c in result["classes"]))
                lines.append(f"| {target:.0%} | {name or system} | {_gpus(entry['gpus'], max_gpus)} | {by_class} |")
    table = ["| target | policy | GPUs | by class |", "|---:|---|---:|---|", *lines]
    (out / "summary.md").write_text("\n".join(table) + "\n")
    note(out, commands[0], f"(and the same for each target and for the prism variants; {len(commands)} "
         f"planner runs, {time.perf_counter() - start:.0f} s in all)\n\n" + "\n".join(table) + "\n")


def _gpus(n, cap: int) -> str:
    return f"> {cap}" if n is None else str(n)


def _cls(c: dict) -> str:
    kind = "single GPUs" if c["gpus"] == 1 else f"groups of {c['gpus']}"
    return f"{len(c['models'])} models on {kind}"


def pin_big_models(raw: dict) -> None:
    """A worker loads every model not pinned elsewhere, so a model too big for a single GPU
    must be pinned to a group: the 32B models to the TP-2 groups, the 70B to the TP-4 ones."""
    groups = {2: ["cuda:20", "cuda:21"], 4: ["cuda:22", "cuda:23"]}
    for m in raw["models"]:
        size = 4 if "70b" in m["source"] else 2 if "32b" in m["source"] else None
        if size is not None:
            m["device"] = groups[size].pop(0)


def run_speed(args) -> None:
    """58 models on one cluster of 32 GPUs: 20 single GPUs, two TP-2 groups and two TP-4
    groups (the global scheduler places every model where its weights fit)."""
    from prism.bench.trace import load_trace
    from prism.bench.transforms import scale_rate
    from prism.sim.costs import ProfileSet
    from prism.sim.run import config_for, read_raw_config, simulate

    trace_path, config_path = inputs(args, "e3")
    raw = read_raw_config(config_path)
    raw["devices"] = ([dict(DEVICE, device=f"cuda:{i}") for i in range(20)]
                      + [dict(DEVICE, device=f"cuda:{20 + i}", memory="140GiB", gpus=2) for i in range(2)]
                      + [dict(DEVICE, device=f"cuda:{22 + i}", memory="280GiB", gpus=4) for i in range(2)])
    pin_big_models(raw)
    base = load_trace(trace_path)
    profiles = ProfileSet.load(None if args.profiles == "none" else args.profiles)
    out = RESULTS / f"sim-speed{args.suffix}"
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    for scale, system in ((float(x), s) for x in args.speed_scales.split(",") for s in args.systems.split(",")):
        trace = scale_rate(base, scale, seed=0)
        config = config_for(raw, system)
        start = time.perf_counter()
        result = simulate(config, trace, profiles)
        wall = time.perf_counter() - start
        tokens = sum(r.num_output_tokens or 0 for r in result.records)
        rows.append({"system": system, "scale": scale, "models": len(config.models), "gpus": result.num_gpus,
                     "devices": result.num_devices, "requests": len(trace), "output_tokens": tokens,
                     "simulated_s": round(result.duration_s, 1), "wall_s": round(wall, 1),
                     "events": result.num_events})
        print(rows[-1], flush=True)
    (out / "speed.json").write_text(json.dumps(rows, indent=1))
    lines = ["| system | rate scale | models | GPUs (devices) | requests | output tokens | simulated s | wall s | events |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    lines += [f"| {r['system']} | x{r['scale']:g} | {r['models']} | {r['gpus']} ({r['devices']}) | {r['requests']} | "
              f"{r['output_tokens']} | {r['simulated_s']} | {r['wall_s']} | {r['events']} |" for r in rows]
    (out / "speed.md").write_text("\n".join(lines) + "\n")
    note(out, ["(benchmarks/sim_experiments.py speed)"], "\n".join(lines) + "\n")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("what", choices=["inputs", "e1", "e2", "e3", "speed"])
    p.add_argument("--profiles", default=str(DEFAULT_PROFILES.relative_to(ROOT)),
                   help="profile folder, or 'none' for the H100 roofline")
    p.add_argument("--suffix", default="", help="appended to the input and result names (one set per cost model)")
    p.add_argument("--scales", default="1,2,4,8", help="e1 rate scales")
    p.add_argument("--out-suffix", default="", help="e1-e3: appended to the result folder's name (e.g. a date)")
    p.add_argument("--no-variants", action="store_true", help="e1-e3: skip the prism variants")
    p.add_argument("--variants", default=None, help="e1-e3: the prism variants to run (comma-separated; default all)")
    # Shares of the squeezed busiest day: e2 and e3 replay it whole; e1 sweeps from a quarter.
    p.add_argument("--rate-e1", type=float, default=0.25)
    p.add_argument("--rate-e2", type=float, default=1.0)
    p.add_argument("--rate-e3", type=float, default=1.0)
    p.add_argument("--policies", default=",".join(ALL_SYSTEMS), help="e1-e3: the systems to run")
    p.add_argument("--systems", default="prism,static,muxserve,swap", help="speed: systems to time")
    p.add_argument("--speed-scales", default="1,4", help="speed: rate scales of the e3 trace")
    args = p.parse_args(argv)
    if args.what == "inputs":
        from prism.sim.costs import ProfileSet

        profiles = ProfileSet.load(None if args.profiles == "none" else ROOT / args.profiles)
        for tag, zoo, rate, n in (("e1", ZOO_8, args.rate_e1, 2), ("e2", ZOO_18, args.rate_e2, 1),
                                  ("e3", ZOO_58, args.rate_e3, 1)):
            trace_path, config_path = write_inputs(tag + args.suffix, zoo, rate, profiles, n)
            print(f"wrote {trace_path.relative_to(ROOT)} and {config_path.relative_to(ROOT)}")
    elif args.what == "e1":
        run_e1(args)
    elif args.what == "e2":
        run_plan(args, "e2", "sim-e2-18models", 8)
    elif args.what == "e3":
        run_plan(args, "e3", "sim-e3-58models", 32)
    else:
        run_speed(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
