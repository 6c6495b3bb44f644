"""MuxServe's adaptive batch scheduling (ADBS), the `adbs` local policy of the `muxserve` system.

From MuxServe (Duan et al., ICML 2024, section 3.3) and its scheduler
(github.com/hao-ai-lab/MuxServe, muxserve/muxsched/scheduler.py): the models co-located on a
device share one KV pool, but each gets a quota of it in proportion to its request rate x its
KV bytes per token (`init_max_num_seqs`); a model admits new requests (a prefill job) only
while it is within its quota (`can_schedule_prefill`); prefill jobs go first, round-robin over
the models, and the decode jobs of the models share the device in turn; the quotas are adapted
at run time: what under-used models leave of theirs goes to models with a backlog
(`adapt_max_num_seqs`).

Here, where a device runs one model's step at a time:
- quota(m) = KV pages of the pool (budget - resident weights) x rate(m) x kv_bytes_per_token(m)
  / the sum over the resident models; rate = requests/s reaching the device over the rate
  window (`DeviceView.request_rates`), at least one request per window, so a model never
  measured still has a share;
- adapted: the pages that models with nothing waiting leave unused of their quota are lent
  to the models with waiting requests, in proportion to their quotas (at once, where MuxServe
  moves a tenth per period);
- a model at or over its quota admits nothing new (`StepDecision.drain`) until its running
  requests free pages; a model with nothing running always may (no quota deadlock);
- steps alternate between a prefill phase (models with an admissible waiting request or a
  prefill chunk under way) and a decode phase (models with running decodes) whenever both
  have work (MuxServe's `switch_phase`); within a phase the model whose last step is oldest
  runs (round-robin). A prefill thus never waits for more than one decode step.
Pure policy: no torch, no I/O.
"""
from __future__ import annotations

from dataclasses import dataclass

from prism.sched.view import DeviceView, ModelView, RequestView


@dataclass(frozen=True)
class AdbsPlan:
    quotas: dict[str, int]  # model -> KV pages it may hold before it stops admitting
    over_quota: tuple[str, ...]  # models that admit nothing new for now
    run_model: str | None


def kv_quotas(view: DeviceView, rate_window_s: float) -> dict[str, int]:
    """Each resident model's KV quota in pages, adapted to who has work waiting."""
    resident = [m for m in view.models if m.resident]
    if not resident:
        return {}
    pool = max(0, view.budget_pages - sum(m.weight_pages for m in resident))
    floor = 1.0 / rate_window_s
    demand = {m.model_id: max(view.request_rates.get(m.model_id, 0.0), floor) * max(m.kv_pages_per_token, 1e-12)
              for m in resident}
    total = sum(demand.values())
    base = {m: pool * d / total for m, d in demand.items()}
    waiting = {r.model_id for r in view.requests if not r.running}
    used = {m.model_id: m.kv_pages for m in resident}
    spare = sum(max(0.0, base[m] - used[m]) for m in base if m not in waiting)
    busy = sum(base[m] for m in base if m in waiting)
    return {m: int(q + (spare * q / busy if m in waiting and busy > 0 else 0.0)) for m, q in base.items()}


class Adbs:
    """The policy's one piece of state: which phase ran last."""

    def __init__(self, rate_window_s: float) -> None:
        self.rate_window_s = rate_window_s
        self.last_phase = "decode"

    def plan(self, view: DeviceView, runnable: frozenset[str]) -> AdbsPlan:
        quotas = kv_quotas(view, self.rate_window_s)
        by_model: dict[str, list[RequestView]] = {}
        for r in view.requests:
            by_model.setdefault(r.model_id, []).append(r)
        over = tuple(sorted(m for m, q in quotas.items()
                            if view.model(m).kv_pages >= q and any(r.running for r in by_model.get(m, ()))))
        prefill, decode = [], []
        for m, reqs in by_model.items():
            if m not in runnable:
                continue
            if any(r.running and not r.has_first_token for r in reqs) or (
                    m not in over and any(not r.running for r in reqs)):
                prefill.append(m)
            if any(r.running and r.has_first_token for r in reqs):
                decode.append(m)
        phase = "prefill" if prefill and (self.last_phase == "decode" or not decode) else "decode"
        candidates = prefill if phase == "prefill" else decode
        if not candidates:  # only waiting work over its quota: it runs what it holds
            candidates = [m for m in by_model if m in runnable]
        if not candidates:
            return AdbsPlan(quotas, over, None)
        self.last_phase = phase
        return AdbsPlan(quotas, over, _round_robin(view, candidates, by_model))


def _round_robin(view: DeviceView, candidates: list[str], by_model: dict[str, list[RequestView]]) -> str:
    """The candidate whose last step is oldest; ties: the earliest-arrived request's model."""
    models: dict[str, ModelView] = {m.model_id: m for m in view.models}
    return min(candidates, key=lambda m: (models[m].last_step, min(r.arrival for r in by_model[m]), m))


__all__ = ["Adbs", "AdbsPlan", "kv_quotas"]
