"""The replay client against a real `prism serve` on loopback (two tiny random models on the
CPU), the `prism bench replay` command end to end, and the client's guards (loopback only,
per-request timeout, text fallback when token ids are refused) against a scripted fake server."""
import asyncio
import json
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from prism.bench.records import load_records
from prism.cli import main
from prism.client.replay import check_url, is_loopback_url, replay
from prism.bench.report import SLOTargets, records_duration, write_report
from prism.bench.trace import TraceRequest, poisson_trace, save_trace
from prism.client.server_process import free_port, stop_server, wait_healthy

CONFIG = """
devices:
  - device: cpu
    memory: 512MiB
    page_size: 256KiB
models:
  - name: tiny-llama
    source: tiny-llama:random
    ttft_slo_ms: 2000
    tpot_slo_ms: 500
    max_model_len: 256
  - name: tiny-qwen2
    source: tiny-qwen2:random
    ttft_slo_ms: 2000
    tpot_slo_ms: 500
    max_model_len: 256
server:
  metrics_log: {log}
"""
MODELS = ("tiny-llama", "tiny-qwen2")


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    folder = tmp_path_factory.mktemp("bench-serve")
    config = folder / "config.yaml"
    config.write_text(CONFIG.format(log=folder / "metrics.jsonl"))
    port = free_port()
    log = open(folder / "server.log", "w")
    proc = subprocess.Popen([sys.executable, "-m", "prism.cli", "serve", "--config", str(config),
                             "--port", str(port)], stdout=log, stderr=log)
    try:
        wait_healthy(f"http://127.0.0.1:{port}", proc, timeout_s=120)
    except RuntimeError:
        proc.kill()
        raise RuntimeError((folder / "server.log").read_text()[-3000:]) from None
    yield f"http://127.0.0.1:{port}/v1", config, folder / "metrics-cpu.jsonl"
    stop_server(proc)
    log.close()


def small_trace(seed=0):
    return poisson_trace({m: 2.0 for m in MODELS}, duration_s=5.0, input_lens=(8, 48), output_lens=(4, 16), seed=seed)


def test_replay_against_a_real_server(server, tmp_path):
    url, config, _ = server
    trace = small_trace()
    assert 12 <= len(trace) <= 30
    start = time.perf_counter()
    records = asyncio.run(replay(trace, url, progress=False, request_timeout_s=30))
    assert time.perf_counter() - start < 30
    assert len(records) == len(trace)
    for req, rec in zip(trace, records):
        assert rec.error is None and rec.finish_reason == "length", rec
        assert rec.num_output_tokens == req.output_len == len(rec.token_s)
        assert rec.prompt_kind == "ids"
        assert rec.send_s >= req.arrival_s - 0.01  # open loop: sent at its arrival time
        assert rec.send_s <= rec.token_s[0] <= rec.token_s[-1] <= rec.finish_s
    slos = {m: SLOTargets(60.0, 10.0) for m in MODELS}
    report = write_report(tmp_path / "out", records, slos, duration_s=records_duration(records), title="real")
    assert report["summary"]["overall"]["finished"] == len(trace)
    assert report["summary"]["overall"]["slo_attainment"] == 1.0
    for name in ("summary.json", "summary.md", "ttft_cdf.png", "tpot_cdf.png", "throughput.png"):
        assert (tmp_path / "out" / name).stat().st_size > 0


def test_cli_replay_end_to_end(server, tmp_path, capsys):
    url, config, memory_log = server
    trace_path = tmp_path / "trace.jsonl"
    save_trace(trace_path, small_trace(seed=1))
    out = tmp_path / "run"
    rc = main(["bench", "replay", "--trace", str(trace_path), "--url", url, "--out", str(out),
               "--max-requests", "8", "--max-duration", "4", "--slo-config", str(config),
               "--memory-log", str(memory_log), "--text-prompts", "--no-progress"])
    captured = capsys.readouterr()
    assert rc == 0, captured.err
    assert "| overall | 8 | 8 |" in captured.out
    records = load_records(out / "requests.jsonl")
    assert len(records) == 8 and all(r.ok and r.prompt_kind == "text" for r in records)
    assert all(r.num_output_tokens == r.output_len for r in records)
    data = json.loads((out / "summary.json").read_text())
    assert data["slos"]["tiny-llama"] == {"ttft_s": 2.0, "tpot_s": 0.5}
    assert data["memory"]["samples"] > 0 and data["memory"]["peak_used_gib"] > 0
    assert (out / "summary.md").read_text().startswith("# run")
    for name in ("ttft_cdf.png", "tpot_cdf.png", "e2e_cdf.png", "throughput.png", "memory.png"):
        assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", name

    again = tmp_path / "again"  # the report recomputed from the saved records
    assert main(["bench", "report", "--records", str(out / "requests.jsonl"), "--out", str(again),
                 "--slo-ttft-ms", "2000", "--slo-tpot-ms", "500"]) == 0
    redone = json.loads((again / "summary.json").read_text())["summary"]
    assert redone["overall"]["ttft_attainment"] == data["summary"]["overall"]["ttft_attainment"]


def test_cli_replay_errors(server, tmp_path, capsys):
    url, config, _ = server
    trace_path = tmp_path / "trace.jsonl"
    save_trace(trace_path, [TraceRequest(0.0, "unknown-model", 4, 4)])
    cases = [
        ["--url", "http://10.1.2.3:8000/v1", "--slo-ttft-ms", "1", "--slo-tpot-ms", "1"],  # not loopback
        ["--url", url, "--slo-config", str(config)],  # the trace's model has no SLO there
        ["--url", url],  # no SLOs at all
    ]
    for extra in cases:
        rc = main(["bench", "replay", "--trace", str(trace_path), "--out", str(tmp_path / "x"), "--no-progress", *extra])
        err = capsys.readouterr().err.strip()
        assert rc == 2 and err.startswith("prism: error: ") and "\n" not in err, err
    assert not (tmp_path / "x" / "requests.jsonl").exists()  # nothing was sent


# ---- guards, against a scripted fake server ---------------------------------------------------
def test_loopback_only():
    for url in ("http://127.0.0.1:8000/v1", "http://127.8.9.10/v1", "http://localhost:1/v1",
                "http://[::1]:8000/v1", "https://LOCALHOST/v1", "http://[::ffff:127.0.0.1]/v1"):
        assert is_loopback_url(url), url
        check_url(url)
    for url in ("http://10.0.0.1/v1", "http://example.com/v1", "http://[::2]/v1", "http://128.0.0.1/v1",
                "http://0.0.0.0:8000/v1", "http://localhost.example.com/v1"):
        assert not is_loopback_url(url), url
        with pytest.raises(ValueError, match="not a loopback"):
            check_url(url)
        check_url(url, allow_remote=True)
    with pytest.raises(ValueError, match="not a loopback"):
        asyncio.run(replay([TraceRequest(0.0, "m", 4, 4)], "http://192.0.2.1/v1", progress=False))
    with pytest.raises(ValueError, match="http"):
        check_url("ftp://127.0.0.1/v1")


class FakeHandler(BaseHTTPRequestHandler):
    """Completions that refuse token-id prompts for model "text-only" and stall for "slow"."""

    seen: list = []

    def log_message(self, *args):
        pass

    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers["content-length"])))
        kind = "ids" if isinstance(body["prompt"], list) else "text"
        self.seen.append((body["model"], kind, len(body["prompt"]) if kind == "ids" else len(body["prompt"].split())))
        if body["model"] == "text-only" and kind == "ids":
            payload = json.dumps({"error": {"message": "token id 19000 is outside the vocabulary",
                                            "type": "invalid_request_error"}})
            self.send_response(400)
            self.send_header("content-type", "application/json")
            self.send_header("content-length", str(len(payload)))
            self.end_headers()
            self.wfile.write(payload.encode())
            return
        self.send_response(200)
        self.send_header("content-type", "text/event-stream")
        self.end_headers()
        try:
            if body["model"] == "slow":
                time.sleep(2.0)
            for i in range(body["max_tokens"]):
                last = i == body["max_tokens"] - 1
                self._event({"id": "c", "object": "text_completion", "created": 0, "model": body["model"],
                             "choices": [{"index": 0, "text": "x", "finish_reason": None, "logprobs": None}]})
                if last:
                    self._event({"id": "c", "object": "text_completion", "created": 0, "model": body["model"],
                                 "choices": [{"index": 0, "text": "", "finish_reason": "length", "logprobs": None}]})
            self._event({"id": "c", "object": "text_completion", "created": 0, "model": body["model"], "choices": [],
                         "usage": {"prompt_tokens": 1, "completion_tokens": body["max_tokens"], "total_tokens": 1}})
            self.wfile.write(b"data: [DONE]\n\n")
        except (BrokenPipeError, ConnectionResetError):
            pass

    def _event(self, obj):
        self.wfile.write(b"data: " + json.dumps(obj).encode() + b"\n\n")
        self.wfile.flush()


@pytest.fixture
def fake_server():
    FakeHandler.seen = []
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), FakeHandler)
    httpd.daemon_threads = True
    thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}/v1"
    httpd.shutdown()
    httpd.server_close()


def test_text_fallback_when_token_ids_are_refused(fake_server):
    trace = [TraceRequest(0.3 * i, m, 12, 3) for i, m in enumerate(["text-only", "ids-ok", "text-only", "text-only"])]
    records = asyncio.run(replay(trace, fake_server, progress=False, request_timeout_s=10))
    assert all(r.ok and r.num_output_tokens == 3 and len(r.token_s) == 3 for r in records), records
    assert [r.prompt_kind for r in records] == ["text", "ids", "text", "text"]
    # one refused token-id attempt, retried once as text of the same length; remembered after
    assert FakeHandler.seen == [("text-only", "ids", 12), ("text-only", "text", 12), ("ids-ok", "ids", 12),
                                ("text-only", "text", 12), ("text-only", "text", 12)]


def test_per_request_timeout_and_bounds(fake_server):
    trace = [TraceRequest(0.0, "slow", 4, 2), TraceRequest(0.0, "fast", 4, 2),
             TraceRequest(0.2, "fast", 4, 2), TraceRequest(5.0, "fast", 4, 2)]
    start = time.perf_counter()
    records = asyncio.run(replay(trace, fake_server, progress=False, request_timeout_s=0.5, max_duration_s=1.0))
    assert time.perf_counter() - start < 1.5  # the stalled request was given up, the late one never sent
    assert len(records) == 3
    assert records[0].error.startswith("Timeout") and not records[0].ok
    assert records[0].finish_s - records[0].send_s == pytest.approx(0.5, abs=0.2)
    assert records[1].ok and records[2].ok
    assert len(asyncio.run(replay(trace, fake_server, progress=False, max_requests=2, request_timeout_s=0.3))) == 2
