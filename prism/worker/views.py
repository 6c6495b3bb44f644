"""What the local scheduler sees of a device (DeviceView) and what the device reports of its
memory, built from the engines through the DeviceEngine protocol.

Cached so that a step's cost does not grow with how many idle models the device holds: the
device marks a model touched whenever it changes one of its engines, and only touched models'
views (and whether they have work) are built again. DeviceCore calls this; it never calls back.
"""
from __future__ import annotations

from collections.abc import Iterable, Mapping

from prism.engine.executor import ModelSizes
from prism.engine.sequence import Sequence
from prism.memory.page_pool import PagePool
from prism.sched.view import SLO, DeviceView, ModelView, RequestView
from prism.worker import messages as msg
from prism.worker.engine_protocol import DeviceEngine
from prism.worker.metrics import DeviceCounters


class DeviceViews:
    """The cached views of one device's models and requests. The mappings are the device's
    own (read here, never written): its engines, their sizes, and when each model was last used
    and last ran a step."""

    def __init__(self, engines: Mapping[str, DeviceEngine], sizes: Mapping[str, ModelSizes],
                 last_used: Mapping[str, float], last_step: Mapping[str, float], pool: PagePool, device_id: str):
        self._engines = engines
        self._sizes = sizes
        self._last_used = last_used
        self._last_step = last_step  # absent: never stepped
        self._pool = pool
        self._device_id = device_id
        self._order: dict[str, int] = {}  # registration order (the order views list models)
        self._views: dict[str, ModelView] = {}
        self._model_views: tuple[ModelView, ...] = ()
        self._touched: set[str] = set()
        self.busy: set[str] = set()  # models with unfinished requests (as of the last refresh)
        # req_id -> (sequence, running, computed, outputs, view): a waiting request's view does
        # not change from step to step, so it is built again only when one of those does.
        self._request_views: dict[str, tuple] = {}

    # ---- what the device tells it ------------------------------------------------------------
    def add_model(self, model_id: str) -> None:
        self._order[model_id] = len(self._order)
        self.touch(model_id)

    def touch(self, model_id: str) -> None:
        """`model_id`'s engine changed: its view is built again at the next refresh."""
        self._touched.add(model_id)

    def forget_request(self, req_id: str) -> None:
        self._request_views.pop(req_id, None)

    def in_order(self, models: Iterable[str]) -> list[str]:
        return sorted(models, key=self._order.__getitem__)

    def rank(self, model_id: str) -> int:
        """Its place in registration order."""
        return self._order[model_id]

    def refresh(self) -> None:
        """Rebuild the views of touched models (and whether they have work)."""
        if not self._touched:
            return
        for m in self._touched:
            self._views[m] = self._model_view(m)
            (self.busy.add if self._engines[m].has_unfinished else self.busy.discard)(m)
        self._touched.clear()
        self._model_views = tuple(sorted(self._views.values(), key=lambda v: self._order[v.model_id]))

    def model_views(self) -> Mapping[str, ModelView]:
        """Every model's view, refreshed."""
        self.refresh()
        return self._views

    # ---- snapshots for the policy --------------------------------------------------------------
    def snapshot(self, now: float, rates: dict[str, float]) -> DeviceView:
        self.refresh()
        requests = []
        for m in self.in_order(self.busy):
            requests += self._request_views_of(m)
        return DeviceView(now, self._pool.budget_pages, self._pool.free_pages, self._model_views, tuple(requests),
                          rates)

    def model_snapshot(self, model_id: str, now: float) -> DeviceView:
        """The device as the victim choice sees it mid-step: `model_id`'s view and requests
        only. The choice needs no more: a candidate's slack depends on its own model's
        decoding batch and residency alone (sched/local.py: _Estimates, _slack_of), so this
        chooses as a whole-device snapshot would, at a cost that does not grow with the
        device's other models and their queues. Built fresh, as the engine is mid-step."""
        return DeviceView(now, self._pool.budget_pages, self._pool.free_pages,
                          (self._model_view(model_id),), tuple(self._request_views_of(model_id)))

    def _model_view(self, model_id: str) -> ModelView:
        e, sizes = self._engines[model_id], self._sizes[model_id]
        return ModelView(model_id, e.resident, self._last_used[model_id], sizes.weight_pages, e.num_kv_pages,
                         kv_pages_per_token=sizes.kv_bytes_per_token / self._pool.page_size,
                         last_step=self._last_step.get(model_id, float("-inf")))

    def _request_views_of(self, model_id: str) -> list[RequestView]:
        e = self._engines[model_id]
        return [self._request_view(model_id, seq, e.is_running(seq)) for seq in e.sequences()]

    def _request_view(self, model_id: str, seq: Sequence, running: bool) -> RequestView:
        hit = self._request_views.get(seq.req_id)
        if (hit is not None and hit[0] is seq and hit[1] == running
                and hit[2] == seq.num_computed_tokens and hit[3] == seq.num_output_tokens):
            return hit[4]
        view = request_view(model_id, seq, running)
        self._request_views[seq.req_id] = (seq, running, seq.num_computed_tokens, seq.num_output_tokens, view)
        return view

    # ---- the memory report -----------------------------------------------------------------------
    def memory_report(self, now: float, counters: DeviceCounters, host_store: str) -> msg.DeviceMemory:
        self.refresh()
        pages = {(o.model_id, o.kind): n for o, n in self._pool.pages_by_owner().items()}
        c = counters
        return msg.DeviceMemory(
            time=now,
            device=self._device_id,
            page_size=self._pool.page_size,
            budget_pages=self._pool.budget_pages,
            free_pages=self._pool.free_pages,
            models={
                m: msg.ModelMemory(
                    resident=self._views[m].resident,
                    weight_pages=pages.get((m, "weights"), 0),
                    kv_pages=pages.get((m, "kv"), 0),
                    running=e.num_running,
                    waiting=e.num_waiting,
                    activations=c.activations.get(m, 0),
                    evictions=c.evictions.get(m, 0),
                    preemptions=c.preemptions.get(m, 0),
                )
                for m, e in self._engines.items()
            },
            host_copies=[m for m, e in self._engines.items() if e.has_host_copy],
            host_store=host_store,
        )


def request_view(model_id: str, seq: Sequence, running: bool) -> RequestView:
    slo = seq.slo or SLO(float("inf"), float("inf"))
    return RequestView(
        req_id=seq.req_id, model_id=model_id, arrival=seq.arrival_time, slo=slo,
        num_prompt_tokens=seq.num_prompt_tokens, num_computed_tokens=seq.num_computed_tokens,
        num_output_tokens=seq.num_output_tokens, max_tokens=seq.params.max_tokens,
        first_token_time=seq.first_token_time, last_token_time=seq.last_token_time,
        running=running, priority=seq.priority,
    )
