"""A lean streaming client for OpenAI-compatible completions (what the replay sends).

The `openai` client builds typed objects for every streamed chunk, which costs a few hundred
microseconds of CPU per token: at a few thousand tokens per second the load generator, not
the server, sets the pace. Here each `data:` line is decoded by msgspec into plain dicts.
httpx2 is the HTTP library the `openai` package itself depends on.
"""
from __future__ import annotations

from collections.abc import AsyncIterator

import httpx2
import msgspec

from prism.errors import PrismError

_DECODE = msgspec.json.Decoder()


class EndpointError(PrismError):
    """The endpoint answered with an HTTP error status."""

    def __init__(self, status_code: int, message: str):
        super().__init__(f"HTTP {status_code}: {message}")
        self.status_code = status_code
        self.message = message


def _error_message(body: bytes) -> str:
    try:
        err = _DECODE.decode(body)
        return str(err.get("error", {}).get("message") or err)[:300]
    except (msgspec.DecodeError, AttributeError):
        return body.decode(errors="replace")[:300]


def make_client(base_url: str, api_key: str, timeout_s: float) -> httpx2.AsyncClient:
    limits = httpx2.Limits(max_connections=None, max_keepalive_connections=256)
    return httpx2.AsyncClient(base_url=base_url.rstrip("/") + "/", timeout=timeout_s, limits=limits,
                              headers={"Authorization": f"Bearer {api_key}"})


async def stream_completion(client: httpx2.AsyncClient, body: dict) -> AsyncIterator[dict]:
    """POST /completions with stream=True; yield each chunk as a dict, until [DONE]."""
    async with client.stream("POST", "completions", json=body) as resp:
        if resp.status_code != 200:
            raise EndpointError(resp.status_code, _error_message(await resp.aread()))
        async for line in resp.aiter_lines():
            if not line.startswith("data:"):
                continue
            data = line[5:].strip()
            if data == "[DONE]":
                return
            chunk = _DECODE.decode(data)
            if "error" in chunk:  # an error reported mid-stream
                raise EndpointError(500, str(chunk["error"].get("message", chunk["error"]))[:300])
            yield chunk
