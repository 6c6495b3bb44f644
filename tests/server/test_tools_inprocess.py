"""Tool calling in the HTTP layer, deterministic: the echo backend "generates" its prompt, and a
template that renders only the last user message makes that prompt a model output of our
choosing. Checks auto-mode parsing of both families' formats, whole and streamed through the
official client; how tools and tool-call history reach templates (with tool support, and
Prism's fallback without); and the 400 of a server without the grammar library."""
from __future__ import annotations

import json
import sys

import openai
import pytest

from conftest import smollm2_gguf
from prism.engine.tokenizer import Tokenizer, load_tokenizer
from prism.server.app import create_app
from prism.server.tools import FALLBACK_SYSTEM, Tool, ToolCallIn, fallback_messages
from test_app_inprocess import EchoBackend, Server

# Renders the last message only (and reads `tools`, so Prism treats it as knowing tools).
LAST_MESSAGE = "{% if tools %}{% endif %}{{ messages[-1]['content'] }}"
# A Qwen2.5-like template (written for this test): tools in a system turn, calls in tags.
QWEN_LIKE = """{%- if tools %}<|im_start|>system
<tools>
{%- for tool in tools %}
{{ tool | tojson }}
{%- endfor %}
</tools><|im_end|>
{% endif %}
{%- for m in messages %}
{%- if m.role == 'assistant' and m.tool_calls %}<|im_start|>assistant
{%- for tc in m.tool_calls %}
<tool_call>
{"name": "{{ tc.function.name }}", "arguments": {{ tc.function.arguments | tojson }}}
</tool_call>
{%- endfor %}<|im_end|>
{% elif m.role == 'tool' %}<|im_start|>user
<tool_response>
{{ m.content }}
</tool_response><|im_end|>
{% else %}<|im_start|>{{ m.role }}
{{ m.content }}<|im_end|>
{% endif %}
{%- endfor %}
{%- if add_generation_prompt %}<|im_start|>assistant
{% endif %}"""

TOOLS = [{"type": "function", "function": {"name": "get_weather", "parameters": {
    "type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}]
HISTORY = [
    {"role": "user", "content": "Weather in Paris?"},
    {"role": "assistant", "content": None, "tool_calls": [{
        "id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}]},
    {"role": "tool", "tool_call_id": "call_1", "content": "22 degrees"},
]


class ParserBackend(EchoBackend):
    parser: str | None = None

    def tool_parser(self, model: str) -> str | None:
        return self.parser


@pytest.fixture(scope="module")
def smollm2_tokenizer() -> Tokenizer:
    return load_tokenizer(str(smollm2_gguf()))


@pytest.fixture(scope="module")
def backend(smollm2_tokenizer):
    tok = smollm2_tokenizer
    return ParserBackend(Tokenizer(tok.backend, tok.eos_token_ids, LAST_MESSAGE, tok.special_tokens))


@pytest.fixture(scope="module")
def client(backend):
    server = Server(create_app(backend))
    yield openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0, timeout=20)
    server.stop()


HERMES_OUT = 'Checking.<tool_call>{"name": "get_weather", "arguments": {"city": "Paris"}}</tool_call>'
LLAMA_OUT = '{"name": "get_weather", "parameters": {"city": "Paris"}}'


@pytest.mark.parametrize("parser, output, content", [("hermes", HERMES_OUT, "Checking."), ("llama3_json", LLAMA_OUT, None)])
def test_auto_tool_calls_parsed_whole_and_streamed(backend, client, parser, output, content):
    backend.parser = parser  # the model's config key (tool_parser) names the format
    kw = dict(model="echo", messages=[{"role": "user", "content": output}], tools=TOOLS, max_tokens=60)
    whole = client.chat.completions.create(**kw).choices[0]
    assert whole.finish_reason == "tool_calls" and whole.message.content == content
    (call,) = whole.message.tool_calls
    assert call.function.name == "get_weather" and json.loads(call.function.arguments) == {"city": "Paris"}
    chunks = [c for c in client.chat.completions.create(**kw, stream=True) if c.choices]
    deltas = [tc for c in chunks for tc in (c.choices[0].delta.tool_calls or [])]
    assert deltas[0].function.name == "get_weather" and deltas[0].id.startswith("chatcmpl-tool-")
    assert json.loads("".join(d.function.arguments or "" for d in deltas)) == {"city": "Paris"}
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == (content or "")
    assert chunks[-1].choices[0].finish_reason == "tool_calls"


def test_plain_text_with_tools_is_content(backend, client):
    backend.parser = "hermes"
    out = client.chat.completions.create(model="echo", messages=[{"role": "user", "content": "It is sunny."}],
                                         tools=TOOLS, max_tokens=20).choices[0]
    assert out.message.content == "It is sunny." and not out.message.tool_calls and out.finish_reason == "stop"


def test_tools_and_history_reach_a_template_that_knows_tools(smollm2_tokenizer):
    tok = Tokenizer(smollm2_tokenizer.backend, smollm2_tokenizer.eos_token_ids, QWEN_LIKE,
                    smollm2_tokenizer.special_tokens)
    assert tok.template_supports_tools
    messages = _template_messages(HISTORY)
    text = tok.decode(tok.apply_chat_template(messages, tools=TOOLS), skip_special_tokens=False)
    assert json.dumps(TOOLS[0], ensure_ascii=False) in text
    assert '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>' in text
    assert "<tool_response>\n22 degrees\n</tool_response>" in text


def test_the_fallback_lists_tools_for_a_template_without_them(smollm2_tokenizer):
    assert not smollm2_tokenizer.template_supports_tools  # SmolLM2's: role and content only
    tools = [Tool.model_validate(t).model_dump(exclude_none=True) for t in TOOLS]
    messages = fallback_messages(_template_messages(HISTORY), tools)
    text = smollm2_tokenizer.decode(smollm2_tokenizer.apply_chat_template(messages), skip_special_tokens=False)
    assert FALLBACK_SYSTEM.split("\n")[0] in text and json.dumps(tools[0]["function"]) in text
    assert '<|im_start|>assistant\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}' in text
    assert "<|im_start|>user\n<tool_response>\n22 degrees\n</tool_response>" in text


def test_without_the_grammar_library_structured_requests_are_400s(client, monkeypatch):
    monkeypatch.setitem(sys.modules, "llguidance", None)  # as if not installed
    fmt = {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "object"}}}
    with pytest.raises(openai.BadRequestError, match=r"prism\[structured\]"):
        client.chat.completions.create(model="echo", messages=[{"role": "user", "content": "hi"}], response_format=fmt)
    with pytest.raises(openai.BadRequestError, match="llguidance"):
        client.chat.completions.create(model="echo", messages=[{"role": "user", "content": "hi"}], tools=TOOLS,
                                       tool_choice="required")
    out = client.chat.completions.create(model="echo", messages=[{"role": "user", "content": "hi"}], max_tokens=4)
    assert out.choices[0].message.content == "hi"  # everything else still works


def _template_messages(history: list[dict]) -> list[dict]:
    out = []
    for m in history:
        m = dict(m)
        if m.get("tool_calls"):
            m["tool_calls"] = [ToolCallIn.model_validate(c).template_dict() for c in m["tool_calls"]]
        out.append(m)
    return out
