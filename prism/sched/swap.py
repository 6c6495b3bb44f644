"""Residency for the `swap` baseline: time-sharing only, served in arrival groups.

At most `max_resident` models are on the device. The models that should be there are those
owning the oldest requests (first come, first served, by each model's oldest request). A
resident model that is not among them stops admitting (it drains: its running requests
finish, its waiting ones wait for its next turn) and is evicted once nothing of it runs;
then the next model is swapped in. Requests thus run in groups, one model's at a time,
instead of sharing the device's memory.
"""
from __future__ import annotations

from prism.sched.view import DeviceView


def plan_swap(view: DeviceView, max_resident: int, kv_headroom_pages: int = 0
              ) -> tuple[tuple[str, ...], tuple[str, ...], tuple[str, ...]]:
    """Return (evict, activate, drain) model ids."""
    oldest: dict[str, float] = {}
    for r in view.requests:
        oldest[r.model_id] = min(r.arrival, oldest.get(r.model_id, r.arrival))
    turn = sorted(oldest, key=lambda m: (oldest[m], m))[:max_resident]
    running = {r.model_id for r in view.requests if r.running}
    models = {m.model_id: m for m in view.models}
    on_device = [m for m in view.models if m.resident or m.activating]
    drain = tuple(sorted(m.model_id for m in on_device if m.model_id not in turn and m.model_id in oldest))

    waiting_turn = [m for m in turn if m in models and not models[m].resident and not models[m].activating]
    evict: list[str] = []
    free = view.free_pages
    slots = max_resident - len(on_device)
    if waiting_turn or len(on_device) > max_resident:
        # Out of turn and nothing running: make way (idle ones first, then drained ones).
        for m in sorted(on_device, key=lambda m: (m.model_id in oldest, m.last_used, m.model_id)):
            if m.model_id in turn or m.model_id in running or m.activating:
                continue
            evict.append(m.model_id)
            free += m.weight_pages + m.kv_pages
            slots += 1
    activate: list[str] = []
    for model_id in waiting_turn:
        need = models[model_id].weight_pages + kv_headroom_pages
        if slots > 0 and free >= need:
            activate.append(model_id)
            free -= need
            slots -= 1
    return tuple(evict), tuple(activate), drain
