"""Two CPU devices on one node share host copies of weights through the node's store (files in
a shared-memory folder): a model evicted on one is activated on the other from the same copy,
with no read of its source; a dropped copy is gone for both, and the next activation reads the
source and makes a new one."""
import os

import pytest
import torch

from prism.config import DeviceConfig, EngineConfig, ModelSpec
from prism.engine.catalog import resolve_model
from prism.engine.model_weights import plan_layout
from prism.sched.clock import ManualClock
from prism.types import SamplingParams
from prism.worker import messages as msg
from prism.worker.commands import handle
from prism.worker.device_worker import DeviceWorker, WorkerConfig

PAGE = 64 << 10
SOURCE = "tiny-llama:random"
ENGINE = EngineConfig(block_size=8, max_num_batched_tokens=256, max_num_seqs=8)
GREEDY = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
PROMPT = [5, 17, 301, 42, 7, 99]


def worker(device: str, store: str | None) -> DeviceWorker:
    pages = -(-plan_layout(resolve_model(SOURCE).config, torch.float32).num_bytes // PAGE)
    models = (ModelSpec("m", SOURCE, engine=ENGINE),)
    config = WorkerConfig(DeviceConfig(device, (pages + 64) * PAGE, PAGE, node="a"), models, host_copy_dir=store)
    return DeviceWorker(config, clock=ManualClock())


def generate(w: DeviceWorker, req_id: str) -> list[int]:
    w.add_request("m", PROMPT, GREEDY, req_id=req_id)
    (_, out), = w.run_until_idle()
    return out.token_ids


def source_reads(w: DeviceWorker) -> int:
    return w.engines["m"].executor.num_source_reads


def mapped(path) -> int:
    """How many mappings of `path` this process holds."""
    with open("/proc/self/maps") as f:
        return sum(line.rstrip().endswith(str(path)) for line in f)


@pytest.fixture
def store(tmp_path):
    # /dev/shm where there is one (the real place: memory, not disk), else a temporary folder
    base = "/dev/shm" if os.path.isdir("/dev/shm") else str(tmp_path)
    folder = os.path.join(base, f"prism-test-{os.getpid()}-{tmp_path.name}")
    yield folder
    for name in os.listdir(folder) if os.path.isdir(folder) else []:
        os.unlink(os.path.join(folder, name))
    if os.path.isdir(folder):
        os.rmdir(folder)


def test_a_model_evicted_on_one_device_comes_back_on_the_other_from_the_same_copy(store):
    first, second = worker("cpu:0", store), worker("cpu:1", store)
    try:
        files = os.listdir(store)
        assert len(files) == 1  # the second worker found the first's copy and mapped it
        path = os.path.join(store, files[0])
        assert mapped(path) == 2
        expected = generate(first, "r0")
        for w in (first, second):
            assert w.memory_report().host_copies == ["m"] and w.memory_report().host_store == store
        # evicted on the first, activated on the second: both from the node's one copy
        first.evict("m")
        second.evict("m")
        assert second.activate("m")
        assert generate(second, "r1") == expected
        assert source_reads(first) == source_reads(second) == 1  # each read it once, at start
        assert os.listdir(store) == files
    finally:
        first.close()
        second.close()
    assert os.listdir(store) == files  # closing a worker leaves the node's copy to the others
    assert mapped(path) == 0


def test_a_dropped_copy_is_gone_for_the_node_and_the_next_activation_reads_the_source(store):
    first, second = worker("cpu:0", store), worker("cpu:1", store)
    try:
        expected = generate(first, "r0")
        first.evict("m")
        second.evict("m")
        sent = []
        for w in (first, second):  # what the frontend does when node a is over its budget
            assert handle(w, msg.DropHostCopy("m"), sent.append)
        assert os.listdir(store) == [] and sent == []
        assert second.memory_report().host_copies == []
        assert second.activate("m")
        assert source_reads(second) == 2  # no copy anywhere on the node: the source again
        assert generate(second, "r1") == expected
        assert len(os.listdir(store)) == 1  # ...which made the node a new copy
        assert first.memory_report().host_copies == ["m"]
        assert first.activate("m")
        assert source_reads(first) == 1  # the first device found it: no read of the source
        assert generate(first, "r2") == expected
    finally:
        first.close()
        second.close()


def test_a_resident_model_whose_copy_was_dropped_keeps_none_when_evicted(store):
    w = worker("cpu", store)
    try:
        expected = generate(w, "r0")
        w.drop_host_copy("m")
        w.evict("m")  # the budget said no copy: the eviction does not make one
        assert os.listdir(store) == [] and w.memory_report().host_copies == []
        assert w.activate("m")
        assert source_reads(w) == 2
        assert generate(w, "r1") == expected
    finally:
        w.close()


def test_private_copies_without_a_store_are_dropped_too():
    w = worker("cpu", None)
    try:
        expected = generate(w, "r0")
        assert w.memory_report().host_copies == ["m"] and w.memory_report().host_store == ""
        w.evict("m")
        w.drop_host_copy("m")
        assert w.memory_report().host_copies == []
        assert w.activate("m")
        assert source_reads(w) == 2 and generate(w, "r1") == expected
    finally:
        w.close()


# ---- the same over worker processes and their messages -------------------------------------
def report_of(w) -> msg.DeviceMemory:
    w.send(msg.ReportMemory())
    while True:
        m = w.recv(timeout_s=60)
        assert m is not None, "worker went quiet"
        if isinstance(m, msg.MemoryReport):
            return m.report


def answer(w, req_id: str) -> list[int]:
    tokens = []
    while True:
        m = w.recv(timeout_s=60)
        assert m is not None, "worker went quiet"
        if isinstance(m, msg.Tokens):
            tokens += [t.token_id for t in m.tokens if t.req_id == req_id]
        elif isinstance(m, msg.Finished) and m.req_id == req_id:
            return tokens
        assert not isinstance(m, msg.Rejected), m.message


def test_worker_processes_of_a_node_share_and_drop_copies_through_messages(store):
    from prism.worker.process import WorkerProcess

    pages = -(-plan_layout(resolve_model(SOURCE).config, torch.float32).num_bytes // PAGE)

    def config(device):
        return WorkerConfig(DeviceConfig(device, (pages + 64) * PAGE, PAGE, node="a"),
                            (ModelSpec("m", SOURCE, engine=ENGINE),), host_copy_dir=store)

    first = WorkerProcess(config("cpu:0"))
    second = WorkerProcess(config("cpu:1"))
    try:
        assert len(os.listdir(store)) == 1  # one copy for the node's two workers
        first.send(msg.AddRequest("r0", "m", PROMPT, GREEDY))
        expected = answer(first, "r0")
        assert all(report_of(w).host_copies == ["m"] for w in (first, second))
        for w in (first, second):  # the node is over its budget: the frontend tells both
            w.send(msg.Evict("m"))
            w.send(msg.DropHostCopy("m"))
        assert all(report_of(w).host_copies == [] for w in (first, second))
        assert os.listdir(store) == []
        # the next activation reads the source and makes the node a copy, which serves the other
        second.send(msg.AddRequest("r1", "m", PROMPT, GREEDY))
        assert answer(second, "r1") == expected
        assert len(os.listdir(store)) == 1
        assert all(report_of(w).host_copies == ["m"] for w in (first, second))
        first.send(msg.AddRequest("r2", "m", PROMPT, GREEDY))
        assert answer(first, "r2") == expected
    finally:
        first.close()
        second.close()
