"""Arena: all-or-nothing mapping, chunks, aliasing views, one budget for several arenas."""
import pytest
import torch

from prism.memory import Arena, HostMmapBackend, Owner, PagePool

PAGE = 64 << 10
KV = Owner("m", "kv")
W = Owner("m", "weights")


@pytest.fixture
def backend():
    b = HostMmapBackend(PAGE)
    yield b
    b.close()


def pool_state(pool):
    s = pool.stats()
    return (s.used_pages, s.spare_pages, s.pages_by_owner)


def test_arena_reserves_and_maps_nothing(backend):
    pool = PagePool(backend, 8, num_spare_pages=0)
    arena = Arena(pool, KV, 10 * PAGE + 1)
    assert arena.num_pages == 11 and arena.num_bytes == 11 * PAGE
    assert arena.num_mapped_pages == 0 and pool.used_pages == 0
    assert arena.tensor.data_ptr() == arena.base and arena.tensor.numel() == arena.num_bytes
    arena.close()
    arena.close()  # idempotent


def test_refused_map_is_all_or_nothing(backend):
    pool = PagePool(backend, 6, num_spare_pages=2)
    arena = Arena(pool, KV, 16 * PAGE)
    assert arena.map(0, 2)
    before = pool_state(pool)
    live_before = backend.num_live_pages
    assert not arena.map(4, 5)  # 2 + 5 > 6: the 5th page is refused
    assert pool_state(pool) == before
    assert backend.num_live_pages == live_before
    assert arena.num_mapped_pages == 2
    assert [arena.is_mapped(p) for p in range(10)] == [True, True] + [False] * 8
    assert pool.stats().num_refusals == 1
    assert arena.map(4, 4)  # exactly fits
    arena.close()
    assert pool.used_pages == 0


def test_cap_refusal_is_all_or_nothing(backend):
    pool = PagePool(backend, 100, num_spare_pages=0)
    pool.set_cap(KV, 3)
    arena = Arena(pool, KV, 8 * PAGE)
    assert arena.map(0, 2)
    assert not arena.map(2, 4, chunk_pages=2)
    assert arena.num_mapped_pages == 2 and pool.pages_of(KV) == 2
    arena.close()


def test_device_out_of_memory_midway_undoes_the_call():
    backend = HostMmapBackend(PAGE, max_pages=5)  # the "device" holds 5 pages
    pool = PagePool(backend, 100, num_spare_pages=0)  # the budget would allow more
    arena = Arena(pool, KV, 16 * PAGE)
    assert arena.map(0, 1)
    assert not arena.map(1, 6, chunk_pages=2)  # chunks [1,3), [3,5) fit, [5,7) does not
    assert arena.num_mapped_pages == 1 and pool.used_pages == 1
    assert backend.num_live_pages == 1 and pool.stats().num_refusals == 1
    assert arena.mapped_chunks() == [(0, 1)]
    assert arena.map(1, 4, chunk_pages=2)
    arena.close()
    backend.close()


def test_chunked_map_then_unmap(backend):
    pool = PagePool(backend, 16, num_spare_pages=0)
    arena = Arena(pool, W, 16 * PAGE)
    assert arena.map(0, 10, chunk_pages=4)
    assert arena.mapped_chunks() == [(0, 4), (4, 4), (8, 2)]
    assert pool.stats().num_creates == 3 and pool.stats().num_maps == 3
    with pytest.raises(ValueError):
        arena.unmap(0, 6)  # chunk [4, 8) straddles the edge
    with pytest.raises(ValueError):
        arena.map(9, 2)  # page 9 already mapped
    assert arena.num_mapped_pages == 10  # failed calls changed nothing
    arena.unmap(4, 12)  # chunks [4, 8) and [8, 10); unmapped pages 10..15 are skipped
    assert arena.mapped_chunks() == [(0, 4)]
    assert pool.used_pages == 4 and pool.stats().num_unmaps == 2
    arena.unmap_all()
    assert pool.used_pages == 0 and arena.num_mapped_pages == 0
    arena.close()


def test_views_alias_the_same_bytes(backend):
    pool = PagePool(backend, 4)
    arena = Arena(pool, KV, 4 * PAGE)
    assert arena.map(0, 2)
    f32 = arena.view(torch.float32, (8, 4))
    i32 = arena.view(torch.int32, (32,))
    f32.fill_(1.0)
    assert int(i32[0]) == 0x3F800000
    bf = arena.view(torch.bfloat16, (2, 4), offset_bytes=PAGE)
    bf.copy_(torch.arange(8, dtype=torch.bfloat16).view(2, 4))
    raw = arena.tensor[PAGE : PAGE + 16]
    assert torch.equal(raw.view(torch.bfloat16), torch.arange(8, dtype=torch.bfloat16))
    assert bf.data_ptr() == arena.base + PAGE
    with pytest.raises(ValueError):
        arena.view(torch.float32, (2,), offset_bytes=2)  # misaligned
    with pytest.raises(ValueError):
        arena.view(torch.float32, (PAGE + 1,))  # beyond the range
    arena.close()


def test_remap_keeps_the_address_and_gives_fresh_pages(backend):
    pool = PagePool(backend, 4, num_spare_pages=0)
    arena = Arena(pool, KV, 2 * PAGE)
    view = arena.view(torch.int64, (PAGE // 8,))
    assert arena.map(0, 1)
    view.fill_(42)
    ptr = view.data_ptr()
    arena.unmap(0, 1)
    assert arena.map(0, 1)
    assert view.data_ptr() == ptr == arena.base
    assert int(view.count_nonzero()) == 0
    arena.close()


def test_two_arenas_share_the_budget(backend):
    pool = PagePool(backend, 8, num_spare_pages=2)
    weights = Arena(pool, W, 8 * PAGE)
    kv = Arena(pool, KV, 8 * PAGE)
    assert weights.map(0, 6, chunk_pages=6)
    assert kv.map(0, 2)
    assert not kv.map(2, 1)  # the budget is spent
    weights.unmap(0, 6)  # the neighbour shrinks ...
    assert kv.map(2, 6)  # ... so this one grows
    assert pool.pages_by_owner() == {KV: 8}
    assert not weights.map(0, 1)
    kv.close()
    weights.close()
    assert pool.used_pages == 0


def test_backend_failure_during_map_undoes_and_raises(backend):
    pool = PagePool(backend, 8, num_spare_pages=0)
    arena = Arena(pool, KV, 4 * PAGE)
    real_map = backend.map
    calls = []

    def failing_map(addr, chunk):
        calls.append(addr)
        if len(calls) == 3:
            raise RuntimeError("driver said no")
        real_map(addr, chunk)

    backend.map = failing_map
    with pytest.raises(RuntimeError):
        arena.map(0, 4)
    backend.map = real_map
    assert arena.num_mapped_pages == 0 and pool.used_pages == 0
    assert backend.num_live_pages == 0
    arena.close()


def test_out_of_range_and_closed(backend):
    pool = PagePool(backend, 8)
    arena = Arena(pool, KV, 4 * PAGE)
    with pytest.raises(ValueError):
        arena.map(3, 2)
    with pytest.raises(ValueError):
        arena.map(0, 0)
    arena.close()
    with pytest.raises(ValueError):
        arena.map(0, 1)


def test_timings_reach_the_pool(backend):
    ticks = iter(range(1000))
    pool = PagePool(backend, 8, num_spare_pages=0, clock=lambda: float(next(ticks)))
    arena = Arena(pool, KV, 4 * PAGE)
    assert arena.map(0, 2)
    arena.unmap_all()
    stats = pool.stats()
    assert stats.num_maps == 2 and stats.num_unmaps == 2
    assert stats.map_latency_s == (1.0, 1.0) and stats.unmap_latency_s == (1.0, 1.0)
    arena.close()


def test_a_full_pool_runs_the_reclaimers_before_refusing(backend):
    """An owner that deferred unmapping pages (until the device passed them) gives them back
    when another arena is refused for lack of room: the map then succeeds."""
    pool = PagePool(backend, 4, num_spare_pages=0)
    kv, weights = Arena(pool, KV, 4 * PAGE), Arena(pool, W, 4 * PAGE)
    assert kv.map(0, 3)
    deferred = [1, 2]  # pages kv no longer uses but has not unmapped yet
    calls = []

    def reclaim():
        calls.append(len(deferred))
        while deferred:
            kv.unmap(deferred.pop(), 1, device_done=True)
            pool.note_deferred(-1)

    pool.add_reclaimer(reclaim)
    pool.note_deferred(len(deferred))
    assert weights.map(0, 1) and calls == []  # room enough: nothing reclaimed
    assert weights.map(1, 2) and calls == [2]  # 1 + 3 + 2 > 4: the reclaimer freed two pages
    assert pool.pages_of(KV) == 1 and pool.pages_of(W) == 3
    pool.remove_reclaimer(reclaim)
    assert not weights.map(3, 1) and calls == [2]  # full, and nobody left to reclaim
    kv.close(), weights.close()


def test_a_reclaimer_method_does_not_keep_its_owner_alive(backend):
    import weakref

    class Cache:
        calls = 0

        def reclaim(self):
            Cache.calls += 1

    pool = PagePool(backend, 4, num_spare_pages=0)
    pool.note_deferred(1)  # some owner has a page waiting: reclaim() runs the reclaimers
    cache = Cache()
    pool.add_reclaimer(cache.reclaim)
    pool.reclaim()
    assert Cache.calls == 1
    alive = weakref.ref(cache)
    del cache
    assert alive() is None  # the pool held it weakly
    pool.reclaim()
    assert Cache.calls == 1
    kept = Cache()
    pool.add_reclaimer(kept.reclaim)
    pool.remove_reclaimer(kept.reclaim)
    pool.reclaim()
    assert Cache.calls == 1
