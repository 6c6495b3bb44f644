"""Chat responses of requests that may call tools: tool_calls in each choice's message, or
streamed as tool-call deltas, and finish_reason "tool_calls" for a choice that called any.

Every choice (n > 1) has its own parser state: its own stream of deltas, its own call
indices and ids. A choice's logprobs cover all its tokens: whole in the message, and in a
stream each chunk's ride on the first delta sent for it; tokens the parser holds back (a call
still being read) ride on the choice's next delta.
"""
from __future__ import annotations

from prism.server import protocol as P
from prism.server.backend import GenerationChunk
from prism.server.choices import Choice
from prism.server.logprobs import TokenTexts
from prism.server.streaming import ChatCompletionShapes, Output
from prism.server.tool_parsers import (JSON_ARRAY, StreamingToolCalls, function_call, parse_tool_calls,
                                       tool_call_delta, tool_call_id)
from prism.server.tools import ToolPlan
from prism.types import TokenLogprobs

TOOL_CALLS = "tool_calls"


class _ChoiceCalls:
    """One choice's streaming state: its parser (auto, required) or whether the named
    function's name was sent, and the logprobs of tokens not yet sent."""

    def __init__(self, plan: ToolPlan, fmt: str | None):
        self.plan = plan
        self.stream = None if plan.mode == "named" else StreamingToolCalls(fmt)
        self.named_started = False
        self.pending_ids: list[int] = []
        self.pending_logprobs: list[TokenLogprobs] = []

    @property
    def called(self) -> bool:
        return self.plan.mode == "named" or self.stream.called

    def deltas(self, text: str, final: bool) -> list[dict]:
        if self.plan.mode == "named":
            return self._named_deltas(text)
        deltas = self.stream.feed(text) if text else []
        return deltas + self.stream.finish() if final else deltas

    def _named_deltas(self, text: str) -> list[dict]:
        deltas = []
        if not self.named_started:  # the name is known from the start: send it first
            self.named_started = True
            deltas.append(tool_call_delta(0, {"name": self.plan.function, "arguments": ""}, tool_call_id()))
        if text:
            deltas.append(tool_call_delta(0, {"arguments": text}))
        return deltas


class ToolChatShapes(ChatCompletionShapes):
    """Named function: the output is the arguments (the grammar made it). Required: a JSON
    array of calls. Auto: the model's family format, parsed."""

    def __init__(self, req_id: str, model: str, plan: ToolPlan, num_choices: int = 1,
                 texts: TokenTexts | None = None):
        super().__init__(req_id, model, num_choices, texts)
        self.plan = plan
        self.format = JSON_ARRAY if plan.mode == "required" else plan.parser
        self._calls = [_ChoiceCalls(plan, self.format) for _ in range(num_choices)]

    def _tool_finish(self, reason: str | None, called: bool) -> str:
        finish = self._finish(reason)
        return TOOL_CALLS if called and finish == "stop" else finish

    def full(self, out: Output) -> dict:
        return P.chat_body(self.req_id, self.created, self.model, [self._choice(c) for c in out.choices], out.usage())

    def _choice(self, c: Choice) -> dict:
        if self.plan.mode == "named":
            content, calls = None, [function_call(self.plan.function, c.text)]
        else:
            parsed = parse_tool_calls(c.text, self.format)
            content, calls = parsed.content, parsed.tool_calls
        return P.chat_choice(c.index, content, self._tool_finish(c.finish_reason, bool(calls)),
                             self._logprobs_of(c.index, c.token_ids, c.logprobs), calls)

    def chunk_events(self, index: int, chunk: GenerationChunk, finish: str | None) -> list[dict]:
        state = self._calls[index]
        if self.texts is not None:
            state.pending_ids += chunk.token_ids
            state.pending_logprobs += chunk.logprobs
        deltas = state.deltas(chunk.text, final=finish is not None)
        events = [P.chat_chunk(self.req_id, self.created, self.model, d, index=index,
                               logprobs=self._take_logprobs(state) if i == 0 else None)
                  for i, d in enumerate(deltas)]
        if finish is not None:
            reason = TOOL_CALLS if state.called and finish == "stop" else finish
            events.append(P.chat_chunk(self.req_id, self.created, self.model, {}, reason, index=index,
                                       logprobs=self._take_logprobs(state)))
        return events

    def _take_logprobs(self, state: _ChoiceCalls) -> dict | None:
        """The logprobs of the choice's tokens not sent yet (None: none, or none asked)."""
        if not state.pending_ids:
            return None
        logprobs = self._logprobs_of(0, state.pending_ids, state.pending_logprobs)
        state.pending_ids, state.pending_logprobs = [], []
        return logprobs
