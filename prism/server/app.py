"""The OpenAI-compatible HTTP frontend: validate, tokenize, hand to the backend, stream back.

It talks to the serving system only through `ServingBackend`. One request = one
`backend.generate(GenerationRequest)` async iterator, consumed by exactly one task; closing it
early (client gone, error) is how a request is aborted, and it is always closed, shielded from
cancellation, before the HTTP exchange ends.
"""
from __future__ import annotations

import asyncio
import hmac
import json
import logging
import re
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import AsyncIterator, Awaitable, Callable, TypeVar

import anyio
from starlette.requests import ClientDisconnect
from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.openapi.docs import get_redoc_html, get_swagger_ui_html
from fastapi.openapi.utils import get_openapi
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import BaseModel, ValidationError

from prism.cluster.config import DEFAULT_MAX_BODY_SIZE
from prism.server import protocol as P
from prism.server.backend import GenerationChunk, GenerationRequest, ServingBackend
from prism.server.errors import (APIError, bad_request, client_gone, install_handlers, to_api_error, too_large,
                                 unknown_model, validation_error)
from prism.server.metrics import RequestOutcomes
from prism.types import RequestError

logger = logging.getLogger("prism.server")

T = TypeVar("T")
M = TypeVar("M", bound=BaseModel)


MAX_BODY_BYTES = DEFAULT_MAX_BODY_SIZE  # a request body larger than this is refused (413); YAML: server.max_body_size
MAX_JSON_DEPTH = 64  # JSON nested deeper than this is refused (400)


def create_app(backend: ServingBackend, api_key: str | None = None, max_body_bytes: int = MAX_BODY_BYTES) -> FastAPI:
    """The FastAPI app serving `backend`. With `api_key`, /v1/*, /admin/* and the API docs
    (/docs, /redoc, /openapi.json) need `Authorization: Bearer <api_key>`; /health and /metrics
    stay open."""
    app = FastAPI(title="Prism", summary="OpenAI-compatible multi-model LLM server",
                  docs_url=None, redoc_url=None, openapi_url=None)  # served below, behind the key
    install_handlers(app)
    frontend = _Frontend(backend, max_body_bytes)

    @app.get("/health")
    async def health():
        # 200 while every model can be served (status "degraded" when a device is down but
        # others serve its models), 503 while some model cannot: a load balancer then sends
        # its traffic elsewhere. The details say which device is restarting or failed.
        try:
            ok = bool(backend.healthy())
            details = getattr(backend, "health_details", dict)()
        except Exception:
            logger.exception("backend.healthy() failed")
            ok, details = False, {}
        status = details.pop("status", None) or ("ok" if ok else "unhealthy")
        return JSONResponse({"status": status, **details}, status_code=200 if ok else 503)

    @app.get("/metrics")
    async def metrics():
        try:
            body, content_type = backend.metrics_text()
        except Exception as e:
            return to_api_error(e).response()
        return Response(content=body.rstrip(b"\n") + b"\n" + frontend.outcomes.exposition(), media_type=content_type)

    protected = APIRouter(dependencies=[Depends(_bearer_check(api_key))] if api_key else [])

    @protected.get("/v1/models")
    async def list_models():
        try:
            return JSONResponse(P.model_list(backend.model_cards()))
        except Exception as e:
            return to_api_error(e).response()

    @protected.get("/v1/models/{model_id:path}")
    async def retrieve_model(model_id: str):
        try:
            listed = P.model_list(backend.model_cards())["data"]
        except Exception as e:
            return to_api_error(e).response()
        card = next((m for m in listed if m["id"] == model_id), None)
        return JSONResponse(card) if card is not None else unknown_model(model_id).response()

    @protected.post("/v1/completions", openapi_extra=_json_body(P.CompletionRequest))
    async def completions(request: Request):
        return await frontend.completions(request)

    @protected.post("/v1/chat/completions", openapi_extra=_json_body(P.ChatCompletionRequest))
    async def chat_completions(request: Request):
        return await frontend.chat_completions(request)

    @protected.get("/openapi.json", include_in_schema=False)
    async def openapi():
        return JSONResponse(_openapi_schema(app))

    @protected.get("/docs", include_in_schema=False)
    async def docs():
        return get_swagger_ui_html(openapi_url="/openapi.json", title="Prism - Swagger UI")

    @protected.get("/redoc", include_in_schema=False)
    async def redoc():
        return get_redoc_html(openapi_url="/openapi.json", title="Prism - ReDoc")

    @protected.get("/admin/state")
    async def admin_state():
        try:
            return JSONResponse(backend.admin_view())
        except Exception as e:
            return to_api_error(e).response()

    app.include_router(protected)
    app.state.backend = backend
    return app


_REF_TEMPLATE = "#/components/schemas/{model}"


def _json_body(model_cls: type[BaseModel]) -> dict:
    """An OpenAPI requestBody for a route that reads its body by hand (see parse_body)."""
    schema = model_cls.model_json_schema(ref_template=_REF_TEMPLATE)
    schema.pop("$defs", None)  # added to components by _openapi_schema
    return {"requestBody": {"required": True, "content": {"application/json": {"schema": schema}}}}


def _openapi_schema(app: FastAPI) -> dict:
    if app.openapi_schema is None:
        schema = get_openapi(title=app.title, version=app.version, summary=app.summary, routes=app.routes)
        components = schema.setdefault("components", {}).setdefault("schemas", {})
        for model_cls in (P.CompletionRequest, P.ChatCompletionRequest):
            full = model_cls.model_json_schema(ref_template=_REF_TEMPLATE)
            components.update(full.pop("$defs", {}))
            components[model_cls.__name__] = full
        app.openapi_schema = schema
    return app.openapi_schema


def _bearer_check(api_key: str) -> Callable[[Request], Awaitable[None]]:
    expected = api_key.encode()

    async def check(request: Request) -> None:
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), expected):
            raise APIError(401, "Incorrect or missing API key: send it as 'Authorization: Bearer <key>'.",
                           "invalid_request_error", None, "invalid_api_key")

    return check


async def read_body(request: Request, limit: int) -> bytes:
    """The request body; APIError(413) when its Content-Length or what arrives exceeds `limit`."""
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise too_large(limit)
    chunks, size = [], 0
    try:
        async for chunk in request.stream():
            size += len(chunk)
            if size > limit:
                raise too_large(limit)
            chunks.append(chunk)
    except ClientDisconnect:
        raise client_gone() from None
    return b"".join(chunks)


async def parse_body(request: Request, model_cls: type[M], limit: int = MAX_BODY_BYTES) -> M:
    """The JSON body validated as `model_cls`; APIError(400) naming the bad field otherwise
    (413 when too large)."""
    raw = await read_body(request, limit)
    try:
        data = json.loads(raw)
    except RecursionError:
        raise _too_deep() from None
    except (ValueError, UnicodeDecodeError) as e:  # JSONDecodeError; an integer of 4,300+ digits
        raise bad_request(f"could not parse the request body as JSON: {_short(str(e))}") from None
    if not isinstance(data, dict):
        raise bad_request("the request body must be a JSON object")
    check_json_value(data)
    try:
        return model_cls.model_validate(data)
    except ValidationError as e:
        raise validation_error(e.errors()) from None


_SURROGATE = re.compile("[\ud800-\udfff]")


def check_json_value(value, max_depth: int = MAX_JSON_DEPTH) -> None:
    """APIError(400) for JSON nested deeper than `max_depth` or holding a string that is not
    valid Unicode (a lone surrogate escape such as "\\ud800"); walked without recursion."""
    stack = [(value, 1)]
    while stack:
        v, depth = stack.pop()
        if isinstance(v, str):
            if not v.isascii() and _SURROGATE.search(v):
                raise bad_request("the request body holds a string that is not valid Unicode "
                                  "(a lone surrogate such as \\ud800)")
        elif isinstance(v, (dict, list)):
            if depth > max_depth:
                raise _too_deep(max_depth)
            items = [*v.keys(), *v.values()] if isinstance(v, dict) else v
            stack.extend((x, depth + 1) for x in items)


def _too_deep(max_depth: int = MAX_JSON_DEPTH) -> APIError:
    return bad_request(f"the request body's JSON is nested deeper than {max_depth} levels")


def _short(text: str, limit: int = 200) -> str:
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _check_token_ids(ids: list[int], vocab_size: int) -> None:
    bad = next((t for t in ids if not 0 <= t < vocab_size), None)
    if bad is not None:
        raise bad_request(f"token id {bad} in the prompt is outside the model's vocabulary (0..{vocab_size - 1})",
                          "prompt")


def client_finish_reason(reason: str | None, req_id: str) -> str:
    """The backend's finish reason as a client sees it: "stop" / "length"; an abort (or an
    output that ended without a reason) is reported as "stop" and logged."""
    if reason in ("stop", "length"):
        return reason
    logger.warning("request %s ended with finish reason %r; reporting 'stop'", req_id, reason)
    return "stop"


# ---- one request's output ------------------------------------------------------------------
@dataclass
class _Output:
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


class _Completions:
    """Response shapes of POST /v1/completions."""

    object_ = "text_completion"

    def __init__(self, req_id: str, model: str):
        self.req_id, self.model, self.created = req_id, model, P.now()

    def full(self, out: _Output) -> dict:
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


class _ChatCompletions(_Completions):
    """Response shapes of POST /v1/chat/completions."""

    object_ = "chat.completion.chunk"

    def full(self, out: _Output) -> dict:
        finish = client_finish_reason(out.finish_reason, self.req_id)
        return P.chat_body(self.req_id, self.created, self.model, out.text, finish, out.usage())

    def first_events(self) -> list[dict]:
        return [P.chat_chunk(self.req_id, self.created, self.model, {"role": "assistant", "content": ""})]

    def chunk_events(self, chunk: GenerationChunk, finish: str | None) -> list[dict]:
        has_delta = chunk.text or chunk.token_ids  # empty deltas too: see _Completions
        events = [P.chat_chunk(self.req_id, self.created, self.model, {"content": chunk.text})] if has_delta else []
        if finish is not None:
            events.append(P.chat_chunk(self.req_id, self.created, self.model, {}, finish))
        return events


def _sse(obj: dict) -> bytes:
    return b"data: " + json.dumps(obj, ensure_ascii=False, separators=(",", ":")).encode() + b"\n\n"


_DONE = b"data: [DONE]\n\n"


# ---- the frontend --------------------------------------------------------------------------
class _Outcome:
    """Counts one request's outcome once (the first call wins)."""

    def __init__(self, outcomes: RequestOutcomes, model: str):
        self._outcomes, self.model, self.counted = outcomes, model, False

    def __call__(self, outcome: str, reason: str) -> None:
        if not self.counted:
            self.counted = True
            self._outcomes.record(self.model, outcome, reason)


class _Frontend:
    def __init__(self, backend: ServingBackend, max_body_bytes: int = MAX_BODY_BYTES):
        self.backend = backend
        self.max_body_bytes = max_body_bytes
        self.outcomes = RequestOutcomes()
        # Tokenizing a long prompt takes milliseconds: do it off the event loop, on one thread
        # (HF tokenizers are not safe to call from several threads at once).
        self._tokenize_pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="prism-tokenize")

    async def _in_tokenize_thread(self, fn: Callable[..., T], *args) -> T:
        return await asyncio.get_running_loop().run_in_executor(self._tokenize_pool, fn, *args)

    async def completions(self, request: Request) -> Response:
        model = None
        try:
            body = await parse_body(request, P.CompletionRequest, self.max_body_bytes)
            model = body.model
            if isinstance(body.prompt, str):
                prompt_ids = await self._in_tokenize_thread(self.backend.tokenizer(model).encode, body.prompt)
            else:  # token ids pass through, checked against the vocabulary where there is one
                prompt_ids = body.prompt
                tokenizer = self._maybe_tokenizer(model)
                if tokenizer is not None:
                    _check_token_ids(prompt_ids, tokenizer.vocab_size)
            room = self._room_for_output(model, prompt_ids, "prompt")
            req = body.generation_request(P.completion_id(), prompt_ids, min(body.max_tokens or 16, room))
            shapes = _Completions(req.req_id, model)
            return await self._respond(request, req, shapes, bool(body.stream), body.include_usage)
        except Exception as e:
            return self._error(e, model)

    async def chat_completions(self, request: Request) -> Response:
        model = None
        try:
            body = await parse_body(request, P.ChatCompletionRequest, self.max_body_bytes)
            model = body.model
            tokenizer = self.backend.tokenizer(model)
            prompt_ids = await self._in_tokenize_thread(tokenizer.apply_chat_template, body.template_messages())
            room = self._room_for_output(model, prompt_ids, "messages")
            requested = body.requested_max_tokens()
            max_tokens = room if requested is None else min(requested, room)
            req = body.generation_request(P.chat_completion_id(), prompt_ids, max_tokens)
            shapes = _ChatCompletions(req.req_id, model)
            return await self._respond(request, req, shapes, bool(body.stream), body.include_usage)
        except Exception as e:
            return self._error(e, model)

    def _error(self, exc: Exception, model: str | None) -> Response:
        err = to_api_error(exc, model)
        self._outcome(model)(*err.outcome)
        return err.response()

    def _outcome(self, model: str | None) -> _Outcome:
        """A request's outcome counter, labelled with its model when the server has it (a
        client's made-up name must not become a label)."""
        try:
            known = model is not None and any(c.name == model for c in self.backend.model_cards())
        except Exception:
            known = False
        return _Outcome(self.outcomes, model if known else "")

    def _maybe_tokenizer(self, model: str):
        """The model's tokenizer, or None when it has none (token-id prompts still work)."""
        try:
            return self.backend.tokenizer(model)
        except RequestError:
            return None

    def _room_for_output(self, model: str, prompt_ids: list[int], param: str) -> int:
        """How many tokens may follow the prompt; a 400 when none may."""
        if not prompt_ids:
            raise bad_request("the prompt is empty", param)
        max_len = self.backend.max_model_len(model)
        if len(prompt_ids) >= max_len:
            raise bad_request(
                f"This model's maximum context length is {max_len} tokens, but the prompt has "
                f"{len(prompt_ids)} tokens (at least one must remain for the output).",
                param, "context_length_exceeded",
            )
        return max_len - len(prompt_ids)

    async def _respond(self, request: Request, req: GenerationRequest, shapes: _Completions,
                       stream: bool, include_usage: bool) -> Response:
        stream_it = self.backend.generate(req)
        closer = _Closer(stream_it)
        num_prompt_tokens = len(req.prompt_token_ids)
        outcome = _Outcome(self.outcomes, req.model)
        try:
            if not stream:
                out = await _unless_disconnected(request.receive, lambda: _collect(stream_it, num_prompt_tokens))
                await closer.close()
                if out is _GONE:
                    outcome("aborted", "client_gone")
                    return Response(status_code=499)
                outcome("finished", out.finish_reason or "none")
                return JSONResponse(shapes.full(out))
            # Wait for the first chunk before answering, so that an early error is a plain JSON
            # error response (400/404/503) rather than a broken stream.
            first = await _unless_disconnected(request.receive, lambda: anext(stream_it, None))
        except BaseException:
            await closer.close()
            raise
        if first is _GONE:
            await closer.close()
            outcome("aborted", "client_gone")
            return Response(status_code=499)
        events = _stream_events(stream_it, first, shapes, num_prompt_tokens, include_usage, closer, outcome)
        return _SSEResponse(events, closer, outcome)


_GONE = object()  # what _unless_disconnected returns when the client went away


async def _cancel_when_disconnected(receive: Callable[[], Awaitable[dict]], scope: anyio.CancelScope) -> None:
    while (await receive())["type"] != "http.disconnect":
        pass
    scope.cancel()


async def _unless_disconnected(receive: Callable[[], Awaitable[dict]], fn: Callable[[], Awaitable[T]]) -> T | object:
    """await fn() in this task, cancelled if the client disconnects meanwhile (then: _GONE)."""
    result: T | object = _GONE
    error: Exception | None = None
    with anyio.CancelScope() as scope:
        async with anyio.create_task_group() as tg:
            tg.start_soon(_cancel_when_disconnected, receive, scope)
            try:
                result = await fn()
            except Exception as e:  # re-raised outside the task group, unwrapped
                error = e
            tg.cancel_scope.cancel()
    if error is not None:
        raise error
    return result


async def _collect(it: AsyncIterator[GenerationChunk], num_prompt_tokens: int) -> _Output:
    out = _Output(num_prompt_tokens)
    async for chunk in it:
        out.add(chunk)
        if chunk.finish_reason is not None:
            break
    return out


async def _stream_events(it: AsyncIterator[GenerationChunk], first: GenerationChunk | None, shapes: _Completions,
                         num_prompt_tokens: int, include_usage: bool, closer: _Closer,
                         outcome: Callable[[str, str], None]) -> AsyncIterator[bytes]:
    """SSE bytes of one streamed response; an error after the first byte becomes a final
    `data: {"error": ...}` event (and no [DONE])."""
    out = _Output(num_prompt_tokens)
    try:
        for event in shapes.first_events():
            yield _sse(event)
        chunk = first
        while True:
            ended = chunk is None  # the backend stopped without a finish reason
            chunk = chunk or GenerationChunk(text="")
            out.add(chunk)
            final = ended or chunk.finish_reason is not None
            finish = client_finish_reason(chunk.finish_reason, shapes.req_id) if final else None
            for event in shapes.chunk_events(chunk, finish):
                yield _sse(event)
            if final:
                break
            chunk = await anext(it, None)
        await closer.close()
        outcome("finished", out.finish_reason or "none")
        if include_usage:
            yield _sse(P.usage_chunk(shapes.req_id, shapes.created, shapes.model, shapes.object_, out.usage()))
        yield _DONE
    except Exception as e:
        err = to_api_error(e, shapes.model)
        outcome(*err.outcome)
        yield _sse(err.body())
    finally:
        outcome("aborted", "client_gone")  # unless counted above: the client went away
        await closer.close()


class _SSEResponse(StreamingResponse):
    """A text/event-stream response that notices a client leaving even while the backend is
    silent (any ASGI server), and always closes the body and the backend iterator."""

    def __init__(self, events: AsyncIterator[bytes], closer: _Closer, outcome: Callable[[str, str], None]):
        super().__init__(events, media_type="text/event-stream",
                         headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        self._closer = closer
        self._outcome = outcome

    async def __call__(self, scope, receive, send) -> None:
        try:
            with anyio.CancelScope() as gone:
                async with anyio.create_task_group() as tg:
                    tg.start_soon(_cancel_when_disconnected, receive, gone)
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


class _Closer:
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
