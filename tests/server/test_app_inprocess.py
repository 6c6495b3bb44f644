"""The HTTP layer on a real uvicorn server, with the official openai client, over a small
deterministic backend that echoes the prompt tokens back (real SmolLM2 tokenizer)."""
from __future__ import annotations

import asyncio
import json
import threading
import time

import httpx
import openai
import pytest
import uvicorn

from conftest import smollm2_gguf
from prism.engine.detokenizer import IncrementalDetokenizer
from prism.engine.tokenizer import Tokenizer, load_tokenizer
from prism.server.app import create_app
from prism.server.backend import GenerationChunk, GenerationRequest, ModelCard, ServerBusy, UnknownModel, WorkerFailed
from prism.types import RequestError, TokenLogprobs

MAX_MODEL_LEN = 64
API_KEY = "sk-prism-test"




class EchoBackend:
    """A ServingBackend serving one model, "echo", that generates the prompt tokens back.

    A request asking for logprobs gets made-up ones: the token's own is -0.25 x its position
    and its top alternatives are the token itself and its successors, each 0.5 less likely.
    Knobs for the tests: `token_delay` (seconds per token), `stall_after` (tokens after which
    it waits forever), `fail_before_first` / `fail_after` (an exception, raised before the first
    chunk / after `fail_after_n` chunks), `is_healthy`.
    """

    def __init__(self, tokenizer: Tokenizer):
        self.tok = tokenizer
        self.requests: list[GenerationRequest] = []
        self.closed_early: set[str] = set()  # req_ids whose generator was closed before finishing
        self._closed_cond = threading.Condition()
        self.reset()

    def reset(self) -> None:
        self.token_delay = 0.0
        self.stall_after: int | None = None
        self.fail_before_first: BaseException | None = None
        self.fail_after: BaseException | None = None
        self.fail_after_n = 1
        self.closed_early.clear()
        self.abort_after: int | None = None  # end with finish_reason "abort" after this many tokens
        self.is_healthy = True
        self.requests.clear()

    # ---- ServingBackend ----
    def model_cards(self) -> list[ModelCard]:
        return [ModelCard(name="echo", max_model_len=MAX_MODEL_LEN, created=1_700_000_000, devices=("cpu",))]

    def _check_model(self, model: str) -> None:
        if model != "echo":
            raise UnknownModel(model)

    def tokenizer(self, model: str) -> Tokenizer:
        self._check_model(model)
        return self.tok

    def max_model_len(self, model: str) -> int:
        self._check_model(model)
        return MAX_MODEL_LEN

    async def generate(self, request: GenerationRequest):
        self.requests.append(request)
        self._check_model(request.model)
        prompt = request.prompt_token_ids
        if len(prompt) > MAX_MODEL_LEN:
            raise RequestError(f"prompt has {len(prompt)} tokens, more than the context of {MAX_MODEL_LEN}")
        if self.fail_before_first is not None:
            raise self.fail_before_first
        detok = IncrementalDetokenizer(self.tok, request.params.skip_special_tokens)
        num_out = min(len(prompt), request.params.max_tokens)
        finished = False
        try:
            for i, token_id in enumerate(prompt[:num_out]):
                await asyncio.sleep(self.token_delay)
                if self.stall_after is not None and i >= self.stall_after:
                    await asyncio.Event().wait()  # forever, until cancelled or closed
                if self.fail_after is not None and i >= self.fail_after_n:
                    raise self.fail_after
                last = i + 1 == num_out
                text = detok.step(token_id) + (detok.flush() if last else "")
                finish = ("length" if num_out == request.params.max_tokens else "stop") if last else None
                if self.abort_after is not None and i + 1 == self.abort_after:
                    last, finish = True, "abort"
                finished = last  # like a real backend: a request is done once its last chunk is out
                yield GenerationChunk(text, [token_id], finish, len(prompt), i + 1,
                                      echo_logprobs(token_id, i, request.params.logprobs))
                if last:
                    break
        finally:
            if not finished:
                with self._closed_cond:
                    self.closed_early.add(request.req_id)
                    self._closed_cond.notify_all()

    def metrics_text(self) -> tuple[bytes, str]:
        return b"# TYPE prism_requests_total counter\nprism_requests_total 7\n", "text/plain; version=0.0.4"

    def admin_view(self) -> dict:
        return {"devices": {"cpu": {"models": ["echo"], "free_pages": 12}}}

    def healthy(self) -> bool:
        return self.is_healthy

    # ---- for the tests ----
    def wait_closed(self, req_id: str, timeout: float = 5.0) -> bool:
        with self._closed_cond:
            return self._closed_cond.wait_for(lambda: req_id in self.closed_early, timeout)


def echo_logprobs(token_id: int, position: int, num_top: int | None) -> list[TokenLogprobs]:
    if num_top is None:
        return []
    own = -0.25 * position
    return [TokenLogprobs(own, [(token_id + k, own - 0.5 * k) for k in range(num_top)])]


class Server:
    def __init__(self, app):
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 20
        while not self.server.started:
            assert self.thread.is_alive() and time.monotonic() < deadline, "uvicorn did not start"
            time.sleep(0.01)
        self.port = self.server.servers[0].sockets[0].getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"

    def stop(self):
        self.server.should_exit = True
        self.thread.join(10)


@pytest.fixture(scope="module")
def backend() -> EchoBackend:
    return EchoBackend(load_tokenizer(str(smollm2_gguf())))


@pytest.fixture(autouse=True)
def _fresh_backend(backend):
    backend.reset()
    yield
    backend.reset()


@pytest.fixture(scope="module")
def server(backend):
    s = Server(create_app(backend))
    yield s
    s.stop()


@pytest.fixture(scope="module")
def keyed_server(backend):
    s = Server(create_app(backend, api_key=API_KEY))
    yield s
    s.stop()


@pytest.fixture
def client(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0, timeout=20)


@pytest.fixture
def http(server):
    with httpx.Client(base_url=server.url, timeout=20) as c:
        yield c


def assert_openai_error(resp: httpx.Response, status: int, param: str | None = None, type_="invalid_request_error"):
    assert resp.status_code == status, resp.text
    err = resp.json()["error"]
    assert set(err) == {"message", "type", "param", "code"}
    assert err["type"] == type_ and err["message"]
    if param is not None:
        assert err["param"] == param and param in err["message"], err
    return err


PROMPT = "Hello world, this is Prism talking: naïve café 😀!"


# ---- listing and pass-through endpoints ---------------------------------------------------
def test_models(client, http):
    models = client.models.list()
    assert [m.id for m in models.data] == ["echo"]
    assert models.data[0].object == "model" and models.data[0].owned_by == "prism"
    raw = http.get("/v1/models").json()
    assert raw["object"] == "list"
    assert raw["data"][0]["max_model_len"] == MAX_MODEL_LEN and raw["data"][0]["devices"] == ["cpu"]
    assert raw["data"][0]["created"] == 1_700_000_000


def test_health_metrics_admin(backend, http):
    assert http.get("/health").json() == {"status": "ok"}
    backend.is_healthy = False
    assert http.get("/health").status_code == 503
    metrics = http.get("/metrics")
    assert metrics.status_code == 200 and "prism_requests_total 7" in metrics.text
    assert metrics.headers["content-type"].startswith("text/plain")
    assert http.get("/admin/state").json() == backend.admin_view()


def test_unknown_route_is_openai_shaped(http):
    assert_openai_error(http.get("/v1/nothing-here"), 404, type_="not_found_error")


# ---- completions ---------------------------------------------------------------------------
def test_completion(backend, client):
    ids = backend.tok.encode(PROMPT)
    out = client.completions.create(model="echo", prompt=PROMPT, max_tokens=100)
    assert out.object == "text_completion" and out.id.startswith("cmpl-") and out.model == "echo"
    choice = out.choices[0]
    assert choice.text == backend.tok.decode(ids) and choice.finish_reason == "stop" and choice.index == 0
    assert choice.logprobs is None
    assert (out.usage.prompt_tokens, out.usage.completion_tokens, out.usage.total_tokens) == (
        len(ids), len(ids), 2 * len(ids))
    seen = backend.requests[-1]
    assert seen.req_id == out.id and seen.prompt_token_ids == ids
    assert not backend.closed_early


@pytest.mark.parametrize("route", ["completions", "chat"])
def test_requests_carry_when_the_http_request_came_in(backend, client, route):
    # The device dates a request from then (the router sends its age): every choice the same.
    before = time.monotonic()
    if route == "completions":
        client.completions.create(model="echo", prompt=PROMPT, max_tokens=2, n=2)
    else:
        client.chat.completions.create(model="echo", messages=MESSAGES, max_tokens=2, n=2)
    after = time.monotonic()
    stamps = {r.received_s for r in backend.requests}
    assert len(backend.requests) == 2 and len(stamps) == 1
    assert before <= stamps.pop() <= after


def test_completion_length_and_default_max_tokens(backend, client):
    ids = backend.tok.encode(PROMPT)
    out = client.completions.create(model="echo", prompt=PROMPT, max_tokens=3)
    assert out.choices[0].finish_reason == "length" and out.usage.completion_tokens == 3
    assert out.choices[0].text == backend.tok.decode(ids[:3])
    client.completions.create(model="echo", prompt=PROMPT)
    assert backend.requests[-1].params.max_tokens == 16  # OpenAI's default
    # max_tokens is clamped to the room the context leaves after the prompt
    client.completions.create(model="echo", prompt=PROMPT, max_tokens=10_000)
    assert backend.requests[-1].params.max_tokens == MAX_MODEL_LEN - len(ids)


def test_completion_stream(backend, client):
    full = client.completions.create(model="echo", prompt=PROMPT, max_tokens=12)
    chunks = list(client.completions.create(model="echo", prompt=PROMPT, max_tokens=12, stream=True,
                                            stream_options={"include_usage": True}))
    text_chunks, usage_chunk = chunks[:-1], chunks[-1]
    assert len(text_chunks) > 3
    assert "".join(c.choices[0].text for c in text_chunks) == full.choices[0].text
    assert [c.choices[0].finish_reason for c in text_chunks][-1] == "length"
    assert all(c.choices[0].finish_reason is None for c in text_chunks[:-1])
    assert all(c.object == "text_completion" and c.id == chunks[0].id for c in chunks)
    assert usage_chunk.choices == [] and usage_chunk.usage.model_dump(include={"prompt_tokens", "completion_tokens",
                                                                              "total_tokens"}) == \
        full.usage.model_dump(include={"prompt_tokens", "completion_tokens", "total_tokens"})
    # without include_usage: no usage chunk, the last chunk carries the finish reason
    chunks = list(client.completions.create(model="echo", prompt=PROMPT, max_tokens=12, stream=True))
    assert chunks[-1].choices[0].finish_reason == "length"
    assert not backend.closed_early  # finished streams are not aborted


def test_token_id_prompts(backend, client, http):
    ids = backend.tok.encode(PROMPT)[:10]
    for prompt in (ids, [ids]):
        out = client.completions.create(model="echo", prompt=prompt, max_tokens=50)
        assert out.choices[0].text == backend.tok.decode(ids) and out.usage.prompt_tokens == len(ids)
        assert backend.requests[-1].prompt_token_ids == ids
    assert client.completions.create(model="echo", prompt=[PROMPT], max_tokens=2).usage.prompt_tokens > 2
    err = assert_openai_error(http.post("/v1/completions", json={"model": "echo", "prompt": [1, 10**9]}), 400)
    assert "vocabulary" in err["message"]


def test_bad_prompts_refused(http):
    for prompt in ([[1, 2], []], [], "", [1.5], None, ["ok", 5], [[1, 2.5]], [True, 2]):
        assert_openai_error(http.post("/v1/completions", json={"model": "echo", "prompt": prompt}), 400)


def test_sampling_params_and_extensions_reach_the_backend(backend, client):
    client.completions.create(
        model="echo", prompt=PROMPT, max_tokens=5, temperature=0.3, top_p=0.9, seed=42, stop=["foo", "bar"],
        user="someone",
        extra_body={"top_k": 20, "stop_token_ids": [2, 7], "ignore_eos": True, "ttft_slo_ms": 500,
                    "tpot_slo_ms": 50, "priority": 3, "an_unknown_field": {"is": "ignored"}},
    )
    seen = backend.requests[-1]
    p = seen.params
    assert (p.temperature, p.top_p, p.top_k, p.seed, p.max_tokens) == (0.3, 0.9, 20, 42, 5)
    assert p.stop == ("foo", "bar") and p.stop_token_ids == (2, 7) and p.ignore_eos
    assert seen.ttft_slo_s == pytest.approx(0.5) and seen.tpot_slo_s == pytest.approx(0.05) and seen.priority == 3
    client.completions.create(model="echo", prompt=PROMPT, max_tokens=5, stop="\n")
    seen = backend.requests[-1]
    assert seen.params.stop == ("\n",) and seen.params.temperature == 1.0 and seen.ttft_slo_s is None
    assert seen.priority == 0


# ---- chat ----------------------------------------------------------------------------------
MESSAGES = [{"role": "user", "content": "Hi"}]


def test_chat(backend, client):
    ids = backend.tok.apply_chat_template(MESSAGES)
    out = client.chat.completions.create(model="echo", messages=MESSAGES)
    assert out.object == "chat.completion" and out.id.startswith("chatcmpl-")
    msg = out.choices[0].message
    assert msg.role == "assistant" and msg.content == backend.tok.decode(ids)
    assert out.choices[0].finish_reason == "stop"
    assert (out.usage.prompt_tokens, out.usage.completion_tokens) == (len(ids), len(ids))
    seen = backend.requests[-1]
    assert seen.prompt_token_ids == ids
    assert seen.params.max_tokens == MAX_MODEL_LEN - len(ids)  # no max_tokens: the rest of the context
    out = client.chat.completions.create(model="echo", messages=MESSAGES, max_completion_tokens=4)
    assert out.choices[0].finish_reason == "length" and out.usage.completion_tokens == 4
    client.chat.completions.create(model="echo", messages=MESSAGES, max_tokens=6)
    assert backend.requests[-1].params.max_tokens == 6


def test_chat_stream(backend, client):
    full = client.chat.completions.create(model="echo", messages=MESSAGES)
    chunks = list(client.chat.completions.create(model="echo", messages=MESSAGES, stream=True,
                                                 stream_options={"include_usage": True}))
    assert all(c.object == "chat.completion.chunk" and c.id == chunks[0].id for c in chunks)
    assert chunks[0].choices[0].delta.role == "assistant"
    *content, final, usage = chunks
    assert final.choices[0].finish_reason == "stop" and not final.choices[0].delta.content
    assert all(c.choices[0].finish_reason is None for c in content)
    assert "".join(c.choices[0].delta.content or "" for c in content) == full.choices[0].message.content
    assert usage.choices == [] and usage.usage.completion_tokens == full.usage.completion_tokens
    assert usage.usage.prompt_tokens == full.usage.prompt_tokens
    assert client.chat.completions.create(model="echo", messages=MESSAGES, stream=True).response is not None


def test_chat_content_parts_and_roles(backend, client):
    parts = [{"type": "text", "text": "Hello "}, {"type": "text", "text": "there"}]
    client.chat.completions.create(
        model="echo", max_tokens=2,
        messages=[{"role": "developer", "content": "Be brief."}, {"role": "user", "content": parts}])
    expected = backend.tok.apply_chat_template(
        [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello there"}])
    assert backend.requests[-1].prompt_token_ids == expected


def test_abort_reported_as_stop(backend, client):
    backend.abort_after = 2
    out = client.completions.create(model="echo", prompt=PROMPT, max_tokens=10)
    assert out.choices[0].finish_reason == "stop" and out.usage.completion_tokens == 2
    chunks = list(client.chat.completions.create(model="echo", messages=MESSAGES, stream=True))
    assert chunks[-1].choices[0].finish_reason == "stop"


# ---- errors --------------------------------------------------------------------------------
def test_unknown_model(client, http):
    with pytest.raises(openai.NotFoundError, match="nope"):
        client.completions.create(model="nope", prompt="hi")
    with pytest.raises(openai.NotFoundError, match="nope"):
        client.chat.completions.create(model="nope", messages=MESSAGES, stream=True)
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="nope", prompt=[1, 2, 3])
    err = assert_openai_error(http.post("/v1/completions", json={"model": "nope", "prompt": "hi"}), 404)
    assert err["code"] == "model_not_found" and "nope" in err["message"]


@pytest.mark.parametrize("field, value", [
    ("temperature", 2.5), ("temperature", -0.1), ("top_p", 0), ("top_p", 1.5), ("max_tokens", 0),
    ("max_tokens", "many"), ("n", 0), ("n", 17), ("logprobs", 21), ("logprobs", -1), ("stop", ["a", "b", "c", "d", "e"]),
    ("top_k", -5), ("ttft_slo_ms", -1), ("stream", "sometimes"), ("presence_penalty", 2.5),
    ("frequency_penalty", -3), ("repetition_penalty", 0), ("min_p", 1.5), ("logit_bias", {"x": 1}),
    ("logit_bias", {"5": 100.5}), ("logit_bias", {str(i): 1 for i in range(301)}), ("best_of", 2), ("suffix", "x"),
])
def test_bad_completion_fields(http, field, value):
    resp = http.post("/v1/completions", json={"model": "echo", "prompt": "hi", field: value})
    assert_openai_error(resp, 400, param=field)


def test_bad_chat_bodies(http):
    post = lambda body: http.post("/v1/chat/completions", json=body)  # noqa: E731
    assert_openai_error(post({"model": "echo"}), 400, param="messages")
    assert_openai_error(post({"model": "echo", "messages": []}), 400, param="messages")
    assert_openai_error(post({"messages": MESSAGES}), 400, param="model")
    assert_openai_error(post({"model": "echo", "messages": [{"role": "robot", "content": "x"}]}), 400,
                        param="messages[0].role")
    assert_openai_error(post({"model": "echo", "messages": [{"role": "user", "content": 5}]}), 400,
                        param="messages[0].content")
    assert_openai_error(post({"model": "echo", "messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": "x"}}]}]}), 400, param="messages[0].content")
    assert_openai_error(post({"model": "echo", "messages": MESSAGES, "stop": [1]}), 400, param="stop")
    assert_openai_error(post({"model": "echo", "messages": MESSAGES, "max_completion_tokens": 0}), 400,
                        param="max_completion_tokens")
    assert_openai_error(post({"model": "echo", "messages": MESSAGES, "top_logprobs": 2}), 400, param="top_logprobs")
    assert_openai_error(post({"model": "echo", "messages": MESSAGES, "logprobs": True, "top_logprobs": 21}), 400,
                        param="top_logprobs")
    assert_openai_error(post({"model": "echo", "messages": MESSAGES, "n": 0}), 400, param="n")
    assert_openai_error(post({"model": "echo", "messages": MESSAGES, "logit_bias": {"99999999": 1}}), 400,
                        param="logit_bias")


def test_malformed_json(http):
    for body in (b"{not json", b"[1, 2]", b"", "{\"model\": \"\xe9\"}".encode("latin-1")):
        resp = http.post("/v1/completions", content=body, headers={"content-type": "application/json"})
        assert_openai_error(resp, 400)
    assert "JSON" in http.post("/v1/chat/completions", content=b"{oops").json()["error"]["message"]


def test_openai_client_sees_bad_request(client):
    with pytest.raises(openai.BadRequestError, match="temperature"):
        client.chat.completions.create(model="echo", messages=MESSAGES, temperature=3)


def test_prompt_longer_than_context(backend, client, http):
    long_text = "one two three four five six seven eight nine ten " * 10
    with pytest.raises(openai.BadRequestError, match="context length"):
        client.completions.create(model="echo", prompt=long_text)
    with pytest.raises(openai.BadRequestError, match="context length"):
        client.chat.completions.create(model="echo", messages=[{"role": "user", "content": long_text}], stream=True)
    err = assert_openai_error(http.post("/v1/completions", json={"model": "echo", "prompt": list(range(64))}), 400)
    assert err["code"] == "context_length_exceeded"
    assert not backend.requests  # refused before reaching the backend


@pytest.mark.parametrize("stream", [False, True])
def test_backend_errors_before_first_chunk(backend, http, stream):
    body = {"model": "echo", "prompt": "hi", "stream": stream}
    backend.fail_before_first = RequestError("this prompt is not welcome")
    err = assert_openai_error(http.post("/v1/completions", json=body), 400)
    assert err["message"] == "this prompt is not welcome"
    backend.fail_before_first = ServerBusy("shutting down")
    assert_openai_error(http.post("/v1/completions", json=body), 503, type_="server_error")
    backend.fail_before_first = UnknownModel("echo")
    assert_openai_error(http.post("/v1/chat/completions", json={**body, "messages": MESSAGES}), 404)
    backend.fail_before_first = RuntimeError("secret internals")
    err = assert_openai_error(http.post("/v1/completions", json=body), 500, type_="server_error")
    assert "secret" not in err["message"]
    backend.fail_before_first = None
    assert http.post("/v1/completions", json=body).status_code == 200  # the server is still fine


def test_backend_error_mid_stream(backend, client, http):
    backend.fail_after, backend.fail_after_n = RuntimeError("worker crashed"), 3
    with http.stream("POST", "/v1/completions", json={"model": "echo", "prompt": PROMPT, "stream": True}) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        events = [line[len("data: "):] for line in r.iter_lines() if line.startswith("data: ")]
    assert len(events) == 4 and "[DONE]" not in events
    last = json.loads(events[-1])
    assert last["error"]["type"] == "server_error" and "crashed" not in last["error"]["message"]
    with pytest.raises(openai.APIError):
        for _ in client.chat.completions.create(model="echo", messages=MESSAGES, stream=True):
            pass
    # a non-streamed request fails as a whole, with a JSON error
    assert_openai_error(http.post("/v1/completions", json={"model": "echo", "prompt": PROMPT}), 500,
                        type_="server_error")


# ---- API key -------------------------------------------------------------------------------
def test_api_key(keyed_server):
    bad = openai.OpenAI(base_url=f"{keyed_server.url}/v1", api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        bad.models.list()
    with pytest.raises(openai.AuthenticationError):
        bad.completions.create(model="echo", prompt="hi", max_tokens=1)
    good = openai.OpenAI(base_url=f"{keyed_server.url}/v1", api_key=API_KEY, max_retries=0)
    assert good.completions.create(model="echo", prompt="hi", max_tokens=1).usage.completion_tokens == 1
    with httpx.Client(base_url=keyed_server.url) as http:
        assert_openai_error(http.get("/v1/models"), 401)
        assert_openai_error(http.get("/admin/state"), 401)
        assert http.get("/admin/state", headers={"Authorization": f"Bearer {API_KEY}"}).status_code == 200
        assert http.get("/health").status_code == 200 and http.get("/metrics").status_code == 200


# ---- client disconnects --------------------------------------------------------------------
def test_disconnect_mid_stream_closes_backend_iterator(backend, server):
    backend.stall_after = 3
    with httpx.Client(base_url=server.url, timeout=10) as http:
        with http.stream("POST", "/v1/chat/completions",
                         json={"model": "echo", "messages": MESSAGES, "stream": True}) as r:
            first = next(line for line in r.iter_lines() if line.startswith("data: "))
            req_id = json.loads(first[len("data: "):])["id"]
    assert backend.wait_closed(req_id), "the backend iterator was not closed after the client left"


def test_disconnect_while_streaming_fast(backend, server):
    backend.token_delay = 0.02
    with httpx.Client(base_url=server.url, timeout=10) as http:
        with http.stream("POST", "/v1/completions", json={"model": "echo", "prompt": PROMPT, "stream": True,
                                                          "max_tokens": 60}) as r:
            first = next(line for line in r.iter_lines() if line.startswith("data: "))
            req_id = json.loads(first[len("data: "):])["id"]
    assert backend.wait_closed(req_id)


@pytest.mark.parametrize("stream", [False, True])
def test_disconnect_before_first_chunk(backend, server, stream):
    backend.stall_after = 0
    with httpx.Client(base_url=server.url, timeout=0.5) as http:
        with pytest.raises(httpx.ReadTimeout):
            http.post("/v1/completions", json={"model": "echo", "prompt": "hi", "stream": stream})
    req_id = backend.requests[-1].req_id
    assert backend.wait_closed(req_id)


# ---- the edge: nothing a client sends is a 500 ---------------------------------------------
@pytest.mark.parametrize("field, value, param", [
    ("seed", 2**70, "seed"), ("seed", -(2**70), "seed"), ("seed", 2**63, "seed"),
    ("stop_token_ids", [2**70], "stop_token_ids[0]"), ("stop_token_ids", [-1], "stop_token_ids[0]"),
    ("priority", 2**70, "priority"), ("priority", -(2**40), "priority"), ("top_k", 2**70, "top_k"),
    ("max_tokens", 2**70, "max_tokens"), ("prompt", [5, 2**70], "prompt"),
])
def test_integers_beyond_their_range_are_400(backend, http, field, value, param):
    resp = http.post("/v1/completions", json={"model": "echo", "prompt": "hi", field: value})
    assert_openai_error(resp, 400, param=param)
    assert not backend.requests  # refused before reaching the backend


def test_integers_at_their_limits_pass(backend, client):
    client.completions.create(model="echo", prompt="hi", max_tokens=1, seed=2**63 - 1,
                              extra_body={"priority": -(2**31), "stop_token_ids": [2**31 - 1]})
    assert backend.requests[-1].params.seed == 2**63 - 1 and backend.requests[-1].priority == -(2**31)
    with pytest.raises(openai.BadRequestError, match="seed"):
        client.completions.create(model="echo", prompt="hi", seed=2**70)


def test_deep_json_is_400(http):
    for depth in (65, 5000, 100_000):
        body = '{"model": "echo", "prompt": "hi", "x": ' + "[" * depth + "]" * depth + "}"
        err = assert_openai_error(http.post("/v1/completions", content=body), 400)
        assert "nested" in err["message"]
    body = '{"model": "echo", "prompt": "hi", "x": ' + '{"a":' * 5000 + "1" + "}" * 5000 + "}"
    assert_openai_error(http.post("/v1/chat/completions", content=body), 400)
    ok = '{"model": "echo", "prompt": "hi", "max_tokens": 1, "x": ' + "[" * 60 + "]" * 60 + "}"
    assert http.post("/v1/completions", content=ok).status_code == 200
    huge_int = '{"model": "echo", "prompt": "hi", "seed": ' + "9" * 5000 + "}"
    assert_openai_error(http.post("/v1/completions", content=huge_int), 400)


def test_lone_surrogate_is_400(backend, http):
    chat = '{"model": "echo", "messages": [{"role": "user", "content": "a\\ud800b"}]}'
    err = assert_openai_error(http.post("/v1/chat/completions", content=chat), 400)
    assert "Unicode" in err["message"]
    assert_openai_error(http.post("/v1/completions", content='{"model": "echo", "prompt": "\\udfff"}'), 400)
    assert not backend.requests
    paired = '{"model": "echo", "prompt": "\\ud83d\\ude00", "max_tokens": 1}'  # a valid pair: fine
    assert http.post("/v1/completions", content=paired).status_code == 200


@pytest.fixture(scope="module")
def small_body_server(backend):
    s = Server(create_app(backend, max_body_bytes=2048))
    yield s
    s.stop()


def test_body_size_limit_is_413(backend, small_body_server):
    with httpx.Client(base_url=small_body_server.url, timeout=20) as http:
        big = {"model": "echo", "prompt": "x" * 4000}
        err = assert_openai_error(http.post("/v1/completions", json=big), 413)
        assert err["code"] == "request_too_large" and "2048" in err["message"]

        def chunks():  # no Content-Length: caught while reading
            yield b'{"model": "echo", "prompt": "'
            for _ in range(10):
                yield b"y" * 500
            yield b'"}'
        resp = http.post("/v1/completions", content=chunks())
        assert "content-length" not in resp.request.headers
        assert_openai_error(resp, 413)
        assert not backend.requests
        assert http.post("/v1/completions", json={"model": "echo", "prompt": "hi", "max_tokens": 1}).status_code == 200


def test_method_not_allowed_has_allow_header(http):
    resp = http.get("/v1/chat/completions")
    assert_openai_error(resp, 405)
    assert resp.headers["allow"] == "POST"
    assert "GET" in http.delete("/v1/models").headers["allow"]


def test_openapi_documents_request_bodies(http):
    schema = http.get("/openapi.json").json()
    for path, model_name in (("/v1/completions", "CompletionRequest"), ("/v1/chat/completions", "ChatCompletionRequest")):
        ref = schema["paths"][path]["post"]["requestBody"]["content"]["application/json"]["schema"]["$ref"]
        assert ref == f"#/components/schemas/{model_name}"
        body = schema["components"]["schemas"][model_name]
        assert "model" in body["properties"] and "model" in body["required"]
        assert body["properties"]["model"]["enum"] == [m["id"] for m in http.get("/v1/models").json()["data"]]
    assert "prompt" in schema["components"]["schemas"]["CompletionRequest"]["properties"]
    refs = set()

    def walk(v):
        if isinstance(v, dict):
            if isinstance(v.get("$ref"), str):
                refs.add(v["$ref"])
            for x in v.values():
                walk(x)
        elif isinstance(v, list):
            for x in v:
                walk(x)
    walk(schema)
    for ref in refs:  # every reference resolves
        assert ref.startswith("#/components/schemas/") and ref.rsplit("/", 1)[1] in schema["components"]["schemas"]
    assert http.get("/docs").status_code == 200 and http.get("/redoc").status_code == 200


def test_docs_behind_the_api_key(keyed_server):
    with httpx.Client(base_url=keyed_server.url) as http:
        for path in ("/docs", "/redoc", "/openapi.json"):
            assert_openai_error(http.get(path), 401)
            assert http.get(path, headers={"Authorization": f"Bearer {API_KEY}"}).status_code == 200


def test_retrieve_model(client, http):
    model = client.models.retrieve("echo")
    assert model.id == "echo" and model.object == "model" and model.owned_by == "prism"
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("nope")
    err = assert_openai_error(http.get("/v1/models/nope"), 404, param="model")
    assert err["code"] == "model_not_found"


def outcome_counts(http) -> dict:
    from prometheus_client.parser import text_string_to_metric_families
    out = {}
    for family in text_string_to_metric_families(http.get("/metrics").text):
        for s in family.samples:
            if s.name == "prism_requests_outcome_total":
                out[(s.labels["model"], s.labels["outcome"], s.labels["reason"])] = s.value
    return out


def test_requests_counted_by_outcome(backend, client, http):
    before = outcome_counts(http)
    client.completions.create(model="echo", prompt="hi there", max_tokens=1)  # finished: length
    list(client.completions.create(model="echo", prompt="hi", stream=True))  # finished: stop
    with pytest.raises(openai.BadRequestError):
        client.completions.create(model="echo", prompt="hi", temperature=9)
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="made-up", prompt="hi")
    with pytest.raises(openai.BadRequestError):
        client.completions.create(model="echo", prompt="word " * 100)
    backend.fail_before_first = ServerBusy("busy")
    with pytest.raises(openai.InternalServerError):
        client.completions.create(model="echo", prompt="hi")
    backend.fail_before_first = RuntimeError("boom")
    with pytest.raises(openai.InternalServerError):
        client.completions.create(model="echo", prompt="hi")
    backend.fail_before_first = None
    backend.fail_after, backend.fail_after_n = WorkerFailed("the worker for cpu stopped"), 1
    with pytest.raises(openai.APIError, match="worker"):  # mid-stream
        list(client.completions.create(model="echo", prompt=PROMPT, stream=True))
    backend.fail_after = None
    backend.fail_before_first = WorkerFailed("the worker for cpu is not running")
    with pytest.raises(openai.InternalServerError, match="worker"):
        client.completions.create(model="echo", prompt="hi")
    backend.fail_before_first = None
    backend.stall_after = 0
    with httpx.Client(base_url=http.base_url, timeout=0.5) as short:
        with pytest.raises(httpx.ReadTimeout):
            short.post("/v1/completions", json={"model": "echo", "prompt": "hi"})
    assert backend.wait_closed(backend.requests[-1].req_id)
    expected = {
        ("echo", "finished", "length"): 1, ("echo", "finished", "stop"): 1,
        ("", "rejected", "bad_request"): 1, ("", "rejected", "unknown_model"): 1,  # no model label: not known
        ("echo", "rejected", "too_long"): 1, ("echo", "rejected", "busy"): 1,
        ("echo", "failed", "internal_error"): 1, ("echo", "failed", "worker_failed"): 2,
        ("echo", "aborted", "client_gone"): 1,
    }
    deadline = time.monotonic() + 5
    while True:
        after = outcome_counts(http)
        got = {k: after.get(k, 0) - before.get(k, 0) for k in expected}
        if got == expected or time.monotonic() > deadline:
            break
        time.sleep(0.05)
    assert got == expected
    assert "prism_requests_total 7" in http.get("/metrics").text  # the backend's metrics are still there


def test_client_gone_while_sending_the_body_is_aborted_not_failed(server, http):
    import socket

    before = outcome_counts(http)
    with socket.create_connection(("127.0.0.1", server.port)) as sock:
        sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                     b"Content-Length: 1000\r\n\r\n{\"model\": ")
        time.sleep(0.2)
    key = ("", "aborted", "client_gone")
    deadline = time.monotonic() + 5
    while outcome_counts(http).get(key, 0) - before.get(key, 0) != 1 and time.monotonic() < deadline:
        time.sleep(0.05)
    after = outcome_counts(http)
    assert after.get(key, 0) - before.get(key, 0) == 1
    assert not any(k[1] == "failed" and after[k] != before.get(k, 0) for k in after)
