"""A migration moves a busy model without stranding the requests queued at its source."""
from prism.bench.trace import TraceRequest
from prism.sched.placement import Migrate
from prism.sim.cluster import SimCluster
from prism.sim.costs import ProfileSet
from prism.sim.run import config_for

RAW = {
    "devices": [{"device": "cuda:0", "memory": "24GiB"}, {"device": "cuda:1", "memory": "24GiB"}],
    "models": [{"name": f"m{i}", "source": "llama-3.2-1b:random", "rate": r, "ttft_slo_ms": 500,
                "tpot_slo_ms": 100} for i, r in enumerate([4, 3, 2, 1])],
    "scheduler": {"placement_period_s": 2, "migration_threshold": 0.1, "migration_cooldown_s": 1000},
}
# The initial placement puts m0 and m2 together on cuda:0; both get busy at once, so the first
# periodic pass (0.5 s) moves one of them while its long requests run and new ones keep coming.
TRACE = [TraceRequest(0.1 * i, m, 256, 2000) for i in range(100) for m in ("m0", "m2")]


def test_requests_queued_at_a_migration_source_are_not_stranded():
    cluster = SimCluster(config_for(RAW, "prism"), ProfileSet({}, {}))
    moves = []
    carry_out = cluster.control.carry_out
    cluster.control.carry_out = lambda actions, now: (moves.extend(actions), carry_out(actions, now))
    records = cluster.run(TRACE)
    busy_moves = [a for a in moves if isinstance(a, Migrate) and a.model_id in ("m0", "m2")]
    assert busy_moves, "the scenario must migrate a busy model"
    move = busy_moves[0]
    assert all(r.ok for r in records)
    # Before the fix: requests routed to the draining source waited for its running ones
    # (about 4.5 s) and the source activated the model again to serve them.
    worst = max(r.token_s[0] - r.send_s for r in records)
    assert worst < 0.5, worst
    source = cluster.devices[move.from_device].device
    assert source.counters.activations[move.model_id] == 0
    assert not source.engines[move.model_id].resident  # it left once its requests were done
