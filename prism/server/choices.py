"""The choices of one response: n backend streams (one per choice: n per prompt, times the
prompts of a completions request) read as one stream of (choice index, chunk), and what each
choice has produced so far."""
from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from typing import AsyncIterator

from prism.server import protocol as P
from prism.server.backend import GenerationChunk
from prism.types import TokenLogprobs


@dataclass
class Choice:
    """What the backend has produced so far for one choice."""

    index: int
    pieces: list[str] = field(default_factory=list)
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[TokenLogprobs] = field(default_factory=list)
    num_output_tokens: int = 0
    finish_reason: str | None = None
    done: bool = False

    def add(self, chunk: GenerationChunk) -> None:
        self.pieces.append(chunk.text)
        self.token_ids += chunk.token_ids
        self.logprobs += chunk.logprobs
        # The backend's running count when it gives one, else the ids seen so far.
        self.num_output_tokens = chunk.num_output_tokens or self.num_output_tokens + len(chunk.token_ids)
        if chunk.finish_reason is not None:
            self.finish_reason = chunk.finish_reason
            self.done = True

    @property
    def text(self) -> str:
        return "".join(self.pieces)


class Output:
    """Every choice of one response. Usage counts each prompt once and every choice's tokens."""

    def __init__(self, num_prompt_tokens: int, num_choices: int = 1):
        self.num_prompt_tokens = num_prompt_tokens
        self.choices = [Choice(i) for i in range(num_choices)]

    def add(self, index: int, chunk: GenerationChunk) -> Choice:
        choice = self.choices[index]
        choice.add(chunk)
        return choice

    @property
    def all_done(self) -> bool:
        return all(c.done for c in self.choices)

    def unfinished(self) -> list[Choice]:
        return [c for c in self.choices if not c.done]

    @property
    def finish_reason(self) -> str | None:
        """The first choice's (what /metrics counts a request by)."""
        return self.choices[0].finish_reason

    def usage(self) -> dict:
        return P.usage(self.num_prompt_tokens, sum(c.num_output_tokens for c in self.choices))


_ENDED = object()  # a choice's stream ended


class MergedStreams:
    """Several backend streams as one async iterator of (choice index, chunk), in arrival
    order. A failure of any stream is raised to the reader; `aclose` closes every stream
    (closing is how the backend aborts a request). One stream is read directly, without a
    task; several are each read by a task of their own into one queue."""

    def __init__(self, streams: list[AsyncIterator[GenerationChunk]]):
        self._streams = streams
        self._queue: asyncio.Queue = asyncio.Queue()
        self._tasks: list[asyncio.Task] = []
        self._open = len(streams)

    def __aiter__(self) -> MergedStreams:
        return self

    async def __anext__(self) -> tuple[int, GenerationChunk]:
        if len(self._streams) == 1:
            return 0, await anext(self._streams[0])
        if not self._tasks:
            self._tasks = [asyncio.create_task(self._pump(i, s)) for i, s in enumerate(self._streams)]
        while self._open:
            item = await self._queue.get()
            if item is _ENDED:
                self._open -= 1
            elif isinstance(item, BaseException):
                raise item
            else:
                return item
        raise StopAsyncIteration

    async def _pump(self, index: int, stream: AsyncIterator[GenerationChunk]) -> None:
        try:
            async for chunk in stream:
                self._queue.put_nowait((index, chunk))
        except Exception as e:  # the reader raises it
            self._queue.put_nowait(e)
        finally:
            self._queue.put_nowait(_ENDED)

    async def aclose(self) -> None:
        # A pump cancelled while it waits inside its stream closes that stream (the request is
        # aborted there); streams never started or already read to the end are closed below.
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        for stream in self._streams:
            aclose = getattr(stream, "aclose", None)
            if aclose is not None:
                await aclose()
