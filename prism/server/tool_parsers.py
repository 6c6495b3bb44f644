"""Tool calls in a model's text output: whole, or streamed as OpenAI tool-call deltas.

Formats (the parser is chosen by model family: the chat template's markers, or the model's
`tool_parser` key in the config):
- "hermes" (Qwen2.5, Hermes, and Prism's fallback for templates without tools): any text, then
  one or more `<tool_call>{"name": ..., "arguments": {...}}</tool_call>` blocks.
- "llama3_json" (Llama 3.1+): the whole output is the call, `{"name": ..., "parameters": {...}}`,
  optionally after `<|python_tag|>`; several calls are separated by ";".
- "json_array": the output of a "required" tool_choice (the grammar makes it) is a JSON array
  of {"name", "parameters"} objects.

Streaming follows vLLM's shape: a call's first delta carries its index, id, type and name;
later ones carry pieces of `arguments`, whose concatenation is the arguments' JSON text. The
text seen so far is scanned again on every delta (outputs are short), and only what can no
longer change is sent: the name once its string is closed, the arguments' raw text as it grows
(a string value only once closed), content up to a possible start of a tool-call marker.
"""
from __future__ import annotations

import json
import uuid
from dataclasses import dataclass, field

HERMES = "hermes"
LLAMA3_JSON = "llama3_json"
JSON_ARRAY = "json_array"
PARSERS = (HERMES, LLAMA3_JSON)

TOOL_CALL_OPEN, TOOL_CALL_CLOSE = "<tool_call>", "</tool_call>"
PYTHON_TAG = "<|python_tag|>"
ARGUMENT_KEYS = ("arguments", "parameters")  # Hermes says arguments, Llama 3 parameters
_SEPARATORS = " \t\r\n;,[]"  # between the objects of a Llama 3 output or of a JSON array


def parser_for_template(template: str) -> str:
    """The family's format, told by its chat template's own markers."""
    if PYTHON_TAG in template or "ipython" in template:
        return LLAMA3_JSON
    return HERMES  # Qwen2.5 and Hermes write <tool_call>; so does the fallback


def tool_call_id() -> str:
    return f"chatcmpl-tool-{uuid.uuid4().hex}"


# ---- scanning a JSON object that may still be growing ---------------------------------------
@dataclass
class ObjectScan:
    """The top-level fields of one JSON object: key -> (value start, value end or None while
    the value is still open); `end` is the index after its closing brace (None: open)."""

    fields: dict[str, tuple[int, int | None]] = field(default_factory=dict)
    end: int | None = None


def scan_object(text: str, start: int) -> ObjectScan:
    """Scan the object whose "{" is at text[start], as far as the text goes."""
    scan = ObjectScan()
    depth, in_string, escaped = 0, False, False
    key_start, key, value_start = None, None, None

    def close_value(at: int) -> None:
        if key is not None and value_start is not None:
            scan.fields[key] = (value_start, value_start + len(text[value_start:at].rstrip()))

    for i in range(start, len(text)):
        c = text[i]
        if in_string:
            if escaped:
                escaped = False
            elif c == "\\":
                escaped = True
            elif c == '"':
                in_string = False
                if depth == 1 and key_start is not None and key is None:
                    key = _loads(text[key_start:i + 1], "")
            continue
        if c in " \t\r\n":
            continue
        if depth == 1 and key is not None and value_start is None and c != ":":
            value_start = i
            scan.fields[key] = (i, None)
        if c == '"':
            in_string = True
            if depth == 1 and key is None:
                key_start = i
        elif c in "{[":
            depth += 1
        elif c in "}]":
            depth -= 1
            if depth == 0:
                close_value(i)
                scan.end = i + 1
                return scan
        elif c == "," and depth == 1:
            close_value(i)
            key_start, key, value_start = None, None, None
    return scan


def _loads(text: str, default):
    try:
        return json.loads(text)
    except ValueError:
        return default


@dataclass
class PartialCall:
    """One call as far as the text goes."""

    name: str | None  # None until its string is closed
    arguments: str  # the arguments' JSON text that can no longer change ("" until it starts)
    complete: bool  # its object is closed

    def final_arguments(self) -> str | None:
        """Normalised arguments JSON when the call is complete and valid, else None."""
        value = _loads(self.arguments or "{}", None)
        if isinstance(value, str):  # some models write the arguments as a JSON string
            value = _loads(value, None)
        return json.dumps(value, ensure_ascii=False) if isinstance(value, dict) else None


def partial_call(text: str, scan: ObjectScan) -> PartialCall:
    name = None
    if "name" in scan.fields and scan.fields["name"][1] is not None:
        s, e = scan.fields["name"]
        value = _loads(text[s:e], None)
        name = value if isinstance(value, str) else None
    arguments = ""
    key = next((k for k in ARGUMENT_KEYS if k in scan.fields), None)
    if key is not None:
        s, e = scan.fields[key]
        if e is not None:
            raw = text[s:e]
            arguments = _loads(raw, raw) if raw.startswith('"') else raw  # a string: its JSON text
        elif not text[s:].startswith('"'):
            arguments = text[s:].rstrip()
    return PartialCall(name, arguments, scan.end is not None)


def scan_objects(text: str, start: int = 0) -> tuple[list[PartialCall], int]:
    """Objects one after another from `start` (separators between them); stops at anything
    else. Returns the calls and where scanning stopped."""
    calls, i = [], start
    while i < len(text):
        if text[i] in _SEPARATORS:
            i += 1
            continue
        if text[i] != "{":
            break
        scan = scan_object(text, i)
        calls.append(partial_call(text, scan))
        if scan.end is None:
            return calls, len(text)
        i = scan.end
    return calls, i


# ---- one output, by format ------------------------------------------------------------------
@dataclass
class View:
    """What an output says so far: content that can no longer change, and the calls."""

    content: str
    calls: list[PartialCall]
    tool_mode: bool  # the output is (also) tool calls


def view(text: str, fmt: str, final: bool) -> View:
    """Read `text` in format `fmt`; `final`: nothing more will come (held-back text is content)."""
    if fmt == HERMES:
        return _hermes_view(text, final)
    if fmt == LLAMA3_JSON:
        return _llama3_view(text, final)
    if fmt == JSON_ARRAY:
        calls, _ = scan_objects(text)
        return View("", calls, True)
    raise ValueError(f"unknown tool-call format {fmt!r}; known: {', '.join(PARSERS)}")


def _hermes_view(text: str, final: bool) -> View:
    first = text.find(TOOL_CALL_OPEN)
    if first < 0:
        held = 0 if final else _marker_prefix_len(text, TOOL_CALL_OPEN)
        return View(text[:len(text) - held], [], False)
    calls = []
    for block in text[first:].split(TOOL_CALL_OPEN)[1:]:
        calls += scan_objects(block.split(TOOL_CALL_CLOSE, 1)[0])[0]
    return View(text[:first], calls, True)


def _llama3_view(text: str, final: bool) -> View:
    body = text.lstrip()
    tagged = body.startswith(PYTHON_TAG)
    if tagged:
        body = body[len(PYTHON_TAG):].lstrip()
    if not final and (PYTHON_TAG.startswith(body) if not tagged else not body):
        return View("", [], False)  # nothing yet, part of the tag, or the tag alone: wait
    if not body.startswith("{"):
        return View(text, [], False)
    calls, _ = scan_objects(body)
    return View("", calls, True)


def _marker_prefix_len(text: str, marker: str) -> int:
    """Length of the longest end of `text` that is a proper start of `marker`."""
    for n in range(min(len(marker) - 1, len(text)), 0, -1):
        if text.endswith(marker[:n]):
            return n
    return 0


@dataclass
class ParsedOutput:
    content: str | None
    tool_calls: list[dict]  # OpenAI's shape: id, type, function {name, arguments}


def parse_tool_calls(text: str, fmt: str) -> ParsedOutput:
    """A whole output: its calls (complete and valid ones) and content. An output with no
    valid call is all content."""
    v = view(text, fmt, final=True)
    calls = []
    for call in v.calls:
        arguments = call.final_arguments() if call.complete else None
        if call.name is not None and arguments is not None:
            calls.append(function_call(call.name, arguments))
    if not calls:
        return ParsedOutput(text, [])
    return ParsedOutput(v.content.strip() or None, calls)


def function_call(name: str, arguments: str, id_: str | None = None) -> dict:
    return {"id": id_ or tool_call_id(), "type": "function", "function": {"name": name, "arguments": arguments}}


# ---- streaming ------------------------------------------------------------------------------
class StreamingToolCalls:
    """Turns an output's text deltas into chat-completion deltas: {"content": ...} and
    {"tool_calls": [...]}. Feed every text delta; `finish()` once at the end."""

    def __init__(self, fmt: str):
        self.fmt = fmt
        self.text = ""
        self.content_sent = 0
        self.names_sent: list[str] = []
        self.arguments_sent: list[int] = []  # characters of each call's arguments sent

    @property
    def called(self) -> bool:
        return bool(self.names_sent)

    def feed(self, delta: str) -> list[dict]:
        self.text += delta
        return self._deltas(view(self.text, self.fmt, final=False))

    def finish(self) -> list[dict]:
        return self._deltas(view(self.text, self.fmt, final=True))

    def _deltas(self, v: View) -> list[dict]:
        out = []
        if len(v.content) > self.content_sent:
            out.append({"content": v.content[self.content_sent:]})
            self.content_sent = len(v.content)
        for index, call in enumerate(v.calls):
            if index == len(self.names_sent):  # not started: wait for its name
                if call.name is None:
                    break
                self.names_sent.append(call.name)
                self.arguments_sent.append(0)
                out.append(tool_call_delta(index, {"name": call.name, "arguments": ""}, tool_call_id()))
            if len(call.arguments) > self.arguments_sent[index]:
                out.append(tool_call_delta(index, {"arguments": call.arguments[self.arguments_sent[index]:]}))
                self.arguments_sent[index] = len(call.arguments)
        return out


def tool_call_delta(index: int, function: dict, id_: str | None = None) -> dict:
    call: dict = {"index": index}
    if id_ is not None:
        call |= {"id": id_, "type": "function"}
    return {"tool_calls": [call | {"function": function}]}
