"""Open-loop replay of a trace against any OpenAI-compatible endpoint.

Each request is sent at its arrival time whatever happened to earlier ones (open loop), as a
streaming completion of about input_len prompt tokens with max_tokens = output_len and EOS
ignored. Prompts are token ids where the server accepts them: when it answers a token-id
prompt with a 400, that request is retried once with a text prompt of about the same length,
and if the text is accepted the model gets text prompts for the rest of the run. Per request
we record when it was sent, when each token arrived, when it finished, and any error.

Bounded by design: at most `max_requests` requests, none sent after `max_duration_s`, each
given up after `request_timeout_s` (an error, counted as a miss). Only loopback endpoints are
contacted unless `allow_remote=True`.
"""
from __future__ import annotations

import asyncio
import ipaddress
import random
import time
from urllib.parse import urlsplit

from tqdm import tqdm

from prism.bench.records import DEFAULT_REQUEST_TIMEOUT_S, RequestRecord
from prism.bench.trace import TraceRequest
from prism.client.sse_client import EndpointError, make_client, stream_completion
from prism.errors import UserError

# Short common English words: about one token each in the usual BPE vocabularies.
_WORDS = ("the", "of", "and", "to", "in", "is", "it", "that", "for", "on", "was", "with", "as", "at",
          "be", "by", "this", "had", "not", "are", "but", "from", "or", "have", "an", "they", "which",
          "one", "you", "were", "her", "all", "she", "there", "would", "their", "we", "him", "been")


def prompt_ids(index: int, length: int, vocab: int = 20000) -> list[int]:
    """Deterministic token ids for request `index` (ids above 100 avoid special tokens)."""
    rng = random.Random(index)
    return [rng.randrange(100, vocab) for _ in range(length)]


def text_prompt(index: int, length: int) -> str:
    """Deterministic text of `length` short words (about `length` tokens) for request `index`."""
    rng = random.Random(index)
    return "".join(" " + rng.choice(_WORDS) for _ in range(length))


def is_loopback_url(url: str) -> bool:
    host = (urlsplit(url).hostname or "").lower()
    if host == "localhost" or host.endswith(".localhost"):
        return True
    try:
        addr = ipaddress.ip_address(host)
    except ValueError:
        return False
    mapped = getattr(addr, "ipv4_mapped", None)
    return addr.is_loopback or bool(mapped and mapped.is_loopback)


def check_url(url: str, allow_remote: bool = False) -> None:
    """ValueError unless `url` is http(s) on loopback (127.0.0.0/8, localhost, ::1) or remote
    hosts are explicitly allowed."""
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise UserError(f"not an http(s) URL: {url!r}")
    if not allow_remote and not is_loopback_url(url):
        raise UserError(f"refusing to replay against {parts.hostname!r}: not a loopback address "
                         f"(127.0.0.0/8, localhost, ::1); pass allow_remote=True (--allow-remote) to send traffic to other hosts")


class _Run:
    """What one replay shares across its requests."""

    def __init__(self, client, start: float, use_token_ids: bool, request_timeout_s: float):
        self.client = client
        self.start = start
        self.use_token_ids = use_token_ids
        self.request_timeout_s = request_timeout_s
        self.text_models: set[str] = set()  # models that refused token ids and took text

    def now(self) -> float:
        return time.perf_counter() - self.start


async def _stream(run: _Run, req: TraceRequest, rec: RequestRecord, prompt) -> None:
    body = dict(model=req.model, prompt=prompt, max_tokens=req.output_len, temperature=0, stream=True,
                stream_options={"include_usage": True}, ignore_eos=True)
    async for chunk in stream_completion(run.client, body):
        now = run.now()
        if chunk.get("usage"):
            rec.num_output_tokens = chunk["usage"].get("completion_tokens")
        for choice in chunk.get("choices") or ():
            finish = choice.get("finish_reason")
            if choice.get("text") is not None and not finish:
                rec.token_s.append(now)  # one chunk per token, text or not
            if finish:
                rec.finish_reason = finish


async def _attempts(run: _Run, req: TraceRequest, rec: RequestRecord) -> None:
    if req.prompt is not None:
        rec.prompt_kind = "given"
        await _stream(run, req, rec, req.prompt)
        return
    if not run.use_token_ids or req.model in run.text_models:
        rec.prompt_kind = "text"
        await _stream(run, req, rec, text_prompt(rec.index, req.input_len))
        return
    rec.prompt_kind = "ids"
    try:
        await _stream(run, req, rec, prompt_ids(rec.index, req.input_len))
        return
    except EndpointError as e:
        if e.status_code != 400 or rec.token_s:
            raise
        first_error = _describe(e)
    rec.prompt_kind = "text"  # retried once, as text of about the same length
    try:
        await _stream(run, req, rec, text_prompt(rec.index, req.input_len))
    except EndpointError as e:
        if e.status_code == 400:
            raise RuntimeError(f"token ids refused ({first_error}); text refused too ({_describe(e)})") from None
        raise
    run.text_models.add(req.model)


async def _one(run: _Run, req: TraceRequest, rec: RequestRecord) -> None:
    rec.send_s = run.now()
    try:
        await asyncio.wait_for(_attempts(run, req, rec), run.request_timeout_s)
    except asyncio.TimeoutError:
        rec.error = f"Timeout: not finished within {run.request_timeout_s:g} s"
    except Exception as e:  # recorded, counted as a miss; the replay goes on
        rec.error = _describe(e)
    rec.finish_s = run.now()


def _describe(e: BaseException) -> str:
    return f"{type(e).__name__}: {str(e)[:200]}"


async def replay(trace: list[TraceRequest], base_url: str, api_key: str = "none",
                 max_requests: int | None = None, max_duration_s: float | None = None,
                 use_token_ids: bool = True, progress: bool = True,
                 request_timeout_s: float = DEFAULT_REQUEST_TIMEOUT_S,
                 allow_remote: bool = False) -> list[RequestRecord]:
    """Replay `trace` (arrival times from now) against `base_url` (e.g. http://127.0.0.1:8000/v1);
    one record per request sent, in trace order. The run ends at most request_timeout_s after
    the last arrival (max_duration_s, when given)."""
    check_url(base_url, allow_remote)
    if max_requests is not None and max_requests < 0:
        raise UserError(f"max_requests must be >= 0, got {max_requests}")
    if request_timeout_s <= 0:
        raise UserError(f"request timeout must be positive, got {request_timeout_s}")
    trace = [r for r in trace if max_duration_s is None or r.arrival_s <= max_duration_s][:max_requests]
    client = make_client(base_url, api_key, request_timeout_s)
    records = [RequestRecord(i, r.model, r.input_len, r.output_len, r.arrival_s) for i, r in enumerate(trace)]
    bar = tqdm(total=len(trace), desc="replay", unit="req", disable=not progress)
    run = _Run(client, time.perf_counter(), use_token_ids, request_timeout_s)

    async def fire(req, rec):
        await asyncio.sleep(max(0.0, req.arrival_s - run.now()))
        await _one(run, req, rec)
        bar.update(1)

    try:
        await asyncio.gather(*(fire(r, rec) for r, rec in zip(trace, records)))
    finally:
        bar.close()
        await client.aclose()
    return records
