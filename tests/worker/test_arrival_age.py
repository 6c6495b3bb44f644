"""A device dates each request from when the frontend received it: the AddRequest carries the
request's age, and the device's arrival is (when the message reached it) - age."""
import json
import time

import msgspec
import pytest
import zmq

from prism.config import DeviceConfig, EngineConfig, ModelSpec
from prism.sched.clock import ManualClock
from prism.types import SamplingParams
from prism.worker import messages as msg
from prism.worker.commands import frontend_arrival, handle
from prism.worker.device_worker import DeviceWorker, WorkerConfig
from prism.worker.inbox import StampedInbox
from prism.worker.process import WorkerProcess

ENGINE = EngineConfig(block_size=8, max_num_batched_tokens=128)
TTFT_SLO_S = 0.25


def greedy(n: int) -> SamplingParams:
    return SamplingParams(temperature=0, max_tokens=n, ignore_eos=True)


@pytest.fixture
def worker():
    spec = ModelSpec("m", "tiny-llama:random", engine=ENGINE, ttft_slo_s=TTFT_SLO_S)
    clock = ManualClock()
    clock.set(100.0)
    w = DeviceWorker(WorkerConfig(DeviceConfig("cpu", 64 << 20, 64 << 10), (spec,)), clock=clock)
    yield w
    w.close()


def views(worker) -> dict[str, object]:
    return {r.req_id: r for r in worker.views.snapshot(worker.clock.now(), {}).requests}


def add(worker, req_id: str, received_at: float | None = None, **fields) -> None:
    assert handle(worker, msg.AddRequest(req_id, "m", [5, 6, 7, 8], greedy(3), **fields), lambda m: None,
                  received_at)


# ---- the message ---------------------------------------------------------------------------
def test_add_request_round_trips_its_age_and_an_older_sender_means_age_0():
    decoder = msgspec.msgpack.Decoder(msg.ToWorker)
    sent = msg.AddRequest("r", "m", [1, 2], greedy(3), age_s=0.5)
    assert decoder.decode(msgspec.msgpack.encode(sent)) == sent
    # What a sender from before the field encodes: no age_s key at all.
    old = msgspec.msgpack.encode({"type": "add", "req_id": "r", "model": "m", "prompt_token_ids": [1, 2]})
    assert decoder.decode(old).age_s == 0.0


@pytest.mark.parametrize("age, expected", [(0.5, 9.5), (0.0, 10.0), (-3.0, 10.0), (float("nan"), 10.0),
                                           (float("inf"), 10.0)])
def test_an_age_below_0_or_not_a_number_counts_as_0(age, expected):
    assert frontend_arrival(10.0, age) == expected


# ---- the device ----------------------------------------------------------------------------
def test_an_older_request_gets_an_earlier_ttft_deadline(worker):
    add(worker, "fresh", age_s=0.0)
    add(worker, "aged", age_s=0.5)
    v = views(worker)
    assert v["fresh"].arrival == 100.0 and v["fresh"].ttft_deadline == pytest.approx(100.0 + TTFT_SLO_S)
    assert v["fresh"].ttft_deadline - v["aged"].ttft_deadline == pytest.approx(0.5)


def test_a_message_that_waited_is_dated_from_when_it_came_never_after_now(worker):
    # It came at 99.8 (while a step ran) and had spent 0.1 s at the frontend.
    add(worker, "waited", received_at=99.8, age_s=0.1)
    # A stamp after the device's now (another clock's rounding) is read as now.
    add(worker, "future", received_at=101.0)
    v = views(worker)
    assert v["waited"].arrival == pytest.approx(99.7)
    assert v["future"].arrival == 100.0


def test_the_device_side_ttft_counts_the_age(worker):
    add(worker, "aged", age_s=0.5)
    add(worker, "fresh")
    worker.clock.advance(0.01)
    metrics = {out.req_id: out.metrics for _, out in worker.run_until_idle()}
    assert metrics["aged"]["ttft"] - metrics["fresh"]["ttft"] == pytest.approx(0.5)
    assert metrics["aged"]["ttft"] >= 0.5


# ---- the inbox's stamps ----------------------------------------------------------------------
def test_the_inbox_dates_a_message_when_it_comes_not_when_it_is_read():
    ctx = zmq.Context()
    pull, push = ctx.socket(zmq.PULL), ctx.socket(zmq.PUSH)
    pull.bind("inproc://inbox")
    push.connect("inproc://inbox")
    inbox = StampedInbox(pull, time.monotonic)
    try:
        assert inbox.get(0) is None
        sent = time.monotonic()
        push.send(b"hello")
        time.sleep(0.3)  # the loop is busy with a step
        read = time.monotonic()
        received_at, raw = inbox.get(1.0)
        assert raw == b"hello"
        assert sent <= received_at < read - 0.1
        assert inbox.get(0.05) is None
    finally:
        inbox.close()
        push.close(linger=0)
        pull.close(linger=0)
        ctx.term()


# ---- a worker process: socket, inbox thread, device ------------------------------------------
def test_a_worker_process_dates_requests_by_their_age(tmp_path):
    path = tmp_path / "metrics.jsonl"
    spec = ModelSpec("m", "tiny-llama:random", engine=ENGINE)
    config = WorkerConfig(DeviceConfig("cpu", 64 << 20, 64 << 10), (spec,), metrics_path=str(path))
    worker = WorkerProcess(config)
    try:
        worker.send(msg.AddRequest("aged", "m", [5, 6, 7, 8], greedy(3), age_s=5.0))
        worker.send(msg.AddRequest("fresh", "m", [5, 6, 7, 9], greedy(3)))
        finished = set()
        deadline = time.monotonic() + 60
        while finished != {"aged", "fresh"}:
            m = worker.recv(timeout_s=max(0.0, deadline - time.monotonic()))
            assert m is not None and not isinstance(m, msg.Rejected), m
            if isinstance(m, msg.Finished):
                finished.add(m.req_id)
    finally:
        worker.close()
    lines = [json.loads(line) for line in path.read_text().splitlines()]
    ttft = {x["req_id"]: x["ttft"] for x in lines if x["kind"] == "request"}
    assert ttft["aged"] >= 5.0 > ttft["fresh"]
