"""The device worker as its own process, driven through typed messages over ZeroMQ."""
import json
import time

import psutil
import pytest

from prism.config import DeviceConfig, EngineConfig, ModelSpec
from prism.sched.local import LocalSchedulerConfig, Pace
from prism.types import SamplingParams
from prism.worker import messages as msg
from prism.worker.device_worker import WorkerConfig
from prism.worker.process import WorkerProcess, WorkerStartError

ENGINE = EngineConfig(block_size=8, max_num_batched_tokens=128)


def greedy(n: int) -> SamplingParams:
    return SamplingParams(temperature=0, max_tokens=n, ignore_eos=True)


def config(*sources, memory=128 << 20, pace: Pace = Pace.TURN):
    models = tuple(ModelSpec(f"m{i}", s, engine=ENGINE) for i, s in enumerate(sources))
    return WorkerConfig(DeviceConfig("cpu", memory, 64 << 10), models, LocalSchedulerConfig(pace=pace))


def collect(worker: WorkerProcess, req_ids: set[str], timeout_s: float = 60):
    """Messages until every named request finished or was rejected."""
    got = {"tokens": [], "finished": {}, "rejected": {}}
    deadline = time.monotonic() + timeout_s
    while req_ids - set(got["finished"]) - set(got["rejected"]):
        m = worker.recv(timeout_s=max(0.0, deadline - time.monotonic()))
        assert m is not None, "worker went quiet"
        if isinstance(m, msg.Tokens):
            got["tokens"] += m.tokens
        elif isinstance(m, msg.Finished):
            got["finished"][m.req_id] = m
        elif isinstance(m, msg.Rejected):
            got["rejected"][m.req_id] = m
    return got


def streamed(got, req_id: str) -> list[int]:
    return [t.token_id for t in got["tokens"] if t.req_id == req_id]


@pytest.fixture
def worker():
    w = WorkerProcess(config("tiny-llama:random", "tiny-qwen3:random"))
    yield w
    w.close()


def test_requests_stream_tokens_and_finish(worker):
    assert [m.name for m in worker.ready.models] == ["m0", "m1"]
    for i, model in enumerate(["m0", "m1", "m0"]):
        worker.send(msg.AddRequest(f"r{i}", model, [5, 6, 7, 8 + i], greedy(6)))
    got = collect(worker, {"r0", "r1", "r2"})
    for req_id, fin in got["finished"].items():
        assert len(streamed(got, req_id)) == 6 and fin.finish_reason == "length"


def test_bad_requests_are_rejected_and_the_worker_keeps_serving(worker):
    worker.send(msg.AddRequest("bad-model", "nope", [5, 6]))
    worker.send(msg.AddRequest("too-long", "m0", list(range(3, 3000))))
    # The frontend cannot build bad SamplingParams, so this one is sent as a raw map: the
    # worker validates params when it decodes them, and must answer, not fall over.
    worker.send({"type": "add", "req_id": "bad-temp", "model": "m0", "prompt_token_ids": [5],
                 "params": {"temperature": -2.0}})
    worker.send(msg.AddRequest("ok", "m0", [5, 6], greedy(3)))
    got = collect(worker, {"bad-model", "too-long", "bad-temp", "ok"})
    assert "unknown model" in got["rejected"]["bad-model"].message
    assert "context limit" in got["rejected"]["too-long"].message
    assert "temperature" in got["rejected"]["bad-temp"].message
    assert len(streamed(got, "ok")) == 3


def test_evict_activate_and_memory_report(worker):
    worker.send(msg.Evict("m1"))
    worker.send(msg.ReportMemory())
    report = None
    while report is None:
        m = worker.recv(timeout_s=30)
        report = m.report if isinstance(m, msg.MemoryReport) else None
    assert report.models["m1"].resident is False and report.models["m1"].weight_pages == 0
    worker.send(msg.AddRequest("after", "m1", [5, 6, 7], greedy(4)))
    got = collect(worker, {"after"})
    assert len(streamed(got, "after")) == 4


def test_close_leaves_no_process():
    w = WorkerProcess(config("tiny-llama:random"))
    pid = w.process.pid
    w.close()
    assert not psutil.pid_exists(pid) or psutil.Process(pid).status() == psutil.STATUS_ZOMBIE


def test_a_worker_that_cannot_start_says_why():
    with pytest.raises(WorkerStartError, match="unknown model"):
        WorkerProcess(config("no-such-model"))


def step_log_of_four_requests(folder, monkeypatch, pace: Pace):
    """A real worker process of two models at `pace` with PRISM_STEP_LOG on, two requests of
    12 tokens each per model served: its step log."""
    monkeypatch.setenv("PRISM_STEP_LOG", str(folder))
    w = WorkerProcess(config("tiny-llama:random", "tiny-qwen3:random", pace=pace))
    try:
        for i, model in enumerate(["m0", "m1", "m0", "m1"]):
            w.send(msg.AddRequest(f"r{i}", model, [5, 6, 7, 8 + i], greedy(12)))
        collect(w, {f"r{i}" for i in range(4)})
    finally:
        w.close()
    (log,) = folder.glob("steps-cpu-*.jsonl")
    return log


def test_step_log_records_every_step_and_fits_host_time(tmp_path, monkeypatch):
    """PRISM_STEP_LOG: the worker writes one line per step; benchmarks/step_log.py reads the
    busy steps back against a cost model and fits the host time beyond it."""
    import sys
    from pathlib import Path

    from prism.sched.cost import ProfileCostModel

    sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
    import step_log

    log = step_log_of_four_requests(tmp_path, monkeypatch, Pace.TURN)
    lines = [line for line in log.read_text().splitlines() if line]
    assert len(lines) >= 12 and {json.loads(line)["model"] for line in lines} == {"m0", "m1"}
    assert all(json.loads(line)["activations"] == 0 for line in lines)  # both resident from the start
    steps = step_log.read_steps([log], ProfileCostModel())  # nominal CPU rates: any cost model
    assert steps and all(s.cycle_s > 0 for s in steps)
    step_s, seq_s = step_log.fit_host(steps)
    assert step_s >= 0 and seq_s >= 0


def test_at_their_own_pace_the_step_log_has_a_line_per_launch(tmp_path, monkeypatch):
    """Under pace "own" one worker call launches several models' steps: each gets its own line,
    its wall time the launch's call alone (what step_log.fit_launch fits)."""
    log = step_log_of_four_requests(tmp_path, monkeypatch, Pace.OWN)
    lines = [json.loads(line) for line in log.read_text().splitlines() if line]
    # 12 tokens each: at least 12 launches per model, whatever the worker calls batched together
    assert all(sum(line["model"] == m for line in lines) >= 12 for m in ("m0", "m1"))
    assert all(line["seqs"] > 0 and line["terms"] and line["wall_s"] >= 0 for line in lines)
    # launches of one call start one after another, each after the last one's call ended
    times = [(line["t"], line["wall_s"]) for line in lines]
    assert all(t1 >= t0 + w0 - 1e-6 for (t0, w0), (t1, _) in zip(times, times[1:]))


def test_a_silent_worker_is_taken_for_lost():
    """A worker alive but unheard (SIGSTOP: a hung step, a partitioned node) is reported
    Failed by its link once silent past the timeout; one that answers is not."""
    import asyncio
    import os
    import signal

    from prism.cluster.worker_link import WorkerLink

    w = WorkerProcess(config("tiny-llama:random"))
    link = WorkerLink("cpu", w, silence_timeout_s=1.5)
    heard: list = []

    async def run():
        link.attach(asyncio.get_running_loop(), lambda device, m: heard.append((time.monotonic(), m)))
        for _ in range(8):  # 2.4 s of reports asked for, as the router does every tick
            link.send(msg.ReportMemory())
            await asyncio.sleep(0.3)
        assert not any(isinstance(m, msg.Failed) for _, m in heard)
        os.kill(w.process.pid, signal.SIGSTOP)
        stopped = time.monotonic()
        while not any(isinstance(m, msg.Failed) for _, m in heard) and time.monotonic() - stopped < 10:
            link.send(msg.ReportMemory())
            await asyncio.sleep(0.3)
        return stopped

    try:
        stopped = asyncio.run(run())
        failed = [(t, m) for t, m in heard if isinstance(m, msg.Failed)]
        assert len(failed) == 1 and "no word from the worker" in failed[0][1].message, heard[-3:]
        assert 1.0 < failed[0][0] - stopped < 5.0  # the timeout (from the last message) and a liveness check
    finally:
        os.kill(w.process.pid, signal.SIGCONT)
        link.close()
