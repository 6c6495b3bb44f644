"""Torch-free core types shared by the engine, the schedulers and (later) the server."""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from enum import Enum

import msgspec

from prism.errors import UserError


class RequestError(UserError):
    """Bad input a user sent: the message is safe to show them as is."""


class SamplingParams(msgspec.Struct, frozen=True):
    """A msgspec Struct (not a dataclass) so it crosses to a worker process as it is."""

    temperature: float = 1.0  # 0 means greedy
    top_p: float = 1.0
    top_k: int = -1  # -1 or 0: off
    seed: int | None = None
    max_tokens: int = 16
    stop: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False
    skip_special_tokens: bool = True
    # Structured output: llguidance's serialized grammar (JSON text) the output must match,
    # built by the frontend (response_format, tool_choice); prism/engine/structured.py.
    grammar: str | None = None

    def __post_init__(self):
        if not (isinstance(self.max_tokens, int) and self.max_tokens >= 1):
            raise RequestError(f"max_tokens must be an integer >= 1, got {self.max_tokens!r}")
        if not (math.isfinite(self.temperature) and 0.0 <= self.temperature <= 100.0):
            raise RequestError(f"temperature must be in [0, 100], got {self.temperature!r}")
        if not (math.isfinite(self.top_p) and 0.0 < self.top_p <= 1.0):
            raise RequestError(f"top_p must be in (0, 1], got {self.top_p!r}")
        if not isinstance(self.top_k, int) or self.top_k < -1:
            raise RequestError(f"top_k must be -1 (off) or a positive integer, got {self.top_k!r}")
        if self.seed is not None and not isinstance(self.seed, int):
            raise RequestError(f"seed must be an integer, got {self.seed!r}")
        if isinstance(self.stop, str):
            msgspec.structs.force_setattr(self, "stop", (self.stop,))
        if any(not isinstance(s, str) or not s for s in self.stop):
            raise RequestError("stop strings must be non-empty strings")
        msgspec.structs.force_setattr(self, "stop", tuple(self.stop))
        msgspec.structs.force_setattr(self, "stop_token_ids", tuple(int(t) for t in self.stop_token_ids))
        if self.grammar is not None and (not isinstance(self.grammar, str) or not self.grammar):
            raise RequestError("grammar must be a non-empty string (a serialized llguidance grammar)")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


class FinishReason(str, Enum):
    STOP = "stop"  # EOS, a stop token or a stop string
    LENGTH = "length"  # max_tokens or the context limit
    ABORT = "abort"


class SeqStatus(Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@dataclass
class CompletionOutput:
    """What a finished (or, when streaming, a partial) request has produced."""

    req_id: str
    prompt_token_ids: list[int]
    token_ids: list[int]
    text: str
    finish_reason: FinishReason | None
    num_preemptions: int = 0
    metrics: dict = field(default_factory=dict)
