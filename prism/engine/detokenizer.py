"""Streaming text out of generated token ids, and cutting it at stop strings."""
from __future__ import annotations

from prism.engine.tokenizer import Tokenizer

_REPLACEMENT = "\ufffd"  # what a lossy UTF-8 decode yields for an incomplete byte sequence


class IncrementalDetokenizer:
    """Turns token ids, one at a time, into newly printable text.

    Same scheme as tokenizers' DecodeStream: decode a short window of ids twice (with and
    without the new tokens) and emit the difference. The window starts at the previous
    emission point, so context-dependent decoders (SentencePiece's leading-space strip,
    byte fallback) see the same context as a full decode. Text ending in U+FFFD is held back:
    it is usually a UTF-8 character split across tokens that the next token completes.
    Unlike DecodeStream, flush() releases what is still held at the end, so the
    concatenated output always equals tokenizer.decode(all ids).
    """

    def __init__(self, tokenizer: Tokenizer, skip_special_tokens: bool = True):
        self._tok = tokenizer
        self._skip = skip_special_tokens
        self._ids: list[int] = []  # the window: ids from the previous emission point on
        self._prefix = ""  # decode of the window's ids that were already emitted
        self._prefix_len = 0  # how many of the window's ids those are

    def _decode(self, ids: list[int]) -> str:
        return self._tok.decode(ids, skip_special_tokens=self._skip)

    def step(self, token_id: int) -> str:
        self._ids.append(int(token_id))
        text = self._decode(self._ids)
        if len(text) <= len(self._prefix) or text.endswith(_REPLACEMENT):
            return ""  # nothing new (e.g. a skipped special token) or an unfinished character
        # Decoders only append for LLM tokenizers, so the emitted prefix is a prefix of text.
        new = text[len(self._prefix) :]
        # Slide the window: keep the ids just emitted as context for the next step.
        self._ids = self._ids[self._prefix_len :]
        self._prefix_len = len(self._ids)
        self._prefix = self._decode(self._ids)
        return new

    def flush(self) -> str:
        """Text still held back (a trailing U+FFFD that no later token completed)."""
        text = self._decode(self._ids)
        new = text[len(self._prefix) :]
        self._ids, self._prefix, self._prefix_len = [], "", 0
        return new


class StopStringMatcher:
    """Cuts streamed text at the first stop string (the stop string itself is not emitted)."""

    def __init__(self, stops: tuple[str, ...]):
        self._stops = tuple(s for s in stops if s)
        self._held = ""  # a tail that might be the start of a stop string
        self._stopped = False

    @property
    def stopped(self) -> bool:
        return self._stopped

    def feed(self, new_text: str) -> tuple[str, bool]:
        """Returns (text safe to emit now, whether a stop string was hit)."""
        if self._stopped:
            return "", True
        buf = self._held + new_text
        hit = self._first_stop(buf)
        if hit is not None:
            self._held, self._stopped = "", True
            return buf[:hit], True
        keep = self._partial_len(buf)
        self._held = buf[len(buf) - keep :] if keep else ""
        return buf[: len(buf) - keep], False

    def flush(self) -> str:
        """At the end of generation: the held-back tail was not a stop string after all."""
        held, self._held = self._held, ""
        return "" if self._stopped else held

    def _first_stop(self, buf: str) -> int | None:
        # The earliest start wins: text before it is all the user may see.
        found = [i for i in (buf.find(s) for s in self._stops) if i >= 0]
        return min(found) if found else None

    def _partial_len(self, buf: str) -> int:
        """Length of the longest tail of buf that is a proper prefix of some stop string."""
        best = 0
        for stop in self._stops:
            for n in range(min(len(stop) - 1, len(buf)), best, -1):
                if buf.endswith(stop[:n]):
                    best = n
                    break
        return best
