"""What the HTTP layer needs from the serving system, and nothing more.

The router (prism/server/router.py) implements `ServingBackend`; the FastAPI app only talks to
this protocol, so the transport to workers (local processes today, Ray later) stays behind it.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import AsyncIterator, Protocol

from prism.engine.tokenizer import Tokenizer
from prism.errors import PrismError, UserError
from prism.types import SamplingParams, TokenLogprobs


class UnknownModel(UserError, LookupError):
    """The request names a model this server does not serve (HTTP 404)."""


class ServerBusy(PrismError, RuntimeError):
    """The server cannot take the request now (HTTP 503): shutting down or no worker.
    `retry_after_s`: when a retry may succeed (a Retry-After header), if known."""

    def __init__(self, message: str = "", retry_after_s: float | None = None):
        super().__init__(message)
        self.retry_after_s = retry_after_s


class WorkerFailed(ServerBusy):
    """The worker serving the request died or is not running (HTTP 503; counted as failed)."""


class RequestTimedOut(PrismError, TimeoutError):
    """The request ran past the server's deadline (server.request_timeout_s; HTTP 504)."""


@dataclass(frozen=True)
class ModelCard:
    name: str
    max_model_len: int
    created: int  # unix seconds, for /v1/models
    devices: tuple[str, ...] = ()  # where it is resident now (empty: evicted)


@dataclass(frozen=True)
class GenerationRequest:
    req_id: str
    model: str
    prompt_token_ids: list[int]
    params: SamplingParams
    ttft_slo_s: float | None = None  # per-request SLO overrides (None: the model's default)
    tpot_slo_s: float | None = None
    priority: int = 0
    # When the HTTP request came in (time.monotonic()); None: when it is submitted. The
    # device dates the request from then: the client's wait includes tokenizing and routing.
    received_s: float | None = None


@dataclass(frozen=True)
class GenerationChunk:
    """A piece of one request's output. The last chunk has finish_reason set."""

    text: str  # newly decoded text (may be "")
    token_ids: list[int] = field(default_factory=list)  # newly generated token ids
    finish_reason: str | None = None  # "stop" | "length" | "abort"
    num_prompt_tokens: int = 0
    num_output_tokens: int = 0  # so far, including this chunk
    logprobs: list[TokenLogprobs] = field(default_factory=list)  # one per token id, when the request asked


class ServingBackend(Protocol):
    def model_cards(self) -> list[ModelCard]: ...

    def tokenizer(self, model: str) -> Tokenizer:
        """Raises UnknownModel, or RequestError when the model has no tokenizer."""

    def max_model_len(self, model: str) -> int: ...

    def tool_parser(self, model: str) -> str | None:
        """The model's tool-call format from its config ("hermes", "llama3_json"); None: told
        by its chat template. Optional: a backend without it leaves it to the template."""

    def generate(self, request: GenerationRequest) -> AsyncIterator[GenerationChunk]:
        """Stream the request's output. Raises RequestError (bad input, e.g. a prompt longer
        than the context), UnknownModel or ServerBusy, before the first chunk or from it.
        Closing the iterator early (client gone) aborts the request."""

    def metrics_text(self) -> tuple[bytes, str]:
        """Prometheus exposition (body, content type) for GET /metrics."""

    def admin_view(self) -> dict:
        """Placement and memory per device, as JSON, for GET /admin/state."""

    def healthy(self) -> bool:
        """False: some model cannot be served now (GET /health answers 503)."""

    def health_details(self) -> dict:
        """Extra JSON for GET /health (e.g. each device's worker state); may be empty."""
