"""The engine core over a fake executor: requests, steps, KV pages mapped ahead, eviction.

The fake "samples" a scripted token per sequence and maps KV pages from a fixed supply, so
each test sees exactly what the core asked of its executor (as vLLM's scheduler tests fake
the model's output)."""
import subprocess
import sys

import pytest

from prism.config import EngineConfig, ModelConfig
from prism.engine.core import EngineCore
from prism.engine.executor import ModelSizes
from prism.engine.memory_plan import KVGeometry
from prism.engine.sequence import SampledToken
from prism.types import FinishReason, RequestError, SamplingParams

VOCAB = 100
EOS = 99
BLOCK = 4


class FakeMapper:
    def __init__(self, capacity: int):
        self.capacity = capacity
        self.mapped: set[int] = set()
        self.log: list[tuple[str, int]] = []  # (phase, page) of every map call

    def num_mappable_pages(self) -> int:
        return self.capacity - len(self.mapped)

    def map_page(self, page: int) -> bool:
        if len(self.mapped) >= self.capacity:
            return False
        self.mapped.add(page)
        self.log.append((self.phase, page))
        return True

    def unmap_page(self, page: int) -> None:
        self.mapped.remove(page)

    phase = "planning"


class FakeExecutor:
    model_id = "fake"

    def __init__(self, kv_pages: int = 8, blocks_per_page: int = 2, tokens=lambda seq: 7,
                 max_position_embeddings: int = 64):
        self.config = ModelConfig(
            architecture="LlamaForCausalLM", vocab_size=VOCAB, hidden_size=8, intermediate_size=16,
            num_layers=1, num_heads=2, num_kv_heads=1, head_dim=4, rms_norm_eps=1e-6, rope_theta=1e4,
            max_position_embeddings=max_position_embeddings)
        self.sizes = ModelSizes(weight_bytes=1000, weight_pages=1, kv_bytes_per_token=16, vocab_size=VOCAB)
        self.kv_geometry = KVGeometry(BLOCK, blocks_per_page, kv_pages, pages_per_kv_page=2)
        self.kv_mapper = FakeMapper(kv_pages)
        self.budget_pages = 1 + 2 * kv_pages
        self.tokens = tokens
        self.weights_mapped = True
        self.steps: list = []
        self.forgotten: list[str] = []
        self.closed = False

    @property
    def num_kv_pages(self) -> int:
        return 2 * len(self.kv_mapper.mapped)

    def execute(self, plan, while_running):
        self.steps.append(plan)
        self.kv_mapper.phase = "running"
        while_running()
        self.kv_mapper.phase = "planning"
        return [SampledToken(c.seq, self.tokens(c.seq)) for c in plan.chunks if c.samples]

    def forget(self, seq):
        self.forgotten.append(seq.req_id)

    def unmap_weights(self):
        self.weights_mapped = False

    def activate(self):
        self.weights_mapped = True

    def close(self):
        self.closed = True


def make_core(executor=None, **engine_kw):
    kw = dict(block_size=BLOCK, max_num_batched_tokens=32, max_num_seqs=8)
    kw.update(engine_kw)
    now = [0.0]
    core = EngineCore(executor or FakeExecutor(), EngineConfig(**kw), lambda: now[0], eos_token_ids=(EOS,))
    return core, now


def greedy(n, **kw):
    return SamplingParams(temperature=0, max_tokens=n, **kw)


def run(core):
    done = {}
    while core.has_unfinished:
        for out in core.step():
            done[out.req_id] = out
    return done


def test_requests_run_to_max_tokens_and_stream_their_tokens():
    core, _ = make_core()
    a = core.add_request([1, 2, 3], greedy(3))
    b = core.add_request([4] * 9, greedy(2))
    done = run(core)
    assert done[a].token_ids == [7, 7, 7] and done[b].token_ids == [7, 7]
    assert all(o.finish_reason == FinishReason.LENGTH for o in done.values())
    events = core.drain_events()
    assert [e.token_id for e in events if e.req_id == a] == [7, 7, 7]
    assert events[-1].finish_reason == FinishReason.LENGTH and core.drain_events() == []
    assert sorted(core.executor.forgotten) == sorted([a, b]) and not core.has_request(a)


def test_eos_ends_a_request_unless_it_ignores_eos():
    core, _ = make_core(FakeExecutor(tokens=lambda seq: EOS))
    stops = core.add_request([1], greedy(5))
    goes_on = core.add_request([1], greedy(5, ignore_eos=True))
    done = run(core)
    assert done[stops].token_ids == [EOS] and done[stops].finish_reason == FinishReason.STOP
    assert len(done[goes_on].token_ids) == 5


@pytest.mark.parametrize("prompt, message", [
    ([], "empty"), ([1, VOCAB], "outside the vocabulary"), ([1] * 64, "context limit"),
    ("text", "no tokenizer"),
])
def test_bad_prompts_are_refused(prompt, message):
    core, _ = make_core()
    with pytest.raises(RequestError, match=message):
        core.add_request(prompt, greedy(1))


def test_a_prompt_larger_than_the_kv_memory_is_refused():
    core, _ = make_core(FakeExecutor(kv_pages=2, max_position_embeddings=1000))
    core.add_request([1] * 15, greedy(1))  # 4 blocks of the 4 there are
    with pytest.raises(RequestError, match="more than the KV memory"):
        core.add_request([1] * 16, greedy(1))


def test_request_ids_are_unique_and_abort_finds_them():
    core, now = make_core()
    core.add_request([1, 2], greedy(4), req_id="r")
    with pytest.raises(RequestError, match="already in use"):
        core.add_request([1], greedy(1), req_id="r")
    core.step()
    now[0] = 2.0
    out = core.abort("r")
    assert out.finish_reason == FinishReason.ABORT and out.token_ids == [7]
    assert core.abort("r") is None and core.abort("nobody") is None
    assert core.drain_events()[-1].token_id == -1 and core.executor.forgotten == ["r"]
    assert not core.has_unfinished and core.num_kv_pages <= 2  # one spare page at most


def test_the_next_steps_pages_are_mapped_while_a_step_runs():
    core, _ = make_core()
    core.add_request([1] * 3, greedy(12))
    run(core)
    phases = [phase for phase, _ in core.executor.kv_mapper.log]
    assert phases[0] == "planning"  # the first prefill: nothing was ahead
    assert phases[1:] and set(phases[1:]) == {"running"}


def test_an_idle_core_keeps_no_pages_mapped_ahead():
    core, _ = make_core()
    for n in range(6):
        core.add_request([1] * 10, greedy(6), req_id=f"r{n}")
    run(core)
    assert len(core.executor.kv_mapper.mapped) <= core.blocks.num_spare_pages


def test_the_device_protocol():
    core, _ = make_core(max_num_seqs=2)
    ids = [core.add_request([1, 2], greedy(3)) for _ in range(4)]
    assert (core.num_running, core.num_waiting) == (0, 4)
    core.reorder_waiting([ids[3], ids[2]])
    assert [s.req_id for s in core.sequences()] == [ids[3], ids[2], ids[0], ids[1]]
    core.step()
    assert (core.num_running, core.num_waiting) == (2, 2)
    assert [core.is_running(s) for s in core.sequences()] == [True, True, False, False]
    core.pause_admission(True)
    assert core.admission_paused
    while core.num_running:
        core.step()
    assert core.num_waiting == 2 and core.step() == []  # paused: nothing new is admitted
    core.pause_admission(False)
    assert len(run(core)) == 2 and core.has_request(ids[0]) is False


def test_evict_preempts_everything_and_activate_brings_the_model_back():
    core, _ = make_core()
    ids = [core.add_request([1] * 5, greedy(4)) for _ in range(3)]
    core.step()
    preempted = core.evict()
    assert {s.req_id for s in preempted} == set(ids) and core.num_preemptions == 3
    assert not core.resident and core.num_kv_pages == 0
    with pytest.raises(RuntimeError, match="evicted"):
        core.step()
    core.activate()
    done = run(core)
    assert all(done[i].token_ids == [7] * 4 and done[i].num_preemptions == 1 for i in ids)


def test_close_aborts_what_is_left_and_gives_every_page_back():
    core, _ = make_core()
    core.add_request([1] * 5, greedy(4))
    core.step()
    core.close()
    assert core.executor.closed and not core.executor.kv_mapper.mapped and not core.has_unfinished


def test_the_core_and_the_executor_protocol_import_no_torch():
    code = ("import sys, prism.engine.core, prism.engine.executor, prism.sim.executor; "
            "sys.exit(1 if 'torch' in sys.modules else 0)")
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0
