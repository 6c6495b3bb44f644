"""`prism serve --ray` on a local multi-node Ray cluster (ray.cluster_utils.Cluster: one Ray
node per Prism node on this machine, each with a CPU device of its own page budget), driven by
the official openai client: models served on every node, an evicted model activated where the
policy says, a node removed mid-stream, a node added. Prints the fault timings.

Everything stays on loopback: RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 makes Ray take 127.0.0.1 as
every node's address, and the workers listen there (ray.bind_host's default).
"""
import concurrent.futures
import os
import shutil
import threading
import time
from pathlib import Path

import httpx
import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families

from conftest import running_server

pytestmark = pytest.mark.ray
REPO = Path(__file__).resolve().parents[2]
NODE_ARGS = dict(num_cpus=1, object_store_memory=80 << 20)
MODEL = "    source: tiny-llama:random\n    max_model_len: 2048\n"
RAY = "ray:\n  worker_cpus: 0.5\n"


def models(*names: str) -> str:
    return "models:\n" + "".join(f"  - name: {n}\n{MODEL}" for n in names)


def devices(memory: str, *nodes: str) -> str:
    return "devices:\n" + "".join(f"  - {{device: cpu, memory: {memory}, page_size: 256KiB, node: {n}}}\n" for n in nodes)


@pytest.fixture(scope="module")
def ray_env():
    """What the Ray nodes, their workers and the prism server inherit: loopback only, and this
    checkout's prism on the path."""
    env = {"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
           "PYTHONPATH": os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH")) if p)}
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    os.environ.pop("RAY_ADDRESS", None)
    yield
    for k, v in saved.items():
        os.environ.pop(k) if v is None else os.environ.__setitem__(k, v)


@pytest.fixture(scope="module")
def cluster(ray_env):
    """Nodes a (the head) and b; tests add and remove more."""
    from ray.cluster_utils import Cluster

    stores_before = set(Path("/dev/shm").glob("prism-host-copies-*"))
    c = Cluster(initialize_head=True, head_node_args=dict(NODE_ARGS, resources={"prism-node-a": 1}, include_dashboard=False))
    try:
        c.add_node(**NODE_ARGS, resources={"prism-node-b": 1})
        yield c
    finally:
        c.shutdown()
        # The folders of nodes these tests removed while their machine (this one) stayed up:
        # the server cleans only the nodes still in the cluster when it stops (docs/cluster.md).
        for store in set(Path("/dev/shm").glob("prism-host-copies-*")) - stores_before:
            shutil.rmtree(store, ignore_errors=True)


def test_an_address_without_a_cluster_is_a_one_line_error(ray_env, tmp_path):
    import subprocess
    import sys

    from prism.client.server_process import free_port

    (tmp_path / "c.yaml").write_text(RAY + devices("64MiB", "a") + models("m1"))
    out = subprocess.run([sys.executable, "-m", "prism.cli", "serve", "--config", str(tmp_path / "c.yaml"),
                          "--ray", f"127.0.0.1:{free_port()}"], capture_output=True, text=True, timeout=60)
    assert out.returncode == 2 and out.stderr.startswith("prism: error: --ray 127.0.0.1:"), out.stderr
    assert "no Ray cluster answers there" in out.stderr and out.stderr.count("\n") == 1


def test_without_an_address_a_local_cluster_is_started(ray_env, tmp_path):
    """`--ray` alone: ray.init() starts a local cluster (stopped with the server); a device
    that names no node runs on the driver's node."""
    config = RAY + "devices:\n  - {device: cpu, memory: 64MiB, page_size: 256KiB}\n" + models("m1")
    with running_server(tmp_path, config, timeout_s=120, args=("--ray",)) as (_, base):
        out = client_of(base).completions.create(model="m1", prompt=[5, 6, 7], max_tokens=4, extra_body={"ignore_eos": True})
        assert out.usage.completion_tokens == 4
        assert nodes_view(base) == {"": {"up": True, "devices": {"cpu": "up"}, "placement": {"cpu": ["m1"]}}}


def add_node(cluster, name: str):
    return cluster.add_node(**NODE_ARGS, resources={f"prism-node-{name}": 1})


def ray_server(folder, cluster, config: str):
    return running_server(folder, config, timeout_s=120, args=("--ray", cluster.address))


def client_of(base: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{base}/v1", api_key="unused", max_retries=0, timeout=60)


def nodes_view(base: str) -> dict:
    return httpx.get(f"{base}/admin/state").json()["nodes"]


def placement(base: str) -> dict[str, list[str]]:
    """device -> models resident there, over every node."""
    return {d: ms for node in nodes_view(base).values() for d, ms in node["placement"].items()}


def wait_for(what, timeout_s: float, every_s: float = 0.1):
    deadline = time.monotonic() + timeout_s
    while True:
        got = what()
        if got or time.monotonic() > deadline:
            return got
        time.sleep(every_s)


def metrics(base: str) -> dict:
    out = {}
    for family in text_string_to_metric_families(httpx.get(f"{base}/metrics").text):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def stream(client, model: str, max_tokens: int, started: threading.Event | None = None) -> tuple[str, int, float]:
    """One streamed completion: (how it ended, text chunks received, when it ended)."""
    n, reason = 0, None
    try:
        for chunk in client.completions.create(model=model, prompt="once upon a time", max_tokens=max_tokens,
                                               stream=True, extra_body={"ignore_eos": True}):
            n += chunk.choices[0].finish_reason is None
            reason = chunk.choices[0].finish_reason or reason
            if started is not None:
                started.set()
        return f"finished: {reason}", n, time.monotonic()
    except (openai.APIError, httpx.HTTPError) as e:
        return f"error: {type(e).__name__}: {e}", n, time.monotonic()


# ---- two nodes, every device the cluster has ---------------------------------------------------
class TestTwoNodes:
    # ray.auto_devices: a CPU device per node; 40 MiB holds one tiny model's weights, so the
    # third model fits nowhere at the start (evicted).
    CONFIG = (RAY + "  auto_devices: {device: cpu, memory: 40MiB, page_size: 256KiB}\n"
              + models("m1", "m2", "m3") + "server:\n  request_timeout_s: 60\n")

    @pytest.fixture(scope="class")
    @classmethod
    def server(cls, cluster, tmp_path_factory):
        with ray_server(tmp_path_factory.mktemp("ray-two"), cluster, cls.CONFIG) as (_, base):
            wait_for(lambda: sum(map(len, placement(base).values())) == 2, 20)
            yield base
            stores = {d["host_store"] for d in httpx.get(f"{base}/admin/state").json()["devices"].values()}
        # Each node's workers shared a folder of host copies; the server removed it on each node.
        assert len(stores) == 2 and all("/prism-host-copies-" in s for s in stores), stores
        assert not any(Path(s).exists() for s in stores), stores

    def test_models_served_on_every_node(self, server):
        base = server
        nodes = nodes_view(base)
        assert {n: v["up"] for n, v in nodes.items()} == {"a": True, "b": True}, nodes
        assert {n: v["devices"] for n, v in nodes.items()} == {"a": {"a/cpu": "up"}, "b": {"b/cpu": "up"}}
        where = placement(base)
        assert sorted(map(len, where.values())) == [1, 1], where  # one model per node
        client = client_of(base)
        for model in (m for ms in where.values() for m in ms):  # the third comes in the next test
            out = client.completions.create(model=model, prompt=[5, 6, 7], max_tokens=4, extra_body={"ignore_eos": True})
            assert out.usage.completion_tokens == 4
        m = metrics(base)
        assert m[("prism_nodes", ())] == 2
        assert m[("prism_node_up", (("node", "a"),))] == m[("prism_node_up", (("node", "b"),))] == 1
        assert m[("prism_device_up", (("device", "b/cpu"), ("node", "b")))] == 1
        resident = {(dict(k)["node"], dict(k)["model"]) for (name, k), v in m.items() if name == "prism_model_resident" and v}
        assert {node for node, _ in resident} == {"a", "b"}, resident

    def test_evicted_model_activated_where_the_policy_chooses(self, server):
        """The current policy (node-blind; host-copy preferences come with the node-aware
        scheduler): a model resident nowhere goes to a device that has room, else to one where
        evicting idle models makes room; a device whose models are busy cannot. So with a's
        model streaming, the evicted model lands on b, and b's idle model is evicted."""
        base = server
        client = client_of(base)
        where = wait_for(lambda: (w := placement(base)) and sum(map(len, w.values())) == 2 and w, 20)
        (missing,) = {"m1", "m2", "m3"} - {m for ms in where.values() for m in ms}
        busy, idle = where["a/cpu"][0], where["b/cpu"][0]
        started = threading.Event()
        with concurrent.futures.ThreadPoolExecutor(1) as pool:
            long = pool.submit(stream, client, busy, 1500, started)
            assert started.wait(30)
            out = client.completions.create(model=missing, prompt=[5, 6, 7], max_tokens=4, extra_body={"ignore_eos": True})
            assert out.usage.completion_tokens == 4
            assert long.result(60)[0] == "finished: length"
        after = wait_for(lambda: (w := placement(base))["b/cpu"] == [missing] and w, 10)
        assert after == {"a/cpu": [busy], "b/cpu": [missing]}, (where, placement(base), idle)
        b = wait_for(lambda: (d := httpx.get(f"{base}/admin/state").json()["devices"]["b/cpu"])["host_copies"] and d, 10)
        assert idle in b["host_copies"] and any(Path(b["host_store"]).glob("*.weights")), b  # b's copy of what it evicted


# ---- a node leaves ----------------------------------------------------------------------------
def test_node_removed_mid_stream(cluster, tmp_path):
    """Node c leaves while streams run on both nodes: c's streams end with an error, a's finish
    whole, c's model is served from a (activated there), and the server says c is gone."""
    node_c = add_node(cluster, "c")
    config = RAY + devices("96MiB", "a", "c") + models("m1", "m2") + "server:\n  request_timeout_s: 60\n"
    with ray_server(tmp_path, cluster, config) as (_, base):
        client = client_of(base)
        where = wait_for(lambda: (w := placement(base)) and sum(map(len, w.values())) == 2 and w, 20)
        (on_a,), (on_c,) = where["a/cpu"], where["c/cpu"]
        with concurrent.futures.ThreadPoolExecutor(4) as pool:
            events = [threading.Event() for _ in range(4)]
            futures = {pool.submit(stream, client, model, 1500, ev): model
                       for model, ev in zip([on_a, on_a, on_c, on_c], events)}
            assert all(ev.wait(30) for ev in events)
            removed_t = time.monotonic()
            cluster.remove_node(node_c)
            down_s = wait_for(lambda: nodes_view(base)["c"]["devices"]["c/cpu"] != "up" and time.monotonic() - removed_t, 20)
            served_s = None  # while a's streams go on
            while served_s is None and time.monotonic() - removed_t < 30:
                try:
                    out = client.completions.create(model=on_c, prompt=[5, 6, 7], max_tokens=4, extra_body={"ignore_eos": True})
                    assert out.usage.completion_tokens == 4
                    served_s = time.monotonic() - removed_t
                except openai.APIStatusError as e:
                    assert e.status_code == 503, e
                    time.sleep(0.1)
            results = {f: f.result(60) for f in futures}
        assert served_s is not None, f"{on_c} was not served again within 30 s"
        errors = [t for f, (how, _, t) in results.items() if futures[f] == on_c and how.startswith("error")]
        assert len(errors) == 2, results
        assert all(how == "finished: length" and n == 1500 for f, (how, n, _) in results.items() if futures[f] == on_a), results
        first_error_s = min(errors) - removed_t
        nodes = wait_for(lambda: (n := nodes_view(base)) and on_c in n["a"]["placement"]["a/cpu"] and n, 10)
        assert nodes["c"] == {"up": False, "devices": {"c/cpu": "node_left"}, "placement": {"c/cpu": []}}, nodes
        assert sorted(nodes["a"]["placement"]["a/cpu"]) == sorted([on_a, on_c]), nodes
        health = httpx.get(f"{base}/health")
        assert health.status_code == 200 and health.json()["status"] == "degraded", health.text
        m = metrics(base)
        assert m[("prism_node_up", (("node", "c"),))] == 0 and m[("prism_nodes", ())] == 2  # a and b
        print(f"\nray: node c removed: device marked down after {down_s:.2f} s, first stream error after "
              f"{first_error_s:.2f} s, {on_c} served again (from a) after {served_s:.2f} s")

        # c comes back (a new Ray node with the same name): its device is started again there.
        back_t = time.monotonic()
        node_c = add_node(cluster, "c")
        try:
            fresh = {"up": True, "devices": {"c/cpu": "up"}, "placement": {"c/cpu": []}}  # back, and empty
            back_s = wait_for(lambda: nodes_view(base)["c"] == fresh and time.monotonic() - back_t, 30)
            assert back_s, nodes_view(base)
        finally:
            cluster.remove_node(node_c)
        print(f"ray: node c back: its device up again after {back_s:.2f} s")


# ---- a node joins -----------------------------------------------------------------------------
def test_node_added_is_used_after_the_next_placement(cluster, tmp_path):
    """Node d is in the config but not in the cluster at the start: both models start on a.
    Once d joins, its device gets a worker, and the next placement period moves a model there
    (the migration evens the KV pressure of the two devices)."""
    config = (RAY + devices("96MiB", "a", "d") + models("m1", "m2")
              + "scheduler:\n  placement_period_s: 2\nserver:\n  request_timeout_s: 60\n")
    with ray_server(tmp_path, cluster, config) as (_, base):
        client = client_of(base)
        nodes = nodes_view(base)
        assert nodes["d"] == {"up": False, "devices": {}, "placement": {}}, nodes
        assert wait_for(lambda: sorted(placement(base)["a/cpu"]) == ["m1", "m2"], 10)
        stop = threading.Event()

        def traffic():  # both models busy alike: token rates for the placement to weigh
            while not stop.is_set():
                for model in ("m1", "m2"):
                    client.completions.create(model=model, prompt=[5, 6, 7], max_tokens=16, extra_body={"ignore_eos": True})

        with concurrent.futures.ThreadPoolExecutor(1) as pool:
            load = pool.submit(traffic)
            time.sleep(2)
            added_t = time.monotonic()
            node_d = add_node(cluster, "d")
            try:
                joined_s = wait_for(lambda: nodes_view(base)["d"]["devices"].get("d/cpu") == "up"
                                    and time.monotonic() - added_t, 30)
                moved = wait_for(lambda: (p := placement(base)).get("d/cpu") and len(p["a/cpu"]) == 1 and p, 30)
                used_s = time.monotonic() - added_t
                assert joined_s, "node d's device never came up"
                assert moved, f"no model moved to d: {placement(base)}"
                (model_on_d,) = moved["d/cpu"]
                out = client.completions.create(model=model_on_d, prompt=[5, 6, 7], max_tokens=4,
                                                extra_body={"ignore_eos": True})
                assert out.usage.completion_tokens == 4  # served on d: the model is resident there alone
            finally:
                stop.set()
                load.result(60)
                cluster.remove_node(node_d)
        print(f"\nray: node d added: its device up after {joined_s:.2f} s, {model_on_d} moved there after {used_s:.2f} s")


# ---- a worker actor dies ----------------------------------------------------------------------
def actor_processes(node: str) -> list:
    """The device worker actors running on Prism node `node` (children of its raylet)."""
    import psutil

    raylets = [p for p in psutil.process_iter(["cmdline"])
               if p.info["cmdline"] and p.info["cmdline"][0].endswith("raylet")
               and any(f"prism-node-{node}" in a for a in p.info["cmdline"])]
    assert len(raylets) == 1, raylets
    return [c for c in raylets[0].children(recursive=True) if "DeviceActor" in " ".join(c.cmdline())]


def test_killed_worker_actor_is_restarted_on_its_node(cluster, tmp_path):
    """kill -9 of b's worker actor: b's streams end with an error, the device is down and
    restarted on node b (its node lives), and its model is served meanwhile and after."""
    config = RAY + devices("96MiB", "a", "b") + models("m1", "m2") + "server:\n  request_timeout_s: 60\n"
    with ray_server(tmp_path, cluster, config) as (_, base):
        client = client_of(base)
        where = wait_for(lambda: (w := placement(base)) and sum(map(len, w.values())) == 2 and w, 20)
        (on_b,) = where["b/cpu"]
        (victim,) = actor_processes("b")
        started = threading.Event()
        with concurrent.futures.ThreadPoolExecutor(1) as pool:
            cut = pool.submit(stream, client, on_b, 1500, started)
            assert started.wait(30)
            killed_t = time.monotonic()
            victim.kill()
            how, _, ended = cut.result(30)
        assert how.startswith("error") and "b/cpu stopped" in how, how
        out = client.completions.create(model=on_b, prompt=[5, 6, 7], max_tokens=4, extra_body={"ignore_eos": True})
        assert out.usage.completion_tokens == 4  # from a meanwhile (or b, if back already)
        served_s = time.monotonic() - killed_t
        up_s = wait_for(lambda: httpx.get(f"{base}/admin/state").json()["workers"]["b/cpu"] == {"state": "up", "restarts": 1}
                        and time.monotonic() - killed_t, 30)
        assert up_s, httpx.get(f"{base}/admin/state").json()["workers"]
        (new,) = actor_processes("b")
        assert new.pid != victim.pid
        print(f"\nray: worker actor killed: stream error after {ended - killed_t:.2f} s, {on_b} served after "
              f"{served_s:.2f} s, restarted on node b after {up_s:.2f} s")
