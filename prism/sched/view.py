"""What policies see and what they return: plain, torch-free snapshots and decisions."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol


@dataclass(frozen=True)
class SLO:
    ttft_s: float  # time to first token, from arrival
    tpot_s: float  # time per output token after the first


@dataclass(frozen=True)
class RequestView:
    """One request of one model on this device, as of `DeviceView.now`."""

    req_id: str
    model_id: str
    arrival: float
    slo: SLO
    num_prompt_tokens: int
    num_computed_tokens: int  # tokens whose KV is cached now (0 after a recompute preemption)
    num_output_tokens: int
    max_tokens: int
    first_token_time: float | None = None
    last_token_time: float | None = None
    running: bool = False  # holds KV blocks (admitted), as opposed to waiting
    priority: int = 0  # higher runs first among otherwise equal requests

    @property
    def num_tokens(self) -> int:
        return self.num_prompt_tokens + self.num_output_tokens

    @property
    def ttft_deadline(self) -> float:
        return self.arrival + self.slo.ttft_s

    @property
    def has_first_token(self) -> bool:
        return self.first_token_time is not None


@dataclass(frozen=True)
class ModelView:
    model_id: str
    resident: bool  # weights mapped on this device
    last_used: float  # last time a request of it arrived or ran
    weight_pages: int  # pages its weights take when resident
    kv_pages: int  # pages its KV holds now
    activating: bool = False
    kv_pages_per_token: float = 0.0  # pages one token's KV takes (all layers); 0: unknown
    last_step: float = float("-inf")  # when it last ran a step (-inf: never); round-robin turns


@dataclass(frozen=True)
class DeviceView:
    now: float
    budget_pages: int
    free_pages: int
    models: tuple[ModelView, ...]
    requests: tuple[RequestView, ...]
    # requests/s per model that reached this device over the rate window (only for a policy
    # that asks: LocalScheduler.needs_request_rates)
    request_rates: dict[str, float] = field(default_factory=dict)

    def model(self, model_id: str) -> ModelView:
        return next(m for m in self.models if m.model_id == model_id)

    def requests_of(self, model_id: str) -> list[RequestView]:
        return [r for r in self.requests if r.model_id == model_id]


class CostModel(Protocol):
    """Time estimates the policies plan with (from measured profiles, or defaults)."""

    def prefill_time(self, model_id: str, num_tokens: int) -> float: ...

    def decode_step_time(self, model_id: str, batch_size: int, num_context_tokens: int) -> float: ...

    def activation_time(self, model_id: str) -> float: ...


@dataclass(frozen=True)
class StepDecision:
    """What the device does next. Evictions happen first, then activations, then one step of
    `run_model` (None: nothing runnable now)."""

    run_model: str | None
    admit_order: dict[str, tuple[str, ...]] = field(default_factory=dict)  # model -> waiting req_ids, best first
    activate: tuple[str, ...] = ()
    evict: tuple[str, ...] = ()
    drain: tuple[str, ...] = ()  # models that admit nothing new for now (their turn is over)
    # model -> the most tokens its next step may batch (decodes and prefill chunks together),
    # below its engine's max_num_batched_tokens; a model not named keeps that full budget.
    token_budget: dict[str, int] = field(default_factory=dict)
    # Under concurrent_models > 1: the other models to step beside run_model, most wanted
    # first (only these); None: the device takes the models with work in turn.
    beside: tuple[str, ...] | None = None
