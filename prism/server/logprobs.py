"""Log-probabilities as OpenAI shows them: chat's `logprobs.content` entries ({token, logprob,
bytes, top_logprobs}) and completions' four parallel lists (tokens, token_logprobs,
top_logprobs, text_offset). The values come from the engine (the raw distribution); here
token ids become the strings a client reads."""
from __future__ import annotations

from prism.engine.tokenizer import Tokenizer
from prism.types import TokenLogprobs

LOGPROB_FLOOR = -9999.0  # JSON has no -inf: an impossible token shows this (as vLLM)


class TokenTexts:
    """Each token id's own text (decoded alone, special tokens kept, as vLLM shows them), or
    "token_id:<id>" for a model without a tokenizer (vLLM's return_tokens_as_token_ids form)."""

    def __init__(self, tokenizer: Tokenizer | None):
        self.tokenizer = tokenizer
        self._cache: dict[int, str] = {}

    def __call__(self, token_id: int) -> str:
        text = self._cache.get(token_id)
        if text is None:
            text = (f"token_id:{token_id}" if self.tokenizer is None
                    else self.tokenizer.decode([token_id], skip_special_tokens=False))
            self._cache[token_id] = text
        return text


def _shown(logprob: float) -> float:
    return max(logprob, LOGPROB_FLOOR)


def chat_logprobs(token_ids: list[int], entries: list[TokenLogprobs], texts: TokenTexts) -> dict:
    """`choices[].logprobs` of a chat completion (or of one streamed chunk)."""
    def entry(token: str, logprob: float) -> dict:
        return {"token": token, "logprob": _shown(logprob), "bytes": list(token.encode("utf-8"))}

    content = []
    for token_id, lp in zip(token_ids, entries):
        top = [entry(texts(i), v) for i, v in lp.top]
        content.append({**entry(texts(token_id), lp.logprob), "top_logprobs": top})
    return {"content": content}


class CompletionLogprobs:
    """`choices[].logprobs` of a completion, one choice's: text offsets run on across the
    chunks of a stream. top_logprobs holds the N most likely tokens and the sampled one (up
    to N + 1 entries, as OpenAI's legacy completions)."""

    def __init__(self, texts: TokenTexts, offset: int = 0):
        self.texts = texts
        self.offset = offset

    def render(self, token_ids: list[int], entries: list[TokenLogprobs]) -> dict:
        tokens, token_logprobs, top_logprobs, text_offset = [], [], [], []
        for token_id, lp in zip(token_ids, entries):
            token = self.texts(token_id)
            top = {self.texts(i): _shown(v) for i, v in lp.top}
            top.setdefault(token, _shown(lp.logprob))
            tokens.append(token)
            token_logprobs.append(_shown(lp.logprob))
            top_logprobs.append(top)
            text_offset.append(self.offset)
            self.offset += len(token)
        return {"tokens": tokens, "token_logprobs": token_logprobs, "top_logprobs": top_logprobs,
                "text_offset": text_offset}
