"""What node boundaries cost: E3 (58 models, 32 GPUs) as 4 nodes of 8 GPUs vs one pool of 32,
on the simulator (CPU only).

    python benchmarks/sim_nodes.py [--scales 1,2] [--budgets 256GiB,128GiB] [--controls nodes]
                                   [--append] [--out DIR]

The same inputs as E3 (benchmarks/sim-inputs/e3-*: the trace, the models and their SLOs) and
the GPUs of `sim_experiments.py speed`: 20 single GPUs, two TP-2 and two TP-4 groups. One
pool: every GPU on one node whose host memory for weight copies is the four nodes' budgets
together. Four nodes: n0 and n1 hold 8 single GPUs each, n2 the last 4 singles and the two
TP-2 groups, n3 the two TP-4 groups; each node has its own budget and its own copies, so a
model that comes back on a node without its copy reads storage first (a cold load). "nodes,
no budget" keeps every copy everywhere: what remains is the tie-breaks that device names
change (a control for the noise; "1 pool, no budget" likewise). Each run is prism's policy at
one rate scale of the trace. --blind: the same budgets, with a global scheduler that does not
see where the copies are (what preferring the node with the copy saves). Writes nodes.json,
nodes.md and COMMAND.md (--append: adds to the rows and commands already there).
"""
from __future__ import annotations

import argparse
import json
import math
import shlex
import sys
import time
from pathlib import Path

from prism.bench.report import SLOTargets, summarize
from prism.bench.trace import load_trace
from prism.bench.transforms import scale_rate
from prism.config import parse_size
from prism.sched.global_view import TransferRates
from prism.sim import cluster as sim_cluster
from prism.sim.costs import ProfileSet
from prism.sim.run import config_for, read_raw_config, simulate

ROOT = Path(__file__).resolve().parent.parent
INPUTS = ROOT / "benchmarks" / "sim-inputs"
DEVICE = {"device": "cuda:0", "memory": "70GiB"}
# (device, GPUs) in order; node n0: cuda:0-7, n1: cuda:8-15, n2: cuda:16-21, n3: cuda:22-23
GPUS = [(f"cuda:{i}", 1) for i in range(20)] + [("cuda:20", 2), ("cuda:21", 2), ("cuda:22", 4), ("cuda:23", 4)]
NODE_OF = {**{f"cuda:{i}": "n0" for i in range(8)}, **{f"cuda:{i}": "n1" for i in range(8, 16)},
           **{f"cuda:{i}": "n2" for i in range(16, 22)}, "cuda:22": "n3", "cuda:23": "n3"}


def devices(node_of) -> list[dict]:
    out = []
    for dev, gpus in GPUS:
        entry = dict(DEVICE, device=dev, node=node_of(dev))
        if gpus > 1:
            entry.update(memory=f"{70 * gpus}GiB", gpus=gpus)
        out.append(entry)
    return out


def layout(raw: dict, kind: str, budget: str | None) -> dict:
    """E3's config on one pool or four nodes, the big models pinned to their TP groups."""
    raw = json.loads(json.dumps(raw))
    if kind == "pool":
        pool_budget = None if budget is None else f"{4 * parse_size(budget) // 2**30}GiB"
        raw["devices"] = devices(lambda d: "pool")
        raw["nodes"] = [{"name": "pool", "host_memory": pool_budget}]
    else:
        raw["devices"] = devices(NODE_OF.__getitem__)
        raw["nodes"] = [{"name": n, "host_memory": budget} for n in ("n0", "n1", "n2", "n3")]
    for n in raw["nodes"]:
        if n["host_memory"] is None:
            del n["host_memory"]
    groups = {2: ["cuda:20", "cuda:21"], 4: ["cuda:22", "cuda:23"]}
    for m in raw["models"]:
        size = 4 if "70b" in m["source"] else 2 if "32b" in m["source"] else None
        if size is not None:
            dev = groups[size].pop(0)
            m["device"] = f"{'pool' if kind == 'pool' else NODE_OF[dev]}/{dev}"
    return raw


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--scales", default="1,2", help="rate scales of the E3 trace")
    p.add_argument("--budgets", default="256GiB,128GiB", help="host memory per node for weight copies")
    p.add_argument("--controls", default="nodes", help="layouts to run without a budget: nodes, pool, both or none")
    p.add_argument("--append", action="store_true", help="add to the results already in --out")
    p.add_argument("--blind", action="store_true",
                   help="the global scheduler does not see where copies are (what the preference saves)")
    p.add_argument("--inputs", default="e3", help="the inputs tag: e3, or e3-host (SLOs with host time)")
    p.add_argument("--profiles", default="benchmarks/profiles/nvidia-h100",
                   help="the profiles (with e3-host: benchmarks/profiles/nvidia-h100-host)")
    p.add_argument("--out", default="benchmarks/results/sim-e3-nodes-2026-12-05")
    args = p.parse_args(argv)
    out = ROOT / args.out
    out.mkdir(parents=True, exist_ok=True)
    raw = read_raw_config(INPUTS / f"{args.inputs}-config.yaml")
    base = load_trace(INPUTS / f"{args.inputs}-trace.jsonl")
    profiles = ProfileSet.load(ROOT / args.profiles)
    slos = {m["name"]: SLOTargets(m["ttft_slo_ms"] / 1e3, m["tpot_slo_ms"] / 1e3) for m in raw["models"]}
    controls = {"nodes": ["nodes"], "pool": ["pool"], "both": ["pool", "nodes"], "none": []}[args.controls]
    cases = [("1 pool, no budget" if kind == "pool" else "4 nodes, no budget", kind, None) for kind in controls]
    for budget in args.budgets.split(","):
        cases += [(f"1 pool, 4 x {budget}", "pool", budget), (f"4 nodes, {budget} each", "nodes", budget)]
    if args.blind:
        # The view prices a storage read at nothing, so every device's activation costs the
        # same and the choice is the landing key's, wherever the copies are; the simulated
        # devices still pay for the read.
        sim_cluster.TransferRates = lambda h2d, storage: TransferRates(h2d, math.inf)
        cases = [(f"{name}, blind to copies", kind, budget) for name, kind, budget in cases if budget and kind == "nodes"]
    command = "python benchmarks/sim_nodes.py " + shlex.join(argv if argv is not None else sys.argv[1:])
    rows, commands = [], [command]
    if args.append and (out / "nodes.json").is_file():
        rows = json.loads((out / "nodes.json").read_text())
        commands = json.loads((out / "commands.json").read_text()) + commands
    (out / "commands.json").write_text(json.dumps(commands, indent=1) + "\n")
    for scale in (float(x) for x in args.scales.split(",")):
        trace = scale_rate(base, scale, seed=0)
        for name, kind, budget in cases:
            config = config_for(layout(raw, kind, budget), "prism")
            start = time.perf_counter()
            result = simulate(config, trace, profiles)
            overall = summarize(result.records, slos, max(result.duration_s, 1e-9))["overall"]
            rows.append({"layout": name, "scale": scale, "requests": len(trace),
                         "slo_attainment": overall["slo_attainment"], "ttft_attainment": overall["ttft_attainment"],
                         "tpot_attainment": overall["tpot_attainment"], "ttft_p99_s": overall["ttft_s"]["p99"],
                         "activations": result.num_activations, "cold_loads": result.num_storage_reads,
                         "wall_s": round(time.perf_counter() - start, 1)})
            print(rows[-1], flush=True)
            (out / "nodes.json").write_text(json.dumps(rows, indent=1) + "\n")
    lines = ["| layout | rate scale | requests | both SLOs | TTFT | TPOT | TTFT p99 | activations | cold loads |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    lines += [f"| {r['layout']} | x{r['scale']:g} | {r['requests']} | {r['slo_attainment']:.1%} | "
              f"{r['ttft_attainment']:.1%} | {r['tpot_attainment']:.1%} | {r['ttft_p99_s']:.2f} s | "
              f"{r['activations']} | {r['cold_loads']} |" for r in sorted(rows, key=lambda r: r["scale"])]
    (out / "nodes.md").write_text("\n".join(lines) + "\n")
    (out / "COMMAND.md").write_text(
        f"Simulated on the 2-core CPU development machine (no GPU), {time.strftime('%Y-%m-%d')}.\n\n"
        + "".join(f"    {c}\n" for c in commands) + "\n"
        "Activations count the start's initial placement too; a cold load is an activation on a node\n"
        "that held no host copy of the model (a read from storage before the copy in).\n\n" + "\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
