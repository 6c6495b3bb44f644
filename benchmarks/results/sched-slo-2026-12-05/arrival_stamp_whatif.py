"""What-if (not in the code): the device plans each request's TTFT deadline from when the
frontend received it (as if AddRequest carried that time), not from when the device read it.
Prism's attainment on one simulated input, with and without.

    PYTHONPATH=. python benchmarks/results/sched-slo-2026-12-05/arrival_stamp_whatif.py CONFIG TRACE PROFILES SCALE {0|1}
"""
import sys
from pathlib import Path

from prism.bench.report import summarize
from prism.bench.trace import load_trace
from prism.bench.transforms import scale_rate
from prism.cluster.config import slos_from_config
from prism.engine.core import EngineCore
from prism.sim.cluster import SimCluster
from prism.sim.costs import ProfileSet
from prism.sim.run import config_for, read_raw_config, simulate

config, trace_path, profiles, scale, stamp = sys.argv[1], sys.argv[2], sys.argv[3], float(sys.argv[4]), sys.argv[5] == "1"
received = {}  # req_id -> when the frontend routed it (the simulator's frontend clock)
arrive, add_request = SimCluster._arrive, EngineCore.add_request


def arrive_stamped(self, index, r):
    received[str(index)] = self.now
    return arrive(self, index, r)


def add_stamped(self, prompt, params, req_id=None, arrival_time=None, *args, **kwargs):
    if stamp and req_id in received:
        arrival_time = received[req_id]
    return add_request(self, prompt, params, req_id, arrival_time, *args, **kwargs)


SimCluster._arrive, EngineCore.add_request = arrive_stamped, add_stamped
trace = load_trace(trace_path)
if scale != 1:
    trace = scale_rate(trace, scale)
result = simulate(config_for(read_raw_config(config), "prism"), trace, ProfileSet.load(profiles))
o = summarize(result.records, slos_from_config(Path(config)), 1.0)["overall"]
print(f"{Path(config).stem} {Path(profiles).name} x{scale:g} stamp={int(stamp)}: both {o['slo_attainment']:.1%} "
      f"TTFT {o['ttft_attainment']:.1%} TPOT {o['tpot_attainment']:.1%}")
