"""The sampling features' HTTP side on the in-process server (test_app_inprocess.py's echo
backend, which generates the prompt back): n choices, prompt lists, echo, logprobs shapes,
the new sampling fields reaching the backend, /tokenize and /detokenize."""
from __future__ import annotations

import httpx
import openai
import pytest

import test_app_inprocess as echo_app
from prism.server.app import create_app
from test_app_inprocess import API_KEY, MESSAGES, PROMPT, Server, assert_openai_error

# The echo backend's fixtures, shared with test_app_inprocess.py.
backend, server, client, http, _fresh_backend = (echo_app.backend, echo_app.server, echo_app.client, echo_app.http,
                                                 echo_app._fresh_backend)


# ---- n choices -----------------------------------------------------------------------------
def test_n_choices_with_their_index_and_usage(backend, client):
    out = client.completions.create(model="echo", prompt=PROMPT, max_tokens=5, n=3, seed=7)
    assert [c.index for c in out.choices] == [0, 1, 2]
    assert len({c.text for c in out.choices}) == 1  # the echo backend is deterministic
    prompt_len = len(backend.tok.encode(PROMPT))
    assert out.usage.prompt_tokens == prompt_len and out.usage.completion_tokens == 15
    seen = backend.requests[-3:]
    assert [r.params.seed for r in seen] == [7, 8, 9]  # choice i: seed + i (vLLM's rule)
    assert len({r.req_id for r in seen}) == 3 and seen[0].req_id == out.id

    chat = client.chat.completions.create(model="echo", messages=MESSAGES, n=2, max_tokens=4)
    assert [c.index for c in chat.choices] == [0, 1] and chat.usage.completion_tokens == 8
    assert all(c.message.content == chat.choices[0].message.content for c in chat.choices)
    assert [r.params.seed for r in backend.requests[-2:]] == [None, None]


def test_n_choices_streamed(backend, client):
    texts, finishes, usage = {}, {}, None
    for c in client.chat.completions.create(model="echo", messages=MESSAGES, n=3, max_tokens=4, stream=True,
                                            stream_options={"include_usage": True}):
        if c.usage is not None:
            usage = c.usage
        for choice in c.choices:
            texts[choice.index] = texts.get(choice.index, "") + (choice.delta.content or "")
            if choice.finish_reason:
                finishes[choice.index] = choice.finish_reason
    assert set(texts) == {0, 1, 2} and finishes == {0: "length", 1: "length", 2: "length"}
    assert len(set(texts.values())) == 1 and usage.completion_tokens == 12

    pieces = {}
    for c in client.completions.create(model="echo", prompt=PROMPT, n=2, max_tokens=3, stream=True):
        for choice in c.choices:
            pieces.setdefault(choice.index, []).append(choice.text)
    assert set(pieces) == {0, 1} and "".join(pieces[0]) == "".join(pieces[1])


def test_seeds_wrap_in_the_64_bit_range(backend, client):
    client.completions.create(model="echo", prompt="hi", max_tokens=1, n=2, seed=2**63 - 1)
    assert [r.params.seed for r in backend.requests[-2:]] == [2**63 - 1, -(2**63)]


def test_a_failing_choice_fails_the_request(backend, client):
    backend.fail_after, backend.fail_after_n = RuntimeError("boom"), 1
    with pytest.raises(openai.InternalServerError):
        client.completions.create(model="echo", prompt=PROMPT, max_tokens=10, n=3)


def test_a_client_leaving_aborts_every_choice(backend, server):
    backend.stall_after = 1
    body = {"model": "echo", "prompt": PROMPT, "max_tokens": 10, "n": 3, "stream": True}
    with httpx.Client(base_url=server.url, timeout=10) as raw:
        with raw.stream("POST", "/v1/completions", json=body) as resp:
            next(resp.iter_lines())  # the first event: the choices are running
    ids = [r.req_id for r in backend.requests[-3:]]
    assert len(set(ids)) == 3 and all(backend.wait_closed(i) for i in ids)


# ---- prompt lists and echo -----------------------------------------------------------------
def test_prompt_lists_one_choice_each_times_n(backend, client):
    ids = backend.tok.encode("Bonjour")
    out = client.completions.create(model="echo", prompt=["Hello there", "Good bye"], max_tokens=50, n=2)
    assert [c.index for c in out.choices] == [0, 1, 2, 3]
    assert [c.text for c in out.choices] == ["Hello there"] * 2 + ["Good bye"] * 2
    lens = [len(backend.tok.encode(p)) for p in ("Hello there", "Good bye")]
    assert out.usage.prompt_tokens == sum(lens) and out.usage.completion_tokens == 2 * sum(lens)
    out = client.completions.create(model="echo", prompt=[ids, ids[:1]], max_tokens=50)
    assert [c.text for c in out.choices] == [backend.tok.decode(ids), backend.tok.decode(ids[:1])]


def test_too_many_choices_is_400(http):
    resp = http.post("/v1/completions", json={"model": "echo", "prompt": ["a"] * 17, "n": 16})
    assert_openai_error(resp, 400, param="n")


def test_echo_puts_the_prompt_first(backend, client, http):
    out = client.completions.create(model="echo", prompt=["One", "Two"], max_tokens=1, echo=True)
    assert [c.text for c in out.choices] == ["OneOne", "TwoTwo"]
    ids = backend.tok.encode("Three")
    assert client.completions.create(model="echo", prompt=ids, max_tokens=1, echo=True).choices[0].text == "ThreeThree"
    streamed = {}
    for c in client.completions.create(model="echo", prompt="Four", max_tokens=1, echo=True, n=2, stream=True):
        for choice in c.choices:
            streamed[choice.index] = streamed.get(choice.index, "") + choice.text
    assert streamed == {0: "FourFour", 1: "FourFour"}
    resp = http.post("/v1/completions", json={"model": "echo", "prompt": "x", "echo": True, "logprobs": 1})
    assert "prompt's logprobs" in assert_openai_error(resp, 400, param="echo")["message"]


# ---- logprobs --------------------------------------------------------------------------------
def test_chat_logprobs_shape(backend, client):
    out = client.chat.completions.create(model="echo", messages=MESSAGES, max_tokens=4, logprobs=True, top_logprobs=3)
    content = out.choices[0].logprobs.content
    ids = backend.tok.apply_chat_template(MESSAGES)[:4]
    assert len(content) == 4 and backend.requests[-1].params.logprobs == 3
    for i, (entry, token_id) in enumerate(zip(content, ids)):
        token = backend.tok.decode([token_id], skip_special_tokens=False)
        assert entry.token == token and entry.bytes == list(token.encode()) and entry.logprob == -0.25 * i
        assert [t.logprob for t in entry.top_logprobs] == [-0.25 * i - 0.5 * k for k in range(3)]
        assert entry.top_logprobs[0].token == token
    plain = client.chat.completions.create(model="echo", messages=MESSAGES, max_tokens=2, logprobs=True)
    assert all(e.top_logprobs == [] for e in plain.choices[0].logprobs.content)
    assert backend.requests[-1].params.logprobs == 0
    assert client.chat.completions.create(model="echo", messages=MESSAGES, max_tokens=2).choices[0].logprobs is None


def test_chat_logprobs_streamed_match_the_whole(client):
    kw = dict(model="echo", messages=MESSAGES, max_tokens=5, logprobs=True, top_logprobs=2)
    whole = client.chat.completions.create(**kw).choices[0].logprobs.content
    streamed = [e for c in client.chat.completions.create(stream=True, **kw) if c.choices and c.choices[0].logprobs
                for e in c.choices[0].logprobs.content]
    assert [e.model_dump() for e in streamed] == [e.model_dump() for e in whole]


def test_completion_logprobs_shape_and_stream(backend, client):
    out = client.completions.create(model="echo", prompt=PROMPT, max_tokens=6, logprobs=2)
    lp = out.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == len(lp.text_offset) == 6
    assert lp.token_logprobs == [-0.25 * i for i in range(6)]
    assert lp.text_offset == [sum(len(t) for t in lp.tokens[:i]) for i in range(6)]
    assert all(len(top) in (2, 3) and lp.tokens[i] in top for i, top in enumerate(lp.top_logprobs))
    assert "".join(lp.tokens) == out.choices[0].text
    streamed = {"tokens": [], "token_logprobs": [], "text_offset": []}
    for c in client.completions.create(model="echo", prompt=PROMPT, max_tokens=6, logprobs=2, stream=True):
        if c.choices[0].logprobs is not None:
            for key in streamed:
                streamed[key] += getattr(c.choices[0].logprobs, key)
    assert streamed == {"tokens": lp.tokens, "token_logprobs": lp.token_logprobs, "text_offset": lp.text_offset}


# ---- the new sampling fields reach the backend -----------------------------------------------
def test_penalties_min_p_and_logit_bias_reach_the_backend(backend, client, http):
    client.completions.create(model="echo", prompt="hi", max_tokens=1, presence_penalty=0.5, frequency_penalty=-1.5,
                              logit_bias={"42": 100, "7": -100},
                              extra_body={"repetition_penalty": 1.2, "min_p": 0.1})
    p = backend.requests[-1].params
    assert (p.presence_penalty, p.frequency_penalty, p.repetition_penalty, p.min_p) == (0.5, -1.5, 1.2, 0.1)
    assert p.logit_bias == {42: 100.0, 7: -100.0}
    client.chat.completions.create(model="echo", messages=MESSAGES, max_tokens=1)
    p = backend.requests[-1].params
    assert (p.presence_penalty, p.frequency_penalty, p.repetition_penalty, p.min_p, p.logit_bias) == (
        0.0, 0.0, 1.0, 0.0, None)
    vocab = backend.tok.vocab_size
    resp = http.post("/v1/completions", json={"model": "echo", "prompt": "hi", "logit_bias": {str(vocab): 1}})
    assert "vocabulary" in assert_openai_error(resp, 400, param="logit_bias")["message"]


# ---- /tokenize and /detokenize ---------------------------------------------------------------
def test_tokenize_and_detokenize_round_trip(backend, http):
    resp = http.post("/tokenize", json={"model": "echo", "prompt": PROMPT})
    body = resp.json()
    assert resp.status_code == 200 and body["tokens"] == backend.tok.encode(PROMPT)
    assert body["count"] == len(body["tokens"]) and body["max_model_len"] == 64
    assert http.post("/detokenize", json={"model": "echo", "tokens": body["tokens"]}).json() == {"prompt": PROMPT}
    chat = http.post("/tokenize", json={"model": "echo", "messages": MESSAGES}).json()
    assert chat["tokens"] == backend.tok.apply_chat_template(MESSAGES)
    bare = http.post("/tokenize", json={"model": "echo", "messages": MESSAGES, "add_generation_prompt": False}).json()
    assert bare["count"] < chat["count"] and chat["tokens"][: bare["count"]] == bare["tokens"]


def test_tokenize_errors_are_openai_shaped(backend, http):
    assert_openai_error(http.post("/tokenize", json={"model": "echo"}), 400, param="prompt")
    assert_openai_error(http.post("/tokenize", json={"model": "echo", "prompt": "a", "messages": MESSAGES}), 400,
                        param="messages")
    assert_openai_error(http.post("/tokenize", json={"model": "nope", "prompt": "a"}), 404)
    assert_openai_error(http.post("/detokenize", json={"model": "echo", "tokens": [1, 10**6]}), 400, param="tokens")
    assert_openai_error(http.post("/detokenize", json={"model": "echo", "tokens": "abc"}), 400, param="tokens")
    assert_openai_error(http.post("/detokenize", json={"tokens": [1]}), 400, param="model")


def test_tokenize_behind_the_api_key(backend):
    keyed = Server(create_app(backend, api_key=API_KEY))
    try:
        with httpx.Client(base_url=keyed.url) as keyed_http:
            assert_openai_error(keyed_http.post("/tokenize", json={"model": "echo", "prompt": "a"}), 401)
            assert_openai_error(keyed_http.post("/detokenize", json={"model": "echo", "tokens": [1]}), 401)
            ok = keyed_http.post("/tokenize", json={"model": "echo", "prompt": "a"},
                           headers={"Authorization": f"Bearer {API_KEY}"})
            assert ok.status_code == 200 and ok.json()["count"] >= 1
    finally:
        keyed.stop()
