"""Chat responses of requests that may call tools: tool_calls in the message, or streamed as
tool-call deltas, and finish_reason "tool_calls" when the output called any."""
from __future__ import annotations

from prism.server import protocol as P
from prism.server.backend import GenerationChunk
from prism.server.streaming import ChatCompletionShapes, Output, client_finish_reason
from prism.server.tool_parsers import (JSON_ARRAY, StreamingToolCalls, function_call, parse_tool_calls,
                                       tool_call_delta, tool_call_id)
from prism.server.tools import ToolPlan

TOOL_CALLS = "tool_calls"


class ToolChatShapes(ChatCompletionShapes):
    """Named function: the output is the arguments (the grammar made it). Required: a JSON
    array of calls. Auto: the model's family format, parsed."""

    def __init__(self, req_id: str, model: str, plan: ToolPlan):
        super().__init__(req_id, model)
        self.plan = plan
        self.format = JSON_ARRAY if plan.mode == "required" else plan.parser
        self.stream = None if plan.mode == "named" else StreamingToolCalls(self.format)
        self.named_started = False

    def _finish(self, reason: str | None, called: bool) -> str:
        finish = client_finish_reason(reason, self.req_id)
        return TOOL_CALLS if called and finish == "stop" else finish

    def full(self, out: Output) -> dict:
        if self.plan.mode == "named":
            content, calls = None, [function_call(self.plan.function, out.text)]
        else:
            parsed = parse_tool_calls(out.text, self.format)
            content, calls = parsed.content, parsed.tool_calls
        return P.chat_body(self.req_id, self.created, self.model, content,
                           self._finish(out.finish_reason, bool(calls)), out.usage(), calls)

    def chunk_events(self, chunk: GenerationChunk, finish: str | None) -> list[dict]:
        if self.plan.mode == "named":
            deltas = self._named_deltas(chunk.text)
            called = True
        else:
            deltas = self.stream.feed(chunk.text) if chunk.text else []
            if finish is not None:
                deltas += self.stream.finish()
            called = self.stream.called
        events = [P.chat_chunk(self.req_id, self.created, self.model, d) for d in deltas]
        if finish is not None:
            reason = TOOL_CALLS if called and finish == "stop" else finish
            events.append(P.chat_chunk(self.req_id, self.created, self.model, {}, reason))
        return events

    def _named_deltas(self, text: str) -> list[dict]:
        deltas = []
        if not self.named_started:  # the name is known from the start: send it first
            self.named_started = True
            deltas.append(tool_call_delta(0, {"name": self.plan.function, "arguments": ""}, tool_call_id()))
        if text:
            deltas.append(tool_call_delta(0, {"arguments": text}))
        return deltas
