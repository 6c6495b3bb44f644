"""`prism bench trace`: writes a trace load_trace reads back; errors are one line, exit 2."""
import argparse

import pytest

from prism.cli import main
from prism.cli.trace import add_trace_parser
from prism.bench.sources import TracesNotFoundError, traces_dir
from prism.bench.trace import load_trace


@pytest.fixture
def traces():
    try:
        return traces_dir()
    except TracesNotFoundError as e:
        pytest.skip(f"public traces absent: {e}")


def test_synthetic_jsonl_and_csv(tmp_path, capsys):
    for name in ("syn.jsonl", "syn.csv"):
        out = tmp_path / name
        rc = main(["bench", "trace", "synthetic", "--num-models", "3", "--duration", "60",
                   "--rate", "5", "--alpha", "1", "--cv", "2", "--input-lens", "10:20",
                   "--output-lens", "3:4", "--seed", "4", "--out", str(out)])
        assert rc == 0
        trace = load_trace(out)
        assert {r.model for r in trace} == {"m0", "m1", "m2"}
        assert all(10 <= r.input_len <= 20 and 3 <= r.output_len <= 4 for r in trace)
        assert 150 < len(trace) < 450
    printed = capsys.readouterr().out
    assert "requests over" in printed and "m0" in printed and "cv" in printed
    assert load_trace(tmp_path / "syn.jsonl") == load_trace(tmp_path / "syn.csv")


def test_synthetic_models_and_on_off(tmp_path):
    out = tmp_path / "s.jsonl"
    assert main(["bench", "trace", "synthetic", "--models", "big,small", "--duration", "300",
                 "--rate", "4", "--on-off", "10", "20", "--max-output", "50",
                 "--out", str(out)]) == 0
    trace = load_trace(out)
    assert {r.model for r in trace} == {"big", "small"}
    assert max(r.output_len for r in trace) <= 50


def test_azure_window_scale_caps(tmp_path, traces):
    out = tmp_path / "conv.jsonl"
    assert main(["bench", "trace", "azure", "--kind", "conv", "--window", "60", "360",
                 "--time-scale", "0.5", "--rate-scale", "0.5", "--max-input", "2048",
                 "--models", "llama", "--out", str(out)]) == 0
    trace = load_trace(out)
    assert {r.model for r in trace} == {"llama"}
    assert all(r.arrival_s < 150 for r in trace)
    assert max(r.input_len for r in trace) <= 2048
    assert 500 < len(trace) < 1500  # about 5.5 req/s * 300 s / 2


def test_azure_both(tmp_path, traces):
    out = tmp_path / "both.csv"
    assert main(["bench", "trace", "azure", "--kind", "both", "--models", "c,v",
                 "--window", "0", "120", "--out", str(out)]) == 0
    assert {r.model for r in load_trace(out)} == {"c", "v"}


def test_alibaba_gets_azure_lengths(tmp_path, traces, capsys):
    out = tmp_path / "ali.jsonl"
    assert main(["bench", "trace", "alibaba", "--num-models", "3", "--models", "a,b,c",
                 "--time-scale", "0.001", "--lengths-from", "azure-code", "--jitter",
                 "--out", str(out)]) == 0
    trace = load_trace(out)
    counts = {m: sum(r.model == m for r in trace) for m in "abc"}
    assert counts["a"] > counts["b"] > counts["c"] > 0
    assert sorted(r.input_len for r in trace)[len(trace) // 2] > 500  # code prompts, not 1
    assert trace[-1].arrival_s < 23.1 * 86400 * 0.001
    assert "a " in capsys.readouterr().out
    # default lengths: Azure conv
    out2 = tmp_path / "ali2.jsonl"
    assert main(["bench", "trace", "alibaba", "--num-models", "2", "--out", str(out2)]) == 0
    assert all(r.output_len >= 1 for r in load_trace(out2))
    assert sorted(r.output_len for r in load_trace(out2))[len(load_trace(out2)) // 2] > 50


def test_lengths_from_a_trace_file(tmp_path):
    src = tmp_path / "src.jsonl"
    src.write_text('{"arrival_s": 0, "model": "x", "input_len": 77, "output_len": 9}\n')
    out = tmp_path / "o.jsonl"
    assert main(["bench", "trace", "synthetic", "--duration", "20", "--lengths-from", str(src),
                 "--out", str(out)]) == 0
    assert {(r.input_len, r.output_len) for r in load_trace(out)} == {(77, 9)}


@pytest.mark.parametrize("args,message", [
    (["synthetic", "--rate", "abc"], "--rate: not a number"),
    (["synthetic", "--rate", "-2"], "--rate: must be > 0"),
    (["synthetic", "--num-models", "1.5"], "--num-models: not an integer"),
    (["synthetic", "--rate-scale", "0"], "--rate-scale"),
    (["synthetic", "--window", "10", "5"], "--window"),
    (["synthetic", "--input-lens", "9:3"], "--input-lens"),
    (["synthetic", "--max-input", "0"], "--max-input"),
    (["synthetic", "--models", "a,a"], "distinct"),
    (["synthetic", "--duration", "10", "--window", "100", "200"], "empty"),
    (["synthetic", "--lengths-from", "/nonexistent/t.jsonl"], "not found"),
])
def test_errors_are_one_line(tmp_path, capsys, args, message):
    argv = ["bench", "trace"] + args + ["--out", str(tmp_path / "x.jsonl")]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("prism: error: ") and message in err
    assert err.count("\n") == 1
    assert not (tmp_path / "x.jsonl").exists()


def test_missing_traces_folder(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("PRISM_TRACES_DIR", str(tmp_path / "nowhere"))
    assert main(["bench", "trace", "azure", "--out", str(tmp_path / "x.jsonl")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("prism: error: traces folder not found") and "nowhere" in err
    assert main(["bench", "trace", "synthetic", "--duration", "5", "--lengths-from",
                 "azure-conv", "--out", str(tmp_path / "y.jsonl")]) == 2


def test_add_trace_parser_plugs_into_a_bench_level():
    parser = argparse.ArgumentParser(prog="prism")
    bench = parser.add_subparsers(dest="command").add_parser("bench")
    add_trace_parser(bench.add_subparsers(dest="bench_command"))
    args = parser.parse_args(["bench", "trace", "synthetic", "--out", "x.jsonl"])
    assert args.source == "synthetic" and callable(args.func)
