"""One request's response: the shapes of completions and chat completions (whole or as
server-sent events), streaming them while noticing a client that leaves, and closing the
backend's iterator exactly once (closing it is how a request is aborted)."""
from __future__ import annotations

import json
import logging
from typing import AsyncIterator, Awaitable, Callable, TypeVar

import anyio
from fastapi.responses import StreamingResponse

from prism.server import protocol as P
from prism.server.backend import GenerationChunk
from prism.server.choices import Output
from prism.server.errors import to_api_error
from prism.server.logprobs import CompletionLogprobs, TokenTexts, chat_logprobs
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


# ---- response shapes -----------------------------------------------------------------------
class CompletionShapes:
    """Response shapes of POST /v1/completions: every choice whole, or one chunk of one
    choice. `echo`: each choice's prompt text, put before its text (the first chunk of a
    stream); `texts`: token strings for logprobs (None: the request did not ask for them)."""

    object_ = "text_completion"

    def __init__(self, req_id: str, model: str, num_choices: int = 1, texts: TokenTexts | None = None,
                 echo: list[str] | None = None):
        self.req_id, self.model, self.created = req_id, model, P.now()
        self.num_choices = num_choices
        self.texts = texts
        self._echo = list(echo) if echo else None
        self._logprobs = [CompletionLogprobs(texts) for _ in range(num_choices)] if texts else None

    def _prefix(self, index: int) -> str:
        """The echoed prompt, once per choice."""
        if self._echo is None:
            return ""
        prefix, self._echo[index] = self._echo[index], ""
        return prefix

    def _finish(self, reason: str | None) -> str:
        return client_finish_reason(reason, self.req_id)

    def full(self, out: Output) -> dict:
        choices = [P.completion_choice(c.index, self._prefix(c.index) + c.text, self._finish(c.finish_reason),
                                       self._logprobs_of(c.index, c.token_ids, c.logprobs)) for c in out.choices]
        return P.completion_body(self.req_id, self.created, self.model, choices, out.usage())

    def _logprobs_of(self, index: int, token_ids: list[int], logprobs: list) -> dict | None:
        return self._logprobs[index].render(token_ids, logprobs) if self._logprobs else None

    def first_events(self) -> list[dict]:
        return []

    def chunk_events(self, index: int, chunk: GenerationChunk, finish: str | None) -> list[dict]:
        """Events for one backend chunk of choice `index`; `finish` (the client's reason) is
        set on its last. A generated token whose text is still held back (part of a
        character, a possible stop string) is still sent, with empty text: clients then see
        every token's timing."""
        text = self._prefix(index) + chunk.text
        if not text and not chunk.token_ids and finish is None:
            return []
        choice = P.completion_choice(index, text, finish, self._logprobs_of(index, chunk.token_ids, chunk.logprobs))
        return [P.completion_body(self.req_id, self.created, self.model, [choice], chunk=True)]


class ChatCompletionShapes(CompletionShapes):
    """Response shapes of POST /v1/chat/completions."""

    object_ = "chat.completion.chunk"

    def _logprobs_of(self, index: int, token_ids: list[int], logprobs: list) -> dict | None:
        return chat_logprobs(token_ids, logprobs, self.texts) if self.texts else None

    def full(self, out: Output) -> dict:
        choices = [P.chat_choice(c.index, c.text, self._finish(c.finish_reason),
                                 self._logprobs_of(c.index, c.token_ids, c.logprobs)) for c in out.choices]
        return P.chat_body(self.req_id, self.created, self.model, choices, out.usage())

    def first_events(self) -> list[dict]:
        return [P.chat_chunk(self.req_id, self.created, self.model, {"role": "assistant", "content": ""}, index=i)
                for i in range(self.num_choices)]

    def chunk_events(self, index: int, chunk: GenerationChunk, finish: str | None) -> list[dict]:
        events = []
        if chunk.text or chunk.token_ids:  # empty deltas too: see CompletionShapes
            logprobs = self._logprobs_of(index, chunk.token_ids, chunk.logprobs) if chunk.token_ids else None
            events.append(P.chat_chunk(self.req_id, self.created, self.model, {"content": chunk.text},
                                       index=index, logprobs=logprobs))
        if finish is not None:
            events.append(P.chat_chunk(self.req_id, self.created, self.model, {}, finish, index=index))
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


Item = tuple[int, GenerationChunk]  # (choice index, chunk): what MergedStreams yields


async def collect(it: AsyncIterator[Item], out: Output) -> Output:
    async for index, chunk in it:
        out.add(index, chunk)
        if out.all_done:
            break
    return out


async def stream_events(it: AsyncIterator[Item], first: Item | None, shapes: CompletionShapes,
                         out: Output, include_usage: bool, closer: Closer,
                         outcome: Callable[[str, str], None]) -> AsyncIterator[bytes]:
    """SSE bytes of one streamed response; an error after the first byte becomes a final
    `data: {"error": ...}` event (and no [DONE])."""
    try:
        for event in shapes.first_events():
            yield sse(event)
        item = first
        while item is not None:
            index, chunk = item
            out.add(index, chunk)
            finish = None if chunk.finish_reason is None else client_finish_reason(chunk.finish_reason, shapes.req_id)
            for event in shapes.chunk_events(index, chunk, finish):
                yield sse(event)
            if out.all_done:
                break
            item = await anext(it, None)
        for choice in out.unfinished():  # the backend stopped without a finish reason
            choice.done = True
            for event in shapes.chunk_events(choice.index, GenerationChunk(""), client_finish_reason(None, shapes.req_id)):
                yield sse(event)
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
