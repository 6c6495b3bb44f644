"""Where prism's TTFT misses come from, on one simulated input: each miss classified by the
device's own timeline (diagnostic; wraps DeviceCore._step_model to see each step).

    PYTHONPATH=. python benchmarks/results/sched-slo-2026-12-05/ttft_miss_causes.py CONFIG TRACE PROFILES SCALE [-v]

- "device on time": by the device's clock (arrival = when the device read the request) the
  first token came within the TTFT SLO; the miss is the time before the device saw the request
  (the frontend's hop, and the step the device was busy with when the request came);
- "started late by plan": when its prefill began, the plan already had it late;
- "estimate short": planned on time, but the prefill ran longer than the policy's estimate;
- "other": none of the above.
"""
import sys
from collections import Counter, defaultdict
from pathlib import Path

from prism.bench.trace import load_trace
from prism.bench.transforms import scale_rate
from prism.cluster.config import slos_from_config
from prism.sim.costs import ProfileSet
from prism.sim.run import config_for, read_raw_config, simulate
from prism.worker.device_core import DeviceCore

config, trace_path, profiles, scale = sys.argv[1], sys.argv[2], sys.argv[3], float(sys.argv[4])
verbose = "-v" in sys.argv[5:]
steps = defaultdict(list)  # req_id -> [(start, end, chunk start, the policy's prefill estimate then)]
arrival = {}
inner = DeviceCore._step_model


def step_model(self, model_id, *args):
    start = self.clock.now()
    predicted = {s.req_id: self.cost.prefill_time(model_id, s.num_tokens - s.num_computed_tokens)
                 for s in self.engines[model_id].sequences() if s.num_tokens - s.num_computed_tokens > 1}
    out = inner(self, model_id, *args)
    plan = self.engines[model_id].last_plan
    if plan is not None and not plan.is_empty:
        for c in plan.chunks:
            steps[c.seq.req_id].append((start, self.clock.now(), c.start, predicted.get(c.seq.req_id)))
            arrival[c.seq.req_id] = c.seq.arrival_time
    return out


DeviceCore._step_model = step_model
trace = load_trace(trace_path)
if scale != 1:
    trace = scale_rate(trace, scale)
records = simulate(config_for(read_raw_config(config), "prism"), trace, ProfileSet.load(profiles)).records
slos = slos_from_config(Path(config))
kinds = Counter()
for r in records:
    slo = slos[r.model].ttft_s
    if not r.ok or r.ttft is None or r.ttft <= slo:
        continue
    rid = str(r.index)
    prefill = [s for s in steps[rid] if s[2] < r.input_len] or steps[rid][:1]
    offset = prefill[-1][1] - r.token_s[0]  # the device's clock minus the records' clock
    sent, seen = offset + r.send_s, arrival[rid]
    start, done, predicted = prefill[0][0], prefill[-1][1], prefill[0][3] or 0.0
    planned_slack = seen + slo - start - predicted
    if done <= seen + slo:
        kind = "device on time (time before the device saw it)"
    elif planned_slack < 0:
        kind = "started late by plan"
    elif done - start > predicted:
        kind = "estimate short"
    else:
        kind = "other"
    kinds[kind] += 1
    if verbose:
        print(f"{rid:>5} {r.model:16} in={r.input_len:5} {r.ttft / slo:.3f}x SLO | seen {1e3 * (seen - sent):5.1f} ms "
              f"after sent | planned slack {1e3 * planned_slack:7.1f} | estimate {1e3 * predicted:6.1f} "
              f"ran {1e3 * (done - start):6.1f} ms in {len(prefill)} step(s) | {kind}")
print(f"{Path(config).stem} {Path(profiles).name} x{scale:g}: {sum(kinds.values())} TTFT misses: {dict(kinds)}")
