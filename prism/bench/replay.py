"""Open-loop replay of a trace against any OpenAI-compatible endpoint.

Each request is sent at its arrival time whatever happened to earlier ones (open loop), as a
streaming completion of exactly input_len prompt tokens (token ids where the server accepts
them, else text) with max_tokens = output_len and EOS ignored. Per request we record when it
was sent, when each token arrived, when it finished, and any error.
"""
from __future__ import annotations

import asyncio
import json
import random
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from tqdm import tqdm

from prism.bench.trace import TraceRequest


@dataclass
class RequestRecord:
    index: int
    model: str
    input_len: int
    output_len: int
    arrival_s: float  # scheduled, from the replay start
    send_s: float | None = None  # actual, from the replay start
    token_s: list[float] = field(default_factory=list)  # each token's arrival, from the replay start
    finish_s: float | None = None
    finish_reason: str | None = None
    num_output_tokens: int | None = None  # from the final usage chunk
    error: str | None = None

    @property
    def ttft(self) -> float | None:
        return self.token_s[0] - self.send_s if self.token_s and self.send_s is not None else None

    @property
    def tpot(self) -> float | None:
        """Mean time per token after the first. Streamed chunks can carry no text for some
        tokens (held-back bytes, skipped specials), so the count comes from usage."""
        n = self.num_output_tokens or len(self.token_s)
        if len(self.token_s) < 2 or n < 2:
            return None
        return (self.token_s[-1] - self.token_s[0]) / (n - 1)

    @property
    def ok(self) -> bool:
        return self.error is None and self.finish_reason is not None


def prompt_ids(index: int, length: int, vocab: int = 20000) -> list[int]:
    """Deterministic token ids for request `index` (ids above 100 avoid special tokens)."""
    rng = random.Random(index)
    return [rng.randrange(100, vocab) for _ in range(length)]


async def _one(client, req: TraceRequest, rec: RequestRecord, start: float, use_ids: bool) -> None:
    prompt = req.prompt or (prompt_ids(rec.index, req.input_len) if use_ids else " hi" * req.input_len)
    rec.send_s = time.perf_counter() - start
    try:
        stream = await client.completions.create(
            model=req.model, prompt=prompt, max_tokens=req.output_len, temperature=0, stream=True,
            stream_options={"include_usage": True}, extra_body={"ignore_eos": True},
        )
        async for chunk in stream:
            now = time.perf_counter() - start
            if chunk.usage is not None:
                rec.num_output_tokens = chunk.usage.completion_tokens
            for choice in chunk.choices:
                if choice.text is not None and not choice.finish_reason:
                    rec.token_s.append(now)  # one chunk per token, text or not
                if choice.finish_reason:
                    rec.finish_reason = choice.finish_reason
        rec.finish_s = time.perf_counter() - start
    except Exception as e:  # recorded, counted as a miss; the replay goes on
        rec.error = f"{type(e).__name__}: {str(e)[:200]}"
        rec.finish_s = time.perf_counter() - start


async def replay(trace: list[TraceRequest], base_url: str, api_key: str = "none",
                 max_requests: int | None = None, max_duration_s: float | None = None,
                 use_token_ids: bool = True, progress: bool = True) -> list[RequestRecord]:
    import openai

    trace = [r for r in trace if max_duration_s is None or r.arrival_s <= max_duration_s][:max_requests]
    client = openai.AsyncOpenAI(base_url=base_url, api_key=api_key, max_retries=0, timeout=600)
    records = [RequestRecord(i, r.model, r.input_len, r.output_len, r.arrival_s) for i, r in enumerate(trace)]
    bar = tqdm(total=len(trace), desc="replay", unit="req", disable=not progress)
    start = time.perf_counter()

    async def fire(req, rec):
        await asyncio.sleep(max(0.0, req.arrival_s - (time.perf_counter() - start)))
        await _one(client, req, rec, start, use_token_ids)
        bar.update(1)

    try:
        await asyncio.gather(*(fire(r, rec) for r, rec in zip(trace, records)))
    finally:
        bar.close()
        await client.close()
    return records


def save_records(path: str | Path, records: list[RequestRecord]) -> None:
    Path(path).write_text("".join(json.dumps(asdict(r)) + "\n" for r in records))


def load_records(path: str | Path) -> list[RequestRecord]:
    return [RequestRecord(**json.loads(line)) for line in Path(path).read_text().splitlines() if line]
