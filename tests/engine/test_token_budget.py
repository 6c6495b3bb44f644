"""Scheduler.schedule(budget): a step's token budget below max_num_batched_tokens (the local
scheduler's, to keep decodes within TPOT): no decode is skipped for a prefill chunk."""
from prism.config import EngineConfig
from prism.engine.block_manager import BlockManager
from prism.engine.scheduler import Scheduler
from prism.engine.sequence import Sequence
from prism.types import SamplingParams, SeqStatus


class Mapper:
    def num_mappable_pages(self):
        return 1_000

    def map_page(self, page):
        return True

    def unmap_page(self, page):
        pass


def scheduler() -> Scheduler:
    return Scheduler(EngineConfig(), BlockManager(1_000, 4, 16, Mapper(), num_spare_pages=0))


def running(s: Scheduler, req_id: str, prompt: int, computed: int, out: int = 0) -> Sequence:
    seq = Sequence(req_id, [1] * prompt, SamplingParams(), output_token_ids=[2] * out)
    assert s.blocks.allocate(seq, computed)
    seq.num_computed_tokens, seq.status = computed, SeqStatus.RUNNING
    s.running.append(seq)
    return seq


def sizes(plan) -> dict[str, int]:
    return {c.seq.req_id: c.num_tokens for c in plan.chunks}


def test_a_running_prefill_leaves_a_token_for_each_decode_after_it():
    s = scheduler()
    running(s, "long", 4000, 2048)  # admitted first, half prefilled
    running(s, "d1", 100, 100, out=1)
    running(s, "d2", 100, 100, out=1)
    s.add(Sequence("new", [1] * 500, SamplingParams()))
    assert sizes(s.schedule(budget=40)) == {"long": 38, "d1": 1, "d2": 1}


def test_without_a_budget_the_engines_applies_and_a_larger_one_is_capped():
    s = scheduler()
    running(s, "long", 4000, 2048)
    running(s, "d1", 100, 100, out=1)
    assert sizes(s.schedule()) == {"long": 1952, "d1": 1}
    s = scheduler()
    running(s, "d1", 100, 100, out=1)
    s.add(Sequence("new", [1] * 4000, SamplingParams()))
    assert sizes(s.schedule(budget=10_000)) == {"d1": 1, "new": 2047}
