"""What muxserve's attainment in E1 comes from (README.md): muxserve with one of its parts
swapped out, on the E1 host inputs at the given rate scales.

    PYTHONPATH=. python benchmarks/results/sim-e1-8models-2gpus-host-2026-12-05/muxserve_variants.py VARIANT 1,2

VARIANT: `kvpr` (prism's KVPR placement instead of MuxServe's greedy), `turns` (no prefill and
decode phases: every model with work takes its turn; quotas kept), `noquota` (no KV quotas),
`as-is`. Prints both-SLO, TTFT and TPOT attainment per scale, and the placement.
"""
import dataclasses
import sys

from prism.bench.report import summarize
from prism.bench.trace import load_trace
from prism.bench.transforms import scale_rate
from prism.cluster import systems
from prism.cluster.config import slos_from_config
from prism.sched import adbs
from prism.sim.cluster import SimCluster
from prism.sim.costs import ProfileSet
from prism.sim.run import config_for, read_raw_config

CONFIG = "benchmarks/sim-inputs/e1-host-config.yaml"
TRACE = "benchmarks/sim-inputs/e1-host-trace.jsonl"
PROFILES = "benchmarks/profiles/nvidia-h100-host"


def patch(variant: str) -> None:
    original = adbs.Adbs.plan
    if variant == "kvpr":
        spec = systems.SYSTEMS[systems.System.MUXSERVE]
        systems.SYSTEMS[systems.System.MUXSERVE] = dataclasses.replace(spec, placement="kvpr")
    elif variant == "noquota":
        def plan(self, view, runnable):
            p = original(self, view, runnable)
            return adbs.AdbsPlan(p.quotas, (), p.run_model)
        adbs.Adbs.plan = plan
    elif variant == "turns":
        def plan(self, view, runnable):
            p = original(self, view, runnable)
            by_model = {}
            for r in view.requests:
                by_model.setdefault(r.model_id, []).append(r)
            candidates = [m for m in by_model if m in runnable]
            run = adbs._round_robin(view, candidates, by_model) if candidates else None
            return adbs.AdbsPlan(p.quotas, p.over_quota, run)
        adbs.Adbs.plan = plan


def main(variant: str, scales: str) -> None:
    patch(variant)
    raw, slos = read_raw_config(CONFIG), slos_from_config(CONFIG)
    base, profiles = load_trace(TRACE), ProfileSet.load(PROFILES)
    duration = max(r.arrival_s for r in base)
    for scale in map(float, scales.split(",")):
        cluster = SimCluster(config_for(raw, "muxserve"), profiles)
        records = cluster.run(scale_rate(base, scale, seed=0))
        o = summarize(records, slos, duration)["overall"]
        print(f"{variant} x{scale:g}: both {o['slo_attainment']:.1%}, TTFT {o['ttft_attainment']:.1%}, "
              f"TPOT {o['tpot_attainment']:.1%}", flush=True)
        print("  placement:", dict(sorted((m, d) for m, ds in cluster.control.residency().items() for d in ds)))


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2] if len(sys.argv) > 2 else "1")
