"""The node's shared host copies (engine/host_store.py): written once, mapped by each worker,
complete or absent, dropped for all; on CUDA page-locked and copied back at pinned speed."""
import os

import pytest
import torch

from prism.engine.host_store import SharedHostCopies, pin, unpin


@pytest.fixture
def store(tmp_path):
    return SharedHostCopies(tmp_path / "node-a")


def test_a_copy_written_once_is_mapped_by_others(store):
    data = torch.arange(1000, dtype=torch.float32)
    mine = store.publish("m/1:b", data)  # model names may hold '/' and ':'
    assert [p.name for p in store.folder.iterdir()] == ["m%2F1%3Ab.weights"]
    other = store.open("m/1:b", data.numel() * 4)
    assert torch.equal(other.view(torch.float32), data)
    mine[:4] = 0  # one memory: what one mapping sees, the other sees
    assert int(other[:4].sum()) == 0
    assert store.open("m/1:b", 4) is None  # a copy of another size is never trusted
    assert store.open("absent", 4) is None


def test_a_dropped_copy_stays_valid_where_mapped_and_is_gone_for_new_workers(store):
    data = torch.randn(256)
    mapped = store.publish("m", data)
    store.drop("m")
    store.drop("m")  # every worker of the node is told: the second drop is a no-op
    assert not store.exists("m") and store.open("m", 1024) is None
    assert torch.equal(mapped.view(torch.float32), data)


def test_no_partial_copy_is_ever_visible(store, monkeypatch):
    class Broken(Exception):
        pass

    def fail(*args):
        raise Broken

    monkeypatch.setattr(os, "replace", fail)  # the writer dies before the rename
    with pytest.raises(Broken):
        store.publish("m", torch.ones(64))
    assert list(store.folder.iterdir()) == []  # neither the copy nor its temporary file


@pytest.mark.gpu
def test_pinned_shared_copy_goes_to_the_gpu_and_back(store):
    """Where the platform refuses to page-lock a shared mapping, pin says so and CUDA stays
    healthy (a refused registration must not surface later as some kernel's error)."""
    weights = torch.randn(64 << 20, device="cuda")  # 256 MiB
    host = store.publish("m", weights.view(torch.uint8))
    pinned = pin(host)
    try:
        back = torch.empty_like(weights)
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        back.view(torch.uint8).copy_(host, non_blocking=True)
        end.record()
        torch.cuda.synchronize()
        assert torch.equal(back, weights)
        assert torch.equal((back * 2).cpu(), (weights * 2).cpu())  # kernels still launch cleanly
        gb_per_s = host.numel() / start.elapsed_time(end) / 1e6
        print(f"shared copy -> GPU ({'pinned' if pinned else 'refused: pageable'}): {gb_per_s:.1f} GB/s")
        if pinned:
            assert gb_per_s > 5  # pageable memory would copy far slower than a pinned PCIe/NVLink link
    finally:
        if pinned:
            unpin(host)


def test_room_is_judged_against_the_file_system(store):
    st = os.statvfs(store.folder)
    free = st.f_bavail * st.f_frsize
    assert store.has_room(1 << 20) == (free > (1 << 20) + (64 << 20) + (1 << 16))
    assert not store.has_room(free)  # the margin: a full tmpfs would kill the writer (SIGBUS)
