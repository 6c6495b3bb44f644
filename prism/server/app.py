"""The OpenAI-compatible HTTP frontend: validate, tokenize, hand to the backend, stream back.

It talks to the serving system only through `ServingBackend`. One choice = one
`backend.generate(GenerationRequest)` async iterator; a response's choices (n per prompt) are
read as one stream (`MergedStreams`) by exactly one task; closing it early (client gone,
error) is how the requests are aborted, and it is always closed, shielded from cancellation,
before the HTTP exchange ends.
"""
from __future__ import annotations

import asyncio
import hmac
import logging
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Awaitable, Callable, TypeVar

from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.openapi.docs import get_redoc_html, get_swagger_ui_html
from fastapi.openapi.utils import get_openapi
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel, ValidationError
from pydantic_core import PydanticCustomError

from prism.server import protocol as P
from prism.server.backend import GenerationRequest, ServingBackend
from prism.server.body import MAX_BODY_BYTES, check_token_ids, parse_body
from prism.server.choices import MergedStreams, Output
from prism.server.errors import APIError, bad_request, install_handlers, to_api_error, unknown_model
from prism.server.logprobs import TokenTexts
from prism.server.metrics import RequestOutcomes
from prism.server.streaming import (GONE, ChatCompletionShapes, Closer, CompletionShapes, Outcome, SSEResponse, collect,
                                    stream_events, unless_disconnected)
from prism.server.structured import check_grammar, schema_grammar
from prism.server.tool_shapes import ToolChatShapes
from prism.server.tools import ToolPlan, fallback_messages, plan_tools
from prism.types import RequestError

logger = logging.getLogger("prism.server")

T = TypeVar("T")


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

    for path, body, handler in _BODY_ROUTES:
        protected.add_api_route(path, getattr(frontend, handler), methods=["POST"], openapi_extra=_json_body(body))

    @protected.get("/openapi.json", include_in_schema=False)
    async def openapi():
        return JSONResponse(_openapi_schema(app, [m["id"] for m in P.model_list(backend.model_cards())["data"]]))

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


def _structured(body):
    """The body's structured_outputs (or guided_* fields); 400s for conflicting ones."""
    try:
        return body.structured()
    except ValidationError as e:
        raise bad_request(f"structured_outputs: {e.errors()[0]['msg']}", "structured_outputs") from None
    except PydanticCustomError as e:
        raise bad_request(f"structured_outputs: {e.message()}", "structured_outputs") from None


_REF_TEMPLATE = "#/components/schemas/{model}"
# The routes that read their bodies by hand (parse_body): path, body, the _Frontend method.
_BODY_ROUTES = (
    ("/v1/completions", P.CompletionRequest, "completions"),
    ("/v1/chat/completions", P.ChatCompletionRequest, "chat_completions"),
    ("/tokenize", P.TokenizeRequest, "tokenize"),
    ("/detokenize", P.DetokenizeRequest, "detokenize"),
)


def _json_body(model_cls: type[BaseModel]) -> dict:
    """An OpenAPI requestBody for a route that reads its body by hand (see parse_body); the
    schema itself is added to the components by _openapi_schema."""
    schema = {"$ref": _REF_TEMPLATE.format(model=model_cls.__name__)}
    return {"requestBody": {"required": True, "content": {"application/json": {"schema": schema}}}}


def _openapi_schema(app: FastAPI, served: list[str]) -> dict:
    """The OpenAPI document, its `model` fields naming the served models: a schema-driven client
    or fuzzer then reaches past the 404 of an unknown model."""
    if app.openapi_schema is None:
        schema = get_openapi(title=app.title, version=app.version, summary=app.summary, routes=app.routes)
        components = schema.setdefault("components", {}).setdefault("schemas", {})
        for _, model_cls, _ in _BODY_ROUTES:
            full = model_cls.model_json_schema(ref_template=_REF_TEMPLATE)
            components.update(full.pop("$defs", {}))
            components[model_cls.__name__] = full
            full["properties"]["model"]["enum"] = served
        for param in schema["paths"]["/v1/models/{model_id}"]["get"]["parameters"]:
            param["schema"]["enum"] = served
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


# ---- the frontend --------------------------------------------------------------------------
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
        received = time.monotonic()  # the client's wait starts here: tokenizing counts
        model = None
        try:
            body = await parse_body(request, P.CompletionRequest, self.max_body_bytes)
            model = body.model
            prompts = body.prompts
            if len(prompts) * body.num_choices > P.MAX_CHOICES:
                raise bad_request(f"{len(prompts)} prompts x n={body.num_choices} is more than "
                                  f"{P.MAX_CHOICES} choices in one request", "n")
            tokenizer = self._maybe_tokenizer(model)
            if tokenizer is None and any(isinstance(p, str) for p in prompts):
                self.backend.tokenizer(model)  # raises: the model has no tokenizer
            self._check_logit_bias(body, tokenizer)
            if tokenizer is not None:  # token ids pass through, checked against the vocabulary
                for p in prompts:
                    if not isinstance(p, str):
                        check_token_ids(p, tokenizer.vocab_size)
            prompt_ids = await self._in_tokenize_thread(
                lambda: [tokenizer.encode(p) if isinstance(p, str) else p for p in prompts])
            echo = None
            if body.echo:
                if tokenizer is None:
                    raise bad_request(f"echo needs the model's tokenizer; {model!r} has none", "echo")
                skip = body.skip_special_tokens is not False
                echo = [p if isinstance(p, str) else tokenizer.decode(p, skip) for p in prompts]
            grammar = await self._response_format_grammar(body, model)
            req_id = P.completion_id()
            reqs = self._choices(body, req_id, prompt_ids, body.max_tokens or 16, "prompt", received, grammar)
            texts = TokenTexts(tokenizer) if body.logprobs is not None else None
            echo = [e for e in echo for _ in range(body.num_choices)] if echo else None
            shapes = CompletionShapes(req_id, model, len(reqs), texts, echo)
            num_prompt_tokens = sum(len(ids) for ids in prompt_ids)
            return await self._respond(request, reqs, shapes, bool(body.stream), body.include_usage, num_prompt_tokens)
        except Exception as e:
            return self._error(e, model)

    async def chat_completions(self, request: Request) -> Response:
        received = time.monotonic()  # the client's wait starts here: templating counts
        model = None
        try:
            body = await parse_body(request, P.ChatCompletionRequest, self.max_body_bytes)
            model = body.model
            tokenizer = self.backend.tokenizer(model)
            self._check_logit_bias(body, tokenizer)
            parser = getattr(self.backend, "tool_parser", lambda _: None)(model)
            tools = plan_tools(body.tools, body.tool_choice, body.parallel_tool_calls, tokenizer, parser)
            messages = body.template_messages()
            if not tokenizer.template_supports_tools:  # tools and tool history, as the fallback writes them
                messages = fallback_messages(messages, tools.template_tools)
                template_tools = None
            else:
                template_tools = tools.template_tools
            prompt_ids = await self._in_tokenize_thread(tokenizer.apply_chat_template, messages, template_tools)
            grammar = await self._chat_grammar(body, tools, model)
            req_id = P.chat_completion_id()
            reqs = self._choices(body, req_id, [prompt_ids], body.requested_max_tokens(), "messages", received,
                                 grammar)
            texts = TokenTexts(tokenizer) if body.logprobs else None
            shapes = (ChatCompletionShapes(req_id, model, len(reqs), texts) if tools.mode == "none"
                      else ToolChatShapes(req_id, model, tools, len(reqs), texts))
            return await self._respond(request, reqs, shapes, bool(body.stream), body.include_usage, len(prompt_ids))
        except Exception as e:
            return self._error(e, model)

    def _choices(self, body: P._SamplingFields, req_id: str, prompts: list[list[int]], max_tokens: int | None,
                 param: str, received_s: float, grammar: str | None = None) -> list[GenerationRequest]:
        """One engine request per choice: n per prompt, in choice-index order (prompt i's
        choice j is choice i * n + j, as vLLM numbers them). Each choice gets the grammar,
        and the time the HTTP request came in (`received_s`, time.monotonic())."""
        n = body.num_choices
        reqs = []
        for ids in prompts:
            room = self._room_for_output(body.model, ids, param)
            limit = room if max_tokens is None else min(max_tokens, room)
            for j in range(n):
                # The first choice keeps the response's id: a single choice is as before.
                choice_id = req_id if not reqs else f"{req_id}-{len(reqs)}"
                reqs.append(body.generation_request(choice_id, ids, limit, choice=j, grammar=grammar,
                                                    received_s=received_s))
        return reqs

    def _check_logit_bias(self, body: P._SamplingFields, tokenizer) -> None:
        if body.logit_bias and tokenizer is not None:
            check_token_ids(body.logit_bias_ids(), tokenizer.vocab_size, "logit_bias")

    async def tokenize(self, request: Request) -> Response:
        """POST /tokenize: {count, max_model_len, tokens} (vLLM's answer)."""
        async def answer(body: P.TokenizeRequest, tokenizer) -> dict:
            if body.messages is not None:
                ids = await self._in_tokenize_thread(tokenizer.apply_chat_template, body.template_messages(),
                                                     None, body.add_generation_prompt)
            elif body.prompt is not None:
                ids = await self._in_tokenize_thread(tokenizer.encode, body.prompt, body.add_special_tokens)
            else:
                raise bad_request("send a prompt (a string) or messages to tokenize", "prompt")
            return {"count": len(ids), "max_model_len": self.backend.max_model_len(body.model), "tokens": ids}

        return await self._with_tokenizer(request, P.TokenizeRequest, answer)

    async def detokenize(self, request: Request) -> Response:
        """POST /detokenize: {prompt} (vLLM's answer)."""
        async def answer(body: P.DetokenizeRequest, tokenizer) -> dict:
            check_token_ids(body.tokens, tokenizer.vocab_size, "tokens")
            return {"prompt": await self._in_tokenize_thread(tokenizer.decode, body.tokens)}

        return await self._with_tokenizer(request, P.DetokenizeRequest, answer)

    async def _with_tokenizer(self, request: Request, kind: type, answer) -> Response:
        """Parse a /tokenize or /detokenize body, answer it with its model's tokenizer; any
        failure is an OpenAI error naming the model (once the body says which)."""
        model = None
        try:
            body = await parse_body(request, kind, self.max_body_bytes)
            model = body.model
            return JSONResponse(await answer(body, self.backend.tokenizer(body.model)))
        except Exception as e:
            return to_api_error(e, model).response()

    async def _response_format_grammar(self, body, model: str) -> str | None:
        """The grammar of the body's response_format or structured_outputs (None: plain text),
        checked against the model's tokenizer: a bad schema is a 400 before anything is queued."""
        param = "response_format"
        schema = body.response_format.schema_or_none() if body.response_format is not None else None
        structured = _structured(body)
        if structured is not None:
            if schema is not None:
                raise bad_request("give response_format or structured_outputs, not both", "structured_outputs")
            param, grammar = "structured_outputs", structured.grammar()
        elif schema is None:
            return None
        else:
            grammar = schema_grammar(schema, param)
        tokenizer = self._maybe_tokenizer(model)
        if tokenizer is None:
            raise bad_request(f"{param} needs a tokenizer, and model {model!r} has none", param)
        await self._in_tokenize_thread(check_grammar, grammar, tokenizer, param)
        return grammar

    async def _chat_grammar(self, body: P.ChatCompletionRequest, tools: ToolPlan, model: str) -> str | None:
        """A forced tool call's grammar, or the response_format's (not both)."""
        if tools.grammar is None:
            return await self._response_format_grammar(body, model)
        if (body.response_format is not None and body.response_format.type != "text") or _structured(body):
            raise bad_request("response_format and structured_outputs cannot be combined with a tool_choice that "
                              "forces a call", "response_format")
        await self._in_tokenize_thread(check_grammar, tools.grammar, self.backend.tokenizer(model), "tools")
        return tools.grammar

    def _error(self, exc: Exception, model: str | None) -> Response:
        err = to_api_error(exc, model)
        self._outcome(model)(*err.outcome)
        return err.response()

    def _outcome(self, model: str | None) -> Outcome:
        """A request's outcome counter, labelled with its model when the server has it (a
        client's made-up name must not become a label)."""
        try:
            known = model is not None and any(c.name == model for c in self.backend.model_cards())
        except Exception:
            known = False
        return Outcome(self.outcomes, model if known else "")

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

    async def _respond(self, request: Request, reqs: list[GenerationRequest], shapes: CompletionShapes,
                       stream: bool, include_usage: bool, num_prompt_tokens: int) -> Response:
        stream_it = MergedStreams([self.backend.generate(req) for req in reqs])
        closer = Closer(stream_it)
        out = Output(num_prompt_tokens, len(reqs))
        outcome = Outcome(self.outcomes, reqs[0].model)
        try:
            if not stream:
                out = await unless_disconnected(request.receive, lambda: collect(stream_it, out))
                await closer.close()
                if out is GONE:
                    outcome("aborted", "client_gone")
                    return Response(status_code=499)
                outcome("finished", out.finish_reason or "none")
                return JSONResponse(shapes.full(out))
            # Wait for the first chunk before answering, so that an early error is a plain JSON
            # error response (400/404/503) rather than a broken stream.
            first = await unless_disconnected(request.receive, lambda: anext(stream_it, None))
        except BaseException:
            await closer.close()
            raise
        if first is GONE:
            await closer.close()
            outcome("aborted", "client_gone")
            return Response(status_code=499)
        events = stream_events(stream_it, first, shapes, out, include_usage, closer, outcome)
        return SSEResponse(events, closer, outcome)
