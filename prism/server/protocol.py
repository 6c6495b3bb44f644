"""OpenAI request bodies (completions, chat completions, tokenize), response shapes, and the
conversion of a validated request into the backend's `GenerationRequest`s (one per choice).
Structured output (response_format, structured_outputs) and tools are described by
structured.py and tools.py; every choice of a request gets the same grammar.

Requests are validated more strictly than SamplingParams (OpenAI's ranges); unknown fields are
ignored, OpenAI fields whose meaning Prism does not implement are refused with a 400 rather
than silently dropped.

`n` > 1 is n engine requests sharing the prompt (as vLLM v1's ParentRequest fans a request
out to n children): the engine, its scheduler and preemption stay one sequence per request,
each choice gets its own SLO accounting, and a seeded request gives choice i the seed
seed + i, so every choice is reproducible and no two are alike.
"""
from __future__ import annotations

import time
import uuid
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, WithJsonSchema, field_validator, model_validator
from pydantic_core import PydanticCustomError

from prism.server.backend import GenerationRequest
from prism.server.structured import ResponseFormat, StructuredOutputs
from prism.server.tools import Tool, ToolCallIn, ToolChoice
from prism.types import LOGIT_BIAS_RANGE, MAX_LOGIT_BIAS, MAX_LOGPROBS, PENALTY_RANGE, SamplingParams

MAX_STOP_STRINGS = 4
MAX_N = 16  # choices per prompt: each is a whole engine request (OpenAI allows 128, vLLM has no bound)
MAX_CHOICES = 256  # prompts x n in one completions request
# Integer ranges the engine and the worker messages can carry (msgspec encodes at most 64 bits):
# a client's 2**70 is a 400 naming the field, never a 500.
INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1
INT32_MIN, INT32_MAX = -(2**31), 2**31 - 1
MAX_TOKEN_ID = 2**31 - 1
TokenId = Annotated[int, Field(ge=0, le=MAX_TOKEN_ID)]


def _unsupported(what: str) -> PydanticCustomError:
    return PydanticCustomError("unsupported", "{what} is not supported by this server", {"what": what})


def _refuse_unless(accepted, what: str, *fields: str):
    """A validator for OpenAI fields Prism does not implement: values other than the
    accepted ones are refused with a clear 400 naming the field."""

    def check(cls, v):
        if not accepted(v):
            raise _unsupported(what)
        return v

    return field_validator(*fields)(classmethod(check))


def _is_one(v) -> bool:
    return v is None or v == 1


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="ignore")
    include_usage: bool | None = False


class _SamplingFields(BaseModel):
    """The fields completions and chat completions share."""

    model_config = ConfigDict(extra="ignore")

    model: str = Field(min_length=1)
    temperature: float | None = Field(None, ge=0.0, le=2.0, allow_inf_nan=False)
    top_p: float | None = Field(None, gt=0.0, le=1.0, allow_inf_nan=False)
    top_k: int | None = Field(None, ge=-1, le=INT32_MAX)  # extension: -1 or 0 off
    seed: int | None = Field(None, ge=INT64_MIN, le=INT64_MAX)
    # Checked by hand (_check_stop, _check_prompt) for OpenAI's error wording; the schema still
    # says what is accepted, for clients and schema-driven fuzzers.
    stop: Annotated[Any, WithJsonSchema({"anyOf": [{"type": "string"}, {"type": "array", "items": {"type": "string"}},
                                                   {"type": "null"}]})] = None
    stop_token_ids: list[TokenId] | None = None  # extension
    ignore_eos: bool | None = False  # extension
    skip_special_tokens: bool | None = True  # extension
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    n: int | None = Field(None, ge=1, le=MAX_N)
    presence_penalty: float | None = Field(None, ge=-PENALTY_RANGE, le=PENALTY_RANGE, allow_inf_nan=False)
    frequency_penalty: float | None = Field(None, ge=-PENALTY_RANGE, le=PENALTY_RANGE, allow_inf_nan=False)
    repetition_penalty: float | None = Field(None, gt=0.0, le=100.0, allow_inf_nan=False)  # extension (vLLM)
    min_p: float | None = Field(None, ge=0.0, le=1.0, allow_inf_nan=False)  # extension (vLLM)
    logit_bias: dict[str, float] | None = None  # token id (a JSON key, so a string) -> bias: _check_logit_bias
    user: str | None = None
    # Prism extensions: per-request SLOs (None: the model's default) and priority.
    ttft_slo_ms: float | None = Field(None, gt=0.0, allow_inf_nan=False)
    tpot_slo_ms: float | None = Field(None, gt=0.0, allow_inf_nan=False)
    priority: int | None = Field(0, ge=INT32_MIN, le=INT32_MAX)
    structured_outputs: StructuredOutputs | None = None  # extension (vLLM's): JSON schema, regex or choice
    # vLLM's older names for the same (guided decoding)
    guided_json: dict | bool | None = None
    guided_regex: str | None = None
    guided_choice: list[str] | None = None

    @field_validator("stop")
    @classmethod
    def _check_stop(cls, v):
        stops = [v] if isinstance(v, str) else (v or [])
        if not isinstance(stops, list) or not all(isinstance(s, str) for s in stops):
            raise PydanticCustomError("stop_type", "stop must be a string or a list of strings")
        if len(stops) > MAX_STOP_STRINGS:
            raise PydanticCustomError("too_many_stops", "at most {n} stop strings are allowed", {"n": MAX_STOP_STRINGS})
        if any(not s for s in stops):
            raise PydanticCustomError("empty_stop", "stop strings must be non-empty")
        return v

    @field_validator("logit_bias")
    @classmethod
    def _check_logit_bias(cls, v):
        if not v:
            return v
        if len(v) > MAX_LOGIT_BIAS:
            raise PydanticCustomError("logit_bias_size", "at most {n} entries are allowed", {"n": MAX_LOGIT_BIAS})
        for key, bias in v.items():
            if not (key.isascii() and key.isdigit() and int(key) <= MAX_TOKEN_ID):
                raise PydanticCustomError("logit_bias_key", "keys must be token ids (integers in 0..{top}), got {key}",
                                          {"top": MAX_TOKEN_ID, "key": repr(key[:24])})
            if not -LOGIT_BIAS_RANGE <= bias <= LOGIT_BIAS_RANGE:  # NaN fails both
                raise PydanticCustomError("logit_bias_value", "biases must be in [-{r}, {r}], got {bias} for token {key}",
                                          {"r": int(LOGIT_BIAS_RANGE), "bias": bias, "key": key})
        return v

    def structured(self) -> StructuredOutputs | None:
        """structured_outputs, or what vLLM's older guided_* fields say (not both)."""
        guided = {k: v for k, v in (("json", self.guided_json), ("regex", self.guided_regex),
                                    ("choice", self.guided_choice)) if v is not None}
        if not guided:
            return self.structured_outputs
        if self.structured_outputs is not None:
            raise PydanticCustomError("structured_twice", "give structured_outputs or guided_*, not both")
        return StructuredOutputs.model_validate(guided)

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)

    @property
    def num_choices(self) -> int:
        return self.n or 1

    def logit_bias_ids(self) -> dict[int, float] | None:
        return {int(k): float(b) for k, b in self.logit_bias.items()} if self.logit_bias else None

    def engine_logprobs(self) -> int | None:
        """The top-N the engine computes per token (None: no logprobs)."""
        return None

    def sampling_params(self, max_tokens: int, choice: int = 0, grammar: str | None = None) -> SamplingParams:
        """Raises RequestError (a 400) where SamplingParams rejects a value. Choice i of a
        seeded request gets seed + i (vLLM's rule), wrapped into the signed 64-bit range.
        `grammar`: the output's grammar (structured output, prism/server/structured.py), the
        same for every choice."""
        stop = [self.stop] if isinstance(self.stop, str) else (self.stop or [])
        seed = None if self.seed is None else (self.seed + choice - INT64_MIN) % 2**64 + INT64_MIN
        return SamplingParams(
            temperature=1.0 if self.temperature is None else self.temperature,
            top_p=1.0 if self.top_p is None else self.top_p,
            top_k=-1 if self.top_k is None else self.top_k,
            seed=seed,
            max_tokens=max_tokens,
            stop=tuple(stop),
            stop_token_ids=tuple(self.stop_token_ids or ()),
            ignore_eos=bool(self.ignore_eos),
            skip_special_tokens=self.skip_special_tokens is not False,
            presence_penalty=self.presence_penalty or 0.0,
            frequency_penalty=self.frequency_penalty or 0.0,
            repetition_penalty=1.0 if self.repetition_penalty is None else self.repetition_penalty,
            min_p=self.min_p or 0.0,
            logit_bias=self.logit_bias_ids(),
            logprobs=self.engine_logprobs(),
            grammar=grammar,
        )

    def generation_request(self, req_id: str, prompt_token_ids: list[int], max_tokens: int,
                           choice: int = 0, grammar: str | None = None,
                           received_s: float | None = None) -> GenerationRequest:
        return GenerationRequest(
            req_id=req_id,
            model=self.model,
            prompt_token_ids=list(prompt_token_ids),
            params=self.sampling_params(max_tokens, choice, grammar),
            ttft_slo_s=None if self.ttft_slo_ms is None else self.ttft_slo_ms / 1000.0,
            tpot_slo_s=None if self.tpot_slo_ms is None else self.tpot_slo_ms / 1000.0,
            priority=self.priority or 0,
            received_s=received_s,
        )


class CompletionRequest(_SamplingFields):
    prompt: Annotated[Any, WithJsonSchema({"anyOf": [  # checked by _check_prompt
        {"type": "string"}, {"type": "array", "items": {"type": "integer", "minimum": 0}},
        {"type": "array", "items": {"type": "string"}},
        {"type": "array", "items": {"type": "array", "items": {"type": "integer", "minimum": 0}}}]})]
    max_tokens: int | None = Field(16, ge=1, le=INT32_MAX)
    logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)  # OpenAI allows 0..5; vLLM's limit, 20
    echo: bool | None = False  # after logprobs: its check reads it
    best_of: int | None = None
    suffix: str | None = None
    response_format: ResponseFormat | None = None  # extension (as vLLM): JSON output for completions too

    @field_validator("prompt")
    @classmethod
    def _check_prompt(cls, v):
        return normalize_prompts(v)

    @field_validator("echo")
    @classmethod
    def _check_echo(cls, v, info):
        # vLLM answers echo with logprobs with the prompt's logprobs: a scoring pass over the
        # prompt that the engine does not run.
        if v and info.data.get("logprobs") is not None:
            raise _unsupported("echo together with logprobs (the prompt's logprobs)")
        return v

    _check_best_of = _refuse_unless(_is_one, "best_of other than 1", "best_of")

    _check_suffix = _refuse_unless(lambda v: not v, "suffix", "suffix")

    def engine_logprobs(self) -> int | None:
        return self.logprobs

    @property
    def prompts(self) -> list[str | list[int]]:
        return self.prompt


def normalize_prompts(v: Any) -> list[str | list[int]]:
    """A completion prompt as a list of prompts, each one string or one list of token ids
    (OpenAI: a string, a list of token ids, a list of strings or a list of token-id lists)."""
    if isinstance(v, str) or (isinstance(v, list) and v and all(isinstance(t, int) for t in v)):
        v = [v]
    if not isinstance(v, list) or not all(isinstance(p, (str, list)) for p in v):
        raise PydanticCustomError("prompt_type", "prompt must be a string, a list of integer token ids, "
                                  "or a list of those")
    if not v:
        raise PydanticCustomError("empty_prompt", "prompt must not be empty")
    if len(v) > MAX_CHOICES:
        raise PydanticCustomError("too_many_prompts", "at most {n} prompts are allowed", {"n": MAX_CHOICES})
    return [_one_prompt(p) for p in v]


def _one_prompt(v: str | list) -> str | list[int]:
    if isinstance(v, str):
        return v
    if not v:
        raise PydanticCustomError("empty_prompt", "prompt must not be empty")
    if not all(isinstance(t, int) and not isinstance(t, bool) for t in v):
        raise PydanticCustomError("prompt_type", "a token-id prompt must hold integers only")
    bad = next((t for t in v if not 0 <= t <= MAX_TOKEN_ID), None)
    if bad is not None:
        raise PydanticCustomError("token_id_range", "token id {bad} is outside 0..{top}",
                                  {"bad": _short_int(bad), "top": MAX_TOKEN_ID})
    return list(v)


def _short_int(n: int) -> str:
    text = str(n)
    return text if len(text) <= 24 else text[:10] + "..." + text[-4:]


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")
    role: Literal["system", "user", "assistant", "tool", "developer"]
    # str, or a list of {"type": "text", "text": str} parts (joined into one str); null only in
    # an assistant's turn that calls tools
    content: Any = None
    tool_calls: list[ToolCallIn] | None = None  # an assistant's calls (the history of a tool use)
    tool_call_id: str | None = None  # a tool's result answers this call
    name: str | None = None

    @field_validator("content")
    @classmethod
    def _content_text(cls, v) -> str | None:
        if v is None or isinstance(v, str):
            return v
        if isinstance(v, list) and all(isinstance(p, dict) for p in v):
            if all(p.get("type") == "text" and isinstance(p.get("text"), str) for p in v):
                return "".join(p["text"] for p in v)
            raise PydanticCustomError("content_part", "only content parts of type 'text' (with a string 'text') are supported")
        raise PydanticCustomError("content_type", "content must be a string or a list of text parts")

    @model_validator(mode="after")
    def _content_or_calls(self):
        if self.content is None and not (self.role == "assistant" and self.tool_calls):
            raise PydanticCustomError("content_missing", "content is required (it may be null only in an "
                                      "assistant message with tool_calls)")
        return self

    def template_dict(self) -> dict:
        # Chat templates know system; developer is OpenAI's newer name for it.
        role = "system" if self.role == "developer" else self.role
        out = {"role": role, "content": self.content}
        if self.tool_calls:
            out["tool_calls"] = [c.template_dict() for c in self.tool_calls]
        if self.role == "tool" and self.tool_call_id is not None:
            out["tool_call_id"] = self.tool_call_id
        if self.name is not None and self.role == "tool":
            out["name"] = self.name
        return out


class ChatCompletionRequest(_SamplingFields):
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = Field(None, ge=1, le=INT32_MAX)
    max_completion_tokens: int | None = Field(None, ge=1, le=INT32_MAX)
    logprobs: bool | None = False
    top_logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)  # OpenAI's and vLLM's limit: 20
    tools: list[Tool] | None = None
    tool_choice: ToolChoice | None = None
    parallel_tool_calls: bool | None = None
    response_format: ResponseFormat | None = None

    @field_validator("top_logprobs")
    @classmethod
    def _check_top_logprobs(cls, v, info):
        if v and not info.data.get("logprobs"):
            raise PydanticCustomError("top_logprobs", "top_logprobs needs logprobs set to true")
        return v

    def engine_logprobs(self) -> int | None:
        return (self.top_logprobs or 0) if self.logprobs else None

    def requested_max_tokens(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens

    def template_messages(self) -> list[dict]:
        return [m.template_dict() for m in self.messages]


class TokenizeRequest(BaseModel):
    """POST /tokenize, as vLLM's: a prompt, or chat messages rendered by the model's template."""

    model_config = ConfigDict(extra="ignore")
    model: str = Field(min_length=1)
    prompt: str | None = None
    messages: list[ChatMessage] | None = Field(None, min_length=1)
    add_generation_prompt: bool = True  # messages only
    add_special_tokens: bool = True  # prompt only (a chat template writes its own)

    @field_validator("messages")
    @classmethod
    def _one_input(cls, v, info):
        if v is not None and info.data.get("prompt") is not None:
            raise PydanticCustomError("one_input", "send either prompt or messages, not both")
        return v

    def template_messages(self) -> list[dict]:
        return [m.template_dict() for m in self.messages or ()]


class DetokenizeRequest(BaseModel):
    """POST /detokenize, as vLLM's: token ids back to text."""

    model_config = ConfigDict(extra="ignore")
    model: str = Field(min_length=1)
    tokens: list[TokenId]


# ---- ids and response bodies -------------------------------------------------------------
def completion_id() -> str:
    return f"cmpl-{uuid.uuid4().hex}"


def chat_completion_id() -> str:
    return f"chatcmpl-{uuid.uuid4().hex}"


def now() -> int:
    return int(time.time())


def usage(num_prompt_tokens: int, num_output_tokens: int) -> dict:
    return {
        "prompt_tokens": num_prompt_tokens,
        "completion_tokens": num_output_tokens,
        "total_tokens": num_prompt_tokens + num_output_tokens,
    }


def completion_choice(index: int, text: str, finish_reason: str | None, logprobs: dict | None = None) -> dict:
    return {"index": index, "text": text, "finish_reason": finish_reason, "logprobs": logprobs}


def completion_body(req_id: str, created: int, model: str, choices: list[dict],
                    usage_: dict | None = None, chunk: bool = False) -> dict:
    """A text_completion response, or (chunk=True) one streamed piece of it (no usage)."""
    body = {"id": req_id, "object": "text_completion", "created": created, "model": model, "choices": choices}
    if not chunk:
        body["usage"] = usage_
    return body


def usage_chunk(req_id: str, created: int, model: str, object_: str, usage_: dict) -> dict:
    """The last streamed chunk when stream_options.include_usage is set: no choices, usage."""
    return {"id": req_id, "object": object_, "created": created, "model": model, "choices": [], "usage": usage_}


def chat_choice(index: int, text: str | None, finish_reason: str | None, logprobs: dict | None = None,
                tool_calls: list[dict] | None = None) -> dict:
    """One choice of a chat completion; `text` is None (content null) when the output was only
    tool calls."""
    message = {"role": "assistant", "content": text} | ({"tool_calls": tool_calls} if tool_calls else {})
    return {"index": index, "message": message, "finish_reason": finish_reason, "logprobs": logprobs}


def chat_body(req_id: str, created: int, model: str, choices: list[dict], usage_: dict) -> dict:
    return {"id": req_id, "object": "chat.completion", "created": created, "model": model, "choices": choices,
            "usage": usage_}


def chat_chunk(req_id: str, created: int, model: str, delta: dict, finish_reason: str | None = None,
               index: int = 0, logprobs: dict | None = None) -> dict:
    return {
        "id": req_id,
        "object": "chat.completion.chunk",
        "created": created,
        "model": model,
        "choices": [{"index": index, "delta": delta, "finish_reason": finish_reason, "logprobs": logprobs}],
    }


def model_list(cards) -> dict:
    return {
        "object": "list",
        "data": [
            {
                "id": c.name,
                "object": "model",
                "created": c.created,
                "owned_by": "prism",
                "max_model_len": c.max_model_len,
                "devices": list(c.devices),
            }
            for c in cards
        ],
    }
