"""Which models a device evicts and activates this step (shared by every local policy).

Rules, in order:
1. Idle eviction: a resident model with no requests (waiting or running), unused for at least
   `idle_evict_s`, goes; its pages (weights and KV) count as free for what follows.
2. Activation, one model at a time in demand order (the model of the earliest request in the
   admission order first): a non-resident, not-yet-activating model with waiting requests is
   activated if its weights plus `kv_headroom_pages` fit in the free pages. If not, resident
   models with no requests, idle at least `swap_idle_s`, are evicted least recently used first
   until it fits; if even all of them would not make room, nothing is evicted for it and it
   waits (a later, smaller model may still fit). Models with requests are never evicted.
   An activation reserves its weights and its headroom, so two activations in one decision
   never promise each other the same pages.
"""
from __future__ import annotations

from collections.abc import Iterable

from prism.sched.view import DeviceView, ModelView


def model_pages(m: ModelView) -> int:
    """Pages an eviction of `m` gives back."""
    return m.weight_pages + m.kv_pages


def plan_residency(
    view: DeviceView,
    demand_order: Iterable[str],
    *,
    idle_evict_s: float,
    swap_idle_s: float,
    kv_headroom_pages: int,
) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """Return (evict, activate) model ids. `demand_order`: model ids of waiting requests in
    admission order (repeats are fine; the first occurrence ranks a model)."""
    busy = {r.model_id for r in view.requests}
    # Activating models are mid-copy: neither evicted nor activated again.
    idle = [m for m in view.models if m.resident and not m.activating and m.model_id not in busy]
    evict = [m for m in idle if view.now - m.last_used >= idle_evict_s]
    free = view.free_pages + sum(model_pages(m) for m in evict)
    swappable = sorted(
        (m for m in idle if m not in evict and view.now - m.last_used >= swap_idle_s),
        key=lambda m: (m.last_used, m.model_id),
    )
    models = {m.model_id: m for m in view.models}
    activate: list[str] = []
    for model_id in dict.fromkeys(demand_order):
        m = models.get(model_id)
        if m is None or m.resident or m.activating:
            continue  # unknown here (the global scheduler places it), or already on its way
        need = m.weight_pages + kv_headroom_pages
        if free + sum(model_pages(s) for s in swappable) < need:
            continue
        while free < need:
            victim = swappable.pop(0)
            evict.append(victim)
            free += model_pages(victim)
        activate.append(model_id)
        free -= need
    return tuple(m.model_id for m in evict), tuple(activate)
