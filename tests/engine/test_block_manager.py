"""Block accounting over elastic pages (pure policy, no torch)."""
import random

from prism.engine.block_manager import BlockManager
from prism.engine.sequence import Sequence
from prism.types import SamplingParams


class CountingMapper:
    """A page mapper with a fixed page budget that records what is mapped."""

    def __init__(self, budget: int):
        self.budget = budget
        self.mapped: set[int] = set()

    def num_mappable_pages(self):
        return self.budget - len(self.mapped)

    def map_page(self, page):
        assert page not in self.mapped
        if len(self.mapped) >= self.budget:
            return False
        self.mapped.add(page)
        return True

    def unmap_page(self, page):
        self.mapped.remove(page)


def seq(n=0):
    return Sequence(f"s{n}", [1], SamplingParams())


def test_pages_are_mapped_on_demand_and_unmapped_when_free():
    mapper = CountingMapper(budget=4)
    bm = BlockManager(num_virtual_pages=10, blocks_per_page=4, block_size=16, mapper=mapper, num_spare_pages=0)
    a = seq()
    assert bm.allocate(a, 16 * 6)  # 6 blocks -> 2 pages
    assert mapper.mapped == {0, 1}
    assert bm.num_free_blocks == 2
    bm.free(a)
    assert mapper.mapped == set()


def test_allocation_is_all_or_nothing_at_the_budget():
    mapper = CountingMapper(budget=2)
    bm = BlockManager(10, 4, 16, mapper, num_spare_pages=0)
    a, b = seq(0), seq(1)
    assert bm.allocate(a, 16 * 5)
    assert not bm.can_allocate(b, 16 * 4)
    assert not bm.allocate(b, 16 * 4)
    assert b.block_table == [] and len(a.block_table) == 5
    assert mapper.mapped == {0, 1}


def test_spare_page_stays_mapped():
    mapper = CountingMapper(budget=8)
    bm = BlockManager(10, 4, 16, mapper, num_spare_pages=1)
    a = seq()
    bm.allocate(a, 16 * 12)
    bm.free(a)
    assert len(mapper.mapped) == 1
    bm.release_all_free_pages()
    assert mapper.mapped == set()


def test_random_alloc_free_keeps_invariants():
    rng = random.Random(0)
    mapper = CountingMapper(budget=6)
    bm = BlockManager(16, 3, 4, mapper, num_spare_pages=1)
    live = []
    for step in range(2000):
        if live and rng.random() < 0.45:
            bm.free(live.pop(rng.randrange(len(live))))
        else:
            s = seq(step)
            if bm.allocate(s, rng.randint(1, 20)):
                live.append(s)
        used = [b for s in live for b in s.block_table]
        assert len(used) == len(set(used)), "a block was handed out twice"
        assert all(b // 3 in mapper.mapped for b in used), "a used block lies in an unmapped page"
        assert len(mapper.mapped) <= 6
        assert bm.num_free_blocks == len(mapper.mapped) * 3 - len(used)


def test_keep_mapped_holds_pages_until_spares_are_lowered():
    mapper = CountingMapper(budget=10)
    bm = BlockManager(num_virtual_pages=10, blocks_per_page=4, block_size=2, mapper=mapper)
    assert bm.keep_mapped(6) == 6 and len(mapper.mapped) == 6
    seq = Sequence("s", [1] * 20, SamplingParams())
    assert bm.allocate(seq, 20)  # 10 blocks: 3 pages, all of them already mapped
    bm.free(seq)
    assert bm.num_mapped_pages == 6  # static: nothing unmapped when the request ends
    bm.num_spare_pages = 1
    bm.release_all_free_pages()
    assert bm.num_mapped_pages == 0 and not mapper.mapped


def test_map_ahead_maps_free_pages_and_keeps_them_through_a_free():
    mapper = CountingMapper(budget=6)
    bm = BlockManager(num_virtual_pages=10, blocks_per_page=4, block_size=2, mapper=mapper, num_spare_pages=0)
    bm.map_ahead(9)  # 3 pages
    assert len(mapper.mapped) == 3 and bm.num_free_blocks == 12
    a = seq()
    assert bm.allocate(a, 2 * 9)
    assert len(mapper.mapped) == 3  # nothing mapped at allocation: it was done ahead
    bm.free(a)
    assert len(mapper.mapped) == 3  # still wanted for the next step
    bm.map_ahead(100)  # more than the pool has: takes what is free, never fails
    assert len(mapper.mapped) == 6
    bm.map_ahead(0)
    assert len(mapper.mapped) == 6  # not unmapped while the GPU may run a step
    bm.trim()  # after the step
    assert not mapper.mapped
