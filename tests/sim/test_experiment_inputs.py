"""benchmarks/sim_experiments.py's SLOs: 5x each model's latency served alone, with the host
time of the profiles' host.yaml in it when there is one (as a deployment would measure it)."""
import sys
from pathlib import Path

import pytest

from prism.bench.trace import TraceRequest
from prism.sim.costs import HostOverheads, ProfileSet

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))

import sim_experiments  # noqa: E402


def test_solo_slos_carry_the_host_time_of_one_request_served_alone():
    models = [("small", "llama-3.2-1b"), ("big", "llama-3.1-8b")]
    trace = [TraceRequest(0.0, "small", 500, 100), TraceRequest(1.0, "big", 700, 300)]
    bare = sim_experiments.solo_slos(models, trace, ProfileSet({}, {}))
    host = HostOverheads(step_s=0.4e-3, request_s=6e-3, seq_s=40e-6)
    hosted = sim_experiments.solo_slos(models, trace, ProfileSet({}, {}, host))
    step_ms = 1e3 * host.step_time(1)
    for name, _ in models:
        assert hosted[name][0] - bare[name][0] == pytest.approx(5 * (6.0 + step_ms), abs=0.11)  # rounded to 0.1 ms
        assert hosted[name][1] - bare[name][1] == pytest.approx(5 * step_ms, abs=0.11)
    assert bare["big"][0] > bare["small"][0] and bare["big"][1] > bare["small"][1]
