"""CudaVmmBackend on a real GPU (marked gpu: skipped where CUDA is absent)."""
import threading

import pytest
import torch

from prism.memory import Arena, Owner, PagePool, make_backend

pytestmark = pytest.mark.gpu

MiB = 1 << 20
KV = Owner("m", "kv")
SLACK = 8 * MiB  # driver bookkeeping may move free memory by a little


@pytest.fixture(scope="module")
def backend():
    from prism.memory.cuda_vmm import CudaVmmBackend

    torch.cuda.init()
    b = CudaVmmBackend(0)
    yield b
    b.close()


def free_bytes() -> int:
    torch.cuda.synchronize()
    return torch.cuda.mem_get_info(0)[0]


def test_granularity_and_page_size(backend):
    assert backend.granularity > 0 and backend.page_size % backend.granularity == 0
    assert backend.device == torch.device("cuda", 0)
    other = make_backend("cuda:0", backend.page_size)
    assert other.page_size == backend.page_size
    other.close()


def test_tensor_over_unmapped_range_then_map(backend):
    pool = PagePool(backend, 4, num_spare_pages=0)
    arena = Arena(pool, KV, 4 * backend.page_size)
    assert arena.tensor.device == torch.device("cuda", 0)
    assert arena.tensor.data_ptr() == arena.base and arena.num_mapped_pages == 0
    assert arena.map(0, 1)
    page = arena.view(torch.int32, (backend.page_size // 4,))
    page.fill_(5)
    assert int(page.sum()) == 5 * page.numel()
    arena.close()


def test_free_memory_follows_mapping(backend):
    page = backend.page_size
    pool = PagePool(backend, 128, num_spare_pages=0)
    arena = Arena(pool, KV, 128 * page)
    start = free_bytes()
    assert arena.map(0, 64)
    dropped = start - free_bytes()
    assert abs(dropped - 64 * page) <= SLACK, f"free fell {dropped / MiB} MiB for 64 pages"
    assert arena.map(64, 64, chunk_pages=32)
    assert abs(start - free_bytes() - 128 * page) <= SLACK
    arena.unmap_all()
    assert abs(start - free_bytes()) <= SLACK, "unmapped memory did not come back"
    arena.close()


def test_data_survives_neighbour_churn(backend):
    page = backend.page_size
    pool = PagePool(backend, 16, num_spare_pages=2)
    arena = Arena(pool, KV, 16 * page)
    assert arena.map(0, 4, chunk_pages=2)
    n = 4 * page // 4
    data = arena.view(torch.float32, (n,))
    expected = torch.arange(n, device="cuda:0", dtype=torch.float32)
    data.copy_(expected)
    for _ in range(3):
        assert arena.map(4, 8)
        arena.view(torch.float32, (n,), offset_bytes=4 * page).fill_(-1)
        arena.unmap(4, 8)
    assert torch.equal(data, expected)
    m = arena.view(torch.float16, (512, 512))
    m.copy_(torch.randn(512, 512, device="cuda:0", dtype=torch.float16))
    assert torch.allclose(m @ m, m.clone() @ m.clone())
    arena.close()


def test_budget_refusal_is_clean(backend):
    pool = PagePool(backend, 4, num_spare_pages=0)
    arena = Arena(pool, KV, 8 * backend.page_size)
    assert arena.map(0, 4)
    assert not arena.map(4, 1)
    assert pool.stats().num_refusals == 1 and arena.num_mapped_pages == 4
    v = arena.view(torch.int64, (4 * backend.page_size // 8,))
    v.fill_(2)
    assert int(v.sum()) == 2 * v.numel()
    arena.close()


def test_device_out_of_memory_returns_none_and_context_survives(backend):
    free = torch.cuda.mem_get_info(0)[0]
    assert backend.create(free // backend.page_size + 64) is None
    chunk = backend.create(1)
    assert chunk is not None
    backend.release(chunk)
    pool = PagePool(backend, 2, num_spare_pages=1)
    arena = Arena(pool, KV, 2 * backend.page_size)
    assert arena.map(0, 2)
    v = arena.view(torch.float32, (2 * backend.page_size // 4,))
    v.fill_(3.0)
    assert float(v.sum()) == 3.0 * v.numel()
    plain = torch.ones(1 << 20, device="cuda:0") + 1
    assert float(plain.sum()) == 2.0 * plain.numel()
    arena.close()
    pool.close()


def test_cuda_graph_replays_after_remap(backend):
    page = backend.page_size
    pool = PagePool(backend, 4, num_spare_pages=0)
    arena = Arena(pool, KV, 2 * page)
    assert arena.map(0, 2, chunk_pages=2)
    n = page // 4
    x = arena.view(torch.float32, (n,))
    y = arena.view(torch.float32, (n,), offset_bytes=page)
    x.copy_(torch.arange(n, device="cuda:0", dtype=torch.float32))
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm up outside the capture, as torch asks
        y.copy_(x * 3 + 1)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        y.copy_(x * 3 + 1)
    y.zero_()
    graph.replay()
    assert torch.equal(y, torch.arange(n, device="cuda:0", dtype=torch.float32) * 3 + 1)

    arena.unmap_all()  # the 2-page chunk is released: the remap gets new physical memory
    assert arena.map(0, 2, chunk_pages=2)
    x.fill_(7.0)
    y.zero_()
    graph.replay()
    torch.cuda.synchronize()
    assert torch.all(y == 22.0)
    del graph
    arena.close()


def test_map_from_another_thread(backend):
    pool = PagePool(backend, 4, num_spare_pages=0)
    arena = Arena(pool, KV, 4 * backend.page_size)
    results = []
    worker = threading.Thread(target=lambda: results.append(arena.map(0, 4, chunk_pages=2)))
    worker.start()
    worker.join()
    assert results == [True]
    v = arena.view(torch.uint8, (4 * backend.page_size,))
    v.fill_(1)
    assert int(v.sum()) == v.numel()
    arena.close()
