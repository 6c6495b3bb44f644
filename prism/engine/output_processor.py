"""From sampled tokens to what a client sees: text deltas, stop conditions, final outputs.

Kept apart from the engine so that the part that touches text (and, in the server, moves to
the frontend process) is not tangled with batching and memory.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import msgspec

from prism.engine.detokenizer import IncrementalDetokenizer, StopStringMatcher
from prism.engine.sequence import Sequence
from prism.engine.tokenizer import Tokenizer
from prism.types import CompletionOutput, FinishReason, TokenLogprobs


class TokenEvent(msgspec.Struct, frozen=True):
    """One generated token of one request, as it should be streamed (a Struct: one is made
    per token of every running request each step, several times faster than a dataclass)."""

    req_id: str
    token_id: int
    text: str  # newly printable text ("" while a character or a possible stop string is pending)
    time: float
    finish_reason: FinishReason | None = None
    logprobs: TokenLogprobs | None = None  # when the request asked for them


@dataclass
class _Record:
    seq: Sequence
    detokenizer: IncrementalDetokenizer | None
    stops: StopStringMatcher | None
    text: str = ""
    hit_stop_string: bool = False
    token_times: list[float] = field(default_factory=list)
    logprobs: list[TokenLogprobs] | None = None  # when the request asked for them


class OutputProcessor:
    def __init__(self, tokenizer: Tokenizer | None, eos_token_ids: tuple[int, ...], max_model_len: int):
        self.tokenizer = tokenizer
        self.eos_token_ids = frozenset(eos_token_ids)
        self.max_model_len = max_model_len
        self._records: dict[str, _Record] = {}

    def __contains__(self, req_id: str) -> bool:
        return req_id in self._records

    def __len__(self) -> int:
        return len(self._records)

    def req_ids(self) -> list[str]:
        return list(self._records)

    def add(self, seq: Sequence) -> None:
        detok = stops = None
        if self.tokenizer is not None:
            detok = IncrementalDetokenizer(self.tokenizer, seq.params.skip_special_tokens)
            stops = StopStringMatcher(seq.params.stop) if seq.params.stop else None
        logprobs = [] if seq.params.logprobs is not None else None
        self._records[seq.req_id] = _Record(seq, detok, stops, logprobs=logprobs)

    def on_token(self, seq: Sequence, token: int, now: float, logprobs: TokenLogprobs | None = None) -> TokenEvent:
        """Append a sampled token; the event says whether the request is now finished."""
        rec = self._records[seq.req_id]
        if seq.num_pending:  # the step that sampled it ran overlapped: its place is held
            seq.resolve_pending(token)
        else:
            seq.output_token_ids.append(token)
        if rec.logprobs is not None and logprobs is not None:
            rec.logprobs.append(logprobs)
        seq.first_token_time = seq.first_token_time or now
        seq.last_token_time = now
        rec.token_times.append(now)
        reason, text = self._check(rec, token)
        return TokenEvent(seq.req_id, token, text, now, reason, logprobs)

    def _check(self, rec: _Record, token: int) -> tuple[FinishReason | None, str]:
        seq, params = rec.seq, rec.seq.params
        if (token in self.eos_token_ids and not params.ignore_eos) or token in params.stop_token_ids:
            return FinishReason.STOP, ""
        text = ""
        if rec.detokenizer is not None:
            text = rec.detokenizer.step(token)
            if rec.stops is not None:
                text, rec.hit_stop_string = rec.stops.feed(text)
            rec.text += text
            if rec.hit_stop_string:
                return FinishReason.STOP, text
        known = seq.num_known_output_tokens
        if known >= params.max_tokens or seq.num_prompt_tokens + known >= self.max_model_len:
            return FinishReason.LENGTH, text
        return None, text

    def finish(self, seq: Sequence, reason: FinishReason, now: float) -> tuple[str, CompletionOutput]:
        """Close a request: returns the text still held back (to stream) and the final output."""
        rec = self._records.pop(seq.req_id)
        tail = ""
        if rec.detokenizer is not None and not rec.hit_stop_string and reason != FinishReason.ABORT:
            tail = rec.detokenizer.flush()
            if rec.stops is not None:
                tail, _ = rec.stops.feed(tail)
                tail += rec.stops.flush()
            rec.text += tail
        return tail, CompletionOutput(
            req_id=seq.req_id,
            prompt_token_ids=seq.prompt_token_ids,
            token_ids=list(seq.output_token_ids),
            text=rec.text,
            finish_reason=reason,
            num_preemptions=seq.num_preemptions,
            metrics=request_metrics(seq, rec.token_times, now),
            logprobs=rec.logprobs,
        )


def request_metrics(seq: Sequence, token_times: list[float], finish_time: float) -> dict:
    """Per-request latency record: times, TTFT, TPOT and whether each SLO was met."""
    ttft = seq.first_token_time - seq.arrival_time if seq.first_token_time is not None else None
    tpot = None
    if len(token_times) > 1:
        tpot = (token_times[-1] - token_times[0]) / (len(token_times) - 1)
    m = {
        "arrival_time": seq.arrival_time,
        "admitted_time": seq.admitted_time,
        "first_token_time": seq.first_token_time,
        "finish_time": finish_time,
        "token_times": token_times,
        "ttft": ttft,
        "tpot": tpot,
        "num_prompt_tokens": seq.num_prompt_tokens,
        "num_output_tokens": seq.num_output_tokens,
        "num_preemptions": seq.num_preemptions,
    }
    if seq.slo is not None:
        m["ttft_slo"], m["tpot_slo"] = seq.slo.ttft_s, seq.slo.tpot_s
        m["ttft_met"] = ttft is not None and ttft <= seq.slo.ttft_s
        m["tpot_met"] = tpot is None or tpot <= seq.slo.tpot_s
    return m
