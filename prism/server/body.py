"""The edge: a request body read within its size limit, parsed as JSON no deeper than a limit
and with valid Unicode only, and validated as a request model. Everything a client can send
wrong is an OpenAI-shaped 4xx here, before anything reaches the serving system."""
from __future__ import annotations

import json
import re
from typing import TypeVar

from fastapi import Request
from pydantic import BaseModel, ValidationError
from starlette.requests import ClientDisconnect

from prism.cluster.config import DEFAULT_MAX_BODY_SIZE
from prism.server.errors import APIError, bad_request, client_gone, shorten, too_large, validation_error

M = TypeVar("M", bound=BaseModel)

MAX_BODY_BYTES = DEFAULT_MAX_BODY_SIZE  # a request body larger than this is refused (413); YAML: server.max_body_size
MAX_JSON_DEPTH = 64  # JSON nested deeper than this is refused (400)


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
        raise bad_request(f"could not parse the request body as JSON: {shorten(str(e), 200)}") from None
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


def check_token_ids(ids, vocab_size: int, param: str = "prompt") -> None:
    """APIError(400) naming `param` when a token id lies outside the vocabulary."""
    bad = next((t for t in ids if not 0 <= t < vocab_size), None)
    if bad is not None:
        raise bad_request(f"token id {bad} in '{param}' is outside the model's vocabulary (0..{vocab_size - 1})",
                          param)
