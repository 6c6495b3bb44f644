"""OpenAI request bodies (completions, chat completions), response shapes, and the conversion
of a validated request into the backend's `GenerationRequest`.

Requests are validated more strictly than SamplingParams (OpenAI's ranges); unknown fields are
ignored, OpenAI fields whose meaning Prism does not implement are refused with a 400 rather
than silently dropped.
"""
from __future__ import annotations

import time
import uuid
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator
from pydantic_core import PydanticCustomError

from prism.server.backend import GenerationRequest
from prism.server.structured import ResponseFormat, StructuredOutputs
from prism.server.tools import Tool, ToolCallIn, ToolChoice
from prism.types import SamplingParams

MAX_STOP_STRINGS = 4
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
    stop: Any = None  # str | list[str] | None: checked by _check_stop
    stop_token_ids: list[TokenId] | None = None  # extension
    ignore_eos: bool | None = False  # extension
    skip_special_tokens: bool | None = True  # extension
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    n: int | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
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

    _check_n = _refuse_unless(_is_one, "n other than 1", "n")

    _check_penalty = _refuse_unless(lambda v: not v, "a non-zero penalty", "presence_penalty", "frequency_penalty")

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

    def sampling_params(self, max_tokens: int, grammar: str | None = None) -> SamplingParams:
        """Raises RequestError (a 400) where SamplingParams rejects a value. `grammar`: the
        output's grammar (structured output, prism/server/structured.py)."""
        stop = [self.stop] if isinstance(self.stop, str) else (self.stop or [])
        return SamplingParams(
            temperature=1.0 if self.temperature is None else self.temperature,
            top_p=1.0 if self.top_p is None else self.top_p,
            top_k=-1 if self.top_k is None else self.top_k,
            seed=self.seed,
            max_tokens=max_tokens,
            stop=tuple(stop),
            stop_token_ids=tuple(self.stop_token_ids or ()),
            ignore_eos=bool(self.ignore_eos),
            skip_special_tokens=self.skip_special_tokens is not False,
            grammar=grammar,
        )

    def generation_request(self, req_id: str, prompt_token_ids: list[int], max_tokens: int,
                           grammar: str | None = None) -> GenerationRequest:
        return GenerationRequest(
            req_id=req_id,
            model=self.model,
            prompt_token_ids=list(prompt_token_ids),
            params=self.sampling_params(max_tokens, grammar),
            ttft_slo_s=None if self.ttft_slo_ms is None else self.ttft_slo_ms / 1000.0,
            tpot_slo_s=None if self.tpot_slo_ms is None else self.tpot_slo_ms / 1000.0,
            priority=self.priority or 0,
        )


class CompletionRequest(_SamplingFields):
    prompt: Any  # str | list[int] | [str] | [list[int]]: checked by _check_prompt
    max_tokens: int | None = Field(16, ge=1, le=INT32_MAX)
    echo: bool | None = False
    logprobs: int | None = None
    best_of: int | None = None
    suffix: str | None = None
    response_format: ResponseFormat | None = None  # extension (as vLLM): JSON output for completions too

    @field_validator("prompt")
    @classmethod
    def _check_prompt(cls, v):
        return normalize_prompt(v)

    _check_echo = _refuse_unless(lambda v: not v, "echo", "echo")

    _check_logprobs = _refuse_unless(lambda v: v is None, "logprobs", "logprobs")

    _check_best_of = _refuse_unless(_is_one, "best_of other than 1", "best_of")

    _check_suffix = _refuse_unless(lambda v: not v, "suffix", "suffix")


def normalize_prompt(v: Any) -> str | list[int]:
    """A completion prompt as one string or one list of token ids."""
    if isinstance(v, list) and len(v) == 1 and isinstance(v[0], (str, list)):
        v = v[0]  # a batch of exactly one
    if isinstance(v, str):
        return v
    if isinstance(v, list) and v and all(isinstance(t, int) and not isinstance(t, bool) for t in v):
        bad = next((t for t in v if not 0 <= t <= MAX_TOKEN_ID), None)
        if bad is not None:
            raise PydanticCustomError("token_id_range", "token id {bad} is outside 0..{top}",
                                      {"bad": _short_int(bad), "top": MAX_TOKEN_ID})
        return list(v)
    if isinstance(v, list) and len(v) > 1 and all(isinstance(p, (str, list)) for p in v):
        raise PydanticCustomError(
            "batch", "batches of prompts are not supported; send one prompt (a string or a list of token ids) per request"
        )
    if isinstance(v, list) and not v:
        raise PydanticCustomError("empty_prompt", "prompt must not be empty")
    raise PydanticCustomError("prompt_type", "prompt must be a string or a list of integer token ids")


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
    top_logprobs: int | None = None
    tools: list[Tool] | None = None
    tool_choice: ToolChoice | None = None
    parallel_tool_calls: bool | None = None
    response_format: ResponseFormat | None = None

    _check_logprobs = _refuse_unless(lambda v: not v, "logprobs", "logprobs")

    _check_top_logprobs = _refuse_unless(lambda v: v is None, "top_logprobs", "top_logprobs")

    def requested_max_tokens(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens

    def template_messages(self) -> list[dict]:
        return [m.template_dict() for m in self.messages]


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


def completion_body(req_id: str, created: int, model: str, text: str, finish_reason: str | None,
                    usage_: dict | None = None, chunk: bool = False) -> dict:
    """A text_completion response, or (chunk=True) one streamed piece of it (no usage)."""
    body = {
        "id": req_id,
        "object": "text_completion",
        "created": created,
        "model": model,
        "choices": [{"index": 0, "text": text, "finish_reason": finish_reason, "logprobs": None}],
    }
    if not chunk:
        body["usage"] = usage_
    return body


def usage_chunk(req_id: str, created: int, model: str, object_: str, usage_: dict) -> dict:
    """The last streamed chunk when stream_options.include_usage is set: no choices, usage."""
    return {"id": req_id, "object": object_, "created": created, "model": model, "choices": [], "usage": usage_}


def chat_body(req_id: str, created: int, model: str, text: str | None, finish_reason: str | None, usage_: dict,
              tool_calls: list[dict] | None = None) -> dict:
    message = {"role": "assistant", "content": text} | ({"tool_calls": tool_calls} if tool_calls else {})
    return {
        "id": req_id,
        "object": "chat.completion",
        "created": created,
        "model": model,
        "choices": [{
            "index": 0,
            "message": message,
            "finish_reason": finish_reason,
            "logprobs": None,
        }],
        "usage": usage_,
    }


def chat_chunk(req_id: str, created: int, model: str, delta: dict, finish_reason: str | None = None) -> dict:
    return {
        "id": req_id,
        "object": "chat.completion.chunk",
        "created": created,
        "model": model,
        "choices": [{"index": 0, "delta": delta, "finish_reason": finish_reason, "logprobs": None}],
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
