"""`prism serve` as users run it: a real server process with real worker processes on
loopback, the official `openai` client as the client."""
import concurrent.futures
import signal
import time
from pathlib import Path

import httpx
import openai
import psutil
import pytest
from prometheus_client.parser import text_string_to_metric_families

from conftest import openai_client, running_server, smollm2_cpu_config

CONFIG = smollm2_cpu_config(copy=True, extra="scheduler:\n  swap_idle_s: 0.5\n")


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    with running_server(tmp_path_factory.mktemp("serve"), CONFIG) as (proc, base):
        yield proc, base, openai_client(base)


def test_models_listed(server):
    _, _, client = server
    assert [m.id for m in client.models.list().data] == ["smollm2", "smollm2-copy", "tiny"]


def test_chat_and_completion_streaming_and_not(server):
    _, _, client = server
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    full = client.chat.completions.create(model="smollm2", messages=messages, max_tokens=12, temperature=0)
    assert "Paris" in full.choices[0].message.content
    assert full.usage.completion_tokens <= 12 and full.usage.prompt_tokens > 10
    pieces = [c.choices[0].delta.content or "" for c in client.chat.completions.create(
        model="smollm2", messages=messages, max_tokens=12, temperature=0, stream=True) if c.choices]
    assert "".join(pieces) == full.choices[0].message.content

    comp = client.completions.create(model="smollm2", prompt="The capital of France is", max_tokens=8, temperature=0)
    streamed = "".join(c.choices[0].text for c in client.completions.create(
        model="smollm2", prompt="The capital of France is", max_tokens=8, temperature=0, stream=True))
    assert streamed == comp.choices[0].text and comp.choices[0].finish_reason == "length"

    ids = client.completions.create(model="tiny", prompt=[5, 6, 7], max_tokens=5, temperature=0)
    assert ids.usage.prompt_tokens == 3 and ids.usage.completion_tokens == 5


def test_stop_string_cuts_the_text(server):
    _, _, client = server
    out = client.completions.create(model="smollm2", prompt="The capital of France is", max_tokens=16,
                                    temperature=0, stop=["Paris"])
    assert "Paris" not in out.choices[0].text and out.choices[0].finish_reason == "stop"


def test_errors_are_openai_shaped(server):
    _, base, client = server
    with pytest.raises(openai.NotFoundError, match="no-such-model"):
        client.completions.create(model="no-such-model", prompt="hi", max_tokens=2)
    with pytest.raises(openai.BadRequestError, match="temperature"):
        client.completions.create(model="tiny", prompt=[5], max_tokens=2, temperature=5)
    with pytest.raises(openai.BadRequestError, match="max_tokens"):
        client.completions.create(model="tiny", prompt=[5], max_tokens=0)
    with pytest.raises(openai.BadRequestError, match="context"):
        client.completions.create(model="tiny", prompt=[5] * 300, max_tokens=2)
    r = httpx.post(f"{base}/v1/chat/completions", content=b"{not json", headers={"content-type": "application/json"})
    assert r.status_code == 400 and r.json()["error"]["type"] == "invalid_request_error"
    assert client.completions.create(model="tiny", prompt=[5], max_tokens=2).usage.completion_tokens == 2


def test_what_a_client_sends_is_never_a_500_nor_a_leak(server):
    _, base, client = server
    for extra in ({"seed": 2**70}, {"stop_token_ids": [2**70]}, {"priority": 2**70}):
        with pytest.raises(openai.BadRequestError, match=next(iter(extra))):
            client.completions.create(model="tiny", prompt=[5], max_tokens=2, extra_body=extra)
    deep = '{"model": "tiny", "prompt": [5], "x": ' + "[" * 5000 + "]" * 5000 + "}"
    assert httpx.post(f"{base}/v1/completions", content=deep).status_code == 400
    lone = '{"model": "smollm2", "messages": [{"role": "user", "content": "\\ud800"}]}'
    assert httpx.post(f"{base}/v1/chat/completions", content=lone).status_code == 400
    assert set(httpx.get(f"{base}/admin/state").json()["in_flight"].values()) == {0}
    assert {v for (name, _), v in metric_values(base).items() if name == "prism_queue_depth"} == {0}
    assert client.models.retrieve("tiny").id == "tiny"


def test_concurrent_requests_across_models(server):
    _, _, client = server

    def ask(i):
        model = ["smollm2", "tiny"][i % 2]
        out = client.completions.create(model=model, prompt=[10 + i, 11, 12], max_tokens=6,
                                        temperature=0, extra_body={"ignore_eos": True})
        return out.usage.completion_tokens

    with concurrent.futures.ThreadPoolExecutor(12) as pool:
        assert list(pool.map(ask, range(24))) == [6] * 24


def test_eviction_and_reactivation_through_the_api(server):
    _, base, client = server
    messages = [{"role": "user", "content": "Name a fruit."}]
    first = client.chat.completions.create(model="smollm2", messages=messages, max_tokens=10, temperature=0)
    time.sleep(1.0)  # idle past swap_idle_s: only one SmolLM2 fits, so it gives way
    client.chat.completions.create(model="smollm2-copy", messages=messages, max_tokens=4, temperature=0)
    time.sleep(1.0)
    again = client.chat.completions.create(model="smollm2", messages=messages, max_tokens=10, temperature=0)
    assert again.choices[0].message.content == first.choices[0].message.content
    metrics = metric_values(base)
    assert metrics[("prism_evictions_total", "smollm2")] >= 1
    assert metrics[("prism_activations_total", "smollm2")] >= 1
    state = httpx.get(f"{base}/admin/state").json()
    assert "smollm2" in state["placement"] and state["devices"]["cpu"]["budget_pages"] > 0
    # The evicted model's weights wait in the host's shared copies (the workers of a node share
    # one folder, on /dev/shm where there is one), so reactivating it reads no file.
    device = state["devices"]["cpu"]
    assert "smollm2-copy" in device["host_copies"], device
    assert any(Path(device["host_store"]).glob("*.weights"))


def test_the_shared_host_copies_go_with_the_server(tmp_path):
    config = "devices:\n  - device: cpu\n    memory: 256MiB\n    page_size: 256KiB\n" \
             "models:\n  - name: tiny\n    source: tiny-llama:random\n    max_model_len: 64\n"
    with running_server(tmp_path, config) as (_, base):
        store = Path(httpx.get(f"{base}/admin/state").json()["devices"]["cpu"]["host_store"])
        assert store.is_dir() and store.name.startswith("prism-host-copies-")
    assert not store.exists()


def metric_values(base: str) -> dict:
    text = httpx.get(f"{base}/metrics").text
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[(s.name, s.labels.get("model"))] = s.value
    return out


def test_metrics_parse_with_prometheus_parser(server):
    _, base, client = server
    client.completions.create(model="tiny", prompt=[5, 6], max_tokens=3)
    values = metric_values(base)
    assert values[("prism_ttft_seconds_count", "tiny")] >= 1
    assert 0.0 <= values[("prism_slo_attainment", "tiny")] <= 1.0
    assert ("prism_pages", "tiny") in values and ("prism_free_pages", None) in values
    assert values[("prism_nodes", None)] == 1 and values[("prism_node_up", None)] == 1  # one host: node ""


def test_shutdown_leaves_no_processes(server):
    proc, _, _ = server
    children = psutil.Process(proc.pid).children(recursive=True)
    assert children, "the server should have worker processes"
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(60) == 0
    gone, alive = psutil.wait_procs(children, timeout=30)
    assert not alive, f"left behind: {alive}"
