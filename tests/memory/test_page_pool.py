"""PagePool: budget, caps and spares hold under any sequence of allocate/free."""
import random

import pytest

from prism.memory import HostMmapBackend, Owner, PagePool

PAGE = 64 << 10
A = Owner("a", "kv")
B = Owner("b", "weights")


def make_pool(budget, spares=2, max_pages=None):
    return PagePool(HostMmapBackend(PAGE, max_pages=max_pages), budget, num_spare_pages=spares)


def test_pool_at_budget_refuses_without_raising():
    pool = make_pool(4)
    chunks = [pool.allocate(A, 1) for _ in range(4)]
    assert all(c is not None for c in chunks)
    assert pool.used_pages == 4 and pool.free_pages == 0
    assert not pool.can_allocate(A, 1)
    assert pool.allocate(A, 1) is None
    assert pool.allocate(B, 2) is None
    stats = pool.stats()
    assert stats.num_refusals == 2 and stats.used_pages == 4 and stats.spare_pages == 0
    pool.free(A, chunks[0])
    assert pool.can_allocate(B, 1)


def test_cap_limits_one_owner_only():
    pool = make_pool(10)
    pool.set_cap(A, 3)
    assert pool.allocate(A, 3) is not None
    assert not pool.can_allocate(A, 1) and pool.allocate(A, 1) is None
    assert pool.allocate(B, 5) is not None
    pool.set_cap(A, None)
    assert pool.allocate(A, 2) is not None
    assert pool.pages_by_owner() == {A: 5, B: 5}


def test_spares_serve_single_pages_and_make_room_for_big_ones():
    backend = HostMmapBackend(PAGE)
    pool = PagePool(backend, 8, num_spare_pages=3)
    assert pool.spare_pages == 3 and backend.num_live_pages == 3
    one = pool.allocate(A, 1)
    assert pool.stats().num_spare_hits == 1 and pool.spare_pages == 2
    big = pool.allocate(B, 7)  # needs the room the spares take: they are released
    assert big is not None
    assert pool.used_pages == 8 and pool.spare_pages == 0
    assert backend.num_live_pages == 8
    pool.free(A, one)  # a single page goes back to the spares
    assert pool.spare_pages == 1 and backend.num_live_pages == 8
    pool.free(B, big)  # a big chunk is released
    assert backend.num_live_pages == 1
    assert pool.refill_spares() == 2 and pool.spare_pages == 3
    pool.close()
    assert backend.num_live_pages == 0


def test_device_out_of_memory_is_a_refusal():
    pool = make_pool(100, spares=2, max_pages=6)
    assert pool.allocate(A, 4) is not None  # 4 owned + 2 spares = the whole "device"
    # The device is full, but giving the spares back makes room.
    assert pool.allocate(B, 2) is not None
    assert pool.spare_pages == 0
    assert pool.allocate(B, 1) is None
    assert pool.stats().num_refusals == 1
    assert pool.pages_of(B) == 2


def test_free_checks_the_owner():
    pool = make_pool(4)
    chunk = pool.allocate(A, 2)
    with pytest.raises(ValueError):
        pool.free(B, chunk)
    pool.free(A, chunk)
    with pytest.raises(ValueError):
        pool.free(A, chunk)  # twice


def test_stats_count_and_latency():
    pool = make_pool(4)
    for s in (0.001, 0.002, 0.003):
        pool.record_map(s)
    pool.record_unmap(0.5)
    c = pool.allocate(A, 2)
    st = pool.stats()
    assert st.num_maps == 3 and st.num_unmaps == 1
    assert st.map_latency_s == (0.002, 0.003)
    assert st.unmap_latency_s == (0.5, 0.5)
    assert st.pages_by_owner == {"a/kv": 2}
    assert st.budget_pages == 4 and st.free_pages == 2
    pool.free(A, c)


def test_set_budget_releases_spares_above_it():
    backend = HostMmapBackend(PAGE)
    pool = PagePool(backend, 8, num_spare_pages=4)
    c = pool.allocate(A, 5)
    assert pool.spare_pages == 3  # 5 + 3 = 8
    pool.set_budget(6)
    assert pool.spare_pages == 1 and backend.num_live_pages == 6
    assert pool.allocate(A, 2) is None
    pool.free(A, c)


@pytest.mark.parametrize("seed", range(5))
def test_randomized_invariants(seed):
    rng = random.Random(seed)
    backend = HostMmapBackend(PAGE, max_pages=rng.choice([None, 40]))
    budget = rng.randint(8, 48)
    num_spares = rng.randint(0, 4)
    pool = PagePool(backend, budget, num_spare_pages=num_spares)
    owners = [Owner(f"m{i}", kind) for i in range(3) for kind in ("weights", "kv")]
    caps = {o: rng.choice([None, rng.randint(0, budget)]) for o in owners}
    for o, cap in caps.items():
        pool.set_cap(o, cap)
    held = {o: [] for o in owners}
    refusals = 0
    for _ in range(400):
        o = rng.choice(owners)
        action = rng.random()
        if action < 0.55:
            n = rng.choice([1, 1, 1, 2, 3, 8])
            expect_ok = pool.can_allocate(o, n)
            chunk = pool.allocate(o, n)
            if chunk is None:
                refusals += 1
            else:
                assert expect_ok, "allocate must never exceed what can_allocate allows"
                assert chunk.num_pages == n
                held[o].append(chunk)
        elif action < 0.95 and held[o]:
            pool.free(o, held[o].pop(rng.randrange(len(held[o]))))
        else:
            pool.refill_spares()
        owned = {k: sum(c.num_pages for c in v) for k, v in held.items()}
        assert pool.used_pages == sum(owned.values()) <= budget
        assert pool.used_pages + pool.spare_pages <= budget
        assert pool.spare_pages <= num_spares
        assert pool.free_pages == budget - pool.used_pages
        assert backend.num_live_pages == pool.used_pages + pool.spare_pages
        for k, n in owned.items():
            assert pool.pages_of(k) == n
            assert caps[k] is None or n <= caps[k]
        assert pool.stats().num_refusals == refusals
    for o, chunks in held.items():
        for c in chunks:
            pool.free(o, c)
    pool.close()
    assert backend.num_live_pages == 0
