"""A CI-sized sweep: the same trace under prism and the baselines, on real servers."""
import json

from prism.bench.sweeps import sustained_rate
from prism.cli import main
from prism.cluster.systems import system_config
from prism.bench.trace import poisson_trace, save_trace

CONFIG = """
devices:
  - {device: cpu, memory: 160MiB, page_size: 256KiB}
models:
  - {name: a, source: "tiny-llama:random", rate: 3, ttft_slo_ms: 1000, tpot_slo_ms: 200}
  - {name: b, source: "tiny-qwen2:random", rate: 1, ttft_slo_ms: 1000, tpot_slo_ms: 200}
"""


def test_system_config_and_sustained_rate():
    raw = {"devices": [{"device": "cpu", "memory": "1GiB"}], "models": [{"name": "a"}, {"name": "b", "device": "cpu"}]}
    ded = system_config(raw, "dedicated")
    assert [d["device"] for d in ded["devices"]] == ["cpu:0", "cpu:1"] and "device" not in ded["models"][1]
    assert system_config(raw, "static")["scheduler"]["system"] == "static"
    assert raw["devices"][0]["device"] == "cpu"  # the input is not changed
    assert sustained_rate([(1, 1.0), (2, 0.995), (4, 0.9), (8, 1.0)], 0.99) == 2
    assert sustained_rate([(1, 0.5)], 0.99) is None


def test_sweep_over_every_system(tmp_path, capsys):
    (tmp_path / "config.yaml").write_text(CONFIG)
    save_trace(tmp_path / "trace.jsonl", poisson_trace({"a": 1.5, "b": 0.5}, 6.0, (16, 64), (4, 16), seed=1))
    out = tmp_path / "out"
    code = main(["bench", "sweep", "--config", str(tmp_path / "config.yaml"), "--trace", str(tmp_path / "trace.jsonl"),
                 "--systems", "prism,static,muxserve,swap,dedicated", "--scales", "1,3",
                 "--slo-config", str(tmp_path / "config.yaml"), "--out", str(out)])
    assert code == 0
    result = json.loads((out / "sweep.json").read_text())
    systems = {p["system"] for p in result["points"]}
    assert systems == {"prism", "static", "muxserve", "swap", "dedicated"}
    assert all(p["errors"] == 0 and p["requests"] > 0 for p in result["points"])
    assert set(result["sustained"]) == systems
    assert (out / "ttft_attainment_vs_rate.png").stat().st_size > 5000
    print(capsys.readouterr().out)


STARVED = """
devices:
  - {device: cpu, memory: 160MiB, page_size: 256KiB}
models:
  - {name: a, source: "tiny-llama:random", rate: 1000, max_model_len: 256, ttft_slo_ms: 1000, tpot_slo_ms: 200}
  - {name: b, source: "tiny-qwen2:random", rate: 1, max_model_len: 256, ttft_slo_ms: 1000, tpot_slo_ms: 200}
"""


def test_a_real_sweep_goes_on_when_one_system_refuses_the_config(tmp_path):
    """The static server exits at start with its one-line refusal (b's share cannot hold
    b's max_model_len); the sweep records that for static's points and runs prism."""
    (tmp_path / "config.yaml").write_text(STARVED)
    save_trace(tmp_path / "trace.jsonl", poisson_trace({"a": 1.5, "b": 0.5}, 3.0, (16, 64), (4, 8), seed=2))
    out = tmp_path / "out"
    code = main(["bench", "sweep", "--config", str(tmp_path / "config.yaml"), "--trace", str(tmp_path / "trace.jsonl"),
                 "--systems", "static,prism", "--scales", "1", "--slo-config", str(tmp_path / "config.yaml"),
                 "--out", str(out)])
    assert code == 0
    points = json.loads((out / "sweep.json").read_text())["points"]
    assert [p["system"] for p in points] == ["static", "prism"]
    assert points[0]["refused"].startswith("scheduler.system static: b's KV share on cpu")
    assert points[1]["requests"] > 0 and points[1]["errors"] == 0
