"""Tool calling: tool definitions and tool_choice, how they reach the chat template, and the
grammar that enforces a call.

- tool_choice "none": the tools are not shown; plain text comes back.
- "auto": the tools reach the template; the model's output is parsed for calls in its
  family's format (tool_parsers.py).
- "required" / a named function: the call is enforced by a grammar (as vLLM does): a named
  function's output is its arguments, JSON matching its parameters schema; "required" outputs a
  JSON array of {"name", "parameters"} objects, one of the tools each. Even a tiny model then
  emits valid calls, whatever its template.

A template that knows tools (it reads the `tools` variable: Llama 3.1+, Qwen2.5...) gets them
and the tool-call history as they are. A template that does not (SmolLM2's, so every shipped
model) gets a documented fallback: a system message listing the tools and asking for Hermes
style calls (<tool_call>{"name": ..., "arguments": ...}</tool_call>), past calls written that
way as the assistant's text, and tool results as user messages in <tool_response> tags.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from prism.engine.tokenizer import Tokenizer
from prism.server.errors import bad_request
from prism.server.structured import schema_grammar
from prism.server.tool_parsers import HERMES, LLAMA3_JSON, parser_for_template

NO_PARAMETERS: dict = {"type": "object", "properties": {}}


class FunctionDefinition(BaseModel):
    model_config = ConfigDict(extra="ignore")
    name: str = Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_.-]+$")
    description: str | None = None
    parameters: dict | None = None
    strict: bool | None = None

    @property
    def schema(self) -> dict:
        return self.parameters if self.parameters is not None else NO_PARAMETERS


class Tool(BaseModel):
    model_config = ConfigDict(extra="ignore")
    type: Literal["function"]
    function: FunctionDefinition


class NamedFunction(BaseModel):
    model_config = ConfigDict(extra="ignore")
    name: str


class NamedToolChoice(BaseModel):
    model_config = ConfigDict(extra="ignore")
    type: Literal["function"]
    function: NamedFunction


ToolChoice = Literal["none", "auto", "required"] | NamedToolChoice


class FunctionCallIn(BaseModel):
    model_config = ConfigDict(extra="ignore")
    name: str
    arguments: str  # JSON text, as OpenAI sends it


class ToolCallIn(BaseModel):
    """A call in an assistant message of the history."""

    model_config = ConfigDict(extra="ignore")
    id: str | None = None
    type: Literal["function"] = "function"
    function: FunctionCallIn

    def template_dict(self) -> dict:
        # Templates read arguments as a mapping (`| tojson`), as transformers documents.
        try:
            arguments = json.loads(self.function.arguments)
        except ValueError:
            raise bad_request(f"tool call {self.function.name!r}: arguments must be a JSON text",
                              "messages") from None
        call = {"type": "function", "function": {"name": self.function.name, "arguments": arguments}}
        return call | ({"id": self.id} if self.id else {})


@dataclass(frozen=True)
class ToolPlan:
    """How one chat request uses tools."""

    mode: Literal["none", "auto", "required", "named"]
    template_tools: list[dict] | None  # what the template's `tools` gets (None: not shown)
    grammar: str | None  # enforces the call (required, named)
    parser: str | None  # the family's format, for "auto"
    function: str | None = None  # the named function
    fallback: bool = False  # the template knows no tools: rendered by the fallback


def plan_tools(tools: list[Tool] | None, choice: ToolChoice | None, parallel: bool | None,
               tokenizer: Tokenizer, parser_override: str | None) -> ToolPlan:
    """What tools and tool_choice mean for this request (400s for inconsistent ones)."""
    if not tools:
        if choice not in (None, "none"):
            raise bad_request("tool_choice needs tools", "tool_choice")
        return ToolPlan("none", None, None, None)
    names = [t.function.name for t in tools]
    if len(set(names)) != len(names):
        raise bad_request("tools: function names must be unique", "tools")
    choice = "auto" if choice is None else choice
    if choice == "none":
        return ToolPlan("none", None, None, None)
    fallback = not tokenizer.template_supports_tools
    shown = [t.model_dump(exclude_none=True) for t in tools]
    parser = HERMES if fallback else (parser_override or parser_for_template(tokenizer.chat_template or ""))
    if isinstance(choice, NamedToolChoice):
        tool = next((t for t in tools if t.function.name == choice.function.name), None)
        if tool is None:
            raise bad_request(f"tool_choice names {choice.function.name!r}, which is not among the tools", "tool_choice")
        grammar = schema_grammar(tool.function.schema, "tools")
        return ToolPlan("named", shown, grammar, parser, tool.function.name, fallback)
    if choice == "required":
        return ToolPlan("required", shown, schema_grammar(required_calls_schema(tools, parallel), "tools"),
                        parser, None, fallback)
    return ToolPlan("auto", shown, None, parser, None, fallback)


def required_calls_schema(tools: list[Tool], parallel: bool | None) -> dict:
    """A JSON array of calls, each {"name": one of the tools, "parameters": its schema}."""
    calls = [{
        "type": "object",
        "properties": {"name": {"const": t.function.name}, "parameters": t.function.schema},
        "required": ["name", "parameters"],
        "additionalProperties": False,
    } for t in tools]
    schema = {"type": "array", "items": calls[0] if len(calls) == 1 else {"anyOf": calls}, "minItems": 1}
    if parallel is False:
        schema["maxItems"] = 1
    return schema


# ---- the fallback for templates without tools -------------------------------------------
FALLBACK_SYSTEM = (
    "You may call functions to help with the user's request. The functions are listed, as JSON, "
    "between <tools></tools> tags:\n<tools>\n{tools}\n</tools>\n"
    "To call one, answer with a JSON object naming it and giving its arguments, in tags:\n"
    '<tool_call>\n{{"name": <function-name>, "arguments": <args-json-object>}}\n</tool_call>'
)


def fallback_messages(messages: list[dict], tools: list[dict] | None) -> list[dict]:
    """Messages for a template that knows no tools: the tools in a system message, past calls
    as tagged text, tool results as user messages (templates without tools know no tool role)."""
    out: list[dict] = []
    if tools:
        listing = "\n".join(json.dumps(t["function"], ensure_ascii=False) for t in tools)
        system = FALLBACK_SYSTEM.format(tools=listing)
        if messages and messages[0]["role"] == "system":
            system = f"{messages[0]['content']}\n\n{system}"
            messages = messages[1:]
        out.append({"role": "system", "content": system})
    for m in messages:
        if m["role"] == "assistant" and m.get("tool_calls"):
            calls = "\n".join(_tagged_call(c["function"]) for c in m["tool_calls"])
            text = f"{m['content']}\n{calls}" if m.get("content") else calls
            out.append({"role": "assistant", "content": text})
        elif m["role"] == "tool":
            result = f"<tool_response>\n{m.get('content') or ''}\n</tool_response>"
            if out and out[-1]["role"] == "user" and out[-1].get("tool_results"):
                out[-1] = {**out[-1], "content": out[-1]["content"] + "\n" + result}
            else:
                out.append({"role": "user", "content": result, "tool_results": True})
        else:
            out.append({k: v for k, v in m.items() if k not in ("tool_calls", "tool_call_id")})
    return [{k: v for k, v in m.items() if k != "tool_results"} for m in out]


def _tagged_call(function: dict) -> str:
    call = {"name": function["name"], "arguments": function["arguments"]}
    return f"<tool_call>\n{json.dumps(call, ensure_ascii=False)}\n</tool_call>"


__all__ = ["HERMES", "LLAMA3_JSON", "Tool", "ToolCallIn", "ToolChoice", "ToolPlan", "fallback_messages",
           "plan_tools", "required_calls_schema"]
