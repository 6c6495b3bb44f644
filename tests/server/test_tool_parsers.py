"""Tool-call parsers on fixed outputs of both families' formats, whole and streamed in pieces
(the deltas assembled back as a client does must give the same calls)."""
import json

import pytest

from prism.server.tool_parsers import (HERMES, JSON_ARRAY, LLAMA3_JSON, StreamingToolCalls, parse_tool_calls,
                                       parser_for_template)

WEATHER = {"city": "Paris", "days": [1, 2], "note": "a \"quoted\" } brace"}
HERMES_TWO = ('Let me check.\n<tool_call>\n{"name": "get_weather", "arguments": ' + json.dumps(WEATHER) +
              '}\n</tool_call>\n<tool_call>\n{"name": "get_time", "arguments": {}}\n</tool_call>')
LLAMA_TWO = ('<|python_tag|>{"name": "get_weather", "parameters": ' + json.dumps(WEATHER) +
             '}; {"name": "get_time", "parameters": {}}')
EXPECTED = [("get_weather", WEATHER), ("get_time", {})]


def calls_of(parsed):
    return [(c["function"]["name"], json.loads(c["function"]["arguments"])) for c in parsed.tool_calls]


@pytest.mark.parametrize("text, fmt, content", [
    (HERMES_TWO, HERMES, "Let me check."),
    (LLAMA_TWO, LLAMA3_JSON, None),
    (LLAMA_TWO.removeprefix("<|python_tag|>"), LLAMA3_JSON, None),  # the tag skipped as a special token
    ('[{"name": "get_weather", "parameters": ' + json.dumps(WEATHER) + '}, {"name": "get_time", "parameters": {}}]',
     JSON_ARRAY, None),
])
def test_whole_outputs(text, fmt, content):
    parsed = parse_tool_calls(text, fmt)
    assert calls_of(parsed) == EXPECTED and parsed.content == content
    assert all(c["type"] == "function" and c["id"].startswith("chatcmpl-tool-") for c in parsed.tool_calls)
    assert len({c["id"] for c in parsed.tool_calls}) == 2


@pytest.mark.parametrize("text, fmt", [
    ("The weather is fine.", HERMES),
    ("The weather is fine.", LLAMA3_JSON),
    ('<tool_call>\n{"name": "get_weather", "arguments": {"city": "Par', HERMES),  # cut short: not a call
    ('{"name": "get_weather"', LLAMA3_JSON),
])
def test_outputs_without_a_valid_call_are_content(text, fmt):
    parsed = parse_tool_calls(text, fmt)
    assert parsed.tool_calls == [] and parsed.content == text


def assemble(deltas):
    """What the openai SDK's stream accumulation does with deltas."""
    content, calls = "", {}
    for d in deltas:
        content += d.get("content", "")
        for tc in d.get("tool_calls", []):
            call = calls.setdefault(tc["index"], {"id": None, "name": "", "arguments": ""})
            call["id"] = tc.get("id") or call["id"]
            call["name"] += tc["function"].get("name", "")
            call["arguments"] += tc["function"].get("arguments", "")
    return content, [calls[i] for i in sorted(calls)]


@pytest.mark.parametrize("text, fmt, content", [
    (HERMES_TWO, HERMES, "Let me check.\n"),
    (LLAMA_TWO, LLAMA3_JSON, ""),
    ("Plain <b>text</b> with a < sign", HERMES, "Plain <b>text</b> with a < sign"),
    ("Plain text, no call", LLAMA3_JSON, "Plain text, no call"),
    ('[{"name": "get_weather", "parameters": ' + json.dumps(WEATHER) + '}, {"name": "get_time", "parameters": {}}]',
     JSON_ARRAY, ""),
])
@pytest.mark.parametrize("piece", [1, 3, 7, 1000])
def test_streamed_deltas_assemble_to_the_whole(text, fmt, content, piece):
    stream = StreamingToolCalls(fmt)
    deltas = []
    for i in range(0, len(text), piece):
        deltas += stream.feed(text[i:i + piece])
    deltas += stream.finish()
    got_content, calls = assemble(deltas)
    assert got_content == content
    whole = parse_tool_calls(text, fmt)
    assert [(c["name"], json.loads(c["arguments"])) for c in calls] == calls_of(whole)
    assert all(c["id"] for c in calls) and stream.called == bool(calls)
    # A call's first delta names it; arguments follow in later deltas only.
    firsts = [d["tool_calls"][0] for d in deltas if "tool_calls" in d and "id" in d["tool_calls"][0]]
    assert [f["function"]["name"] for f in firsts] == [c["name"] for c in calls]


def test_no_marker_is_split_into_content():
    stream = StreamingToolCalls(HERMES)
    deltas = [d for piece in ("Sure", " <tool", "_ca", "ll>\n{\"name\": \"f\", \"arguments\": {}}</tool_call>")
              for d in stream.feed(piece)]
    assert "".join(d.get("content", "") for d in deltas) == "Sure "


def test_parser_from_the_template():
    assert parser_for_template("{{ '<|python_tag|>' }} ipython") == LLAMA3_JSON
    assert parser_for_template("<tool_call>\n{{ tool_call | tojson }}\n</tool_call>") == HERMES
