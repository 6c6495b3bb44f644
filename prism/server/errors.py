"""OpenAI-shaped error responses: {"error": {"message", "type", "param", "code"}}.

Every failure the HTTP layer can see maps to one `APIError` (status + body); `install_handlers`
makes FastAPI answer every path (bad JSON, validation, unknown routes, crashes) in that shape.
"""
from __future__ import annotations

import logging
import math

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from prism.server.backend import RequestTimedOut, ServerBusy, UnknownModel, WorkerFailed
from prism.types import RequestError

logger = logging.getLogger("prism.server")

INVALID_REQUEST = "invalid_request_error"
AUTHENTICATION = "authentication_error"
NOT_FOUND = "not_found_error"
SERVER_ERROR = "server_error"
INTERNAL_MESSAGE = "The server had an error while processing your request."


class APIError(Exception):
    """A failure to report to the client as is."""

    def __init__(self, status: int, message: str, type: str = INVALID_REQUEST,
                 param: str | None = None, code: str | None = None, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.headers = headers or {}
        self.status = status
        self.message = message
        self.type = type
        self.param = param
        self.code = code

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}

    def response(self, headers: dict[str, str] | None = None) -> JSONResponse:
        headers = {**self.headers, **(headers or {})}
        if self.status == 401:
            headers["WWW-Authenticate"] = "Bearer"
        return JSONResponse(self.body(), status_code=self.status, headers=headers or None)

    @property
    def outcome(self) -> tuple[str, str]:
        """How /metrics counts a request that ended with this error: (outcome, reason)."""
        if self.code == "client_gone":
            return "aborted", "client_gone"
        if self.status >= 500 and self.code != "server_busy":
            return "failed", self.code or "internal_error"
        reason = {"context_length_exceeded": "too_long", "model_not_found": "unknown_model",
                  "server_busy": "busy", "request_too_large": "too_large"}.get(self.code or "")
        return "rejected", reason or ("unauthorized" if self.status == 401 else "bad_request")


def bad_request(message: str, param: str | None = None, code: str | None = None) -> APIError:
    return APIError(400, message, INVALID_REQUEST, param, code)


def too_large(limit: int) -> APIError:
    return APIError(413, f"The request body is larger than this server's limit of {limit} bytes.",
                    INVALID_REQUEST, None, "request_too_large")


def client_gone() -> APIError:
    """The client went away before its request was read (nobody reads the answer)."""
    return APIError(499, "The client closed the request.", INVALID_REQUEST, None, "client_gone")


def unknown_model(model: str) -> APIError:
    return APIError(404, f"The model `{model}` does not exist.", INVALID_REQUEST, "model", "model_not_found")


def to_api_error(exc: BaseException, model: str | None = None) -> APIError:
    """The error a client sees for `exc`; unexpected exceptions are logged with a traceback."""
    if isinstance(exc, APIError):
        return exc
    if isinstance(exc, RequestError):
        return bad_request(str(exc))
    if isinstance(exc, UnknownModel):
        message = str(exc)
        if model is not None and message.strip("'\"` ") in ("", model):  # a bare name: say more
            return unknown_model(model)
        return APIError(404, message or "The model does not exist.", INVALID_REQUEST, "model", "model_not_found")
    if isinstance(exc, ServerBusy):
        retry = {} if exc.retry_after_s is None else {"Retry-After": str(max(1, math.ceil(exc.retry_after_s)))}
        if isinstance(exc, WorkerFailed):
            return APIError(503, str(exc) or "The worker serving this request stopped; retry later.", SERVER_ERROR,
                            None, "worker_failed", retry)
        return APIError(503, str(exc) or "The server is busy; retry later.", SERVER_ERROR, None, "server_busy", retry)
    if isinstance(exc, RequestTimedOut):
        return APIError(504, str(exc) or "The request took longer than this server allows.", SERVER_ERROR,
                        None, "request_timeout")
    if isinstance(exc, ValidationError):
        return validation_error(exc.errors())
    logger.error("unexpected error while serving a request", exc_info=exc)
    return APIError(500, INTERNAL_MESSAGE, SERVER_ERROR, None, "internal_error")


def _param_name(loc: tuple) -> str | None:
    """("messages", 0, "role") -> "messages[0].role"; FastAPI's leading "body" is dropped."""
    parts = list(loc)
    if parts and parts[0] == "body":
        parts = parts[1:]
    name = ""
    for p in parts:
        name += f"[{p}]" if isinstance(p, int) else (f".{p}" if name else str(p))
    return name or None


def validation_error(errors: list[dict]) -> APIError:
    """A pydantic/FastAPI validation failure as a 400 naming the first bad field."""
    if not errors:
        return bad_request("invalid request body")
    err = errors[0]
    if err.get("type") == "json_invalid":
        return bad_request(f"could not parse the request body as JSON: {err.get('ctx', {}).get('error', err.get('msg'))}")
    param = _param_name(tuple(err.get("loc", ())))
    msg = str(err.get("msg", "invalid value"))
    msg = msg.removeprefix("Value error, ")
    if err.get("type") == "missing":
        return bad_request(f"'{param}' is a required field", param)
    if param is None:
        return bad_request(msg)
    got = err.get("input")
    shown = "" if isinstance(got, (dict, list)) or got is None else f" (got {shorten(repr(got))})"
    return bad_request(f"invalid value for '{param}': {msg}{shown}", param)


def shorten(text: str, limit: int = 80) -> str:
    return text if len(text) <= limit else text[: limit - 3] + "..."


def install_handlers(app: FastAPI) -> None:
    @app.exception_handler(APIError)
    async def _api_error(request: Request, exc: APIError):
        return exc.response()

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError):
        return validation_error(list(exc.errors())).response()

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException):
        type_ = NOT_FOUND if exc.status_code == 404 else INVALID_REQUEST
        return APIError(exc.status_code, str(exc.detail), type_).response(exc.headers)  # 405: Allow

    @app.exception_handler(Exception)
    async def _any(request: Request, exc: Exception):
        return to_api_error(exc).response()
