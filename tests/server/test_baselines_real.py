"""Each baseline's defining behaviour on a real `prism serve` (CPU, tiny random models), the
same two-model micro-trace as tests/sim/test_baselines.py: a long decode on model a, then a
short request to model b. Under static and muxserve b is served beside a's decode (separate
engines, MuxServe's multiplexed jobs: both step at their own pace, scheduler.pace own, their
default); under swap b waits for a's group to drain;
under dedicated each model has its own device."""
import subprocess
import sys
import threading
import time

import httpx
import openai
import pytest

from conftest import running_server

MODELS = """
models:
  - {name: a, source: "tiny-llama:random"}
  - {name: b, source: "tiny-qwen2:random"}
"""
ONE_DEVICE = """
devices:
  - {device: "cpu:0", memory: 64MiB, page_size: 256KiB}
"""
TWO_DEVICES = ONE_DEVICE + """  - {device: "cpu:1", memory: 64MiB, page_size: 256KiB}
"""
LONG = 400  # a's output tokens: its decode lasts a good while on a CPU


def config(system: str) -> str:
    devices = TWO_DEVICES if system == "dedicated" else ONE_DEVICE
    return devices + MODELS + f"scheduler: {{system: {system}}}\n"


def long_then_short(base: str) -> dict[str, float]:
    """Stream a long decode of a; once its first token is out, ask b for 4 tokens. When each
    finished (monotonic seconds)."""
    client = openai.OpenAI(base_url=f"{base}/v1", api_key="unused", max_retries=0, timeout=120)
    done: dict[str, float] = {}
    started = threading.Event()

    def long():
        stream = client.completions.create(model="a", prompt=[5, 6, 7], max_tokens=LONG, temperature=0,
                                           stream=True, extra_body={"ignore_eos": True})
        for _ in stream:
            started.set()
        done["a"] = time.monotonic()

    thread = threading.Thread(target=long)
    thread.start()
    assert started.wait(60)
    out = client.completions.create(model="b", prompt=[5, 6, 7], max_tokens=4, temperature=0,
                                    extra_body={"ignore_eos": True})
    done["b"] = time.monotonic()
    assert out.usage.completion_tokens == 4
    thread.join(120)
    return done


@pytest.mark.parametrize("system", ["static", "muxserve", "swap", "dedicated"])
def test_each_baselines_defining_behaviour_on_a_real_server(tmp_path, system):
    with running_server(tmp_path, config(system)) as (_, base):
        done = long_then_short(base)
        placement = httpx.get(f"{base}/admin/state").json()["placement"]
    if system == "swap":
        assert done["b"] > done["a"], "swap serves b only once a's group drained"
    else:
        assert done["b"] < done["a"], f"{system}: b waited for a's whole decode"
    if system == "dedicated":
        assert placement == {"a": ["cpu:0"], "b": ["cpu:1"]}
    elif system in ("static", "muxserve"):
        assert placement == {"a": ["cpu:0"], "b": ["cpu:0"]}  # both pinned, resident together


def test_a_static_share_too_small_for_max_model_len_is_refused_at_start(tmp_path):
    # b's rate leaves it a sliver of the KV memory: less than one page group, so not even
    # one request could be held. The server says so at start, in one line, and exits.
    text = (ONE_DEVICE + MODELS.replace('random"}', 'random", rate: 1}').replace('"tiny-llama:random", rate: 1',
                                                                                '"tiny-llama:random", rate: 1000')
            + "scheduler: {system: static}\n")
    (tmp_path / "config.yaml").write_text(text)
    proc = subprocess.run([sys.executable, "-m", "prism.cli", "serve", "--config", str(tmp_path / "config.yaml"),
                           "--port", "0"], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stderr[-2000:]
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("prism: error: scheduler.system static: b's KV share on cpu:0"), proc.stderr[-2000:]
    assert "cannot hold its max_model_len (2048 tokens)" in last


def test_serverless_loads_each_model_on_demand_evicting_the_idle_one(tmp_path):
    # 40 MiB hold one tiny Llama's weights (25 MB: its embedding and head) with room for KV,
    # not two: each request loads its model, evicting the other once it is idle.
    models = MODELS.replace("tiny-qwen2:random", "tiny-llama:random:7")
    text = ONE_DEVICE.replace("64MiB", "40MiB") + models + "scheduler: {system: serverless}\n"
    with running_server(tmp_path, text) as (_, base):
        client = openai.OpenAI(base_url=f"{base}/v1", api_key="unused", max_retries=0, timeout=120)
        for model in ("a", "b", "a"):
            out = client.completions.create(model=model, prompt=[5, 6, 7], max_tokens=4, temperature=0,
                                            extra_body={"ignore_eos": True})
            assert out.usage.completion_tokens == 4
            deadline = time.monotonic() + 10
            while (placement := httpx.get(f"{base}/admin/state").json()["placement"]) != {model: ["cpu:0"]}:
                assert time.monotonic() < deadline, placement  # reports lag a tick
                time.sleep(0.2)


def test_prism_at_its_own_pace_activates_models_on_demand_without_stalling(tmp_path):
    """Prism with `scheduler.pace: own` (as static and muxserve step) where the device holds one
    model at a time: each request's model is activated (the other evicted) and answered at once,
    as the simulator now says too (a device busy with a weight copy reads what came meanwhile)."""
    models = MODELS.replace("tiny-qwen2:random", "tiny-llama:random:7")
    text = ONE_DEVICE.replace("64MiB", "40MiB") + models + "scheduler: {system: prism, pace: own}\n"
    with running_server(tmp_path, text) as (_, base):
        client = openai.OpenAI(base_url=f"{base}/v1", api_key="unused", max_retries=0, timeout=60)
        for model in ("a", "b", "a", "b"):
            start = time.monotonic()
            out = client.completions.create(model=model, prompt=[5, 6, 7], max_tokens=4, temperature=0,
                                            extra_body={"ignore_eos": True})
            assert out.usage.completion_tokens == 4
            assert time.monotonic() - start < 20, f"{model}: a request waited on an own-pace device"
        deadline = time.monotonic() + 10  # one model resident at a time (reports lag a tick)
        while (placement := httpx.get(f"{base}/admin/state").json()["placement"]) != {"b": ["cpu:0"]}:
            assert time.monotonic() < deadline, placement
            time.sleep(0.2)
