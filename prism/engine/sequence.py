"""A request as the engine sees it: its tokens, its KV blocks and how far it has been computed.

Torch-free on purpose: the schedulers (and later the simulator) read and move these.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, NamedTuple

from prism.sched.view import SLO
from prism.types import FinishReason, SamplingParams, SeqStatus, TokenLogprobs


PENDING = -1  # the place of an output token sampled by a step still in flight


@dataclass(eq=False)  # identity semantics: a sequence is a live object, two are never "equal"
class Sequence:
    req_id: str
    prompt_token_ids: list[int]
    params: SamplingParams
    arrival_time: float = 0.0
    output_token_ids: list[int] = field(default_factory=list)
    status: SeqStatus = SeqStatus.WAITING
    # Tokens whose K/V are in the cache. After a recompute preemption this drops to 0 and
    # prompt + outputs so far are prefilled again; outputs are kept, so greedy results match.
    num_computed_tokens: int = 0
    block_table: list[int] = field(default_factory=list)
    finish_reason: FinishReason | None = None
    num_preemptions: int = 0
    slo: SLO | None = None  # None: no latency target (plain generate)
    priority: int = 0
    admitted_time: float | None = None  # first scheduled
    first_token_time: float | None = None
    last_token_time: float | None = None
    # The matcher of a structured-output request (prism/engine/structured.py GrammarState): it
    # lives beside the sequence, so preemption and eviction (which keep the outputs) keep it.
    grammar: Any = None
    # Output tokens sampled by steps still in flight (overlap, core.py): they sit at the end of
    # output_token_ids as PENDING until the step's tokens are read.
    num_pending: int = 0

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def num_output_tokens(self) -> int:
        return len(self.output_token_ids)

    @property
    def num_known_output_tokens(self) -> int:
        """Outputs whose token is known (not pending in a step in flight)."""
        return len(self.output_token_ids) - self.num_pending

    def add_pending(self) -> None:
        """A step in flight samples this sequence's next token: hold its place."""
        self.output_token_ids.append(PENDING)
        self.num_pending += 1

    def resolve_pending(self, token: int) -> None:
        """The oldest pending token is known now (steps' tokens are read in step order)."""
        self.output_token_ids[len(self.output_token_ids) - self.num_pending] = token
        self.num_pending -= 1

    def drop_pending(self) -> None:
        """The request ended: tokens of steps still in flight are not its outputs."""
        if self.num_pending:
            del self.output_token_ids[-self.num_pending:]
            self.num_pending = 0

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_token_ids) + len(self.output_token_ids)

    @property
    def num_uncomputed_tokens(self) -> int:
        return self.num_tokens - self.num_computed_tokens

    @property
    def is_finished(self) -> bool:
        return self.status == SeqStatus.FINISHED

    def token_ids(self, start: int, end: int) -> list[int]:
        """Tokens [start, end) of prompt followed by outputs."""
        n_prompt = len(self.prompt_token_ids)
        if end <= n_prompt:
            return self.prompt_token_ids[start:end]
        if start >= n_prompt:
            return self.output_token_ids[start - n_prompt : end - n_prompt]
        return self.prompt_token_ids[start:] + self.output_token_ids[: end - n_prompt]

    def token_at(self, i: int) -> int:
        """Token i of prompt followed by outputs."""
        n_prompt = len(self.prompt_token_ids)
        return self.prompt_token_ids[i] if i < n_prompt else self.output_token_ids[i - n_prompt]

    @property
    def last_token_id(self) -> int:
        return self.output_token_ids[-1] if self.output_token_ids else self.prompt_token_ids[-1]


class SampledToken(NamedTuple):
    """What a step sampled for one sequence (an executor's result, one per sampling chunk)."""

    seq: Sequence
    token_id: int
    logprobs: TokenLogprobs | None = None  # when the request asked for them


class ScheduledChunk:
    """Compute tokens [start, start + num_tokens) of seq this step; `samples` after it if the
    chunk reaches the end of what the sequence knows when planned (a finished prefill, or a
    decode; the place a launched step holds for its token does not change that). A slotted
    class: a step of a thousand sequences builds a thousand of them."""

    __slots__ = ("seq", "start", "num_tokens", "samples")

    def __init__(self, seq: Sequence, start: int, num_tokens: int):
        self.seq = seq
        self.start = start
        self.num_tokens = num_tokens
        self.samples = start + num_tokens == seq.num_tokens

    def __repr__(self) -> str:
        return f"ScheduledChunk({self.seq.req_id!r}, {self.start}, {self.num_tokens})"


@dataclass(frozen=True)
class StepPlan:
    """What one engine step runs: small and per step (the runner turns it into tensors)."""

    chunks: tuple[ScheduledChunk, ...]
    preempted: tuple[Sequence, ...] = ()

    @property
    def num_tokens(self) -> int:
        return sum(c.num_tokens for c in self.chunks)

    @property
    def is_empty(self) -> bool:
        return not self.chunks

    def cost_terms(self) -> tuple[int, int, int]:
        """(decodes, their context tokens in total, prefill tokens): what a step's time depends
        on. A decode is a one-token chunk past the prompt; every other token is prefill (a
        prompt, a chunk of one, or a recompute after preemption)."""
        num_decodes = num_context = 0
        for c in self.chunks:
            if c.num_tokens == 1 and c.start >= c.seq.num_prompt_tokens:
                num_decodes += 1
                num_context += c.start + 1
        return num_decodes, num_context, self.num_tokens - num_decodes
