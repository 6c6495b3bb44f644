"""The server's YAML config: defaults, conversions, and errors that name the bad key."""
import pytest

from prism.config import ConfigError
from prism.cluster.config import load_config, parse_config

BASE = {"devices": [{"device": "cpu", "memory": "1GiB"}], "models": [{"name": "m", "source": "tiny-llama:random"}]}


def test_defaults_and_conversions():
    c = parse_config(BASE)
    assert c.devices[0].memory_bytes == 1 << 30 and c.devices[0].page_size == 2 << 20
    assert c.models[0].ttft_slo_s == 2.0 and c.models[0].tpot_slo_s == 0.2
    assert c.host == "127.0.0.1" and c.port == 8000 and c.api_key is None
    assert c.local.policy == "prism" and c.global_.idle_evict_s == 45.0
    assert c.local.idle_evict == c.global_.idle_evict == "pressure"
    assert c.local.late_contender_ttft_multiple == 3.0
    old = parse_config({**BASE, "scheduler": {"idle_evict": "always", "late_contender_ttft_multiple": 2}})
    assert old.local.idle_evict == old.global_.idle_evict == "always"
    assert old.local.late_contender_ttft_multiple == 2.0


def test_examples_parse():
    for path in ("examples/cpu-demo.yaml", "examples/h100.yaml", "examples/ray-gpu-cluster.yaml"):
        c = load_config(path)
        assert all(isinstance(d.page_size, int) and isinstance(d.memory_bytes, int) for d in c.devices)


@pytest.mark.parametrize("change, where", [
    (lambda c: c["models"][0].update(ttft_slo_ms=0), "models.0.ttft_slo_ms"),
    (lambda c: c["models"][0].update(colour="red"), "models.0.colour"),
    (lambda c: c["devices"][0].update(device="tpu:0"), "devices.0.device"),
    (lambda c: c["devices"][0].update(memory="lots"), "devices.0.memory"),
    (lambda c: c["models"].append(dict(c["models"][0])), "used twice"),
    (lambda c: c["models"][0].update(device="cuda:3"), "models.0.device"),
    (lambda c: c.update(scheduler={"idle_evict": "never"}), "scheduler.idle_evict"),
    (lambda c: c.update(scheduler={"policy": "random"}), "scheduler.policy"),
])
def test_errors_name_the_bad_key(change, where):
    import copy

    raw = copy.deepcopy(BASE)
    change(raw)
    with pytest.raises(ConfigError, match=where.replace(".", r"\.")):
        parse_config(raw, source="x.yaml")


def test_missing_and_malformed_files(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("devices: [unclosed")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)


def test_every_runtime_knob_reachable():
    raw = {
        "devices": [{"device": "cpu", "memory": "1GiB", "page_size": "1MiB", "num_spare_pages": 2}],
        "models": [{"name": "m", "source": "tiny-llama:random", "kernels": "reference", "cuda_graph_max_batch": 0,
                    "max_model_len": 512}],
        "scheduler": {"admission_window": 32, "kv_headroom_pages": 3, "max_resident": 2,
                      "max_migrations_per_period": 2, "kv_headroom_fraction": 0.1},
    }
    c = parse_config(raw)
    assert c.devices[0].page_size == 1 << 20 and c.devices[0].num_spare_pages == 2
    e = c.models[0].engine
    assert (e.kernels, e.cuda_graph_max_batch, e.max_model_len, e.block_size) == ("reference", 0, 512, 16)
    assert (c.local.admission_window, c.local.kv_headroom_pages, c.local.max_resident) == (32, 3, 2)
    assert c.global_.max_migrations_per_period == 2 and c.global_.kv_headroom_fraction == 0.1
    assert c.max_body_size == 4 << 20 and parse_config({**raw, "server": {"max_body_size": "1MiB"}}).max_body_size == 1 << 20
    # tuning knobs reach the baselines too; what makes a baseline stays fixed
    swap = parse_config({**raw, "scheduler": {**raw["scheduler"], "system": "swap"}})
    assert swap.local.admission_window == 32 and swap.local.max_resident == 1 and swap.local.policy == "fcfs"
    assert swap.global_.kv_headroom_fraction == 0.1 and swap.global_.idle_evict == "always"


def test_defaults_come_from_the_runtime_types():
    from prism.config import DeviceConfig, EngineConfig
    from prism.sched.local import LocalSchedulerConfig
    from prism.sched.placement import GlobalSchedulerConfig

    c = parse_config(BASE)
    assert c.models[0].engine == EngineConfig() and c.local == LocalSchedulerConfig()
    assert c.global_ == GlobalSchedulerConfig()
    assert c.devices[0] == DeviceConfig(device="cpu", memory_bytes=1 << 30)


@pytest.mark.parametrize("change, message", [
    (lambda c: c.update(scheduler={"admission_windw": 8}), "x.yaml: scheduler.admission_windw: Extra inputs are not permitted"),
    (lambda c: c.update(server={"hots": "0.0.0.0"}), "x.yaml: server.hots: Extra inputs are not permitted"),
    (lambda c: c["models"][0].update(kernels="cuda"), "x.yaml: models.0.kernels: Input should be 'auto', 'triton' or"),
    (lambda c: c["models"][0].update(cuda_graph_max_batch=-1), "x.yaml: models.0.cuda_graph_max_batch: Input should be"),
    (lambda c: c["devices"][0].update(num_spare_pages=-1), "x.yaml: devices.0.num_spare_pages: Input should be"),
    (lambda c: c.update(scheduler={"kv_headroom_fraction": 1}), "x.yaml: scheduler.kv_headroom_fraction: Input should be less"),
    (lambda c: c["devices"][0].pop("memory"), "x.yaml: devices.0.memory: Field required"),
    (lambda c: c.update(server={"max_body_size": 0}), "x.yaml: server.max_body_size: Input should be greater"),
])
def test_new_knobs_and_unknown_keys_refused(change, message):
    import copy

    raw = copy.deepcopy(BASE)
    change(raw)
    with pytest.raises(ConfigError) as e:
        parse_config(raw, source="x.yaml")
    assert str(e.value).startswith(message) and "\n" not in str(e.value)


def test_configs_built_in_code_keep_the_same_rules():
    from prism.config import EngineConfig, ModelSpec
    from prism.sched.local import LocalSchedulerConfig
    from prism.sched.placement import GlobalSchedulerConfig

    for build, message in [
        (lambda: EngineConfig(block_size=0), "EngineConfig.block_size must be >= 1, not 0"),
        (lambda: EngineConfig(kernels="cuda"), "EngineConfig.kernels must be one of auto, triton, reference"),
        (lambda: EngineConfig(max_model_len=1), "EngineConfig.max_model_len must be >= 2"),
        (lambda: ModelSpec("m", "s", ttft_slo_s=0), "model m: ModelSpec.ttft_slo_s must be > 0"),
        (lambda: LocalSchedulerConfig(max_resident=0), "LocalSchedulerConfig.max_resident must be >= 1"),
        (lambda: GlobalSchedulerConfig(kv_headroom_fraction=1.0), "GlobalSchedulerConfig.kv_headroom_fraction must be < 1"),
    ]:
        with pytest.raises(ConfigError, match=message):
            build()
    assert EngineConfig(max_model_len=None).max_model_len is None  # None allowed where the type says so
    assert GlobalSchedulerConfig(migration_threshold=float("inf"), placement_period_s=0.0).placement_period_s == 0.0


def test_nodes_name_devices_across_machines():
    two_nodes = {
        "nodes": [{"name": "a", "host_memory": "8GiB"}, {"name": "b"}],
        "devices": [{"device": "cpu", "memory": "1GiB", "node": "a"}, {"device": "cpu", "memory": "1GiB", "node": "b"}],
        "models": [{"name": "m", "source": "tiny-llama:random", "device": "b/cpu"}],
    }
    c = parse_config(two_nodes)
    assert [d.device_id for d in c.devices] == ["a/cpu", "b/cpu"]
    assert [(n.name, n.host_memory_bytes) for n in c.nodes] == [("a", 8 << 30), ("b", None)]
    assert c.pinned == {"m": "b/cpu"} and c.device("b/cpu").node == "b"
    single = parse_config(BASE)
    assert [n.name for n in single.nodes] == [""] and single.devices[0].device_id == "cpu"


@pytest.mark.parametrize("nodes, devices, where", [
    ([{"name": "a"}], [{"device": "cpu", "memory": "1GiB", "node": "z"}], "devices.0.node"),
    ([{"name": "a"}, {"name": "a"}], [{"device": "cpu", "memory": "1GiB", "node": "a"}], "lists a node twice"),
    ([], [{"device": "cpu", "memory": "1GiB", "node": "a"}, {"device": "cpu", "memory": "1GiB", "node": "a"}], "twice"),
    ([{"name": "a", "host_memory": "lots"}], [{"device": "cpu", "memory": "1GiB", "node": "a"}], "nodes.0.host_memory"),
])
def test_node_errors(nodes, devices, where):
    with pytest.raises(ConfigError, match=where):
        parse_config({**BASE, "nodes": nodes, "devices": devices})


def test_ray_section():
    from prism.cluster.config import AutoDevices, RayConfig

    assert parse_config(BASE).ray == RayConfig() and RayConfig().bind_host == "127.0.0.1"
    c = parse_config({"models": BASE["models"], "ray": {"address": "auto", "bind_host": "node", "worker_cpus": 0.5,
                                                        "auto_devices": {"device": "cpu", "memory": "256MiB"}}})
    assert c.devices == () and (c.ray.address, c.ray.bind_host, c.ray.worker_cpus) == ("auto", "node", 0.5)
    assert c.ray.auto_devices == AutoDevices("cpu", 256 << 20)


@pytest.mark.parametrize("raw, where", [
    ({"models": BASE["models"]}, "devices: list at least one device (or ask for ray.auto_devices)"),
    ({**BASE, "ray": {"auto_devices": {"device": "cuda"}}}, "ray.auto_devices.memory: Field required"),
    ({**BASE, "ray": {"auto_devices": {"device": "tpu", "memory": "1GiB"}}}, "ray.auto_devices.device: String should match"),
    ({**BASE, "ray": {"silence_timeout_s": 0}}, "ray.silence_timeout_s: Input should be greater than 0"),
    ({**BASE, "ray": {"adress": "auto"}}, "ray.adress: Extra inputs are not permitted"),
])
def test_ray_section_errors(raw, where):
    with pytest.raises(ConfigError, match=where.replace("(", r"\(").replace(")", r"\)")):
        parse_config(raw)
