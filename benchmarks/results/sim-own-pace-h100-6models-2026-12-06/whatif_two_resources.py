"""A what-if, not the house's rule: prism simulate with SharedChip counting a step's use per
resource (bandwidth, matmul), the slowdown the larger of the two sums, instead of one budget of
floors. Patches prism.sched.concurrency / prism.sim.executor in this process only; arguments as
prism simulate's (README.md beside it)."""
import math
import sys

from prism.cli import main
from prism.sched import concurrency as c
from prism.sim import executor as ex

def launch(self, plan, after):
    device_s = self._device_seconds(plan)
    r = self.chip.turn.rates
    terms = plan.cost_terms()
    moved = (self.shape.weight_bytes + self.shape.kv_bytes_per_token * terms[1]) / r.memory_bytes_per_s
    computed = 2 * (self.shape.weight_bytes / 2) * plan.num_tokens / r.flops_per_s
    step = self.chip.launch(self.clock.now(), self.host.step_time(len(plan.chunks)), device_s, max(moved, computed))
    if device_s > 0:
        step.uses = (min(moved, device_s) / device_s, min(computed, device_s) / device_s)
    project(self.chip)
    self.last_launched = ex.SimStep(step, tuple(x.seq for x in plan.chunks if x.samples))
    return self.last_launched
ex.SimExecutor.launch = launch

def _share(steps, t, until):
    while t < until:
        on = [s for s in steps if s.work > 0 and s.starts <= t]
        pending = [s.starts for s in steps if s.work > 0 and s.starts > t]
        if not on and not pending:
            return
        u = [getattr(s, "uses", (s.use, s.use)) for s in on]
        slow = max(1.0, sum(a for a, _ in u), sum(b for _, b in u))
        ends = {id(s): t + s.work * slow for s in on}
        ev = min([*ends.values(), *pending, until])
        for s in on:
            if ends[id(s)] <= ev:
                s.work, s.done = 0.0, ends[id(s)]
            else:
                s.work -= (ev - t) / slow
        t = ev
c._share = _share
def chip_launch(self, now, host_s, alone_s, floor, uses=None):
    c._share(self._steps, self._t, now)
    self._t = max(self._t, now)
    self._steps = [s for s in self._steps if s.work > 0]
    if alone_s <= 0:
        return c.ChipStep(now + host_s, 0.0, 0.0, now + host_s)
    step = c.ChipStep(now + host_s, alone_s, min(max(floor, 0.0), alone_s) / alone_s)
    self._steps.append(step)
    return step
def project(self):
    future = []
    for s in self._steps:
        f = c.ChipStep(s.starts, s.work, s.use)
        if hasattr(s, "uses"):
            f.uses = s.uses
        future.append(f)
    c._share(future, self._t, math.inf)
    for s, f in zip(self._steps, future):
        s.done = f.done
c.SharedChip.launch = chip_launch
sys.exit(main())
