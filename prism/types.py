"""Torch-free core types shared by the engine, the schedulers and (later) the server."""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from enum import Enum

import msgspec

from prism.errors import UserError


class RequestError(UserError):
    """Bad input a user sent: the message is safe to show them as is."""


MAX_LOGPROBS = 20  # top alternatives a request may ask for per token (vLLM's default max_logprobs)
MAX_LOGIT_BIAS = 300  # entries in logit_bias (OpenAI's limit)
PENALTY_RANGE = 2.0  # presence and frequency penalties lie in [-2, 2] (OpenAI)
LOGIT_BIAS_RANGE = 100.0  # a logit bias lies in [-100, 100] (OpenAI)


class SamplingParams(msgspec.Struct, frozen=True):
    """A msgspec Struct (not a dataclass) so it crosses to a worker process as it is.

    Penalties and logit_bias apply to greedy rows too (before the argmax, as vLLM);
    `logprobs` asks for the sampled token's log-probability under the model's raw
    distribution and that many top alternatives (None: none; 0: the sampled token's only).
    """

    temperature: float = 1.0  # 0 means greedy
    top_p: float = 1.0
    top_k: int = -1  # -1 or 0: off
    seed: int | None = None
    max_tokens: int = 16
    stop: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False
    skip_special_tokens: bool = True
    presence_penalty: float = 0.0  # subtracted once from each token already in the output
    frequency_penalty: float = 0.0  # subtracted per occurrence in the output
    repetition_penalty: float = 1.0  # HF/vLLM: seen logits (prompt and output) / p if > 0, else * p
    min_p: float = 0.0  # drop tokens less likely than min_p x the most likely one
    logit_bias: dict[int, float] | None = None  # token id -> added to its logit
    logprobs: int | None = None
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
        self._check_penalties()
        self._check_logit_bias()
        if self.logprobs is not None and not (isinstance(self.logprobs, int) and 0 <= self.logprobs <= MAX_LOGPROBS):
            raise RequestError(f"logprobs must be an integer in [0, {MAX_LOGPROBS}], got {self.logprobs!r}")

    def _check_penalties(self) -> None:
        for name in ("presence_penalty", "frequency_penalty"):
            value = getattr(self, name)
            if not (math.isfinite(value) and -PENALTY_RANGE <= value <= PENALTY_RANGE):
                raise RequestError(f"{name} must be in [-{PENALTY_RANGE:g}, {PENALTY_RANGE:g}], got {value!r}")
        if not (math.isfinite(self.repetition_penalty) and 0.0 < self.repetition_penalty <= 100.0):
            raise RequestError(f"repetition_penalty must be in (0, 100], got {self.repetition_penalty!r}")
        if not (math.isfinite(self.min_p) and 0.0 <= self.min_p <= 1.0):
            raise RequestError(f"min_p must be in [0, 1], got {self.min_p!r}")

    def _check_logit_bias(self) -> None:
        if not self.logit_bias:
            msgspec.structs.force_setattr(self, "logit_bias", None)
            return
        if len(self.logit_bias) > MAX_LOGIT_BIAS:
            raise RequestError(f"logit_bias may hold at most {MAX_LOGIT_BIAS} entries, got {len(self.logit_bias)}")
        for token, bias in self.logit_bias.items():
            if not isinstance(token, int) or token < 0:
                raise RequestError(f"logit_bias keys must be token ids (integers >= 0), got {token!r}")
            if not (math.isfinite(bias) and -LOGIT_BIAS_RANGE <= bias <= LOGIT_BIAS_RANGE):
                raise RequestError(f"logit_bias values must be in [-{LOGIT_BIAS_RANGE:g}, {LOGIT_BIAS_RANGE:g}], "
                                   f"got {bias!r} for token {token}")

    def check_vocabulary(self, vocab_size: int) -> None:
        """RequestError when logit_bias names a token outside a vocabulary of `vocab_size`."""
        bad = next((t for t in self.logit_bias or () if t >= vocab_size), None)
        if bad is not None:
            raise RequestError(f"logit_bias names token id {bad}, outside the vocabulary (0..{vocab_size - 1})")

    @property
    def uses_penalties(self) -> bool:
        return self.presence_penalty != 0.0 or self.frequency_penalty != 0.0 or self.repetition_penalty != 1.0

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


class FinishReason(str, Enum):
    STOP = "stop"  # EOS, a stop token or a stop string
    LENGTH = "length"  # max_tokens or the context limit
    ABORT = "abort"


class TokenLogprobs(msgspec.Struct, frozen=True, array_like=True):
    """One sampled token's log-probability under the model's raw distribution (the
    log-softmax of its logits, before temperature, penalties or bias) and the most likely
    tokens' (token id, logprob), most likely first."""

    logprob: float
    top: list[tuple[int, float]] = []


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
    logprobs: list[TokenLogprobs] | None = None  # one per token_ids entry, when the request asked
