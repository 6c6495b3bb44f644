"""One request's response: the shapes of completions and chat completions (whole or as
server-sent events), streaming them while noticing a client that leaves, and closing the
backend's iterator exactly once (closing it is how a request is aborted)."""
from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from typing import AsyncIterator, Awaitable, Callable, TypeVar

import anyio
from fastapi.responses import StreamingResponse

from prism.server import protocol as P
from prism.server.backend import GenerationChunk
from prism.server.errors import to_api_error
from prism.server.metrics import RequestOutcomes

logger = logging.getLogger("prism.server")

T = TypeVar("T")


def client_finish_reason(reason: str | None, req_id: str) -> str:
    """The backend's finish reason as a client sees it: "stop" / "length"; an abort (or an
    output that ended without a reason) is reported as "stop" and logged."""
    if reason in ("stop", "length"):
        return reason
    logger.warning("request %s ended with finish reason %r; reporting 'stop'", req_id, reason)
    return "stop"


# ---- one request's output ------------------------------------------------------------------
@dataclass
class Output:
    """What the backend has produced so far for one request."""

    num_prompt_tokens: int
    pieces: list[str] = field(default_factory=list)
    num_output_tokens: int = 0
    finish_reason: str | None = None

    def add(self, chunk: GenerationChunk) -> None:
        self.pieces.append(chunk.text)
        # The backend's running count when it gives one, else the ids seen so far.
        self.num_output_tokens = chunk.num_output_tokens or self.num_output_tokens + len(chunk.token_ids)
        if chunk.num_prompt_tokens:
            self.num_prompt_tokens = chunk.num_prompt_tokens
        if chunk.finish_reason is not None:
            self.finish_reason = chunk.finish_reason

    @property
    def text(self) -> str:
        return "".join(self.pieces)

    def usage(self) -> dict:
        return P.usage(self.num_prompt_tokens, self.num_output_tokens)


class CompletionShapes:
    """Response shapes of POST /v1/completions."""

    object_ = "text_completion"

    def __init__(self, req_id: str, model: str):
        self.req_id, self.model, self.created = req_id, model, P.now()

    def full(self, out: Output) -> dict:
        finish = client_finish_reason(out.finish_reason, self.req_id)
        return P.completion_body(self.req_id, self.created, self.model, out.text, finish, out.usage())

    def first_events(self) -> list[dict]:
        return []

    def chunk_events(self, chunk: GenerationChunk, finish: str | None) -> list[dict]:
        """Events for one backend chunk; `finish` (the client's reason) is set on the last.
        A generated token whose text is still held back (part of a character, a possible stop
        string) is still sent, with empty text: clients then see every token's timing."""
        if not chunk.text and not chunk.token_ids and finish is None:
            return []
        return [P.completion_body(self.req_id, self.created, self.model, chunk.text, finish, chunk=True)]


class ChatCompletionShapes(CompletionShapes):
    """Response shapes of POST /v1/chat/completions."""

    object_ = "chat.completion.chunk"

    def full(self, out: Output) -> dict:
        finish = client_finish_reason(out.finish_reason, self.req_id)
        return P.chat_body(self.req_id, self.created, self.model, out.text, finish, out.usage())

    def first_events(self) -> list[dict]:
        return [P.chat_chunk(self.req_id, self.created, self.model, {"role": "assistant", "content": ""})]

    def chunk_events(self, chunk: GenerationChunk, finish: str | None) -> list[dict]:
        has_delta = chunk.text or chunk.token_ids  # empty deltas too: see CompletionShapes
        events = [P.chat_chunk(self.req_id, self.created, self.model, {"content": chunk.text})] if has_delta else []
        if finish is not None:
            events.append(P.chat_chunk(self.req_id, self.created, self.model, {}, finish))
        return events


def sse(obj: dict) -> bytes:
    return b"data: " + json.dumps(obj, ensure_ascii=False, separators=(",", ":")).encode() + b"\n\n"


DONE = b"data: [DONE]\n\n"


class Outcome:
    """Counts one request's outcome once (the first call wins)."""

    def __init__(self, outcomes: RequestOutcomes, model: str):
        self._outcomes, self.model, self.counted = outcomes, model, False

    def __call__(self, outcome: str, reason: str) -> None:
        if not self.counted:
            self.counted = True
            self._outcomes.record(self.model, outcome, reason)


GONE = object()  # what unless_disconnected returns when the client went away


async def cancel_when_disconnected(receive: Callable[[], Awaitable[dict]], scope: anyio.CancelScope) -> None:
    while (await receive())["type"] != "http.disconnect":
        pass
    scope.cancel()


async def unless_disconnected(receive: Callable[[], Awaitable[dict]], fn: Callable[[], Awaitable[T]]) -> T | object:
    """await fn() in this task, cancelled if the client disconnects meanwhile (then: GONE)."""
    result: T | object = GONE
    error: Exception | None = None
    with anyio.CancelScope() as scope:
        async with anyio.create_task_group() as tg:
            tg.start_soon(cancel_when_disconnected, receive, scope)
            try:
                result = await fn()
            except Exception as e:  # re-raised outside the task group, unwrapped
                error = e
            tg.cancel_scope.cancel()
    if error is not None:
        raise error
    return result


async def collect(it: AsyncIterator[GenerationChunk], num_prompt_tokens: int) -> Output:
    out = Output(num_prompt_tokens)
    async for chunk in it:
        out.add(chunk)
        if chunk.finish_reason is not None:
            break
    return out


async def stream_events(it: AsyncIterator[GenerationChunk], first: GenerationChunk | None, shapes: CompletionShapes,
                         num_prompt_tokens: int, include_usage: bool, closer: Closer,
                         outcome: Callable[[str, str], None]) -> AsyncIterator[bytes]:
    """SSE bytes of one streamed response; an error after the first byte becomes a final
    `data: {"error": ...}` event (and no [DONE])."""
    out = Output(num_prompt_tokens)
    try:
        for event in shapes.first_events():
            yield sse(event)
        chunk = first
        while True:
            ended = chunk is None  # the backend stopped without a finish reason
            chunk = chunk or GenerationChunk(text="")
            out.add(chunk)
            final = ended or chunk.finish_reason is not None
            finish = client_finish_reason(chunk.finish_reason, shapes.req_id) if final else None
            for event in shapes.chunk_events(chunk, finish):
                yield sse(event)
            if final:
                break
            chunk = await anext(it, None)
        await closer.close()
        outcome("finished", out.finish_reason or "none")
        if include_usage:
            yield sse(P.usage_chunk(shapes.req_id, shapes.created, shapes.model, shapes.object_, out.usage()))
        yield DONE
    except Exception as e:
        err = to_api_error(e, shapes.model)
        outcome(*err.outcome)
        yield sse(err.body())
    finally:
        outcome("aborted", "client_gone")  # unless counted above: the client went away
        await closer.close()


class SSEResponse(StreamingResponse):
    """A text/event-stream response that notices a client leaving even while the backend is
    silent (any ASGI server), and always closes the body and the backend iterator."""

    def __init__(self, events: AsyncIterator[bytes], closer: Closer, outcome: Callable[[str, str], None]):
        super().__init__(events, media_type="text/event-stream",
                         headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        self._closer = closer
        self._outcome = outcome

    async def __call__(self, scope, receive, send) -> None:
        try:
            with anyio.CancelScope() as gone:
                async with anyio.create_task_group() as tg:
                    tg.start_soon(cancel_when_disconnected, receive, gone)
                    try:
                        await self.stream_response(send)
                    except OSError:  # the client went away (servers of ASGI spec 2.4 raise it)
                        pass
                    tg.cancel_scope.cancel()
        finally:
            with anyio.CancelScope(shield=True):
                await self.body_iterator.aclose()
            await self._closer.close()
            self._outcome("aborted", "client_gone")  # unless counted: gone before the events began


class Closer:
    """Closes a backend iterator once, shielded from cancellation (closing is the abort)."""

    def __init__(self, it: AsyncIterator):
        self._it = it
        self._closed = False

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        aclose = getattr(self._it, "aclose", None)
        if aclose is None:
            return
        with anyio.CancelScope(shield=True):
            try:
                await aclose()
            except Exception:
                logger.exception("closing a backend stream failed")
