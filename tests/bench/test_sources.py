"""Loaders on the real public traces in shared/traces (skipped only where that folder is absent)."""
import csv
from collections import Counter

import pytest

from prism.bench import sources
from prism.bench.sources import (TracesNotFoundError, alibaba_model_counts, load_alibaba,
                                 load_azure, load_azure_both, traces_dir)


@pytest.fixture(scope="module")
def tdir():
    try:
        return traces_dir()
    except TracesNotFoundError as e:
        pytest.skip(f"public traces absent: {e}")


def test_traces_dir_env_override(tmp_path, monkeypatch):
    monkeypatch.setenv("PRISM_TRACES_DIR", str(tmp_path))
    assert traces_dir() == tmp_path
    monkeypatch.setenv("PRISM_TRACES_DIR", str(tmp_path / "missing"))
    with pytest.raises(TracesNotFoundError, match="missing"):
        traces_dir()


def test_traces_dir_error_names_where_it_looked(tmp_path, monkeypatch):
    monkeypatch.delenv("PRISM_TRACES_DIR", raising=False)
    (tmp_path / "repo").mkdir()
    monkeypatch.chdir(tmp_path / "repo")  # the working directory is the checkout
    with pytest.raises(TracesNotFoundError) as e:
        traces_dir()
    assert str(tmp_path / "shared" / "traces") in str(e.value)
    assert str(tmp_path / "repo" / "shared" / "traces") in str(e.value)
    (tmp_path / "repo" / "shared" / "traces").mkdir(parents=True)
    assert traces_dir() == tmp_path / "repo" / "shared" / "traces"
    (tmp_path / "shared" / "traces").mkdir(parents=True)
    assert traces_dir() == tmp_path / "shared" / "traces"  # beside the checkout wins


def test_missing_file_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setenv("PRISM_TRACES_DIR", str(tmp_path))
    with pytest.raises(TracesNotFoundError, match="AzureLLMInferenceTrace_conv.csv"):
        load_azure("conv")
    with pytest.raises(ValueError, match="unknown Azure trace"):
        load_azure("chat")


@pytest.mark.parametrize("kind,rows,minutes", [("code", 8819, 57), ("conv", 19366, 58)])
def test_azure_counts_and_span(tdir, kind, rows, minutes):
    trace = load_azure(kind)
    assert len(trace) == rows
    assert trace[0].arrival_s == 0.0
    assert all(a.arrival_s <= b.arrival_s for a, b in zip(trace, trace[1:]))
    assert int(trace[-1].arrival_s // 60) == minutes
    assert {r.model for r in trace} == {kind}
    assert load_azure(kind, "llama")[0].model == "llama"


def test_azure_lengths_match_the_columns(tdir):
    with open(tdir / sources.AZURE_FILES["code"], newline="") as f:
        rows = list(csv.DictReader(f))
    trace = load_azure("code")
    for i in (0, 1, 100, len(rows) - 1):
        assert trace[i].input_len == max(1, int(rows[i]["ContextTokens"]))
        assert trace[i].output_len == max(1, int(rows[i]["GeneratedTokens"]))
    # 100 ns timestamps: the second request of code arrives 0.052 s after the first
    assert trace[1].arrival_s == pytest.approx(0.052, abs=1e-6)
    inputs = sorted(r.input_len for r in trace)
    assert inputs[len(inputs) // 2] == 1469  # README: prompt median 1,469


def test_azure_zero_output_becomes_one(tmp_path, monkeypatch):
    folder = tmp_path / "azure_llm_2023"
    folder.mkdir()
    (folder / "AzureLLMInferenceTrace_code.csv").write_text(
        "TIMESTAMP,ContextTokens,GeneratedTokens\n"
        "2023-11-16 18:00:00.0000000,10,0\n"
        "2023-11-16 18:00:01.5000000,20,5\n")
    monkeypatch.setenv("PRISM_TRACES_DIR", str(tmp_path))
    trace = load_azure("code")
    assert [(r.arrival_s, r.input_len, r.output_len) for r in trace] == [(0.0, 10, 1), (1.5, 20, 5)]


def test_azure_both_on_one_clock(tdir):
    both = load_azure_both(("a", "b"))
    assert len(both) == 8819 + 19366
    assert Counter(r.model for r in both) == {"a": 8819, "b": 19366}
    # conv starts at 18:15:47 and code at 18:17:04, about 77 s later
    first_code = min(r.arrival_s for r in both if r.model == "a")
    assert 76 < first_code < 78


def test_alibaba_totals(tdir):
    counts = alibaba_model_counts()
    assert sum(counts.values()) == 26823
    assert len(counts) == 87  # as the README counts: 86 ids plus the rows without one
    assert counts[""] == 25
    top = sorted((c for m, c in counts.items() if m), reverse=True)
    assert top[0] / 26823 == pytest.approx(0.307, abs=0.001)
    assert sum(top[:5]) / 26823 == pytest.approx(0.704, abs=0.001)


def test_alibaba_top_k_selection(tdir):
    with open(tdir / sources.ALIBABA_FILE, newline="") as f:
        rows = list(csv.DictReader(f))
    counts = Counter(r["checkpoint_model_version_id"] for r in rows if r["checkpoint_model_version_id"])
    ranked = [m for m, _ in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))]
    for k in (1, 3, 10):
        trace = load_alibaba(k)
        got = Counter(r.model for r in trace)
        assert got == {f"m{i}": counts[ranked[i]] for i in range(k)}
        assert len(trace) == sum(counts[m] for m in ranked[:k])
        assert all(r.input_len == 1 and r.output_len == 1 for r in trace)
    named = load_alibaba(2, ["big", "small"])
    assert Counter(r.model for r in named).most_common(1)[0] == ("big", counts[ranked[0]])
    # one clock for every num_models: arrivals count from the file's first row
    assert named[0].arrival_s >= 0
    everything = load_alibaba(86)
    assert len(everything) == 26823 - 25
    assert everything[0].arrival_s == 0.0
    span_days = everything[-1].arrival_s / 86400
    assert 23.0 < span_days < 23.1


def test_alibaba_jitter_and_errors(tdir):
    plain, jittered = load_alibaba(3), load_alibaba(3, jitter_seed=1)
    assert len(plain) == len(jittered)
    assert sorted(int(r.arrival_s) for r in jittered) == sorted(int(r.arrival_s) for r in plain)
    assert len({r.arrival_s for r in jittered}) > len({r.arrival_s for r in plain})
    assert load_alibaba(3, jitter_seed=1) == jittered
    with pytest.raises(ValueError, match="86 base models"):
        load_alibaba(87)
    with pytest.raises(ValueError):
        load_alibaba(0)
    with pytest.raises(ValueError, match="names"):
        load_alibaba(2, ["only-one"])
