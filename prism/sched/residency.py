"""Which models a device evicts and activates this step (shared by every local policy).

Rules, in order:
1. Idle eviction, `idle_evict: always` (the old rule): a resident model with no requests
   (waiting or running), unused for at least `idle_evict_s`, goes; its pages (weights and KV)
   count as free for what follows. Under `idle_evict: pressure` (the default) nothing goes
   here: an eviction nobody needs the memory of only makes the model's next request pay the
   weight copy (0.1-0.7 s, several TTFT SLOs).
2. Activation, one model at a time in demand order (the model of the earliest request in the
   admission order first): a non-resident, not-yet-activating model with waiting requests is
   activated if its weights plus `kv_headroom_pages` fit in the free pages. If not, resident
   models with no requests, idle at least `swap_idle_s`, are evicted least recently used first
   until it fits; if even all of them would not make room, nothing is evicted for it and it
   waits (a later, smaller model may still fit). Models with requests are never evicted.
   An activation reserves its weights and its headroom, so two activations in one decision
   never promise each other the same pages.
3. KV pressure (`idle_evict: pressure`): when the device's requests need more KV pages to
   run to their full length (prompt + max_tokens) than are free after the activations,
   models with no requests idle at least `idle_evict_s` go, longest idle first, until the
   need is covered (or none is left): their memory is wanted, and the alternative is
   preempting (recomputing) running requests.
"""
from __future__ import annotations

import math
from collections import Counter
from collections.abc import Iterable
from typing import Literal

from prism.sched.view import DeviceView, ModelView

IDLE_EVICT_MODES = ("pressure", "always")
IdleEvict = Literal[IDLE_EVICT_MODES]
# Shared by the local and the global scheduler's config (one knob each in YAML: idle_evict_s, idle_evict)
IDLE_EVICT_S = 45.0
IDLE_EVICT = "pressure"


def model_pages(m: ModelView) -> int:
    """Pages an eviction of `m` gives back."""
    return m.weight_pages + m.kv_pages


def kv_pages_wanted(view: DeviceView) -> int:
    """KV pages the device's requests still need, beyond what their models hold, to reach
    their full length (prompt + max_tokens): the memory the work already here will ask for."""
    tokens: Counter = Counter()
    for r in view.requests:
        tokens[r.model_id] += r.num_prompt_tokens + r.max_tokens
    return sum(
        max(0, math.ceil(tokens[m.model_id] * m.kv_pages_per_token) - m.kv_pages)
        for m in view.models if tokens[m.model_id]
    )


def plan_residency(
    view: DeviceView,
    demand_order: Iterable[str],
    *,
    idle_evict_s: float,
    swap_idle_s: float,
    kv_headroom_pages: int,
    idle_evict: str = "pressure",
) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """Return (evict, activate) model ids. `demand_order`: model ids of waiting requests in
    admission order (repeats are fine; the first occurrence ranks a model). `idle_evict`: one
    of IDLE_EVICT_MODES (validated by the scheduler's config)."""
    busy = {r.model_id for r in view.requests}
    # Activating models are mid-copy: neither evicted nor activated again. Longest idle first.
    idle = sorted(
        (m for m in view.models if m.resident and not m.activating and m.model_id not in busy),
        key=lambda m: (m.last_used, m.model_id),
    )
    evict = [m for m in idle if idle_evict == "always" and view.now - m.last_used >= idle_evict_s]
    free = view.free_pages + sum(model_pages(m) for m in evict)
    swappable = [m for m in idle if m not in evict and view.now - m.last_used >= swap_idle_s]
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
    long_idle = [m for m in swappable if view.now - m.last_used >= idle_evict_s]
    if idle_evict == "pressure" and long_idle:  # (the demand is summed only when it matters)
        evict += _make_kv_room(long_idle, kv_pages_wanted(view) - free)
    return tuple(m.model_id for m in evict), tuple(activate)


def _make_kv_room(candidates: list[ModelView], short_pages: int) -> list[ModelView]:
    """The first of `candidates` (longest idle first) whose pages cover `short_pages`."""
    victims: list[ModelView] = []
    for m in candidates:
        if short_pages <= 0:
            break
        victims.append(m)
        short_pages -= model_pages(m)
    return victims
