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
    for path in ("examples/cpu-demo.yaml", "examples/h100.yaml"):
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
