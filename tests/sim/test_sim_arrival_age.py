"""The simulated frontend sends each request with its age, as the server's does: the device
dates it from its arrival at the frontend, not from when it read it (after the hop and the
rest of the step it came during)."""
import pytest

from prism.bench.trace import TraceRequest
from prism.sim.cluster import SimCluster
from prism.sim.costs import HostOverheads, ProfileSet
from prism.sim.run import config_for

HOP_S = 0.02


def raw() -> dict:
    return {
        "devices": [{"device": "cuda:0", "memory": "80GiB"}],
        "models": [{"name": "m", "source": "llama-3.1-8b:random", "rate": 1}],
    }


# A long prompt first: the short ones come while its step runs and wait for its end.
TRACE = [TraceRequest(0.0, "m", 4000, 4)] + [TraceRequest(0.005 + 0.003 * i, "m", 64, 4) for i in range(10)]


def device_side(system: str) -> tuple[SimCluster, list, dict[str, dict]]:
    """The run's records, and each request's metrics as its device recorded them."""
    cluster = SimCluster(config_for(raw(), system), ProfileSet({}, {}, HostOverheads(request_s=HOP_S)))
    metrics = {}
    finish = cluster._finish

    def keep(out):
        metrics[out.req_id] = out.metrics
        finish(out)

    cluster._finish = keep
    return cluster, cluster.run(TRACE), metrics


@pytest.mark.parametrize("system", ["prism", "static"])
def test_the_device_dates_a_request_from_its_trace_arrival(system):
    cluster, records, metrics = device_side(system)
    assert len(metrics) == len(TRACE) and not any(r.error for r in records)
    for rec in records:
        m = metrics[str(rec.index)]
        assert m["arrival_time"] == pytest.approx(cluster.t0 + rec.arrival_s, abs=1e-9)
        # So the device's own TTFT is the client's (tokens take no time back in the simulator).
        assert m["ttft"] == pytest.approx(rec.ttft, abs=1e-9)
    # The short ones did wait for the long prefill: read after their hop, dated before it.
    waited = [metrics[str(r.index)] for r in records if r.input_len == 64]
    assert all(m["admitted_time"] - m["arrival_time"] > HOP_S for m in waited)
