"""Each plot writes a real PNG from small inputs."""
import json

import pytest

from prism.bench import plots
from prism.bench.records import RequestRecord
from prism.bench.report import SLOTargets, throughput_over_time

PNG = b"\x89PNG\r\n\x1a\n"


def assert_png(path):
    data = path.read_bytes()
    assert data[:8] == PNG and len(data) > 5000, (path, len(data))


def records(shift: float):
    out = []
    for i in range(12):
        send = 0.5 * i
        tokens = [send + shift * (1 + i % 3) + 0.05 * k for k in range(4)]
        out.append(RequestRecord(i, "m", 8, 4, send, send, tokens, tokens[-1], "length", 4))
    out.append(RequestRecord(12, "m", 8, 4, 7.0, 7.0, [], 7.5, None, None, "boom"))
    return out


def test_attainment_vs_rate(tmp_path):
    results = {"prism": [(1, 0.99), (2, 0.95), (4, 0.8)], "static": [(4, 0.4), (1, 0.9), (2, 0.7)]}
    plots.plot_attainment_vs_rate(results, tmp_path / "sweep.png")
    assert_png(tmp_path / "sweep.png")


@pytest.mark.parametrize("metric", ["ttft", "tpot", "e2e"])
def test_latency_cdfs(tmp_path, metric):
    path = tmp_path / f"{metric}.png"
    plots.plot_latency_cdfs({"prism": records(0.1), "fcfs": records(0.3)}, path, metric=metric,
                            slos={"m": SLOTargets(0.5, 0.06)})
    assert_png(path)


def test_latency_cdfs_bad_metric(tmp_path):
    with pytest.raises(ValueError, match="metric"):
        plots.plot_latency_cdfs({"p": records(0.1)}, tmp_path / "x.png", metric="p99")


def test_throughput_over_time(tmp_path):
    plots.plot_throughput_over_time(throughput_over_time(records(0.1), bin_s=2.0), tmp_path / "tp.png")
    assert_png(tmp_path / "tp.png")


def test_memory_over_time(tmp_path):
    log = tmp_path / "metrics.jsonl"
    lines = []
    for k in range(20):
        for device in ("cuda:0", "cuda:1"):
            lines.append({"kind": "device", "time": 50.0 + 0.5 * k, "device": device, "page_size": 2 << 20,
                          "budget_pages": 4000, "free_pages": 1000,
                          "models": {"llama": {"weight_pages": 1500 if k < 10 else 0, "kv_pages": 40 * k},
                                     "qwen": {"weight_pages": 2000, "kv_pages": 30 * (20 - k)}}})
        lines.append({"kind": "request", "model": "llama", "req_id": str(k), "finish_reason": "length"})
    log.write_text("".join(json.dumps(x) + "\n" for x in lines))
    plots.plot_memory_over_time(log, tmp_path / "mem.png")
    assert_png(tmp_path / "mem.png")
    summary = plots.memory_summary(plots.read_memory_log(log))
    assert summary["samples"] == 40 and summary["budget_gib"] == pytest.approx(4000 * 2 / 1024)


def test_memory_log_without_samples(tmp_path):
    log = tmp_path / "metrics.jsonl"
    log.write_text(json.dumps({"kind": "request", "model": "a"}) + "\n")
    with pytest.raises(ValueError, match="no device samples"):
        plots.plot_memory_over_time(log, tmp_path / "mem.png")
