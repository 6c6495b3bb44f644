"""`prism simulate` and `prism plan` from the command line: outputs, and one-line errors."""
import json

import pytest
import yaml

from prism.bench.trace import poisson_trace, save_trace
from prism.cli import main

CONFIG = {
    "devices": [{"device": "cuda:0", "memory": "24GiB"}],
    "models": [{"name": "a", "source": "llama-3.2-1b:random", "ttft_slo_ms": 500, "tpot_slo_ms": 50},
               {"name": "b", "source": "llama-3.2-3b:random", "ttft_slo_ms": 800, "tpot_slo_ms": 60}],
}


@pytest.fixture
def files(tmp_path, monkeypatch):
    monkeypatch.setenv("PRISM_PROFILE_DIR", str(tmp_path / "no-profiles"))  # the H100 nominal rates
    (tmp_path / "cfg.yaml").write_text(yaml.safe_dump(CONFIG))
    save_trace(tmp_path / "t.jsonl", poisson_trace({"a": 2.0, "b": 1.0}, 10.0, (64, 512), (8, 64), seed=3))
    return tmp_path


def run(files, *args):
    return main([args[0], "--config", str(files / "cfg.yaml"), "--trace", str(files / "t.jsonl"), *args[1:]])


def test_simulate_writes_the_replay_report(files, capsys):
    out = files / "sim"
    assert run(files, "simulate", "--policy", "prism", "--out", str(out)) == 0
    for name in ("requests.jsonl", "summary.json", "summary.md", "ttft_cdf.png", "memory.png", "sim.json"):
        assert (out / name).stat().st_size > 0, name
    summary = json.loads((out / "summary.json").read_text())["summary"]["overall"]
    assert summary["finished"] == summary["requests"] > 0
    assert "simulated in" in capsys.readouterr().out


def test_simulate_sweep_is_laid_out_like_a_real_sweep(files):
    out = files / "sweep"
    assert run(files, "simulate", "--policy", "prism,muxserve", "--rate-scales", "1,2", "--out", str(out), "--jobs", "1") == 0
    assert (out / "requests-prism-x2.jsonl").is_file() and (out / "ttft_attainment_vs_rate.png").is_file()
    assert {p["system"] for p in json.loads((out / "sweep.json").read_text())["points"]} == {"prism", "muxserve"}


def test_plan_writes_table_and_plot(files):
    out = files / "plan"
    assert run(files, "plan", "--policies", "prism,static", "--max-gpus", "2", "--out", str(out), "--jobs", "1") == 0
    result = json.loads((out / "plan.json").read_text())
    assert set(result["policies"]) == {"prism", "static"}
    assert (out / "plan.png").stat().st_size > 5000 and "| prism |" in (out / "plan.md").read_text()


@pytest.mark.parametrize("args, message", [
    (["simulate", "--policy", "vllm"], "unknown system 'vllm'"),
    (["simulate", "--rate-scales", "1,x"], "--rate-scales must be"),
    (["simulate", "--target", "2"], "--target must be in (0, 1]"),
    (["simulate", "--profiles", "/nonexistent"], "profile folder not found"),
    (["plan", "--max-gpus", "0"], "--max-gpus must be >= 1"),
    (["plan", "--policies", ""], "unknown system"),
])
def test_bad_input_is_one_line(files, capsys, args, message):
    assert run(files, *args, "--out", str(files / "x")) == 2
    err = capsys.readouterr().err
    assert err.startswith("prism: error: ") and message in err and err.count("\n") == 1


def test_bad_files_are_one_line(files, capsys):
    assert main(["simulate", "--config", str(files / "missing.yaml"), "--trace", str(files / "t.jsonl"),
                 "--out", str(files / "x")]) == 2
    assert "config file not found" in capsys.readouterr().err
    (files / "bad.yaml").write_text("devices: []\nmodels: []\n")
    assert main(["simulate", "--config", str(files / "bad.yaml"), "--trace", str(files / "t.jsonl"),
                 "--out", str(files / "x")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("prism: error: bad.yaml: devices") and err.count("\n") == 1
    assert main(["simulate", "--config", str(files / "cfg.yaml"), "--trace", str(files / "cfg.yaml"),
                 "--out", str(files / "x")]) == 2
    assert capsys.readouterr().err.startswith("prism: error: ")


# ---- a static partition too small for a model's longest request is refused at start ------------
STARVED = {
    "devices": [{"device": "cuda:0", "memory": "8GiB"}],
    # b's rate leaves it about 1% of the KV memory: less than one KV page group of a 1B model
    "models": [{"name": "a", "source": "llama-3.2-1b:random", "rate": 100},
               {"name": "b", "source": "llama-3.2-1b:random", "rate": 1}],
}


def test_a_static_share_that_cannot_hold_the_longest_request_is_refused_in_process():
    from prism.config import ConfigError
    from prism.sim.costs import ProfileSet
    from prism.sim.run import config_for, simulate

    trace = poisson_trace({"a": 2.0, "b": 1.0}, 5.0, (64, 512), (8, 64), seed=3)
    with pytest.raises(ConfigError, match=r"b's KV share on cuda:0 \(\d+ pages, 0 tokens.*cannot hold the "
                                          r"longest request of the trace \(\d+ tokens\)"):
        simulate(config_for(STARVED, "static"), trace, ProfileSet({}, {}))
    # muxserve shares one pool: nothing to refuse; equal rates (no `rate:`) leave b its half
    assert simulate(config_for(STARVED, "muxserve"), trace, ProfileSet({}, {})).records
    equal = {**STARVED, "models": [{k: v for k, v in m.items() if k != "rate"} for m in STARVED["models"]]}
    assert all(r.ok for r in simulate(config_for(equal, "static"), trace, ProfileSet({}, {})).records)


def test_a_static_share_that_cannot_hold_the_longest_request_is_one_line_from_the_cli(files, capsys):
    (files / "starved.yaml").write_text(yaml.safe_dump(STARVED))
    assert main(["simulate", "--config", str(files / "starved.yaml"), "--trace", str(files / "t.jsonl"),
                 "--policy", "static", "--out", str(files / "x")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("prism: error: scheduler.system static: b's KV share on cuda:0") and err.count("\n") == 1
    assert "cannot hold" in err


def test_a_sweep_goes_on_when_one_system_refuses_the_config(files):
    """static refuses the starved config at start; the sweep says so for its points and
    runs the other systems."""
    (files / "starved.yaml").write_text(yaml.safe_dump(STARVED))
    out = files / "sweep"
    assert main(["simulate", "--config", str(files / "starved.yaml"), "--trace", str(files / "t.jsonl"),
                 "--policy", "prism,static", "--rate-scales", "1,2", "--out", str(out)]) == 0
    result = json.loads((out / "sweep.json").read_text())
    refused = [p for p in result["points"] if "refused" in p]
    assert [(p["system"], p["scale"]) for p in refused] == [("static", 1.0), ("static", 2.0)]
    assert all("b's KV share on cuda:0" in p["refused"] for p in refused)
    assert {p["system"] for p in result["points"] if "refused" not in p} == {"prism"}
    assert result["sustained"]["static"] == {"both": None, "ttft": None, "tpot": None}
    assert "| static | 1 | refused: scheduler.system static: b's KV share" in (out / "sweep.md").read_text()
