"""Two devices (two host page budgets, two worker processes): the global scheduler lays the
models out over both, and requests go where their model is resident."""
import time

import httpx
import openai
import pytest

from conftest import running_server

CONFIG = """
devices:
  - {device: "cpu:0", memory: 96MiB, page_size: 256KiB}
  - {device: "cpu:1", memory: 96MiB, page_size: 256KiB}
models:
  - {name: a, source: "tiny-llama:random"}
  - {name: b, source: "tiny-qwen2:random"}
  - {name: c, source: "tiny-qwen3:random"}
  - {name: d, source: "tiny-llama:random:7"}
"""


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    with running_server(tmp_path_factory.mktemp("multi"), CONFIG) as (_, base):
        yield base, openai.OpenAI(base_url=f"{base}/v1", api_key="unused", max_retries=0, timeout=120)


def placement(base: str, want: int, timeout_s: float = 20) -> dict:
    """The admin view once `want` models are resident somewhere (reports lag a tick)."""
    deadline = time.monotonic() + timeout_s
    while True:
        state = httpx.get(f"{base}/admin/state").json()
        if sum(len(v) for v in state["placement"].values()) >= want or time.monotonic() > deadline:
            return state["placement"]
        time.sleep(0.3)


def test_models_are_spread_over_both_devices(server):
    base, _ = server
    where = placement(base, want=4)
    devices = {d for devs in where.values() for d in devs}
    assert devices == {"cpu:0", "cpu:1"}, where
    assert all(len(devs) == 1 for devs in where.values()), where


def test_every_model_answers_from_its_device(server):
    base, client = server
    for model in "abcd":
        out = client.completions.create(model=model, prompt=[5, 6, 7], max_tokens=4, temperature=0,
                                        extra_body={"ignore_eos": True})
        assert out.usage.completion_tokens == 4
    # Had a request gone to a device where its model was not resident, that worker would
    # have activated a second copy there.
    time.sleep(1.0)
    where = placement(base, want=4)
    assert all(len(devs) == 1 for devs in where.values()), where


def test_the_devices_of_this_host_share_one_host_copy_folder(server):
    base, _ = server
    devices = httpx.get(f"{base}/admin/state").json()["devices"]
    stores = {d["host_store"] for d in devices.values()}
    assert len(devices) == 2 and len(stores) == 1 and "prism-host-copies-" in stores.pop(), devices
