"""Structured output and tool calls through a real `prism serve` (real worker processes, the
real SmolLM2 and a tiny random model) with the official openai client."""
import json
import re

import jsonschema
import openai
import pytest

from conftest import openai_client, running_server, smollm2_cpu_config

CONFIG = smollm2_cpu_config(smollm2_len=1024, tiny_len=512)

CAT = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 12},
        "age": {"type": "integer", "minimum": 0, "maximum": 30},
        "indoor": {"type": "boolean"},
        "color": {"enum": ["black", "white", "tabby"]},
    },
    "required": ["name", "age", "indoor", "color"],
    "additionalProperties": False,
}
WEATHER = {
    "type": "object",
    "properties": {"city": {"type": "string", "maxLength": 16}, "unit": {"enum": ["celsius", "fahrenheit"]}},
    "required": ["city", "unit"],
    "additionalProperties": False,
}
TIME = {"type": "object", "properties": {"zone": {"enum": ["UTC", "CET"]}}, "required": ["zone"], "additionalProperties": False}
TOOLS = [
    {"type": "function", "function": {"name": "get_weather", "description": "Weather in a city", "parameters": WEATHER}},
    {"type": "function", "function": {"name": "get_time", "description": "The time in a zone", "parameters": TIME}},
]
ASK = [{"role": "user", "content": "What is the weather in Paris?"}]


@pytest.fixture(scope="module")
def client(tmp_path_factory):
    with running_server(tmp_path_factory.mktemp("structured"), CONFIG) as (_, base):
        yield openai_client(base, timeout=300)


def schema_errors(instance, schema) -> list[str]:
    """What `instance` gets wrong against `schema` (empty: it validates)."""
    return [e.message for e in jsonschema.validators.validator_for(schema)(schema).iter_errors(instance)]


def cat_format(strict=True):
    return {"type": "json_schema", "json_schema": {"name": "cat", "schema": CAT, "strict": strict}}


def test_json_object_parses_as_json(client):
    out = client.chat.completions.create(
        model="smollm2", max_tokens=40, temperature=0, response_format={"type": "json_object"},
        messages=[{"role": "user", "content": 'Reply with a JSON object with one key "answer" whose value is the '
                                              "capital of France."}])
    assert isinstance(json.loads(out.choices[0].message.content), dict)
    assert out.choices[0].finish_reason == "stop"  # ended by the grammar, not by max_tokens


@pytest.mark.parametrize("model", ["smollm2", "tiny"])
def test_json_schema_output_validates_whole_and_streamed(client, model):
    kw = dict(model=model, messages=[{"role": "user", "content": "Describe a cat."}], max_tokens=60, temperature=0,
              response_format=cat_format())
    whole = client.chat.completions.create(**kw)
    assert schema_errors(json.loads(whole.choices[0].message.content), CAT) == []
    assert whole.choices[0].finish_reason == "stop"
    chunks = list(client.chat.completions.create(**kw, stream=True))
    streamed = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert streamed == whole.choices[0].message.content
    assert chunks[-1].choices[0].finish_reason == "stop"


def test_sampled_output_validates_too(client):
    for seed in range(3):
        out = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "A cat?"}],
                                             max_tokens=60, temperature=1.0, seed=seed, response_format=cat_format(False))
        assert schema_errors(json.loads(out.choices[0].message.content), CAT) == []


def test_completions_take_a_response_format_too(client):
    out = client.completions.create(model="tiny", prompt=[5, 6, 7], max_tokens=60, temperature=0,
                                    extra_body={"response_format": cat_format()})
    assert schema_errors(json.loads(out.choices[0].text), CAT) == []


def test_structured_outputs_extension_regex_and_choice(client):
    """vLLM's extension, on both endpoints: a regex or a choice."""
    out = client.completions.create(model="tiny", prompt=[5, 6, 7], max_tokens=20, temperature=0,
                                    extra_body={"structured_outputs": {"regex": "[0-9]{3}-[a-z]{2}"}})
    assert re.fullmatch("[0-9]{3}-[a-z]{2}", out.choices[0].text) and out.choices[0].finish_reason == "stop"
    out = client.chat.completions.create(model="smollm2", messages=[{"role": "user", "content": "Is Paris in France?"}],
                                         max_tokens=5, temperature=0,
                                         extra_body={"structured_outputs": {"choice": ["yes", "no"]}})
    assert out.choices[0].message.content in ("yes", "no")
    out = client.completions.create(model="tiny", prompt=[5, 6], max_tokens=5, temperature=0,
                                    extra_body={"guided_choice": ["red", "blue"]})  # vLLM's older name
    assert out.choices[0].text in ("red", "blue")
    for bad in ({"structured_outputs": {"regex": "[0-9"}}, {"structured_outputs": {"choice": []}},
                {"structured_outputs": {"regex": "a", "choice": ["a"]}},
                {"structured_outputs": {"regex": "a"}, "guided_regex": "b"}, {"guided_choice": []}):
        with pytest.raises(openai.BadRequestError, match="structured_outputs"):
            client.completions.create(model="tiny", prompt=[5], max_tokens=2, extra_body=bad)


@pytest.mark.parametrize("model", ["smollm2", "tiny"])
def test_a_named_tool_choice_yields_a_valid_call(client, model):
    kw = dict(model=model, messages=ASK, tools=TOOLS, max_tokens=60, temperature=0,
              tool_choice={"type": "function", "function": {"name": "get_weather"}})
    out = client.chat.completions.create(**kw)
    choice = out.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.content is None
    (call,) = choice.message.tool_calls
    assert call.type == "function" and call.function.name == "get_weather" and call.id
    assert schema_errors(json.loads(call.function.arguments), WEATHER) == []
    # Streamed: the name first, then argument pieces that add up to the same arguments.
    chunks = [c for c in client.chat.completions.create(**kw, stream=True) if c.choices]
    deltas = [tc for c in chunks for tc in (c.choices[0].delta.tool_calls or [])]
    assert deltas[0].function.name == "get_weather" and deltas[0].id and deltas[0].index == 0
    assert "".join(d.function.arguments or "" for d in deltas) == call.function.arguments
    assert chunks[-1].choices[0].finish_reason == "tool_calls"


def test_required_tool_choice_calls_one_of_the_tools(client):
    out = client.chat.completions.create(model="tiny", messages=ASK, tools=TOOLS, tool_choice="required",
                                         max_tokens=80, temperature=0, parallel_tool_calls=False)
    choice = out.choices[0]
    assert choice.finish_reason == "tool_calls" and len(choice.message.tool_calls) == 1
    call = choice.message.tool_calls[0]
    schema = {"get_weather": WEATHER, "get_time": TIME}[call.function.name]
    assert schema_errors(json.loads(call.function.arguments), schema) == []
    chunks = [c for c in client.chat.completions.create(
        model="tiny", messages=ASK, tools=TOOLS, tool_choice="required", max_tokens=80, temperature=0,
        parallel_tool_calls=False, stream=True) if c.choices]
    deltas = [tc for c in chunks for tc in (c.choices[0].delta.tool_calls or [])]
    assert deltas[0].function.name == call.function.name and {d.index for d in deltas} == {0}
    assert json.loads("".join(d.function.arguments or "" for d in deltas)) == json.loads(call.function.arguments)
    assert chunks[-1].choices[0].finish_reason == "tool_calls"


def test_auto_tools_reach_the_prompt_through_the_fallback(client):
    """SmolLM2's template knows no tools: they are listed in a system message (docs/api.md)."""
    plain = client.chat.completions.create(model="smollm2", messages=ASK, max_tokens=1, temperature=0)
    with_tools = client.chat.completions.create(model="smollm2", messages=ASK, tools=TOOLS, max_tokens=24,
                                                temperature=0)
    assert with_tools.usage.prompt_tokens > plain.usage.prompt_tokens + 50
    choice = with_tools.choices[0]
    for call in choice.message.tool_calls or []:  # if the small model did call, the call is well formed
        assert call.function.name in ("get_weather", "get_time") and json.loads(call.function.arguments) is not None
    assert choice.finish_reason in ("stop", "length", "tool_calls")
    none = client.chat.completions.create(model="smollm2", messages=ASK, tools=TOOLS, tool_choice="none",
                                          max_tokens=1, temperature=0)
    assert none.usage.prompt_tokens == plain.usage.prompt_tokens  # "none": the tools are not shown


def test_tool_call_history_with_null_content_is_accepted(client):
    history = ASK + [
        {"role": "assistant", "content": None, "tool_calls": [{
            "id": "call_1", "type": "function",
            "function": {"name": "get_weather", "arguments": '{"city": "Paris", "unit": "celsius"}'}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": "22 degrees and sunny"},
    ]
    out = client.chat.completions.create(model="smollm2", messages=history, tools=TOOLS, max_tokens=8, temperature=0)
    assert out.choices[0].message.role == "assistant" and out.usage.prompt_tokens > 100
    bad = [dict(history[1], tool_calls=[{"id": "c", "type": "function",
                                         "function": {"name": "get_weather", "arguments": "{not json"}}])]
    with pytest.raises(openai.BadRequestError, match="arguments"):
        client.chat.completions.create(model="smollm2", messages=ASK + bad, max_tokens=2)


def test_bad_schemas_and_tool_choices_are_400s(client):
    def refused(match, messages=ASK, **kw):
        with pytest.raises(openai.BadRequestError, match=match):
            client.chat.completions.create(model="tiny", messages=messages, max_tokens=4, **kw)

    refused("objectx", response_format={"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "objectx"}}})
    refused("response_format", response_format={"type": "json_schema"})
    refused("response_format", response_format={"type": "xml"})
    refused("tools", tools=[{"type": "function", "function": {"name": "f", "parameters": {"type": 7}}}],
            tool_choice="required")
    refused("not among the tools", tools=TOOLS, tool_choice={"type": "function", "function": {"name": "nope"}})
    refused("tool_choice needs tools", tool_choice="required")
    refused("content", messages=[{"role": "user", "content": None}])
    # The server is still fine.
    assert client.chat.completions.create(model="tiny", messages=ASK, max_tokens=2).usage.completion_tokens == 2


# ---- structured output and tools together with n, prompt lists and logprobs (the sampling branch)
def _by_index(chunks):
    """Streamed chunks grouped by choice index: {index: [choice deltas...]}."""
    out = {}
    for c in chunks:
        for ch in c.choices:
            out.setdefault(ch.index, []).append(ch)
    return out


def test_json_schema_with_n_choices_and_logprobs(client):
    kw = dict(model="smollm2", messages=[{"role": "user", "content": "Describe a cat."}], max_tokens=60,
              temperature=1.0, seed=7, n=2, logprobs=True, top_logprobs=2, response_format=cat_format())
    whole = client.chat.completions.create(**kw)
    assert [c.index for c in whole.choices] == [0, 1]
    for choice in whole.choices:  # every choice gets the grammar, and its own logprobs
        assert schema_errors(json.loads(choice.message.content), CAT) == []
        assert choice.finish_reason == "stop"
        entries = choice.logprobs.content
        assert entries and all(-9999.0 < e.logprob <= 0.0 and len(e.top_logprobs) == 2 for e in entries)
    assert whole.choices[0].message.content != whole.choices[1].message.content  # seeds 7 and 8
    assert sum(len(c.logprobs.content) for c in whole.choices) == whole.usage.completion_tokens
    # Streamed with the same seed: per choice, the same text and the same tokens.
    streamed = _by_index(client.chat.completions.create(**kw, stream=True))
    assert sorted(streamed) == [0, 1]
    for choice in whole.choices:
        parts = streamed[choice.index]
        assert "".join(p.delta.content or "" for p in parts) == choice.message.content
        tokens = [e.token for p in parts if p.logprobs for e in p.logprobs.content]
        assert tokens == [e.token for e in choice.logprobs.content]
        assert parts[-1].finish_reason == "stop"


def test_completions_prompt_list_n_regex_and_logprobs(client):
    out = client.completions.create(model="tiny", prompt=["Code: ", [5, 6, 7]], n=2, max_tokens=20, temperature=1.0,
                                    seed=3, logprobs=2, extra_body={"structured_outputs": {"regex": "[0-9]{3}-[a-z]{2}"}})
    assert [c.index for c in out.choices] == [0, 1, 2, 3]
    for choice in out.choices:
        assert re.fullmatch(r"[0-9]{3}-[a-z]{2}", choice.text) and choice.finish_reason == "stop"
        assert len(choice.logprobs.tokens) == len(choice.logprobs.token_logprobs) >= 1
        assert all(lp > -9999.0 for lp in choice.logprobs.token_logprobs)  # sampled: allowed by the grammar
    assert sum(len(c.logprobs.tokens) for c in out.choices) == out.usage.completion_tokens


def test_named_tool_call_with_logprobs_whole_and_streamed(client):
    kw = dict(model="smollm2", messages=ASK, tools=TOOLS, max_tokens=60, temperature=0, logprobs=True,
              top_logprobs=1, tool_choice={"type": "function", "function": {"name": "get_weather"}})
    whole = client.chat.completions.create(**kw)
    choice = whole.choices[0]
    (call,) = choice.message.tool_calls
    assert schema_errors(json.loads(call.function.arguments), WEATHER) == []
    tokens = [e.token for e in choice.logprobs.content]
    assert len(tokens) == whole.usage.completion_tokens and "".join(tokens) == call.function.arguments
    chunks = [c for c in client.chat.completions.create(**kw, stream=True) if c.choices]
    streamed = [e.token for c in chunks if c.choices[0].logprobs for e in c.choices[0].logprobs.content]
    assert streamed == tokens
    assert chunks[-1].choices[0].finish_reason == "tool_calls"


def test_required_tool_calls_per_choice_with_n(client):
    kw = dict(model="tiny", messages=ASK, tools=TOOLS, tool_choice="required", max_tokens=80, temperature=1.0,
              seed=5, n=2, parallel_tool_calls=False, logprobs=True)
    whole = client.chat.completions.create(**kw)
    assert [c.index for c in whole.choices] == [0, 1]
    ids = set()
    for choice in whole.choices:
        assert choice.finish_reason == "tool_calls" and len(choice.message.tool_calls) == 1
        call = choice.message.tool_calls[0]
        schema = {"get_weather": WEATHER, "get_time": TIME}[call.function.name]
        assert schema_errors(json.loads(call.function.arguments), schema) == []
        ids.add(call.id)
        assert choice.logprobs.content
    assert len(ids) == 2  # each choice's call has its own id
    # Streamed: each choice's deltas rebuild its call (its own parser), each ends with tool_calls.
    streamed = _by_index(client.chat.completions.create(**kw, stream=True))
    for choice in whole.choices:
        parts = streamed[choice.index]
        deltas = [tc for p in parts for tc in (p.delta.tool_calls or [])]
        call = choice.message.tool_calls[0]
        assert deltas[0].function.name == call.function.name and deltas[0].id and {d.index for d in deltas} == {0}
        assert json.loads("".join(d.function.arguments or "" for d in deltas)) == json.loads(call.function.arguments)
        assert parts[-1].finish_reason == "tool_calls"
        assert sum(len(p.logprobs.content) for p in parts if p.logprobs) == len(choice.logprobs.content)
