"""HostMmapBackend: resident memory really follows map/unmap; addresses never move."""
import pytest
import torch

from prism.memory import HostMmapBackend

PAGE = 64 << 10
NUM_PAGES = 256  # 16 MiB: large against RSS noise, small for CI


def rss_bytes() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no VmRSS in /proc/self/status")


@pytest.fixture
def backend():
    b = HostMmapBackend(PAGE)
    yield b
    b.close()


def test_map_raises_rss_and_unmap_lowers_it(backend):
    size = NUM_PAGES * PAGE
    base = backend.reserve(size)
    before = rss_bytes()
    chunk = backend.create(NUM_PAGES)
    backend.map(base, chunk)
    grown = rss_bytes() - before
    assert abs(grown - size) < 0.2 * size, f"RSS grew {grown} for {size} mapped"
    backend.unmap(base, NUM_PAGES)
    shrunk = rss_bytes() - before
    assert shrunk < 0.2 * size, f"RSS still {shrunk} above start after unmap"
    backend.release(chunk)


def test_reserve_alone_commits_nothing(backend):
    before = rss_bytes()
    backend.reserve(4096 * PAGE)  # 256 MiB of address space
    assert rss_bytes() - before < 8 * PAGE


def test_data_reads_back_and_address_is_fixed(backend):
    base = backend.reserve(8 * PAGE)
    t = backend.tensor(base, 8 * PAGE)
    assert t.data_ptr() == base and t.numel() == 8 * PAGE
    chunks = [backend.create(1) for _ in range(2)]
    backend.map(base, chunks[0])
    backend.map(base + PAGE, chunks[1])
    t[: 2 * PAGE] = torch.arange(2 * PAGE, dtype=torch.int64).remainder(251).to(torch.uint8)
    assert torch.equal(t[: 2 * PAGE], torch.arange(2 * PAGE).remainder(251).to(torch.uint8))

    backend.unmap(base, 1)
    backend.map(base, chunks[0])
    assert t.data_ptr() == base
    assert backend.tensor(base, 8 * PAGE).data_ptr() == base
    assert int(t[:PAGE].count_nonzero()) == 0, "a remapped page must read as fresh zeros"
    # the neighbour page kept its data
    assert torch.equal(t[PAGE : 2 * PAGE], torch.arange(PAGE, 2 * PAGE).remainder(251).to(torch.uint8))


def test_sub_tensor_and_bad_addresses(backend):
    base = backend.reserve(4 * PAGE)
    assert backend.tensor(base + PAGE, PAGE).data_ptr() == base + PAGE
    with pytest.raises(ValueError):
        backend.tensor(base, 5 * PAGE)
    chunk = backend.create(1)
    with pytest.raises(ValueError):
        backend.map(base + 4 * PAGE, chunk)  # past the end
    with pytest.raises(ValueError):
        backend.map(base + 100, chunk)  # not page aligned
    backend.map(base, chunk)
    with pytest.raises(ValueError):
        backend.map(base, backend.create(1))  # already mapped
    with pytest.raises(ValueError):
        backend.unmap(base + PAGE, 1)  # never mapped


def test_reserve_rejects_partial_pages(backend):
    with pytest.raises(ValueError):
        backend.reserve(PAGE + 1)
    with pytest.raises(ValueError):
        HostMmapBackend(1000)


def test_max_pages_emulates_a_full_device():
    b = HostMmapBackend(PAGE, max_pages=3)
    c = b.create(2)
    assert b.create(2) is None
    assert b.create(1) is not None
    b.release(c)
    assert b.create(2) is not None
    with pytest.raises(ValueError):
        b.release(c)  # twice


def test_free_range_keeps_live_views_safe(backend):
    base = backend.reserve(2 * PAGE)
    chunk = backend.create(2)
    backend.map(base, chunk)
    view = backend.tensor(base, 2 * PAGE)
    view.fill_(7)
    backend.free_range(base, 2 * PAGE)
    # The CPU backend keeps the mapping alive while a view exists (contents dropped).
    assert int(view.sum()) == 0
    backend.release(chunk)


def test_make_backend_picks_by_device():
    from prism.memory import make_backend

    b = make_backend("cpu", PAGE)
    assert isinstance(b, HostMmapBackend) and b.page_size == PAGE
    with pytest.raises(ValueError):
        make_backend("tpu:0", PAGE)
